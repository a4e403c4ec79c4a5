"""CONTRACT.md "Faults, failover and backups": a database that steps down or fails a command.

The driver retries what it can; past ``FHIR_DMP_DB_WAIT`` (2 s here) a request answers 503
OperationOutcome ``transient`` with ``Retry-After``, never a 500, never a 2xx whose AuditEvent is
not durable, never a half-written resource; when the database is back it serves again within 2 s.

These tests need fault injection (``replSetStepDown``, ``configureFailPoint``), which SecantusDB
takes only with ``--enable-test-commands``: they start their own server (the session's one is
shared by every test and stays without test commands).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pymongo
import pytest

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.embedded_db import EXECUTABLE
from tests import builders as b
from tests.api import Api
from tests.conftest import BASE

WAIT_S = 2
STEP_DOWN_S = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def faulty_uri(tmp_path_factory):
    """A SecantusDB of this module's own, with the test commands on."""
    exe = shutil.which(EXECUTABLE)
    if exe is None:
        pytest.skip(f"{EXECUTABLE} is not installed")
    home, port = tmp_path_factory.mktemp("faulty"), _free_port()
    with open(home / "db.log", "ab") as log:
        proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--storage-path",
                                 str(home / "db"), "--sync-on-commit", "--enable-test-commands"],
                                cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    probe = pymongo.MongoClient(uri, serverSelectionTimeoutMS=250)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "db.log").read_text()[-2000:]) from None
                time.sleep(0.1)
    finally:
        probe.close()
    yield uri
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def faulty(faulty_uri, tmp_path, idp):
    """``(api, admin_client, db_name)``: the app on the faulty server, ``FHIR_DMP_DB_WAIT=2``,
    opened the way production opens it (``open_database``); stopped before the database is dropped."""
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    name = f"t_{uuid.uuid4().hex[:12]}"
    config = Config(mongodb_uri=faulty_uri, db_name=name, data_dir=tmp_path, base_url=BASE,
                    notifications_worker=False, audit_sealer=False, db_wait=WAIT_S, **idp.config_kwargs())
    admin = pymongo.MongoClient(faulty_uri, tz_aware=True)
    app = create_app(config)
    try:
        yield Api(app, idp), admin, name
    finally:
        _wait_writable(admin, STEP_DOWN_S + 5)
        admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        stop_background(app)
        admin.drop_database(name)
        admin.close()


def _wait_writable(admin, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not admin.admin.command("hello").get("isWritablePrimary"):
        assert time.monotonic() < deadline, "the faulty server stayed stepped down"
        time.sleep(0.1)


def _assert_transient(r, started: float) -> None:
    elapsed = time.monotonic() - started
    assert r.status_code == 503, (r.status_code, r.get_data(as_text=True)[:300])
    body = r.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "transient"
    assert int(r.headers["Retry-After"]) > 0
    assert elapsed < WAIT_S + 2.5, f"answered after {elapsed:.1f}s, FHIR_DMP_DB_WAIT is {WAIT_S}s"


def _counts(admin, name) -> dict:
    db = admin[name]
    return {c: db[c].count_documents({}) for c in sorted(db.list_collection_names())}


def test_step_down_answers_503_transient_within_the_wait_and_serves_again(faulty):
    api, admin, name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    doc = dr.create(b.docref(pid, b.CONSULTATION))
    before = _counts(admin, name)

    admin.admin.command({"replSetStepDown": STEP_DOWN_S, "force": True})
    stepped_down = time.monotonic()
    # SecantusDB, stepped down, still takes a client bulkWrite (a transaction's inserts, in one
    # round trip) and its commit, where MongoDB refuses them: make it refuse them as MongoDB would
    admin.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                         "data": {"failCommands": ["bulkWrite"], "errorCode": 10107,
                                  "errorLabels": ["TransientTransactionError"]}})
    # a deposit: its transaction is retried by the driver, then bounded by FHIR_DMP_DB_WAIT
    started = time.monotonic()
    _assert_transient(dr.post("DocumentReference", b.docref(pid, b.LAB)), started)
    # a new DMP
    started = time.monotonic()
    _assert_transient(dr.post("Patient", b.patient(email=None)), started)
    # a read whose AuditEvent cannot be written: withheld, not a 200
    started = time.monotonic()
    _assert_transient(dr.get(f"DocumentReference/{doc['id']}"), started)
    assert time.monotonic() - stepped_down < STEP_DOWN_S, "the step-down ended before the checks"
    # nothing half-written: every collection (resources, blobs, journal) as it was
    assert _counts(admin, name) == before

    _wait_writable(admin, STEP_DOWN_S + 5)
    admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    back = time.monotonic()
    while True:
        r = dr.post("DocumentReference", b.docref(pid, b.LAB))
        if r.status_code == 201:
            break
        assert r.status_code == 503, (r.status_code, r.get_data(as_text=True)[:300])
        assert time.monotonic() - back < 2, "not serving again 2 s after the step-down's end"
        time.sleep(0.1)
    assert dr.get(f"DocumentReference/{doc['id']}").status_code == 200


def test_a_dropped_connection_is_retried_by_the_driver(faulty):
    api, admin, _name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    admin.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                         "data": {"failCommands": ["insert", "bulkWrite", "find"], "closeConnection": True}})
    r = dr.post("DocumentReference", b.docref(pid, b.CONSULTATION))
    assert r.status_code == 201, r.get_data(as_text=True)[:300]


def test_a_failing_command_past_the_wait_is_503_not_500(faulty):
    api, admin, name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    before = _counts(admin, name)
    # every write fails as a primary going away would (retryable, transient in a transaction)
    admin.admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                         "data": {"failCommands": ["insert", "bulkWrite", "update", "commitTransaction"],
                                  "errorCode": 11602}})
    started = time.monotonic()
    _assert_transient(dr.post("DocumentReference", b.docref(pid, b.LAB)), started)
    admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert _counts(admin, name) == before


def test_db_wait_is_read_from_the_environment():
    from fhir_dmp.runtime.config import ConfigError
    assert Config.from_env({}).db_wait == 10
    assert Config.from_env({"FHIR_DMP_DB_WAIT": "3"}).db_wait == 3
    with pytest.raises(ConfigError):
        Config.from_env({"FHIR_DMP_DB_WAIT": "0"})
