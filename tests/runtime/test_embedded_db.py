"""EmbeddedMongo and open_database against real SecantusDB processes (no mocks)."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
from pymongo import MongoClient

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.database import DatabaseError, open_database, redact_uri
from fhir_dmp.runtime.embedded_db import EmbeddedDbError, EmbeddedMongo, free_port, process_alive


def _gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_start_stop_and_data_persists(tmp_path):
    db = EmbeddedMongo(tmp_path)
    uri = db.start()
    assert uri == f"mongodb://127.0.0.1:{db.port}/?directConnection=true"
    pid = db.pid
    assert (tmp_path / "db.pid").read_text().split()[0] == str(pid)
    assert (tmp_path / "db").is_dir() and (tmp_path / "db.log").exists()
    with MongoClient(uri) as c:
        c.t.things.insert_one({"_id": 1, "v": "kept"})
    db.stop()
    assert db.pid is None and _gone(pid)
    assert not (tmp_path / "db.pid").exists()
    db.stop()  # idempotent

    with EmbeddedMongo(tmp_path) as again, MongoClient(again.uri) as c:
        assert c.t.things.find_one({"_id": 1})["v"] == "kept"


def test_kill_9_then_restart_recovers(tmp_path):
    first = EmbeddedMongo(tmp_path)
    first.start()
    with MongoClient(first.uri, w=1, journal=True) as c:
        c.t.things.insert_many([{"_id": i} for i in range(50)])
    os.kill(first.pid, signal.SIGKILL)
    assert _gone(first.pid)
    assert (tmp_path / "db.pid").exists()  # the stale pid file a crash leaves

    with EmbeddedMongo(tmp_path) as second, MongoClient(second.uri) as c:
        assert c.t.things.count_documents({}) == 50
        c.t.things.insert_one({"_id": "after"})
    first.stop()  # nothing left to stop: no error


def test_second_instance_on_live_dir_refused(tmp_path):
    with EmbeddedMongo(tmp_path) as live:
        with pytest.raises(EmbeddedDbError, match="another database server .* is using the data dir"):
            EmbeddedMongo(tmp_path).start()
        with MongoClient(live.uri) as c:  # the live one is unharmed
            assert c.admin.command("ping")["ok"] == 1


def test_stale_pid_file_naming_another_process_is_ignored(tmp_path):
    # a pid reused by an unrelated process (here: ourselves) is not a secantusd
    (tmp_path / "db.pid").write_text(f"{os.getpid()} 1\n")
    with EmbeddedMongo(tmp_path) as db:
        assert (tmp_path / "db.pid").read_text().split()[0] == str(db.pid)


def test_fixed_port_taken_fails_with_log_tail(tmp_path):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        db = EmbeddedMongo(tmp_path, port=port)
        with pytest.raises(EmbeddedDbError, match="port \d+ is already in use") as exc:
            db.start(timeout=15)
    assert "\n" not in str(exc.value)
    assert db.pid is None and not (tmp_path / "db.pid").exists()


def test_missing_executable(tmp_path, monkeypatch):
    # an environment where secantusd-py is neither beside the interpreter nor on PATH
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    with pytest.raises(EmbeddedDbError, match="secantusd-py not found"):
        EmbeddedMongo(tmp_path / "data").start()


def test_open_database_embedded_and_uri(tmp_path):
    with EmbeddedMongo(tmp_path) as emb:
        client, db = open_database(Config(data_dir=tmp_path, db_name="dmp_a"), embedded=emb)
        try:
            assert db.name == "dmp_a"
            assert client.write_concern.document == {"w": "majority", "j": True}
            db.t.insert_one({"x": 1})
            assert db.t.find_one()["_id"].generation_time.tzinfo is not None
        finally:
            client.close()
        client, db = open_database(Config(mongodb_uri=emb.uri, db_name="dmp_b"))
        with client:
            assert db.name == "dmp_b" and db.command("ping")["ok"] == 1


def test_open_database_unreachable_hides_password():
    uri = f"mongodb://alice:s3cr3t-pw@127.0.0.1:{free_port()}/?directConnection=true"
    with pytest.raises(DatabaseError) as exc:
        open_database(Config(mongodb_uri=uri), timeout=1)
    msg = str(exc.value)
    assert "s3cr3t-pw" not in msg and "alice:***@" in msg and "\n" not in msg
    with pytest.raises(DatabaseError, match="invalid MongoDB URI") as exc:
        open_database(Config(mongodb_uri="postgres://alice:s3cr3t-pw@h/"))
    assert "s3cr3t-pw" not in str(exc.value)
    with pytest.raises(DatabaseError, match="no MongoDB URI"):
        open_database(Config())
    assert redact_uri("mongodb+srv://u:p@h/db") == "mongodb+srv://u:***@h/db"


def test_connected_reuses_a_running_server_or_starts_one(tmp_path):
    from fhir_dmp.runtime.database import connected

    config = Config(data_dir=tmp_path)
    assert EmbeddedMongo.find_running(tmp_path) is None
    with EmbeddedMongo(tmp_path) as live:
        assert EmbeddedMongo.find_running(tmp_path) == live.uri
        with connected(config) as (used, client, db):  # e.g. `fhir-dmp load` beside `serve`
            assert used.mongodb_uri == live.uri
            db.t.insert_one({"_id": "x"})
        assert live.running
    with connected(config) as (used, client, db):  # nobody serving: starts its own
        assert db.t.find_one({"_id": "x"}) is not None
        pid = int((tmp_path / "db.pid").read_text().split()[0])
    assert _gone(pid) and not (tmp_path / "db.pid").exists()


def test_stop_in_a_forked_copy_leaves_the_server_running(tmp_path):
    # a forked server worker must not stop the database
    with EmbeddedMongo(tmp_path) as db:
        child = os.fork()
        if child == 0:
            db.stop()
            os._exit(0)
        os.waitpid(child, 0)
        with MongoClient(db.uri) as c:
            assert c.admin.command("ping")["ok"] == 1
