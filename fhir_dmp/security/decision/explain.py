"""``Patient/$explain-access``: what a given professional or establishment would be allowed now
(CONTRACT.md "Privacy operations").

The answer is the decision itself, not a second copy of the rules: a hypothetical
:class:`~fhir_dmp.security.principal.Principal` for the actor is built
(:func:`hypothetical_actor`) and the same :class:`~.access.RequestAccess` a real request of that
actor would hold decides (``start``, ``dmp_access``, ``narrow``): the basis and Consents of its
entry decision, and the storage filter of the documents it would see (the one a search of theirs
runs). Who may ask: :func:`may_explain`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...http.errors import BadRequest
from ..principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE, PATIENT,
                         PRIVACY_OFFICER, PS, REGULATION_CENTRE, TREAT, Principal)
from ..scopes import Scopes
from .state import Decision

ESTABLISHMENT_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
#: the profession assumed when none is given: a médecin (TRE_G15 "10", the matrix's first)
DEFAULT_PROFESSION = "10"
PURPOSES = (TREAT, BTG, ETREAT)
#: the idNatPs of "a professional of the establishment" with no choice of the patient naming them:
#: no Consent, Patient or document names it
ANY_MEMBER = "-"


def may_explain(p: Principal) -> bool:
    """Who asks ``$explain-access`` (others: as missing): the patient, a legal representative, the
    administrator, the privacy officer."""
    return p.kind in (PATIENT, LEGAL_REPRESENTATIVE, ADMIN, PRIVACY_OFFICER)


def hypothetical_actor(actor: str | None, profession: str | None, purpose: str | None) -> Principal:
    """The Principal a real token of ``actor`` (``system|value``: an idNatPs, or an establishment
    for any of its professionals, AIR mode) would give, with ``profession`` (TRE_G15) and
    ``purpose`` (TREAT, BTG with a reason, ETREAT: the regulation centre). 400 on anything else."""
    system, sep, value = (actor or "").partition("|")
    if not sep or not value.strip() or system not in (IDNATPS_SYSTEM, ESTABLISHMENT_SYSTEM):
        raise BadRequest(f"actor must be {IDNATPS_SYSTEM}|<idNatPs> or {ESTABLISHMENT_SYSTEM}|<establishment>",
                         expression="actor")
    purpose = purpose or TREAT
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}", expression="purpose")
    value = value.strip()
    establishment = system == ESTABLISHMENT_SYSTEM
    return Principal(kind=REGULATION_CENTRE if purpose == ETREAT else PS, subject=f"$explain-access {actor}",
                     scopes=Scopes.ALL, id_nat_ps=ANY_MEMBER if establishment else value,
                     professions=(profession or DEFAULT_PROFESSION,),
                     organization=f"{system}|{value}" if establishment else None, purpose=purpose,
                     btg_reason="$explain-access" if purpose == BTG else None)


@dataclass
class Explanation:
    """The decision a real request of the actor would get on the DMP: permit or deny, the basis
    and the decision that decided it (its Consents), and the storage filter of the DMP's
    documents it would see (None: none)."""

    decision: Decision
    basis: str
    deciding: Decision | None
    documents: dict | None


def explain(policy, actor: Principal, pid: str) -> Explanation:
    """What ``actor`` would be allowed on DMP ``pid`` now, decided by the access decision."""
    access = policy.for_request(actor)
    decision = access.dmp_access(access.state(pid))
    code, deciding = access.deciding(decision, pid)
    documents = None
    if decision.permit and access.in_scope("DocumentReference", "search"):
        documents = access.narrow("DocumentReference", {pid})
    return Explanation(decision, code or "scope", deciding, documents)
