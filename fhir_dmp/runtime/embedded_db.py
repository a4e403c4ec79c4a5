"""The embedded database: SecantusDB run as a child process.

DESIGN.md ("Storage", embedded default): with no MongoDB URI configured the
server starts a local SecantusDB (MongoDB wire protocol, WiredTiger storage,
``--sync-on-commit``) on a free loopback port.

Layout of ``data_dir``::

    db/       the WiredTiger home (``--storage-path``)
    db.log    the child's stdout/stderr (appended; no secrets are written there)
    db.pid    "<pid> <port>" of the running child, removed on clean stop

Crash recovery: WiredTiger's ``db/WiredTiger.lock`` is held with an fcntl
lock, released by the kernel when the process dies (even by ``kill -9``); the
file itself is permanent and must not be deleted. The only stale file a crash
leaves is therefore our ``db.pid``: on start, a pid file naming a dead process
(or a process that is not a secantusd on this dir) is removed; one naming a
live secantusd serving this dir makes :meth:`EmbeddedMongo.start` refuse.
WiredTiger replays its journal on the next open, so committed data (fsynced
on every commit with ``--sync-on-commit``) is intact.

The child runs in its own session (process group), so a Ctrl-C typed at the
terminal reaches only the parent, which then stops the child cleanly
(SIGTERM, then SIGKILL after a timeout). On Linux the child also gets
SIGTERM if the parent dies without stopping it (``PR_SET_PDEATHSIG``), so a
killed server does not leave a database holding the data dir.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

EXECUTABLE = "secantusd-py"


class EmbeddedDbError(RuntimeError):
    """The embedded database could not be started (one-line message)."""


def find_executable() -> str:
    """Path of ``secantusd-py``: next to ``sys.executable`` first, then on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found:
        return found
    raise EmbeddedDbError(
        f"{EXECUTABLE} not found next to {sys.executable} nor on PATH; "
        "install the 'secantusdb' package or set FHIR_DMP_MONGODB_URI")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> list[str] | None:
    """argv of a live process (Linux /proc), None if unknown or gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purpose
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return True


def pdeathsig():
    """Hook (Linux; None elsewhere) that asks the kernel to SIGKILL the calling process when
    its parent dies: a preexec hook for a child, or called in a forked server worker.

    SIGKILL, not SIGTERM: a parent that dies without its hooks (SIGKILL, crash) is a crash, and
    the database follows at once, whatever its load (a graceful shutdown could take longer than
    anyone waits, leaving an orphan). WiredTiger with ``--sync-on-commit`` recovers committed
    data from its journal on the next start; a normal stop still goes through :meth:`stop`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def hook():  # runs in the child between fork and exec: keep it minimal
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return hook


class EmbeddedMongo:
    """SecantusDB as a child process:
    ``secantusd-py --host 127.0.0.1 --port P --storage-path DIR --sync-on-commit``.

    ``start()`` returns the MongoDB URI once the server answers ``ping``;
    ``stop()`` is idempotent. Usable as a context manager.

    ``die_with_parent`` (Linux): the child gets SIGKILL when the *thread*
    that started it ends (PR_SET_PDEATHSIG semantics); start it from the main
    thread, or pass False when starting it from a short-lived thread.
    ``test_commands``: start it with ``--enable-test-commands`` (``replSetStepDown``,
    ``configureFailPoint``: fault injection for tests and ``bench/chaos.py``; never in service).
    """

    host = "127.0.0.1"

    def __init__(self, data_dir: Path, *, port: int | None = None, log_file: Path | None = None,
                 die_with_parent: bool = True, test_commands: bool = False):
        self.data_dir = Path(data_dir).absolute()
        self.test_commands = test_commands
        self.storage_path = self.data_dir / "db"
        self.log_file = Path(log_file) if log_file else self.data_dir / "db.log"
        self.pid_file = self.data_dir / "db.pid"
        self._requested_port = port
        self.die_with_parent = die_with_parent
        self.port: int = port or 0
        self._proc: subprocess.Popen | None = None
        self._owner_pid: int | None = None  # the process that started the child

    # -- public ---------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30) -> str:
        """Start the child and wait (up to ``timeout`` s) until it answers ``ping``.

        Returns the URI. Raises :class:`EmbeddedDbError` when the executable is
        missing, another live server uses this data dir, or the child exits or
        does not answer in time (the message ends with the last lines of its log).
        """
        if self.running:
            return self.uri
        exe = find_executable()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_pid_file()
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            self.port = self._requested_port or free_port(self.host)
            try:
                self._spawn(exe)
                self._wait_ready(timeout)
                return self.uri
            except _PortRace:
                # another process took the port we picked between probe and bind
                continue
        raise EmbeddedDbError(f"embedded database could not bind a port: {self._log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the child, wait ``timeout`` s, then SIGKILL. Idempotent.

        Only the process that started the child stops it: in a forked copy (a
        server worker) this only forgets it.
        """
        proc, self._proc = self._proc, None
        if proc is None or os.getpid() != self._owner_pid:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._remove_pid_file(proc.pid)

    @classmethod
    def find_running(cls, data_dir: Path, timeout: float = 2) -> str | None:
        """URI of a live embedded server already serving ``data_dir`` (started
        by another fhir-dmp process), or None. Checked through its pid file,
        its command line and a ``serverStatus`` whose pid matches."""
        probe = cls(data_dir)
        try:
            pid, port = (int(x) for x in probe.pid_file.read_text().split()[:2])
        except (OSError, ValueError):
            return None
        if not probe._is_ours(pid):
            return None
        probe.port = port
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError
        try:
            with MongoClient(probe.uri, serverSelectionTimeoutMS=int(timeout * 1000),
                             connectTimeoutMS=int(timeout * 1000)) as client:
                if client.admin.command("serverStatus").get("pid") in (None, pid):
                    return probe.uri
        except PyMongoError:
            pass
        return None

    def __enter__(self) -> "EmbeddedMongo":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedMongo({str(self.data_dir)!r}, port={self.port}, pid={self.pid})"

    # -- internals ------------------------------------------------------
    def _is_ours(self, pid: int) -> bool:
        """True if ``pid`` is a live secantusd serving this data dir."""
        if not process_alive(pid):
            return False
        argv = _cmdline(pid)
        if argv is None:
            # no /proc (not Linux): a live pid we recorded is presumed ours
            return not Path("/proc").is_dir()
        joined = " ".join(argv)
        if "secantusd" not in joined:
            return False
        try:
            i = argv.index("--storage-path")
            return Path(argv[i + 1]).absolute() == self.storage_path
        except (ValueError, IndexError):
            return False

    def _check_pid_file(self) -> None:
        try:
            text = self.pid_file.read_text().split()
        except FileNotFoundError:
            return
        except OSError as e:
            raise EmbeddedDbError(f"cannot read {self.pid_file}: {e.strerror}") from None
        try:
            pid = int(text[0])
        except (ValueError, IndexError):
            pid = None
        if pid and self._is_ours(pid):
            raise EmbeddedDbError(
                f"another database server (pid {pid}) is using the data dir {self.data_dir}; "
                "stop it or choose another FHIR_DMP_DATA_DIR")
        # stale: left by a crash (the WiredTiger lock itself dies with its process)
        self.pid_file.unlink(missing_ok=True)

    def _spawn(self, exe: str) -> None:
        argv = [exe, "--host", self.host, "--port", str(self.port),
                "--storage-path", str(self.storage_path), "--sync-on-commit",
                *(["--enable-test-commands"] if self.test_commands else [])]
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # own session: terminal Ctrl-C goes to us, not to the database;
                # cwd = data dir so no stray ./secantusd.toml is picked up
                cwd=self.data_dir, start_new_session=True,
                preexec_fn=pdeathsig() if self.die_with_parent else None,
                close_fds=True)
        self._owner_pid = os.getpid()
        tmp = self.pid_file.with_suffix(".pid.tmp")
        tmp.write_text(f"{self._proc.pid} {self.port}\n")
        tmp.replace(self.pid_file)

    def _wait_ready(self, timeout: float) -> None:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        proc = self._proc
        deadline = time.monotonic() + timeout
        client = MongoClient(self.uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250,
                             socketTimeoutMS=2000)
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    self._proc = None
                    self._remove_pid_file(proc.pid)
                    tail = self._log_tail()
                    if "Address already in use" in tail:
                        if not self._requested_port:
                            raise _PortRace()
                        raise EmbeddedDbError(
                            f"embedded database port {self.port} is already in use")
                    raise EmbeddedDbError(
                        f"embedded database exited with code {code} during start: {tail}")
                try:
                    status = client.admin.command("serverStatus")
                    if status.get("pid") in (None, proc.pid):
                        return
                    # something else answers on this port: ours will fail to bind
                except PyMongoError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedDbError(
                        f"embedded database did not answer within {timeout:g}s: {self._log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self, lines: int = 3) -> str:
        """The last lines this run wrote to the log, joined on one line."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                text = f.read()[-8192:].decode(errors="replace")
        except OSError:
            return "(no log)"
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(kept) or "(empty log)"

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # its own group: reaches anything it spawned
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _remove_pid_file(self, pid: int) -> None:
        try:
            if self.pid_file.read_text().split()[0] == str(pid):
                self.pid_file.unlink()
        except (OSError, IndexError):
            pass


class _PortRace(Exception):
    pass
