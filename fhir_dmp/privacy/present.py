"""Review Tasks and journal entries -> what the officer's pages show (plain dicts, French labels).

Nothing here reads storage or decides access: it only reshapes what the guarded repository
already returned to the officer. Never document content: a document read is named by its id.

The queue's order (:func:`urgency`), most urgent first: emergency accesses (break-glass, centre
15) before anomalies, since an emergency access was granted without the patient's say and is
reviewed first (CNIL: break-glass accesses reviewed); among them the case waiting longest first;
anomalies by score, highest first, then the case waiting longest. A case already taken keeps its
place (the officer who took it finds it there).
"""
from __future__ import annotations

from datetime import datetime

from ..audit.events import PROFESSION_SYSTEM, event_patient
from ..notifications.outbox import VERDICT_LABELS
from ..portal.directory import Professional
from ..portal.present import MODES, journal_row, paris_time
from ..profiles.review_task import REVIEW_SYSTEM, SIGNAL_SYSTEM, case_code, coded, verdict
from ..security.decision.basis import basis_french, event_basis
from ..security.principal import IDNATPS_SYSTEM
from ..storage import instant

EMERGENCIES = ("break-glass", "centre-15")
CASE_LABELS = {"break-glass": MODES["bris_de_glace"], "centre-15": MODES["centre_15"], "anomaly": "Accès inhabituel"}
STATUS_LABELS = {"requested": "À traiter", "in-progress": "En cours", "completed": "Clos"}
SIGNAL_LABELS = {
    "no-relationship": "aucune relation de soins", "attestation-only": "attestation jamais suivie de soins",
    "same-surname": "même nom de famille que le patient", "same-place": "même lieu de vie que le patient",
    "bulk": "lecture en masse", "shared-credential": "identifiant utilisé depuis deux postes à la fois",
    "break-glass-rate": "bris de glace bien au-delà des pairs", "off-hours": "hors des heures habituelles",
}


def inputs(task: dict, code: str) -> list[dict]:
    """The Task's ``input`` entries typed ``code`` of dmp-privacy-review."""
    return [i for i in task.get("input") or () if coded(i.get("type"), REVIEW_SYSTEM) == code]


def case_actor(task: dict) -> str | None:
    """The idNatPs of the professional the case is about (input ``actor``)."""
    return next((i["valueIdentifier"].get("value") for i in inputs(task, "actor")
                 if (i.get("valueIdentifier") or {}).get("system") == IDNATPS_SYSTEM), None)


def case_patient(task: dict) -> str | None:
    ref = (task.get("for") or {}).get("reference") or ""
    return ref.split("/", 1)[1] if ref.startswith("Patient/") else None


def _score(task: dict) -> float | None:
    return next((float(i["valueDecimal"]) for i in inputs(task, "score") if i.get("valueDecimal") is not None), None)


def _label(ref: dict | None) -> str:
    ref = ref or {}
    return ref.get("display") or (ref.get("identifier") or {}).get("value") or ref.get("reference") or ""


def case_row(task: dict, patients: dict[str, str], people: dict[str, Professional]) -> dict:
    """One case as the queue and the case page show it. ``patients``: Patient id -> name;
    ``people``: idNatPs -> what the directory says of the professional."""
    code = case_code(task) or ""
    actor = case_actor(task)
    person = people.get(actor) if actor else None
    pid = case_patient(task)
    score = _score(task)
    prior = next((i.get("valueCoding") or {} for i in inputs(task, "prior-basis")), {})
    read = next((i.get("valueInteger") for i in inputs(task, "documents-read")), None)
    outcome = verdict(task)
    return {
        "id": task.get("id"),
        "code": code,
        "label": CASE_LABELS.get(code, code),
        "emergency": code in EMERGENCIES,
        "status": task.get("status"),
        "status_label": STATUS_LABELS.get(task.get("status"), task.get("status") or ""),
        "owner": _label(task.get("owner")),
        "patient_id": pid,
        "patient": patients.get(pid) or pid or "",
        "actor": actor or "",
        "actor_name": person.name if person else "",
        "actor_details": ", ".join(filter(None, (person.profession, person.specialty, person.town)))
        if person else "",
        "authored": task.get("authoredOn") or "",
        "date": paris_time(task.get("authoredOn")),
        "score": f"{score:.2f}" if score is not None else "",
        "score_value": score,
        "signals": [SIGNAL_LABELS.get(c, c) for i in inputs(task, "signal")
                    if (c := (i.get("valueCoding") or {}).get("code")) and
                    (i.get("valueCoding") or {}).get("system", SIGNAL_SYSTEM) == SIGNAL_SYSTEM],
        "reason": next((i.get("valueString") for i in inputs(task, "reason") if i.get("valueString")), ""),
        "documents_read": read,
        "prior_basis": basis_french(prior["code"]) if prior.get("code") else "",
        "focus": ((task.get("focus") or {}).get("reference") or "").removeprefix("AuditEvent/"),
        "verdict": outcome or "",
        "verdict_label": verdict_label(outcome) if outcome else "",
        "notes": [{"text": n.get("text") or "", "time": paris_time(n.get("time")),
                   "author": n.get("authorString") or _label(n.get("authorReference"))}
                  for n in task.get("note") or ()],
        "completed": task.get("status") == "completed",
    }


def verdict_label(code: str) -> str:
    """``Justifié`` / ``Injustifié`` (the words the patient's notice uses)."""
    return VERDICT_LABELS.get(code, code).capitalize()


def urgency(row: dict) -> tuple:
    """The queue's sort key, most urgent first (module docstring)."""
    if row["emergency"]:
        return (0, 0.0, row["authored"])
    return (1, -(row["score_value"] or 0.0), row["authored"])


# ----------------------------------------------------------------------------- evidence

def access_basis(event: dict) -> str:
    """The rule that decided an access (extension dmp-access-basis), else the decision's rule."""
    code = event_basis(event)
    return basis_french(code) if code else _decision_detail(event, "rule")


def _decision_detail(event: dict, kind: str) -> str:
    return next((d.get("valueString") or "" for e in event.get("entity") or ()
                 if (e.get("type") or {}).get("code") == "decision"
                 for d in e.get("detail") or () if d.get("type") == kind), "")


def documents_read(event: dict) -> list[str]:
    """The documents an access read, by reference (``DocumentReference/12``): never their content."""
    out = []
    for e in event.get("entity") or ():
        ref = (e.get("what") or {}).get("reference") or ""
        if (e.get("role") or {}).get("code") == "4" and ref.split("/", 1)[0] in ("DocumentReference", "Binary") \
                and "/" in ref:
            out.append("/".join(ref.split("/")[:2]))
    return out


def evidence_row(event: dict, people: dict[str, Professional]) -> dict:
    """One access of the case's professional to the case's DMP, as the journal holds it."""
    row = journal_row(event, event_patient(event) or "", people=people)
    return {**row, "basis": access_basis(event), "reason": _decision_detail(event, "btg_reason"),
            "documents": documents_read(event)}


def professions(events: list[dict]) -> set[str]:
    """The TRE_G15 profession codes these events' user agents acted under."""
    return {c.get("code") for e in events for r in ((e.get("agent") or [{}])[0] or {}).get("role") or ()
            for c in r.get("coding") or () if c.get("system") == PROFESSION_SYSTEM and c.get("code")}


# ----------------------------------------------------------------------------- decisions (JSON Patch)

def take() -> list[dict]:
    """The JSON Patch that takes a case: ``in-progress`` (the server makes the officer its ``owner``,
    ``review/decide.py``)."""
    return [{"op": "replace", "path": "/status", "value": "in-progress"}]


def decide(task: dict, outcome: str, note: str, author: str, at: datetime) -> list[dict]:
    """The JSON Patch that closes a case: ``completed``, ``businessStatus`` the verdict, the
    officer's note after any earlier one."""
    entry = {"text": note, "time": instant(at), "authorString": author}
    return [{"op": "replace", "path": "/status", "value": "completed"},
            {"op": "add", "path": "/businessStatus", "value": {"coding": [{
                "system": REVIEW_SYSTEM, "code": outcome, "display": VERDICT_LABELS[outcome]}]}},
            {"op": "add", "path": "/note/-", "value": entry} if task.get("note") else
            {"op": "add", "path": "/note", "value": [entry]}]
