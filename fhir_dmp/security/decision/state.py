"""The decision's data: its outcome (:class:`Decision`) and its context (:class:`PatientState`).

Everything one request needs to know about a DMP (the patient's active Consents, DMP state,
médecin traitant, break-glass grant, the calling representative's RelatedPerson) is loaded once
per request and per patient (:func:`load_states`), never once per resource. :class:`Rules` is what
the rule objects of each subject (:mod:`.dmp_access`, :mod:`.documents`, :mod:`.writes`,
:mod:`.representatives`) share: the request's caller, policy and states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...profiles import dmp
from ..context_cache import load_contexts
from ..principal import BTG, LEGAL_REPRESENTATIVE, Principal
from .consents import consent_actor_ids, consent_has_actor, consent_in_force, consent_kind, now

SERVER_WRITTEN = ("AuditEvent", "Communication")   # the journal and the notices: only the server writes them
#: the directory of professionals (CONTRACT.md "The directory of professionals"): no patient's data,
#: read by every authenticated caller, written only by ``fhir-dmp load`` (the REST layer refuses writes)
DIRECTORY = ("Practitioner", "PractitionerRole")

@dataclass
class Decision:
    """permit or deny, the rule that decided, and what the caller must do next."""

    permit: bool
    rule: str
    reason: str
    consents: list = field(default_factory=list)      # [(Consent/id, versionId)]
    obligations: dict = field(default_factory=dict)   # view=ins_only, grant=..., notify=...
    gp_patient: tuple | None = None   # medecin-traitant: (Patient/id, versionId) naming the GP


def permit(rule, reason, **kw) -> Decision:
    return Decision(True, rule, reason, **kw)


def deny(rule, reason, **kw) -> Decision:
    return Decision(False, rule, reason, **kw)


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

    @property
    def patient_version(self) -> tuple[str, str] | None:
        """``(Patient/id, versionId)`` of the DMP's current Patient (the version a decision read)."""
        if not self.patient:
            return None
        vid = (self.patient.get("meta") or {}).get("versionId") or (self.doc or {}).get("vid")
        return (f"Patient/{self.pid}", str(vid)) if vid else None

    def matching(self, kind: str, actor_ids: set[str] = frozenset(), *, everyone: bool = False) -> list:
        """Consents of ``kind`` in force naming one of ``actor_ids``; with ``everyone``, those
        naming no actor count too (they apply to every professional)."""
        at = now()
        out = []
        for cid, vid, res in self.consents:
            if consent_kind(res) != kind or not consent_in_force(res, at):
                continue
            actors = consent_actor_ids(res)
            if actor_ids and not (actors & actor_ids) and not (everyone and not consent_has_actor(res)):
                continue
            out.append((f"Consent/{cid}", str(vid)))
        return out


def load_states(policy, principal: Principal, pids: list[str], session=None) -> dict[str, PatientState]:
    """The states of ``pids``: from the process's context cache (``context_cache.py``) or two
    queries (Patients, active Consents); inside a write transaction (``session``) always from the
    transaction."""
    storage = policy.storage
    cache = policy.context_cache
    if cache is not None and session is None:
        contexts = cache.load(pids)
    else:
        contexts = load_contexts(storage, pids, session)
    grants = {}
    if principal.is_professional and principal.id_nat_ps and principal.purpose == BTG:
        grants = storage.live_grants(pids, principal.id_nat_ps, now())
    representatives = {}
    if principal.kind == LEGAL_REPRESENTATIVE and principal.related_person_id:
        # read fresh on every request (never cached): an ended representative stops at once
        rp = storage.read("RelatedPerson", principal.related_person_id, session=session)
        if rp is not None and not rp.deleted and rp.pid in pids:
            representatives[rp.pid] = rp.resource
    out = {}
    for pid in pids:
        res, known, consents, doc = contexts[pid]
        out[pid] = PatientState(pid, res, known, consents, grants.get(pid), doc, representatives.get(pid))
    return out


class Rules:
    """The rules of one subject, for one request: they read the caller, the policy and the
    patients' states of the request's :class:`~.access.RequestAccess`, and decide through it
    when a rule of another subject is needed (its ``dmp_access``, ``role_decision``)."""

    def __init__(self, access):
        self.access = access

    @property
    def p(self) -> Principal:
        return self.access.p

    @property
    def policy(self):
        return self.access.policy

    @property
    def my_ids(self) -> set[str]:
        return self.access.my_ids

    @property
    def profession(self) -> str | None:
        return self.access.profession

    def state(self, pid: str) -> PatientState:
        return self.access.state(pid)

    def dmp_access(self, st: PatientState) -> Decision:
        return self.access.dmp_access(st)

    def role_decision(self) -> Decision | None:
        return self.access.role_decision()
