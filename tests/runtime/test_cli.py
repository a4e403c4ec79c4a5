"""The ``fhir-dmp`` command line, run as real processes (no mocks).

``serve`` is exercised twice: with a tiny stand-in WSGI app (always; it
checks the granian + embedded database lifecycle) and with the real
``fhir_dmp.http.app`` (skipped until that module exists).
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from fhir_dmp.runtime.embedded_db import free_port, process_alive
from fhir_dmp.runtime.server import ServeError, check_port_free, default_workers
from tests.faults.process_kit import hub_pids, worker_pids

ROOT = Path(__file__).resolve().parents[2]

STANDIN = '''
import sys, time
import flask
from fhir_dmp.runtime import cli

def factory(config):
    app = flask.Flask("standin")

    @app.get("/fhir/metadata")
    def metadata():
        return {"resourceType": "CapabilityStatement", "embedded": config.mongodb_uri is not None}

    @app.get("/fhir/slow")
    def slow():
        time.sleep(1.5)
        return {"done": True}

    @app.get("/fhir/environ")
    def environ():
        return {"fhir_dmp_keys": sorted(k for k in flask.request.environ if k.startswith("FHIR_DMP_"))}
    return app

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:], app_factory=factory))
'''


def _env(data_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_DMP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FHIR_DMP_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def _cli(*args, data_dir: Path, timeout: float = 30, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fhir_dmp.runtime.cli", *args], cwd=ROOT,
                          env=_env(data_dir, **env), capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fhir-dmp: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def _wait_metadata(proc: subprocess.Popen, port: int, log: Path, timeout: float = 30) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            r = requests.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2)
            if r.status_code == 200:
                return r
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"serve did not answer within {timeout}s: {log.read_text()[-2000:]}")


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(data_dir: Path) -> None:
    """No test leaves a database behind: kill the one a data dir's pid file names, if alive."""
    try:
        pid = int((data_dir / "db.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        _gone(pid)


def _serve(argv: list[str], data_dir: Path, log: Path, *, new_session: bool = False, **env) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=_env(data_dir, **env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


@contextlib.contextmanager
def _standin(tmp_path: Path, workers: int, *, new_session: bool = False, **env):
    """``fhir-dmp serve`` of the stand-in app on a free port, answering: (process, port, log,
    data dir); killed on the way out if still running, its database with it."""
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    port, log, data = free_port(), tmp_path / "serve.log", tmp_path / "data"
    proc = _serve([sys.executable, str(script), "serve", "--port", str(port), "--workers", str(workers)],
                  data, log, new_session=new_session, **env)
    try:
        _wait_metadata(proc, port, log)
        yield proc, port, log, data
    finally:
        if proc.poll() is None:
            proc.kill()
        _reap(data)


def _drains(port: int, stop) -> None:
    """A request in flight when ``stop()`` signals the server still gets its whole answer."""
    slow = {}
    t = threading.Thread(target=lambda: slow.update(
        r=requests.get(f"http://127.0.0.1:{port}/fhir/slow", timeout=10)))
    t.start()
    time.sleep(0.5)  # the request is in flight
    stop()
    t.join(10)
    assert slow["r"].status_code == 200 and slow["r"].json() == {"done": True}  # drained


def _children(pid: int) -> set[int]:
    return {int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()}


def test_serve_standin_drains_and_stops_database(tmp_path):
    with _standin(tmp_path, 1) as (proc, port, log, data):
        assert _wait_metadata(proc, port, log).json()["embedded"] is True
        db_pid = int((data / "db.pid").read_text().split()[0])
        assert process_alive(db_pid)
        [hub] = hub_pids(proc.pid)                  # the node's one change stream (runtime/change_hub.py)
        _drains(port, lambda: proc.send_signal(signal.SIGTERM))
        assert proc.wait(20) == 0
    assert _gone(db_pid), "the embedded database outlived the server"
    assert _gone(hub), "the change hub outlived the server"
    assert not (data / "db.pid").exists()
    text = log.read_text()
    assert "DEV MODE" in text and "fhir-dmp dev-token" in text
    assert "Traceback" not in text
    assert "Python threads" not in text         # the measured default is no misconfiguration


def test_serve_ctrl_c_drains_every_worker_and_exits_0(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, workers included, and an
    impatient operator presses it twice: each worker gets two SIGINTs and the master's SIGTERM.
    The in-flight request still completes, the server exits 0 (a worker ending first is no
    crash), no worker freezes (server._stop_signals)."""
    with _standin(tmp_path, 2, new_session=True) as (proc, port, log, data):
        db_pid = int((data / "db.pid").read_text().split()[0])
        _drains(port, lambda: [os.killpg(proc.pid, signal.SIGINT) for _ in range(2)])
        assert proc.wait(20) == 0
    assert _gone(db_pid)
    assert "Traceback" not in log.read_text() and "Unexpected exit" not in log.read_text()


def _signal_a_side_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to a thread of ``pid`` other than its main thread that does not block it,
    as the kernel may do with a process-directed signal (glibc's tgkill)."""
    bit = 1 << (signum - 1)
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        tid = int(task.name)
        blocked = next(int(line.split()[1], 16) for line in (task / "status").read_text().splitlines()
                       if line.startswith("SigBlk:"))
        if tid != pid and not blocked & bit:
            assert ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, signum) == 0
            return
    raise AssertionError("no side thread of the master takes the signal")


def test_serve_stops_when_the_kernel_hands_sigterm_to_another_thread_of_the_master(tmp_path):
    """A SIGTERM the kernel delivers to a thread of the master other than the main one (granian's
    worker watchers) still stops the server: Python runs handlers in the main thread only, which
    granian leaves in an untimed wait (server._PolledEvent)."""
    with _standin(tmp_path, 1) as (proc, port, log, data):
        db_pid = int((data / "db.pid").read_text().split()[0])
        _drains(port, lambda: _signal_a_side_thread(proc.pid, signal.SIGTERM))
        assert proc.wait(20) == 0
    assert _gone(db_pid)


def test_serve_respawns_a_worker_that_dies(tmp_path):
    """A worker killed under the server (OOM killer, crash) is replaced; the server goes on and
    still stops cleanly."""
    with _standin(tmp_path, 1) as (proc, port, log, data):
        db_pid = int((data / "db.pid").read_text().split()[0])
        [worker] = set(worker_pids(proc.pid)) - {db_pid}
        os.kill(worker, signal.SIGKILL)
        assert _gone(worker)
        deadline = time.monotonic() + 20
        while not (_children(proc.pid) - {db_pid, worker}) and time.monotonic() < deadline:
            time.sleep(0.1)
        _wait_metadata(proc, port, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_serve_keeps_fhir_dmp_settings_out_of_the_wsgi_environ(tmp_path):
    """The server copies its process environment into every WSGI environ: no FHIR_DMP_* setting
    (secrets among them) may reach a request there."""
    with _standin(tmp_path, 1, FHIR_DMP_PORTAL_CLIENT_SECRET="portal-secret",
                  FHIR_DMP_THREADS="500") as (proc, port, log, _):
        assert requests.get(f"http://127.0.0.1:{port}/fhir/environ", timeout=10).json() == {"fhir_dmp_keys": []}
        # a thread count the operator sets, really off for the machine, keeps granian's warning
        assert "spawning up to 500 Python threads" in log.read_text()


def test_dev_token_help_names_host_and_port():
    proc = subprocess.run([sys.executable, "-m", "fhir_dmp.runtime.cli", "dev-token", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    assert "--host HOST address the server listens on (default 127.0.0.1)" in help_text
    assert "--port PORT port the server listens on (default 8080)" in help_text


def test_serve_killed_hard_database_follows_and_restart_works(tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    data = tmp_path / "data"
    argv = [sys.executable, str(script), "serve", "--workers", "1", "--port"]
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve([*argv, str(port)], data, log)
    try:
        _wait_metadata(proc, port, log)
        db_pid = int((data / "db.pid").read_text().split()[0])
        workers = _children(proc.pid) - {db_pid}
        [hub] = hub_pids(proc.pid)
        assert workers - {hub}
        proc.kill()  # SIGKILL: no hook runs; the database and the hub get SIGKILL from the kernel (PDEATHSIG)
        proc.wait(10)
        assert _gone(db_pid), "the embedded database outlived a killed server"
        assert _gone(hub), "the change hub outlived a killed server"
        assert all(_gone(w) for w in workers), "a worker outlived its killed master"
    finally:
        if proc.poll() is None:
            proc.kill()
        _reap(data)
    port, log = free_port(), tmp_path / "serve2.log"
    proc = _serve([*argv, str(port)], data, log)  # stale pid file from the crash is cleared
    try:
        _wait_metadata(proc, port, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _reap(data)


@pytest.mark.skipif(importlib.util.find_spec("fhir_dmp.http.app") is None,
                    reason="fhir_dmp/http/app.py (create_app) is not written yet; the lead completes this test")
def test_serve_real_app(tmp_path):
    port, log, data = free_port(), tmp_path / "serve.log", tmp_path / "data"
    proc = _serve([sys.executable, "-m", "fhir_dmp.runtime.cli", "serve", "--port", str(port),
                   "--workers", "1"], data, log)
    try:
        r = _wait_metadata(proc, port, log, timeout=45)
        assert r.json()["resourceType"] == "CapabilityStatement"
        r = requests.get(f"http://127.0.0.1:{port}/fhir/Patient?identifier=secret-ins",
                         headers={"X-Request-Id": "access-line-1"}, timeout=10)
        assert r.status_code == 401
        db_pid = int((data / "db.pid").read_text().split()[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(db_pid)
    text = log.read_text()
    assert "Traceback" not in text
    # JSON log lines, one access line per request carrying its request id, never the query string
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert all({"time", "level", "logger", "message", "request_id"} <= set(x) for x in lines)
    [line] = [x for x in lines if x["logger"] == "fhir_dmp.access" and x["request_id"] == "access-line-1"]
    assert '"GET /fhir/Patient" 401' in line["message"] and "secret-ins" not in text


def test_serve_port_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _cli("serve", "--port", str(port), data_dir=tmp_path / "data")
    assert proc.returncode != 0
    assert _one_error_line(proc) == f"fhir-dmp: error: port {port} is already in use"
    assert not (tmp_path / "data" / "db").exists()  # failed before starting the database


def test_bad_config_value(tmp_path):
    proc = _cli("serve", "--port", str(free_port()), data_dir=tmp_path / "data",
                FHIR_DMP_BREAK_GLASS_TTL="abc")
    assert proc.returncode != 0
    assert "FHIR_DMP_BREAK_GLASS_TTL" in _one_error_line(proc)


def test_bad_habilitation_matrix_refused_before_start(tmp_path):
    bad = tmp_path / "matrix.csv"
    bad.write_text("profession_code,type_code,read\n10,11488-4,maybe\n")
    proc = _cli("serve", "--port", str(free_port()), data_dir=tmp_path / "data",
                FHIR_DMP_HABILITATIONS_FILE=str(bad))
    assert proc.returncode != 0
    assert _one_error_line(proc) == f"fhir-dmp: error: habilitation matrix {bad}: read must be yes or no on row 2"
    assert not (tmp_path / "data" / "db").exists()


def test_serve_unreachable_mongodb_uri(tmp_path):
    uri = f"mongodb://u:pw-secret@127.0.0.1:{free_port()}/?directConnection=true&serverSelectionTimeoutMS=500"
    proc = _cli("serve", "--port", str(free_port()), data_dir=tmp_path / "data",
                FHIR_DMP_MONGODB_URI=uri, FHIR_DMP_ISSUER="https://idp.example")
    assert proc.returncode != 0
    line = _one_error_line(proc)
    assert "cannot reach MongoDB" in line and "pw-secret" not in line


def test_dev_token_refused_outside_dev_mode(tmp_path):
    proc = _cli("dev-token", "admin", data_dir=tmp_path, FHIR_DMP_ISSUER="https://idp.example")
    assert proc.returncode != 0
    assert "only in dev mode" in _one_error_line(proc)


def test_dev_token_in_dev_mode(tmp_path):
    proc = _cli("dev-token", "ps", "--ps", "810000000001", "--profession", "10",
                "--purpose", "BTG", "--reason", "coma", "--port", "9123", data_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == "http://127.0.0.1:9123/fhir"
    assert claims["purpose_of_use"] == "BTG" or "purpose_of_use" in json.dumps(claims)
    bad = _cli("dev-token", "nobody", data_dir=tmp_path)
    assert bad.returncode != 0 and "unknown token kind" in _one_error_line(bad)


def test_load_missing_file(tmp_path):
    proc = _cli("load", str(tmp_path / "nope.ndjson"), data_dir=tmp_path / "data")
    assert proc.returncode != 0
    assert "no such file" in _one_error_line(proc)
    assert not (tmp_path / "data" / "db").exists()


def test_usage_error_exit_2(tmp_path):
    proc = _cli("serve", "--port", "99999", data_dir=tmp_path)
    assert proc.returncode == 2 and "port must be 1-65535" in proc.stderr


def test_check_port_free_and_default_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServeError, match=r"port \d+ is already in use"):
            check_port_free("127.0.0.1", s.getsockname()[1])
    check_port_free("127.0.0.1", free_port())
    assert 1 <= default_workers() <= 8


@pytest.mark.skipif(importlib.util.find_spec("fhir_dmp.audit.events") is None
                    or importlib.util.find_spec("fhir_dmp.security.crypto") is None,
                    reason="audit / crypto modules not written yet")
def test_audit_verify_and_keys_rotate_on_a_fresh_record(tmp_path):
    data = tmp_path / "data"
    proc = _cli("audit", "verify", data_dir=data)
    assert proc.returncode == 0, proc.stderr
    assert "intact" in proc.stdout
    proc = _cli("keys", "rotate", data_dir=data)
    assert proc.returncode == 0, proc.stderr
    assert "0 data key(s) rewrapped" in proc.stdout
    assert not (data / "db.pid").exists()  # the embedded database was stopped
