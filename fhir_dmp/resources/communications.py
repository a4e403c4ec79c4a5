"""Communication: the notices sent to the patient, written by the server only."""
from __future__ import annotations

import logging

from ..storage import VersionConflict

log = logging.getLogger(__name__)


def notification_result(backend, message: dict, status: str, reason: str | None) -> None:
    """Outbox worker callback: record on the Communication whether the notice went out.

    ``message`` carries ``communication_id``; ``status`` is completed or not-done.
    """
    cid = message.get("communication_id")
    if not cid:
        return
    storage = backend.storage
    for _ in range(5):
        current = storage.read("Communication", cid)
        if current is None or current.deleted:
            return
        res = dict(current.resource)
        if res.get("status") == status:
            return
        res["status"] = status
        if status == "completed":
            from ..storage import instant, now
            res["sent"] = instant(now())
        if reason and status == "not-done":
            res["statusReason"] = {"text": reason[:500]}
        try:
            with storage.transaction() as session:
                storage.update("Communication", cid, res, pid=current.pid, expected_vid=current.vid,
                               session=session)
            return
        except VersionConflict:
            continue
