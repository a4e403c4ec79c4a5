"""The audit journal as stored: entries, their queue, chain links, heads, checkpoints, the
sealer's lease (audit/log.py appends, audit/sealer.py seals, audit/verify.py reads).

Three insert-mostly collections, because SecantusDB updates are dear (bench/README.md, "The
journal"):

``AuditEvent``
    the events (``res`` packed: :func:`~fhir_dmp.storage.core.pack`), written once, never updated
    by the sealer;
``AuditEvent_queue``
    one small document per append ``{t, items: [{e, p, d}]}`` (event id, chain, content digest),
    written in the same transaction as its events: the sealer's to-do list, removed in the
    transaction that seals it;
``AuditEvent_link``
    per sealing pass and chain, one run of consecutive links
    ``{_id: "<pid>:<first>", pid, first, last, prev, links: [[event id, hash], ...]}``
    (seq = first + position; prev of a link = the hash before it, ``prev`` for the first): one
    insert per pass, not one per event.

Beside them ``AuditEvent_chain`` (one head per chain), ``AuditEvent_checkpoint`` (signed
checkpoints of the heads) and ``audit_sealer_lease`` (the one sealer's lease).

Contract: an append is atomic (entries and queue document together) and durable
(``w: majority, j: true``); a run's unique ``_id`` (chain, first position) refuses a fork; one
live owner holds the sealer lease at a time.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime

import pymongo
from pymongo import ReturnDocument, UpdateOne, WriteConcern
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from .core import (CHECKPOINTS, EPOCH, JOURNAL, JOURNAL_HEADS, JOURNAL_LINKS, JOURNAL_QUEUE, LEASE_WAIT_S,
                   SEALER_ID, SEALER_LEASE, StoreCore, _by_pid, _drop_indexes, _taken, now, pack, unpack)
from .errors import TRANSIENT, label_transient, translate, translate_methods
from .resources import UNIQUE_INDEXES, _wanted_indexes

log = logging.getLogger(__name__)


@translate_methods
class JournalStore(StoreCore):
    """The journal's collections (module docstring)."""

    def _journal(self):
        return self.db.get_collection(JOURNAL, write_concern=WriteConcern(w="majority", j=True))

    def ensure_journal_indexes(self) -> None:
        """Links: in chain order (their unique ``_id``, chain and first position, is the anti-fork
        guard). Queue: oldest first.
        Journal indexes that this version no longer keeps (the lean set of ``search.indexes``) and
        the old in-event chain and queue indexes are dropped: each one was paid on every read."""
        keep = [[("_id", 1)], *_wanted_indexes(JOURNAL), *([k] for k in UNIQUE_INDEXES.get(JOURNAL, []))]
        _drop_indexes(self.db[JOURNAL], lambda keys: keys not in keep)
        self.db[JOURNAL_LINKS].create_index([("pid", 1), ("first", 1)], name="chain_order")
        self.db[JOURNAL_QUEUE].create_index([("t", 1), ("_id", 1)], name="oldest_first")

    def journal_insert(self, docs: list[dict], items: list[dict], *, session=None,
                       pending: list | None = None) -> None:
        """Append journal entries and their one queue document (``items``: ``{e, p, d}`` per event),
        atomically: inside ``session``'s transaction, or else in a transaction of their own that
        commits durably (``w: majority, j: true``: one fsync for a whole group commit), within
        :meth:`deadline`.

        ``pending`` (in a transaction): the transaction's inserts not sent yet (``(collection,
        document)``, as :meth:`create` defers them); they go first, with the journal's documents, in
        one round trip (:meth:`insert_docs`), and the list is emptied (two round trips
        less per write).

        In a transaction, an error that is transient (a lost race, labelled so here when it is the
        data's WriteConflict) is raised as pymongo's own, so that ``with_transaction`` retries the
        whole unit; any other as a :class:`~fhir_dmp.storage.errors.StorageError` (the journal
        failed: the caller fails closed)."""
        docs = [{**d, "res": pack(d["res"])} for d in docs]
        queue = {"_id": uuid.uuid4().hex, "t": now(), "items": items}

        def write(s) -> None:
            self.db[JOURNAL].insert_many(docs, ordered=True, session=s)
            self.db[JOURNAL_QUEUE].insert_one(queue, session=s)
        if session is not None:
            try:
                if not pending:
                    write(session)
                    return
                try:
                    self.insert_docs([*_taken(pending), *((JOURNAL, d) for d in docs), (JOURNAL_QUEUE, queue)],
                                     session=session)
                except OperationFailure as exc:
                    label_transient(exc)   # a lost race of the data is retried, not the journal's failure
                    raise
            except PyMongoError as exc:
                if session.in_transaction and exc.has_error_label(TRANSIENT):
                    raise
                raise translate(exc) from exc
            return
        # its own transaction, in the group committer's thread: bounded as the requests waiting on it
        with self.deadline(), self.client.start_session() as s:
            s.with_transaction(write, write_concern=WriteConcern(w="majority", j=True))

    def _queued(self, pid: str | None = None):
        """``(t, item)`` for every queued (unsealed) event, ``pid``'s only when given."""
        for q in self.db[JOURNAL_QUEUE].find({} if pid is None else {"items.p": pid}):
            for item in q["items"]:
                if pid is None or item.get("p") == pid:
                    yield q["t"], item

    def count_unsealed_before(self, cutoff: datetime, pid: str | None = None) -> int:
        return sum(1 for t, _ in self._queued(pid) if t < cutoff)

    def count_unchained(self, pid: str | None = None) -> int:
        """Events neither sealed nor waiting for the sealer (a queue entry lost, or deleted)."""
        queued = {item["e"] for _, item in self._queued(pid)}
        linked = {eid for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), {"links": 1})
                  for eid, _ in run["links"]}
        return sum(1 for d in self.db[JOURNAL].find(_by_pid(pid), {"_id": 1})
                   if d["_id"] not in linked and d["_id"] not in queued)

    def sealed_events(self, pid: str | None = None):
        """Sealed events in chain order (``pid``, ``seq``), each with ``chain`` = ``{pid, seq,
        prev, hash}`` (``pid`` the chain: ``_system`` for events of no patient). A link whose event
        is gone is skipped (the verifier then sees a gap in the chain)."""
        for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), sort=[("pid", 1), ("first", 1)]):
            events = {d["_id"]: d for d in self.db[JOURNAL].find(
                {"_id": {"$in": [eid for eid, _ in run["links"]]}})}
            prev = run["prev"]
            for i, (eid, hsh) in enumerate(run["links"]):
                event = events.get(eid)
                if event is not None:
                    yield {**event, "res": unpack(event.get("res")),
                           "chain": {"pid": run["pid"], "seq": run["first"] + i, "prev": prev, "hash": hsh}}
                prev = hsh

    def chain_heads(self, pid: str | None = None):
        """The chain heads (``{_id: pid, seq, hash, lu}``), all or ``pid``'s."""
        return self.db[JOURNAL_HEADS].find({} if pid is None else {"_id": pid})

    def destroyed_chains(self) -> set[str]:
        return {h["_id"] for h in self.db[JOURNAL_HEADS].find({"destroyed": True}, {"_id": 1})}

    def take_sealer_lease(self, owner: str, now: datetime, until: datetime, lsid: dict | None = None) -> bool:
        """Take or renew the one sealer lease for ``owner``, whose sealing transactions run in
        session ``lsid``; False when another live owner holds it.

        A holder killed inside a sealing transaction leaves that transaction open, and its write
        keeps the lease document locked until SecantusDB aborts it (60 s idle AND another
        transaction command: possibly never on a read-only load). So whoever takes an EXPIRED
        lease first kills the holder's session (``killSessions``, which aborts its transaction;
        a live holder that merely overran its lease just loses its current pass, as the fencing
        write would make it anyway). Lease writes wait at most :data:`LEASE_WAIT_S` on a lock."""
        stale = self.db[SEALER_LEASE].find_one(   # a snapshot read: not blocked by the lock
            {"_id": SEALER_ID, "owner": {"$ne": owner}, "until": {"$lt": now}, "lsid": {"$exists": True}})
        if stale is not None:
            try:
                self.client.admin.command("killSessions", [stale["lsid"]])
            except PyMongoError as exc:
                log.warning("could not end the expired sealer's session: %s", type(exc).__name__)
        try:
            with pymongo.timeout(LEASE_WAIT_S):
                doc = self.db[SEALER_LEASE].find_one_and_update(
                    {"_id": SEALER_ID, "$or": [{"owner": owner}, {"until": {"$lt": now}}]},
                    {"$set": {"owner": owner, "until": until, **({"lsid": lsid} if lsid else {})}},
                    upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            return False
        except PyMongoError as exc:
            if exc.timeout:
                return False
            raise
        return bool(doc) and doc.get("owner") == owner

    def renew_sealer_lease(self, owner: str, now: datetime, until: datetime, *, session) -> bool:
        """Extend a lease ``owner`` still holds (the fencing write of each sealing transaction)."""
        return self.db[SEALER_LEASE].update_one(
            {"_id": SEALER_ID, "owner": owner, "until": {"$gt": now}},
            {"$set": {"until": until}}, session=session).matched_count > 0

    def release_sealer_lease(self, owner: str) -> None:
        with pymongo.timeout(LEASE_WAIT_S):
            self.db[SEALER_LEASE].delete_one({"_id": SEALER_ID, "owner": owner})

    def unsealed_batches(self, limit: int, *, session=None) -> list[dict]:
        """The oldest queue documents (append time, then ``_id``) holding about ``limit`` events
        (whole documents: at least one, then while the total stays within ``limit``). Each holds
        at least one event (a destroy deletes those it empties), so ``limit`` documents suffice:
        the database is not asked for the whole backlog."""
        out, total = [], 0
        for q in self.db[JOURNAL_QUEUE].find({"t": {"$gte": EPOCH}}, sort=[("t", 1), ("_id", 1)],
                                             limit=limit, session=session):
            if out and total + len(q["items"]) > limit:
                break
            out.append(q)
            total += len(q["items"])
        return out

    def heads_of(self, pids: list[str], *, session=None) -> dict[str, tuple[int, str]]:
        """``pid -> (seq, hash)`` of the chains that have a head."""
        return {h["_id"]: (h["seq"], h["hash"])
                for h in self.db[JOURNAL_HEADS].find({"_id": {"$in": pids}}, session=session)}

    def seal_events(self, runs: list[dict], queue_ids: list[str], *, session) -> None:
        """Store the chain ``runs`` (``{pid, first, prev, links: [[event id, hash], ...]}``, one
        per chain) and remove the queue documents they came from, in ``session``'s transaction.
        A run is keyed by its chain and first position: two runs from the same head (a fork) are
        refused by the unique ``_id``, and the whole transaction aborts."""
        if runs:
            self.db[JOURNAL_LINKS].insert_many(
                [{"_id": f"{r['pid']}:{r['first']}", "last": r["first"] + len(r["links"]) - 1, **r}
                 for r in runs], ordered=True, session=session)
        self.db[JOURNAL_QUEUE].delete_many({"_id": {"$in": queue_ids}}, session=session)

    def move_heads(self, heads: dict[str, tuple[int, str]], at: datetime, *, session) -> None:
        """Set each chain's head to ``(seq, hash)`` (created when new)."""
        ops = [UpdateOne({"_id": pid}, {"$set": {"seq": seq, "hash": hsh, "lu": at}}, upsert=True)
               for pid, (seq, hsh) in heads.items()]
        self.db[JOURNAL_HEADS].bulk_write(ops, ordered=True, session=session)

    def last_checkpoint(self, *, session=None) -> dict | None:
        return self.db[CHECKPOINTS].find_one({}, {"_id": 1, "digest": 1}, sort=[("_id", -1)], session=session)

    def add_checkpoint(self, doc: dict, *, session=None) -> None:
        self.db[CHECKPOINTS].insert_one(doc, session=session)

    def checkpoints(self):
        """Every checkpoint, in order (``_id`` = n)."""
        return self.db[CHECKPOINTS].find({}, sort=[("_id", 1)])

    def has_checkpoints(self) -> bool:
        return bool(self.db[CHECKPOINTS].estimated_document_count())
