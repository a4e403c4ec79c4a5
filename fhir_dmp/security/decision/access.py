"""The one access decision point (DESIGN.md "The access rules").

Shaped after HAPI FHIR's consent service (``IConsentService``: ``startOperation``,
``canSeeResource``, ``willSeeResource``, ``completeOperationSuccess``/``Failure``):
the guarded repository calls

* :meth:`RequestAccess.start` at the start of an operation (SMART scope;
  403 when the token's scopes do not cover the interaction): HAPI's
  ``startOperation``;
* :meth:`RequestAccess.search_filter` to turn the decision into a storage
  query, so totals, pages and links count only what the caller may see
  (no HAPI counterpart: HAPI filters the results after the query);
* :meth:`RequestAccess.can_see` on every resource before it leaves (the
  same rules, evaluated on one resource: read, vread, history, includes,
  Binary, and the safety net of searches): HAPI's ``canSeeResource``;
* :meth:`RequestAccess.view` on what it returns (the decision's view
  obligation masks elements): HAPI's ``willSeeResource``;
* :meth:`RequestAccess.can_write` before any write (403 with the reason
  inside a DMP the caller may enter; outside it, the repository answers as
  for something missing).

The outcome goes to the journal (``GuardedRepository.record``), where HAPI
calls ``completeOperationSuccess``/``completeOperationFailure``.

Each rule that a search filters on is written once, as a storage query over
the access facets (:func:`access_facets`: :meth:`RequestAccess.document_query`,
:meth:`RequestAccess.consent_query`, :meth:`RequestAccess.ins_lookup_filter`),
and :meth:`RequestAccess.can_see` evaluates that same query on the one
resource (:func:`matches`); ``tests/test_access_property.py`` checks on random
worlds that both agree, totals included.

Everything one request needs (the patient's active Consents, DMP state,
médecin traitant, break-glass grant) is loaded once per request and per
patient (:class:`PatientState`), never once per resource. Deny is the default:
every function ends in a deny unless a rule permitted.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import BadRequest, Forbidden
from ..filters import compile_query, matches
from ..profiles import dmp
from ..profiles.ins import INS_SYSTEMS
from .context_cache import load_contexts
from .principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE, PATIENT, PS,
                        REGULATION_CENTRE, TREAT, Principal)

INTERACTION_LETTER = {"read": "r", "vread": "r", "history": "r", "history-type": "s", "search": "s", "create": "c",
                      "update": "u", "patch": "u", "delete": "d"}
SERVER_WRITTEN = ("AuditEvent", "Communication")   # the journal and the notices: only the server writes them
#: the directory of professionals (CONTRACT.md "The directory of professionals"): no patient's data,
#: read by every authenticated caller, written only by ``fhir-dmp load`` (the REST layer refuses writes)
DIRECTORY = ("Practitioner", "PractitionerRole")
INS_LOOKUP_ELEMENTS = ("resourceType", "id", "meta", "identifier", "active")
INS_LOOKUP_PARAMS = ("identifier", "_format", "_pretty", "_elements", "_summary")
COLLECT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction|collect"
ROLE_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
PARENT, GUARDIAN = "PRN", "GUARD"
AGE_OF_MAJORITY = 18
PERSONAL_SPACE_TYPES = ("application/pdf", "text/plain")


@dataclass
class Decision:
    """permit or deny, the rule that decided, and what the caller must do next."""

    permit: bool
    rule: str
    reason: str
    consents: list = field(default_factory=list)      # [(Consent/id, versionId)]
    obligations: dict = field(default_factory=dict)   # view=ins_only, grant=..., notify=...

    def as_record(self) -> dict:
        return {"result": "permit" if self.permit else "deny", "rule": self.rule, "reason": self.reason,
                "consents": [list(c) for c in self.consents]}


def permit(rule, reason, **kw) -> Decision:
    return Decision(True, rule, reason, **kw)


def deny(rule, reason, **kw) -> Decision:
    return Decision(False, rule, reason, **kw)


# -- access facets: what the decision reads of a resource, stored flat beside it ----------------------
def access_facets(resource_type: str, resource: dict) -> dict:
    """Flat fields the search guard filters on (stored as ``a`` by storage).

    DocumentReference: ``types`` (its LOINC type codes: rule 9 needs every one allowed),
    ``masked`` (MASQUE_PS), ``authors`` (idNatPs), ``labels`` (the DMP label codes).
    Consent: ``actors`` (``system|value`` of each provision actor identifier, see
    :func:`consent_actor_ids`). Patient: ``ins`` (``system|value`` of its INS identifiers, unique:
    one DMP per INS, CONTRACT.md "The DMP in FHIR terms"). The same functions read the resource in :meth:`RequestAccess.can_see`,
    so the filter and the per-resource check read the same facts.
    """
    if resource_type == "DocumentReference":
        labels = dmp.labels(resource)
        return {"types": sorted(dmp.doc_type_codes(resource)), "masked": dmp.MASQUE_PS in labels,
                "authors": sorted(dmp.author_ids(resource)), "labels": sorted(labels)}
    if resource_type == "Consent":
        return {"actors": sorted(consent_actor_ids(resource))}
    if resource_type == "Patient":
        ins = sorted({identifier_key(i.get("system"), i.get("value")) for i in resource.get("identifier") or []
                      if isinstance(i, dict) and i.get("system") in INS_SYSTEMS} - {None})
        out = {"gp": sorted(dmp.general_practitioner_ids(resource))}
        if ins:
            out["ins"] = ins        # absent, not empty: the unique index skips it
        return out
    return {}


def _pid_filter(pids) -> dict:
    pids = sorted(pids)
    return {"pid": pids[0]} if len(pids) == 1 else {"pid": {"$in": pids}}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# -- reading Consent resources as DMP choices (CONTRACT.md "The DMP in FHIR terms") ------------------
def identifier_key(system, value) -> str | None:
    """``system|value`` of an identifier; None without a system or a value (it never matches)."""
    if isinstance(system, str) and system.strip() and isinstance(value, str) and value.strip():
        return f"{system.strip()}|{value.strip()}"
    return None


def consent_actor_ids(consent: dict) -> set[str]:
    """``system|value`` of each provision.actor identifier (PS idNatPs or establishment).

    CONTRACT.md "Who the caller is": identifiers match on system and value; one without a
    system never matches anyone.
    """
    out = set()
    for actor in (consent.get("provision") or {}).get("actor") or []:
        ident = ((actor or {}).get("reference") or {}).get("identifier") or {}
        key = identifier_key(ident.get("system"), ident.get("value"))
        if key:
            out.add(key)
    return out


def consent_has_actor(consent: dict) -> bool:
    """True when provision.actor names anyone (even with an identifier that never matches)."""
    return bool((consent.get("provision") or {}).get("actor"))


def consent_purposes(consent: dict) -> set[str]:
    return {p.get("code") for p in (consent.get("provision") or {}).get("purpose") or [] if p.get("code")}


def consent_actions(consent: dict) -> set[str]:
    """``system|code`` of provision.action codings."""
    out = set()
    for concept in (consent.get("provision") or {}).get("action") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("code"):
                out.add(f"{coding.get('system')}|{coding['code']}")
    return out


def consent_kind(consent: dict) -> str:
    """'permit', 'block', 'oppose_feeding', 'optout_btg', 'optout_c15', 'deny_other' or 'unknown'."""
    prov = consent.get("provision") or {}
    ptype = prov.get("type")
    actors = consent_has_actor(consent)
    if ptype == "deny" and COLLECT_ACTION in consent_actions(consent):
        # opposition to feeding (CONTRACT.md "Lifecycle"): no actor = every PS, else that PS
        return "oppose_feeding"
    if ptype == "permit" and actors:
        return "permit"
    if ptype == "deny" and actors:
        return "block"
    if ptype == "deny" and not actors:
        purposes = consent_purposes(consent)
        if BTG in purposes:
            return "optout_btg"
        if ETREAT in purposes:
            return "optout_c15"
        return "deny_other"
    return "unknown"


def consent_in_force(consent: dict, at: datetime) -> bool:
    """Active and within ``provision.period`` at ``at``.

    Period bounds are FHIR dateTimes of any precision (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a
    full dateTime, https://hl7.org/fhir/R4/datatypes.html#dateTime): a start holds from the first
    instant it names, an end until the last. A deny Consent whose period cannot be read is in
    force (fail closed: a block or an opt-out is never switched off by a format); a permit whose
    period cannot be read is not.
    """
    if consent.get("status") != "active":
        return False
    period = (consent.get("provision") or {}).get("period") or {}
    try:
        start = fhir_instant(period["start"]) if period.get("start") else None
        end = fhir_instant(period["end"], end=True) if period.get("end") else None
    except (ValueError, TypeError, AttributeError):
        return (consent.get("provision") or {}).get("type") == "deny"
    if start is not None and start > at:
        return False
    if end is not None and end <= at:
        return False
    return True


_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def fhir_instant(value: str, end: bool = False) -> datetime:
    """The first instant a FHIR date/dateTime names, or with ``end`` the instant just after its
    last one (``2020-06`` ends at 2020-07-01T00:00Z). Dates without a zone are read as UTC.
    Raises ValueError for anything else."""
    m = _FHIR_DATE.match(value.strip())
    if m:
        year, month, day = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
        start = datetime(year, month, day, tzinfo=timezone.utc)
        if not end:
            return start
        if m.group(3):
            return start + timedelta(days=1)
        if m.group(2):
            return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
        return datetime(year + 1, 1, 1, tzinfo=timezone.utc)
    if "T" not in value:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    t = _aware(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    return t + timedelta(microseconds=1) if end else t


def principal_keys(p: Principal) -> set[str]:
    """Identifier keys of a caller (see :func:`consent_actor_ids`)."""
    if not p.is_professional:
        return set()
    ids = set()
    key = identifier_key(IDNATPS_SYSTEM, p.id_nat_ps)
    if key:
        ids.add(key)
    system, sep, value = (p.organization or "").partition("|")
    if sep and identifier_key(system, value):
        ids.add(identifier_key(system, value))
    return ids


@dataclass
class PatientState:
    """What the decision needs to know about one DMP, loaded once per request."""

    pid: str
    patient: dict | None                      # None: no such DMP (or destroyed, or deleted)
    known: bool = False                       # stored and not destroyed (deleted still counts)
    consents: list = field(default_factory=list)   # [(id, vid, resource)] active Consents
    grant: dict | None = None                 # valid break-glass grant of the calling PS
    doc: dict | None = None                   # the stored Patient document (current version)
    representative: dict | None = None        # the calling legal representative's RelatedPerson

    @property
    def exists(self) -> bool:
        return self.patient is not None

    @property
    def open(self) -> bool:
        return bool(self.patient) and self.patient.get("active", True) is not False

    @property
    def gp_ids(self) -> set[str]:
        return dmp.general_practitioner_ids(self.patient) if self.patient else set()

    def matching(self, kind: str, actor_ids: set[str] = frozenset(), *, everyone: bool = False) -> list:
        """Consents of ``kind`` in force naming one of ``actor_ids``; with ``everyone``, those
        naming no actor count too (they apply to every professional)."""
        at = _now()
        out = []
        for cid, vid, res in self.consents:
            if consent_kind(res) != kind or not consent_in_force(res, at):
                continue
            actors = consent_actor_ids(res)
            if actor_ids and not (actors & actor_ids) and not (everyone and not consent_has_actor(res)):
                continue
            out.append((f"Consent/{cid}", str(vid)))
        return out


class AccessPolicy:
    """Application-wide part of the decision: the matrix, the config, the storage to load context."""

    def __init__(self, storage, habilitations, config, context_cache=None):
        self.storage = storage
        self.habilitations = habilitations
        self.config = config
        self.context_cache = context_cache    # ContextCache, or None: load every request

    def for_request(self, principal: Principal) -> "RequestAccess":
        return RequestAccess(self, principal)


class RequestAccess:
    """The decision for one request and one principal (caches patient states)."""

    def __init__(self, policy: AccessPolicy, principal: Principal):
        self.policy = policy
        self.p = principal
        self.states: dict[str, PatientState] = {}
        self._normal_pids: set[str] | None = None
        self._choices: tuple | None = None
        self.session = None       # set by the repository inside a write transaction
        # per DMP, for the documents of one request (a search page judges each one, issue 13):
        # [state, its grant, the entry decision, the compiled document test once one is judged],
        # reused while the request holds the same state and grant (the repository replaces or
        # amends them)
        self._judged: dict[str, list] = {}

    # -- context loading ---------------------------------------------------
    @property
    def my_ids(self) -> set[str]:
        """``system|value`` keys a Consent actor may name to mean this caller: the PS idNatPs and,
        in AIR mode, the establishment of the ``organization`` claim (``system|value``; one
        without a system matches nothing)."""
        return principal_keys(self.p)

    def load(self, pids) -> None:
        """Load the states of several patients: from the process's context cache
        (``context_cache.py``) or two queries (Patients, active Consents); inside a write
        transaction always from the transaction."""
        todo = [p for p in set(pids) if p and p not in self.states]
        if not todo:
            return
        storage = self.policy.storage
        cache = self.policy.context_cache
        if cache is not None and self.session is None:
            contexts = cache.load(todo)
        else:
            contexts = load_contexts(storage, todo, self.session)
        grants = {}
        if self.p.is_professional and self.p.id_nat_ps and self.p.purpose == BTG:
            grants = storage.live_grants(todo, self.p.id_nat_ps, _now())
        representatives = {}
        if self.p.kind == LEGAL_REPRESENTATIVE and self.p.related_person_id:
            # read fresh on every request (never cached): an ended representative stops at once
            rp = storage.read("RelatedPerson", self.p.related_person_id, session=self.session)
            if rp is not None and not rp.deleted and rp.pid in todo:
                representatives[rp.pid] = rp.resource
        for pid in todo:
            res, known, consents, doc = contexts[pid]
            self.states[pid] = PatientState(pid, res, known, consents, grants.get(pid), doc,
                                            representatives.get(pid))

    def state(self, pid: str) -> PatientState:
        self.load([pid])
        return self.states[pid]

    # -- rule 1: SMART scope ---------------------------------------------------
    def start(self, resource_type: str, interaction: str) -> None:
        letter = INTERACTION_LETTER.get(interaction, "r")
        if not self.p.scopes.allows(resource_type, letter):
            raise Forbidden(f"the token's scopes do not allow {interaction} on {resource_type}",
                            code="forbidden")

    # -- rule 2: roles ---------------------------------------------------------
    def role_decision(self) -> Decision | None:
        """Deny for excluded or unknown roles; None when the role may go on."""
        p = self.p
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            return None if p.patient_id else deny("role", "patient token without fhirUser")
        if p.kind == ADMIN:
            return None
        if p.kind in (PS, REGULATION_CENTRE):
            if not p.id_nat_ps:
                return deny("role", "professional without idNatPs")
            # two-factor (acr eidas1) is checked once, by authentication: its refusal is the
            # RFC 9470 step-up 401 (security/auth.py), not a decision
            if not any(self.policy.habilitations.knows(code) for code in p.professions):
                return deny("role", "profession not in the habilitation matrix (excluded role)")
            return None
        return deny("role", "unknown role")

    @property
    def profession(self) -> str | None:
        """The first of the caller's professions known to the matrix."""
        for code in self.p.professions:
            if self.policy.habilitations.knows(code):
                return code
        return None

    # -- rules 3-8: may this principal enter this DMP? -------------------------
    def dmp_access(self, st: PatientState) -> Decision:
        """Decision on a DMP as a whole (before per-document rules)."""
        role = self.role_decision()
        if role:
            return role
        p = self.p
        if p.compartment is not None and st.pid != p.compartment:
            return deny("compartment", "the token's patient/ scopes are for another record")
        if p.kind == ADMIN and st.known:
            # a deleted (not destroyed) DMP stays manageable: 410 on read, history kept
            return permit("admin", "administrator (no document content)")
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind == LEGAL_REPRESENTATIVE and p.patient_id == st.pid:
            # re-checked on the state of this request (ended, period over, the child is 18)
            return representative_in_force(st.representative or {}, st.patient, _now())
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            if p.patient_id == st.pid:
                return permit("patient-self", "own record")
            return deny("patient-other", "not the caller's record")
        # professionals
        if not st.open:
            return deny("dmp-closed", "the DMP is closed")
        gp = bool(st.gp_ids & {p.id_nat_ps})
        blocks = st.matching("block", self.my_ids)
        if blocks and not gp:
            return deny("blocked", "the patient blocked this professional", consents=blocks)
        if p.purpose == BTG:
            optout = st.matching("optout_btg")
            if optout:
                return deny("btg-opt-out", "the patient refused break-glass access", consents=optout)
            if st.grant:
                return permit("break-glass", "break-glass grant in force",
                              obligations={"grant": st.grant.get("_id")})
            if not (p.btg_reason or "").strip():
                return deny("btg-no-reason", "break-glass needs a reason")
            return permit("break-glass", "break-glass (new grant)", obligations={"new_grant": True})
        if p.purpose == ETREAT:
            if p.kind != REGULATION_CENTRE:
                return deny("centre15-role", "ETREAT is for the regulation centre")
            optout = st.matching("optout_c15")
            if optout:
                return deny("centre15-opt-out", "the patient refused centre 15 access", consents=optout)
            return permit("centre-15", "regulation centre access", obligations={"notify": "centre_15"})
        permits = st.matching("permit", self.my_ids)
        if permits:
            return permit("authorized", "the patient authorized this professional", consents=permits)
        if gp:
            return permit("medecin-traitant", "médecin traitant")
        return deny("not-authorized", "no authorization from the patient")

    # -- rule 9 and per-type rules: may the caller see this resource? ----------
    def can_see(self, resource_type: str, resource: dict, pid: str | None, *, extra: dict | None = None
                ) -> Decision:
        p = self.p
        if resource_type in DIRECTORY:
            return permit("directory", "the directory of professionals")
        if resource_type == "Patient":
            pid = resource.get("id")
        if pid is None:
            if resource_type == "AuditEvent" and p.kind == ADMIN and self.role_decision() is None \
                    and p.compartment is None:
                return permit("admin", "the system journal")
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self._entry(st)[2]
        if not access.permit:
            if resource_type == "Patient" and extra and extra.get("ins_lookup") and self.ins_lookup_allowed(st):
                return permit("ins-lookup", "exact INS lookup", obligations={"view": "ins_only"})
            return access
        if resource_type == "Patient":
            return access
        if resource_type == "DocumentReference":
            return self._document(resource, st, access)
        if resource_type == "Consent":
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN):
                return access
            if matches(self.consent_query(), {"res": resource, "a": access_facets("Consent", resource)}):
                return access
            return deny("consent-other", "professionals see only their own authorization")
        if resource_type in ("AuditEvent", "Communication"):
            if resource_type == "AuditEvent" and p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
                # the journal never names a document hidden from its reader (CONTRACT.md "The journal")
                return permit(access.rule, access.reason, consents=access.consents,
                              obligations={"view": "journal"})
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN):
                return access
            return deny("journal", "professionals do not read the journal")
        if resource_type == "RelatedPerson":
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN):
                return access
            return deny("representatives", "professionals do not read legal representatives")
        return deny("type", f"{resource_type} is not readable")

    def _document(self, doc: dict, st: PatientState, access: Decision) -> Decision:
        """Rule 9 and the labels, judged with the same query the search guard runs."""
        if self.p.kind == ADMIN:
            return deny("admin-no-content", "administrators never read documents")
        judged = self._entry(st)
        if judged[3] is None:
            judged[3] = compile_query(self.document_query(st.pid))
        if judged[3]({"pid": st.pid, "a": access_facets("DocumentReference", doc)}):
            return access
        labels = dmp.labels(doc)
        if self.p.kind == PATIENT:
            return deny("invisible-patient", "not yet announced to the patient")
        if self.p.kind == LEGAL_REPRESENTATIVE:
            return deny("invisible-representatives", "hidden from legal representatives")
        if not self.policy.habilitations.may_read(self.profession, dmp.doc_type_codes(doc)):
            return deny("habilitation", "document type not readable by this profession")
        if dmp.MASQUE_PS in labels:
            return deny("masque-ps", "document masked by the patient")
        return deny("document", "not readable")

    def _entry(self, st: PatientState) -> list:
        """``[st, its grant, dmp_access(st), None]`` computed once per state and grant within this
        request; :meth:`_document` fills the last slot with its DMP's compiled
        :meth:`document_query` the first time it judges a document (a read of a Patient or a
        Consent never compiles it)."""
        judged = self._judged.get(st.pid)
        if judged is None or judged[0] is not st or judged[1] is not st.grant:
            judged = self._judged[st.pid] = [st, st.grant, self.dmp_access(st), None]
        return judged

    def consent_query(self) -> dict:
        """The one definition of which Consents of an entered DMP the caller sees: all of them for
        the patient, a representative and the administrator; a professional only their own
        authorization."""
        if self.p.is_professional:
            return {"res.provision.type": "permit", "a.actors": {"$in": sorted(self.my_ids)}}
        return {}

    def document_query(self, pid: str) -> dict:
        """The one definition of which documents of DMP ``pid`` the caller sees, once the DMP is
        entered (rules 4, 9 and 11): a storage filter over ``pid`` and the access facets, also
        evaluated in memory by :func:`matches` for a single document."""
        p = self.p
        if p.kind == PATIENT:
            return {"a.labels": {"$ne": dmp.INVISIBLE_PATIENT}}
        if p.kind == LEGAL_REPRESENTATIVE:
            return {"a.labels": {"$nin": [dmp.INVISIBLE_PATIENT, dmp.INVISIBLE_REPRESENTANTS_LEGAUX]}}
        if not p.is_professional:
            return {"_never": True}
        # every type code allowed by the matrix (CONTRACT.md "Habilitation"); MASQUE_PS only for
        # the médecin traitant in normal mode; the author always sees what they wrote
        allowed = sorted(self.policy.habilitations.allowed_types(self.profession))
        readable = {"a.types.0": {"$exists": True}, "a.types": {"$not": {"$elemMatch": {"$nin": allowed}}}}
        st = self.states.get(pid)
        if not (p.purpose == TREAT and st is not None and p.id_nat_ps in st.gp_ids):
            readable["a.masked"] = False
        return {"$or": [{"a.authors": p.id_nat_ps}, readable]}

    def can_see_binary(self, pid: str | None, doc: tuple | None) -> Decision:
        """A Binary is read under the decision of the DocumentReference its securityContext names
        (``doc`` = (pid, deleted, resource) of that document, None when there is none): the same
        DMP, not deleted, and :meth:`can_see` on it; otherwise it is an orphan nobody reads."""
        if doc is not None and doc[0] == pid and not doc[1]:
            return self.can_see("DocumentReference", doc[2] or {}, pid)
        return deny("binary-orphan", "content not attached to a readable document")

    def refusal_looks_missing(self, pid: str | None, decision: Decision) -> bool:
        """CONTRACT.md "REST behaviour": a refused write outside every DMP the caller may enter
        answers as the same write on something missing; inside one, 403 with the reason."""
        if pid and self.dmp_access(self.state(pid)).permit:
            return False
        return decision.rule in ("dmp-state", "not-authorized", "patient-other", "dmp-closed", "no-patient",
                                 "role", "compartment", "blocked")

    # -- what a deposit carries (DESIGN.md "Documents", rules 10-11) ------------------------------
    # Decided after can_write permitted the write; the pipeline (documents/pipeline.py) parses and
    # inspects, these rules decide, and a deny answers 422 with its reason (and is journaled).
    def can_deposit(self, st: PatientState) -> Decision:
        """Rule 11: a document is deposited only on a DMP whose Patient's INS is present and
        qualified (identity status VALI or QUAL)."""
        if not dmp.is_ins_qualified(st.patient):
            return deny("ins-not-qualified",
                        "documents are deposited only on a DMP whose INS is qualified (VALI or QUAL)")
        return permit("ins-qualified", "the INS of the DMP is qualified")

    def author_of_record(self, pid: str, old: dict | None) -> list | None:
        """Rule 10: who a DocumentReference names as ``author``. A deposit by a professional names
        that professional, one in the personal space names the Patient (the patient or a
        representative deposits for them), whatever the client sent; the author of a stored
        document never changes. None: the rules set no author (the client's stands)."""
        if old is not None:
            return copy.deepcopy(old.get("author") or [])
        if self.p.id_nat_ps:
            return [self.p.reference()]
        if self.p.patient_id == pid:
            return [{"reference": f"Patient/{pid}"}]
        return None

    def may_replace(self, target, pid: str) -> Decision:
        """Rule 10: only a document's author replaces it (``relatesTo replaces``), within the same
        record. ``target`` is the stored document named (None when there is none); one answer for
        missing, elsewhere, hidden or someone else's (CONTRACT.md "REST behaviour")."""
        if target is not None and not target.deleted and target.pid == pid and self.p.kind == PS \
                and self.p.id_nat_ps in dmp.author_ids(target.resource):
            return permit("author", "the author replaces their document")
        return deny("not-author", "relatesTo.target must be a document of the same record by the same author")

    def view(self, resource: dict, decision: Decision, sees=None) -> dict:
        """Apply the decision's view obligation: the INS lookup answers id, identifier and active;
        a journal entry read by the patient's side names only the documents ``sees(type, id)``
        lets them see (the access stays listed, the document unnamed)."""
        view = decision.obligations.get("view")
        if view == "ins_only":
            return {k: v for k, v in resource.items() if k in INS_LOOKUP_ELEMENTS}
        if view == "journal" and sees is not None:
            entities = []
            for ent in resource.get("entity") or []:
                ref = (ent.get("what") or {}).get("reference") or ""
                rtype, _, rest = ref.partition("/")
                if rtype in ("DocumentReference", "Binary") and rest and not sees(rtype, rest.split("/")[0]):
                    ent = {**ent, "what": {"display": f"{rtype} (not shown)"}}
                entities.append(ent)
            if entities:
                resource = {**resource, "entity": entities}
        return resource

    # -- searches: the decision as a storage query ----------------------------
    def _my_choices(self) -> tuple[set[str], set[str], set[str]]:
        """(permitted, blocked, médecin traitant) pids of a professional: the Consents naming them
        (in force) and the DMPs naming them médecin traitant — the same facts :meth:`dmp_access`
        reads in each :class:`PatientState`. A médecin traitant is never blocked (rule 5)."""
        if self._choices is None:
            permitted, blocked = set(), set()
            at = _now()
            for d in self.policy.storage.consents_naming(sorted(self.my_ids)):
                if not consent_in_force(d["res"], at):
                    continue
                kind = consent_kind(d["res"])
                if kind == "permit":
                    permitted.add(d["pid"])
                elif kind == "block":
                    blocked.add(d["pid"])
            gp = self.policy.storage.patients_with_gp(self.p.id_nat_ps) if self.p.id_nat_ps else set()
            self._choices = (permitted, blocked - gp, gp)
        return self._choices

    def normal_pids(self) -> set[str]:
        """pids a professional reaches in normal mode (permit or médecin traitant, not blocked, open)."""
        if self._normal_pids is not None:
            return self._normal_pids
        permitted, blocked, gp = self._my_choices()
        candidates = (permitted - blocked) | gp
        self.load(candidates)
        self._normal_pids = {pid for pid in candidates if self.states[pid].open}
        return self._normal_pids

    # -- the exact-INS lookup (CONTRACT.md "The DMP in FHIR terms") -------------------------------
    def ins_lookup(self, resource_type: str, args: list[tuple[str, str]]) -> bool:
        """Is this search a professional's exact-INS lookup? Raises BadRequest when it carries any
        parameter but ``identifier``, ``_format``, ``_pretty``, ``_elements``, ``_summary`` (for a
        known and an unknown INS alike: no crafted sort or cursor reads a DMP it does not show)."""
        if resource_type != "Patient" or not self.p.is_professional:
            return False
        idents = [v for k, v in args if k == "identifier"]
        if not any(v.partition("|")[0] in INS_SYSTEMS for v in idents):
            return False
        others = sorted({k for k, _ in args if k not in INS_LOOKUP_PARAMS})
        system, _, value = idents[0].partition("|")
        if others or len(idents) != 1 or not value or "," in value:
            raise BadRequest("the exact-INS lookup takes one identifier=<INS system>|<INS> and no other "
                             f"parameter{': not ' + ', '.join(others) if others else ''}",
                             expression="Patient.identifier")
        return True

    def ins_lookup_allowed(self, st: PatientState) -> bool:
        """One definition: a professional finds an existing DMP by its exact INS unless blocked
        (or confined to another record)."""
        if self.role_decision() or not st.exists:
            return False
        if self.p.compartment is not None and st.pid != self.p.compartment:
            return False
        return st.pid not in self._my_choices()[1]

    def ins_lookup_filter(self) -> dict | None:
        """:meth:`ins_lookup_allowed` as a storage filter (the INS criteria select the DMP)."""
        if self.role_decision():
            return None
        blocked = sorted(self._my_choices()[1])
        flt: dict = {"_id": {"$nin": blocked}} if blocked else {}
        if self.p.compartment is not None:
            if self.p.compartment in blocked:
                return None
            flt = {"_id": self.p.compartment}
        return flt

    def reachable_pids(self, named_pids: set[str]) -> set[str] | None:
        """pids whose records the caller may enter in this request; None = no restriction (admin)."""
        p = self.p
        if self.role_decision():
            return set()
        if p.compartment is not None:
            # patient/ scopes: that one record, if the caller may enter it
            if named_pids and p.compartment not in named_pids:
                return set()
            return {p.compartment} if self.dmp_access(self.state(p.compartment)).permit else set()
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            st = self.state(p.patient_id)
            return {p.patient_id} if st.exists else set()
        if p.kind == ADMIN:
            return None
        if named_pids or p.purpose in (BTG, ETREAT):
            # the DMPs the request names, one by one (emergency modes reach no others): only their
            # context is loaded, not that of every DMP the professional is authorized on
            self.load(named_pids)
            return {pid for pid in named_pids if self.dmp_access(self.states[pid]).permit}
        return set(self.normal_pids())

    def search_filter(self, resource_type: str, named_pids: set[str], *,
                      ins_lookup: bool = False) -> dict | None:
        """Extra storage filter restricting a search to what the caller may see; None = nothing."""
        p = self.p
        if resource_type in DIRECTORY:
            return {}
        pids = self.reachable_pids(named_pids)
        if resource_type == "Patient":
            if pids is None:
                return {}
            if ins_lookup:
                # exact INS: the criteria themselves select the DMP; can_see redacts it
                return self.ins_lookup_filter()
            return {"_id": sorted(pids)[0]} if len(pids) == 1 else {"_id": {"$in": sorted(pids)}}
        if resource_type == "DocumentReference":
            if p.kind == ADMIN or pids is not None and not pids:
                return None
            # the DMPs that share one document query are grouped (the médecin traitant's differ)
            groups: dict[str, tuple[dict, list]] = {}
            for pid in sorted(pids):
                q = self.document_query(pid)
                groups.setdefault(repr(q), (q, []))[1].append(pid)
            parts = [{**_pid_filter(group), **q} for q, group in groups.values()]
            return parts[0] if len(parts) == 1 else {"$or": parts}
        if resource_type == "Consent":
            if pids is None:
                return {}
            if not pids:
                return None
            flt = _pid_filter(pids)
            flt.update(self.consent_query())
            return flt
        if resource_type in ("AuditEvent", "Communication", "RelatedPerson"):
            if p.kind in (PS, REGULATION_CENTRE):
                return None
            if pids is None:
                return {}
            return _pid_filter(pids) if pids else None
        return None

    # -- writes (DESIGN.md rules 10-11, CONTRACT.md) -----------------------------
    def can_write(self, interaction: str, resource_type: str, new: dict | None, old: dict | None,
                  pid: str | None, *, context: dict | None = None) -> Decision:
        """May the caller write ``new`` over ``old`` in DMP ``pid``? ``context`` is the
        DocumentReference a new Binary attaches to (its securityContext)."""
        role = self.role_decision()
        if role:
            return role
        if resource_type in SERVER_WRITTEN:
            return deny("read-only", f"{resource_type} is read-only")
        if resource_type in DIRECTORY:
            # only the administrator's import reaches here: REST answers 405 before any decision
            return permit("admin", "the directory is imported by the administrator") if self.p.kind == ADMIN \
                else deny("read-only", f"{resource_type} is read-only")
        if resource_type == "Patient":
            return self._write_patient(interaction, new, old, pid)
        if pid is None:
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if resource_type == "Consent":
            return self._write_consent(interaction, new, old, st, access)
        if resource_type in ("DocumentReference", "Binary"):
            decision = self._write_document(interaction, resource_type, new, old, st, access)
            if decision.permit and resource_type == "Binary" and context is not None \
                    and self.p.id_nat_ps not in dmp.author_ids(context):
                return deny("not-author", "only the author attaches content to a document")
            return decision
        if resource_type == "RelatedPerson":
            return self._write_representative(interaction, new, old, st, access)
        return deny("type", f"{resource_type} is not writable")

    def _write_patient(self, interaction, new, old, pid) -> Decision:
        p = self.p
        if p.kind == ADMIN:
            return permit("admin", "administrator manages DMPs")
        if interaction == "create":
            if p.kind == PS and p.purpose == TREAT:
                if _owner_fields_changed(new, None):
                    return deny("owner-fields", OWNER_FIELDS_REASON)
                return permit("ps-creates-dmp", "a professional opens the DMP (patient agreed)",
                              obligations={"authorize_creator": True, "notify": "first_access"})
            return deny("create-dmp", "only a professional or an administrator opens a DMP")
        if interaction == "delete":
            return deny("delete-dmp", "only an administrator deletes a DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if not access.permit:
            return access
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            if (new or {}).get("identifier") != (old or {}).get("identifier"):
                return deny("patient-identity", "the INS is changed by a professional, not the patient")
            return access
        if p.kind == PS and p.purpose == TREAT and access.rule in ("authorized", "medecin-traitant"):
            if _owner_fields_changed(new, old):
                return deny("owner-fields", OWNER_FIELDS_REASON)
            return access
        return deny("patient-write", "not allowed to change this DMP")

    def _write_consent(self, interaction, new, old, st, access) -> Decision:
        p = self.p
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind == ADMIN:
            return permit("admin", "administrator manages consents")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            return access
        if p.kind == PS:
            if interaction != "create":
                return deny("ps-consent", "a professional only attests a first access")
            if not st.open:
                return deny("dmp-closed", "the DMP is closed")
            if st.matching("block", self.my_ids) and p.id_nat_ps not in st.gp_ids:
                return deny("blocked", "the patient blocked this professional")
            if consent_kind(new) != "permit":
                return deny("ps-consent", "a professional may only create their own authorization")
            if consent_actor_ids(new) != {identifier_key(IDNATPS_SYSTEM, p.id_nat_ps)}:
                return deny("ps-consent", "a professional may only authorize themselves")
            if not any(v.get("verified") is True for v in new.get("verification") or []):
                return deny("ps-consent", "the first access must be attested (verification.verified)")
            if self.policy.config.first_access == "patient-code":
                # CONTRACT.md "Lifecycle": the PS also gives the one-time code the patient received
                return permit("first-access", "first access with the patient's code",
                              obligations={"notify": "first_access", "patient_code": True})
            return permit("first-access", "attested first access", obligations={"notify": "first_access"})
        return deny("consent-write", "not allowed")

    def _write_document(self, interaction, rtype, new, old, st, access) -> Decision:
        p = self.p
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind == ADMIN:
            return deny("admin-no-content", "an administrator never writes document content")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            personal = self._personal_space(interaction, rtype, new, old, st, access)
            if personal is not None:
                return personal
            if interaction in ("update", "patch") and rtype == "DocumentReference" and p.kind == PATIENT \
                    and access.permit and old is not None:
                if dmp.INVISIBLE_PATIENT in dmp.labels(old):
                    return deny("invisible-patient", "not yet announced to the patient")
                keep = {dmp.MASQUE_PS}
                if _without_labels(new, keep) == _without_labels(old, keep) and \
                        dmp.labels(new) - keep == dmp.labels(old) - keep:
                    return permit("patient-masks", "the patient masks or unmasks a document")
                return deny("patient-document", "a patient may change only MASQUE_PS")
            return deny("patient-document", "patients do not write clinical documents")
        if p.kind != PS or p.purpose != TREAT:
            return deny("feed-mode", "documents are fed in normal mode by a professional")
        if not access.permit:
            return access
        if interaction == "create":
            return self._feeding_opposition(st) or access
        if old is not None and p.id_nat_ps in dmp.author_ids(old):
            return permit("author", "the author changes their document")
        return deny("not-author", "only the author replaces or withdraws a document")

    # -- lifecycle rules (CONTRACT.md "Lifecycle of a DMP") ---------------------------------
    def _feeding_opposition(self, st: PatientState) -> Decision | None:
        """A deposit the patient's opposition to feeding forbids (no actor: every PS)."""
        opposed = st.matching("oppose_feeding", self.my_ids, everyone=True)
        if opposed:
            return deny("feeding-opposed", "the patient opposed the feeding of their DMP "
                        "(motif légitime); nothing can be deposited", consents=opposed)
        return None

    def _personal_space(self, interaction, rtype, new, old, st, access) -> Decision | None:
        """The patient's personal space: the patient or a representative deposits PDF or text
        documents authored by the Patient, and only they change or withdraw them. None: the
        write is not about the personal space (other rules decide)."""
        if not access.permit or rtype != "DocumentReference":
            return None
        if interaction == "create":
            types = {((c or {}).get("attachment") or {}).get("contentType", "").split(";")[0].strip()
                     for c in (new or {}).get("content") or []}
            if not types or not types <= set(PERSONAL_SPACE_TYPES):
                return deny("personal-space", "the personal space takes PDF or text documents only")
            return permit("personal-space", "the patient deposits in their personal space")
        if old is not None and is_personal_document(old, st.pid):
            return permit("personal-space", "the patient changes or withdraws their own document")
        if interaction == "delete":
            return deny("patient-document", "only the author withdraws a document")
        return None

    def _write_representative(self, interaction, new, old, st, access) -> Decision:
        """Legal representatives: the patient (of age) or the administrator creates and ends them."""
        p = self.p
        if not st.known:
            return deny("dmp-state", "no such DMP")
        if p.kind == ADMIN:
            return permit("admin", "administrator manages legal representatives")
        if not access.permit:
            return access
        if p.kind == PATIENT:
            if is_minor(st.patient, _now()):
                return deny("representative-minor", "for a minor, the administrator manages legal "
                            "representatives")
            return permit("patient-representatives", "the patient manages their legal representatives")
        return deny("representative-write", "only the patient or the administrator manages legal "
                    "representatives")

    def can_destroy(self, st: PatientState) -> Decision:
        """Destroying a DMP: the patient themselves or the administrator (not a representative)."""
        access = self.dmp_access(st)
        if not access.permit:
            return access
        if self.p.kind == ADMIN or (self.p.kind == PATIENT and self.p.patient_id == st.pid):
            return permit("destroy-dmp", "the DMP is destroyed by "
                          + ("the administrator" if self.p.kind == ADMIN else "the patient"))
        return deny("destroy-dmp", "only the patient or the administrator destroys a DMP")

    def can_ask_access_code(self, st: PatientState) -> Decision:
        """``Patient/$access-code``: a PS in normal mode on an open DMP that has not blocked it."""
        p = self.p
        role = self.role_decision()
        if role:
            return role
        if p.kind != PS or p.purpose != TREAT:
            return deny("access-code", "only a professional in normal mode asks for an access code")
        if not st.exists or not st.open:
            return deny("dmp-state", "no such DMP")
        if st.matching("block", self.my_ids) and p.id_nat_ps not in st.gp_ids:
            return deny("dmp-state", "no such DMP")
        return permit("access-code", "a one-time code is sent to the patient")


def record_target_matches(ins: tuple[str, str], cda_ins: list[tuple[str, str]]) -> Decision:
    """Rule 11: a CDA is deposited only for the DMP's patient. ``ins`` is the Patient's INS as
    FHIR (system ``urn:oid:<root>``, value), ``cda_ins`` the (root, extension) INS ids of the
    CDA's recordTarget: each must be that INS (NIR keys compared case-insensitively). Values are
    compared, never echoed."""
    system, value = ins
    want_root = system[len("urn:oid:"):] if system.startswith("urn:oid:") else system
    norm = lambda v: (v or "").strip().upper()  # noqa: E731  (NIR keys 2A/2B)
    if not cda_ins or any(r != want_root or norm(e) != norm(value) for r, e in cda_ins):
        return deny("cda-patient", "the CDA recordTarget INS does not match the INS of the DMP patient")
    return permit("cda-patient", "the CDA names the patient of the DMP")


def is_personal_document(doc: dict, pid: str) -> bool:
    """A document of the patient's personal space: its author is the Patient."""
    return any((a or {}).get("reference") == f"Patient/{pid}" for a in (doc or {}).get("author") or [])


def _birthday(birth_date: str, years: int, *, latest: bool) -> datetime:
    """The ``years``-th birthday; for a partial date (YYYY, YYYY-MM), its earliest or latest day."""
    parts = [int(x) for x in birth_date.split("-")]
    year, month = parts[0] + years, parts[1] if len(parts) > 1 else (12 if latest else 1)
    day = parts[2] if len(parts) > 2 else (31 if latest else 1)
    while True:
        try:
            return datetime(year, month, day, tzinfo=timezone.utc)
        except ValueError:   # 29 February in a common year, 31 of a short month
            day -= 1


def is_minor(patient: dict | None, at: datetime) -> bool:
    """Under 18 by ``birthDate``; unknown or unreadable birth date: treated as a minor."""
    try:
        return _birthday((patient or {})["birthDate"][:10], AGE_OF_MAJORITY, latest=True) > at
    except (KeyError, TypeError, ValueError, IndexError):
        return True


def representative_relationship(rp: dict) -> str | None:
    codes = {c.get("code") for concept in rp.get("relationship") or []
             for c in (concept or {}).get("coding") or [] if c.get("system") == ROLE_CODE_SYSTEM}
    for code in (GUARDIAN, PARENT):
        if code in codes:
            return code
    return None


def representative_in_force(rp: dict, patient: dict | None, at: datetime) -> Decision:
    """CONTRACT.md "Who the caller is" / "Lifecycle": a RelatedPerson makes its holder a legal
    representative while it is active, within its period, and, for a parent, until the
    patient's 18th birthday (a guardian has no such limit). Unreadable dates deny."""
    if patient is None:
        return deny("representative", "no such DMP")
    if rp.get("active") is False:
        return deny("representative", "the legal representative has been ended")
    relationship = representative_relationship(rp)
    if relationship is None:
        return deny("representative", "not a parent (PRN) or guardian (GUARD)")
    if not consent_in_force({"status": "active", "provision": {"period": rp.get("period") or {}}}, at):
        return deny("representative", "outside the legal representative's period")
    if relationship == PARENT:
        try:
            of_age = _birthday(patient["birthDate"][:10], AGE_OF_MAJORITY, latest=False)
        except (KeyError, TypeError, ValueError, IndexError):
            return deny("representative", "the patient's birth date is unknown")
        if of_age <= at:
            return deny("representative", "the patient is 18: a parent's access has ended")
    return permit("legal-representative", "legal representative in force")


OWNER_FIELDS_REASON = ("only the patient, a legal representative or the administrator sets the médecin "
                       "traitant (generalPractitioner) or opens and closes the DMP (active)")


def _owner_fields_changed(new: dict | None, old: dict | None) -> bool:
    """Does a write set or change what only the patient's side decides (CONTRACT.md "The DMP in FHIR
    terms": ``generalPractitioner`` and ``active``)? A DMP is created open."""
    new, old = new or {}, old
    if old is None:
        return bool(new.get("generalPractitioner")) or new.get("active", True) is not True
    return (dmp.general_practitioner_ids(new) != dmp.general_practitioner_ids(old)
            or (new.get("generalPractitioner") or []) != (old.get("generalPractitioner") or [])
            or new.get("active", True) != old.get("active", True))


def _without_labels(doc: dict | None, codes: set[str]) -> dict:
    """The document without the given DMP labels and without meta (for comparisons)."""
    if doc is None:
        return {}
    out = dmp.set_labels(doc, dmp.labels(doc) - codes)
    out = {k: v for k, v in out.items() if k not in ("meta", "text")}
    if not out.get("securityLabel"):
        out.pop("securityLabel", None)
    return out
