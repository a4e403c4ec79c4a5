"""A DMP's lifecycle as stored: closed/reopened stamps, the purge of a destroyed DMP, and the
daily jobs' leases (collection ``scheduled_jobs``; guard/lifecycle.py decides, this stores).

Contract: ``closed_at`` lives beside the stored Patient (not in the resource) and retention
counts from it; :meth:`LifecycleStore.purge_dmp` removes every trace of a DMP in the caller's
transaction, in a fixed order (data keys first: the content is unreadable from the first
step), and leaves a ``destroyed`` head in the journal's chains so that ``audit verify`` tells a
destroyed chain from a deleted one; a daily job runs once per period across processes.
"""
from __future__ import annotations

from datetime import datetime

from pymongo import ReturnDocument

from ..audit.chain import GENESIS
from .core import (ACCESS_CODES, BLOBS, CHUNKS, COMPARTMENT_TYPES, DATAKEYS, GRANT_LOCKS, GRANTS, JOBS, JOURNAL,
                   JOURNAL_HEADS, JOURNAL_LINKS, JOURNAL_PAGES, JOURNAL_QUEUE, JOURNAL_RUN_META, OUTBOX,
                   PRIVACY_SCANS, REVIEW_KEYS, StoreCore)
from .errors import translate_methods


@translate_methods
class LifecycleStore(StoreCore):
    """Closing, reopening and purging a DMP; daily job leases (module docstring)."""

    def mark_closed(self, pid: str, at: datetime, *, session=None) -> None:
        """``closed_at`` beside the stored Patient (not part of the resource): retention counts from it."""
        self.db["Patient"].update_one({"_id": pid}, {"$set": {"closed_at": at}}, session=session)

    def mark_reopened(self, pid: str, *, session=None) -> None:
        """A reopened DMP: no ``closed_at`` (no retention runs for it)."""
        self.db["Patient"].update_one({"_id": pid}, {"$unset": {"closed_at": ""}}, session=session)

    def closed_before(self, limit: datetime) -> list[str]:
        """Ids of the DMPs closed at or before ``limit``."""
        return [d["_id"] for d in self.db["Patient"].find(
            {"closed_at": {"$lte": limit}, "res.active": False}, {"_id": 1})]

    def purge_dmp(self, pid: str, *, session) -> dict:
        """Remove every trace of DMP ``pid`` inside ``session``'s transaction; counts by collection
        (lifecycle.purge_dmp states what goes and in which order)."""
        counts = {}

        def gone(name: str, flt: dict) -> None:
            counts[name] = counts.get(name, 0) + self.db[name].delete_many(flt, session=session).deleted_count

        gone(DATAKEYS, {"_id": pid})
        gone(BLOBS, {"p": pid})
        gone(CHUNKS, {"p": pid})
        for rtype in COMPARTMENT_TYPES:
            gone(rtype, {"pid": pid})
            gone(f"{rtype}_history", {"pid": pid})
        gone("Patient", {"_id": pid})
        gone("Patient_history", {"rid": pid})
        gone(GRANTS, {"pid": pid})
        gone(GRANT_LOCKS, {"pid": pid})
        gone(OUTBOX, {"patient_id": pid})
        gone(ACCESS_CODES, {"pid": pid})
        gone(REVIEW_KEYS, {"pid": pid})
        gone(PRIVACY_SCANS, {"pid": pid})
        # sealed and not yet sealed events alike (the sealer derives entries from pages after the
        # fact); a page changed counts in ``v`` (the read-through's memo: storage/pages.py)
        gone(JOURNAL, {"pid": pid})
        gone(JOURNAL_LINKS, {"pid": pid})
        gone(JOURNAL_RUN_META, {"pid": pid})
        self.db[JOURNAL_PAGES].update_many({"events.pid": pid}, {"$pull": {"events": {"pid": pid}}, "$inc": {"v": 1}},
                                           session=session)
        self.db[JOURNAL_PAGES].delete_many({"events": {"$size": 0}}, session=session)   # nothing left to seal
        # the previous version's queue (``{_id, t, items: [{e, p, d}]}``), sealed first by the sealer
        self.db[JOURNAL_QUEUE].update_many({"items.p": pid}, {"$pull": {"items": {"p": pid}}}, session=session)
        self.db[JOURNAL_QUEUE].delete_many({"items": {"$size": 0}}, session=session)
        gone(JOURNAL_HEADS, {"_id": pid})
        # the signed checkpoints still name the chain's last head: say it was destroyed (an id and
        # a date, nothing personal) so that `audit verify` does not take it for a deleted chain
        self.db[JOURNAL_HEADS].insert_one({"_id": pid, "seq": 0, "hash": GENESIS, "destroyed": True},
                                          session=session)
        return counts

    def was_destroyed(self, pid: str) -> bool:
        """The DMP is gone and its journal head says it was destroyed (not merely never existed)."""
        if self.db["Patient"].find_one({"_id": pid}, {"_id": 1}) is not None:
            return False
        return self.db[JOURNAL_HEADS].find_one({"_id": pid, "destroyed": True}, {"_id": 1}) is not None

    def claim_daily_run(self, job: str, owner: str, at: datetime, period) -> bool:
        """True for exactly one caller per ``period`` across processes (compare-and-set on ``next_run``)."""
        self.db[JOBS].update_one({"_id": job}, {"$setOnInsert": {"next_run": at}}, upsert=True)
        doc = self.db[JOBS].find_one_and_update(
            {"_id": job, "next_run": {"$lte": at}},
            {"$set": {"next_run": at + period, "owner": owner, "started": at}},
            return_document=ReturnDocument.AFTER)
        return doc is not None
