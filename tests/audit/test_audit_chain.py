"""The audit journal: BALP event shapes, durable append, hash chain, verifier.

Runs against a real SecantusDB started for this module (no mocks).
"""
from __future__ import annotations

import base64
import threading
import time
from datetime import datetime, timedelta, timezone

import pymongo
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from pymongo import monitoring

from fhir_dmp.runtime.embedded_db import free_port as _free_port
from fhir_dmp.audit.chain import chain_hash
from fhir_dmp.audit.events import AccessRecord, build_event
from fhir_dmp.audit.log import AuditLog
from fhir_dmp.audit.verify import verify_chains
from fhir_dmp.audit.sealer import LeaseLost, Sealer, load_signing_key
from tests.builders import delete_journal_entry, journal_entries, rewrite_journal_entry
from fhir_dmp.storage import Storage
from fhir_dmp.storage.core import (CHECKPOINTS, JOURNAL as COLLECTION, JOURNAL_HEADS as HEADS,
                                   JOURNAL_LINKS as LINKS)
from fhir_dmp.security.principal import (BTG, ETREAT, PATIENT, PS, REGULATION_CENTRE, Principal)
from fhir_dmp.security.scopes import Scopes


# --- a real database for this module ------------------------------------------------

@pytest.fixture
def server(mongo_server, mongo_client):
    """The session's SecantusDB (tests/conftest.py); ``db`` is conftest's database per test."""
    return mongo_server.uri, mongo_client


def st(db):
    """``db`` behind a Storage (what the journal takes)."""
    return Storage(db.client, db)


def chained(db, pid: str) -> list[dict]:
    """Chain ``pid``'s sealed events in order, each with its link as ``chain``."""
    return list(st(db).sealed_events(pid))


def link(db, pid: str, seq: int) -> dict:
    """Event ``seq`` of chain ``pid``, with its link as ``chain``."""
    [event] = [d for d in chained(db, pid) if d["chain"]["seq"] == seq]
    return event


def set_link_hash(db, pid: str, seq: int, hsh: str) -> None:
    """Overwrite the stored hash of link ``seq`` of chain ``pid`` (in its run of links)."""
    run = db[LINKS].find_one({"pid": pid, "first": {"$lte": seq}, "last": {"$gte": seq}})
    db[LINKS].update_one({"_id": run["_id"]}, {"$set": {f"links.{seq - run['first']}.1": hsh}})


def unsealed(db) -> int:
    """Events waiting for the sealer."""
    return st(db).count_unsealed_before(datetime.now(timezone.utc) + timedelta(days=1))


# --- principals -------------------------------------------------------------------

def ps(purpose="TREAT", reason=None, kind=PS, profession="10"):
    return Principal(kind=kind, subject="ps-sub", scopes=Scopes.parse("user/*.cruds"),
                     id_nat_ps="810001234567", professions=(profession,), acr="eidas1",
                     purpose=purpose, btg_reason=reason, client_id="lgc-app", name="Dr Marie Curie")


def patient(pid="p1"):
    return Principal(kind=PATIENT, subject="pat-sub", scopes=Scopes.parse("patient/*.rs"),
                     patient_id=pid, client_id="mes-app")


def record(**kw):
    base = dict(interaction="read", action="R", outcome="0", principal=ps(), patient_id="p1",
                resource="DocumentReference/d1/_history/1", query=None,
                decision={"result": "permit", "rule": "consent", "reason": "autorisé par le patient",
                          "consents": [["Consent/c1", "2"]]},
                http_status=200, client_ip="10.0.0.7", request_id="req-1")
    base.update(kw)
    return AccessRecord(**base)


def ev(**kw):
    return build_event(record(**kw), source_observer="fhir-dmp test")


# --- shapes -------------------------------------------------------------------------

def _validate(event: dict) -> AuditEvent:
    return AuditEvent.model_validate(event) if hasattr(AuditEvent, "model_validate") \
        else AuditEvent.parse_obj(event)


def test_ps_read_shape():
    e = ev()
    _validate(e)
    assert e["type"]["code"] == "rest" and e["subtype"][0]["code"] == "read"
    user, app = e["agent"]
    assert user["who"]["identifier"] == {"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "810001234567"}
    assert user["requestor"] is True and app["requestor"] is False
    assert {"system": "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante", "code": "10",
            "display": "Médecin"} in [c for r in user["role"] for c in r["coding"]]
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    assert user["policy"] == ["https://mos.esante.gouv.fr/NOS/TRE_R248#normal"]
    assert user["network"] == {"address": "10.0.0.7", "type": "2"}
    assert app["who"]["identifier"]["value"] == "lgc-app"
    roles = {(x["role"]["code"] if "role" in x else x["type"]["code"]): x for x in e["entity"]}
    assert roles["1"]["what"]["reference"] == "Patient/p1"
    assert roles["4"]["what"]["reference"] == "DocumentReference/d1/_history/1"
    details = {(d["type"], d["valueString"]) for d in roles["decision"]["detail"]}
    assert ("result", "permit") in details and ("consent", "Consent/c1/_history/2") in details
    assert e["outcomeDesc"] == "autorisé par le patient"


def test_patient_search_shape():
    e = ev(interaction="search-type", action="E", principal=patient(), resource=None,
           query="patient=Patient/p1&_count=10", decision={"result": "permit", "rule": "self"})
    _validate(e)
    user = e["agent"][0]
    assert user["who"] == {"reference": "Patient/p1"}
    assert "purposeOfUse" not in user
    q = [x for x in e["entity"] if x.get("role", {}).get("code") == "24"][0]
    assert base64.b64decode(q["query"]).decode() == "patient=Patient/p1&_count=10"


def test_break_glass_shape():
    e = ev(principal=ps(purpose=BTG, reason="patient inconscient aux urgences"))
    _validate(e)
    user = e["agent"][0]
    assert user["purposeOfUse"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG",
        "display": "break the glass"}
    assert user["policy"] == ["https://mos.esante.gouv.fr/NOS/TRE_R248#bris_de_glace"]
    decision = [x for x in e["entity"] if x.get("type", {}).get("code") == "decision"][0]
    assert {"type": "btg_reason", "valueString": "patient inconscient aux urgences"} in decision["detail"]


def test_centre_15_and_denied_and_error_shapes():
    e = ev(principal=ps(purpose=ETREAT, kind=REGULATION_CENTRE), outcome="4", http_status=404,
           decision={"result": "deny", "rule": "opt-out", "reason": "le patient a refusé le centre 15"})
    _validate(e)
    assert e["agent"][0]["policy"] == ["https://mos.esante.gouv.fr/NOS/TRE_R248#centre_15"]
    assert e["agent"][0]["purposeOfUse"][0]["coding"][0]["code"] == "ETREAT"
    assert e["outcome"] == "4"
    anon = ev(principal=None, outcome="8", http_status=500, decision=None, patient_id=None,
              resource=None, interaction="capabilities", action="R")
    _validate(anon)
    assert anon["agent"] == [{"type": anon["agent"][0]["type"], "requestor": True,
                              "who": {"display": "anonymous"},
                              "network": {"address": "10.0.0.7", "type": "2"}}]


def test_bad_codes_refused():
    with pytest.raises(ValueError):
        ev(interaction="peek")
    with pytest.raises(ValueError):
        ev(outcome="1")


# --- append, seal and verify ---------------------------------------------------------

@pytest.fixture
def sealer(server, db, tmp_path):
    """The journal sealer with its key in a file outside the database."""
    _, client = server
    s = Sealer(Storage(client, db), tmp_path / "audit-key.pem")
    yield s
    s.stop()


def sealed(sealer, *, signatures=True, **kw):
    """Seal everything, then verify (signatures checked with the sealer's key)."""
    sealer.seal_all()
    return verify_chains(sealer.storage, check_signatures=signatures, public_key=sealer.key.public_key(), **kw)


def test_append_and_verify_intact(db, sealer):
    log = AuditLog(st(db))
    log.append([ev(), ev(patient_id="p2"), ev(principal=None, patient_id=None, resource=None,
                                              interaction="capabilities", decision=None)])
    log.append([ev(), ev(outcome="4", decision={"result": "deny", "rule": "x", "reason": "refusé"})])
    assert unsealed(db) == 5 and chained(db, "p1") == []
    assert verify_chains(st(db)) == []          # young unsealed events are not a problem
    assert sealed(sealer) == []
    assert unsealed(db) == 0
    assert verify_chains(st(db), "p1") == []
    docs = chained(db, "p1")
    assert [d["chain"]["seq"] for d in docs] == [1, 2, 3]
    assert docs[0]["chain"]["prev"] == "0" * 64
    assert docs[1]["chain"]["prev"] == docs[0]["chain"]["hash"]
    for d in docs:
        assert d["vid"] == 1 and d["del"] is False and d["pid"] == "p1" and d["_id"] == d["res"]["id"]
        assert d["res"]["meta"]["versionId"] == "1" and isinstance(d["s"], dict)
        assert chain_hash(d["chain"]["prev"], d["res"]) == d["chain"]["hash"]
        _validate(d["res"])
    [system] = chained(db, "_system")
    assert system["pid"] is None and system["chain"]["seq"] == 1
    assert db[HEADS].find_one({"_id": "p1"})["seq"] == 3


def test_sealing_is_idempotent_and_appends_continue_the_chain(db, sealer):
    log = AuditLog(st(db))
    log.append([ev(), ev()])
    assert sealer.seal_all() == 2
    assert sealer.seal_all() == 0
    log.append([ev()])
    assert sealed(sealer) == []
    assert [d["chain"]["seq"] for d in chained(db, "p1")] == [1, 2, 3]
    assert db[CHECKPOINTS].count_documents({}) == 2


def test_events_left_unsealed_are_reported(db):
    AuditLog(st(db)).append([ev(), ev()])
    assert verify_chains(st(db), unsealed_bound_s=3600) == []
    assert verify_chains(st(db), unsealed_bound_s=0) == ["2 AuditEvent(s) left unsealed for more than 0 s"]


def test_one_sealer_at_a_time(server, db, tmp_path):
    _, client = server
    AuditLog(st(db)).append([ev()])
    first = Sealer(Storage(client, db), tmp_path / "k.pem")
    second = Sealer(Storage(client, db), tmp_path / "k.pem")
    assert first.acquire() and not second.acquire()
    with pytest.raises(LeaseLost):
        second.seal_all()
    with pytest.raises(LeaseLost):
        second.seal_once()            # the fencing write in the transaction refuses it too
    assert first.seal_all() == 1
    first.release()
    AuditLog(st(db)).append([ev()])
    assert second.seal_all() == 1
    assert verify_chains(st(db), check_signatures=True, public_key=first.key.public_key()) == []


def test_tampered_event_is_named(db, sealer):
    log = AuditLog(st(db))
    for _ in range(4):
        log.append([ev()])
    sealer.seal_all()
    target = link(db, "p1", 3)
    rewrite_journal_entry(db, target["_id"], outcome="4")
    problems = verify_chains(st(db))
    assert problems[0] == f"patient p1: event seq 3 (AuditEvent/{target['_id']}) hash mismatch"
    assert verify_chains(st(db), "p2") == []


def test_rehashed_event_breaks_next_link(db, sealer):
    log = AuditLog(st(db))
    for _ in range(3):
        log.append([ev()])
    sealer.seal_all()
    target = link(db, "p1", 2)
    res = dict(target["res"], outcome="8")
    rewrite_journal_entry(db, target["_id"], **res)
    set_link_hash(db, "p1", 2, chain_hash(target["chain"]["prev"], res))
    problems = verify_chains(st(db))
    # a link's prev is the stored hash before it: event 3 no longer hashes to its link
    assert problems and problems[0].startswith("patient p1: event seq 3 (") and "hash mismatch" in problems[0]


def test_rebuilt_chain_is_caught_by_the_signed_checkpoints(db, sealer):
    """Someone with write access to the database rewrites an event and recomputes every later
    hash and the head: the unkeyed chain looks intact, the signed checkpoint does not."""
    log = AuditLog(st(db))
    for _ in range(3):
        log.append([ev()])
    sealer.seal_all()
    prev = "0" * 64
    for doc in chained(db, "p1"):
        res = dict(doc["res"], outcome="8") if doc["chain"]["seq"] == 2 else doc["res"]
        hsh = chain_hash(prev, res)
        rewrite_journal_entry(db, doc["_id"], **res)
        set_link_hash(db, "p1", doc["chain"]["seq"], hsh)
        prev = hsh
    db[HEADS].update_one({"_id": "p1"}, {"$set": {"hash": prev}})
    assert verify_chains(st(db)) == []
    problems = verify_chains(st(db), check_signatures=True, public_key=sealer.key.public_key())
    assert any("does not match the signed checkpoint (the chain was rebuilt)" in p for p in problems)


def test_deleted_checkpoints_and_foreign_keys_are_caught(db, sealer, tmp_path):
    log = AuditLog(st(db))
    log.append([ev()])
    sealer.seal_all()
    log.append([ev()])
    sealer.seal_all()
    key = sealer.key.public_key()
    db[CHECKPOINTS].delete_one({"_id": 2})
    assert verify_chains(st(db), check_signatures=True, public_key=key) == [
        "patient p1: seq 2-2 not covered by a signed checkpoint"]
    other = load_signing_key(tmp_path / "other.pem", create=True).public_key()
    assert verify_chains(st(db), check_signatures=True, public_key=other)[0] == \
        "checkpoint 1: signature does not verify with the audit key"
    assert verify_chains(st(db), check_signatures=True, public_key=None)[0].startswith(
        "signed checkpoints exist but no audit signing key")


def test_deleted_event_is_missing(db, sealer):
    log = AuditLog(st(db))
    for _ in range(5):
        log.append([ev()])
    sealer.seal_all()
    delete_journal_entry(db, link(db, "p1", 2)["_id"])
    assert verify_chains(st(db))[0] == "patient p1: missing seq 2"


def test_truncated_tail_is_detected(db, sealer):
    log = AuditLog(st(db))
    for _ in range(3):
        log.append([ev()])
    sealer.seal_all()
    delete_journal_entry(db, link(db, "p1", 3)["_id"])
    problems = verify_chains(st(db))
    assert problems and problems[0].startswith("patient p1: head points past last event")


def test_concurrent_appends_while_sealing_do_not_fork(db, sealer):
    """Threads with their own AuditLog (as separate server workers) and one shared, while the
    background sealer runs: every event sealed once, chains contiguous, checkpoints verify."""
    shared = AuditLog(st(db))
    logs = [AuditLog(st(db)) for _ in range(4)] + [shared] * 4
    errors = []
    barrier = threading.Barrier(len(logs))
    sealer.interval = 0.01
    sealer.start()

    def work(log):
        try:
            barrier.wait()
            for i in range(10):
                log.append([ev(request_id=f"r{i}")] if i % 3 else [ev(), ev(patient_id="p2")])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sealer.stop()
    assert errors == []
    assert sealed(sealer) == []
    seqs = [d["chain"]["seq"] for d in chained(db, "p1")]
    assert seqs == list(range(1, len(logs) * 10 + 1))
    assert len(chained(db, "p2")) == len(logs) * 4


def test_append_in_caller_transaction(server, db, sealer):
    _, client = server
    log = AuditLog(st(db))
    log.append([ev()])
    with client.start_session() as s:
        s.with_transaction(lambda sess: log.append([ev(), ev()], session=sess))
    log.append([ev()])
    assert sealed(sealer) == []
    assert len(chained(db, "p1")) == 4


def test_concurrent_transactions_do_not_conflict(server, db, sealer):
    """Appends inside callers' transactions touch no chain head: they never conflict."""
    _, client = server
    errors = []

    def work():
        log = AuditLog(st(db))
        try:
            for _ in range(5):
                with client.start_session() as s:
                    s.with_transaction(lambda sess: log.append([ev()], session=sess))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sealed(sealer) == []
    assert len(chained(db, "p1")) == 20


class _Count(monitoring.CommandListener):
    def __init__(self):
        self.names = []

    def started(self, event):
        self.names.append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def test_concurrent_appends_are_group_committed(server, db):
    """One durable insert (a page of events), no transaction, for many requests' events: fewer
    inserts than appends under load, and a lone append is one insert."""
    uri, _ = server
    counter = _Count()
    client = pymongo.MongoClient(uri, event_listeners=[counter], w="majority", journal=True)
    try:
        log = AuditLog(st(client[db.name]))
        log.append([ev()])  # cold: indexes
        counter.names.clear()
        log.append([ev(), ev(request_id="r2")])
        assert [n for n in counter.names if n not in ("hello", "isMaster", "ismaster")] == ["insert"]
        counter.names.clear()
        barrier = threading.Barrier(16)

        def work():
            barrier.wait()
            for _ in range(10):
                log.append([ev()])
        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        inserts = counter.names.count("insert")
        assert 1 <= inserts < 160 and "commitTransaction" not in counter.names
    finally:
        client.close()
    assert db[COLLECTION].count_documents({}) == 0 and len(journal_entries(db)) == 163


def test_unwritable_journal_raises(server):
    from fhir_dmp.audit.log import AuditUnavailable
    port = _free_port()  # nothing listens there
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                 serverSelectionTimeoutMS=200)
    try:
        with pytest.raises(AuditUnavailable) as info:
            AuditLog(st(client["x"])).append([ev()])
        assert info.value.status == 503
    finally:
        client.close()


def test_pages_emptied_by_a_destroy_are_dropped_and_the_rest_sealed(db, sealer):
    """A destroy pulls the DMP's events out of the unsealed pages (other DMPs' stay there)."""
    log = AuditLog(st(db))
    log.append([ev(), ev()])                      # p1 alone: emptied by the destroy
    log.append([ev(patient_id="p2"), ev(patient_id="p2"), ev()])   # p2's stay queued
    with db.client.start_session() as s:
        s.with_transaction(lambda sess: st(db).purge_dmp("p1", session=sess))
    assert db["AuditEvent_page"].count_documents({}) == 1      # the emptied page went with it
    sealer.batch = 1          # (an emptied page left first stopped seal_all early)
    assert sealer.seal_all() == 2
    assert unsealed(db) == 0 and db["AuditEvent_page"].count_documents({}) == 0
    assert [e["chain"]["seq"] for e in chained(db, "p2")] == [1, 2] and chained(db, "p1") == []
    assert verify_chains(st(db), check_signatures=True, public_key=sealer.key.public_key()) == []


def test_a_sealing_transaction_left_open_does_not_hang_the_other_sealers(server, db, tmp_path):
    """A sealer killed inside its sealing transaction leaves the lease document locked until
    SecantusDB aborts that transaction (60 s idle): the other sealers' lease attempts give up
    after a bounded wait and try again later, instead of waiting on the lock for good."""
    uri, client = server
    AuditLog(st(db)).append([ev()])
    dying = pymongo.MongoClient(uri)
    first = Sealer(Storage(dying, dying[db.name]), tmp_path / "k.pem", lease_s=0.5)
    assert first.acquire()
    session = dying.start_session()
    session.start_transaction()
    now = datetime.now(timezone.utc)
    assert first.storage.renew_sealer_lease(first.owner, now, now + timedelta(seconds=0.5), session=session)
    dying.close()                                   # killed: never commits, never aborts
    try:
        time.sleep(0.6)                             # its lease has expired
        second = Sealer(Storage(client, db), tmp_path / "k.pem")
        started = time.monotonic()
        assert second.acquire() is False            # the document is still locked
        assert time.monotonic() - started < 10
    finally:
        # abort the dead transaction: left open, it blocks dropping this database (the db
        # fixture) until SecantusDB reaps it, which needs 60 s idle AND another transaction
        # command: the suite hung in that teardown
        client.admin.command("killSessions", [session.session_id])
