"""The journal's unsealed pages, and the reads of the journal that see through them.

``AuditEvent_page``
    one document per append (a group commit of the journal, or a write's events in the write's
    transaction)::

        {_id, t: <time of append>, v: <changes by a destroy>,
         events: [{_id: event id, pid: patient or None, lu, res: packed canonical JSON, d: content digest}]}

    It is the only durable write of an append (audit/log.py): one insert, acknowledged before the
    answer. The sealer (audit/sealer.py) derives each event's ``AuditEvent`` entry from it
    (:func:`entries`: the common layout, with the search index ``s``/``o`` extracted there, off the
    request path), links the events into their chains and deletes the page, in one transaction.

Read-through (:class:`PageReads`): every read of the ``AuditEvent`` collection that answers a
caller (by id, vread, history, search, count; the review and privacy counts and windows) also
sees the events of the pages, so nothing answered is missing from a search. The pages are read
FIRST, then the collection, and the two are merged by ``_id``: an event sealed between the two
reads is then seen twice (kept once), never missed. The pages' events are matched in memory
with the storage filter language (``filters.py``) on their derived entries (memoized per page:
a page changes only when a destroy removes events from it, which counts in ``v``). A filter that
language does not evaluate exactly (:func:`~fhir_dmp.storage.filters.exact`) waits, bounded by
``StoreCore.deadline``, until the pages seen are sealed and then asks the collection alone; past
the bound a :class:`~fhir_dmp.storage.errors.StorageUnavailable` (503), never a silent miss.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import bson

from .. import search
from .core import CODECS, JOURNAL, JOURNAL_PAGES, StoreCore, sort_docs, unpack
from .errors import StorageUnavailable
from .filters import compile_query, exact

log = logging.getLogger(__name__)

#: how often a read whose filter is not evaluated in memory looks whether the pages it saw are sealed
SEALED_POLL_S = 0.05


def search_index(res: dict) -> tuple[dict, dict]:
    """``s``/``o`` of an event (:func:`fhir_dmp.search.extract`); ``{}`` if extraction fails."""
    try:
        return search.extract("AuditEvent", res)
    except Exception:  # an indexing bug must not lose the journal entry
        log.exception("search index extraction failed for AuditEvent/%s", res.get("id"))
        return {}, {}


def entries(page: dict) -> list[dict]:
    """The ``AuditEvent`` entries of a page's events, as the sealer inserts them: the common
    layout ``_id, pid, vid=1, lu, del=False, res (packed), s, o``."""
    out = []
    for e in page["events"]:
        s, o = search_index(unpack(e["res"]))
        out.append({"_id": e["_id"], "pid": e.get("pid"), "vid": 1, "lu": e["lu"], "del": False, "res": e["res"],
                    "s": s, "o": o})
    return out


def stored_entries(page: dict) -> list[dict]:
    """:func:`entries` exactly as the collection gives them back (dates at the database's
    millisecond, through BSON), so that an entry read from its page and the same entry read after
    sealing compare, sort and page alike (the read-through's; the sealer's insert needs no round
    trip: the database stores the same)."""
    return [bson.decode(bson.encode(doc, codec_options=CODECS), codec_options=CODECS) for doc in entries(page)]


class PageReads(StoreCore):
    """The unsealed pages as entries, and the merge of a journal read with them (module docstring)."""

    _page_memo: dict = {}     # page id -> (v, entries); replaced, never changed in place

    def _unsealed(self) -> list[list[dict]]:
        """The memoized entries of every page now stored, page by page (not to be changed: see
        :meth:`unsealed_entries`): the page ids first, then the pages not memoized yet. A page
        sealed between the two reads is skipped (its entries are in the collection by then, and the
        collection is read after this)."""
        listing = list(self.db[JOURNAL_PAGES].find({}, {"v": 1}))
        memo = self._page_memo
        want = [p["_id"] for p in listing if p["_id"] not in memo or memo[p["_id"]][0] != p.get("v")]
        fresh = {}
        if want:
            fresh = {p["_id"]: (p.get("v"), stored_entries(p))
                     for p in self.db[JOURNAL_PAGES].find({"_id": {"$in": want}})}
        keep = {}
        for p in listing:
            got = fresh.get(p["_id"]) or memo.get(p["_id"])
            if got is not None and (p["_id"] in fresh or got[0] == p.get("v")):
                keep[p["_id"]] = got
        self._page_memo = keep
        return [docs for _, docs in keep.values()]

    def unsealed_entries(self) -> list[dict]:
        """The entries of every page now stored (copies: :meth:`_unsealed`)."""
        return [dict(d) for docs in self._unsealed() for d in docs]

    def unsealed_entry(self, eid: str) -> dict | None:
        """The unsealed entry ``eid`` (a copy), None when no page holds it: only that one is copied."""
        return next((dict(d) for docs in self._unsealed() for d in docs if d["_id"] == eid), None)

    def _matching(self, flt: dict) -> list[dict] | None:
        """The unsealed entries matching ``flt`` (copies of those only); None once the pages seen
        are sealed (a filter not evaluated in memory: the collection alone then answers)."""
        unsealed = [d for docs in self._unsealed() for d in docs]
        if exact(flt):
            test = compile_query(flt)
            return [dict(d) for d in unsealed if test(d)]
        self._await_sealed({d["_id"] for d in unsealed})
        return None

    def _await_sealed(self, ids: set[str]) -> None:
        """Wait, within ``deadline``, until none of the events ``ids`` is in a page any more."""
        end = time.monotonic() + self.wait
        while ids and self.db[JOURNAL_PAGES].find_one({"events._id": {"$in": sorted(ids)}}, {"_id": 1}):
            if time.monotonic() > end:
                raise StorageUnavailable("journal pages not sealed in time for this search")
            time.sleep(SEALED_POLL_S)

    def journal_through(self, flt: dict, sort: list, limit: int, query: Callable[[], list[dict]]) -> list[dict]:
        """``query()`` (the collection's documents matching ``flt``, in ``sort`` order, at most
        ``limit``) merged with the unsealed entries matching ``flt``: same order and limit."""
        mine = self._matching(flt)
        docs = query()
        if not mine:
            return docs
        merged = {d["_id"]: d for d in mine}
        merged.update((d["_id"], d) for d in docs)
        try:
            out = sort_docs(merged.values(), sort or [("_id", 1)])
        except TypeError:       # sort keys of mixed types: the database orders them, once sealed
            self._await_sealed(set(merged))
            return query()
        return out[:limit] if limit else out

    def journal_count(self, flt: dict, count: Callable[[], int]) -> int:
        """``count()`` (the collection's documents matching ``flt``) plus the unsealed entries
        matching ``flt`` that the collection did not hold yet."""
        mine = self._matching(flt)
        n = count()
        if mine:
            ids = [d["_id"] for d in mine]
            n += len(ids) - self.db[JOURNAL].count_documents({"_id": {"$in": ids}})
        return n
