"""FHIR resources -> what the portal pages show (plain dicts, French labels).

Nothing here reads storage or decides access: it only reshapes what the
guarded repository already returned to the signed-in person.
"""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from .directory import Professional
from ..notifications.outbox import VERDICT_LABELS
from ..profiles import dmp, review_task
from ..audit.events import ACCESS_MODE_SYSTEM, PROFESSION_LABELS, PROFESSION_SYSTEM
from ..security.decision.basis import basis_french, event_basis
from ..security.principal import BTG, ETREAT, IDNATPS_SYSTEM, PURPOSE_SYSTEM
from ..storage import instant, now

PARIS = ZoneInfo("Europe/Paris")

# CodeSystem dmp-rubrique (ig/), CONTRACT.md "Lifecycle of a DMP"
RUBRIQUES = {
    "synthese": "Synthèse", "traitements-soins": "Traitements et soins",
    "comptes-rendus": "Comptes rendus", "imagerie": "Imagerie", "biologie": "Biologie",
    "prevention": "Prévention", "certificats": "Certificats", "espace-personnel": "Espace personnel",
}
DOCUMENT_TYPES = {   # LOINC (DESIGN.md "French codes")
    "11488-4": "Compte rendu de consultation", "11490-0": "Lettre de sortie",
    "11502-2": "Compte rendu de biologie", "18748-4": "Compte rendu d'imagerie",
    "34874-8": "Compte rendu opératoire", "57833-6": "Ordonnance", "60591-5": "Synthèse médicale",
    "87273-9": "Note de vaccination",
}
MODES = {"normal": "Normal", "bris_de_glace": "Bris de glace", "centre_15": "Centre 15 (SAMU)"}
INTERACTIONS = {
    "read": "Consultation", "vread": "Consultation d'une version", "history": "Historique",
    "search": "Recherche", "create": "Création", "update": "Modification", "patch": "Modification",
    "delete": "Suppression", "transaction": "Dépôt groupé", "batch": "Lot de requêtes",
    "login": "Connexion",
}
RESOURCE_TYPES = {
    "Patient": "du dossier", "DocumentReference": "d'un document", "Binary": "du contenu d'un document",
    "Consent": "d'une autorisation", "AuditEvent": "du journal", "Communication": "d'une notification",
    "RelatedPerson": "d'un représentant légal",
}
# what a refusal adds to its basis (the "why" of every row, security/decision/basis.py): the document
# hidden inside a granted request, the patient's own choice in their words; others: the basis alone
REFUSALS = {
    "btg-opt-out": "vous refusez le bris de glace", "centre15-opt-out": "vous refusez l'accès du centre 15",
    "masque-ps": "document masqué aux professionnels", "invisible-patient": "document non visible",
    "habilitation": "profession non habilitée pour ce type de document",
    "invisible-representatives": "document non visible",
}
NO_CONTACT = "non envoyée : aucun moyen de contact (email/SMS) dans le dossier"
KIND_LABELS = {"patient": "Vous", "legal_representative": "Représentant légal",
               "admin": "Administrateur", "regulation_centre": "Centre de régulation (SAMU)"}
NOTIFICATION_STATUS = {"in-progress": "En cours d'envoi", "completed": "Envoyée", "not-done": "Non envoyée",
                       "preparation": "En préparation", "stopped": "Interrompue",
                       "unknown": "Envoi incertain (interrompu pendant la remise, non renvoyée)"}


def paris_time(value: str | None) -> str:
    """``2026-11-20T09:00:00Z`` -> ``20/11/2026 10:00`` (Europe/Paris)."""
    if not value:
        return ""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if when.tzinfo is None:
        return when.strftime("%d/%m/%Y")
    return when.astimezone(PARIS).strftime("%d/%m/%Y %H:%M")


def _first_coding(concept: dict | None, system: str | None = None) -> dict:
    for coding in (concept or {}).get("coding") or ():
        if system is None or coding.get("system") == system:
            return coding
    return {}


def _reference_label(ref: dict | None) -> str:
    ref = ref or {}
    ident = ref.get("identifier") or {}
    return ref.get("display") or ident.get("value") or ref.get("reference") or ""


# ----------------------------------------------------------------------------- documents

def document_row(doc: dict) -> dict:
    type_coding = _first_coding(doc.get("type"))
    type_label = DOCUMENT_TYPES.get(type_coding.get("code")) or type_coding.get("display") \
        or (doc.get("type") or {}).get("text") or type_coding.get("code") or "Document"
    category = next((_first_coding(c) for c in doc.get("category") or () if _first_coding(c)), {})
    rubrique = RUBRIQUES.get(category.get("code")) or category.get("display") or category.get("code")
    attachment = next(((c.get("attachment") or {}) for c in doc.get("content") or ()), {})
    return {
        "id": doc.get("id"),
        "type": type_label,
        "rubrique": rubrique or "",
        "group": rubrique or type_label,        # by rubrique when the document has one, else by type
        "date": paris_time(doc.get("date") or (doc.get("meta") or {}).get("lastUpdated")),
        "author": ", ".join(filter(None, (_reference_label(a) for a in doc.get("author") or ()))),
        "title": attachment.get("title") or doc.get("description") or "",
        "masked": dmp.MASQUE_PS in dmp.labels(doc),
        "downloadable": bool(attachment.get("url") or attachment.get("data")),
    }


def group_documents(docs: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by rubrique (the eight sections in their order first), then by type."""
    order = {label: i for i, label in enumerate(RUBRIQUES.values())}
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        row = document_row(doc)
        groups.setdefault(row["group"], []).append(row)
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))


# ----------------------------------------------------------------------------- journal

def _mode(agent: dict, event: dict) -> str:
    for policy in agent.get("policy") or ():
        if policy.startswith(ACCESS_MODE_SYSTEM + "#"):
            mode = policy.split("#", 1)[1]
            if mode in MODES:
                return mode
    purposes = [_first_coding(p, PURPOSE_SYSTEM).get("code")
                for p in (agent.get("purposeOfUse") or event.get("purposeOfEvent") or ())]
    if BTG in purposes:
        return "bris_de_glace"
    if ETREAT in purposes:
        return "centre_15"
    return "normal"


def _agent_id_nat_ps(event: dict) -> str | None:
    ident = (((event.get("agent") or [{}])[0] or {}).get("who") or {}).get("identifier") or {}
    return ident.get("value") if ident.get("system") == IDNATPS_SYSTEM else None


def journal_professionals(events: list[dict]) -> list[str]:
    """The idNatPs of the professionals these journal entries name (to look up in the directory)."""
    return sorted({ps for e in events if (ps := _agent_id_nat_ps(e))})


def journal_row(event: dict, patient_id: str, me: str | None = None,
                people: dict[str, Professional] | None = None) -> dict:
    """One journal row; ``me`` is the signed-in person's agent reference when it is not the
    patient (a legal representative: ``RelatedPerson/{id}``). A professional is named by the
    directory (``people``: idNatPs -> Professional), else by the name their token gave (journaled
    with the access); the idNatPs is only a detail."""
    agent = (event.get("agent") or [{}])[0]
    who_ref = agent.get("who") or {}
    kind = next((c.get("code") for r in agent.get("role") or () for c in r.get("coding") or ()
                 if c.get("system") == "urn:fhir-dmp:audit"), None)
    professions = [PROFESSION_LABELS.get(c.get("code")) or c.get("display") or c.get("code")
                   for r in agent.get("role") or () for c in r.get("coding") or ()
                   if c.get("system") == PROFESSION_SYSTEM]
    id_nat_ps = _agent_id_nat_ps(event)
    person = (people or {}).get(id_nat_ps) if id_nat_ps else None
    mine = False
    if who_ref.get("reference") == f"Patient/{patient_id}":
        mine = me is None or me == who_ref["reference"]
        who = "Vous" if mine else "Le patient"
    elif me is not None and who_ref.get("reference") == me:
        mine = True
        who = "Vous (représentant légal)"
    elif person:
        who = person.name
    elif id_nat_ps:
        who = agent.get("name") or who_ref.get("display") or id_nat_ps
    else:
        who = agent.get("name") or who_ref.get("display") or KIND_LABELS.get(kind) or "Système"
    subtype = ((event.get("subtype") or [{}])[0] or {}).get("code")     # a list of Coding
    target = next(((e.get("what") or {}).get("reference") for e in event.get("entity") or ()
                   if _first_coding({"coding": [e.get("role") or {}]}).get("code") == "4"), None)
    rtype = (target or "").split("/", 1)[0]
    mode = _mode(agent, event) if (id_nat_ps or professions) else "normal"
    rule = next((d.get("valueString") for e in event.get("entity") or ()
                 if (e.get("type") or {}).get("code") == "decision"
                 for d in e.get("detail") or () if d.get("type") == "rule"), None) or ""
    ok = event.get("outcome") == "0"
    if ok:
        outcome = "Autorisé"
    elif rule.startswith("notify-"):
        outcome = "Notification " + NO_CONTACT
    else:
        outcome = "Refusé — " + REFUSALS[rule] if rule in REFUSALS else "Refusé"
    return {
        "date": paris_time(event.get("recorded")),
        "why": event_why(event),
        "who": who,
        "id_nat_ps": id_nat_ps if who != id_nat_ps else None,
        "profession": ", ".join(filter(None, (person.profession, person.specialty))) if person and
        person.profession else ", ".join(professions),
        "place": person.town if person else "",
        "own_view": mine and event.get("action") in ("R", "E"),
        "mode": mode,
        "mode_label": MODES[mode],
        "action": " ".join(filter(None, (INTERACTIONS.get(subtype, subtype or "Accès"),
                                         RESOURCE_TYPES.get(rtype, "")))),
        "ok": ok,
        "outcome": outcome,
    }


def event_why(event: dict) -> str:
    """Why, in French: the event's basis (extension ``dmp-access-basis``, CONTRACT.md "Privacy
    operations"): « autorisé par le patient », « refusé : professionnel bloqué »..."""
    code = event_basis(event)
    return basis_french(code) if code else ""


def group_own_views(rows: list[dict]) -> list[dict]:
    """The rows with each run of the signed-in person's own views (reads and searches) folded
    into one ``{"own_views": count, "first", "last"}`` row: nothing is dropped, the page says how
    many and one click shows them (CONTRACT.md "The patient portal")."""
    out: list[dict] = []
    for row in rows:
        if not row.get("own_view"):
            out.append(row)
        elif out and out[-1].get("own_views"):
            out[-1]["own_views"] += 1
            out[-1]["first"] = row["date"]
        else:
            out.append({"own_views": 1, "first": row["date"], "last": row["date"]})
    return out


# ----------------------------------------------------------------------------- consents

def consent_actor(consent: dict) -> str | None:
    """The idNatPs a Consent's provision names (its first actor), or None."""
    for actor in (consent.get("provision") or {}).get("actor") or ():
        ident = (actor.get("reference") or {}).get("identifier") or {}
        if ident.get("value"):
            return ident["value"]
    return None


def consent_purposes(consent: dict) -> set[str]:
    return {p.get("code") for p in (consent.get("provision") or {}).get("purpose") or () if p.get("code")}


def classify_consents(consents: list[dict]) -> dict:
    """Active Consents as the patient's choices: authorizations, blocks, emergency opt-outs."""
    out = {"authorizations": [], "blocks": [], "optout": {BTG: None, ETREAT: None}}
    for c in consents:
        if c.get("status") != "active":
            continue
        provision = c.get("provision") or {}
        actor = consent_actor(c)
        kind = provision.get("type")
        actions = {a.get("code") for act in provision.get("action") or () for a in act.get("coding") or ()}
        row = {"id": c.get("id"), "id_nat_ps": actor, "since": paris_time(c.get("dateTime")),
               "name": next((_reference_label(a.get("reference")) for a in provision.get("actor") or ()
                             if (a.get("reference") or {}).get("display")), "")}
        if actions:
            continue                     # feeding opposition: not one of these choices
        if kind == "permit" and actor:
            out["authorizations"].append(row)
        elif kind == "deny" and actor:
            out["blocks"].append(row)
        elif kind == "deny" and not actor:
            for purpose in consent_purposes(c) & {BTG, ETREAT}:
                out["optout"][purpose] = c
    return out


def _consent(patient_id: str, kind: str, *, id_nat_ps: str | None = None, purpose: str,
             person: Professional | None = None) -> dict:
    """A patient choice, made now, about one PS (``id_nat_ps``) or everyone (profiles.dmp);
    ``person``: the directory's entry for the idNatPs (its name becomes the actor's ``display``)."""
    actor = {"identifier": {"system": IDNATPS_SYSTEM, "value": id_nat_ps}} if id_nat_ps else None
    if actor is not None and person:
        actor["display"] = person.name
    return dmp.patient_consent(patient_id, kind, purpose=purpose, at=instant(now()), actor=actor)


def authorization(patient_id: str, id_nat_ps: str, person: Professional | None = None) -> dict:
    return _consent(patient_id, "permit", id_nat_ps=id_nat_ps, purpose="TREAT", person=person)


def block(patient_id: str, id_nat_ps: str, person: Professional | None = None) -> dict:
    return _consent(patient_id, "deny", id_nat_ps=id_nat_ps, purpose="TREAT", person=person)


def emergency_optout(patient_id: str, purpose: str) -> dict:
    return _consent(patient_id, "deny", purpose=purpose)


# ----------------------------------------------------------------------------- notifications

def notification_professional(comm: dict) -> str | None:
    """The idNatPs of the professional a notice is about (``Communication.about``), or None."""
    for ref in comm.get("about") or ():
        ident = (ref or {}).get("identifier") or {}
        if ident.get("system") == IDNATPS_SYSTEM and ident.get("value"):
            return ident["value"]
    return None


def notification_row(comm: dict, people: dict[str, Professional] | None = None) -> dict:
    """One notice; the professional it is about by the directory's name, else the name the notice
    was written with, the idNatPs as a detail."""
    medium = (comm.get("medium") or [{}])[0]
    ps = notification_professional(comm)
    person = (people or {}).get(ps) if ps else None
    named = next((r.get("display") for r in comm.get("about") or () if (r or {}).get("display")), "")
    return {
        "who": person.label if person else named,
        "id_nat_ps": ps or "",
        "date": paris_time(comm.get("sent") or (comm.get("meta") or {}).get("lastUpdated")),
        "subject": (comm.get("topic") or {}).get("text") or "Notification",
        "channel": medium.get("text") or "",
        "status": comm.get("status"),
        "status_label": NOTIFICATION_STATUS.get(comm.get("status"), comm.get("status") or ""),
        "reason": (comm.get("statusReason") or {}).get("text") or "",
        "text": next((p.get("contentString") for p in comm.get("payload") or () if p.get("contentString")), ""),
    }


# ----------------------------------------------------------------------------- patient

def contacts(patient: dict) -> dict:
    out = {"email": "", "phone": ""}
    for cp in patient.get("telecom") or ():
        if cp.get("system") == "email" and not out["email"]:
            out["email"] = cp.get("value") or ""
        elif cp.get("system") in ("phone", "sms") and not out["phone"]:
            out["phone"] = cp.get("value") or ""
    return out


def with_contacts(patient: dict, email: str, phone: str) -> dict:
    """The Patient with its email and phone replaced (a mobile phone: SMS notices go there)."""
    telecom = [cp for cp in patient.get("telecom") or () if cp.get("system") not in ("email", "phone", "sms")]
    if email:
        telecom.append({"system": "email", "value": email})
    if phone:
        telecom.append({"system": "phone", "value": phone, "use": "mobile"})
    out = {k: v for k, v in patient.items() if k != "telecom"}
    if telecom:
        out["telecom"] = telecom
    return out


def patient_summary(patient: dict) -> dict:
    name = (patient.get("name") or [{}])[0]
    ins = dmp.patient_ins(patient)
    return {
        "name": " ".join(filter(None, [" ".join(name.get("given") or ()), name.get("family")])) or "",
        "ins": ins[1] if ins else "",
        "active": patient.get("active", True) is not False,
        "birth_date": patient.get("birthDate") or "",
    }


def representative_row(rp: dict) -> dict:
    name = (rp.get("name") or [{}])[0]
    rel = next((_first_coding(r) for r in rp.get("relationship") or () if _first_coding(r)), {})
    period = rp.get("period") or {}
    return {
        "name": name.get("text") or " ".join(filter(None, [" ".join(name.get("given") or ()),
                                                           name.get("family")])),
        "relationship": {"PRN": "Parent", "GUARD": "Tuteur"}.get(rel.get("code"), rel.get("display") or ""),
        "active": rp.get("active", True) is not False,
        "period": " – ".join(filter(None, (period.get("start"), period.get("end")))),
    }


# ----------------------------------------------------------------------------- review cases

def review_outcomes(tasks: list[dict]) -> dict[str, dict]:
    """``{AuditEvent id: {"verdict": "justifié"|"injustifié", "note": str}}`` of closed review cases
    (their ``focus`` is the access reviewed)."""
    out = {}
    for task in tasks:
        ref = (task.get("focus") or {}).get("reference") or ""
        verdict = review_task.verdict(task)
        if ref.startswith("AuditEvent/") and verdict:
            out[ref.split("/", 1)[1]] = {"verdict": VERDICT_LABELS.get(verdict, verdict),
                                         "note": review_task.note_text(task)}
    return out
