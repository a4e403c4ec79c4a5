"""The journal's sealed entries kept in their chain's runs (fhir_dmp/storage/runs.py): one document
per chain and sealing pass, read by their indexed keys, pruned by their bounds, matched in memory
exactly as the database would match one document per entry."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fhir_dmp import search
from fhir_dmp.audit.events import AccessRecord, build_event
from fhir_dmp.audit.log import AuditLog
from fhir_dmp.audit.sealer import Sealer
from fhir_dmp.audit.verify import verify_chains
from fhir_dmp.security.principal import PS, Principal
from fhir_dmp.security.scopes import Scopes
from fhir_dmp.storage import Storage, StorageUnavailable
from fhir_dmp.storage.runs import META_ONLY, PACKED, RunReads, admits, run_queries, unpacked_entry

LINKS = "AuditEvent_link"
META = "AuditEvent_run_meta"
IDNATPS = "urn:oid:1.2.250.1.71.4.2.1"


def event(pid: str | None = "p1", *, ps: str = "810001234567", doc: str = "d1", outcome: str = "0",
          at: datetime | None = None) -> dict:
    principal = Principal(kind=PS, subject=f"sub-{ps}", scopes=Scopes.parse("user/*.cruds"),
                          id_nat_ps=ps, professions=("10",), acr="eidas1")
    return build_event(AccessRecord(interaction="read", action="R", outcome=outcome, principal=principal,
                                    patient_id=pid, resource=f"DocumentReference/{doc}/_history/1", query=None,
                                    decision={"result": "permit", "rule": "consent"}, http_status=200,
                                    client_ip="10.0.0.7", request_id="req", recorded=at),
                       source_observer="fhir-dmp test")


@pytest.fixture
def storage(db):
    return Storage(db.client, db)


@pytest.fixture
def sealer(storage, tmp_path):
    s = Sealer(storage, tmp_path / "k.pem")
    yield s
    s.release()


def test_a_pass_writes_one_run_per_chain_holding_its_entries(db, storage, sealer):
    log = AuditLog(storage)
    log.append([event("p1") for _ in range(30)] + [event("p2"), event(None)])
    assert sealer.seal_all() == 32
    runs = {r["pid"]: r for r in db[LINKS].find()}
    assert sorted(runs) == ["_system", "p1", "p2"] and db["AuditEvent"].count_documents({}) == 0
    p1, meta = runs["p1"], db[META].find_one({"_id": "p1:1"})
    assert not set(META_ONLY) & set(p1)        # the run: links, entries, memo key
    assert [e["_id"] for e in p1["e"]] == [eid for eid, _ in p1["links"]] == meta["ids"]
    assert meta["ke"] == ["DocumentReference/d1", "Patient/p1"] and meta["ka"] == ["810001234567"]
    assert meta["lo"] <= meta["hi"] and meta["b"]["lu"] == [meta["lo"], meta["hi"]]
    assert meta["u"] == p1["u"] and meta["pid"] == "p1" and meta["n"] == 30 and meta["size"] > 0
    assert sorted(m["_id"] for m in db[META].find()) == sorted(r["_id"] for r in runs.values())
    assert verify_chains(storage, check_signatures=True, public_key=sealer.key.public_key()) == []


def test_a_runs_entries_keep_their_search_index_packed_and_read_back_whole(db, storage, sealer):
    """The search index of an entry is one binary in the run (the database never reads inside
    it); the reads give the entry with ``s`` and ``o`` as the search extracted them."""
    log = AuditLog(storage)
    log.append([event("p1", doc="d7")])
    sealer.seal_all()
    stored = db[LINKS].find_one({"pid": "p1"})["e"][0]
    assert "s" not in stored and "o" not in stored and isinstance(stored[PACKED], bytes)
    entry = unpacked_entry(stored)
    assert "DocumentReference/d7" in [v.get("r") for v in entry["s"]["entity"]]
    assert entry["o"]["date"].tzinfo is not None     # dates come back as stored, aware
    RunReads._run_memo.__init__()
    got = storage.find_docs("AuditEvent", {"s.entity.r": "DocumentReference/d7", "del": False}, [("lu", 1)], 0)
    assert [d["_id"] for d in got] == [entry["_id"]] and got[0]["s"] == entry["s"]


def test_runs_written_with_their_search_index_as_documents_still_read(db, storage, sealer):
    """A run of the previous version (``s``/``o`` plain in each entry) is found and matched."""
    log = AuditLog(storage)
    log.append([event("p1", doc="d8"), event("p1", doc="d9")])
    sealer.seal_all()
    run = db[LINKS].find_one({"pid": "p1"})
    db[LINKS].update_one({"_id": run["_id"]}, {"$set": {"e": [unpacked_entry(d) for d in run["e"]]}})
    RunReads._run_memo.__init__()
    got = storage.find_docs("AuditEvent", {"s.entity.r": "DocumentReference/d9", "del": False}, [("lu", 1)], 0)
    assert len(got) == 1 and got[0]["_id"] == run["links"][1][0]
    assert verify_chains(storage, check_signatures=True, public_key=sealer.key.public_key()) == []


def test_run_queries_name_the_runs_by_their_indexed_keys():
    assert run_queries({"_id": {"$in": ["a", "b"]}, "pid": "p1"}) == [{"ids": {"$in": ["a", "b"]}}]
    assert run_queries({"pid": "p1", "del": False}) == [{"pid": "p1"}]
    assert run_queries({"pid": None}) == [{"pid": "_system"}]
    assert run_queries({"$and": [{"s.entity.r": "DocumentReference/d1"}, {"s.outcome.c": "0"}]}) == \
        [{"ke": "DocumentReference/d1"}]
    assert run_queries({"s.agent.iv": "81"}) == [{"ka": "81"}]
    assert run_queries({"$or": [{"s.entity.r": "x"}, {"_id": "y"}]}) == [{"ke": "x"}, {"ids": "y"}]
    # no usable equality (a negation, a null that also means "missing", one $or branch open): every run
    every = [{}]
    assert run_queries({"s.entity.r": {"$ne": "x"}}) == every
    assert run_queries({"s.entity.r": None}) == every
    assert run_queries({"$or": [{"s.entity.r": "x"}, {"s.outcome.c": "4"}]}) == every


def test_bounds_prune_only_what_cannot_match():
    t = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
    b = {"lu": [t, t + timedelta(minutes=5)], "o:date~d": [t, t + timedelta(minutes=5)]}
    assert admits(b, {"lu": {"$gte": t + timedelta(minutes=5)}})
    assert not admits(b, {"lu": {"$gt": t + timedelta(minutes=5)}})
    assert not admits(b, {"lu": {"$lt": t}}) and admits(b, {"lu": {"$lte": t}})
    assert not admits(b, {"$or": [{"o.date~d": {"$lt": t}}, {"o.date~d": t - timedelta(seconds=1), "_id": "x"}]})
    assert admits(b, {"$or": [{"o.date~d": {"$lt": t}}, {"s.outcome.c": "4"}]})
    assert admits(b, {"o.type": {"$lt": "a"}})          # not a bounded date: no pruning
    assert admits({}, {"lu": {"$lt": t}})                 # no bounds: no pruning


@pytest.mark.parametrize("args", [
    [("patient", "Patient/p1")],
    [("agent:identifier", f"{IDNATPS}|810001234567")],
    [("agent:identifier", f"{IDNATPS}|810000000000")],
    [("entity", "DocumentReference/d2")],
    [("action:not", "R")],
    [("outcome:not", "4"), ("patient", "Patient/p2")],
    [("date", "ge2026-12-07T11:00:00Z"), ("_sort", "date")],
    [("date", "lt2026-12-07T11:00:00Z"), ("_sort", "-date")],
    [("subtype:missing", "true")],
    [("outcome", "4")],
    [("_id", "x")],
])
def test_runs_match_as_the_database_does(db, storage, sealer, args):
    """A search answered from the runs (in memory) finds the same entries, in the same order, with
    the same count, as the database finds in a collection holding the same entries one per
    document, for 1 to 10 per page (keyset paging on the server's sort)."""
    log = AuditLog(storage)
    t0 = datetime(2026, 12, 7, 10, tzinfo=timezone.utc)
    for i in range(12):       # 12 passes: 12 runs of p1, some of p2, events spread over 2 hours
        log.append([event("p1", doc=f"d{i % 3}", at=t0 + timedelta(minutes=10 * i), outcome="4" if i % 5 == 0 else "0"),
                    event("p1", ps="810000000009", at=t0 + timedelta(minutes=10 * i, seconds=1)),
                    *([event("p2", at=t0 + timedelta(minutes=10 * i + 1))] if i % 2 else [])])
        sealer.seal_all()
    entries = [unpacked_entry(d) for run in db[LINKS].find() for d in run["e"]]
    db["reference_entries"].insert_many(entries)
    req = search.parse_search("AuditEvent", args)
    flt, sort = req.mongo_filter(), req.mongo_sort()
    flt = {**flt, "del": False}
    expected = [d["_id"] for d in db["reference_entries"].find(flt).sort(sort)]
    RunReads._run_memo.__init__()            # a cold process: nothing memoized
    for limit in (1, 3, 10, 0):
        got = [d["_id"] for d in storage.find_docs("AuditEvent", flt, sort, limit)]
        assert got == (expected[:limit] if limit else expected), (limit, args)
        with storage.journal_scope():        # a search's page and count: the metadata read once
            got = [d["_id"] for d in storage.find_docs("AuditEvent", flt, sort, limit)]
            assert got == (expected[:limit] if limit else expected), (limit, args)
            assert storage.count("AuditEvent", flt) == len(expected)
    assert storage.count("AuditEvent", flt) == len(expected)


def test_a_page_of_a_long_journal_reads_a_few_runs(db, storage, sealer):
    log = AuditLog(storage)
    for i in range(40):
        log.append([event("p1") for _ in range(5)])
        sealer.seal_all()
    assert db[LINKS].count_documents({"pid": "p1"}) == 40
    RunReads._run_memo.__init__()
    req = search.parse_search("AuditEvent", [("patient", "Patient/p1"), ("_count", "3")])
    got = storage.find_docs("AuditEvent", {"pid": "p1", **req.mongo_filter()}, req.mongo_sort(), 3)
    assert len(got) == 3 and len(RunReads._run_memo.runs) <= 8


def test_a_destroyed_dmps_runs_are_not_read_from_memory(db, storage, sealer):
    """A run's entries are memoized by (_id, u): after a destroy, a new run with the same _id
    (the chain starts again at 1) is read anew, never the destroyed one's entries."""
    log = AuditLog(storage)
    log.append([event("p1", doc="old")])
    sealer.seal_all()
    assert [d["_id"] for d in storage.find_docs("AuditEvent", {"pid": "p1"}, [], 0)]
    with db.client.start_session() as s:
        s.with_transaction(lambda s: storage.purge_dmp("p1", session=s))
    assert storage.find_docs("AuditEvent", {"pid": "p1"}, [], 0) == []
    log.append([event("p1", doc="new")])
    sealer.seal_all()
    assert db[LINKS].find_one({"_id": "p1:1"})["e"]
    [doc] = storage.find_docs("AuditEvent", {"pid": "p1"}, [], 0)
    assert "DocumentReference/new" in [e.get("r") for e in doc["s"]["entity"]]
    assert "DocumentReference/old" not in [e.get("r") for e in doc["s"]["entity"]]


def test_a_chains_pass_is_split_into_runs_that_stay_small(db, storage, tmp_path):
    """Past ``run_bytes`` of entries a chain's pass goes on in a new run (first = the next
    position, prev = the hash before it): the chain verifies, every entry is read."""
    log = AuditLog(storage)
    log.append([event("p1", doc=f"d{i}") for i in range(30)])
    small = Sealer(storage, tmp_path / "k.pem", run_bytes=8 * 1024)
    try:
        assert small.seal_all() == 30
    finally:
        small.release()
    runs = list(db[LINKS].find({"pid": "p1"}, sort=[("first", 1)]))
    assert len(runs) > 2 and sum(len(r["e"]) for r in runs) == 30
    assert all(a["last"] + 1 == b["first"] and a["links"][-1][1] == b["prev"] for a, b in zip(runs, runs[1:]))
    assert verify_chains(storage, check_signatures=True, public_key=small.key.public_key()) == []
    assert len(storage.find_docs("AuditEvent", {"pid": "p1"}, [("lu", -1), ("_id", 1)], 0)) == 30


def test_a_scan_of_the_window_reads_every_run_once_and_keeps_none(db, storage, sealer):
    """The privacy scan's window (``sealed_in_window``) reads each run once: it gives every sealed
    entry of a DMP in the window with the fields the scan reads, leaves a run a search memoized
    where it was, and memoizes none of the others (a scan of the whole journal would hold and then
    flush the searches' memo)."""
    log = AuditLog(storage)
    for pid in ("p1", "p2", "p3"):
        log.append([event(pid) for _ in range(4)] + [event(None)])
        sealer.seal_all()
    RunReads._run_memo.__init__()
    assert len(storage.find_docs("AuditEvent", {"pid": "p1"}, [], 0)) == 4      # a search memoizes p1's run
    memoized = set(RunReads._run_memo.runs)
    assert [key[0] for key in memoized] == ["p1:1"]
    since = datetime.now(timezone.utc) - timedelta(hours=1)
    got = list(storage.sealed_in_window(since, datetime.now(timezone.utc) + timedelta(seconds=1)))
    assert sorted(d["pid"] for d in got) == ["p1"] * 4 + ["p2"] * 4 + ["p3"] * 4
    assert all(set(d) == {"_id", "pid", "lu", "res"} for d in got)     # not the search index
    assert set(RunReads._run_memo.runs) == memoized


def test_a_search_reads_the_metadata_once_and_sees_one_state_of_the_journal(db, storage, sealer):
    """Within a journal scope (a search's page and its count) the runs' metadata and the pages are
    read once: what is sealed or appended meanwhile is not half seen (the count agrees with the
    page), and the next search sees it."""
    log = AuditLog(storage)
    log.append([event("p1") for _ in range(3)])
    sealer.seal_all()
    log.append([event("p1")])           # in a page
    sort = [("lu", -1), ("_id", 1)]
    with storage.journal_scope():
        page = storage.find_docs("AuditEvent", {"pid": "p1"}, sort, 2)
        log.append([event("p1") for _ in range(2)])
        sealer.seal_all()               # the page sealed, two more events, a second run
        assert storage.count("AuditEvent", {"pid": "p1"}) == 4
        assert len(storage.find_docs("AuditEvent", {"pid": "p1"}, sort, 0)) == 4
        with storage.journal_scope():   # nested: the outer scope holds
            assert storage.count("AuditEvent", {"pid": "p1"}) == 4
    assert len(page) == 2 and storage.count("AuditEvent", {"pid": "p1"}) == 6


def test_a_destroy_deletes_the_runs_and_their_metadata(db, storage, sealer):
    log = AuditLog(storage)
    log.append([event("p1") for _ in range(3)] + [event("p2")])
    sealer.seal_all()
    with db.client.start_session() as s:
        counts = s.with_transaction(lambda s: storage.purge_dmp("p1", session=s))
    assert counts[LINKS] == counts[META] == 1
    assert db[LINKS].count_documents({"pid": "p1"}) == db[META].count_documents({"pid": "p1"}) == 0
    assert db[META].count_documents({"pid": "p2"}) == 1


def _legacy_layout(db, *, indexed: bool = True) -> list[str]:
    """Rewrite every run as the previous version stored it (its metadata inside it, indexed there
    by ``runs_by_ids``/``ke``/``ka`` unless not ``indexed``: restored from a backup, no metadata
    document); the ids of the entries."""
    for meta in db[META].find():
        db[LINKS].update_one({"_id": meta["_id"]}, {"$set": {k: meta[k] for k in META_ONLY}})
    db[META].drop()
    for field in ("ids", "ke", "ka") if indexed else ():
        db[LINKS].create_index([(field, 1)], name=f"runs_by_{field}")
    return [d["_id"] for run in db[LINKS].find() for d in run["e"]]


@pytest.mark.parametrize("indexed", [True, False], ids=["upgraded", "restored"])
def test_runs_of_the_previous_version_are_split_once_at_start(db, storage, sealer, indexed):
    """A database whose runs hold their metadata (the previous version, or a restore of its
    backup: no index): ensuring the journal's indexes at start gives each its metadata document
    and drops the runs' lookup indexes; every search finds what it found before, the chains
    verify, a second start does nothing."""
    log = AuditLog(storage)
    for i in range(3):
        log.append([event("p1", doc=f"d{i}"), event("p2", ps="810000000009"), event(None)])
        sealer.seal_all()
    searches = [({"pid": "p1"}, [("lu", -1), ("_id", 1)]), ({"s.entity.r": "DocumentReference/d1"}, []),
                ({"s.agent.iv": "810000000009"}, []), ({"s.agent.iv": "810001234567"}, [("lu", 1), ("_id", 1)])]
    before = [[d["_id"] for d in storage.find_docs("AuditEvent", f, s, 0)] for f, s in searches]
    ids = _legacy_layout(db, indexed=indexed)
    RunReads._run_memo.__init__()
    assert storage.find_docs("AuditEvent", {"pid": "p1"}, [], 0) == []     # not found until split
    storage.ensure_journal_indexes()
    assert db[META].count_documents({}) == db[LINKS].count_documents({}) == 9
    assert not any(set(META_ONLY) & set(run) for run in db[LINKS].find())
    assert not {ix["name"] for ix in db[LINKS].list_indexes()} & {"runs_by_ids", "runs_by_ke", "runs_by_ka"}
    assert [[d["_id"] for d in storage.find_docs("AuditEvent", f, s, 0)] for f, s in searches] == before
    assert all(storage.journal_entry(eid)["_id"] == eid for eid in ids)
    assert verify_chains(storage, check_signatures=True, public_key=sealer.key.public_key()) == []
    assert storage.split_legacy_runs() == 0
    log.append([event("p1")])           # sealing goes on in the new layout
    sealer.seal_all()
    assert storage.count("AuditEvent", {"pid": "p1"}) == 4


def test_a_split_stopped_half_way_goes_on_at_the_next_start(db, storage, sealer):
    log = AuditLog(storage)
    for _ in range(3):
        log.append([event("p1")])
        sealer.seal_all()
    _legacy_layout(db)
    with db.client.start_session() as s:    # one run split, then the process stopped
        s.with_transaction(lambda s: storage._split_run("p1:2", s))
    assert db[META].count_documents({}) == 1
    assert storage.split_legacy_runs() == 2
    assert storage.count("AuditEvent", {"pid": "p1"}) == 3


def test_a_filter_not_evaluated_in_memory_is_refused_as_unavailable(storage):
    """A journal filter the storage filter language does not evaluate exactly is a 503, never a
    silent miss (nor a 500)."""
    with pytest.raises(StorageUnavailable):
        storage.find_docs("AuditEvent", {"pid": None}, [], 0)


def test_verify_reports_a_run_its_metadata_does_not_list(db, storage, sealer):
    """Searches find a run's entries through its metadata: ``audit verify`` reports a run whose
    metadata is missing or names other entries."""
    log = AuditLog(storage)
    log.append([event("p1") for _ in range(2)] + [event("p2")])
    sealer.seal_all()
    key = sealer.key.public_key()
    assert verify_chains(storage, check_signatures=True, public_key=key) == []
    db[META].update_one({"_id": "p1:1"}, {"$pop": {"ids": 1}})
    db[META].delete_one({"_id": "p2:1"})
    problems = verify_chains(storage, check_signatures=True, public_key=key)
    assert problems == ["2 run(s) whose metadata does not list their entries (searches miss them): p1:1, p2:1"]
    assert verify_chains(storage, "p2") == ["1 run(s) whose metadata does not list their entries "
                                             "(searches miss them): p2:1"]
