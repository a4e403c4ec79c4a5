"""The decision context of each DMP, cached in the process and invalidated by the database.

The decision (``decision/``) needs, per patient, the Patient (DMP state, médecin traitant)
and its active Consents. Loading them costs two queries per request; this module keeps
them per process and drops an entry as soon as the database says something in that
patient's compartment changed, in this process or any other (issue 13: a revocation, a
block, a mask or a closing takes effect everywhere within one second).

How it stays correct:

* one change stream per process (``Storage.watch_decision_inputs``, MongoDB change streams; SecantusDB runs as
  a one-node replica set) on every collection the decision reads (``storage.DECISION_INPUTS``: Patient,
  Consent, RelatedPerson, break-glass grants), with ``fullDocument: updateLookup``; each
  change invalidates the entry of the document's ``pid`` (Patient: its ``_id``), and a
  change whose patient is unknown (a physical delete) clears everything;
* nothing is served from the cache while the stream is not established: it is off at
  start, and a stream error clears the cache and turns it off until the stream is back;
* a load racing with a change cannot store a stale entry: every change bumps a generation,
  and a load stores its result only if no change of that patient (and no reset) happened
  since the generation it read before its queries (:meth:`PidCache.load`);
* writes read inside their transaction and never use the cache (``RequestAccess.session``).

Entries also expire after ``max_age`` seconds, a backstop only.

The mechanism (generations, live flag, one load per pid at a time) is :class:`PidCache`; the
same stream also invalidates the DMP document cache (``search/doc_cache.py``), a follower of
:class:`ContextCache` for the DocumentReference collection, and tells listeners of other
collections that something changed there (the issuer's key set as last seen by any process,
``auth.SharedKeys``: a key withdrawn anywhere is refused everywhere within one second).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from ..storage.errors import Outage, StorageClosed

log = logging.getLogger(__name__)

# after a batch (empty: the database woke the getMore for a write it then filtered out, the
# journal mostly; or not: a write it watches, e.g. each deposit's DocumentReference) wait this
# long before the next one: ~20 getMores/s per process instead of one per write, each reading
# every oplog entry written since the last, a bounded delay well inside the 1 s
# invalidation promise
POLL_PAUSE_S = 0.05
# a thread waits this long at most for another thread's load of the same pid (then loads itself)
LOAD_WAIT_S = 5.0


def load_contexts(storage, pids: list[str], session=None) -> dict[str, tuple]:
    """``pid -> (patient resource or None, known, [(id, vid, Consent)], stored Patient document)``
    in two queries (``Storage.patient_docs`` and ``Storage.active_consents``).

    ``patient`` is None when there is no such DMP (or it is deleted or destroyed); ``known``
    is True when it is stored and not destroyed (a deleted DMP still counts). The stored
    document (None if absent) is the current version as ``Storage.read`` returns it, without
    the search index fields: a Patient read is answered from it.
    """
    patients = storage.patient_docs(pids, session=session)
    consents: dict[str, list] = {}
    for d in storage.active_consents(pids, session=session):
        consents.setdefault(d["pid"], []).append((d["_id"], d["vid"], d["res"]))
    out = {}
    for pid in pids:
        doc = patients.get(pid)
        res = doc["res"] if doc and not doc.get("del") and not doc.get("destroyed") else None
        out[pid] = (res, bool(doc) and not doc.get("destroyed"), consents.get(pid, []), doc)
    return out


def _buffered(stream) -> bool:
    """True while the stream holds changes it has fetched and not yet returned (pymongo's command
    cursor buffer; the cursor is replaced on a resume), or where this pymongo keeps them elsewhere
    (then no pause after a change: the previous pace)."""
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    return data is None or len(data) > 0


class PidCache:
    """pid -> something loaded from the database, per process, dropped as soon as the database
    says that pid's data changed (see the module docstring: generations, live flag). Thread-safe.

    Subclasses define :meth:`_load` (``pids -> {pid: value}``, from the database) and may weigh
    entries (:meth:`_weight`): the least recently used go once the total passes ``max_weight``.
    """

    def __init__(self, *, max_weight: int = 20_000, max_age: float = 300.0):
        self.max_weight = max_weight
        self.max_age = max_age
        self._entries: OrderedDict[str, tuple[float, object, int]] = OrderedDict()
        self._weight_total = 0
        self._changed: OrderedDict[str, int] = OrderedDict()   # pid -> generation of its last change
        self._gen = 0
        self._floor = 0              # puts with an older token are refused (reset, pruned history)
        self._live = False
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}   # pid -> set when its load in flight ends
        self.hits = self.misses = 0

    def _load(self, pids: list[str]) -> dict:
        raise NotImplementedError

    def _weight(self, value) -> int:
        return 1

    # -- reads through the cache
    def load(self, pids: list[str]) -> dict:
        """Values of ``pids``: cached ones, the others loaded (:meth:`_load`) and cached.

        One load per pid at a time: a thread that finds another one loading the same pid waits
        for it (at most :data:`LOAD_WAIT_S`) and takes what it stored; if it stored nothing (a
        change raced it, or the value is too large to keep), the thread loads for itself."""
        out, todo, waits, mine = {}, [], {}, {}
        now = time.monotonic()
        with self._lock:
            live = self._live
            for pid in pids:
                hit = self._entries.get(pid) if live else None
                if hit is not None and now - hit[0] < self.max_age:
                    self._entries.move_to_end(pid)
                    out[pid] = hit[1]
                elif live and pid in self._loading:
                    waits[pid] = self._loading[pid]
                else:
                    todo.append(pid)
                    if live:
                        mine[pid] = self._loading[pid] = threading.Event()
            token = self._gen
            self.hits += len(out)
            self.misses += len(todo) + len(waits)
        try:
            if todo:
                self._load_into(out, todo, live, token, now)
        finally:
            if mine:
                with self._lock:
                    for pid, done in mine.items():
                        if self._loading.get(pid) is done:
                            del self._loading[pid]
                        done.set()
        if waits:
            for done in waits.values():
                done.wait(LOAD_WAIT_S)
            with self._lock:
                token = self._gen
                for pid in waits:
                    hit = self._entries.get(pid) if self._live else None
                    if hit is not None:
                        out[pid] = hit[1]
            rest = [pid for pid in waits if pid not in out]
            if rest:
                self._load_into(out, rest, live, token, time.monotonic())
        return out

    def _load_into(self, out: dict, pids: list[str], live: bool, token: int, now: float) -> None:
        """Load ``pids`` into ``out``, and keep them when the cache is live (:meth:`_put`)."""
        loaded = self._load(pids)
        out.update(loaded)
        if live:
            self._put(loaded, token, now)

    def _put(self, loaded: dict, token: int, now: float) -> None:
        with self._lock:
            if not self._live or token < self._floor:
                return
            for pid, value in loaded.items():
                if self._changed.get(pid, 0) > token:
                    continue   # changed while we were loading: the next request loads again
                weight = self._weight(value)
                if weight > self.max_weight:
                    continue   # larger than the whole cache: always read from the database
                self._drop(pid)
                self._entries[pid] = (now, value, weight)
                self._weight_total += weight
            while self._weight_total > self.max_weight:
                self._drop(next(iter(self._entries)))

    def _drop(self, pid: str) -> None:
        old = self._entries.pop(pid, None)
        if old is not None:
            self._weight_total -= old[2]

    # -- invalidation
    def invalidate(self, pid: str | None) -> None:
        """Forget one patient's entry (None: everything)."""
        with self._lock:
            self._gen += 1
            if pid is None:
                self._entries.clear()
                self._weight_total = 0
                self._changed.clear()
                self._floor = self._gen
                return
            self._drop(pid)
            self._changed[pid] = self._gen
            self._changed.move_to_end(pid)
            while len(self._changed) > 20_000:
                _, gen = self._changed.popitem(last=False)
                self._floor = max(self._floor, gen)

    def _set_live(self, live: bool) -> None:
        with self._lock:
            self._live = live
        self.invalidate(None)

    @property
    def live(self) -> bool:
        return self._live


class ContextCache(PidCache):
    """pid -> decision context (:func:`load_contexts`), and the process's one change stream.

    ``followers`` maps a collection outside :data:`storage.DECISION_INPUTS` to another
    :class:`PidCache` (e.g. the DMP document cache, ``search/doc_cache.py``): the same stream watches
    that collection and invalidates the follower's entry of each changed document's ``pid``.
    ``listeners`` maps another collection to a function of no argument, called in the stream's
    thread on each change there and each time the stream is (re)established (what changed
    while it was down); it reads what it needs itself.
    """

    def __init__(self, storage, *, max_entries: int = 20_000, max_age: float = 300.0,
                 followers: dict[str, PidCache] | None = None, listeners: dict | None = None):
        super().__init__(max_weight=max_entries, max_age=max_age)
        self.storage = storage
        self.followers = dict(followers or {})
        self.listeners = dict(listeners or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, pids: list[str]) -> dict:
        return load_contexts(self.storage, pids)

    def _set_live(self, live: bool) -> None:
        for follower in self.followers.values():
            follower._set_live(live)
        super()._set_live(live)

    # -- the change stream
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="context-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # Faults (CONTRACT.md "Faults, failover and backups"): on a resumable error (a dropped
        # connection, a primary stepping down) pymongo resumes the stream once from its resume
        # token, nothing missed, the caches kept. Any other loss (the resume failed, a resume
        # token the server no longer knows, ChangeStreamHistoryLost, an invalidate, a timeout)
        # is a gap: the caches are dropped and off, and the stream is opened afresh, short pauses
        # between tries (storage.errors.Outage), until it is back; only then is anything cached
        # again, so no decision is ever taken on what was cached before the gap.
        outage = Outage(log, "decision context change stream")
        while not self._stop.is_set():
            try:
                with self._open() as stream:
                    while not self._stop.is_set() and stream.alive:
                        change = stream.try_next()
                        outage.ok()      # a getMore went through: back (said once)
                        if change is not None:
                            self._apply(change)
                            if _buffered(stream):
                                continue
                        # no change, or the last one of a batch: pause before the next getMore
                        self._stop.wait(POLL_PAUSE_S)
                pause = outage.first   # closed by the server (an invalidate): a gap, reopen
            except StorageClosed:   # the client was closed: this process is going away
                self._set_live(False)
                return
            except Exception as exc:   # noqa: BLE001 — never serve from a cache nobody invalidates
                pause = outage.failed(exc)
            self._set_live(False)
            self._stop.wait(pause)

    def _open(self):
        """The stream, opened, the caches turned on and the listeners told (what changed while
        it was down), bounded by FHIR_DMP_DB_WAIT (``StoreCore.deadline``)."""
        with self.storage.deadline():
            stream = self.storage.watch_decision_inputs(also=(*self.followers, *self.listeners))
            try:
                self._set_live(True)
                for listener in self.listeners.values():
                    listener()
            except BaseException:
                stream.close()
                raise
        return stream

    def _apply(self, change: dict) -> None:
        coll = (change.get("ns") or {}).get("coll")
        if coll in self.listeners:
            self.listeners[coll]()
            return
        doc = change.get("fullDocument") or {}
        pid = doc.get("pid")
        if coll == "Patient":
            pid = (change.get("documentKey") or {}).get("_id")
        follower = self.followers.get(coll)
        if change.get("operationType") in ("drop", "dropDatabase", "rename", "invalidate") or not pid:
            self.invalidate(None)
            for other in self.followers.values():
                other.invalidate(None)
        elif follower is not None:
            follower.invalidate(pid)
        else:
            self.invalidate(pid)
