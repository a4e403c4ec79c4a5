"""The DMP document cache (``fhir_dmp/search/doc_cache.py``, issue 13) changes speed, never results.

* On random DMPs (documents of one or two types, any labels, authors, dates, deleted ones; ties
  on the sort keys) and for readers of several kinds, every page of ``DocumentReference?patient=``
  (any ``_count``, ``_sort``, ``_total``, the next cursors followed to the end, a criterion the
  cache does not evaluate) is the same with the cache as from the database: same entries in the
  same order, same totals, same next links.
* In another process (a second app on the same database, its own change stream and caches) a
  new document, a mask, a deletion and a revoked authorization show within one second; in the
  process that wrote, at once.
* A read by id of a document of a cached DMP is answered from memory and follows the same changes.
* A load that raced a change is not kept; nothing is served while the change stream is down;
  the filters the cache evaluates are only those it decides exactly as MongoDB would.
"""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_dmp.search.doc_cache import DocumentCache
from fhir_dmp.storage.filters import Unsupported, exact, matches
from fhir_dmp.guard.repository import GuardedRepository
from fhir_dmp.runtime.services import services
from fhir_dmp.security.principal import PATIENT, PS, Principal
from fhir_dmp.security.scopes import Scopes
from tests import builders as b
from tests.api import Api
from tests.security.test_access_property import backend  # noqa: F401  (the same module-scoped backend, no cache)

TYPES = [b.CONSULTATION, b.LAB, b.IMAGING, "00000-0"]
LABELS = ["MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX"]
DATES = [None, "2026-11-20T10:00:00+01:00", "2026-11-20", "2025-02", "2024"]


@st.composite
def documents(draw):
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=2, unique=True))
    doc = b.docref("x", types[0], labels=draw(st.lists(st.sampled_from(LABELS), max_size=2, unique=True)),
                   author=draw(st.sampled_from([b.PS_DR, b.PS_OTHER, b.PS_PHARMA])))
    doc["type"]["coding"] = [{"system": b.LOINC, "code": t} for t in types]
    doc["content"] = [{"attachment": {"contentType": "application/pdf", "url": "Binary/none"}}]
    date = draw(st.sampled_from(DATES))
    if date is None:
        doc.pop("date")
    else:
        doc["date"] = date
    return doc, draw(st.booleans()) and draw(st.booleans())     # (resource, deleted)


searches = st.fixed_dictionaries({
    "count": st.sampled_from(["1", "2", "3", "50"]),
    "sort": st.sampled_from([None, "date", "-date", "_lastUpdated", "-_lastUpdated"]),
    "total": st.booleans(),
    "type": st.sampled_from([None, None, b.LAB]),
})


def _readers(pid: str) -> list[Principal]:
    user = Scopes.parse("user/*.cruds")
    mine = Scopes.parse("patient/*.cruds")
    return [Principal(kind=PS, subject=ps, scopes=user, id_nat_ps=ps, professions=(prof,), acr="eidas1")
            for ps, prof in ((b.PS_DR, "10"), (b.PS_OTHER, "10"), (b.PS_PHARMA, "21"))] + \
        [Principal(kind=PATIENT, subject="p", scopes=mine, patient_id=pid, compartment=pid)]


def _pages(backend, principal, args) -> list[tuple]:
    """Every page of the search, following the next cursors: (ids, total, next cursor)."""
    out, cursor = [], None
    for _ in range(40):
        repo = GuardedRepository(backend, principal)
        page = repo.search("DocumentReference", args + ([("_cursor", cursor)] if cursor else []))
        out.append(([s.id for s in page.matches], page.total, page.next_cursor))
        cursor = page.next_cursor
        if not cursor:
            return out
    raise AssertionError("more pages than documents")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(docs=st.lists(documents(), max_size=8), gp=st.booleans(), how=searches)
def test_cached_pages_equal_the_database_pages(backend, docs, gp, how):
    storage = backend.storage
    pid = storage.create("Patient", b.patient(gp=b.PS_OTHER if gp else None), pid=None,
                         rid=uuid.uuid4().hex, session=None).id
    for ps in (b.PS_DR, b.PS_PHARMA):
        storage.create("Consent", b.consent(pid, actor=ps), pid=pid, session=None)
    for res, deleted in docs:
        stored = storage.create("DocumentReference", dict(res, subject={"reference": f"Patient/{pid}"}),
                                pid=pid, session=None)
        if deleted:
            storage.update("DocumentReference", stored.id, None, pid=pid, expected_vid=1, session=None,
                           deleted=True)
    args = [("patient", pid), ("_count", how["count"])]
    args += [("_sort", how["sort"])] if how["sort"] else []
    args += [("_total", "accurate")] if how["total"] else []
    args += [("type", f"{b.LOINC}|{how['type']}")] if how["type"] else []
    for reader in _readers(pid):
        assert storage.doc_cache is None
        from_database = _pages(backend, reader, args)
        cache = DocumentCache(storage)
        cache._set_live(True)        # no change stream here: this test writes nothing meanwhile
        storage.doc_cache = cache
        try:
            from_cache = _pages(backend, reader, args)
            remembered = _pages(backend, reader, args)     # the listings' remembered answers
        finally:
            storage.doc_cache = None
        assert from_cache == from_database, (reader.subject, args)
        assert remembered == from_database, (reader.subject, args)
        # the cache did answer when there was something to search (the type criterion, an
        # ``$elemMatch`` on the codings, included: storage/filters.py evaluates it exactly)
        entered = backend.policy.for_request(reader).narrow("DocumentReference", {pid}) is not None
        assert (cache.hits + cache.misses > 0) == entered


# ------------------------------------------------------------------ two processes, one database

@pytest.fixture
def two_apps(config, build_app):
    """Two apps on one database, each with its own change stream and caches (two processes)."""
    apps = [build_app(config) for _ in range(2)]
    deadline = time.monotonic() + 10
    while not all(services(a).context_cache.live for a in apps):
        assert time.monotonic() < deadline, "change streams not established"
        time.sleep(0.02)
    return apps


def _ids(caller, pid) -> set[str]:
    r = caller.get(f"DocumentReference?patient={pid}")
    assert r.status_code == 200, r.json
    return {e["resource"]["id"] for e in r.json.get("entry") or []}


def _within_a_second(probe, expected) -> None:
    deadline = time.monotonic() + 1.0
    while True:
        got = probe()
        if got == expected:
            return
        assert time.monotonic() < deadline, f"still {got!r} after one second, expected {expected!r}"
        time.sleep(0.02)


def test_changes_show_in_every_process_within_a_second(two_apps, idp):
    a, b_app = Api(two_apps[0], idp), Api(two_apps[1], idp)
    pid = a.as_ps().create(b.patient())["id"]
    first = a.as_ps().create(b.docref(pid))["id"]
    second = a.as_ps().create(b.docref(pid, b.LAB))["id"]
    # the writer's own process sees its writes at once (dropped after the commit)
    assert _ids(a.as_ps(), pid) == {first, second}
    assert _ids(b_app.as_ps(), pid) == {first, second}          # both processes now hold the DMP
    cache_a = services(two_apps[0]).storage.doc_cache

    def served_from_memory():        # once the stream has delivered the deposits' own changes
        hits = cache_a.hits
        return _ids(a.as_ps(), pid), cache_a.hits > hits
    _within_a_second(served_from_memory, ({first, second}, True))

    # a deposit through B shows in A
    third = b_app.as_ps().create(b.docref(pid, b.IMAGING))["id"]
    assert _ids(b_app.as_ps(), pid) == {first, second, third}
    _within_a_second(lambda: _ids(a.as_ps(), pid), {first, second, third})

    # the patient masks a document through A: B hides it from a médecin who is not the author
    me = a.as_patient(pid)
    doc = me.get(f"DocumentReference/{second}").json
    masked = dict(doc, securityLabel=[{"coding": [{"system": b.LABELS, "code": "MASQUE_PS"}]}])
    assert me.put(f"DocumentReference/{second}", masked).status_code == 200
    other = b_app.as_ps(b.PS_OTHER)
    assert b_app.as_patient(pid).post("Consent", b.consent(pid, actor=b.PS_OTHER)).status_code == 201
    _within_a_second(lambda: _ids(other, pid), {first, third})
    _within_a_second(lambda: _ids(a.as_ps(b.PS_OTHER), pid), {first, third})   # A learns the Consent too

    # the author deletes a document through B: gone in A
    assert b_app.as_ps().delete(f"DocumentReference/{first}").status_code == 204
    _within_a_second(lambda: _ids(a.as_ps(), pid), {second, third})

    # the patient revokes the médecin's authorization through B: A answers as for nothing
    consents = b_app.as_patient(pid).get(f"Consent?patient={pid}").json["entry"]
    mine = [e["resource"] for e in consents
            if b.PS_DR in str(e["resource"]["provision"].get("actor")) and e["resource"]["status"] == "active"]
    for consent in mine:
        assert b_app.as_patient(pid).put(f"Consent/{consent['id']}", dict(consent, status="inactive")).status_code == 200
    _within_a_second(lambda: _ids(a.as_ps(), pid), set())


def test_a_read_by_id_of_a_cached_dmp_comes_from_memory_and_follows_changes(two_apps, idp):
    """Once a search holds the DMP, ``DocumentReference/{id}`` is answered from the cache (no
    query); a mask and a deletion made in the other process show within a second."""
    a, b_app = Api(two_apps[0], idp), Api(two_apps[1], idp)
    pid = a.as_ps().create(b.patient())["id"]
    doc = a.as_ps().create(b.docref(pid))["id"]
    assert b_app.as_patient(pid).post("Consent", b.consent(pid, actor=b.PS_OTHER)).status_code == 201
    cache_a = services(two_apps[0]).storage.doc_cache
    other = a.as_ps(b.PS_OTHER)
    assert cache_a.read("DocumentReference", doc) is None        # not loaded: never loads for a read

    def read_from_memory():
        _ids(other, pid)                 # a search loads the DMP (again, after the writes' changes)
        hits = cache_a.hits
        return other.get(f"DocumentReference/{doc}").status_code, cache_a.hits > hits
    _within_a_second(read_from_memory, (200, True))
    me = b_app.as_patient(pid)
    masked = dict(me.get(f"DocumentReference/{doc}").json,
                  securityLabel=[{"coding": [{"system": b.LABELS, "code": "MASQUE_PS"}]}])
    assert me.put(f"DocumentReference/{doc}", masked).status_code == 200
    _within_a_second(lambda: other.get(f"DocumentReference/{doc}").status_code, 404)
    assert b_app.as_ps().delete(f"DocumentReference/{doc}").status_code == 204
    _within_a_second(lambda: a.as_ps().get(f"DocumentReference/{doc}").status_code, 410)


def _live_storage(app):
    """The app's storage once its change stream runs (the document cache serves only then)."""
    storage = services(app).storage
    deadline = time.monotonic() + 10
    while not storage.doc_cache.live:
        assert time.monotonic() < deadline, "change stream not established"
        time.sleep(0.02)
    return storage


def test_remembered_answers_follow_every_change_at_once(app, idp):
    """A listing remembers its answers by query and the decision its verdicts on documents (issue
    22, second cut): the same search again tests no document, and every change the decision
    depends on shows at once in the process that made it, in searches and reads by id: a mask and its removal (new versions of a document), the médecin traitant named and
    no longer named (the DMP's context), break-glass (the purpose), a withdrawn authorization,
    a block."""
    api = Api(app, idp)
    storage = _live_storage(app)
    dr = api.as_ps()
    pat = dr.create(b.patient())
    pid = pat["id"]
    me = api.as_patient(pid)
    first, second = dr.create(b.docref(pid))["id"], dr.create(b.docref(pid, b.LAB))["id"]
    for ps in (b.PS_OTHER, b.PS_PHARMA):
        assert me.post("Consent", b.consent(pid, actor=ps)).status_code == 201
    other, pharma = api.as_ps(b.PS_OTHER), api.as_ps(b.PS_PHARMA, profession="21")
    other_btg = api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="arrêt cardiaque")

    def seen(caller) -> set[str]:
        """The caller's matches right after a change (the writer dropped the DMP at once), then
        the same answered from the listing that remembers it (once the change stream delivered
        the change: it drops the DMP once more)."""
        def answer() -> set[str]:       # a hidden document is not counted either
            bundle = caller.get(f"DocumentReference?patient={pid}").json
            assert bundle["total"] == len(bundle.get("entry") or []), bundle
            return {e["resource"]["id"] for e in bundle.get("entry") or []}
        ids = answer()

        def remembered():
            hits = storage.doc_cache.hits
            got = answer()
            listing = storage.doc_cache.cached(pid)
            return got, storage.doc_cache.hits > hits + 1 and listing is not None and len(listing.answers) > 0
        _within_a_second(remembered, (ids, True))
        # a read by id is judged by can_see alone (its verdicts remembered too): the same answer
        for _ in range(2):
            assert {rid for rid in (first, second)
                    if caller.get(f"DocumentReference/{rid}").status_code == 200} == ids
        return ids

    def relabel(rid: str, labels: list[str]) -> None:
        doc = me.get(f"DocumentReference/{rid}").json
        doc.pop("securityLabel", None)
        if labels:
            doc["securityLabel"] = [{"coding": [{"system": b.LABELS, "code": code}]} for code in labels]
        r = me.put(f"DocumentReference/{rid}", doc)
        assert r.status_code == 200, r.json

    def name_gp(ps: str | None) -> None:
        current = me.get(f"Patient/{pid}").json
        current.pop("generalPractitioner", None)
        if ps:
            current["generalPractitioner"] = [{"identifier": {"system": b.IDNATPS, "value": ps}}]
        assert me.put(f"Patient/{pid}", current).status_code == 200

    assert seen(other) == {first, second} and seen(pharma) == {second}     # a pharmacien: the lab result
    relabel(first, ["MASQUE_PS"])
    assert seen(other) == {second} and seen(dr) == {first, second}         # the author sees what they wrote
    name_gp(b.PS_OTHER)
    assert seen(other) == {first, second}            # the médecin traitant sees the masked document
    assert seen(other_btg) == {second}               # ... not under break-glass
    name_gp(None)
    assert seen(other) == {second}
    relabel(first, [])
    assert seen(other) == {first, second}
    consents = me.get(f"Consent?patient={pid}").json["entry"]
    for entry in consents:
        if b.PS_PHARMA in str(entry["resource"]["provision"].get("actor")):
            assert me.put(f"Consent/{entry['resource']['id']}", dict(entry["resource"], status="inactive")).status_code == 200
    assert _ids(pharma, pid) == set()
    assert me.post("Consent", b.consent(pid, "deny", actor=b.PS_OTHER)).status_code == 201
    assert _ids(other, pid) == set()


def test_a_hot_records_reads_by_id_load_it_and_a_single_read_does_not(app, idp):
    api = Api(app, idp)
    storage = _live_storage(app)
    cold, hot = (api.as_ps().create(b.patient())["id"] for _ in range(2))
    cold_doc = api.as_ps().create(b.docref(cold))["id"]
    hot_docs = [api.as_ps().create(b.docref(hot))["id"] for _ in range(2)]
    cache = storage.doc_cache
    _within_a_second(lambda: cache.live, True)
    time.sleep(0.3)          # the deposits' own changes delivered (they would drop a fresh load)
    assert api.as_ps().get(f"DocumentReference/{cold_doc}").status_code == 200
    assert cache.cached(cold) is None                          # one read of a record: nothing loaded
    for doc in hot_docs:
        assert api.as_ps().get(f"DocumentReference/{doc}").status_code == 200
    assert cache.cached(hot) is not None                       # two within ten seconds: loaded
    hits = cache.hits
    assert api.as_ps().get(f"DocumentReference/{hot_docs[0]}").json["id"] == hot_docs[0]
    assert cache.hits > hits                                   # and read from memory


def test_a_load_racing_a_change_is_not_kept(app, idp):
    """The change arrives while the DMP's documents are being read: the (stale) load answers that
    one request but is not stored; the next search reads the database again."""
    api = Api(app, idp)
    storage = _live_storage(app)
    pid = api.as_ps().create(b.patient())["id"]
    api.as_ps().create(b.docref(pid))
    real = storage.doc_cache

    class Racing(DocumentCache):
        def _load(self, pids):
            loaded = super()._load(pids)
            for p in pids:
                real.invalidate(p)        # what the change stream does when a write lands now
                self.invalidate(p)
            return loaded

    racing = Racing(storage)
    racing._set_live(True)
    storage.doc_cache = racing
    try:
        assert len(_ids(api.as_ps(), pid)) == 1
        assert racing.misses == 1 and pid not in racing._entries
        assert len(_ids(api.as_ps(), pid)) == 1
        assert racing.misses == 2 and racing.hits == 0
    finally:
        storage.doc_cache = real


def test_nothing_is_served_while_the_stream_is_down(app, idp):
    api = Api(app, idp)
    storage = _live_storage(app)
    pid = api.as_ps().create(b.patient())["id"]
    doc = api.as_ps().create(b.docref(pid))["id"]
    assert _ids(api.as_ps(), pid) == {doc}
    cache = storage.doc_cache
    cache._set_live(False)           # as when the stream is lost: everything dropped, nothing served
    try:
        before = (cache.hits, cache.misses)
        assert _ids(api.as_ps(), pid) == {doc}
        assert (cache.hits, cache.misses) == before and not cache._entries
    finally:
        cache._set_live(True)


def test_only_filters_decided_exactly_are_evaluated_in_memory():
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    guard = {"pid": "p", "del": False, "$or": [
        {"a.authors": "8100"},
        {"a.types.0": {"$exists": True}, "a.types": {"$not": {"$elemMatch": {"$nin": ["x"]}}}, "a.masked": False}]}
    assert exact(guard)
    assert exact({"pid": "p", "s.patient.r": "Patient/p", "a.labels": {"$nin": ["A", "B"]}})
    assert exact({"pid": "p", "$and": [{"o.date~d": {"$lte": at}},
                                       {"$or": [{"o.date~d": {"$lt": at}}, {"o.date~d": at, "_id": {"$gt": "k"}}]}]})
    # a query on the sub-documents of an array (a token's system|code), none of several clauses
    assert exact({"pid": "p", "s.type": {"$elemMatch": {"s": "x", "c": "y"}}})
    assert exact({"pid": "p", "$nor": [{"a": 1}, {"s.type.c": {"$in": ["y"]}}]})
    for refused in ({"pid": "p", "s.type": {"$elemMatch": {"s": "x", "c": {"k": 1}}}},   # a document inside
                    {"pid": "p", "s.x": None},                                       # null: also missing
                    {"pid": "p", "s.x": {"c": "y"}},                                 # whole-document equality
                    {"pid": "p", "s.x.n": {"$regex": "^a", "$options": "i"}},            # options
                    {"pid": "p", "$nor": [{"a": None}]},
                    {"pid": "p", "s.x": {"$in": [None]}},
                    {"pid": "p", "o.d": {"$lt": datetime(2026, 1, 1)}}):              # naive date
        assert not exact(refused), refused
    # comparisons only between values of one type, as MongoDB's
    doc = {"o": {"d": at, "s": "b"}, "_id": "k"}
    assert matches({"o.d": {"$gte": at}, "o.s": {"$gt": "a"}}, doc)
    assert not matches({"o.s": {"$lt": at}}, doc)
    # a pattern as search/query.py writes them (re.escape), read as MongoDB's PCRE reads it
    assert exact({"pid": "p", "s.x.n": {"$regex": "^a"}})
    assert matches({"o.s": {"$regex": "^b"}}, doc) and not matches({"o.s": {"$regex": "^a"}}, doc)
    assert not matches({"o.s": {"$regex": r"(?:^|\s)b"}}, {"o": {"s": "a\u00a0b"}})   # \s: ASCII, as PCRE's
    with pytest.raises(Unsupported):
        matches({"o.s": {"$regex": "b", "$options": "i"}}, doc)


def test_concurrent_misses_load_a_dmp_once(app, idp):
    """Threads that miss the same DMP together wait for one load (one read of its documents)."""
    import threading
    api = Api(app, idp)
    storage = services(app).storage
    pid = api.as_ps().create(b.patient())["id"]
    doc = api.as_ps().create(b.docref(pid))["id"]
    calls = []

    class Counting(DocumentCache):
        def _load(self, pids):
            calls.append(list(pids))
            time.sleep(0.2)          # a large DMP: the others arrive while it is read
            return super()._load(pids)

    cache = Counting(storage)
    cache._set_live(True)
    results, start = [], threading.Barrier(8)

    def search():
        start.wait()
        results.append(cache.find("DocumentReference", {"pid": pid, "del": False}, [("_id", 1)], 0))

    threads = [threading.Thread(target=search) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [[pid]]
    assert [[d["_id"] for d in r] for r in results] == [[doc]] * 8


def test_the_cache_can_be_turned_off(config, build_app, idp):
    """``FHIR_DMP_DOCUMENT_CACHE_DOCS=0``: no document cache, searches ask the database."""
    from fhir_dmp.runtime.config import Config, ConfigError
    assert Config.from_env({"FHIR_DMP_DOCUMENT_CACHE_DOCS": "0"}).document_cache_docs == 0
    assert Config.from_env({}).document_cache_docs == 10_000
    with pytest.raises(ConfigError):
        Config.from_env({"FHIR_DMP_DOCUMENT_CACHE_DOCS": "-1"})
    app = build_app(config.with_(document_cache_docs=0))
    assert services(app).storage.doc_cache is None
    api = Api(app, idp)
    pid = api.as_ps().create(b.patient())["id"]
    doc = api.as_ps().create(b.docref(pid))["id"]
    assert _ids(api.as_ps(), pid) == {doc}
