"""The one access decision point (DESIGN.md "The access rules").

Shaped after HAPI FHIR's consent service: the guarded repository calls

* :meth:`RequestAccess.start` at the start of an operation (SMART scope,
  role) — a scope problem is the only 403;
* :meth:`RequestAccess.search_filter` to turn the decision into a storage
  query, so totals, pages and links count only what the caller may see;
* :meth:`RequestAccess.can_see` on every resource before it leaves (the
  safety net, also used for read, vread, history, includes, Binary);
* :meth:`RequestAccess.can_write` before any write.

Everything one request needs (the patient's active Consents, DMP state,
médecin traitant, break-glass grant) is loaded once per request and per
patient (:class:`PatientState`), never once per resource. Deny is the default:
every function ends in a deny unless a rule permitted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import Forbidden
from ..profiles import dmp
from .context_cache import load_contexts
from .principal import (ADMIN, BTG, ETREAT, LEGAL_REPRESENTATIVE, PATIENT, PS,
                        REGULATION_CENTRE, TREAT, Principal)

INTERACTION_LETTER = {"read": "r", "vread": "r", "history": "r", "search": "s", "create": "c",
                      "update": "u", "patch": "u", "delete": "d"}
PATIENT_OWNED = ("DocumentReference", "Consent", "AuditEvent", "Communication", "Binary")
INS_LOOKUP_ELEMENTS = ("resourceType", "id", "meta", "identifier", "active")


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


# -- access facets: what the decision reads of a document, stored flat beside it ----------------------
def access_facets(resource_type: str, resource: dict) -> dict:
    """Flat fields the search guard filters on (stored as ``a`` by storage).

    ``keys`` folds rule 9 into one array of strings, so the guard is a single ``$in`` (cheap for
    any MongoDB to evaluate, and indexable) instead of ``$or``s over codings:
    ``t:<LOINC>`` for an unmasked document of that type, ``m:<LOINC>`` for a masked one
    (MASQUE_PS), ``au:<idNatPs>`` for each author. ``labels`` holds the DMP label codes.
    """
    if resource_type != "DocumentReference":
        return {}
    labels = dmp.labels(resource)
    prefix = "m:" if dmp.MASQUE_PS in labels else "t:"
    keys = [prefix + code for code in sorted(dmp.doc_type_codes(resource))]
    keys += ["au:" + ps for ps in sorted(dmp.author_ids(resource))]
    return {"keys": keys, "labels": sorted(labels)}


def _pid_filter(pids) -> dict:
    pids = sorted(pids)
    return {"pid": pids[0]} if len(pids) == 1 else {"pid": {"$in": pids}}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# -- reading Consent resources as DMP choices (CONTRACT.md "The DMP in FHIR terms") ------------------
def consent_actor_ids(consent: dict) -> set[str]:
    """Identifier values of provision.actor (PS idNatPs or organization)."""
    out = set()
    for actor in (consent.get("provision") or {}).get("actor") or []:
        ident = (actor.get("reference") or {}).get("identifier") or {}
        if ident.get("value"):
            out.add(ident["value"])
    return out


def consent_purposes(consent: dict) -> set[str]:
    return {p.get("code") for p in (consent.get("provision") or {}).get("purpose") or [] if p.get("code")}


def consent_kind(consent: dict) -> str:
    """'permit', 'block', 'optout_btg', 'optout_c15', 'deny_other' or 'unknown'."""
    prov = consent.get("provision") or {}
    ptype = prov.get("type")
    actors = consent_actor_ids(consent)
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
    if consent.get("status") != "active":
        return False
    period = (consent.get("provision") or {}).get("period") or {}
    try:
        if period.get("start") and _parse_dt(period["start"]) > at:
            return False
        if period.get("end") and _parse_dt(period["end"], end=True) < at:
            return False
    except ValueError:
        return False
    return True


def _parse_dt(value: str, end: bool = False) -> datetime:
    if len(value) == 10:
        t = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
        return t + timedelta(days=1) if end else t
    return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))


@dataclass
class PatientState:
    """What the decision needs to know about one DMP, loaded once per request."""

    pid: str
    patient: dict | None                      # None: no such DMP (or destroyed, or deleted)
    known: bool = False                       # stored and not destroyed (deleted still counts)
    consents: list = field(default_factory=list)   # [(id, vid, resource)] active Consents
    grant: dict | None = None                 # valid break-glass grant of the calling PS
    doc: dict | None = None                   # the stored Patient document (current version)

    @property
    def exists(self) -> bool:
        return self.patient is not None

    @property
    def open(self) -> bool:
        return bool(self.patient) and self.patient.get("active", True) is not False

    @property
    def gp_ids(self) -> set[str]:
        return dmp.general_practitioner_ids(self.patient) if self.patient else set()

    def matching(self, kind: str, actor_ids: set[str] = frozenset()) -> list:
        at = _now()
        out = []
        for cid, vid, res in self.consents:
            if consent_kind(res) != kind or not consent_in_force(res, at):
                continue
            if actor_ids and not (consent_actor_ids(res) & actor_ids):
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
        self.session = None       # set by the repository inside a write transaction

    # -- context loading ---------------------------------------------------
    @property
    def my_ids(self) -> set[str]:
        ids = set()
        if self.p.id_nat_ps:
            ids.add(self.p.id_nat_ps)
        if self.p.organization:
            ids.add(self.p.organization)
        return ids

    def load(self, pids) -> None:
        """Load the states of several patients: from the process's context cache
        (``context_cache.py``) or two queries (Patients, active Consents); inside a write
        transaction always from the transaction."""
        todo = [p for p in set(pids) if p and p not in self.states]
        if not todo:
            return
        db = self.policy.storage.db
        cache = self.policy.context_cache
        if cache is not None and self.session is None:
            contexts = cache.load(todo)
        else:
            contexts = load_contexts(db, todo, self.session)
        grants = {}
        if self.p.is_professional and self.p.id_nat_ps and self.p.purpose == BTG:
            for g in db["btg_grants"].find({"pid": {"$in": todo}, "ps": self.p.id_nat_ps,
                                            "expires": {"$gt": _now()}}):
                grants[g["pid"]] = g
        for pid in todo:
            res, known, consents, doc = contexts[pid]
            self.states[pid] = PatientState(pid, res, known, consents, grants.get(pid), doc)

    def state(self, pid: str) -> PatientState:
        self.load([pid])
        return self.states[pid]

    # -- rule 1: SMART scope (the only 403) --------------------------------
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
            if p.acr != "eidas1":
                return deny("role", "professional without two-factor authentication (eidas1)")
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
        if p.kind == ADMIN and st.known:
            # a deleted (not destroyed) DMP stays manageable: 410 on read, history kept
            return permit("admin", "administrator (no document content)")
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            if p.patient_id == st.pid:
                return permit("patient-self" if p.kind == PATIENT else "legal-representative",
                              "own record")
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
        if resource_type == "Patient":
            pid = resource.get("id")
        if pid is None:
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if not access.permit:
            if resource_type == "Patient" and p.kind in (PS, REGULATION_CENTRE) and extra \
                    and extra.get("ins_lookup") and st.exists and self.role_decision() is None \
                    and access.rule != "blocked":
                return permit("ins-lookup", "exact INS lookup", obligations={"view": "ins_only"})
            return access
        if resource_type == "Patient":
            return access
        if resource_type == "DocumentReference":
            return self._document(resource, st, access)
        if resource_type == "Consent":
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN):
                return access
            if consent_kind(resource) == "permit" and consent_actor_ids(resource) & self.my_ids:
                return access
            return deny("consent-other", "professionals see only their own authorization")
        if resource_type in ("AuditEvent", "Communication"):
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN):
                return access
            return deny("journal", "professionals do not read the journal")
        return deny("type", f"{resource_type} is not readable")

    def _document(self, doc: dict, st: PatientState, access: Decision) -> Decision:
        p = self.p
        labels = dmp.labels(doc)
        if p.kind == ADMIN:
            return deny("admin-no-content", "administrators never read documents")
        if p.kind == PATIENT:
            if dmp.INVISIBLE_PATIENT in labels:
                return deny("invisible-patient", "not yet announced to the patient")
            return access
        if p.kind == LEGAL_REPRESENTATIVE:
            if labels & {dmp.INVISIBLE_PATIENT, dmp.INVISIBLE_REPRESENTANTS_LEGAUX}:
                return deny("invisible-representatives", "hidden from legal representatives")
            return access
        # professionals: the author always sees what they wrote (they keep the original)
        is_author = p.id_nat_ps in dmp.author_ids(doc)
        if not self.policy.habilitations.may_read(self.profession, dmp.doc_type_codes(doc)) and not is_author:
            return deny("habilitation", "document type not readable by this profession")
        if dmp.MASQUE_PS in labels and not is_author:
            if not (p.purpose == TREAT and p.id_nat_ps in st.gp_ids):
                return deny("masque-ps", "document masked by the patient")
        return access

    def view(self, resource: dict, decision: Decision) -> dict:
        """Apply the decision's view obligation (INS lookup answers id, identifier and active)."""
        if decision.obligations.get("view") == "ins_only":
            return {k: v for k, v in resource.items() if k in INS_LOOKUP_ELEMENTS}
        return resource

    # -- searches: the decision as a storage query ----------------------------
    def normal_pids(self) -> set[str]:
        """pids a professional reaches in normal mode (permit or médecin traitant, not blocked, open)."""
        if self._normal_pids is not None:
            return self._normal_pids
        db = self.policy.storage.db
        ids = list(self.my_ids)
        permitted, blocked = set(), set()
        at = _now()
        for d in db["Consent"].find({"del": False, "res.status": "active",
                                     "res.provision.actor.reference.identifier.value": {"$in": ids}},
                                    {"pid": 1, "res": 1}):
            kind = consent_kind(d["res"])
            if not consent_in_force(d["res"], at):
                continue
            if kind == "permit":
                permitted.add(d["pid"])
            elif kind == "block":
                blocked.add(d["pid"])
        gp = {d["_id"] for d in db["Patient"].find(
            {"del": False, "res.generalPractitioner.identifier.value": self.p.id_nat_ps}, {"_id": 1})}
        candidates = (permitted - blocked) | gp
        self.load(candidates)
        self._normal_pids = {pid for pid in candidates if self.states[pid].open}
        return self._normal_pids

    def reachable_pids(self, named_pids: set[str]) -> set[str] | None:
        """pids whose records the caller may enter in this request; None = no restriction (admin)."""
        p = self.p
        if self.role_decision():
            return set()
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
        pids = self.reachable_pids(named_pids)
        if resource_type == "Patient":
            if pids is None:
                return {}
            flt = {"_id": sorted(pids)[0]} if len(pids) == 1 else {"_id": {"$in": sorted(pids)}}
            if ins_lookup and p.kind in (PS, REGULATION_CENTRE) and self.role_decision() is None:
                # exact INS: the criteria themselves select the DMP; can_see redacts it
                return {}
            return flt
        if resource_type == "DocumentReference":
            if p.kind == ADMIN or pids is not None and not pids:
                return None
            flt: dict = _pid_filter(pids)
            if p.kind == PATIENT:
                return {**flt, "a.labels": {"$ne": dmp.INVISIBLE_PATIENT}}
            if p.kind == LEGAL_REPRESENTATIVE:
                return {**flt, "a.labels": {"$nin": [dmp.INVISIBLE_PATIENT, dmp.INVISIBLE_REPRESENTANTS_LEGAUX]}}
            # rule 9: habilitation x type, MASQUE_PS only for the author and (normal mode) the
            # médecin traitant; the author always sees what they wrote (see access_facets)
            allowed = sorted(self.policy.habilitations.allowed_types(self.profession))
            keys = [f"t:{c}" for c in allowed] + [f"au:{p.id_nat_ps}"]
            masked = [f"m:{c}" for c in allowed]
            gp_pids = {pid for pid in pids if p.purpose == TREAT and p.id_nat_ps in self.states[pid].gp_ids}
            if gp_pids == pids:
                return {**flt, "a.keys": {"$in": keys + masked}}
            if gp_pids:
                return {**flt, "$or": [{"a.keys": {"$in": keys}},
                                       {**_pid_filter(gp_pids), "a.keys": {"$in": masked}}]}
            return {**flt, "a.keys": {"$in": keys}}
        if resource_type == "Consent":
            if pids is None:
                return {}
            if not pids:
                return None
            flt = _pid_filter(pids)
            if p.kind in (PS, REGULATION_CENTRE):
                flt.update({"res.provision.type": "permit",
                            "res.provision.actor.reference.identifier.value": {"$in": list(self.my_ids)}})
            return flt
        if resource_type in ("AuditEvent", "Communication"):
            if p.kind in (PS, REGULATION_CENTRE):
                return None
            if pids is None:
                return {}
            return _pid_filter(pids) if pids else None
        return None

    # -- writes (DESIGN.md rules 10-11, CONTRACT.md) -----------------------------
    def can_write(self, interaction: str, resource_type: str, new: dict | None, old: dict | None,
                  pid: str | None) -> Decision:
        role = self.role_decision()
        if role:
            return role
        if resource_type in ("AuditEvent", "Communication"):
            return deny("read-only", f"{resource_type} is read-only")
        if resource_type == "Patient":
            return self._write_patient(interaction, new, old, pid)
        if pid is None:
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if resource_type == "Consent":
            return self._write_consent(interaction, new, old, st, access)
        if resource_type in ("DocumentReference", "Binary"):
            return self._write_document(interaction, resource_type, new, old, st, access)
        return deny("type", f"{resource_type} is not writable")

    def _write_patient(self, interaction, new, old, pid) -> Decision:
        p = self.p
        if p.kind == ADMIN:
            return permit("admin", "administrator manages DMPs")
        if interaction == "create":
            if p.kind == PS and p.purpose == TREAT:
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
            if consent_actor_ids(new) != {p.id_nat_ps}:
                return deny("ps-consent", "a professional may only authorize themselves")
            if not any(v.get("verified") is True for v in new.get("verification") or []):
                return deny("ps-consent", "the first access must be attested (verification.verified)")
            return permit("first-access", "attested first access", obligations={"notify": "first_access"})
        return deny("consent-write", "not allowed")

    def _write_document(self, interaction, rtype, new, old, st, access) -> Decision:
        p = self.p
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind == ADMIN:
            return deny("admin-no-content", "an administrator never writes document content")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
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
            return access
        if old is not None and p.id_nat_ps in dmp.author_ids(old):
            return permit("author", "the author changes their document")
        return deny("not-author", "only the author replaces or withdraws a document")


def _without_labels(doc: dict | None, codes: set[str]) -> dict:
    """The document without the given DMP labels and without meta (for comparisons)."""
    if doc is None:
        return {}
    out = dmp.set_labels(doc, dmp.labels(doc) - codes)
    out = {k: v for k, v in out.items() if k not in ("meta", "text")}
    if not out.get("securityLabel"):
        out.pop("securityLabel", None)
    return out
