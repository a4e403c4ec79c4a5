"""May this caller enter this DMP? The DMP-level rules (DESIGN.md "The access rules", rules 2-8).

In DESIGN.md order: the role (rule 2), the token's compartment, the administrator, the DMP's
state, the patient and their legal representatives, then professionals: closed DMP, blocks
(never the médecin traitant), break-glass and its opt-out, centre 15 and its opt-out, the
patient's authorization, the médecin traitant; deny by default. The same facts as storage
queries (:meth:`DmpRules.reachable_pids`, the exact-INS lookup) let a search reach only the DMPs
the caller may enter. Destroying a DMP and asking for an access code are decided here too.
"""
from __future__ import annotations

from ...http.errors import BadRequest
from ...profiles.ins import INS_SYSTEMS
from ..principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS,
                         REGULATION_CENTRE, TREAT)
from .consents import consent_in_force, consent_kind, identifier_key, now
from .representatives import representative_in_force
from .state import Decision, PatientState, Rules, deny, permit

INS_LOOKUP_PARAMS = ("identifier", "_format", "_pretty", "_elements", "_summary")
#: the refusals of a write that answer as the same write on something missing (CONTRACT.md "REST behaviour")
LOOKS_MISSING = ("dmp-state", "not-authorized", "patient-other", "dmp-closed", "no-patient", "role",
                 "compartment", "blocked", "excluded-profession")


class DmpRules(Rules):
    """The DMP-level rules for one request (caches what a professional's Consents say)."""

    def __init__(self, access):
        super().__init__(access)
        self._normal_pids: set[str] | None = None
        self._choices: tuple | None = None

    # -- rule 2: roles ---------------------------------------------------------
    def role_decision(self) -> Decision | None:
        """Deny for excluded or unknown roles; None when the role may go on."""
        p = self.p
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            return None if p.patient_id else deny("role", "patient token without fhirUser")
        if p.kind in (ADMIN, PRIVACY_OFFICER):
            return None
        if p.kind in (PS, REGULATION_CENTRE):
            if not p.id_nat_ps:
                return deny("role", "professional without idNatPs")
            # two-factor (acr eidas1) is checked once, by authentication: its refusal is the
            # RFC 9470 step-up 401 (security/auth.py), not a decision
            if not any(self.policy.habilitations.knows(code) for code in p.professions):
                return deny("excluded-profession", "profession not in the habilitation matrix (excluded role)")
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
        if p.kind == PRIVACY_OFFICER and st.known:
            # CONTRACT.md "Privacy operations": journals, Consents, Patients, representatives and
            # review Tasks of every DMP; never document content (DocumentRules.judge)
            return permit("privacy-officer", "privacy officer (no document content)")
        if not st.exists:
            return deny("dmp-state", "no such DMP")
        if p.kind == LEGAL_REPRESENTATIVE and p.patient_id == st.pid:
            # re-checked on the state of this request (ended, period over, the child is 18)
            return representative_in_force(st.representative or {}, st.patient, now())
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
            own = st.matching("permit", {identifier_key(IDNATPS_SYSTEM, p.id_nat_ps)})
            if own:
                return permit("authorized", "the patient authorized this professional", consents=own)
            return permit("establishment", "the patient authorized the professional's establishment",
                          consents=permits)
        if gp:
            return permit("medecin-traitant", "médecin traitant", gp_patient=st.patient_version)
        return deny("not-authorized", "no authorization from the patient")

    def refusal_looks_missing(self, pid: str | None, decision: Decision) -> bool:
        """CONTRACT.md "REST behaviour": a refused write outside every DMP the caller may enter
        answers as the same write on something missing; inside one, 403 with the reason."""
        if pid and self.dmp_access(self.state(pid)).permit:
            return False
        return decision.rule in LOOKS_MISSING

    # -- searches: the decision as a storage query ----------------------------
    def _my_choices(self) -> tuple[set[str], set[str], set[str]]:
        """(permitted, blocked, médecin traitant) pids of a professional: the Consents naming them
        (in force) and the DMPs naming them médecin traitant — the same facts :meth:`dmp_access`
        reads in each :class:`PatientState`. A médecin traitant is never blocked (rule 5)."""
        if self._choices is None:
            permitted, blocked = set(), set()
            at = now()
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
        self.access.load(candidates)
        self._normal_pids = {pid for pid in candidates if self.access.states[pid].open}
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
            return {p.compartment} if self.access.entry(self.state(p.compartment))[2].permit else set()
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            st = self.state(p.patient_id)
            return {p.patient_id} if st.exists else set()
        if p.kind in (ADMIN, PRIVACY_OFFICER):
            return None
        if named_pids or p.purpose in (BTG, ETREAT):
            # the DMPs the request names, one by one (emergency modes reach no others): only their
            # context is loaded, not that of every DMP the professional is authorized on; each
            # DMP's entry decision is the request's (RequestAccess.entry: taken once)
            self.access.load(named_pids)
            return {pid for pid in named_pids if self.access.entry(self.access.states[pid])[2].permit}
        return set(self.normal_pids())

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
