"""A DMP's documents, cached per process: searches inside one DMP answered from memory.

Why: SecantusDB, the embedded database, answers ``DocumentReference?patient=`` by fetching,
decoding, matching (in Python) and sorting every document of the DMP before it applies the
limit, once per branch of the access guard's ``$or``, whatever the page (bench/README.md,
"The per-process document cache").

What: per process, the current (not deleted) stored documents of the DMPs searched lately,
whole (``res``, ``s``, ``o``, ``a``), each DMP's list sorted once per sort asked. A query is
answered from it (:meth:`DocumentCache.find`, :meth:`DocumentCache.count`) only when

* it is on the cached type and pinned to one DMP (``pid`` equality at its top level: a search
  naming one patient, the guard of issue 9 included), outside any transaction; and
* every condition is one :func:`fhir_dmp.storage.filters.exact` accepts (evaluated exactly as MongoDB
  would: the access guard over the facets ``a``, the patient/subject reference, the keyset of
  the next pages...), and the sort keys are of one type.

Anything else answers None and the caller asks the database. A read by id
(:meth:`DocumentCache.read`) is answered from a DMP cached now; the second read by id of one
DMP's documents that missed within ten seconds loads that DMP (:meth:`DocumentCache.missed`: a
hot record), a single one loads nothing. The access rules are not cached
here: the guard is a filter built per request from the decision context and evaluated on these
documents, and the repository still runs ``can_see`` on every document it returns. A listing
remembers its answers by query (:class:`Listing`): the same query on the same documents, the
guard's terms included (the caller's idNatPs, the profession's allowed types, MASQUE_PS or not),
has the same matches; a new query (another caller, a consent that changed the guard) is
evaluated, and a change of a document replaces the listing with its answers.

Correct as the decision context cache is (``security/context_cache.py``, :class:`PidCache`):
its change stream also watches the cached collection and drops a DMP's entry on any change of
one of its documents (a deposit, a mask, a deletion, by this or another process: within the
stream's poll, well inside one second); nothing is served while the stream is down; a load that
raced a change is not stored; a write by this process drops its DMPs at once after its commit
(``GuardedRepository._forget_contexts``). Entries are bounded by their number of documents
(``max_docs``, least recently used out first; a DMP larger than that is never cached).
Documents are handed out as copies of the stored document and of its resource's top level.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..security.context_cache import PidCache
from ..storage import sort_docs
from ..storage.filters import Memo, Unsupported, compiled, exact, query_key

CACHED_TYPE = "DocumentReference"
#: two reads by id of one DMP's documents from the database within this many seconds: a hot record
HOT_WINDOW_S = 10.0
#: DMPs whose last such read is remembered
HOT_PIDS = 1024
#: the answers a listing remembers (queries and sorts: each caller's guard, each page's keyset)
LISTING_ANSWERS = 32
#: query key -> does :func:`exact` accept the query (the same guards come back on every search)
_EXACT = Memo(1024)


class Listing:
    """The current documents of one DMP, their orders already computed (by sort spec) and the
    answers already computed (by query and sort: every match, in order; by query: the count).
    A listing never changes: a change of the DMP's documents replaces it."""

    __slots__ = ("docs", "orders", "answers", "_by_id")

    def __init__(self, docs: list[dict]):
        self.docs = docs
        self.orders: dict[tuple, list] = {}
        self.answers = Memo(LISTING_ANSWERS)
        self._by_id: dict[str, dict] | None = None

    def by_id(self, rid: str) -> dict | None:
        if self._by_id is None:      # two threads may both build it: the same dict
            self._by_id = {d["_id"]: d for d in self.docs}
        return self._by_id.get(rid)

    def ordered(self, sort: list) -> list[dict]:
        key = tuple(tuple(s) for s in sort)
        out = self.orders.get(key)
        if out is None:       # two threads may both sort: same result, either is kept
            out = self.orders[key] = sort_docs(self.docs, sort)
        return out


class DocumentCache(PidCache):
    """pid -> :class:`Listing` of its ``DocumentReference`` documents (see module docstring)."""

    def __init__(self, storage, *, max_docs: int = 10_000, max_age: float = 300.0):
        super().__init__(max_weight=max_docs, max_age=max_age)
        self.storage = storage
        self.rtype = CACHED_TYPE
        self._pid_of: dict[str, str] = {}     # document id -> its DMP, for the DMPs loaded (a hint)
        self._misses: OrderedDict[str, float] = OrderedDict()    # pid -> its last read by id from the database
        self._misses_lock = threading.Lock()

    def _load(self, pids: list[str]) -> dict:
        by_pid: dict[str, list] = {pid: [] for pid in pids}
        for doc in self.storage.compartment_docs(self.rtype, pids):
            by_pid[doc["pid"]].append(doc)
        if len(self._pid_of) > 4 * self.max_weight:     # ids of DMPs long gone from the cache
            self._pid_of = {}
        self._pid_of.update((d["_id"], pid) for pid, docs in by_pid.items() for d in docs)
        return {pid: Listing(docs) for pid, docs in by_pid.items()}

    def _weight(self, listing: Listing) -> int:
        return max(1, len(listing.docs))

    def _listing(self, rtype: str, flt: dict) -> tuple[Listing, dict, str] | None:
        """The DMP's listing, ``flt`` less what all its documents satisfy, and that query's key."""
        pid = flt.get("pid")
        if rtype != self.rtype or not self.live or not isinstance(pid, str):
            return None
        rest = {k: v for k, v in flt.items() if not (k == "pid" or k == "del" and v is False)}
        key = query_key(rest)
        if not _EXACT.get(key, lambda: exact(rest)):
            return None
        return self.load([pid])[pid], rest, key

    def find(self, rtype: str, flt: dict, sort: list, limit: int) -> list[dict] | None:
        """The documents the database would return for ``find(flt).sort(sort).limit(limit)``
        (``flt`` already excludes deleted documents), or None when this cache cannot say.
        Every match is remembered by the listing when the scan went through it (the next
        search of the same query, a guard included, tests no document)."""
        found = self._listing(rtype, flt)
        if found is None:
            return None
        listing, rest, key = found
        order = sort or [("_id", 1)]
        answer = (key, tuple(tuple(s) for s in order))
        out = listing.answers.peek(answer)
        if out is None:
            out = []
            try:
                test = compiled(rest, key)
                for doc in listing.ordered(order):
                    if test(doc):
                        out.append(doc)
                        if limit and len(out) > limit:     # more than asked: not every match
                            break
                else:
                    listing.answers.put(answer, out)
            except (Unsupported, TypeError):
                return None
        return [_copy(doc) for doc in (out[:limit] if limit else out)]

    def read(self, rtype: str, rid: str) -> dict | None:
        """The current document ``rid`` (not deleted) if its DMP is cached now, else None: the
        caller asks the database (a miss, a deleted or unknown id, a DMP not cached) and tells
        :meth:`missed`."""
        pid = self._pid_of.get(rid) if rtype == self.rtype else None
        listing = self.cached(pid) if pid is not None else None
        doc = listing.by_id(rid) if listing is not None else None
        return _copy(doc) if doc is not None else None

    def missed(self, rtype: str, pid: str | None) -> None:
        """A read by id of a document of DMP ``pid`` went to the database: the second such miss
        of one DMP within :data:`HOT_WINDOW_S` loads its documents (a hot record: the next reads
        come from memory); a single read of a record loads nothing."""
        if rtype != self.rtype or not isinstance(pid, str) or not self.live:
            return
        now = time.monotonic()
        with self._misses_lock:
            last = self._misses.pop(pid, None)
            self._misses[pid] = now
            while len(self._misses) > HOT_PIDS:
                self._misses.popitem(last=False)
        if last is not None and now - last < HOT_WINDOW_S:
            self.load([pid])

    def count(self, rtype: str, flt: dict) -> int | None:
        """``count_documents(flt)``, or None when this cache cannot say."""
        found = self._listing(rtype, flt)
        if found is None:
            return None
        listing, rest, key = found
        try:
            test = compiled(rest, key)
            return listing.answers.get((key, None), lambda: sum(1 for doc in listing.docs if test(doc)))
        except (Unsupported, TypeError):
            return None


def _copy(doc: dict) -> dict:
    res = doc.get("res")
    return {**doc, "res": dict(res) if isinstance(res, dict) else res}
