"""The one access decision point (DESIGN.md "The access rules"), shaped after HAPI FHIR's
consent service (``IConsentService``).

The guarded repository holds one :class:`RequestAccess` per request (``AccessPolicy.for_request``)
and calls, in HAPI's vocabulary:

* :meth:`RequestAccess.start` at the start of an operation (SMART scope; 403 when the token's
  scopes do not cover the interaction): HAPI's ``startOperation``; :meth:`RequestAccess.in_scope`
  asks the same question without refusing (the system history skips the types it does not cover);
* :meth:`RequestAccess.narrow` to turn the decision into a storage query, so totals, pages and
  links count only what the caller may see (no HAPI counterpart: HAPI filters the results after
  the query);
* :meth:`RequestAccess.can_see` on every resource before it leaves (the same rules, evaluated on
  one resource: read, vread, history, includes, Binary, and the safety net of searches): HAPI's
  ``canSeeResource``;
* :meth:`RequestAccess.will_see` on what it returns (the decision's view obligation masks
  elements): HAPI's ``willSeeResource``;
* :meth:`RequestAccess.can_write` before any write (403 with the reason inside a DMP the caller
  may enter; outside it, the repository answers as for something missing): HAPI has no
  counterpart (its consent service only reads);
* :meth:`RequestAccess.complete` for what the journal records of the outcome, success or failure
  (``GuardedRepository.record``): HAPI's ``completeOperationSuccess``/``completeOperationFailure``.

The rules live in modules by subject, each a rule object this facade delegates to:
:mod:`.dmp_access` (may the caller enter this DMP, rules 2-8 in DESIGN.md order),
:mod:`.documents` (rules 9-11: the habilitation matrix, the labels, what a deposit carries),
:mod:`.writes`, :mod:`.representatives`; :mod:`.consents` reads Consents, :mod:`.facets` the flat
facts stored beside each resource, :mod:`.state` holds the context (:class:`~.state.PatientState`,
loaded once per request and per patient, never once per resource) and the :class:`~.state.Decision`
with its rule, reason and basis (the Consents it rests on).

Each rule that a search filters on is written once, as a storage query over the access facets
(``DocumentRules.document_query``, :meth:`RequestAccess.consent_query`, the exact-INS lookup's
filter), and :meth:`RequestAccess.can_see` evaluates that same query on the one resource
(:func:`~fhir_dmp.storage.filters.matches`); ``tests/security/test_access_property.py`` checks on random worlds that
both agree, totals included. Deny is the default: every function ends in a deny unless a rule
permitted.
"""
from __future__ import annotations

from ...http.errors import Forbidden
from ...storage.filters import matches
from ..principal import ADMIN, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, Principal
from .basis import outside_dmp_basis, rule_basis
from .consents import principal_keys
from .dmp_access import DmpRules
from .documents import DocumentRules
from .facets import access_facets, pid_filter
from .representatives import RepresentativeRules
from .state import DIRECTORY, Decision, PatientState, deny, load_states, permit
from .writes import WriteRules

INTERACTION_LETTER = {"read": "r", "vread": "r", "history": "r", "history-type": "s", "search": "s", "create": "c",
                      "update": "u", "patch": "u", "delete": "d"}
INS_LOOKUP_ELEMENTS = ("resourceType", "id", "meta", "identifier", "active")
_OWNER_SIDE = (PATIENT, LEGAL_REPRESENTATIVE, ADMIN)
#: the types of an entered DMP that only these kinds read (professionals never do: as missing);
#: the privacy officer reads journals, Consents, representatives and review Tasks, never the
#: notices (CONTRACT.md "Privacy operations")
READERS = {"AuditEvent": _OWNER_SIDE + (PRIVACY_OFFICER,), "Communication": _OWNER_SIDE,
           "RelatedPerson": _OWNER_SIDE + (PRIVACY_OFFICER,), "Task": _OWNER_SIDE + (PRIVACY_OFFICER,)}
_NOT_READ = {"AuditEvent": ("journal", "professionals do not read the journal"),
             "Communication": ("journal", "professionals do not read the journal"),
             "RelatedPerson": ("representatives", "professionals do not read legal representatives"),
             "Task": ("review", "review cases are read by the patient's side and the privacy officer")}


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
        self.session = None       # set by the repository inside a write transaction
        # per DMP, for the documents of one request (a search page judges each one):
        # [state, its grant, the entry decision, the document query (key, compiled) once one is judged],
        # reused while the request holds the same state and grant (the repository replaces or
        # amends them)
        self._judged: dict[str, list] = {}
        # per DMP, the last decision of this request that decided for it (its basis, :meth:`deciding`):
        # the journal never reloads a state for it (inside a write's transaction, or after it)
        self._decided: dict[str, tuple[str, Decision]] = {}

        # the rules by subject (DESIGN.md "The access rules")
        self.dmp = DmpRules(self)
        self.documents = DocumentRules(self)
        self.writes = WriteRules(self)
        self.representatives = RepresentativeRules(self)

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
        if todo:
            self.states.update(load_states(self.policy, self.p, todo, self.session))

    def state(self, pid: str) -> PatientState:
        self.load([pid])
        return self.states[pid]

    # -- rule 1: SMART scope ---------------------------------------------------
    def start(self, resource_type: str, interaction: str) -> None:
        """HAPI's ``startOperation``: 403 when the token's scopes do not cover the interaction."""
        if not self.in_scope(resource_type, interaction):
            raise Forbidden(f"the token's scopes do not allow {interaction} on {resource_type}",
                            code="forbidden")

    def in_scope(self, resource_type: str, interaction: str) -> bool:
        """Do the token's SMART scopes cover ``interaction`` on ``resource_type``?"""
        return self.p.scopes.allows(resource_type, INTERACTION_LETTER.get(interaction, "r"))

    # -- rules 2-8 (dmp_access.py) -------------------------------------------------
    def role_decision(self) -> Decision | None:
        """Deny for excluded or unknown roles; None when the role may go on."""
        return self.dmp.role_decision()

    @property
    def profession(self) -> str | None:
        """The first of the caller's professions known to the matrix."""
        return self.dmp.profession

    def dmp_access(self, st: PatientState) -> Decision:
        """Decision on a DMP as a whole (before per-document rules); the last one of each DMP is
        the basis of what this request journals there (:meth:`deciding`)."""
        decision = self.dmp.dmp_access(st)
        self.deciding(decision, st.pid)
        return decision

    # -- rule 9 and per-type rules: may the caller see this resource? ----------
    def can_see(self, resource_type: str, resource: dict, pid: str | None, *, extra: dict | None = None
                ) -> Decision:
        """HAPI's ``canSeeResource``: the decision on one resource of DMP ``pid`` (the Patient's own
        id for a Patient), with its rule, reason and basis; ``extra["ins_lookup"]``: the resource
        was found by a professional's exact-INS lookup."""
        p = self.p
        if resource_type in DIRECTORY:
            return permit("directory", "the directory of professionals")
        if resource_type == "Patient":
            pid = resource.get("id")
        if pid is None:
            if resource_type == "AuditEvent" and p.kind in (ADMIN, PRIVACY_OFFICER) and self.role_decision() is None \
                    and p.compartment is None:
                return permit("admin" if p.kind == ADMIN else "privacy-officer", "the system journal")
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self.entry(st)[2]
        if not access.permit:
            if resource_type == "Patient" and extra and extra.get("ins_lookup") and self.dmp.ins_lookup_allowed(st):
                return permit("ins-lookup", "exact INS lookup", obligations={"view": "ins_only"})
            return access
        if resource_type == "Patient":
            return access
        if resource_type == "DocumentReference":
            return self.documents.judge(resource, st, access)
        if resource_type == "Consent":
            if p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN, PRIVACY_OFFICER):
                return access
            if matches(self.consent_query(), {"res": resource, "a": access_facets("Consent", resource)}):
                return access
            return deny("consent-other", "professionals see only their own authorization")
        if resource_type in READERS:
            if p.kind not in READERS[resource_type]:
                return deny(*_NOT_READ[resource_type])
            if resource_type == "AuditEvent" and p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
                # the journal never names a document hidden from its reader (CONTRACT.md "The journal")
                return permit(access.rule, access.reason, consents=access.consents,
                              obligations={"view": "journal"})
            return access
        return deny("type", f"{resource_type} is not readable")

    def entry(self, st: PatientState) -> list:
        """``[st, its grant, dmp_access(st), None]`` computed once per state and grant within this
        request (a search's reach, its denials and the judgement of each of its documents share
        it); :meth:`DocumentRules.judge` fills the last slot with its DMP's
        :meth:`DocumentRules.document_query` (its key and compiled test) the first time it judges
        a document (a read of a Patient or a Consent never compiles it)."""
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

    # -- what leaves, and what the journal records ----------------------------------
    def will_see(self, resource: dict, decision: Decision, sees=None) -> dict:
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

    def complete(self, decision: Decision | None, pid: str | None = None) -> dict | None:
        """What the journal records of an operation's decision (success or failure) in DMP
        ``pid``: the result, the rule, its reason and the Consents it rests on, and its
        ``basis`` (:meth:`deciding`): the rule that decided for the DMP, by
        ``dmp-access-basis`` code, with the Consent versions and the médecin traitant's Patient
        version it rests on."""
        out = None
        if decision is not None:
            out = {"result": "permit" if decision.permit else "deny", "rule": decision.rule,
                   "reason": decision.reason, "consents": [list(c) for c in decision.consents]}
        granted = decision.permit if decision is not None else True
        code, deciding = self.deciding(decision, pid)
        basis = {"code": code or outside_dmp_basis(self.p.kind, granted), "consents": [], "patient": None}
        if deciding is not None:
            basis["consents"] = [list(c) for c in deciding.consents]
            basis["patient"] = list(deciding.gp_patient) if deciding.gp_patient else None
        return {**(out or {}), "basis": basis}

    def deciding(self, decision: Decision | None, pid: str | None) -> tuple[str | None, Decision | None]:
        """The basis code and the decision that decided for DMP ``pid`` (:mod:`.basis`): the
        decision itself when its rule decides for the DMP, else the DMP's entry decision of this
        request: the last decision of this request that decided for it (the DMP's entry decision,
        a write's; a document hidden inside a granted request does not change it), else the entry
        decision, computed then; (None, None) outside any DMP."""
        if decision is not None:
            code = rule_basis(decision.rule, decision.permit)
            if code:
                if pid:
                    self._decided[pid] = (code, decision)
                return code, decision
        if pid in self._decided:
            return self._decided[pid]
        if pid:
            entry = self.entry(self.state(pid))[2]
            code = rule_basis(entry.rule, entry.permit)
            if code:
                return code, entry
        return None, None

    # -- searches: the decision as a storage query ----------------------------
    def narrow(self, resource_type: str, named_pids: set[str], *, ins_lookup: bool = False) -> dict | None:
        """The storage filter restricting a search to what the caller may see (run in the
        database; :meth:`can_see` evaluates the same queries in memory); None = nothing."""
        p = self.p
        if resource_type in DIRECTORY:
            return {}
        pids = self.dmp.reachable_pids(named_pids)
        if resource_type == "Patient":
            if pids is None:
                return {}
            if ins_lookup:
                # exact INS: the criteria themselves select the DMP; can_see redacts it
                return self.dmp.ins_lookup_filter()
            return {"_id": sorted(pids)[0]} if len(pids) == 1 else {"_id": {"$in": sorted(pids)}}
        if resource_type == "DocumentReference":
            if p.kind in (ADMIN, PRIVACY_OFFICER) or pids is not None and not pids:
                return None
            if len(pids) == 1:      # a search naming its DMP
                pid = next(iter(pids))
                return {**pid_filter(pids), **self.documents.document_query(pid)}
            # the DMPs that share one document query are grouped (the médecin traitant's differ)
            groups: dict[str, tuple[dict, list]] = {}
            for pid in sorted(pids):
                q = self.documents.document_query(pid)
                groups.setdefault(repr(q), (q, []))[1].append(pid)
            parts = [{**pid_filter(group), **q} for q, group in groups.values()]
            return parts[0] if len(parts) == 1 else {"$or": parts}
        if resource_type == "Consent":
            if pids is None:
                return {}
            if not pids:
                return None
            flt = pid_filter(pids)
            flt.update(self.consent_query())
            return flt
        if resource_type in READERS:
            if p.kind not in READERS[resource_type]:
                return None
            if pids is None:
                return {}
            return pid_filter(pids) if pids else None
        return None

    # -- writes ------------------------------------------------------------------------
    def can_write(self, interaction: str, resource_type: str, new: dict | None, old: dict | None,
                  pid: str | None, *, context: dict | None = None) -> Decision:
        """May the caller write ``new`` over ``old`` in DMP ``pid``? (:mod:`.writes`)"""
        return self.writes.can_write(interaction, resource_type, new, old, pid, context=context)
