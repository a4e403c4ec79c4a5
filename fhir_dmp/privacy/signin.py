"""Who may sign in to the privacy officer's pages (the machinery is ``fhir_dmp.spaces``).

- With ``FHIR_DMP_ISSUER``: OpenID Connect code + PKCE as the portal's client, redirect
  ``<origin>/privacy/callback``, scope :data:`OFFICER_SCOPE`; the token's ``dmp_role`` must be
  ``privacy_officer``.
- Dev mode (no issuer): a form takes the officer's identifier and mints a dev token with the
  officer's role, exactly like ``fhir-dmp dev-token officer``.

Only privacy officers may use these pages; anyone else signed in gets a 403 page.
"""
from __future__ import annotations

from ..security.devkeys import mint_token
from ..security.principal import PRIVACY_OFFICER, Principal
from ..spaces.signin import DEV_TOKEN_LIFETIME, Space

#: what the officer reads (journals, Consents, Patients, the directory) and writes (review Tasks)
OFFICER_SCOPE = "openid fhirUser user/*.rs user/Task.u"


def _admits(principal: Principal) -> bool:
    return principal.kind == PRIVACY_OFFICER


OFFICER = Space(name="privacy", prefix="/privacy", cookie="fhir_dmp_privacy", scope=OFFICER_SCOPE,
                admits=_admits, refused_page=True,
                refusal="Ces pages sont réservées au délégué à la protection des données (rôle privacy_officer)")


def dev_token(config, officer: str) -> str:
    """A dev token for the privacy officer ``officer`` (``fhir-dmp dev-token officer``), with the
    scope the OIDC sign-in asks for (so dev mode shows what that scope allows)."""
    return mint_token(config, PRIVACY_OFFICER, name=officer, scope=OFFICER_SCOPE, extra={"sub": officer},
                      lifetime=DEV_TOKEN_LIFETIME)
