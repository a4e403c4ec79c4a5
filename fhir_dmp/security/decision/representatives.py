"""Legal representatives (CONTRACT.md "Who the caller is", "Lifecycle of a DMP").

A RelatedPerson makes its holder a legal representative of the patient while it is in force
(:func:`representative_in_force`): checked once when the caller authenticates
(:func:`resolve_legal_representative`) and again on the state of every request
(:mod:`.dmp_access`). Who registers and ends representatives: :class:`RepresentativeRules`.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from ...profiles.dmp import ROLE_CODE_SYSTEM
from ..auth import invalid_token
from ..principal import ADMIN, LEGAL_REPRESENTATIVE, PATIENT, Principal
from .consents import consent_in_force, now
from .state import Decision, PatientState, Rules, deny, permit

PARENT, GUARDIAN = "PRN", "GUARD"
AGE_OF_MAJORITY = 18


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


def resolve_legal_representative(storage, principal: Principal) -> Principal:
    """CONTRACT.md "Who the caller is": a legal representative's token names a RelatedPerson
    (relative, or on this server's base URL); the caller acts for the patient it names while
    it is in force (:func:`representative_in_force`). Anything else: 401."""
    if principal.kind != LEGAL_REPRESENTATIVE:
        return principal
    # auth.principal_from_claims took only a RelatedPerson of this server
    rp = storage.read("RelatedPerson", principal.related_person_id)
    patient = storage.read("Patient", rp.pid) if rp and not rp.deleted and rp.pid else None
    decision = representative_in_force(rp.resource if rp and not rp.deleted else {},
                                       patient.resource if patient and not patient.deleted else None,
                                       now()) if rp else None
    if decision is None or not decision.permit:
        raise invalid_token("the token's RelatedPerson is not a legal representative in force")
    if principal.compartment is not None and principal.compartment != rp.pid:
        raise invalid_token("the patient claim names another patient than the RelatedPerson's")
    return replace(principal, patient_id=rp.pid,
                   compartment=rp.pid if principal.compartment is not None
                   or principal.scopes.contexts() == {"patient"} else None)


class RepresentativeRules(Rules):
    """Who writes RelatedPerson resources."""

    def can_write(self, interaction: str, new: dict | None, old: dict | None, st: PatientState,
                  access: Decision) -> Decision:
        """Legal representatives: the patient (of age) or the administrator creates and ends them."""
        p = self.p
        if not st.known:
            return deny("dmp-state", "no such DMP")
        if p.kind == ADMIN:
            return permit("admin", "administrator manages legal representatives")
        if not access.permit:
            return access
        if p.kind == PATIENT:
            if is_minor(st.patient, now()):
                return deny("representative-minor", "for a minor, the administrator manages legal "
                            "representatives")
            return permit("patient-representatives", "the patient manages their legal representatives")
        return deny("representative-write", "only the patient or the administrator manages legal "
                    "representatives")
