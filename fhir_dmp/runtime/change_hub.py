"""The node's change hub: ONE change stream per ``fhir-dmp serve``, fanned out to its workers (issue 22).

Every worker keeps caches that the database's changes invalidate (``security/context_cache.py``:
the decision context, the DMP document cache, the issuer's key set). With its own change stream
each, the database scans every oplog entry once per worker; here one process per node watches the
collections of every worker (``security/change_feed.py``: the same :func:`follow` loop, the same
fault semantics) and forwards each change, reduced to collection, operation and patient id, to every
worker connected to its Unix domain socket, as one JSON line:

* ``{"live": true}`` once its stream is open, to every worker then connected and to each worker
  that connects while it is open: the worker drops what it cached (whatever changed before is
  unknown to it) and caches again;
* each change, in the stream's order, to every worker that was told "live";
* ``{"live": false}`` when the stream is lost (a gap): every worker drops its caches and is not
  live until the next "live";
* ``{}`` (a beat) at least every ``BEAT_S`` while the stream answers: a worker that hears nothing
  for ``SILENCE_S`` (a hub frozen, a stream stuck) takes the feed for lost.

A worker that cannot keep up (more than :data:`BACKLOG` messages waiting for it) is hung up on: it
goes not live at once and connects again, never cached on a change it missed.

Why a child process of ``serve``'s master, as the embedded database is (``embedded_db.py``): no
pymongo client may cross the fork of granian's workers, and a crash of the hub touches no worker.
It is started before the workers, dies with the master (``pdeathsig``, SIGKILL), and the master
restarts it when it dies (:class:`HubProcess`: after 1 s, doubled up to 30 s while each new hub
dies young, :func:`restart_pause`) rather than letting the workers fall back to a
stream each: one code path in the workers (a feed from the hub, lost and found again), and no burst
of W streams on the database when something is already wrong. While it is away the workers serve
without caches (from the database), never from a cache nobody invalidates. Its socket lives in a
private directory (``mkdtemp``: mode 0700, with the master's pid) that the master removes on stop,
and that the next ``serve`` removes when the master was killed (:func:`remove_orphan_dirs`); its
path reaches the workers in their Config (``change_hub``), as the embedded database's URI does.
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

from ..search.doc_cache import CACHED_TYPE
from ..security.change_feed import BEAT, BEAT_S, GAP, LIVE, StreamFeed, encode, follow
from ..storage import Storage
from ..storage.core import KEY_SETS
from ..storage.errors import Outage
from .database import DatabaseError, open_database
from .embedded_db import pdeathsig
from .logs import configure as configure_logs

log = logging.getLogger(__name__)

#: messages waiting for one worker before the hub hangs up on it
BACKLOG = 10_000
#: the hub process's command (imported, not run as ``__main__``: its log lines keep this module's name)
ENTRY = "import sys; from fhir_dmp.runtime.change_hub import main; sys.exit(main())"
#: pause before restarting a hub that died, doubled for each one that dies young ...
RESTART_PAUSE_S = 1.0
#: ... up to this (a hub that cannot start, say a bad database address, is not respawned in a loop)
RESTART_PAUSE_MAX_S = 30.0
#: a hub that ran this long died "old": the next restart waits RESTART_PAUSE_S again
RESTART_RESET_S = 60.0
#: the directories of the hubs' sockets: ``<tmp>/fhir-dmp-hub-*``, each with its master's pid
DIR_PREFIX = "fhir-dmp-hub-"
MASTER_FILE = "master.pid"
SOCKET_NAME = "changes.sock"
#: how long ``serve`` waits at most for a new hub's socket before it starts the workers
READY_S = 30.0


class _Worker:
    """One connected worker: its socket and the messages waiting for it, sent by a thread of its own."""

    def __init__(self, sock: socket.socket, gone):
        self.sock = sock
        self.waiting: queue.Queue[bytes] = queue.Queue(BACKLOG)
        self._gone = gone
        threading.Thread(target=self._send, name="change-hub-send", daemon=True).start()

    def put(self, line: bytes) -> None:
        """Queue ``line``; hang up on a worker too far behind (it connects again, caches dropped)."""
        try:
            self.waiting.put_nowait(line)
        except queue.Full:
            self.close()

    def close(self) -> None:
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _send(self) -> None:
        try:
            while True:
                batch = [self.waiting.get()]
                while not self.waiting.empty() and len(batch) < 256:
                    batch.append(self.waiting.get_nowait())
                self.sock.sendall(b"".join(batch))
        except OSError:
            pass
        finally:
            self._gone(self)
            self.sock.close()


class ChangeHub:
    """The hub's work in its process: one change stream (:func:`follow` over a
    :class:`~fhir_dmp.security.change_feed.StreamFeed`) on the decision's inputs and ``also``, its
    changes fanned out to the workers that connect to ``listener``."""

    def __init__(self, storage, listener: socket.socket, also: tuple[str, ...]):
        self.storage = storage
        self.listener = listener
        self.also = also
        self.workers: list[_Worker] = []
        self.live = False
        self._said = 0.0          # when the last message went out (a beat follows BEAT_S after)
        self._lock = threading.Lock()   # one order for every worker: "live", then each change

    def run(self, stop: threading.Event) -> None:
        threading.Thread(target=self._accept, name="change-hub-accept", daemon=True).start()
        follow(lambda: StreamFeed.open(self.storage, self.also), stop=stop, outage=Outage(log, "change hub stream"),
               on_live=self._opened, on_change=self._send, on_gap=self._lost, on_pass=self._beat)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            worker = _Worker(sock, self._gone)
            with self._lock:
                self.workers.append(worker)
                if self.live:
                    worker.put(encode(LIVE))

    def _gone(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)

    def _say(self, message: dict, *, live: bool | None = None) -> None:
        """``message`` to every worker (``live``: the stream's new state, said once)."""
        line = encode(message)
        with self._lock:
            if live is not None:
                if live == self.live:
                    return
                self.live = live
            for worker in list(self.workers):
                worker.put(line)
            self._said = time.monotonic()

    def _opened(self) -> None:
        log.info("change hub: change stream opened")
        self._say(LIVE, live=True)

    def _lost(self) -> None:
        self._say(GAP, live=False)

    def _send(self, change: dict) -> None:
        self._say(change)

    def _beat(self) -> None:
        if time.monotonic() - self._said >= BEAT_S:
            self._say(BEAT)


def watched_beyond_decision(config) -> tuple[str, ...]:
    """What every worker's feed carries beyond the decision's inputs (``services.start_background``):
    the issuer's key sets (its listener), and the documents when the DMP document cache is on."""
    return (KEY_SETS, *((CACHED_TYPE,) if config.document_cache_docs > 0 else ()))


def listen(path: str) -> socket.socket:
    """The hub's listening socket at ``path`` (a stale one, left by a hub that died, replaced)."""
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


def main() -> int:
    """The hub process (:data:`ENTRY`): its Config, socket path and
    master's pid come pickled on stdin from :class:`HubProcess` (no secret on a command line)."""
    config, path, master_pid = pickle.load(sys.stdin.buffer)
    if os.getppid() != master_pid:
        return 0                                    # the master died before the hook was set
    configure_logs()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = listen(path)          # first: the workers connect and wait for "live"
    try:
        client, db = open_database(config)
    except DatabaseError as exc:
        log.warning("change hub: %s", exc)          # one line; serve starts it again
        return 1
    try:
        ChangeHub(Storage(client, db, wait=config.db_wait), listener, watched_beyond_decision(config)).run(stop)
    finally:
        listener.close()
        client.close()
    return 0


def restart_pause(previous: float, ran_s: float) -> float:
    """The pause before the next restart of a hub that ran ``ran_s`` seconds, the last pause
    having been ``previous``: :data:`RESTART_PAUSE_S` after a hub that ran long, else double
    the last one, at most :data:`RESTART_PAUSE_MAX_S`."""
    if ran_s >= RESTART_RESET_S:
        return RESTART_PAUSE_S
    return min(RESTART_PAUSE_MAX_S, max(RESTART_PAUSE_S, previous * 2))


def remove_orphan_dirs(tmp: str | None = None) -> list[str]:
    """Remove the socket directories that hubs of dead masters left behind (a master SIGKILLed
    cannot remove its own): those of this user whose ``master.pid`` names no live process, or
    that have none and are older than a minute (a master killed before writing it), and whose
    socket no hub answers on. The paths removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith(DIR_PREFIX) or not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
            continue
        try:
            master = int(Path(path, MASTER_FILE).read_text())
        except (OSError, ValueError):
            master = None
        if master is None and time.time() - os.stat(path).st_mtime < 60:
            continue
        if master is not None and _alive(master) or _listening(os.path.join(path, SOCKET_NAME)):
            continue      # (a hub still answering: a master in another pid namespace sharing /tmp)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _listening(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: alive
        return True
    return True


class HubProcess:
    """The change hub as a child of ``serve``'s master: :meth:`start` returns its socket path,
    a thread restarts it whenever it dies, :meth:`stop` ends it and removes its directory."""

    def __init__(self, config):
        self.config = config
        for path in remove_orphan_dirs():
            log.info("removed the socket directory of a dead server's change hub: %s", path)
        self.dir = tempfile.mkdtemp(prefix=DIR_PREFIX)      # mode 0700: this user's only
        Path(self.dir, MASTER_FILE).write_text(str(os.getpid()))
        self.path = os.path.join(self.dir, SOCKET_NAME)
        self.pause = 0.0          # the last restart's pause (restart_pause): none yet
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()            # no start once stopping
        self._watcher: threading.Thread | None = None

    def start(self) -> str:
        """Start the hub, wait (at most :data:`READY_S`) until it listens, and return its socket's path."""
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="change-hub-watch", daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + READY_S
        while not os.path.exists(self.path) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.path

    def _spawn(self) -> None:
        # its own session (a terminal's Ctrl-C is the master's to handle), SIGKILLed when the
        # thread that starts it ends (PR_SET_PDEATHSIG): the master's main thread, then the watcher
        # the master's import path: the hub runs the master's code, whatever put it on the path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=pdeathsig(), close_fds=True)
        with self.proc.stdin as payload:
            pickle.dump((self.config, self.path, os.getpid()), payload)
        log.info("change hub started (pid %s)", self.proc.pid)

    def _watch(self) -> None:
        started = time.monotonic()
        while True:
            code = self.proc.wait()
            if self._stopping.is_set():     # ended by stop(): nothing to say
                return
            self.pause = restart_pause(self.pause, time.monotonic() - started)
            log.warning("change hub exited (%s); starting it again in %.0f s", code, self.pause)
            if self._stopping.wait(self.pause):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()
                started = time.monotonic()

    def stop(self, timeout: float = 10) -> None:
        """End the hub (SIGTERM, then SIGKILL) and remove its socket's directory. Idempotent."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watcher is not None:
            self._watcher.join(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

