"""CONTRACT.md "Faults, failover and backups": a database that steps down or fails a command.

The driver retries what it can; past ``FHIR_DMP_DB_WAIT`` (2 s here) a request answers 503
OperationOutcome ``transient`` with ``Retry-After``, never a 500, never a 2xx whose AuditEvent is
not durable, never a half-written resource; when the database is back it serves again within 2 s.

These tests need fault injection (``replSetStepDown``, ``configureFailPoint``), which SecantusDB
takes only with ``--enable-test-commands``: they start their own server (the session's one is
shared by every test and stays without test commands).
"""
from __future__ import annotations

import time

import pytest

from fhir_dmp.runtime.config import Config
from tests import builders as b
from tests.api import Api
from tests.faults.database_kit import (DB_WAIT_S as WAIT_S, assert_transient, faulty_app,  # noqa: F401 (fixtures)
                                       faulty_db, faulty_name)

STEP_DOWN_S = 8


@pytest.fixture
def faulty(faulty_app, faulty_db, faulty_name, idp):
    """``(api, faulty_db, db_name)``: the app on the faulty server, ``FHIR_DMP_DB_WAIT=2``."""
    return Api(faulty_app(), idp), faulty_db, faulty_name


def _assert_transient(r, started: float) -> None:
    assert_transient(r, started, WAIT_S)


def test_step_down_answers_503_transient_within_the_wait_and_serves_again(faulty):
    api, fdb, name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    doc = dr.create(b.docref(pid, b.CONSULTATION))
    before = fdb.counts(name)

    stepped_down = fdb.step_down(STEP_DOWN_S)
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
    assert fdb.counts(name) == before

    back = fdb.back(STEP_DOWN_S + 5)
    while True:
        r = dr.post("DocumentReference", b.docref(pid, b.LAB))
        if r.status_code == 201:
            break
        assert r.status_code == 503, (r.status_code, r.get_data(as_text=True)[:300])
        assert time.monotonic() - back < 2, "not serving again 2 s after the step-down's end"
        time.sleep(0.1)
    assert dr.get(f"DocumentReference/{doc['id']}").status_code == 200


def test_a_dropped_connection_is_retried_by_the_driver(faulty):
    api, fdb, _name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    fdb.fail(["insert", "bulkWrite", "find"], {"times": 1}, closeConnection=True)
    r = dr.post("DocumentReference", b.docref(pid, b.CONSULTATION))
    assert r.status_code == 201, r.get_data(as_text=True)[:300]


def test_a_failing_command_past_the_wait_is_503_not_500(faulty):
    api, fdb, name = faulty
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    before = fdb.counts(name)
    # every write fails as a primary going away would (retryable, transient in a transaction)
    fdb.fail(["insert", "bulkWrite", "update", "commitTransaction"], errorCode=11602)
    started = time.monotonic()
    _assert_transient(dr.post("DocumentReference", b.docref(pid, b.LAB)), started)
    fdb.off()
    assert fdb.counts(name) == before


def test_db_wait_is_read_from_the_environment():
    from fhir_dmp.runtime.config import ConfigError
    assert Config.from_env({}).db_wait == 10
    assert Config.from_env({"FHIR_DMP_DB_WAIT": "3"}).db_wait == 3
    with pytest.raises(ConfigError):
        Config.from_env({"FHIR_DMP_DB_WAIT": "0"})
