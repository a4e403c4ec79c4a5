"""The notification outbox: notices to send (collection ``notification_outbox``; notifications/
builds and sends them).

Contract: a notice is queued in the transaction of the change it tells of; a worker takes one
due message atomically (:meth:`OutboxStore.claim_notice`, a lease), and completes it only while
it still holds it; writes are durable (``w: majority, j: true``).
"""
from __future__ import annotations

from datetime import datetime

from pymongo import ReturnDocument, WriteConcern

from .core import OUTBOX, StoreCore
from .errors import translate_methods


@translate_methods
class OutboxStore(StoreCore):
    """The outbox's queries (module docstring)."""

    def _outbox(self):
        return self.db.get_collection(OUTBOX, write_concern=WriteConcern(w="majority", j=True))

    def ensure_outbox_indexes(self) -> None:
        coll = self.db[OUTBOX]
        coll.create_index([("status", 1), ("next_attempt_at", 1)], name="due")
        coll.create_index([("status", 1), ("lease_until", 1)], name="lease")
        coll.create_index([("communication_id", 1)], name="communication")

    def queue_notices(self, docs: list[dict], *, session=None, pending: list | None = None) -> None:
        """Insert notices (in ``session``'s transaction when given); ``pending``: append them to this
        list of the transaction's inserts not sent yet instead (``insert_docs`` sends it, inside the
        transaction: its commit's write concern is the one that counts)."""
        if pending is not None:
            pending.extend((OUTBOX, doc) for doc in docs)
            return
        self._outbox().insert_many(docs, session=session)

    def claim_notice(self, channels: list[str], worker_id: str, now: datetime, lease) -> dict | None:
        """Atomically take one due message of ``channels`` (or one whose lease expired)."""
        return self._outbox().find_one_and_update(
            {"channel": {"$in": channels},
             "$or": [{"status": "pending", "next_attempt_at": {"$lte": now}},
                     {"status": "sending", "lease_until": {"$lte": now}}]},
            {"$set": {"status": "sending", "claimed_by": worker_id, "lease_until": now + lease},
             "$inc": {"attempts": 1}},
            sort=[("next_attempt_at", 1)],
            return_document=ReturnDocument.AFTER,
        )

    def notice_state(self, mid: str) -> dict | None:
        return self._outbox().find_one({"_id": mid}, {"status": 1, "sent_at": 1})

    def hand_over_notice(self, mid: str, worker_id: str, now: datetime) -> bool:
        """Record that this worker, still holding the message, starts handing it to the transport
        (``handed_over_at``); False when it lost the message to another worker."""
        return self._outbox().find_one_and_update(
            {"_id": mid, "claimed_by": worker_id, "status": "sending"},
            {"$set": {"handed_over_at": now}}) is not None

    def mark_notice_sent(self, mid: str, worker_id: str, now: datetime, *, forget_body: bool,
                         outcome_unknown: bool = False) -> dict | None:
        """The message as sent (None when another worker completed it first; this worker may mark
        it again, when it cannot tell whether its first try was applied); ``outcome_unknown``: its
        hand-over was cut off, it is not sent again (notifications/worker.py)."""
        return self._outbox().find_one_and_update(
            {"_id": mid, "$or": [{"status": {"$ne": "sent"}}, {"claimed_by": worker_id}]},
            {"$set": {"status": "sent", "sent_at": now, "lease_until": None, "last_error": None,
                      "outcome_unknown": outcome_unknown, **({"body": None} if forget_body else {})}},
            return_document=ReturnDocument.AFTER)

    def update_claimed_notice(self, mid: str, worker_id: str, changes: dict) -> dict | None:
        """Set ``changes`` on a message this worker still holds; the message after, or None."""
        return self._outbox().find_one_and_update(
            {"_id": mid, "claimed_by": worker_id, "status": "sending"}, {"$set": changes},
            return_document=ReturnDocument.AFTER)
