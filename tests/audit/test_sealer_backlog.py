"""The sealer's backlog (issue 22): the group committers' backpressure while the oldest unsealed page
is too old, and the previous version's ``AuditEvent_queue`` sealed first after an upgrade.

Real SecantusDB; the sealer is run by hand. No timing is asserted: the committer is told to read
the age before every batch (``check_s=0``) and reports whether it throttles.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from fhir_dmp.audit.log import (THROTTLE_FROM_S, THROTTLE_MAX_S, THROTTLE_TARGET_S, AuditLog, GroupCommitter,
                                throttle_pause)
from fhir_dmp.audit.sealer import Sealer
from fhir_dmp.audit.verify import verify_chains
from fhir_dmp.storage import Storage
from fhir_dmp.storage.core import pack
from fhir_dmp.storage.pages import entries
from tests import builders as b
from tests.audit.test_journal_pages import PAGES, event

QUEUE = "AuditEvent_queue"


def ago(seconds: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


# --- backpressure ---------------------------------------------------------------------------

@pytest.mark.parametrize("age,pause", [
    (0.0, 0.0), (THROTTLE_FROM_S, 0.0), (THROTTLE_FROM_S + 1, 0.05), (THROTTLE_FROM_S + 3, 0.15),
    (THROTTLE_TARGET_S, THROTTLE_MAX_S), (3600.0, THROTTLE_MAX_S),
])
def test_throttle_pause_grows_before_the_target_and_is_capped_there(age, pause):
    assert throttle_pause(age) == pytest.approx(pause)


def test_throttle_pause_never_decreases_with_age():
    pauses = [throttle_pause(a / 10) for a in range(0, 600)]
    assert pauses == sorted(pauses) and pauses[0] == 0.0 and max(pauses) == THROTTLE_MAX_S


def test_the_target_is_well_within_the_seal_bound_that_verify_checks():
    import inspect
    bound = inspect.signature(verify_chains).parameters["unsealed_bound_s"].default
    assert THROTTLE_FROM_S < THROTTLE_TARGET_S <= bound / 4


def test_a_committer_throttles_while_an_old_page_waits_and_stops_once_it_is_sealed(db, tmp_path, caplog):
    storage = Storage(db.client, db)
    log = AuditLog(storage)
    log.append([event("p1")])
    db[PAGES].update_many({}, {"$set": {"t": ago(THROTTLE_TARGET_S + 20)}})   # the sealer is behind
    assert storage.oldest_page_age() > THROTTLE_TARGET_S
    # no sealer runs (none holds the lease): nothing would catch up, the requests are not slowed
    assert storage.sealing_lag() == 0.0
    committer = GroupCommitter(storage.journal_insert, age=storage.sealing_lag, check_s=0)
    sealer = Sealer(storage, tmp_path / "k.pem")
    try:
        committer.submit(log._prepare([event("p1")])).result(timeout=30)
        assert not committer.throttling and committer.throttled == 0
        assert sealer.acquire()                      # a sealer runs, and is behind
        assert storage.sealing_lag() > THROTTLE_TARGET_S
        docs = log._prepare([event("p1")])
        committer.submit(docs).result(timeout=30)
        assert committer.throttling and committer.throttled == 1
        assert db[PAGES].count_documents({"events._id": docs[0]["_id"]}) == 1   # written all the same
        assert sealer.seal_all() == 3
        committer.submit(log._prepare([event("p1")])).result(timeout=30)
        assert not committer.throttling and committer.throttled == 1
    finally:
        sealer.release()
        committer.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "fhir_dmp.audit.log"]
    assert len([m for m in said if "throttled" in m]) == 2, said          # once on, once off
    assert all("p1" not in m for m in said)                               # no content in the logs


def test_the_journal_of_a_process_reads_the_age_of_its_own_database(db):
    storage = Storage(db.client, db)
    assert storage.oldest_page_age() == 0.0
    log = AuditLog(storage)
    log.append([event("p1")])
    try:
        assert log._committer.age == storage.sealing_lag
        assert 0.0 <= storage.oldest_page_age() < THROTTLE_FROM_S and not log._committer.throttling
    finally:
        log.close()


# --- the previous version's queue -------------------------------------------------------------

def old_append(db, log: AuditLog, pids: list[str | None], t: datetime) -> list[str]:
    """Events appended as the previous version did (``journal_insert`` at 1ad8a20): the entries in
    ``AuditEvent`` with their search index, and one queue document ``{_id, t, items: [{e, p, d}]}``."""
    prepared = log._prepare([event(pid) for pid in pids])
    db["AuditEvent"].insert_many(entries({"events": [{**e, "res": pack(e["res"])} for e in prepared]}))
    db[QUEUE].insert_one({"_id": uuid.uuid4().hex, "t": t,
                          "items": [{"e": e["_id"], "p": e["pid"], "d": e["d"]} for e in prepared]})
    return [e["_id"] for e in prepared]


def test_old_queue_is_sealed_first_in_append_order_and_verify_is_clean(db, tmp_path):
    storage = Storage(db.client, db)
    log = AuditLog(storage)
    first = old_append(db, log, ["p1", None], ago(120))
    second = old_append(db, log, ["p1"], ago(90))
    # waiting: unsealed (past the bound), not "without a chain position"
    assert verify_chains(storage, unsealed_bound_s=60) == ["3 AuditEvent(s) left unsealed for more than 60 s"]
    assert verify_chains(storage, "p1", unsealed_bound_s=300) == []
    log.append([event("p1")])
    newer = db[PAGES].find_one()["events"][0]["_id"]
    db[PAGES].update_many({}, {"$set": {"t": ago(600)}})   # even an older page waits for the old queue
    sealer = Sealer(storage, tmp_path / "k.pem")
    try:
        assert sealer.seal_all() == 4
    finally:
        sealer.release()
    assert db[QUEUE].count_documents({}) == 0 and db[PAGES].count_documents({}) == 0
    assert not sealer._old_queue                           # looked once more, found nothing: no more looks
    assert verify_chains(storage, unsealed_bound_s=60, check_signatures=True,
                         public_key=sealer.key.public_key()) == []
    chain = [(d["_id"], d["chain"]["seq"]) for d in storage.sealed_events("p1")]
    assert chain == [(first[0], 1), (second[0], 2), (newer, 3)]
    assert [d["_id"] for d in storage.sealed_events("_system")] == [first[1]]


def test_destroy_removes_the_dmps_items_from_old_queue_documents(api, dmp, db):
    pid = dmp["pid"]
    log = AuditLog(Storage(db.client, db))
    mine = old_append(db, log, [pid], ago(5))
    mixed = old_append(db, log, [pid, "someone-else"], ago(4))
    assert api.as_admin().post(f"Patient/{pid}/$destroy").status_code == 204
    assert db[QUEUE].count_documents({"items.p": pid}) == 0
    assert db[QUEUE].count_documents({"items.e": mine[0]}) == 0        # emptied: deleted
    left = db[QUEUE].find_one({"items.e": mixed[1]})
    assert [i["e"] for i in left["items"]] == [mixed[1]]
    assert b.journal_entries(db, {"pid": pid}) == []
