"""Review cases through the guard: the case an emergency access opens, and what the privacy
officer's update of a case writes besides it (CONTRACT.md "Privacy operations").

The case of a break-glass grant or of a centre 15 access is opened in the transaction that writes
the access's journal (``RequestJournal.flush``'s effects, ``guard/dmp.py``): it names that first
AuditEvent (its id is known before the effects run), the professional, their reason, the documents
that request read and the basis they had before (the same decision in normal mode). When the
officer takes or closes it, ``documents-read`` is computed again from the journal; when they
close it, its key is freed (centre 15) and the patient is told the verdict (email/SMS and a
Communication, in the update's transaction). Opening is ``fhir_dmp/review/cases.py``, the
allowed changes ``fhir_dmp/review/decide.py``.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from ..audit.events import SUBJECT_SYSTEM
from ..notifications.outbox import Notice
from ..profiles import validate
from ..security.decision.basis import basis_coding, rule_basis
from ..profiles.review_task import REVIEW_SYSTEM, case_code, coded, note_text, verdict
from ..review import ReviewCase, case_input, open_case
from ..review.decide import next_version, with_documents_read
from ..security.principal import BTG, ETREAT, TREAT
from ..storage import now

#: the access mode a case reviews: (purpose of use journaled, TRE_R248 mode told to the patient)
CASE_MODES = {"break-glass": (BTG, "bris_de_glace"), "centre-15": (ETREAT, "centre_15"), "anomaly": (None, "normal")}
#: documents read shortly before the case was authored count (the first request's events are dated first)
EARLIER = timedelta(seconds=60)


class ReviewOperations:
    """The review side of :class:`~fhir_dmp.guard.repository.GuardedRepository` (module docstring).

    Uses what the repository holds (``p``, ``access``, ``storage``, ``config``, ``journal``,
    ``audit_log``) and its ``notify``.
    """

    def open_access_case(self, code: str, pid: str, key: str, *, session, release: bool = False) -> str | None:
        """Open the review case of this caller's emergency access to ``pid`` (in a flush's effect)."""
        inputs = []
        if self.p.btg_reason:
            inputs.append(case_input("reason", valueString=self.p.btg_reason))
        inputs.append(case_input("documents-read", valueInteger=self.journal.documents_read(pid)))
        ordinary = self.access.policy.for_request(replace(self.p, purpose=TREAT))
        before = ordinary.dmp_access(ordinary.state(pid))
        prior = rule_basis(before.rule, before.permit) if before.permit else None
        if prior:
            inputs.append(case_input("prior-basis", valueCoding=basis_coding(prior)))
        case = ReviewCase(code=code, patient_id=pid, actor=self.p.id_nat_ps, focus=self.journal.first_event(pid),
                          inputs=inputs, key=key, release=release)
        return open_case(self.storage, case, session=session, audit_log=self.audit_log,
                         source_observer=self.config.fhir_base)

    def prepare_task(self, old: dict, new: dict) -> dict:
        """The version of a review case the officer's update stores (``review/decide.py``)."""
        owner = {"identifier": {"system": SUBJECT_SYSTEM, "value": self.p.subject}, "display": self.p.name or self.p.subject}
        out = next_version(old, new, owner=owner, at=now())
        if out["status"] != old.get("status"):
            count = self._documents_read(old)
            if count is not None:
                out = with_documents_read(out, count)
        return validate(out, resource_type="Task")

    def _documents_read(self, task: dict) -> int | None:
        """Documents the professional read in that DMP under the case's access mode, from the case's
        opening (a minute before) to now, or to the end of the grant (None: not an emergency case)."""
        purpose = CASE_MODES.get(case_code(task), (None, None))[0]
        actor = _actor(task)
        if purpose is None or not actor:
            return None
        authored = _when(task)
        until = authored + timedelta(seconds=self.config.break_glass_ttl) if purpose == BTG else None
        return self.storage.count_document_reads(_pid(task), actor, purpose, authored - EARLIER, until)

    def task_written(self, stored, old: dict | None, session) -> None:
        """After the officer's update: a case just closed frees its key and tells the patient."""
        task = stored.resource or {}
        if task.get("status") != "completed" or (old or {}).get("status") == "completed":
            return
        self.storage.release_review_keys(stored.id, session=session)
        note = note_text(task)
        notice = Notice(kind="review_outcome", patient_id=stored.pid, actor_name=None, actor_profession=None,
                        actor_id=_actor(task), mode=CASE_MODES.get(case_code(task), (None, "normal"))[1],
                        when=_when(task), reason=note or None, verdict=verdict(task))
        self.notify("review_outcome", stored.pid, session=session, notice=notice)


def _actor(task: dict) -> str | None:
    """The idNatPs of the case's ``actor`` input."""
    return next((i.get("valueIdentifier", {}).get("value") for i in task.get("input") or ()
                 if coded(i.get("type"), REVIEW_SYSTEM) == "actor"), None)


def _when(task: dict) -> datetime:
    return datetime.fromisoformat(task["authoredOn"].replace("Z", "+00:00"))


def _pid(task: dict) -> str:
    return task["for"]["reference"].split("/", 1)[1]
