"""The journal's unsealed pages, and the reads of the journal that see through them.

``AuditEvent_page``
    one document per append (a group commit of the journal, or a write's events in the write's
    transaction)::

        {_id, t: <time of append>, v: <changes by a destroy>,
         events: [{_id: event id, pid: patient or None, lu, res: packed canonical JSON, d: content digest}]}

    It is the only durable write of an append (audit/log.py): one insert, acknowledged before the
    answer. The sealer (audit/sealer.py) derives each event's entry from it (:func:`entries`: the
    common layout, with the search index ``s``/``o`` extracted there, off the request path), links
    the events into their chains and stores the entries in their chain's run (``runs.py``), deletes
    the page, in one transaction.

Reads (:class:`PageReads`): every read of the journal that answers a caller (by id, vread,
history, search, count; the review and privacy counts and windows) sees three sources: the
pages' events (unsealed), the runs' entries (sealed), and the ``AuditEvent`` documents that
previous versions wrote one per event. The pages are read FIRST, then the runs, and the two are
merged by ``_id``: an event sealed between the two reads is then seen twice (kept once), never
missed. Pages and runs are matched in memory with the storage filter language (``filters.py``)
on their entries (memoized: a page per ``v``, which a destroy's removal of events from it
changes; a run per ``(_id, u)``, never changed). A filter that language does not evaluate
exactly (:func:`~fhir_dmp.storage.filters.exact`; no search of the server writes one) is
refused with a :class:`~fhir_dmp.storage.errors.StorageUnavailable` (503) and logged, never
answered with a silent miss.
"""
from __future__ import annotations

import logging
from typing import Callable

import bson
from pymongo.errors import PyMongoError

from .. import search
from .core import CODECS, JOURNAL_PAGES, sort_docs, unpack
from .errors import StorageUnavailable
from .filters import Unsupported, compile_query, exact
from .runs import RunReads

log = logging.getLogger(__name__)


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


class PageReads(RunReads):
    """The journal as its reads see it: the unsealed pages' entries, the runs' (``runs.py``) and
    the ``AuditEvent`` documents of the previous versions, merged (module docstring)."""

    _page_memo: dict = {}     # page id -> (v, entries); replaced, never changed in place

    def _unsealed(self) -> list[list[dict]]:
        """The memoized entries of every page now stored, page by page (not to be changed: see
        :meth:`unsealed_entries`): the page ids first, then the pages not memoized yet. A page
        sealed between the two reads is skipped (its entries are in a run by then, and the runs
        are read after this). Within a :meth:`journal_scope`, read once: the state the scope's
        lookups of the runs, read after it, complete."""
        return self._scoped(("pages",), self._read_unsealed)

    def _read_unsealed(self) -> list[list[dict]]:
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

    def journal_entry(self, eid: str) -> dict | None:
        """The entry ``eid`` (a copy) from its page or its run; None when neither holds it (an
        entry of a previous version is an ``AuditEvent`` document: the caller reads it)."""
        return next((dict(d) for docs in self._unsealed() for d in docs if d["_id"] == eid), None) \
            or self.sealed_entry(eid)

    def _matching(self, flt: dict, sort: list | None = None, limit: int = 0) -> list[dict]:
        """The entries of pages and runs matching ``flt`` (as memoized: not to be changed; with
        ``sort`` and ``limit``, at least the first ``limit`` of the runs'), each once: the pages
        first, then the runs (an event sealed between the two reads is in one or the other, maybe
        both)."""
        try:
            if not exact(flt):
                raise Unsupported("not evaluated in memory")
            test = compile_query(flt)
        except Unsupported:
            log.error("a journal filter the storage filter language does not evaluate: %s", sorted(flt))
            raise StorageUnavailable(PyMongoError("this search of the journal cannot be answered")) from None
        mine = {d["_id"]: d for docs in self._unsealed() for d in docs if test(d)}
        for d in self.sealed_matching(test, flt, sort, limit):
            mine.setdefault(d["_id"], d)
        return list(mine.values())

    def journal_through(self, flt: dict, sort: list, limit: int, query: Callable[[], list[dict]]) -> list[dict]:
        """``query()`` (the previous versions' ``AuditEvent`` documents matching ``flt``, in
        ``sort`` order, at most ``limit``) merged with the pages' and runs' entries matching
        ``flt``: same order and limit, copies of the memoized entries."""
        mine = self._matching(flt, sort, limit)
        docs = query()
        if not mine:
            return docs
        merged = {d["_id"]: d for d in mine}
        merged.update((d["_id"], d) for d in docs)
        try:
            out = sort_docs(merged.values(), sort or [("_id", 1)])
        except TypeError:       # sort keys of mixed types: never written by this server
            log.error("journal entries whose sort keys are of mixed types: %s", sort)
            raise StorageUnavailable(PyMongoError("this search of the journal cannot be ordered")) from None
        return [dict(d) for d in (out[:limit] if limit else out)]

    def journal_count(self, flt: dict, count: Callable[[], int]) -> int:
        """``count()`` (the previous versions' ``AuditEvent`` documents matching ``flt``) plus the
        pages' and runs' entries matching ``flt`` (never among those documents)."""
        return count() + len(self._matching(flt))
