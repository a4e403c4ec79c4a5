"""Real ``fhir-dmp serve`` processes on the session's SecantusDB, and the ``fhir-dmp`` CLI beside them.

Fixture ``serve``: ``serve("a", FHIR_DMP_SMTP_HOST=...)`` starts ``python -m fhir_dmp.runtime.cli serve``
(granian, 2 workers unless told) in its own process group on a free port, against the test's
database and IdP, and waits until it answers ``/metadata``. Every server of one test shares one
audit signing key file and one key-encryption key file (as every process of one deployment must). At the end of the test each
one still running gets SIGTERM (then SIGKILL after 30 s).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from fhir_dmp.runtime.embedded_db import free_port
from tests.conftest import BASE

ROOT = Path(__file__).resolve().parents[1]


def serve_env(tmp: Path, name: str, mongo_uri: str, db_name: str, idp, **extra: str) -> dict:
    """The environment of one server (or CLI run) of a test: its own data dir, the shared keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_DMP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(FHIR_DMP_DATA_DIR=str(tmp / name), FHIR_DMP_MONGODB_URI=mongo_uri, FHIR_DMP_DB=db_name,
               FHIR_DMP_ISSUER=idp.issuer, FHIR_DMP_JWKS_FILE=str(idp.jwks_file),
               FHIR_DMP_AUDIENCE=idp.audience, FHIR_DMP_BASE_URL=BASE,
               FHIR_DMP_AUDIT_KEY_FILE=str(tmp / "audit-key.pem"), FHIR_DMP_KEK_FILE=str(tmp / "kek.json"),
               FHIR_DMP_THREADS="4")
    env.update(extra)
    return env


@dataclass
class Served:
    """One running ``fhir-dmp serve`` (master and workers in one process group)."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        """SIGKILL the master and every worker at once: no drain, no lease release, no atexit."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_ready(server: Served, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.proc.poll() is None, server.tail()
        try:
            if requests.get(f"{server.url}/metadata", timeout=2).status_code == 200:
                return
        except requests.RequestException:     # not listening yet, or too busy booting to answer
            pass
        assert time.monotonic() < deadline, f"serve {server.name} did not start\n{server.tail()}"
        time.sleep(0.1)


def start_serve(tmp: Path, name: str, mongo_uri: str, db_name: str, idp, *, workers: int = 2, wait: bool = True,
                **extra: str) -> Served:
    """``fhir-dmp serve`` (its own process group, a free port, log ``tmp/NAME.log``) on the
    database, with the settings of :func:`serve_env`; waits until it answers unless told."""
    port = free_port()
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_dmp.runtime.cli", "serve", "--port", str(port), "--workers", str(workers)],
            cwd=ROOT, env=serve_env(tmp, name, mongo_uri, db_name, idp, **extra),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Served(name, f"http://127.0.0.1:{port}/fhir", proc, log)
    if wait:
        try:
            wait_ready(server)
        except BaseException:
            server.kill()
            raise
    return server


@pytest.fixture
def serve(tmp_path, mongo_server, db, idp):
    """Start servers on the test's database: ``serve(name, workers=2, wait=True, **env)``."""
    started: list[Served] = []

    def start(name: str, *, wait: bool = True, **kw) -> Served:
        server = start_serve(tmp_path, name, mongo_server.uri, db.name, idp, wait=False, **kw)
        started.append(server)
        if wait:
            wait_ready(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in started:
        server.stop()


@pytest.fixture
def fhir_dmp_cli(tmp_path, mongo_server, db, idp):
    """Run ``fhir-dmp ARGS`` on the test's database (``FHIR_DMP_*`` overrides as keywords) and
    wait for it; ``fhir_dmp_cli.spawn(ARGS, **env)`` starts it and returns the ``Popen``."""
    started: list[subprocess.Popen] = []

    def argv_env(args, extra):
        return ([sys.executable, "-m", "fhir_dmp.runtime.cli", *args],
                serve_env(tmp_path, "cli", mongo_server.uri, db.name, idp, **extra))

    def run(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        argv, env = argv_env(args, extra)
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def spawn(*args: str, **extra: str) -> subprocess.Popen:
        argv, env = argv_env(args, extra)
        started.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        return started[-1]

    run.spawn = spawn
    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
