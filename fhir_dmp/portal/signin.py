"""Who may sign in to the portal, and the dev-mode sign-in (the machinery is ``fhir_dmp.spaces``).

- With ``FHIR_DMP_ISSUER``: OpenID Connect code + PKCE, scope ``openid fhirUser patient/*.cruds``,
  redirect ``<origin>/portal/callback`` (``spaces.signin``).
- Dev mode (no issuer): a form takes a Patient id (or a RelatedPerson id for a legal
  representative) and mints a dev token with the dev key, exactly like ``fhir-dmp dev-token
  patient`` (``legal_representative``).

Only patients and legal representatives may use the portal; signing in reads their record
through the access decision (no session for a record that does not exist).
"""
from __future__ import annotations

from ..security.devkeys import mint_token
from ..security.principal import LEGAL_REPRESENTATIVE, PATIENT, Principal
from ..spaces.signin import DEV_TOKEN_LIFETIME, Space

PORTAL_SCOPE = "openid fhirUser patient/*.cruds"


def _admits(principal: Principal) -> bool:
    return principal.kind in (PATIENT, LEGAL_REPRESENTATIVE) and bool(principal.patient_id)


PORTAL = Space(name="portal", prefix="/portal", cookie="fhir_dmp_portal", scope=PORTAL_SCOPE, admits=_admits,
               refusal="Cet espace est réservé aux patients et à leurs représentants légaux",
               check=lambda repo, principal: repo.read("Patient", principal.patient_id))


def dev_token(config, *, patient: str | None = None, related_person: str | None = None) -> str:
    """A dev token for a patient (``fhir-dmp dev-token patient``) or a legal representative
    (``fhir-dmp dev-token legal_representative --related-person``)."""
    if related_person:
        return mint_token(config, LEGAL_REPRESENTATIVE, related_person=related_person,
                          lifetime=DEV_TOKEN_LIFETIME)
    return mint_token(config, PATIENT, patient=patient, lifetime=DEV_TOKEN_LIFETIME)
