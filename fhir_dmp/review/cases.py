"""Opening review cases: one ``Task`` per case key, written by the server itself.

CONTRACT.md "Privacy operations". A :class:`ReviewCase` names its kind (``code``), the DMP
(``patient_id``), the professional (``actor``, idNatPs), the first AuditEvent of the access
(``focus``), its evidence (``inputs``, FHIR ``Task.input`` entries: :func:`case_input`) and its
``key``. Contract:

- never two cases for one key (``Storage.claim_review_key`` in the opening transaction); a key
  opened with ``release`` is free again once its case is completed (centre 15: one open case per
  regulation-centre professional and DMP until the officer closes it); break-glass cases are keyed
  by their grant, anomaly cases by their (professional, DMP) pair, never freed;
- each case is journaled in its DMP's journal as written by the server (:data:`SERVER_PRINCIPAL`),
  in the transaction that stores the Task;
- :func:`open_cases` opens at most ``budget`` ``anomaly`` cases per UTC day, counted from the stored
  Tasks (other kinds are never held back: an emergency access is always reviewed).

The break-glass and centre 15 cases are opened by the guard (``guard/dmp.py``) with :func:`open_case`
inside the transaction of the grant or of the access's journal; the misuse scan calls
:func:`open_cases`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..audit.events import AccessRecord, build_event
from ..audit.log import AuditLog
from ..profiles import validate
from ..profiles.review_task import PROFILE_TASK, REVIEW_SYSTEM
from ..security.principal import IDNATPS_SYSTEM, SERVER, Principal
from ..security.scopes import Scopes
from ..storage import instant, new_id
from ..storage import now as storage_now

#: the server, as the journal names it when it opens a case on its own
SERVER_PRINCIPAL = Principal(kind=SERVER, subject="fhir-dmp", scopes=Scopes.parse("system/Task.c"),
                             name="fhir-dmp (serveur)")
CASE_DISPLAY = {"break-glass": "accès en bris de glace", "centre-15": "accès du centre 15 (SAMU)",
                "anomaly": "accès inhabituel"}
INPUT_DISPLAY = {"actor": "professionnel", "reason": "motif", "documents-read": "documents lus",
                 "prior-basis": "droit antérieur", "score": "score", "signal": "signal"}
ANOMALY = "anomaly"


@dataclass(frozen=True)
class ReviewCase:
    """One case to open (module docstring). ``inputs``: ``Task.input`` entries besides the
    ``actor`` one, which the Task always gets from ``actor``."""

    code: str                  # break-glass | centre-15 | anomaly (dmp-privacy-review)
    patient_id: str
    actor: str                 # the professional's idNatPs
    focus: str | None          # the id of the first AuditEvent of the access
    inputs: list[dict] = field(default_factory=list)
    key: str = ""              # never two cases for one key
    release: bool = False      # the key is free again once the case is completed


def case_input(code: str, **value) -> dict:
    """A ``Task.input`` typed by ``code`` of dmp-privacy-review: ``case_input("score",
    valueDecimal=0.93)``, ``case_input("signal", valueCoding={...})``."""
    return {"type": {"coding": [{"system": REVIEW_SYSTEM, "code": code, "display": INPUT_DISPLAY.get(code, code)}]},
            **value}


def build_task(case: ReviewCase, at: datetime) -> dict:
    """The review ``Task`` of ``case`` (profile ``dmp-review-task``), status ``requested``."""
    task = {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE_TASK]},
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": REVIEW_SYSTEM, "code": case.code, "display": CASE_DISPLAY.get(case.code)}]},
        "description": f"revue : {CASE_DISPLAY.get(case.code, case.code)}",
        "for": {"reference": f"Patient/{case.patient_id}"},
        "authoredOn": instant(at),
        "lastModified": instant(at),
        "input": [case_input("actor", valueIdentifier={"system": IDNATPS_SYSTEM, "value": case.actor}),
                  *case.inputs],
    }
    if case.focus:
        task["focus"] = {"reference": f"AuditEvent/{case.focus}"}
    return validate(task, resource_type="Task")


def open_case(storage, case: ReviewCase, *, session, audit_log, source_observer: str,
              at: datetime | None = None) -> str | None:
    """Open ``case`` in ``session``'s transaction: its key claimed, its Task stored, its AuditEvent
    appended (the server as author). The Task's id, or None when the key has a case already."""
    at = at or storage_now()
    tid = new_id()
    if not storage.claim_review_key(case.key or f"{case.code}|{tid}", tid, case.patient_id,
                                    release=case.release, session=session):
        return None
    storage.create("Task", build_task(case, at), pid=case.patient_id, rid=tid, session=session)
    record = AccessRecord(interaction="create", action="C", outcome="0", principal=SERVER_PRINCIPAL,
                          patient_id=case.patient_id, resource=f"Task/{tid}", query=None,
                          decision={"result": "permit", "rule": "privacy-review",
                                    "reason": f"review case opened ({case.code})", "consents": []},
                          http_status=201, client_ip=None, request_id=None, recorded=at)
    audit_log.append([build_event(record, source_observer=source_observer)], session=session)
    return tid


def _day(at: datetime) -> tuple[str, str]:
    start = at.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return instant(start), instant(start + timedelta(days=1))


def open_cases(storage, cases: Iterable[ReviewCase], *, budget: int | None = None, now: datetime | None = None,
               audit_log=None, source_observer: str = "fhir-dmp") -> list[str]:
    """Open ``cases`` in order, one transaction each (the server writes them: module docstring).

    Returns the ids of the Tasks opened; a case whose key has one already, or whose DMP does not
    exist (or was deleted, or destroyed meanwhile), is skipped. With
    ``budget``, at most that many ``anomaly`` cases are authored per UTC day (those already stored
    today count): the first ones of ``cases`` go first, so give them most suspicious first.
    ``audit_log``: the process's journal (else one over ``storage``).
    """
    audit_log = audit_log or AuditLog(storage)
    opened: list[str] = []
    for case in cases:
        at = now or storage_now()

        def attempt(session, case=case, at=at):
            patient = storage.read("Patient", case.patient_id, session=session)
            if patient is None or patient.deleted:
                return None           # no such DMP (any more): nothing to review
            if case.code == ANOMALY and budget is not None:
                since, until = _day(at)
                if storage.count_tasks_authored(ANOMALY, since, until, session=session) >= budget:
                    return False
            return open_case(storage, case, session=session, audit_log=audit_log,
                             source_observer=source_observer, at=at)

        tid = storage.run_transaction(attempt)
        if tid and storage.was_destroyed(case.patient_id):
            # its DMP was destroyed after this transaction read it: nothing of it may stay
            storage.run_transaction(lambda s, pid=case.patient_id: storage.purge_dmp(pid, session=s))
        elif tid:    # None: no DMP, or its key has a case; False: the day's budget is spent
            opened.append(tid)
    return opened
