"""Why: the basis of an access, the rule that decided for the DMP (CONTRACT.md "Privacy operations").

Every AuditEvent carries one code of the CodeSystem ``dmp-access-basis``
(``fhir_dmp/data/ig/CodeSystem-dmp-access-basis.json``). The decision's rules have finer codes
(:class:`~.state.Decision` ``rule``); :data:`RULE_BASIS` is the one mapping from them to a basis.
A rule that does not decide for the DMP (a document hidden inside a granted request, a deposit
check, a search, an error) has no basis of its own: the event takes the basis of the DMP's entry
decision (:meth:`~.access.RequestAccess.explain`). With no DMP at all (the system journal: a
refused token, a role refused, a search that reaches no DMP, the directory), the basis says who
decided: :func:`outside_dmp_basis`.
"""
from __future__ import annotations

from ...profiles.dmp import ACCESS_BASIS_EXTENSION as BASIS_EXTENSION, ACCESS_BASIS_SYSTEM as BASIS_SYSTEM
from ..principal import ADMIN, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER

#: granted bases, with their display
GRANTED = {
    "patient": "the patient", "representative": "a legal representative in force",
    "creator": "the professional who opened the DMP", "authorized": "authorized by the patient",
    "establishment": "the establishment authorized by the patient (AIR mode)",
    "medecin-traitant": "the médecin traitant", "break-glass": "break-glass", "centre-15": "centre 15 (SAMU)",
    "admin": "the administrator", "privacy-officer": "the privacy officer",
}
#: refused bases, with their display
REFUSED = {
    "blocked": "the patient blocked this professional", "not-authorized": "no authorization from the patient",
    "break-glass-refused": "break-glass refused (opt-out or no reason)",
    "centre-15-refused": "centre 15 refused (opt-out or not the regulation centre)",
    "excluded-profession": "profession excluded by the habilitation matrix", "closed": "the DMP is closed",
    "feeding-opposition": "the patient opposed feeding the DMP", "not-author": "not the author",
    "access-code": "wrong or expired access code",
    "scope": "decided by the token alone (authentication, role, SMART scopes, compartment), no DMP rule",
}

#: the decision's rules that decide for the DMP (security/decision/*.py), with their basis; a rule
#: absent here, or whose basis does not match its outcome (a permit of ``access-code``: a code was
#: sent, the DMP is not entered), defers to the DMP's entry decision
RULE_BASIS = {
    # granted (dmp_access.py, representatives.py, writes.py)
    "patient-self": "patient", "legal-representative": "representative", "ps-creates-dmp": "creator",
    "authorized": "authorized", "first-access": "authorized", "establishment": "establishment",
    "medecin-traitant": "medecin-traitant", "break-glass": "break-glass", "centre-15": "centre-15",
    "admin": "admin", "privacy-officer": "privacy-officer",
    "privacy-review": "privacy-officer",   # the server opening a review case (review/cases.py)
    # refused
    "blocked": "blocked", "not-authorized": "not-authorized", "dmp-state": "not-authorized",
    "patient-other": "not-authorized", "representative": "not-authorized",
    "btg-opt-out": "break-glass-refused", "btg-no-reason": "break-glass-refused",
    "centre15-opt-out": "centre-15-refused", "centre15-role": "centre-15-refused",
    "excluded-profession": "excluded-profession", "dmp-closed": "closed", "feeding-opposed": "feeding-opposition",
    "not-author": "not-author", "access-code": "access-code",
    "role": "scope", "compartment": "scope", "authentication": "scope",
}

#: what the patient reads (the portal's journal, ``$explain-access``'s text), in French
FRENCH = {
    "patient": "le patient", "representative": "représentant légal", "creator": "a créé le DMP",
    "authorized": "autorisé par le patient", "establishment": "établissement autorisé par le patient",
    "medecin-traitant": "médecin traitant", "break-glass": "accès en urgence (bris de glace)",
    "centre-15": "centre de régulation (SAMU-Centre 15)", "admin": "administrateur",
    "privacy-officer": "délégué à la protection des données",
    "blocked": "professionnel bloqué", "not-authorized": "sans autorisation du patient",
    "break-glass-refused": "bris de glace refusé", "centre-15-refused": "accès du centre 15 refusé",
    "excluded-profession": "profession exclue", "closed": "DMP fermé",
    "feeding-opposition": "opposition à l'alimentation du DMP", "not-author": "n'est pas l'auteur",
    "access-code": "code d'accès erroné ou expiré", "scope": "droits du jeton insuffisants",
}

_KIND_BASIS = {PATIENT: "patient", LEGAL_REPRESENTATIVE: "representative", ADMIN: "admin",
               PRIVACY_OFFICER: "privacy-officer"}


def rule_basis(rule: str | None, granted: bool) -> str | None:
    """The basis a rule decides on its own, or None when it defers to the DMP's entry decision."""
    code = RULE_BASIS.get(rule or "")
    if code is None or (code in GRANTED) != granted:
        return None
    return code


def outside_dmp_basis(kind: str | None, granted: bool) -> str:
    """The basis of an event in no DMP: who the caller is when granted (the patient, a
    representative, the administrator, the privacy officer), else ``scope`` (decided by the token
    alone; a professional's access outside every DMP, the directory, is not a DMP rule either)."""
    if granted:
        return _KIND_BASIS.get(kind or "", "scope")
    return "scope"


def basis_coding(code: str) -> dict:
    """The ``valueCoding`` of the ``dmp-access-basis`` extension."""
    return {"system": BASIS_SYSTEM, "code": code, "display": GRANTED.get(code) or REFUSED.get(code, code)}


def event_basis(event: dict) -> str | None:
    """The basis code an AuditEvent carries (its ``dmp-access-basis`` extension), None without one."""
    return next(((e.get("valueCoding") or {}).get("code") for e in event.get("extension") or ()
                 if e.get("url") == BASIS_EXTENSION), None)


def basis_french(code: str) -> str:
    """The basis as the patient reads it: « médecin traitant », « refusé : professionnel bloqué »."""
    label = FRENCH.get(code, code)
    return label if code in GRANTED else f"refusé : {label}"
