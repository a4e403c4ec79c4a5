"""`fhir-dmp serve`: the WSGI app under granian (CONTRACT.md "Install and run").

Why granian: a pre-fork server whose HTTP parsing, connection handling and thread pool are
in Rust, cheaper in CPU per request than gunicorn gthread (bench/README.md, "The WSGI
server"). It drains in-flight requests on SIGTERM/SIGINT, supervises
its workers (a dead one is respawned) and keeps HTTP connections alive (FHIR clients
reuse them); each worker runs the WSGI app on a pool of ``config.threads`` Python
threads (default 32) so that database and journal waits overlap. The app is thread-safe
(pymongo's client is; per-request state lives in Flask's context).

Lifecycle (master process):
1. check the port is free and the habilitation matrix is valid (one-line error otherwise);
2. with no ``mongodb_uri``, start :class:`~fhir_dmp.runtime.embedded_db.EmbeddedMongo`
   in ``config.data_dir`` and hand its URI to the workers in their Config;
   with a URI, check the database answers before forking;
   with the context cache on, start the node's change hub (:mod:`~fhir_dmp.runtime.change_hub`:
   one change stream for every worker's caches) and hand its socket to the workers likewise;
3. print the dev-mode banner when ``config.dev_mode``;
4. run granian: each worker calls ``app_factory(config)`` after the fork (the
   ``target_loader``), so no pymongo client crosses ``fork()``; a worker dies with the
   master (``PR_SET_PDEATHSIG``, SIGKILL) and drops the ``FHIR_DMP_*`` settings from its environment
   before granian copies it into every WSGI environ (no secret reaches a request);
5. on SIGTERM or SIGINT (Ctrl-C): the workers finish their in-flight requests (killed
   after ``GRACEFUL_TIMEOUT_S``) and run their exit hooks, then the change hub and the embedded
   database stop, exit 0. The workers' stop signals go through :func:`_stop_signals`, which works
   around two defects of granian's own handling (a frozen worker, a missed stop).

Logs are JSON lines (``fhir_dmp.runtime.logs``), granian's own included; one access line per
request (logger ``fhir_dmp.access``) carries the request id, method, path (never the query
string, which may hold an INS), status, size and duration; never headers (no Authorization).
"""
from __future__ import annotations

import atexit
import errno
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, TextIO

from granian.constants import Interfaces
from granian.server.mp import MPServer

from ..guard.lifecycle import start_daily_retention
from ..guard.repository import GuardedRepository
from ..http.app import create_app
from ..security.habilitations import Habilitations
from .change_hub import HubProcess
from .database import open_database
from .embedded_db import EmbeddedMongo, pdeathsig
from .logs import REQUEST_ID_ENVIRON, configure as configure_logs

# threads per worker: more requests share each journal group commit; 32 cost the least CPU per
# request of 4, 8, 16 and 32 (bench/README.md, "The WSGI server")
THREADS_PER_WORKER = 32
GRACEFUL_TIMEOUT_S = 30

access_log = logging.getLogger("fhir_dmp.access")


class ServeError(RuntimeError):
    """The server cannot start (one-line reason for the operator)."""


def default_workers() -> int:
    """One worker process per CPU core, at most 8: more processes only add GIL-free CPU the
    machine does not have (bench/README.md, "The WSGI server")."""
    return max(1, min(8, os.cpu_count() or 1))


def default_threads() -> int:
    """Threads per worker: enough to overlap the database and journal waits."""
    return THREADS_PER_WORKER


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ServeError` if ``host:port`` cannot be listened on now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ServeError(f"cannot listen on {host!r}: unknown host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} is already in use") from None
            if e.errno == errno.EACCES:
                raise ServeError(f"permission denied to listen on port {port}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ServeError(f"cannot listen on {host}: address not available") from None
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def dev_banner(config) -> str:
    """The loud multi-line dev-mode warning printed on start."""
    line = "*" * 72
    rows = [
        "fhir-dmp is running in DEV MODE (FHIR_DMP_ISSUER is not set).",
        "It trusts only a local signing key kept in",
        f"  {config.dev_key_path}",
        "Mint access tokens with:   fhir-dmp dev-token KIND ...",
        "  e.g.  fhir-dmp dev-token patient --patient ID",
        "        fhir-dmp dev-token ps --ps 810000000001 --profession 10",
        "NOT FOR PRODUCTION: set FHIR_DMP_ISSUER to your identity provider.",
    ]
    return "\n".join([line, *(f"*  {r}" for r in rows), line])


class _Logged:
    """A response body that writes the request's access line when the server closes it
    (the body sent, or the client gone). Iterating it is iterating the app's body."""

    __slots__ = ("body", "environ", "response", "started")

    def __init__(self, body, environ: dict, response: list, started: float):
        self.body, self.environ, self.response, self.started = body, environ, response, started

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._log()

    def _log(self) -> None:
        env = self.environ
        status, headers = self.response or ("500", ())
        size = next((v for k, v in headers if k.lower() == "content-length"), "-")
        ms = round((time.perf_counter() - self.started) * 1000)
        access_log.info('%s "%s %s" %s %s %sms', env.get("REMOTE_ADDR", "-"), env.get("REQUEST_METHOD"),
                        env.get("PATH_INFO"), status[:3], size, ms,
                        extra={"request_id": env.get(REQUEST_ID_ENVIRON)})


class _Served:
    """The WSGI callable a worker serves: the app, and one access line per request."""

    __slots__ = ("app",)

    def __init__(self, app: Callable):
        self.app = app

    def __call__(self, environ: dict, start_response: Callable):
        started = time.perf_counter()
        response: list = []

        def respond(status, headers, exc_info=None):
            response[:] = (status, headers)
            return start_response(status, headers, exc_info)
        return _Logged(self.app(environ, respond), environ, response, started)


def _worker_app(config, app_factory: Callable, master_pid: int) -> _Served:
    """granian's target loader: runs in each worker after the fork, before it serves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C while booting: the master decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped while booting: nothing to drain yet
    die_with_master = pdeathsig()   # a master killed hard: the worker follows at once (SIGKILL), as
    if die_with_master is not None:  # the database does; nothing can be relied on to drain it then
        die_with_master()
    if os.getppid() != master_pid:
        sys.exit(0)                                # it died before the hook was set
    for key in [k for k in os.environ if k.startswith("FHIR_DMP_")]:
        del os.environ[key]                        # read into config already; granian copies os.environ per request
    app = app_factory(config)
    # CONTRACT.md "Lifecycle": retention once a day, one process at a time
    start_daily_retention(app, GuardedRepository)
    # what the worker built to serve lives as long as it does: out of the cyclic collector's
    # walks, which then see only what requests leave behind (a full collection walked the whole
    # heap, ~70 ms, bench/README.md "Issue 22: the search's CPU, second cut";
    # https://docs.python.org/3/library/gc.html#gc.freeze)
    gc.freeze()
    return _Served(app)


def _wsgi_worker(*args) -> None:
    """A worker's life: granian's WSGI worker with our stop signals, then this process's exit
    hooks (the sealer and the context cache release their leases), which a multiprocessing
    child otherwise skips."""
    import granian._signals
    granian._signals.set_sync_signals = _stop_signals   # looked up when the worker body runs
    try:
        MPServer._spawn_wsgi_worker(*args)
    finally:
        atexit._run_exitfuncs()


def _stop_signals():
    """The worker's SIGTERM/SIGINT handling, in place of granian's ``set_sync_signals``.

    Two defects of granian 2.8's own, both seen with Ctrl-C (the worker gets the terminal's
    SIGINT and the master's SIGTERM): its handler calls ``WorkerSignal.set()`` on every
    signal, and a third call blocks for ever holding the GIL (the whole worker freezes until
    the master kills it 30 s later, its in-flight requests lost); and the worker waits for its
    stop in an untimed lock wait of the main thread, which a signal that the kernel hands to
    another thread (granian's Rust threads, the app's) never wakes, Python running handlers in
    the main thread only. Here the handler sets the stop once, and since Python's C handler
    writes every signal's number to the wakeup fd whatever the thread, a thread reads it and
    sends the first stop signal again to the main thread itself."""
    from granian._granian import WorkerSignal

    stop, stopping = WorkerSignal(), []

    def handler(signum, frame):          # runs in the main thread only
        if not stopping:
            stopping.append(signum)
            stop.set()
    stops = {signal.SIGINT, signal.SIGTERM}
    for signum in stops:
        signal.signal(signum, handler)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    main = threading.main_thread().ident

    def forward():
        while not (signums := set(os.read(read_fd, 64)) & stops):
            pass
        signal.pthread_kill(main, min(signums))
    threading.Thread(target=forward, name="fhir-dmp-stop-signals", daemon=True).start()
    return stop


class _PolledEvent(threading.Event):
    """An event whose untimed ``wait`` wakes every ``POLL_S`` so that the main thread runs the
    signal handlers Python has queued for it.

    granian's master waits for its stop in ``main_loop_interrupt.wait()`` in the main thread; a
    SIGINT/SIGTERM that the kernel hands to another thread of the master (a worker watcher, a
    Rust thread) only queues the Python handler, which never runs while the main thread sleeps
    in an untimed lock wait: the master then never shuts down (seen once in the Ctrl-C test
    under load; the same defect as the worker's, see :func:`_stop_signals`)."""

    POLL_S = 0.25

    def wait(self, timeout=None):
        if timeout is not None:
            return super().wait(timeout)
        while not super().wait(self.POLL_S):
            pass
        return True


class _Granian(MPServer):
    """granian's master (one process per worker, never threads: pymongo is not fork-safe)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.main_loop_interrupt = _PolledEvent()

    def signal_handler_interrupt(self, *args, **kwargs):
        # a terminal's Ctrl-C also reaches the workers, which drain and end by themselves:
        # their end is then asked for, not a crash to respawn or to exit non-zero for
        for worker in self.wrks:
            worker.interrupt_by_parent = True
        super().signal_handler_interrupt(*args, **kwargs)


class QuietDefaultThreads(logging.Filter):
    """Drops granian's "Configuration allows spawning up to N Python threads ... quite high" notice
    when N is our measured default (THREADS_PER_WORKER, above): a deliberate choice, not a
    misconfiguration. A FHIR_DMP_THREADS the operator sets keeps granian's warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            f"Configuration allows spawning up to {THREADS_PER_WORKER} Python threads")


def _granian(config, workers: int) -> _Granian:
    granian_log = {"propagate": True}               # through our JSON handler
    if not config.threads:
        granian_log["filters"] = ["default_threads"]
    return _Granian(
        "fhir_dmp.http.app:create_app", address=config.host, port=config.port,
        interface=Interfaces.WSGI, workers=workers,
        blocking_threads=config.threads or default_threads(),
        websockets=False, respawn_failed_workers=True, workers_kill_timeout=GRACEFUL_TIMEOUT_S,
        log_access=False,   # our own access line (_Served), with the request id
        log_dictconfig={"filters": {"default_threads": {"()": QuietDefaultThreads}},
                        "loggers": {"_granian": granian_log}},
    )


def serve(config, *, workers: int | None = None, app_factory: Callable | None = None,
          out: TextIO | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit status (0 after a drain).

    Raises :class:`ServeError`, ``EmbeddedDbError`` or ``DatabaseError`` (one
    line each) when it cannot start. ``app_factory`` defaults to
    ``fhir_dmp.http.app.create_app``.
    """
    out = out or sys.stderr
    configure_logs(stream=out)       # JSON lines with the request id, inherited by the workers
    workers = workers or default_workers()
    check_port_free(config.host, config.port)
    Habilitations.load(config.habilitations_file)   # policy data validated before anything starts

    master_pid = os.getpid()
    embedded: EmbeddedMongo | None = None
    hub: HubProcess | None = None

    def stop_children():
        # only the master stops them (a worker never unwinds this stack: it ends with os._exit)
        if os.getpid() != master_pid:
            return
        if hub is not None:
            hub.stop()
        if embedded is not None:
            embedded.stop()

    # a SIGTERM before granian installs its handlers still stops the database
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if config.mongodb_uri is None:
            embedded = EmbeddedMongo(config.data_dir)
            uri = embedded.start()
            print(f"fhir-dmp: embedded database on 127.0.0.1:{embedded.port} "
                  f"(data in {embedded.data_dir})", file=out, flush=True)
            config = config.with_(mongodb_uri=uri)
        else:
            client, _ = open_database(config)
            client.close()  # no pymongo client may cross fork()
        if config.context_cache:   # one change stream for the node, fanned out to the workers
            hub = HubProcess(config)
            config = config.with_(change_hub=hub.start())
        factory = app_factory or create_app   # called in each worker, after the fork
        if config.dev_mode:
            print(dev_banner(config), file=out, flush=True)
        server = _granian(config, workers)   # its own SIGTERM/SIGINT handlers replace ours as it starts
        server.serve(spawn_target=_wsgi_worker, wrap_loader=False,
                     target_loader=functools.partial(_worker_app, config, factory, master_pid))
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_children()
