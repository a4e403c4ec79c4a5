"""`fhir-dmp serve`: the WSGI app under gunicorn (CONTRACT.md "Install and run").

Why gunicorn: a pre-fork server with a graceful drain on SIGTERM (workers
finish in-flight requests within ``graceful_timeout``), worker supervision
and restart, and the standard way Flask apps run in production.

Why the ``gthread`` worker (not ``sync``): FHIR clients keep HTTP
connections alive (requests.Session, fhirpy) and a sync worker closes each
connection after one request and is held hostage by one slow client;
gthread serves keep-alive connections from a small thread pool per worker.
The app is thread-safe (pymongo's client is; per-request state lives in
Flask's context), and the work is I/O bound (database, SMTP), so threads help
while processes give CPU parallelism.

Lifecycle (master process):
1. check the port is free (one-line error otherwise);
2. with no ``mongodb_uri``, start :class:`~fhir_dmp.embedded_db.EmbeddedMongo`
   in ``config.data_dir`` and hand its URI to the workers in their Config;
   with a URI, check the database answers before forking;
3. print the dev-mode banner when ``config.dev_mode``;
4. run gunicorn: each worker calls ``create_app(config)`` after the fork
   (``preload_app`` off), so no pymongo client crosses ``fork()``;
5. on SIGTERM or SIGINT (Ctrl-C): drain, then stop the embedded database in
   the ``on_exit`` hook, exit 0.

The access log carries method, path (never the query string, which may hold
an INS), status, size and duration; never headers (no Authorization).
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import Callable, TextIO

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

THREADS_PER_WORKER = 16
GRACEFUL_TIMEOUT_S = 30
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


class ServeError(RuntimeError):
    """The server cannot start (one-line reason for the operator)."""


def default_workers() -> int:
    """One worker process per CPU core, at most 8 (bench/README.md: on 2 cores 2 x 16 threads
    measured best; more processes only add GIL-free CPU the machine does not have)."""
    return max(1, min(8, os.cpu_count() or 1))


def default_threads() -> int:
    """Threads per worker: enough to overlap the database and journal waits (issue 13)."""
    return THREADS_PER_WORKER


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ServeError` if ``host:port`` cannot be listened on now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ServeError(f"cannot listen on {host!r}: unknown host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
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


def _load_create_app() -> Callable:
    try:
        from .app import create_app
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.app":
            raise ServeError("the application module fhir_dmp.app is missing") from None
        raise
    return create_app


class _Arbiter(Arbiter):
    """gunicorn's master, with Ctrl-C draining like SIGTERM (CONTRACT.md:
    "runs until SIGINT/SIGTERM, then drains requests")."""

    def handle_int(self):
        raise StopIteration


class FhirDmpApplication(BaseApplication):
    """gunicorn application: ``app_factory(config)`` in each worker after fork."""

    def __init__(self, config, app_factory: Callable, *, workers: int,
                 on_exit: Callable[[], None] | None = None):
        self.fhir_config = config
        self.app_factory = app_factory
        self.workers = workers
        self._on_exit = on_exit
        super().__init__(prog="fhir-dmp")

    def load_config(self):
        host = self.fhir_config.host
        bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        on_exit = self._on_exit

        def exit_hook(arbiter):  # master only, after the workers have drained
            if on_exit is not None:
                on_exit()

        def worker_ready(worker):
            # a terminal Ctrl-C reaches the whole process group: workers let
            # the master decide, so in-flight requests are drained, not cut
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        settings = {
            "bind": [f"{bind_host}:{self.fhir_config.port}"],
            "workers": self.workers,
            "worker_class": "gthread",
            "threads": self.fhir_config.threads or default_threads(),
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "timeout": 60,
            "keepalive": 5,
            "preload_app": False,
            "proc_name": "fhir-dmp",
            "accesslog": "-",
            "access_log_format": ACCESS_LOG_FORMAT,
            "errorlog": "-",
            "loglevel": "info",
            "on_exit": exit_hook,
            "post_worker_init": worker_ready,
            "control_socket_disable": True,  # no runtime control socket file
        }
        for key, value in settings.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        from .lifecycle import start_daily_retention
        app = self.app_factory(self.fhir_config)
        start_daily_retention(app)   # CONTRACT.md "Lifecycle": retention once a day, one process at a time
        return app

    def run(self):
        _Arbiter(self).run()


def serve(config, *, workers: int | None = None, app_factory: Callable | None = None,
          out: TextIO | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit status (0 after a drain).

    Raises :class:`ServeError`, ``EmbeddedDbError`` or ``DatabaseError`` (one
    line each) when it cannot start. ``app_factory`` defaults to
    ``fhir_dmp.app.create_app``.
    """
    from .database import open_database
    from .embedded_db import EmbeddedMongo

    from .security.habilitations import Habilitations

    out = out or sys.stderr
    workers = workers or default_workers()
    check_port_free(config.host, config.port)
    Habilitations.load(config.habilitations_file)   # policy data validated before anything starts

    master_pid = os.getpid()
    embedded: EmbeddedMongo | None = None

    def stop_db():
        # also reached in forked workers unwinding this stack: only the master stops it
        if embedded is not None and os.getpid() == master_pid:
            embedded.stop()

    # a SIGTERM before gunicorn installs its handlers still stops the database
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
        # imported in the master (fail fast, before forking); called in each worker
        factory = app_factory or _load_create_app()
        if config.dev_mode:
            print(dev_banner(config), file=out, flush=True)
        signal.signal(signal.SIGTERM, previous)
        FhirDmpApplication(config, factory, workers=workers, on_exit=stop_db).run()
        return 0
    finally:
        stop_db()
