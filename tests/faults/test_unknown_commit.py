"""CONTRACT.md "Faults, failover and backups": a write whose commit outcome is unknown.

A connection lost at ``commitTransaction``, a write concern error there: the driver does not know
whether the transaction committed. pymongo's ``with_transaction`` retries the commit (an
``UnknownTransactionCommitResult``) within ``FHIR_DMP_DB_WAIT``; the answer matches what is stored:
a 2xx only once it is committed (with its AuditEvent, in the same transaction), a 503 when it is
still unknown at the bound, and then a client retrying a conditional create (``If-None-Exist``)
gets exactly one resource. Bundles (transaction) and ``$destroy`` are all or nothing under a
step-down. Real faults (``failCommand``, ``replSetStepDown``) on a SecantusDB of this module's own.
"""
from __future__ import annotations

import time
import uuid

import pytest

from tests import builders as b
from tests.api import Api
from tests.faults.database_kit import (DB_WAIT_S, assert_transient, faulty_app,  # noqa: F401 (fixtures)
                                       faulty_db, faulty_name, journal, successes)

STEP_DOWN_S = 6
WRITE_CONCERN_FAILED = {"code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out",
                        "errInfo": {"wtimeout": True}}


@pytest.fixture
def world(faulty_app, faulty_db, faulty_name, idp):
    """``(dr, fdb, db, pid)``: the médecin's caller on an app on the faulty server, a DMP."""
    api = Api(faulty_app(), idp)
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    return dr, faulty_db, faulty_db.admin[faulty_name], pid


def _tagged(pid: str) -> tuple[dict, str]:
    """A deposit with an identifier of its own, and the If-None-Exist that finds it."""
    value = f"urn:uuid:{uuid.uuid4()}"
    body = {**b.docref(pid, b.LAB), "identifier": [{"system": "urn:ietf:rfc:3986", "value": value}]}
    return body, f"identifier=urn:ietf:rfc:3986|{value}"


def _one_stored_with_its_event(dr, db, condition: str) -> str:
    """Exactly one DocumentReference matches ``condition``, and the journal has its creation."""
    found = dr.search(f"DocumentReference?{condition}")
    assert found["total"] == 1, found
    ref = f"DocumentReference/{found['entry'][0]['resource']['id']}"
    assert len(successes(journal(db), "C", ref)) == 1
    return ref


@pytest.mark.parametrize("fault", [
    {"closeConnection": True},
    {"writeConcernError": WRITE_CONCERN_FAILED},
    {"errorCode": 50, "errorLabels": ["UnknownTransactionCommitResult"]},   # MaxTimeMSExpired at commit
], ids=["connection-closed", "write-concern-error", "unknown-commit-result"])
def test_an_unknown_commit_once_is_retried_and_the_client_retry_makes_one_resource(world, fault):
    dr, fdb, db, pid = world
    body, condition = _tagged(pid)
    fdb.fail(["commitTransaction"], {"times": 1}, **fault)
    first = dr.post("DocumentReference", body, headers={"If-None-Exist": condition})
    fdb.off()
    again = dr.post("DocumentReference", body, headers={"If-None-Exist": condition})
    assert (first.status_code, again.status_code) in ((201, 200), (503, 201)), \
        (first.status_code, first.get_data(as_text=True)[:300], again.status_code)
    ref = _one_stored_with_its_event(dr, db, condition)
    if first.status_code == 201:
        assert f"DocumentReference/{first.json['id']}" == ref == f"DocumentReference/{again.json['id']}"


@pytest.mark.parametrize("fault", [{"closeConnection": True}, {"writeConcernError": WRITE_CONCERN_FAILED}],
                         ids=["connection-closed", "write-concern-error"])
def test_a_commit_unknown_past_the_wait_is_503_and_the_retry_finds_what_is_stored(world, fault):
    dr, fdb, db, pid = world
    body, condition = _tagged(pid)
    fdb.fail(["commitTransaction"], **fault)
    started = time.monotonic()
    first = dr.post("DocumentReference", body, headers={"If-None-Exist": condition})
    assert_transient(first, started, DB_WAIT_S)
    fdb.off()
    again = dr.post("DocumentReference", body, headers={"If-None-Exist": condition})
    # a write concern error comes after the commit (it is stored: found, 200); a connection
    # closed before it is not (created now, 201): either way one resource, with its event
    assert again.status_code == (200 if "writeConcernError" in fault else 201), again.get_data(as_text=True)[:300]
    _one_stored_with_its_event(dr, db, condition)


def _transaction_bundle(pid: str) -> dict:
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": b.docref(pid, code),
                "request": {"method": "POST", "url": "DocumentReference"}} for code in (b.CONSULTATION, b.LAB)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_bundle_and_destroy_are_all_or_nothing_under_a_step_down(world, faulty_name, idp):
    dr, fdb, db, pid = world
    before = fdb.counts(faulty_name)
    fdb.step_down(STEP_DOWN_S)
    started = time.monotonic()
    assert_transient(dr.post("", _transaction_bundle(pid)), started, DB_WAIT_S)
    assert fdb.counts(faulty_name) == before
    fdb.back(STEP_DOWN_S + 5)
    r = dr.post("", _transaction_bundle(pid))
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert all(e["response"]["status"].startswith("201") for e in r.json["entry"])

    stored = fdb.counts(faulty_name)
    fdb.step_down(STEP_DOWN_S)
    patient = dr.api.as_patient(pid)
    started = time.monotonic()
    assert_transient(patient.post(f"Patient/{pid}/$destroy"), started, DB_WAIT_S)
    assert fdb.counts(faulty_name) == stored      # nothing destroyed, nothing half-purged
    fdb.back(STEP_DOWN_S + 5)
    assert dr.get(f"Patient/{pid}").status_code == 200
