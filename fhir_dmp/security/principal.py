"""Who is calling: the Principal built from a verified access token.

CONTRACT.md "Access tokens" lists the claims. The Principal is plain data:
the decision (``security/decision/``) reads it, nothing else interprets
claims.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .scopes import Scopes

# Kinds of principal (DESIGN.md "The access rules")
PATIENT = "patient"
LEGAL_REPRESENTATIVE = "legal_representative"
PS = "ps"
REGULATION_CENTRE = "regulation_centre"
ADMIN = "admin"
#: CONTRACT.md "Privacy operations": reads journals, Consents, Patients, representatives and review
#: Tasks of every DMP, never document content; writes only review Tasks; never a PS
PRIVACY_OFFICER = "privacy_officer"
#: the server itself, for what it writes on its own (review cases): no token ever maps to it
SERVER = "server"

# Purposes of use, v3-ActReason
TREAT, BTG, ETREAT = "TREAT", "BTG", "ETREAT"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
IDNATPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``kind``: one of PATIENT, LEGAL_REPRESENTATIVE, PS, REGULATION_CENTRE,
    ADMIN, PRIVACY_OFFICER (a token that fits none of these is refused at authentication), or
    SERVER for the server's own writes. ``patient_id`` is the DMP owner for patients and legal
    representatives. ``compartment`` is the one DMP ``patient/`` scopes confine
    the caller to (None: not confined). ``id_nat_ps`` and ``professions`` (TRE_G15 codes) for PS
    and regulation-centre staff. ``purpose`` is TREAT, BTG or ETREAT (already
    merged from the token and the request's ``Category`` header);
    ``btg_reason`` the break-glass justification.
    """

    kind: str
    subject: str
    scopes: Scopes
    patient_id: str | None = None
    compartment: str | None = None            # the one DMP patient/ scopes confine to (None: no limit)
    id_nat_ps: str | None = None
    professions: tuple[str, ...] = ()
    acr: str | None = None
    organization: str | None = None
    purpose: str = TREAT
    btg_reason: str | None = None
    client_id: str | None = None
    name: str | None = None
    #: legal representative: the RelatedPerson its token's ``fhirUser`` names on this server,
    #: as ``RelatedPerson/{id}``; ``patient_id`` is set only once it is found in force (repository)
    related_person: str | None = None
    claims: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_professional(self) -> bool:
        """PS or regulation-centre staff: subject to the habilitation matrix."""
        return self.kind in (PS, REGULATION_CENTRE)

    @property
    def profession(self) -> str | None:
        return self.professions[0] if self.professions else None

    @property
    def mode(self) -> str | None:
        """DMP access mode TRE_R248 for professionals."""
        if not self.is_professional:
            return None
        if self.purpose == BTG:
            return "bris_de_glace"
        if self.purpose == ETREAT:
            return "centre_15"
        return "normal"

    @property
    def related_person_id(self) -> str | None:
        """The id of the RelatedPerson a legal representative's token names."""
        if not self.related_person:
            return None
        return self.related_person.rstrip("/").rsplit("/", 1)[-1]

    def with_purpose(self, purpose: str, reason: str | None) -> "Principal":
        from dataclasses import replace
        return replace(self, purpose=purpose, btg_reason=reason or self.btg_reason)

    def reference(self) -> dict:
        """FHIR Reference identifying this caller (for author, agent.who)."""
        if self.id_nat_ps:
            ref = {"identifier": {"system": IDNATPS_SYSTEM, "value": self.id_nat_ps}}
            if self.name:
                ref["display"] = self.name
            return ref
        if self.kind == LEGAL_REPRESENTATIVE and self.related_person_id:
            return {"reference": f"RelatedPerson/{self.related_person_id}"}
        if self.patient_id:
            return {"reference": f"Patient/{self.patient_id}"}
        return {"display": self.subject}
