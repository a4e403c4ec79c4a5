"""The journal's sealed entries, kept in their chain's runs (MongoDB's bucket pattern).

The sealer (audit/sealer.py) writes, per sealing pass and chain, ONE run document in
``AuditEvent_link`` (or a few consecutive ones, each at most :data:`RUN_MAX_BYTES` of entries)
holding the links AND the entries they seal, and beside it, in the same transaction, its metadata
in ``AuditEvent_run_meta`` (:func:`run_documents`)::

    run:  {_id: "<chain>:<first>", pid: chain, first, last, prev, links: [[event id, hash], ...],
           u: <random, unique per run>, e: [entry, ...]  (the common layout: _id, pid, vid=1, lu, del,
           res packed, x: its search index s, o packed; e[i] is the event of links[i])}
    meta: {_id: the run's, pid, u, n: entries, size: their bytes (BSON),
           ids: [event id, ...], ke: [s.entity.r ...], ka: [s.agent.iv ...]  (what the reads look up),
           lo, hi: first and last ``lu``, b: {"lu" | "o:<key>": [min, max]}  (bounds of the dates)}

instead of one ``AuditEvent`` document per event: a hot DMP read 500 times between two passes
costs the database one document and a few index entries, not 500 documents with four indexes each
(bench/README.md, "The journal in runs"). It is the bucket pattern MongoDB advises for event
data, and its time-series collections' layout: bucketed by the meta field (here the chain, i.e.
the DMP: the shard key) and time (https://www.mongodb.com/docs/manual/core/timeseries/timeseries-bucketing/).
The metadata has a document of its own because SecantusDB reads a document whole to project
some of its fields: a lookup answered from the runs themselves read MiBs of entries to learn
their bounds (bench/README.md, "Issue 22: the journal's run metadata").

Reads (:class:`RunReads`): a filter is answered by the runs whose metadata its indexed equality
can name (an event's ``_id`` -> ``ids``, the DMP ``pid`` -> the chain, the entity ``s.entity.r``
-> ``ke``, the professional ``s.agent.iv`` -> ``ka``; otherwise every run), pruned by their date
bounds; only the runs kept are read, by ``_id``, and their entries matched in memory with the
storage filter language (``filters.py``). A sorted, limited read goes through the runs in the
order of their bounds on the first sort key and stops once no run left can hold an entry before
its last one, so a page of a long journal reads a few runs, not all of them. Runs are never
changed once written (a destroy deletes them and their metadata): their entries are memoized per
process by ``(_id, u)``, within :data:`MEMO_ENTRIES`. Within :meth:`RunReads.journal_scope` (a
search's page and its count) each lookup of the metadata is read once.

An entry's search index (``s``, ``o``: some 70 BSON elements) is stored as ONE binary value ``x``
(:func:`packed_entry`), as its resource is (``core.pack``): the database never looks inside an
entry (the runs are found by their metadata), and SecantusDB pays for every element of every
insert, of its oplog's change-stream reads and of every find (bench/README.md, "Issue 22: the
runs' entries packed"); the reads unpack it once per run (:func:`unpacked_entry`, then memoized).
Runs written before carry ``s``/``o`` as they are.

Runs written before this version have either no ``e`` (their entries are ``AuditEvent``
documents, which the reads still ask: ``pages.py``) or their metadata inside them (no metadata
document): those are split once, when the journal's indexes are ensured at start
(``journal.py``, :func:`split_run`).
"""
from __future__ import annotations

import contextvars
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from datetime import datetime

import bson

from ..audit.chain import SYSTEM_CHAIN
from .core import CODECS, JOURNAL_LINKS, JOURNAL_RUN_META, StoreCore, sort_value
from .filters import values_at

#: a chain's entries of one pass go into runs of at most this many bytes of entries (BSON), far
#: below MongoDB's 16 MB document limit (a pass of 500 searches, each naming 50 documents, of one DMP)
RUN_MAX_BYTES = 4 * 1024 * 1024
#: decoded entries kept per process (least recently used runs dropped first)
MEMO_ENTRIES = 5_000
#: runs decoded at a time by a sorted, limited read before it looks whether it may stop
STREAM_STEP = 4

#: runs per batch of a scan of the window (:meth:`RunReads.sealed_in_window`)
WINDOW_BATCH = 64

#: an entry's search index (``s``, ``o``) packed in a run: one BSON binary (module docstring)
PACKED = "x"

#: filter fields answered from a run's index: the field of the run's metadata holding their values
_LOOKUPS = (("_id", "ids"), ("pid", "pid"), ("s.entity.r", "ke"), ("s.agent.iv", "ka"))
#: every run that holds entries (each has its metadata)
ALL_RUNS: dict = {}
#: the fields of a run's metadata that the run itself does not keep (``u`` is in both: a run read
#: by ``_id`` tells whether it is still the one its metadata named)
META_ONLY = ("ids", "ke", "ka", "lo", "hi", "b")

#: the journal's state read by the current search, shared by its page and its count
#: (:meth:`RunReads.journal_scope`)
_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("journal_scope", default=None)


def run_documents(run: dict, entries: list[dict], size: int | None = None) -> tuple[dict, dict | None]:
    """The stored run (module docstring) of ``run`` (``{pid, first, prev, links}``) sealing
    ``entries`` (in the order of its links, ``size`` bytes of BSON when the caller knows it), and
    its metadata document (None for a run of no entries: the previous version's queue, whose
    entries are ``AuditEvent`` documents)."""
    doc = {"_id": f"{run['pid']}:{run['first']}", "last": run["first"] + len(run["links"]) - 1, **run}
    if not entries:
        return doc, None
    bounds: dict[str, list] = {}
    for e in entries:
        for key, value in (("lu", e["lu"]), *((f"o:{k}", v) for k, v in (e.get("o") or {}).items())):
            if not isinstance(value, datetime):
                continue
            got = bounds.get(key)
            if got is None:
                bounds[key] = [value, value]
            else:
                got[0], got[1] = min(got[0], value), max(got[1], value)
    lo, hi = bounds["lu"]            # every entry has its lu: queryable beside the other bounds
    run, meta = split_run({**doc, "u": uuid.uuid4().hex, "e": [packed_entry(e) for e in entries],
                           "ids": [e["_id"] for e in entries],
                           "ke": _union(entries, ("s", "entity", "r")), "ka": _union(entries, ("s", "agent", "iv")),
                           "lo": lo, "hi": hi, "b": bounds})
    return run, {**meta, "size": size if size is not None else sum(map(stored_size, entries))}


def split_run(whole: dict) -> tuple[dict, dict]:
    """A run holding its metadata (as the previous version wrote them) -> the run as stored now
    and its metadata document (without ``size`` when the caller does not know it)."""
    meta = {"_id": whole["_id"], "pid": whole["pid"], "u": whole["u"], "n": len(whole["ids"]),
            **{k: whole[k] for k in META_ONLY if k in whole}}
    return {k: v for k, v in whole.items() if k not in META_ONLY}, meta


def packed_entry(entry: dict) -> dict:
    """``entry`` as a run stores it: its ``s`` and ``o`` in one BSON binary :data:`PACKED`."""
    stored = {k: v for k, v in entry.items() if k not in ("s", "o")}
    stored[PACKED] = bson.encode({"s": entry.get("s") or {}, "o": entry.get("o") or {}}, codec_options=CODECS)
    return stored


def unpacked_entry(stored: dict) -> dict:
    """The entry (the common layout, ``s`` and ``o`` as documents) of a run's stored entry,
    packed (:func:`packed_entry`) or written before it was."""
    if PACKED not in stored:
        return stored
    entry = {k: v for k, v in stored.items() if k != PACKED}
    entry.update(bson.decode(stored[PACKED], codec_options=CODECS))
    return entry


def stored_size(entry: dict) -> int:
    """The bytes ``entry`` takes in a run: its BSON, its search index as documents (packed as
    one binary, :func:`packed_entry`, it takes the same within a few bytes)."""
    return len(bson.encode(entry, codec_options=CODECS))


def _union(entries: list[dict], path: tuple) -> list:
    return sorted({v for e in entries for v in values_at(e, path) if isinstance(v, str)})


def _equal_values(cond) -> list | None:
    """The values an indexed equality accepts (``x`` or ``{"$in": [...]}``), None if it is not one."""
    if cond is None or isinstance(cond, str):
        return [cond]
    if isinstance(cond, dict) and list(cond) == ["$in"] and isinstance(cond["$in"], list) \
            and all(v is None or isinstance(v, str) for v in cond["$in"]):
        return list(cond["$in"])
    return None


def run_queries(flt: dict) -> list[dict]:
    """Queries whose union is the runs that may hold an entry matching ``flt``: the first indexed
    equality among its AND-ed conditions (:data:`_LOOKUPS`), or one per branch of an ``$or`` whose
    every branch has one (one query each: SecantusDB uses no index under a top-level operator);
    else every run that holds entries (``e``). Always a superset: the entries are matched
    afterwards."""
    found: dict[str, list] = {}
    ors: list = []

    def scan(q: dict) -> None:
        for key, cond in q.items():
            if key == "$and":
                for sub in cond:
                    scan(sub)
            elif key == "$or" and not ors:
                branches = [run_queries(b) for b in cond]
                if all(ALL_RUNS not in b for b in branches):
                    ors.extend(q for b in branches for q in b)
            else:
                for field, run_field in _LOOKUPS:
                    values = _equal_values(cond) if key == field else None
                    if values is not None and run_field == "pid":   # no patient: the system chain
                        found.setdefault(run_field, [v or SYSTEM_CHAIN for v in values])
                    elif values is not None and None not in values:  # (null: also "missing")
                        found.setdefault(run_field, values)
    scan(flt)
    for _, run_field in _LOOKUPS:
        if run_field in found:
            values = found[run_field]
            return [{run_field: values[0] if len(values) == 1 else {"$in": values}}]
    return ors or [ALL_RUNS]


def _bound_field(path: str) -> str | None:
    """The key of ``b`` bounding the values of a filter or sort ``path`` (``lu``, ``o.<key>``)."""
    if path == "lu":
        return "lu"
    if path.startswith("o.") and path.count(".") == 1:
        return "o:" + path[2:]
    return None


def admits(bounds: dict, flt: dict) -> bool:
    """Can a run with date ``bounds`` hold an entry matching ``flt``? False only when a date
    comparison on a bounded field (AND-ed, or in every branch of an ``$or``) excludes them all."""
    for key, cond in flt.items():
        if key == "$and":
            if not all(admits(bounds, q) for q in cond):
                return False
        elif key == "$or":
            if not any(admits(bounds, q) for q in cond):
                return False
        else:
            field = _bound_field(key)
            got = bounds.get(field) if field else None
            if got is not None and not _within(got, cond):
                return False
    return True


def _within(bound: list, cond) -> bool:
    lo, hi = bound
    if isinstance(cond, datetime):
        return lo <= cond <= hi
    if not isinstance(cond, dict):
        return True
    for op, arg in cond.items():
        if not isinstance(arg, datetime):
            continue
        if (op == "$lt" and not lo < arg) or (op == "$lte" and not lo <= arg) \
                or (op == "$gt" and not hi > arg) or (op == "$gte" and not hi >= arg):
            return False
    return True


class _Memo:
    """The decoded entries of runs, by ``(_id, u)``, least recently used dropped first past
    :data:`MEMO_ENTRIES` entries in all; one per process, shared by its threads."""

    def __init__(self):
        self.runs: OrderedDict = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            got = self.runs.get(key)
            if got is not None:
                self.runs.move_to_end(key)
            return got

    def put(self, key, entries: list) -> None:
        with self.lock:
            if key in self.runs:
                return
            self.runs[key] = entries
            self.size += len(entries)
            while self.size > MEMO_ENTRIES and len(self.runs) > 1:
                _, old = self.runs.popitem(last=False)
                self.size -= len(old)


class RunReads(StoreCore):
    """The sealed entries of the runs matching a filter (module docstring)."""

    _run_memo = _Memo()

    @contextmanager
    def journal_scope(self):
        """Within it (in this context: a request's thread), each lookup of the runs' metadata and
        the pages' listing (``pages.py``) is read once: a search's page and its count see one
        state of the journal and pay for it once. Nested, the outer scope holds."""
        if _SCOPE.get() is not None:
            yield
            return
        token = _SCOPE.set({})
        try:
            yield
        finally:
            _SCOPE.reset(token)

    def _scoped(self, key: tuple, read):
        """``read()``, or what it gave for ``key`` in this database earlier in the current
        :meth:`journal_scope` (not to be changed: callers copy)."""
        scope = _SCOPE.get()
        if scope is None:
            return read()
        key = (self.db.name, *key)
        if key not in scope:
            scope[key] = read()
        return scope[key]

    def _run_entries(self, metas: list[dict]) -> list[list[dict]]:
        """The entries of the runs ``metas`` (``{_id, u}``), in that order: memoized, the others
        read by ``_id`` in one query (a run deleted meanwhile, by a destroy, or another one in its
        place, gives none). Not to be changed: callers copy what they return."""
        got = {}
        for m in metas:
            entries = self._run_memo.get((m["_id"], m["u"]))
            if entries is not None:
                got[m["_id"], m["u"]] = entries
        want = [m["_id"] for m in metas if (m["_id"], m["u"]) not in got]
        if want:
            for doc in self.db[JOURNAL_LINKS].find({"_id": {"$in": want}}, {"e": 1, "u": 1}):
                key = (doc["_id"], doc.get("u"))
                got[key] = [unpacked_entry(d) for d in doc.get("e") or ()]
                self._run_memo.put(key, got[key])
        return [got.get((m["_id"], m["u"]), []) for m in metas]

    def _run_metas(self, flt: dict) -> list[dict]:
        """``{_id, u, b}`` of the runs that may hold an entry matching ``flt`` (indexed lookups of
        their metadata, then pruned by their bounds)."""
        metas = {}
        for query in run_queries(flt):
            found = self._scoped(("runs", repr(query)),
                                 lambda q=query: list(self.db[JOURNAL_RUN_META].find(q, {"u": 1, "b": 1})))
            for m in found:
                if admits(m.get("b") or {}, flt):
                    metas.setdefault(m["_id"], m)
        return list(metas.values())

    def sealed_matching(self, test, flt: dict, sort: list | None = None, limit: int = 0) -> list[dict]:
        """The sealed entries that ``test`` (``flt`` compiled) accepts, as memoized (not to be
        changed: the caller copies what it hands out). With ``sort``
        and ``limit``: at least the first ``limit`` of them in that order (maybe more), reading
        the runs in the order of their bounds on the first sort key and stopping when no run
        left can come before the ``limit``-th entry found."""
        metas = self._run_metas(flt)
        field, direction = (_bound_field(sort[0][0]), sort[0][1]) if sort and limit else (None, 0)
        if field is None or len(metas) <= STREAM_STEP:
            return [d for docs in self._run_entries(metas) for d in docs if test(d)]
        unbounded = [m for m in metas if field not in (m.get("b") or {})]
        bounded = [m for m in metas if field in (m.get("b") or {})]
        edge = 1 if direction < 0 else 0          # a descending read goes by each run's newest
        bounded.sort(key=lambda m: m["b"][field][edge], reverse=direction < 0)
        out = [d for docs in self._run_entries(unbounded) for d in docs if test(d)]
        path = sort[0][0]
        for i in range(0, len(bounded), STREAM_STEP):
            step = bounded[i:i + STREAM_STEP]
            out += [d for docs in self._run_entries(step) for d in docs if test(d)]
            keys = [k for k in (sort_value(d, path, direction) for d in out) if isinstance(k, datetime)]
            if len(keys) >= limit and i + STREAM_STEP < len(bounded):
                last = sorted(keys, reverse=direction < 0)[limit - 1]
                nxt = bounded[i + STREAM_STEP]["b"][field][edge]
                if nxt < last if direction < 0 else nxt > last:   # no run left holds one before the last
                    break
        return out

    def sealed_entry(self, eid: str) -> dict | None:
        """The sealed entry ``eid`` of a run (a copy), None when no run holds it."""
        metas = list(self.db[JOURNAL_RUN_META].find({"ids": eid}, {"u": 1}))
        return next((dict(d) for docs in self._run_entries(metas) for d in docs if d["_id"] == eid), None)

    def sealed_in_window(self, since: datetime | None, until: datetime):
        """``_id, pid, lu, res`` of the sealed entries of a DMP appended in ``[since, until)`` (runs
        by their metadata's ``lo``/``hi``), streamed. Each run is read once, with only those fields
        of its entries (not their search index) and not memoized: a scan of the whole journal would
        otherwise decode twice what it needs, hold the memo's :data:`MEMO_ENTRIES` entries while it
        runs and leave it full of runs no search asked for."""
        query = {"lo": {"$lt": until}, "pid": {"$ne": SYSTEM_CHAIN}, **({"hi": {"$gte": since}} if since else {})}
        fields = {"e._id": 1, "e.pid": 1, "e.lu": 1, "e.res": 1}
        ids = [m["_id"] for m in self.db[JOURNAL_RUN_META].find(query, {"_id": 1})]
        for i in range(0, len(ids), WINDOW_BATCH):
            for run in self.db[JOURNAL_LINKS].find({"_id": {"$in": ids[i:i + WINDOW_BATCH]}}, fields):
                for d in run.get("e") or ():
                    if d["pid"] is not None and (since is None or d["lu"] >= since) and d["lu"] < until:
                        yield d
