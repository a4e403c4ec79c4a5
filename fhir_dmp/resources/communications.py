"""Communication: the notices sent to the patient, written by the server only."""
from __future__ import annotations

from ..notifications.outcomes import record_notice_outcome


def notification_result(backend, message: dict, status: str, reason: str | None) -> None:
    """Outbox worker callback: record on the Communication whether the notice went out.

    ``message`` carries ``communication_id``; ``status`` is completed, not-done or unknown (its
    hand-over was cut off, notifications/worker.py). The write goes through the repository layer (:func:`fhir_dmp.notifications.outcomes.record_notice_outcome`).
    """
    cid = message.get("communication_id")
    if cid:
        record_notice_outcome(backend.storage, cid, status, reason)
