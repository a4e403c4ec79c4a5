"""The audit journal as stored: unsealed pages, entries, chain links, heads, checkpoints, the
sealer's lease (audit/log.py appends, audit/sealer.py seals, audit/verify.py reads).

Insert-mostly collections, because SecantusDB updates are dear (bench/README.md, "The
journal"):

``AuditEvent_page``
    one document per append (a group commit, or a write's events in its transaction) holding that
    batch's events, packed, with their chain and content digest: the journal as a log, one durable
    insert per group commit (``pages.py`` states its layout and the reads that see through it);
``AuditEvent_link``
    per sealing pass and chain, one run of consecutive links
    ``{_id: "<pid>:<first>", pid, first, last, prev, links: [[event id, hash], ...]}``
    (seq = first + position; prev of a link = the hash before it, ``prev`` for the first), holding
    the entries it seals (``res`` packed: :func:`~fhir_dmp.storage.core.pack`, common layout with
    the search index ``s``/``o``; ``runs.py`` states the layout and how reads find them): one
    insert per pass and chain, not one per event;
``AuditEvent_run_meta``
    beside each run holding entries, its metadata (``_id`` the run's; the keys the reads look up,
    indexed, its date bounds, its memo key ``u``): written in the same transaction as its run,
    deleted with it;
``AuditEvent``
    the entries as previous versions stored them, one document per event (their runs have no
    entries): read, never written any more.

A database written by the previous version may still hold ``AuditEvent_queue`` documents
(``{_id, t, items: [{e: event id, p: patient or None, d: digest}]}``) whose events are entries
already, not linked: the sealer links them first (``unsealed_pages(old=True)``), and they count as
waiting for the sealer, not as unchained.

Beside them ``AuditEvent_chain`` (one head per chain), ``AuditEvent_checkpoint`` (signed
checkpoints of the heads) and ``audit_sealer_lease`` (the one sealer's lease).

Runs written by the previous version hold their metadata themselves (indexed there by
``runs_by_ids``/``ke``/``ka``): :meth:`JournalStore.ensure_journal_indexes` splits them once
(:meth:`JournalStore.split_legacy_runs`), then drops those indexes.

Contract: an append is one insert, atomic and durable (``w: majority, j: true``), or part of its
write's transaction; sealing a page (runs with their entries and metadata, page deleted) is all
or nothing; a run's unique ``_id`` (chain, first position) refuses a fork; one live owner holds
the sealer lease at a time.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime

import pymongo
from pymongo import DeleteMany, ReturnDocument, UpdateOne, WriteConcern
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from .core import (CHECKPOINTS, EPOCH, JOURNAL, JOURNAL_HEADS, JOURNAL_LINKS, JOURNAL_PAGES, JOURNAL_QUEUE,
                   JOURNAL_RUN_META, LEASE_WAIT_S,
                   SEALER_ID, SEALER_LEASE, StoreCore, _by_pid, _drop_indexes, _taken, now, pack, unpack)
from .errors import TRANSIENT, label_transient, translate, translate_methods
from .resources import UNIQUE_INDEXES, _wanted_indexes
from .runs import META_ONLY, run_documents, split_run, unpacked_entry

log = logging.getLogger(__name__)
#: pages named per delete statement when the sealer deletes them (:meth:`JournalStore.seal_pages`)
DELETE_CHUNK = 16
#: the runs' lookup keys: indexed in their metadata (this version), in the runs themselves before
RUN_KEYS = ("ids", "ke", "ka")
#: runs of the previous version looked up at a time by :meth:`JournalStore.split_legacy_runs`
LEGACY_BATCH = 256


@translate_methods
class JournalStore(StoreCore):
    """The journal's collections (module docstring)."""

    def _journal(self):
        return self.db.get_collection(JOURNAL_PAGES, write_concern=WriteConcern(w="majority", j=True))

    def ensure_journal_indexes(self) -> None:
        """Links: in chain order (their unique ``_id``, chain and first position, is the anti-fork
        guard). Pages: oldest first.
        Journal indexes that this version no longer keeps (the lean set of ``search.indexes``) and
        the old in-event chain and queue indexes are dropped: each one was paid on every read."""
        keep = [[("_id", 1)], *_wanted_indexes(JOURNAL), *([k] for k in UNIQUE_INDEXES.get(JOURNAL, []))]
        _drop_indexes(self.db[JOURNAL], lambda keys: keys not in keep)
        self.db[JOURNAL_LINKS].create_index([("pid", 1), ("first", 1)], name="chain_order")
        meta = self.db[JOURNAL_RUN_META]
        meta.create_index([("pid", 1)], name="runs_by_pid")
        for field in RUN_KEYS:     # an entry by id; who read this document; what did this professional read
            meta.create_index([(field, 1)], name=f"runs_by_{field}")
        self.db[JOURNAL_PAGES].create_index([("t", 1), ("_id", 1)], name="oldest_first")
        self.split_legacy_runs()

    def split_legacy_runs(self) -> int:
        """Give each run that the previous version wrote holding its metadata (found by its own
        ``runs_by_ids`` index, which only that version made; made here for runs without any
        metadata document, as a restore of that version's backup leaves them) its metadata
        document, the run rid of it, one run per transaction (a destroy racing it deletes both or
        neither); then drop the runs' lookup indexes: their absence says it is done, so a start
        after it asks nothing more. Idempotent, and a start that stopped half-way goes on; the
        number split."""
        links = self.db[JOURNAL_LINKS]
        legacy = [ix["name"] for ix in links.list_indexes() if ix["name"] in {f"runs_by_{f}" for f in RUN_KEYS}]
        if not legacy and links.estimated_document_count() and not self.db[JOURNAL_RUN_META].estimated_document_count():
            # runs and no metadata at all: restored from a backup of the previous version (a
            # restore copies documents, not indexes), or sealed only by versions before the runs
            links.create_index([("ids", 1)], name="runs_by_ids")
            legacy = ["runs_by_ids"]
        if not legacy:
            return 0
        done = 0
        while True:
            # ids are strings: a range on them rides the index, which runs without ids do not reach
            batch = [r["_id"] for r in links.find({"ids": {"$gte": ""}}, {"_id": 1}, limit=LEGACY_BATCH)]
            for rid in batch:
                done += self.run_transaction(lambda session, rid=rid: self._split_run(rid, session))
            if len(batch) < LEGACY_BATCH:
                break
        _drop_indexes(links, lambda keys: keys in [[(f, 1)] for f in RUN_KEYS])
        if done:
            log.info("journal: %d runs of the previous version given their metadata document", done)
        return done

    def _split_run(self, rid: str, session) -> int:
        whole = self.db[JOURNAL_LINKS].find_one({"_id": rid, "ids": {"$exists": True}}, session=session)
        if whole is None:     # split by another process starting beside this one, or destroyed
            return 0
        _, meta = split_run(whole)
        self.db[JOURNAL_RUN_META].replace_one({"_id": rid}, meta, upsert=True, session=session)
        self.db[JOURNAL_LINKS].update_one({"_id": rid}, {"$unset": dict.fromkeys(META_ONLY, "")}, session=session)
        return 1

    def journal_insert(self, events: list[dict], *, session=None, pending: list | None = None) -> None:
        """Append one page holding ``events`` (``{_id, pid, lu, res: canonical JSON bytes, d:
        content digest}``, ``res`` packed here): inside ``session``'s transaction, or else as one
        insert of its own, atomic as any single document and durable (``w: majority, j: true``: one
        fsync for a whole group commit), within :meth:`deadline`.

        ``pending`` (in a transaction): the transaction's inserts not sent yet (``(collection,
        document)``, as :meth:`create` defers them); they go first, with the page, in one round
        trip (:meth:`insert_docs`), and the list is emptied (two round trips less per write).

        In a transaction, an error that is transient (a lost race, labelled so here when it is the
        data's WriteConflict) is raised as pymongo's own, so that ``with_transaction`` retries the
        whole unit; any other as a :class:`~fhir_dmp.storage.errors.StorageError` (the journal
        failed: the caller fails closed)."""
        page = {"_id": uuid.uuid4().hex, "t": now(), "events": [{**e, "res": pack(e["res"])} for e in events]}
        if session is None:
            # the group committer's thread: bounded as the requests waiting on it
            with self.deadline():
                self._journal().insert_one(page)
            return
        try:
            try:
                self.insert_docs([*_taken(pending), (JOURNAL_PAGES, page)], session=session)
            except OperationFailure as exc:
                label_transient(exc)   # a lost race of the data is retried, not the journal's failure
                raise
        except PyMongoError as exc:
            if session.in_transaction and exc.has_error_label(TRANSIENT):
                raise
            raise translate(exc) from exc

    def _paged(self, pid: str | None = None, flt: dict | None = None):
        """``(t, event id)`` for every event waiting for the sealer (in a page, or in the previous
        version's queue), ``pid``'s only when given."""
        for coll, arr, eid, epid in ((JOURNAL_PAGES, "events", "_id", "pid"), (JOURNAL_QUEUE, "items", "e", "p")):
            for doc in self.db[coll].find({**(flt or {}), **({} if pid is None else {f"{arr}.{epid}": pid})},
                                          {"t": 1, f"{arr}.{eid}": 1, f"{arr}.{epid}": 1}):
                for e in doc[arr]:
                    if pid is None or e.get(epid) == pid:
                        yield doc["t"], e[eid]

    def count_unsealed_before(self, cutoff: datetime, pid: str | None = None) -> int:
        """Events waiting for the sealer (pages, old queue) appended before ``cutoff``."""
        return sum(1 for _ in self._paged(pid, {"t": {"$lt": cutoff}}))

    def count_unchained(self, pid: str | None = None) -> int:
        """Entries neither linked nor waiting for the sealer in a page or the previous version's
        queue (a link deleted, an entry written by hand, one added to a run)."""
        paged = {eid for _, eid in self._paged(pid)}
        linked, in_runs = set(), set()
        for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), {"links": 1, "e._id": 1}):
            linked.update(eid for eid, _ in run["links"])
            in_runs.update(d["_id"] for d in run.get("e") or ())
        return len(in_runs - linked) + sum(1 for d in self.db[JOURNAL].find(_by_pid(pid), {"_id": 1})
                                           if d["_id"] not in linked and d["_id"] not in paged)

    def runs_unlisted(self, pid: str | None = None) -> list[str]:
        """Ids of the runs holding entries whose metadata document is missing or does not name them
        (another ``u``, other event ids): the reads, which look runs up by their metadata, would
        miss their entries."""
        listed = {m["_id"]: (m["u"], m["ids"])
                  for m in self.db[JOURNAL_RUN_META].find(_by_pid(pid), {"u": 1, "ids": 1})}
        runs = self.db[JOURNAL_LINKS].find({**_by_pid(pid), "e": {"$exists": True}}, {"u": 1, "e._id": 1})
        return sorted(run["_id"] for run in runs
                      if listed.get(run["_id"]) != (run.get("u"), [d["_id"] for d in run["e"]]))

    def sealed_events(self, pid: str | None = None):
        """Sealed events in chain order (``pid``, ``seq``), each with ``chain`` = ``{pid, seq,
        prev, hash}`` (``pid`` the chain: ``_system`` for events of no patient). A link whose event
        is gone is skipped (the verifier then sees a gap in the chain)."""
        for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), sort=[("pid", 1), ("first", 1)]):
            events = {d["_id"]: unpacked_entry(d) for d in run["e"]} if "e" in run else \
                {d["_id"]: d for d in self.db[JOURNAL].find({"_id": {"$in": [eid for eid, _ in run["links"]]}})}
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

    def unsealed_pages(self, limit: int, *, session=None, old: bool = False) -> tuple[list[dict], bool]:
        """The oldest pages (append time, then ``_id``) holding about ``limit`` events (whole pages:
        at least one, then while the total stays within ``limit``), and whether pages are left
        after them. Each holds at least one event (a destroy deletes those it empties), so
        ``limit`` pages (and one to tell whether more are left) suffice: the database is not asked
        for the whole backlog. ``old``: the same of the previous version's queue documents
        (``{_id, t, items: [{e: event id, p: patient or None, d: digest}]}``, their events
        already entries in ``AuditEvent``, not linked)."""
        coll, arr = (JOURNAL_QUEUE, "items") if old else (JOURNAL_PAGES, "events")
        out, total = [], 0
        for page in self.db[coll].find({"t": {"$gte": EPOCH}}, sort=[("t", 1), ("_id", 1)],
                                       limit=limit + 1, session=session):
            if out and total + len(page[arr]) > limit:
                return out, True
            out.append(page)
            total += len(page[arr])
        return out, False

    def oldest_page_age(self) -> float:
        """Seconds since the oldest unsealed page was appended (0 when none), by the pages'
        ``oldest_first`` index: one document read, within :meth:`deadline`."""
        with self.deadline():
            page = self.db[JOURNAL_PAGES].find_one({"t": {"$gte": EPOCH}}, {"t": 1}, sort=[("t", 1), ("_id", 1)])
        return 0.0 if page is None else max(0.0, (now() - page["t"]).total_seconds())

    def sealing_lag(self) -> float:
        """How far a RUNNING sealer is behind: :meth:`oldest_page_age` while some process holds a
        live sealer lease, 0 when none does (no sealer configured, or the holder gone until its
        lease expires): slowing the requests cannot make an absent sealer catch up, it would only
        slow them for nothing (``audit verify`` reports pages left unsealed too long). Two
        documents read, within :meth:`deadline`."""
        with self.deadline():
            live = self.db[SEALER_LEASE].find_one({"_id": SEALER_ID, "until": {"$gt": now()}}, {"_id": 1})
        return 0.0 if live is None else self.oldest_page_age()

    def heads_of(self, pids: list[str], *, session=None) -> dict[str, tuple[int, str]]:
        """``pid -> (seq, hash)`` of the chains that have a head."""
        return {h["_id"]: (h["seq"], h["hash"])
                for h in self.db[JOURNAL_HEADS].find({"_id": {"$in": pids}}, session=session)}

    def seal_pages(self, runs: list[tuple[dict, list[dict]]], page_ids: list[str], *, session,
                   old: bool = False) -> None:
        """Store the chain ``runs`` (``{pid, first, prev, links: [[event id, hash], ...], size:
        bytes of entries}``, one per chain, each with the entries it seals, derived from pages
        ``page_ids``: ``pages.entries``; none for ``old``, the previous version's queue documents,
        whose entries are stored already) and their metadata as ``runs.run_documents`` lays them
        out, and delete those pages (``old``: those queue documents), in ``session``'s
        transaction. A run is keyed by its chain and first position: two runs from the same head
        (a fork) are refused by the unique ``_id``, and the whole transaction aborts."""
        stored = [run_documents({k: v for k, v in run.items() if k != "size"}, docs, run.get("size"))
                  for run, docs in runs]
        if stored:
            self.db[JOURNAL_LINKS].insert_many([doc for doc, _ in stored], ordered=True, session=session)
        metas = [meta for _, meta in stored if meta is not None]
        if metas:
            self.db[JOURNAL_RUN_META].insert_many(metas, ordered=True, session=session)
        # one statement per few pages, in one command: SecantusDB checks each deleted document
        # against the whole ``$in`` list, so one statement for 500 pages costs 500 x 500 comparisons
        chunks = [page_ids[i:i + DELETE_CHUNK] for i in range(0, len(page_ids), DELETE_CHUNK)]
        if chunks:
            self.db[JOURNAL_QUEUE if old else JOURNAL_PAGES].bulk_write(
                [DeleteMany({"_id": {"$in": chunk}}) for chunk in chunks], ordered=False, session=session)

    def move_heads(self, heads: dict[str, tuple[int, str]], at: datetime, *, session) -> None:
        """Set each chain's head to ``(seq, hash)`` (created when new)."""
        ops = [UpdateOne({"_id": pid}, {"$set": {"seq": seq, "hash": hsh, "lu": at}}, upsert=True)
               for pid, (seq, hsh) in heads.items()]
        if ops:
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
