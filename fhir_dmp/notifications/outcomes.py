"""The outcome of a notice, written on its Communication once the worker sent it or gave it up."""
from __future__ import annotations

from ..storage import VersionConflict, instant, now


def record_notice_outcome(storage, cid: str, status: str, reason: str | None) -> None:
    """The server's own write of a notice's outcome on its Communication (``completed`` with
    ``sent``, or ``not-done`` / ``unknown`` with the reason), in one transaction through ``with_transaction``;
    a concurrent change of the Communication is re-read and tried again (a few times)."""
    def write(session) -> bool:
        current = storage.read("Communication", cid, session=session)
        if current is None or current.deleted or current.resource.get("status") == status:
            return True
        res = dict(current.resource, status=status)
        if status == "completed":
            res["sent"] = instant(now())
        if reason and status != "completed":
            res["statusReason"] = {"text": reason[:500]}
        try:
            storage.update("Communication", cid, res, pid=current.pid, expected_vid=current.vid, session=session)
        except VersionConflict:
            return False
        return True

    for _ in range(5):
        if storage.run_transaction(write):
            return


