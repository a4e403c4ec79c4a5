"""The decision context of each DMP, cached in the process and invalidated by the database.

The decision (``decision/``) needs, per patient, the Patient (DMP state, médecin traitant)
and its active Consents. Loading them costs two queries per request; this module keeps
them per process and drops an entry as soon as the database says something in that
patient's compartment changed, in this process or any other (issue 13: a revocation, a
block, a mask or a closing takes effect everywhere within one second).

How it stays correct:

* one feed of changes per process (``change_feed.py``): its own change stream
  (``Storage.watch_decision_inputs``, MongoDB change streams; SecantusDB runs as a one-node
  replica set), or under ``fhir-dmp serve`` the node's one stream fanned out by its change hub
  (``runtime/change_hub.py``), on every collection the decision reads (``storage.DECISION_INPUTS``:
  Patient, Consent, RelatedPerson, break-glass grants), with ``fullDocument: updateLookup``; each
  change invalidates the entry of the document's ``pid`` (Patient: its ``_id``), and a
  change whose patient is unknown (a physical delete) clears everything;
* nothing is served from the cache while the feed is not live: it is off at start, and a
  stream error, the hub's gap or the hub gone clears the cache and turns it off until the
  feed is back;
* a load racing with a change cannot store a stale entry: every change bumps a generation,
  and a load stores its result only if no change of that patient (and no reset) happened
  since the generation it read before its queries (:meth:`PidCache.load`);
* writes read inside their transaction and never use the cache (``RequestAccess.session``).

Entries also expire after ``max_age`` seconds, a backstop only.

The mechanism (generations, live flag, one load per pid at a time) is :class:`PidCache`; the
same feed also invalidates the DMP document cache (``search/doc_cache.py``), a follower of
:class:`ContextCache` for the DocumentReference collection, and tells listeners of other
collections that something changed there (the issuer's key set as last seen by any process,
``auth.SharedKeys``: a key withdrawn anywhere is refused everywhere within one second).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from ..storage.core import DECISION_INPUTS
from ..storage.errors import Outage
from .change_feed import FeedLost, HubFeed, StreamFeed, follow

log = logging.getLogger(__name__)

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

    def cached(self, pid: str):
        """``pid``'s value if it is cached now (live, fresh), else None: never loads."""
        with self._lock:
            hit = self._entries.get(pid) if self._live else None
            if hit is None or time.monotonic() - hit[0] >= self.max_age:
                return None
            self._entries.move_to_end(pid)
            self.hits += 1
            return hit[1]

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
    """pid -> decision context (:func:`load_contexts`), kept by the process's one feed of changes
    (``change_feed.py``): its own change stream, or with ``hub`` (the Unix socket of the node's
    change hub, ``runtime/change_hub.py``, under ``fhir-dmp serve``) the hub's.

    ``followers`` maps a collection outside :data:`storage.DECISION_INPUTS` to another
    :class:`PidCache` (e.g. the DMP document cache, ``search/doc_cache.py``): the same feed
    carries that collection and invalidates the follower's entry of each changed document's ``pid``.
    ``listeners`` maps another collection to a function of no argument, called in the feed's
    thread on each change there and each time the feed is (re)established (what changed
    while it was down); it reads what it needs itself.
    """

    def __init__(self, storage, *, max_entries: int = 20_000, max_age: float = 300.0,
                 followers: dict[str, PidCache] | None = None, listeners: dict | None = None,
                 hub: str | None = None):
        super().__init__(max_weight=max_entries, max_age=max_age)
        self.storage = storage
        self.followers = dict(followers or {})
        self.listeners = dict(listeners or {})
        self.hub = hub
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, pids: list[str]) -> dict:
        return load_contexts(self.storage, pids)

    def _set_live(self, live: bool) -> None:
        for follower in self.followers.values():
            follower._set_live(live)
        super()._set_live(live)

    # -- the feed
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="context-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self.hub:
            outage = Outage(log, "decision context feed", source="change hub", expected=(FeedLost,))
            opened = lambda: HubFeed.open(self.hub, self._stop)   # noqa: E731
        else:
            outage = Outage(log, "decision context change stream")
            opened = lambda: StreamFeed.open(self.storage, (*self.followers, *self.listeners))   # noqa: E731
        follow(opened, stop=self._stop, outage=outage, on_live=self._opened, on_change=self._apply,
               on_gap=lambda: self._set_live(False))

    def _opened(self) -> None:
        """The feed is open: the caches on, the listeners told (what changed while it was down),
        bounded by FHIR_DMP_DB_WAIT (``StoreCore.deadline``)."""
        with self.storage.deadline():
            self._set_live(True)
            for listener in self.listeners.values():
                listener()
        log.info("decision context cache: live (%s)", "the node's change hub" if self.hub else "own change stream")

    def _apply(self, change: dict) -> None:
        """One change (``change_feed.reduce``): drop what it touches."""
        coll, pid = change["coll"], change["pid"]
        if coll in self.listeners:
            self.listeners[coll]()
            return
        follower = self.followers.get(coll)
        if follower is None and coll is not None and coll not in DECISION_INPUTS:
            return       # a hub's feed carries the collections of every worker; not followed here
        if change["op"] in ("drop", "dropDatabase", "rename", "invalidate") or not pid:
            self.invalidate(None)
            for other in self.followers.values():
                other.invalidate(None)
        elif follower is not None:
            follower.invalidate(pid)
        else:
            self.invalidate(pid)
