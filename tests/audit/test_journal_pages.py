"""The journal as a log (issue 22): one page per group commit, entries derived by the sealer,
every read of the journal seeing through the pages not sealed yet (``fhir_dmp/storage/pages.py``).

Real SecantusDB, real app and tokens; the sealer is run by hand (the test app has none), so an
event stays in its page until the test seals it.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pymongo
import pytest
from pymongo import monitoring

from fhir_dmp.audit.events import AccessRecord, build_event
from fhir_dmp.audit.log import AuditLog, GroupCommitter
from fhir_dmp.audit.verify import verify_chains
from fhir_dmp.security.principal import PS, Principal
from fhir_dmp.security.scopes import Scopes
from fhir_dmp.storage import Storage
from tests import builders as b

PAGES = "AuditEvent_page"
LINKS = "AuditEvent_link"
BASE = "https://dmp.test/fhir/"


def event(pid: str = "p1", request_id: str = "req-1") -> dict:
    principal = Principal(kind=PS, subject="ps-sub", scopes=Scopes.parse("user/*.cruds"),
                          id_nat_ps="810001234567", professions=("10",), acr="eidas1")
    return build_event(AccessRecord(interaction="read", action="R", outcome="0", principal=principal,
                                    patient_id=pid, resource="DocumentReference/d1/_history/1", query=None,
                                    decision={"result": "permit", "rule": "consent"}, http_status=200,
                                    client_ip="10.0.0.7", request_id=request_id),
                       source_observer="fhir-dmp test")


class _Commands(monitoring.CommandListener):
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def started(self, ev):
        self.seen.append((ev.command_name, str(ev.command.get(ev.command_name))))

    def succeeded(self, ev):
        pass

    def failed(self, ev):
        pass


def test_one_group_commit_of_concurrent_appends_is_one_page_and_no_transaction(mongo_server, db):
    """K requests queued while the previous write is in flight go in ONE insert of ONE page,
    with no transaction."""
    commands = _Commands()
    client = pymongo.MongoClient(mongo_server.uri, event_listeners=[commands])
    try:
        storage = Storage(client, client[db.name])
        log = AuditLog(storage)
        log.ensure_indexes()
        gate, writing = threading.Event(), threading.Event()

        def gated(events):     # the first write stays in flight until the K others are queued
            writing.set()
            gate.wait(10)
            storage.journal_insert(events)
        log._committer = committer = GroupCommitter(gated)
        first = threading.Thread(target=log.append, args=([event()],))
        first.start()
        k = 12
        others = [threading.Thread(target=log.append, args=([event(request_id=f"r{i}")],)) for i in range(k)]
        deadline = time.monotonic() + 10
        assert writing.wait(10)        # the first is taken, alone, and in flight (not merely queued)
        commands.seen.clear()
        for t in others:
            t.start()
        while committer._queue.qsize() < k and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in [first, *others]:
            t.join(10)
        log.close()
    finally:
        client.close()
    pages = sorted((len(p["events"]) for p in db[PAGES].find()))
    assert pages == [1, k]
    names = [name for name, _ in commands.seen if name not in ("hello", "isMaster", "ismaster", "endSessions")]
    assert names == ["insert", "insert"] and all(coll == PAGES for _, coll in commands.seen if _ == "insert")
    assert db["AuditEvent"].count_documents({}) == 0


def test_a_writes_events_are_in_its_transaction(db):
    """A write's events are one page in the write's transaction: aborted, no page; committed,
    the page and the data together."""
    storage = Storage(db.client, db)
    log = AuditLog(storage)
    log.ensure_indexes()

    class Abort(Exception):
        pass

    def aborted(session):
        storage.create("Communication", {"resourceType": "Communication", "status": "completed"}, pid="p1",
                       session=session)
        log.append([event(), event()], session=session)
        raise Abort()
    with pytest.raises(Abort):
        storage.run_transaction(aborted)
    assert db[PAGES].count_documents({}) == 0 and db["Communication"].count_documents({}) == 0

    def committed(session):
        storage.create("Communication", {"resourceType": "Communication", "status": "completed"}, pid="p1",
                       session=session)
        log.append([event(), event()], session=session)
    storage.run_transaction(committed)
    assert [len(p["events"]) for p in db[PAGES].find()] == [2] and db["Communication"].count_documents({}) == 1


def _event_ids(db, request_id: str) -> list[str]:
    return [e["_id"] for e in b.journal_entries(db)
            if any(((ent.get("what") or {}).get("identifier") or {}).get("value") == request_id
                   for ent in e["res"].get("entity") or [])]


def _all(caller, query: str) -> tuple[list[dict], int | None]:
    """Every entry of a search, following ``next`` links; the first page's total."""
    out, path, total = [], query, None
    while path:
        bundle = caller.search(path)
        total = bundle.get("total") if total is None else total
        out += [e["resource"] for e in bundle.get("entry", [])]
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        path = nxt[0][len(BASE):] if nxt else None
    return out, total


def test_a_read_is_found_by_the_journal_reads_before_and_after_sealing(api, dmp, db, config):
    """Right after the answer (its entry still in a page) the read is in the patient's journal
    search, its total and ``AuditEvent/{id}``; after sealing, the same, once."""
    pid = dmp["pid"]
    assert api.as_ps(b.PS_DR).get(f"Patient/{pid}", headers={"X-Request-Id": "pages-read-1"}).status_code == 200
    [eid] = _event_ids(db, "pages-read-1")
    assert db["AuditEvent"].find_one({"_id": eid}) is None and db[PAGES].find_one({"events._id": eid})
    me = api.as_patient(pid)
    for sealed in (False, True):
        if sealed:
            assert b.seal_journal(db, config.audit_key_path) > 0
            assert db[PAGES].count_documents({}) == 0 and db["AuditEvent_run_meta"].find_one({"ids": eid})
        found, total = _all(me, f"AuditEvent?patient=Patient/{pid}&_total=accurate&_count=500")
        ids = [e["id"] for e in found]
        assert eid in ids and len(ids) == len(set(ids)) == total
        counted = me.search(f"AuditEvent?patient=Patient/{pid}&_summary=count")
        assert counted["total"] >= total
        r = me.get(f"AuditEvent/{eid}")
        assert r.status_code == 200 and r.json["id"] == eid
        assert me.get(f"AuditEvent/{eid}/_history/1").status_code == 200
        by_agent = me.search(f"AuditEvent?patient=Patient/{pid}&agent:identifier={b.IDNATPS}|{b.PS_DR}&_count=500")
        assert eid in [e["resource"]["id"] for e in by_agent.get("entry", [])]


def test_keyset_paging_runs_across_sealed_and_unsealed_entries(api, dmp, db, config):
    """Pages of 3, newest first, over a journal half sealed, half in pages (and growing while
    it is paged: each page read is journaled): every entry once, in order."""
    pid = dmp["pid"]
    dr = api.as_ps(b.PS_DR)
    for i in range(5):
        assert dr.get(f"Patient/{pid}").status_code == 200
    b.seal_journal(db, config.audit_key_path)
    for i in range(5):
        assert dr.get(f"Patient/{pid}").status_code == 200
    before = {e["_id"] for e in b.journal_entries(db, {"pid": pid})}
    assert db[PAGES].count_documents({}) > 0 and db[LINKS].count_documents({"pid": pid, "e": {"$exists": True}}) > 0
    found, _ = _all(api.as_patient(pid), f"AuditEvent?patient=Patient/{pid}&_count=3")
    ids = [e["id"] for e in found]
    assert len(ids) == len(set(ids)) and before <= set(ids)
    order = [(e["meta"]["lastUpdated"], e["id"]) for e in found]
    assert all(a[0] > c[0] or (a[0] == c[0] and a[1] < c[1]) for a, c in zip(order, order[1:])), order


def test_verify_reports_an_old_page_and_a_deleted_entry(db, tmp_path):
    from fhir_dmp.audit.sealer import Sealer
    storage = Storage(db.client, db)
    log = AuditLog(storage)
    log.append([event("p1"), event("p1")])
    assert verify_chains(storage, unsealed_bound_s=60) == []          # young pages are fine
    db[PAGES].update_many({}, {"$set": {"t": datetime.now(timezone.utc) - timedelta(minutes=5)}})
    assert verify_chains(storage, unsealed_bound_s=60) == ["2 AuditEvent(s) left unsealed for more than 60 s"]
    sealer = Sealer(storage, tmp_path / "k.pem")
    try:
        assert sealer.seal_all() == 2
    finally:
        sealer.release()
    assert verify_chains(storage, unsealed_bound_s=60, check_signatures=True,
                         public_key=sealer.key.public_key()) == []
    b.delete_journal_entry(db, sorted(b.journal_entries(db), key=lambda d: (d["lu"], d["_id"]))[-1]["_id"])
    problems = verify_chains(storage, unsealed_bound_s=60)
    assert problems and all("patient p1" in p for p in problems), problems
    # an entry with no link and no page (written by hand) has no chain position
    db["AuditEvent"].insert_one({"_id": "forged", "pid": "p1", "vid": 1, "lu": datetime.now(timezone.utc),
                                 "del": False, "res": b"", "s": {}, "o": {}})
    assert "1 AuditEvent(s) without a chain position" in verify_chains(storage, unsealed_bound_s=60)
    # and one added to a run by hand
    run = db[LINKS].find_one({"e": {"$exists": True}})
    db[LINKS].update_one({"_id": run["_id"]}, {"$push": {"e": {**run["e"][0], "_id": "forged-in-run"}}})
    assert "2 AuditEvent(s) without a chain position" in verify_chains(storage, unsealed_bound_s=60)


def test_destroy_removes_the_dmps_unsealed_events(api, dmp, db):
    pid = dmp["pid"]
    assert api.as_ps(b.PS_DR).get(f"Patient/{pid}").status_code == 200
    other = api.as_ps(b.PS_DR).create(b.patient())["id"]
    assert api.as_ps(b.PS_DR).get(f"Patient/{other}").status_code == 200
    assert db[PAGES].count_documents({"events.pid": pid}) > 0
    assert api.as_admin().post(f"Patient/{pid}/$destroy").status_code == 204
    assert db[PAGES].count_documents({"events.pid": pid}) == 0 and b.journal_entries(db, {"pid": pid}) == []
    assert b.journal_entries(db, {"pid": other})                        # another DMP's stay
    assert db[PAGES].count_documents({"events": {"$size": 0}}) == 0    # no page left empty


@pytest.mark.parametrize("args,n", [
    ([("patient", "Patient/p1")], 2),
    ([("agent:identifier", "urn:oid:1.2.250.1.71.4.2.1|810001234567")], 4),
    ([("agent:identifier", "urn:oid:1.2.250.1.71.4.2.1|810000000000")], 0),
    ([("entity", "DocumentReference/d1")], 4),
    ([("action:not", "R")], 0),
    ([("outcome:not", "4"), ("patient", "Patient/p2")], 2),
    ([("date", "ge2020-01-01"), ("_sort", "date")], 4),
    ([("subtype:missing", "true")], 0),
])
def test_unsealed_entries_match_as_the_database_does(db, tmp_path, args, n):
    """A search answered from the pages (in memory) and the same search once they are sealed (by
    the database) find the same entries in the same order."""
    from fhir_dmp import search
    from fhir_dmp.audit.sealer import Sealer
    storage = Storage(db.client, db)
    AuditLog(storage).append([event("p1"), event("p2"), event("p1", request_id="r2"), event("p2")])
    req = search.parse_search("AuditEvent", args)

    def found():
        return [d["_id"] for d in storage.find_docs("AuditEvent", req.mongo_filter(), req.mongo_sort(), 50)]
    unsealed = found()
    assert len(unsealed) == n
    assert db["AuditEvent"].count_documents({}) == 0
    sealer = Sealer(storage, tmp_path / "k.pem")
    try:
        assert sealer.seal_all() == 4
    finally:
        sealer.release()
    assert db[PAGES].count_documents({}) == 0
    assert found() == unsealed
    assert storage.count("AuditEvent", req.mongo_filter()) == len(unsealed)
