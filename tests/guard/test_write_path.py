"""The write path does no needless database work (issue 13: seeding throughput).

What a deposit (``POST DocumentReference`` with an inline PDF) and the opening of a DMP
(``POST Patient``) send to the database, counted with pymongo's command monitoring on a client
of the real server:

* a deposit is inserts only, then the commit: no update (the Binary is inserted with its
  content's size and hash and already attached to its document), no look-up of content that
  cannot exist yet, no content document for a small PDF (its Binary keeps it), no history copy
  of a version 1, the Binary and the document in one round trip, and no decision context query
  while the DMP's context is cached (a deposit changes none of its inputs);
* opening a DMP tells the patient about the Patient just written, without reading it back, and
  sends the creator's Consent and the notice with the journal's documents (two write round trips);
* a Consent written through the same process still drops the cached context at once;
* the history keeps superseded versions only (the current one is read from its collection) and
  still lists every version once, old documents that have their copy included.
"""
from __future__ import annotations

import base64
import hashlib
import os
import time
from collections import Counter

import pymongo
import pytest
from pymongo import monitoring

from fhir_dmp.runtime.services import services
from fhir_dmp.storage.content import INLINE_MAX, BlobStore
from fhir_dmp.security.crypto import ContentUnavailable
from tests import builders as b
from tests.api import Api

MIB = 1 << 20


class Commands(monitoring.CommandListener):
    """(command, collection, in a transaction) of every command sent while ``on``."""

    def __init__(self):
        self.on = False
        self.seen: Counter = Counter()

    def started(self, event):
        if self.on and event.command_name not in ("getMore", "killCursors"):   # the cache's stream
            coll = event.command.get(event.command_name)
            if event.command_name == "bulkWrite":      # one round trip into several collections
                coll = ",".join(sorted(ns["ns"].split(".", 1)[1] for ns in event.command["nsInfo"]))
            self.seen[(event.command_name, coll if isinstance(coll, str) else "",
                       "txnNumber" in event.command)] += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass

    def during(self, fn):
        self.seen.clear()
        self.on = True
        try:
            return fn()
        finally:
            self.on = False


@pytest.fixture
def watched(config, mongo_server, db, idp):
    """(Api, Commands, app) on a client whose commands are counted; the context cache live."""
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    commands = Commands()
    client = pymongo.MongoClient(mongo_server.uri, tz_aware=True, event_listeners=[commands])
    app = create_app(config, client=client, db=client[db.name])
    cache = services(app).policy.context_cache
    deadline = time.monotonic() + 10
    while not cache.live and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.live
    yield Api(app, idp), commands, app
    stop_background(app)
    client.close()


def test_a_deposit_is_inserts_only_and_its_content_reads_back(watched, db):
    api, commands, app = watched
    cache = services(app).policy.context_cache
    ps = api.as_ps()
    pid = ps.create(b.patient())["id"]
    time.sleep(1)                     # the change stream has told the cache about the new DMP
    ps.create(b.docref(pid, content=b.pdf_bytes("warm-up")))
    assert pid in cache._entries      # the DMP's context is cached, and a deposit kept it
    pdf = b.pdf_bytes("Compte rendu du jour")
    r = commands.during(lambda: ps.post("DocumentReference", b.docref(pid, content=pdf)))
    assert r.status_code == 201, r.json
    seen = commands.seen
    kinds = {cmd for cmd, _, _ in seen}
    assert kinds <= {"insert", "bulkWrite", "find", "commitTransaction"}, seen
    # the Binary with its encrypted content beside it (no content document: storage/content.py),
    # the document (no history copy of a version 1) and the journal page of the write's events
    # (audit/log.py) in one round trip, the transaction's first command (on SecantusDB it names no
    # read concern: Storage.run_transaction)
    writes = sorted(coll for cmd, coll, txn in seen if cmd in ("insert", "bulkWrite") and txn)
    assert writes == ["AuditEvent_page,Binary,DocumentReference"], seen
    assert all(txn for cmd, _, txn in seen if cmd in ("insert", "bulkWrite"))
    # no decision context query (Patient, Consent): the one read left is the destroy sweep's
    # look-up after the commit (UnitOfWork.sweep_destroyed)
    assert [(coll, txn) for cmd, coll, txn in seen if cmd == "find"] == [("Patient", False)], seen

    # what was written is whole: size and hash from the content, Binary attached, content reads back
    att = r.json["content"][0]["attachment"]
    bid = att["url"].split("/")[-1]
    assert att["size"] == len(pdf) and att["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    binary = db["Binary"].find_one({"_id": bid})
    assert {k: binary["blob"][k] for k in ("size", "sha1", "v")} == {"size": len(pdf), "sha1": att["hash"], "v": 1}
    assert pdf not in binary["blob"]["d"]         # encrypted
    assert binary["res"]["securityContext"] == {"reference": f"DocumentReference/{r.json['id']}"}
    assert db["content_blobs"].count_documents({"r": bid}) == 0 == db["content_chunks"].count_documents({"r": bid})
    got = ps.get(f"Binary/{bid}", headers={"Accept": "application/pdf"})
    assert got.status_code == 200 and got.data == pdf


def test_opening_a_dmp_reads_nothing_back(watched, db):
    api, commands, _ = watched
    r = commands.during(lambda: api.as_ps().post("Patient", b.patient(email="claire@example.org")))
    assert r.status_code == 201
    pid = r.json["id"]
    reads = [(coll, txn) for cmd, coll, txn in commands.seen if cmd == "find"]
    assert reads == [("Patient", False)], commands.seen       # the destroy sweep, after the commit
    # two write round trips: the Patient alone (its unique INS answers a duplicate as such), then
    # the creator's Consent, the notice (outbox message and Communication) with the journal's
    # documents (GuardedRepository._after_write: alone in its transaction, nothing reads them)
    writes = [(cmd, coll) for cmd, coll, txn in commands.seen if cmd in ("insert", "bulkWrite") and txn]
    assert len(writes) == 2 and writes[0] == ("insert", "Patient"), commands.seen
    assert writes[1][0] == "bulkWrite"
    assert {"Consent", "Communication", "notification_outbox"} <= set(writes[1][1].split(",")), commands.seen
    # the creator's Consent and the first-access notice to the patient are there
    assert db["Consent"].count_documents({"pid": pid}) == 1
    [comm] = db["Communication"].find({"pid": pid})
    assert comm["res"]["status"] != "not-done"
    assert db["notification_outbox"].count_documents({"patient_id": pid}) == 1


def test_a_block_written_in_this_process_applies_to_the_next_deposit(watched):
    """A deposit keeps the cached context; the patient's block (a Consent) drops it at once."""
    api, _, app = watched
    cache = services(app).policy.context_cache
    ps = api.as_ps()
    pid = ps.create(b.patient())["id"]
    assert ps.post("DocumentReference", b.docref(pid)).status_code == 201
    assert ps.post("DocumentReference", b.docref(pid)).status_code == 201
    assert pid in cache._entries                       # still cached after a deposit
    assert api.as_patient(pid).post("Consent", b.consent(pid, "deny", actor=b.PS_DR)).status_code == 201
    assert pid not in cache._entries
    r = ps.post("DocumentReference", b.docref(pid))
    assert r.status_code in (403, 422), r.json


# ----------------------------------------------------------------------- content of one chunk

@pytest.fixture
def store(db_storage, crypto):
    return BlobStore(db_storage, crypto)


@pytest.fixture
def crypto(db_storage, config):
    from fhir_dmp.security.crypto import DocumentCrypto, key_provider
    return DocumentCrypto(db_storage, key_provider(config))


def test_small_content_lives_in_its_header_larger_in_chunks(store, db):
    small, larger = os.urandom(5000), os.urandom(INLINE_MAX + 1)      # both one chunk of 1 MiB
    a = store.put("pat-i", "bin-a", 1, small, max_bytes=MIB)
    c = store.put("pat-i", "bin-c", 1, larger, max_bytes=MIB)
    assert db.content_chunks.count_documents({"b": a.blob_id}) == 0
    assert db.content_chunks.count_documents({"b": c.blob_id}) == 1
    assert "d" not in db.content_blobs.find_one({"_id": c.blob_id})
    assert store.read("pat-i", "bin-a", 1) == small and store.read("pat-i", "bin-c", 1) == larger
    assert store.size("pat-i", "bin-a", 1) == len(small)
    empty = store.put("pat-i", "bin-e", 1, b"", max_bytes=MIB)
    assert store.read("pat-i", "bin-e", 1) == b"" and empty.size == 0


def test_content_in_a_header_cannot_be_swapped_or_miscounted(store, db):
    a = store.put("pat-s", "bin-a", 1, b"first document", max_bytes=MIB)
    other = store.put("pat-s", "bin-b", 1, b"other document", max_bytes=MIB)
    blobs = db.content_blobs
    mine = blobs.find_one({"_id": a.blob_id})["d"]
    blobs.update_one({"_id": a.blob_id}, {"$set": {"d": blobs.find_one({"_id": other.blob_id})["d"]}})
    with pytest.raises(ContentUnavailable):
        store.read("pat-s", "bin-a", 1)
    blobs.update_one({"_id": a.blob_id}, {"$set": {"d": mine, "n": 2}})
    with pytest.raises(ContentUnavailable):
        store.read("pat-s", "bin-a", 1)
    blobs.update_one({"_id": a.blob_id}, {"$set": {"n": 1, "size": 3}})
    with pytest.raises(ContentUnavailable):
        store.read("pat-s", "bin-a", 1)
    blobs.update_one({"_id": a.blob_id}, {"$set": {"size": len(b"first document")}})
    assert store.read("pat-s", "bin-a", 1) == b"first document"


# ----------------------------------------------------------------- several inserts, one round trip

def test_insert_docs_keeps_decimals_reports_duplicates_and_rolls_back(db):
    from decimal import Decimal

    from fhir_dmp.security.decision import access_facets
    from fhir_dmp.storage import DuplicateKey, DuplicateValue, Storage, VersionConflict
    storage = Storage(db.client, db, annotate=access_facets)
    storage.ensure_indexes()
    docs = [("Binary", {"_id": "b1", "pid": "p", "x": Decimal("1.50")}),
            ("Binary_history", {"_id": "b1/1", "rid": "b1"}), ("content_blobs", {"_id": "c1", "p": "p"})]
    storage.run_transaction(lambda s: storage.insert_docs(docs, session=s))
    assert storage.db["Binary"].find_one({"_id": "b1"})["x"] == Decimal("1.50")   # not a float
    assert db["content_blobs"].count_documents({"_id": "c1"}) == 1
    with pytest.raises(DuplicateKey):
        storage.run_transaction(lambda s: storage.insert_docs(
            [("content_blobs", {"_id": "c2"}), ("Binary", {"_id": "b1"})], session=s))
    assert db["content_blobs"].count_documents({"_id": "c2"}) == 0          # rolled back whole
    # what create makes of a refused insert: the id taken, or another unique value (the INS)
    with pytest.raises(VersionConflict):
        storage.run_transaction(lambda s: storage.create("Binary", {"resourceType": "Binary"}, pid="p",
                                                         rid="b1", session=s))
    ins = {"resourceType": "Patient", "identifier": [{"system": b.NIR, "value": b.nir()}]}
    storage.run_transaction(lambda s: storage.create("Patient", ins, pid=None, session=s))
    with pytest.raises(DuplicateValue):
        storage.run_transaction(lambda s: storage.create("Patient", ins, pid=None, session=s))


def test_a_retried_transaction_opens_with_its_bulk_again(mongo_server, db):
    """On SecantusDB run_transaction names no read concern and its session is not causal: the
    bulkWrite of a transaction's inserts is its first command, also when the transaction is
    retried after a lost race (no afterClusterTime then either)."""
    from pymongo import monitoring
    from pymongo.errors import OperationFailure

    from fhir_dmp.storage import Storage
    seen, attempts = [], []

    class Listener(monitoring.CommandListener):
        def started(self, event):
            if event.command_name in ("insert", "bulkWrite"):
                seen.append((event.command_name, "readConcern" in event.command))

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    def attempt(s):
        attempts.append(1)
        storage.insert_docs([("content_blobs", {"_id": f"r{len(attempts)}"}), ("Binary", {"_id": f"r{len(attempts)}"})],
                            session=s)
        if len(attempts) == 1:
            raise OperationFailure("WriteConflict", 112)     # labelled transient: retried
    client = pymongo.MongoClient(mongo_server.uri, tz_aware=True, w="majority", journal=True,
                                 readConcernLevel="majority", event_listeners=[Listener()])
    try:
        storage = Storage(client, client[db.name])
        assert storage.is_secantus()
        storage.run_transaction(attempt)
    finally:
        client.close()
    assert seen == [("bulkWrite", False), ("bulkWrite", False)], seen
    assert db["content_blobs"].count_documents({}) == 1 and db["Binary"].count_documents({"_id": "r2"}) == 1


def test_insert_docs_in_a_causally_consistent_transaction(db_storage, db):
    """A session that already read (causal consistency) starts its next transaction with a
    readConcern (so does a client with read concern majority, as in production): the first
    insert goes alone, the rest together, all committed."""
    storage = db_storage
    with storage.client.start_session() as s:
        db["content_blobs"].find_one({}, session=s)
        assert s.operation_time is not None
        for attempt in range(2):
            with s.start_transaction():
                storage.insert_docs([("content_blobs", {"_id": f"a{attempt}"}),
                                     ("content_chunks", {"_id": f"b{attempt}"}),
                                     ("content_chunks", {"_id": f"c{attempt}"})], session=s)
    assert db["content_blobs"].count_documents({}) == 2 and db["content_chunks"].count_documents({}) == 4


def test_no_index_that_nothing_queries_on_current_collections(db):
    """``(pid, lu)`` serves the history: kept there and on the append-only journal, dropped from
    the current collections (an older database had it) where every insert paid for it."""
    from fhir_dmp.storage import Storage
    db["DocumentReference"].create_index([("pid", 1), ("lu", -1)])      # as an older version made
    db["DocumentReference"].create_index([("pid", 1), ("a.types", 1)])
    db["DocumentReference"].create_index([("pid", 1), ("s.identifier.c", 1), ("s.identifier.s", 1)])
    Storage(db.client, db).ensure_indexes()

    def keys(coll):
        return [list(ix["key"].items()) for ix in db[coll].list_indexes()]
    for coll in ("DocumentReference", "Binary", "Consent", "Communication", "Patient", "RelatedPerson"):
        assert [("pid", 1), ("lu", -1)] not in keys(coll), coll
        assert [("pid", 1), ("lu", -1)] in keys(f"{coll}_history"), coll
        if coll != "Patient":       # a DMP's resources are still found (and purged) by pid first
            assert any(k[0] == ("pid", 1) for k in keys(coll)), coll
    assert [("pid", 1), ("lu", -1)] in keys("AuditEvent")
    # the guard's a.types conditions cannot ride (pid, a.types); the global identifier index
    # serves identifier searches inside a DMP too
    assert [("pid", 1), ("a.types", 1)] not in keys("DocumentReference")
    assert [("pid", 1), ("s.identifier.c", 1), ("s.identifier.s", 1)] not in keys("DocumentReference")
    assert [("s.identifier.c", 1), ("s.identifier.s", 1)] in keys("DocumentReference")


def test_on_secantusdb_one_pid_first_index_per_current_collection(db):
    """SecantusDB's planner looks a search up by one clause (pid) and never uses a second field of
    a pid-first index (storage._one_pid_first): a deposit pays for 2 indexes, not 10. The journal
    (append-only) keeps its own."""
    from fhir_dmp.search import index_specs
    from fhir_dmp.storage import Storage
    db["DocumentReference"].create_index([("pid", 1), ("s.type.c", 1), ("s.type.s", 1)])   # an older database
    Storage(db.client, db).ensure_indexes()

    def keys(coll):
        return [list(ix["key"].items()) for ix in db[coll].list_indexes()]
    assert keys("DocumentReference") == [[("_id", 1)], [("pid", 1), ("o._lastUpdated~d", -1), ("_id", 1)],
                                         [("s.identifier.c", 1), ("s.identifier.s", 1)]]
    assert [("pid", 1), ("s.type.c", 1), ("s.type.s", 1)] in index_specs("DocumentReference")   # MongoDB's
    for coll in ("Binary", "Consent", "Communication", "RelatedPerson"):
        assert sum(k[0] == ("pid", 1) for k in keys(coll)) == 1, coll
    assert [("a.actors", 1), ("res.status", 1)] in keys("Consent")
    assert [("pid", 1), ("o.date~d", -1), ("_id", 1)] in keys("AuditEvent")
    assert [("pid", 1), ("lu", -1)] in keys("AuditEvent")


# ------------------------------------------------------- the history keeps superseded versions only

def _versions(storage, rtype, rid=None, **kw):
    return [(s.id, s.vid) for s in storage.history(rtype, rid, **kw)]


def test_a_create_writes_one_document_and_the_history_still_lists_every_version(db):
    from fhir_dmp.storage import Storage
    storage = Storage(db.client, db)
    storage.ensure_indexes()
    res = {"resourceType": "RelatedPerson", "active": True}
    one = storage.run_transaction(lambda s: storage.create("RelatedPerson", res, pid="p", session=s))
    assert db["RelatedPerson_history"].count_documents({}) == 0          # no copy of the current version
    assert _versions(storage, "RelatedPerson", one.id) == [(one.id, 1)]
    assert storage.vread("RelatedPerson", one.id, 1).resource["active"] is True
    two = storage.run_transaction(lambda s: storage.update("RelatedPerson", one.id, dict(res, active=False),
                                                           pid="p", expected_vid=1, session=s))
    gone = storage.run_transaction(lambda s: storage.update("RelatedPerson", one.id, None, pid="p",
                                                            expected_vid=2, session=s, deleted=True))
    assert (two.vid, gone.vid) == (2, 3)
    assert [d["vid"] for d in db["RelatedPerson_history"].find({}, sort=[("vid", 1)])] == [1, 2]
    assert _versions(storage, "RelatedPerson", one.id) == [(one.id, 3), (one.id, 2), (one.id, 1)]
    assert storage.count_history("RelatedPerson", one.id) == 3
    assert storage.vread("RelatedPerson", one.id, 2).resource["active"] is False
    assert storage.vread("RelatedPerson", one.id, 3).deleted
    assert storage.vread("RelatedPerson", one.id, 4) is None


def test_a_version_written_before_keeps_its_one_copy(db):
    """A current document with its history copy already (as written before issue 13): superseding
    it adds no second copy, and every version is listed once."""
    from fhir_dmp.storage import Storage, now
    from fhir_dmp.storage.resources import NO_COPY, _as_version
    storage = Storage(db.client, db)
    storage.ensure_indexes()
    lu = now()
    res = storage.stamp({"resourceType": "RelatedPerson", "active": True}, "old", 1, lu)
    current = storage.current_doc("RelatedPerson", "old", 1, "p", res, False, lu)
    del current[NO_COPY]                                   # the layout before issue 13
    db["RelatedPerson"].insert_one(current)
    db["RelatedPerson_history"].insert_one(_as_version(current))
    assert _versions(storage, "RelatedPerson", "old") == [("old", 1)]
    storage.run_transaction(lambda s: storage.update("RelatedPerson", "old", {"resourceType": "RelatedPerson"},
                                                     pid="p", expected_vid=1, session=s))
    assert db["RelatedPerson_history"].count_documents({"rid": "old"}) == 1
    assert _versions(storage, "RelatedPerson", "old") == [("old", 2), ("old", 1)]
    assert storage.count_history("RelatedPerson", "old") == 2


def test_type_history_pages_across_current_and_superseded_versions(db):
    """Keyset pages of a type's history (lu desc, "id/vid" asc) over versions split between the
    history and the current documents, several at the same instant: each version exactly once."""
    from fhir_dmp.storage import Storage, now
    storage = Storage(db.client, db)
    storage.ensure_indexes()
    made = []
    for i in range(7):
        made.append(storage.run_transaction(lambda s, i=i: storage.create(
            "RelatedPerson", {"resourceType": "RelatedPerson"}, pid="p" if i % 2 else "q", rid=f"r{i}", session=s)))
    for i in (1, 4):
        storage.run_transaction(lambda s, i=i: storage.update(
            "RelatedPerson", f"r{i}", {"resourceType": "RelatedPerson", "active": True}, pid="p" if i % 2 else "q",
            expected_vid=1, session=s))
    at = now()       # everything at one instant: the tie-break on "id/vid" decides the order
    db["RelatedPerson"].update_many({}, {"$set": {"lu": at}})
    db["RelatedPerson_history"].update_many({}, {"$set": {"lu": at}})
    everything = sorted([(f"r{i}", 1) for i in range(7)] + [("r1", 2), ("r4", 2)],
                        key=lambda v: f"{v[0]}/{v[1]}")
    pages, after = [], None
    while True:
        page = storage.history("RelatedPerson", None, after_key=after, limit=2)
        if not page:
            break
        pages += [(s.id, s.vid) for s in page]
        after = (page[-1].lu, f"{page[-1].id}/{page[-1].vid}")
    assert pages == everything
    only_p = _versions(storage, "RelatedPerson", pid_filter={"pid": "p"}, limit=50)
    assert sorted(only_p) == sorted(v for v in everything if int(v[0][1]) % 2)
    assert storage.count_history("RelatedPerson", None, {"pid": "p"}) == len(only_p)
    # a cursor with a naive instant (a client can send any) compares like pymongo's (UTC)
    naive = storage.history("RelatedPerson", None, after_key=(at.replace(tzinfo=None), "r3/1"), since=at)
    assert [(s.id, s.vid) for s in naive] == [v for v in everything if f"{v[0]}/{v[1]}" > "r3/1"]


def test_an_index_another_worker_dropped_first_is_no_error(db):
    """Workers starting together on an older database drop the same unwanted indexes: the one
    that comes second finds it gone, which must not stop it booting."""
    from fhir_dmp.storage.core import _drop_indexes
    coll = db["Leftover"]
    coll.create_index([("a", 1)])

    def unwanted(keys):
        if keys == [("a", 1)]:
            coll.drop_index("a_1")          # the other worker, between our listing and our drop
            return True
        return False
    _drop_indexes(coll, unwanted)
    assert [ix["name"] for ix in coll.list_indexes()] == ["_id_"]


def test_opening_a_dmp_is_all_or_nothing_with_its_deferred_documents(api, db):
    """The creator's Consent and the notice go in the journal's round trip: a refused one (a real
    validator on Communication) leaves no Patient, no Consent, no outbox message (the failure
    itself is journaled, as any refused write)."""
    ps = api.as_ps()
    collections = ("Patient", "Consent", "Communication", "notification_outbox")
    before = {c: db[c].count_documents({}) for c in collections}
    db.command("collMod", "Communication", validator={"$jsonSchema": {"required": ["nope"]}})
    try:
        r = ps.post("Patient", b.patient(email="claire@example.org"))
        assert r.status_code >= 500 and r.status_code != 500 and r.json["resourceType"] == "OperationOutcome"
    finally:
        db.command("collMod", "Communication", validator={})
    assert {c: db[c].count_documents({}) for c in collections} == before
    assert ps.post("Patient", b.patient(email="claire@example.org")).status_code == 201
