"""The journal store: AuditEvents appended durably, unsealed, as one page per group commit or
per write (in the write's transaction).

Storage (every collection is insert-mostly, SecantusDB updates being dear: bench/README.md, "The journal"):

- ``AuditEvent_page``: per append, ``{_id, t, events: [{_id, pid, lu, res, d}]}`` (``res``
  the event's canonical JSON, packed; ``d`` its content digest): the journal as a log, the one
  durable write of an append (``storage/pages.py``). Nothing else is done on the request path:
  no search index, no chain.
- ``AuditEvent_link``: per sealing pass and chain, a run of consecutive links holding the
  entries it seals (``storage/runs.py``: one document per DMP and pass, not one per event)::

      {_id: "<pid>:<first>", pid: <patient id or "_system">, first, last, prev: <hex>,
       links: [[event id, hash], ...],       # event seq = first + position in ``links``
       e: [entry, ...], ids, ke, ka, lo, hi, b, u}
      digest = SHA-256( canonical_json(res) )          # sorted keys, no whitespace, UTF-8
      hash   = SHA-256( prev_hex_ascii + digest_hex_ascii )
      prev   = hash of seq n-1, or 64 zeros for seq 1

  An entry has the common layout (``_id``, ``pid``, ``vid`` = 1, ``lu``, ``del`` = False,
  ``res``, ``s``, ``o``), derived from its page by the sealer (``s``/``o`` extracted there);
  ``s``/``o`` live beside ``res`` and are not hashed. Every read of the journal also reads the
  pages not sealed yet (``storage/pages.py``), so an entry is searchable as soon as it is
  acknowledged. A DMP's journal is kept as long as the DMP and destroyed with it (retention
  counts from the Patient's ``closed_at``: guard/lifecycle.py). Previous versions wrote one
  ``AuditEvent`` document per entry: still read, never written.

Append and seal are split: a request's events are written durably (one page per group commit,
or inside the write's transaction) without touching any chain, and the single sealer of
``sealer.py`` derives their entries, links them in append order into runs that hold them, deletes their
page and moves the heads, in one transaction. A run's ``_id`` (chain and first position) is unique: no fork.
The collection ``AuditEvent_chain`` holds one head per chain (``{_id: pid, seq, hash, lu}``) so
that deleting the newest events is detected too ("head points past last event"), and the
sealer signs checkpoints of the heads with a key kept outside the database, so that
someone with write access to the database alone cannot rebuild a chain unnoticed.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from datetime import datetime, timezone


from ..http.errors import ServiceUnavailable
from ..storage import StorageError, instant
from .chain import canonical_json, content_digest
from .events import event_patient

log = logging.getLogger(__name__)


#: the age of the oldest unsealed page that the group committers keep it under (:func:`throttle_pause`):
#: a sixth of the 60 s seal bound that ``audit verify`` checks, so that a sealer behind by a whole
#: target still has ~50 s of margin, and above the 1-5 s of backlog a burst leaves
THROTTLE_TARGET_S = 10.0
#: the pause starts at half the target: the pages written before it takes effect still have to be
#: sealed, so the age goes on growing for several seconds (bench/README.md: starting at 10 s, the
#: age reached 18-20 s)
THROTTLE_FROM_S = THROTTLE_TARGET_S / 2
#: the pause before each batch grows by this per second of age past THROTTLE_FROM_S ...
THROTTLE_SLOPE = 0.05
#: ... up to this, reached at the target: 32 waiting requests then pass at ~130/s at most, a rate
#: the sealer outruns
THROTTLE_MAX_S = 0.25
#: how often a group committer reads the oldest page's age (one indexed find_one)
THROTTLE_CHECK_S = 0.5


def throttle_pause(age_s: float, *, start: float = THROTTLE_FROM_S, slope: float = THROTTLE_SLOPE,
                   cap: float = THROTTLE_MAX_S) -> float:
    """Seconds a group committer waits before writing its next batch, given the age of the oldest
    unsealed page: none up to ``start``, then ``slope`` per second past it, at most ``cap``.
    The pause only delays the callers waiting for that batch's durable write (nothing is dropped,
    nothing is acknowledged before it is written); fewer writes leave CPU to the sealer."""
    return min(cap, slope * (age_s - start)) if age_s > start else 0.0


class AuditUnavailable(ServiceUnavailable):
    """The journal could not be written; the request must fail closed (503)."""

    def default_message(self) -> str:
        return "Le journal d'audit est indisponible"


class AuditLog:
    """Append-only journal store over the ``AuditEvent`` collection (thread-safe, one per process).

    Appends are durable before they return (``w: majority, j: true``: the request fails
    closed otherwise) but they do not touch the per-patient hash chain: an event is
    stored with a queue entry and the :class:`~fhir_dmp.audit.sealer.Sealer` links it into
    its patient's chain afterwards, in append order. So reads never take a write conflict.

    - Outside a transaction (reads, denials, 401s) the events of concurrent requests are
      written together by one committer thread per process (group commit): ONE durable insert,
      a page holding everything queued while the previous write was in flight; each caller
      waits for the write that carries its events (bounded by ``timeout``). While the sealer is
      behind (the oldest unsealed page older than :data:`THROTTLE_FROM_S`) the committer
      pauses before each batch (:class:`GroupCommitter`): requests wait longer, none is dropped.
    - Inside a transaction (writes) the events are inserted as one page with the data, in the
      same transaction: a write is never committed without its journal entry.
    """

    TIMEOUT_S = 30.0
    MAX_BATCH = 1000

    def __init__(self, storage, *, timeout: float = TIMEOUT_S):
        self.storage = storage
        self.timeout = timeout
        self._indexed = False
        self._committer: GroupCommitter | None = None
        self._lock = threading.Lock()

    # -- setup
    def ensure_indexes(self) -> None:
        """The journal's lean indexes, the unique chain position (anti-fork) and the pages."""
        if self._indexed:
            return
        try:
            self.storage.ensure_journal_indexes()
        except StorageError as exc:
            raise AuditUnavailable() from exc
        self._indexed = True

    # -- append
    def _prepare(self, events: list[dict]) -> list[dict]:
        """Each event as a page holds it: ``_id``, ``pid`` (its patient or None), ``lu``, ``res``
        (with id and meta, as its canonical JSON bytes) and ``d`` (their content digest, which the
        sealer links). The search index is not extracted here: the sealer and the reads of the
        pages do it (``storage/pages.py``)."""
        out = []
        now = datetime.now(timezone.utc)
        for event in events:
            res = dict(event)
            res.setdefault("id", uuid.uuid4().hex)
            res["meta"] = {**(res.get("meta") or {}), "versionId": "1", "lastUpdated": instant(now)}
            raw = canonical_json(res)   # serialized once: hashed here, stored as is (storage.pack)
            out.append({"_id": res["id"], "pid": event_patient(res), "lu": now, "res": raw,
                        "d": content_digest(raw)})
        return out

    def append(self, events: list[dict], *, session=None, pending: list | None = None) -> None:
        """Store ``events`` (built by :func:`build_event`) durably; the sealer chains them later.

        Returns once the events are acknowledged with ``w: majority, j: true`` (SecantusDB
        ``--sync-on-commit``). Each event gets ``id`` (unless it has one) and ``meta``
        (versionId 1, lastUpdated). With ``session`` inside a transaction the events are part
        of it (a ``TransientTransactionError`` is raised unchanged so the caller retries the
        whole unit). Raises :class:`AuditUnavailable` when the journal cannot be written.
        ``pending`` (with ``session``): the transaction's inserts not sent yet, sent with the events
        in one round trip (``Storage.journal_insert``); only inserts that cannot be refused (server
        ids, no unique index) are deferred, so a refusal there is the journal's.
        """
        if not events:
            return
        self.ensure_indexes()
        docs = self._prepare(events)
        if session is not None and session.in_transaction:
            try:
                self.storage.journal_insert(docs, session=session, pending=pending)
            except StorageError as exc:   # a transient error is not one: the transaction is retried
                log.error("audit append in transaction failed: %s", type(exc).__name__)
                raise AuditUnavailable() from exc
            return
        try:
            self._group().submit(docs).result(timeout=self.timeout)
        except AuditUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — a write error or a timeout: fail closed
            log.error("audit append failed: %s", type(exc).__name__)
            raise AuditUnavailable() from exc

    def _group(self) -> "GroupCommitter":
        with self._lock:
            if self._committer is None or not self._committer.alive:
                self._committer = GroupCommitter(self.storage.journal_insert, max_batch=self.MAX_BATCH,
                                                 age=self.storage.sealing_lag)
            return self._committer

    def close(self) -> None:
        with self._lock:
            if self._committer is not None:
                self._committer.stop()
                self._committer = None


class GroupCommitter:
    """One thread that writes the queued events of many callers in one durable insert (a page).

    Started lazily (after the server's fork). Batching is natural: while one insert
    is in flight the next callers queue up, and they are all written by the next one, so a
    lone request pays one round trip and N concurrent requests share about one.

    Backpressure: with ``age`` (seconds since the oldest unsealed page was appended), read at most
    every ``check_s`` in this thread, each batch waits :func:`throttle_pause` before it is written
    while the sealer is behind, so the requests of this process slow down and the sealer catches
    up (bench/README.md, "the seal bound under saturation"). :attr:`throttling` says whether it
    does now, :attr:`throttled` counts the batches paused; one log line when it starts, one when it
    ends. A failed read of the age counts as no backlog (the write itself then fails closed).
    """

    def __init__(self, insert, *, max_batch: int = 1000, age=None, check_s: float = THROTTLE_CHECK_S):
        """``insert(events)`` writes one batch durably, atomically (``Storage.journal_insert``:
        one page); ``age()`` the oldest unsealed page's age in seconds while a sealer runs (``Storage.sealing_lag``),
        None for no backpressure."""
        self.insert = insert
        self.max_batch = max_batch
        self.age = age
        self.check_s = check_s
        self.throttling = False
        self.throttled = 0
        self._pause = 0.0
        self._checked = float("-inf")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, events: list[dict]) -> Future:
        fut: Future = Future()
        self._queue.put((events, fut))
        return fut

    def stop(self) -> None:
        self._stop = True
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._backpressure()
            batch, size = [item], len(item[0])
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop = True
                    break
                batch.append(nxt)
                size += len(nxt[0])
            self._write(batch)
            if self._stop:
                return

    def _backpressure(self) -> None:
        """Wait before the next batch while the oldest unsealed page is too old (class docstring)."""
        if self.age is None:
            return
        if time.monotonic() - self._checked >= self.check_s:
            self._checked = time.monotonic()
            try:
                age = self.age()
            except Exception:  # noqa: BLE001 — the database away: the write reports it
                age = 0.0
            self._pause = throttle_pause(age)
            if bool(self._pause) != self.throttling:
                self.throttling = bool(self._pause)
                if self.throttling:
                    log.warning("audit sealer behind (oldest unsealed page %.1f s old): journal writes throttled",
                                age)
                else:
                    log.warning("audit sealer caught up: journal writes no longer throttled")
        if self._pause:
            self.throttled += 1
            time.sleep(self._pause)

    def _write(self, batch: list) -> None:
        events = [e for part, _ in batch for e in part]
        try:
            self.insert(events)
        except Exception as exc:  # noqa: BLE001 — every waiter of this batch fails closed
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for _, fut in batch:
            fut.set_result(None)
