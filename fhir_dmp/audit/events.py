"""The journal's events: IHE BALP shaped AuditEvents, one per access and per patient touched.

DESIGN.md "Audit (IHE BALP shape)". One AuditEvent per access and per patient
touched, denials and errors included. The guarded repository records an
:class:`AccessRecord` for each access as it decides, turns them into
resources with :func:`build_event` and hands them to
:meth:`fhir_dmp.audit.log.AuditLog.append`: inside the write's transaction for
writes, before the response leaves for reads (``http/app.py`` ``after_request``);
when the append fails the request fails closed (503).

Shape: IHE Basic Audit Log Patterns (BALP), "RESTful activities"
https://profiles.ihe.net/ITI/BALP/content.html#3573-restful-activities
(type ``rest``, subtype the restful interaction, user agent + client agent,
patient entity, domain-resource entity, query entity in base64) on the FHIR R4
AuditEvent https://hl7.org/fhir/R4/auditevent.html.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone

from ..security.decision.basis import BASIS_EXTENSION, basis_coding, outside_dmp_basis, rule_basis
from ..security.principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE, PATIENT, PS,
                                  PURPOSE_SYSTEM, REGULATION_CENTRE, TREAT, Principal)
from ..storage import instant

# --- code systems -----------------------------------------------------------
EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP_ENTITY_SYSTEM = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
PROFESSION_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante"
ACCESS_MODE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R248"
ROLE_CLASS_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
CLIENT_ID_SYSTEM = "urn:ietf:params:oauth:client-id"
SUBJECT_SYSTEM = "urn:fhir-dmp:subject"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
USER_AGENT_MAX = 256
# local code system for what no published code system says
DMP_AUDIT_SYSTEM = "urn:fhir-dmp:audit"

INTERACTIONS = {
    "read", "vread", "update", "patch", "delete", "history", "history-instance",
    "history-type", "history-system", "create", "search", "search-type", "search-system",
    "capabilities", "transaction", "batch", "operation",
}
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}

_PURPOSE_DISPLAY = {TREAT: "treatment", BTG: "break the glass", ETREAT: "emergency treatment"}
_ROLE_DISPLAY = {
    PATIENT: "Patient", LEGAL_REPRESENTATIVE: "Représentant légal", PS: "Professionnel de santé",
    REGULATION_CENTRE: "Centre de régulation (SAMU-Centre 15)", ADMIN: "Administrateur",
}
PROFESSION_LABELS = {
    "10": "Médecin", "21": "Pharmacien", "40": "Chirurgien-dentiste", "50": "Sage-femme",
    "60": "Infirmier", "70": "Masseur-kinésithérapeute",
}



@dataclass
class AccessRecord:
    """What the guard knows about one interaction and one patient touched.

    ``interaction``: a http://hl7.org/fhir/restful-interaction code; ``action``
    C R U D E; ``outcome`` "0" success, "4" minor failure (denied, not found,
    bad request), "8" serious failure (server error). ``resource`` is a
    relative reference (``DocumentReference/123/_history/2``); ``query`` the
    raw query string of a search (stored base64). ``decision`` is
    ``{"result": "permit"|"deny", "rule": str, "reason": str,
    "consents": [["Consent/1", "2"], ...], "basis": {"code": str, "consents": [[ref, vid], ...],
    "patient": [ref, vid] | None}}`` (``basis``: the rule that decided for the DMP,
    :meth:`~fhir_dmp.security.decision.RequestAccess.complete`; without it, the event's own rule
    decides or, with none, who the caller is). ``user_agent``: the HTTP User-Agent.
    """

    interaction: str
    action: str
    outcome: str
    principal: Principal | None
    patient_id: str | None
    resource: str | None
    query: str | None
    decision: dict | None
    http_status: int | None
    client_ip: str | None
    request_id: str | None
    recorded: datetime | None = None
    user_agent: str | None = None


# --- the event ----------------------------------------------------------------

def _coding(system: str, code: str, display: str | None = None) -> dict:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _user_agent(p: Principal | None, client_ip: str | None) -> dict:
    """agent[0]: the human user (BALP "user" agent, type IRCP, requestor)."""
    agent: dict = {
        "type": {"coding": [_coding(PARTICIPATION_SYSTEM, "IRCP", "information recipient")]},
        "requestor": True,
    }
    if p is None:
        agent["who"] = {"display": "anonymous"}
    else:
        if p.id_nat_ps:
            who = {"identifier": {"system": IDNATPS_SYSTEM, "value": p.id_nat_ps}}
        elif p.kind == PATIENT and p.patient_id:
            who = {"reference": f"Patient/{p.patient_id}"}
        elif p.kind == LEGAL_REPRESENTATIVE and p.related_person_id:
            who = {"reference": f"RelatedPerson/{p.related_person_id}"}
        else:  # admin, unknown: the token subject
            who = {"identifier": {"system": SUBJECT_SYSTEM, "value": p.subject}}
        if p.name:
            who["display"] = p.name
        agent["who"] = who
        agent["altId"] = p.subject
        if p.name:
            agent["name"] = p.name
        roles = [{"coding": [_coding(DMP_AUDIT_SYSTEM, p.kind, _ROLE_DISPLAY.get(p.kind))]}]
        if p.kind == PATIENT:
            roles[0]["coding"].append(_coding(ROLE_CLASS_SYSTEM, "PAT", "patient"))
        for code in p.professions:
            code = code.split("^", 1)[0]
            roles.append({"coding": [_coding(PROFESSION_SYSTEM, code, PROFESSION_LABELS.get(code))]})
        agent["role"] = roles
        if p.is_professional:
            agent["purposeOfUse"] = [{"coding": [_coding(PURPOSE_SYSTEM, p.purpose,
                                                         _PURPOSE_DISPLAY.get(p.purpose))]}]
            agent["policy"] = [f"{ACCESS_MODE_SYSTEM}#{p.mode}"]
    if client_ip:
        agent["network"] = {"address": client_ip, "type": "2"}  # 2 = IP address
    return agent


def _organization_agent(organization: str) -> dict:
    """The establishment the professional acts through (AIR mode, token claim ``organization``
    ``system|value``, FINESS): the journal names both the PS and the establishment."""
    system, sep, value = organization.partition("|")
    ident = {"system": system, "value": value} if sep and system and value else {"value": organization}
    return {
        "type": {"coding": [_coding(DICOM_SYSTEM, "110150", "Application")]},
        "role": [{"coding": [_coding(DMP_AUDIT_SYSTEM, "organization", "établissement")]}],
        "who": {"identifier": ident},
        "requestor": False,
    }


def _client_agent(p: Principal) -> dict:
    """agent[1]: the client application (BALP "client" agent, Source Role ID)."""
    return {
        "type": {"coding": [_coding(DICOM_SYSTEM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": p.client_id}},
        "requestor": False,
    }


def _decision_entity(rec: AccessRecord) -> dict | None:
    d = rec.decision or {}
    p = rec.principal
    details = []
    for key in ("result", "rule", "reason"):
        if d.get(key):
            details.append({"type": key, "valueString": str(d[key])})
    for consent in d.get("consents") or ():
        ref, version = (consent[0], consent[1]) if len(consent) > 1 else (consent[0], None)
        value = f"{ref}/_history/{version}" if version else str(ref)
        details.append({"type": "consent", "valueString": value})
    if rec.http_status is not None:
        details.append({"type": "http_status", "valueString": str(rec.http_status)})
    if p is not None and p.purpose == BTG and p.btg_reason:
        details.append({"type": "btg_reason", "valueString": p.btg_reason})
    if rec.user_agent:
        details.append({"type": "user-agent", "valueString": rec.user_agent[:USER_AGENT_MAX]})
    if not details:
        return None
    return {
        "type": _coding(DMP_AUDIT_SYSTEM, "decision", "access decision"),
        "description": "décision d'accès",
        "detail": details,
    }


def record_basis(rec: AccessRecord) -> dict:
    """The record's basis (``decision["basis"]``); for records built outside a repository (a
    refused token, a portal sign-in), the one their own rule decides, else who the caller is."""
    d = rec.decision or {}
    if d.get("basis"):
        return d["basis"]
    granted = d.get("result", "permit" if rec.outcome == "0" else "deny") == "permit"
    kind = rec.principal.kind if rec.principal is not None else None
    return {"code": rule_basis(d.get("rule"), granted) or outside_dmp_basis(kind, granted),
            "consents": [], "patient": None}


def _basis_entities(basis: dict) -> list[dict]:
    """The Consents that decided (IHE BALP AuthZ consent entity) and, for the médecin traitant, the
    Patient version naming the GP, each by version."""
    out = [{"what": {"reference": f"{ref}/_history/{vid}"},
            "type": _coding(RESOURCE_TYPES_SYSTEM, "Consent", "Consent")}
           for ref, vid in basis.get("consents") or ()]
    if basis.get("patient"):
        ref, vid = basis["patient"]
        out.append({"what": {"reference": f"{ref}/_history/{vid}"},
                    "type": _coding(RESOURCE_TYPES_SYSTEM, "Patient", "Patient"),
                    "description": "médecin traitant (generalPractitioner)"})
    return out


def build_event(rec: AccessRecord, *, source_observer: str) -> dict:
    """The R4 AuditEvent (IHE BALP RESTful shape) for one access and one patient.

    - type ``rest``, subtype the interaction, action, recorded, outcome, and
      ``outcomeDesc`` = the decision reason (never medical content);
    - agent[0] the user: who (idNatPs identifier, ``Patient/x`` for the
      patient, the token subject otherwise), type IRCP, role (principal kind
      in ``urn:fhir-dmp:audit`` + TRE_G15 professions), requestor true,
      purposeOfUse TREAT/BTG/ETREAT and policy ``TRE_R248#<mode>`` for
      professionals, network address; ``who.display`` "anonymous" when
      unauthenticated;
    - agent[1] the client app (client_id), requestor false, when known;
    - source.observer the server;
    - entity: patient (role 1), resource (role 4), query (role 24, base64),
      the request id (BALP XrequestId) and the decision (type ``decision``,
      detail result/rule/reason/consent/http_status/btg_reason/user-agent);
    - the extension ``dmp-access-basis`` (the rule that decided for the DMP, CONTRACT.md
      "Privacy operations"), with an entity per deciding Consent version (IHE BALP AuthZ consent)
      and, for the médecin traitant, the Patient version naming the GP.

    No ``id``/``meta``: :meth:`AuditLog.append` assigns them.
    """
    if rec.interaction not in INTERACTIONS:
        raise ValueError(f"unknown interaction {rec.interaction!r}")
    if rec.action not in ACTIONS:
        raise ValueError(f"unknown action {rec.action!r}")
    if rec.outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {rec.outcome!r}")
    recorded = rec.recorded or datetime.now(timezone.utc)
    p = rec.principal
    basis = record_basis(rec)
    event: dict = {
        "resourceType": "AuditEvent",
        "extension": [{"url": BASIS_EXTENSION, "valueCoding": basis_coding(basis["code"])}],
        "type": _coding(EVENT_TYPE_SYSTEM, "rest", "Restful Operation"),
        "subtype": [_coding(INTERACTION_SYSTEM, rec.interaction, rec.interaction)],
        "action": rec.action,
        "recorded": instant(recorded),
        "outcome": rec.outcome,
    }
    reason = (rec.decision or {}).get("reason")
    if reason:
        event["outcomeDesc"] = str(reason)
    if p is not None and p.is_professional:
        event["purposeOfEvent"] = [{"coding": [_coding(PURPOSE_SYSTEM, p.purpose,
                                                       _PURPOSE_DISPLAY.get(p.purpose))]}]
    agents = [_user_agent(p, rec.client_ip)]
    if p is not None and p.organization:
        agents.append(_organization_agent(p.organization))
    if p is not None and p.client_id:
        agents.append(_client_agent(p))
    event["agent"] = agents
    event["source"] = {
        "observer": {"display": source_observer},
        "type": [_coding(SOURCE_TYPE_SYSTEM, "4", "Application Server")],
    }
    entities = []
    if rec.patient_id:
        entities.append({
            "what": {"reference": f"Patient/{rec.patient_id}"},
            "type": _coding(ENTITY_TYPE_SYSTEM, "1", "Person"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "1", "Patient"),
        })
    if rec.resource:
        entities.append({
            "what": {"reference": rec.resource},
            "type": _coding(ENTITY_TYPE_SYSTEM, "2", "System Object"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "4", "Domain Resource"),
        })
    if rec.query is not None:
        entities.append({
            "type": _coding(ENTITY_TYPE_SYSTEM, "2", "System Object"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "24", "Query"),
            "query": base64.b64encode(rec.query.encode("utf-8")).decode("ascii"),
        })
    if rec.request_id:
        entities.append({
            "what": {"identifier": {"value": rec.request_id}},
            "type": _coding(BALP_ENTITY_SYSTEM, "XrequestId", "X-Request-Id"),
        })
    entities += _basis_entities(basis)
    decision = _decision_entity(rec)
    if decision:
        entities.append(decision)
    if entities:
        event["entity"] = entities
    return event


def event_patient(event: dict) -> str | None:
    """The patient id of an event's patient entity (role 1), or None."""
    for ent in event.get("entity") or ():
        role = ent.get("role") or {}
        ref = (ent.get("what") or {}).get("reference") or ""
        if role.get("system") == OBJECT_ROLE_SYSTEM and role.get("code") == "1" \
                and ref.startswith("Patient/"):
            return ref.split("/", 2)[1]
    return None


def add_years(t: datetime, years: int) -> datetime:
    """``t`` moved by whole years (29 February -> 28 February)."""
    try:
        return t.replace(year=t.year + years)
    except ValueError:
        return t.replace(year=t.year + years, day=28)
