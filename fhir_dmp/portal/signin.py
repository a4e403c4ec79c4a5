"""Who is signed in to the portal, and how they got there.

- With ``FHIR_DMP_ISSUER``: OpenID Connect authorization code + PKCE (S256)
  at the issuer, as client ``FHIR_DMP_PORTAL_CLIENT_ID`` (with its secret if
  given), redirect ``<origin>/portal/callback``, scope
  ``openid fhirUser patient/*.cruds`` (authlib's Flask client, which keeps
  state, nonce and code verifier in the session and checks the ID token).
  The ACCESS token it gets is the caller's token: verified by the same
  ``TokenVerifier`` as API tokens, it gives the same Principal.
- Dev mode (no issuer): a form takes a Patient id (or a RelatedPerson id for a
  legal representative) and mints a dev token with the dev key, exactly like
  ``fhir-dmp dev-token patient`` (``legal_representative``).

The session cookie (HttpOnly, SameSite=Lax, Secure on https) holds the
token; each request verifies it again, so the session ends when the token
expires. Only patients and legal representatives may use the portal.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from flask import g, session

from ..http.errors import FhirError
from ..runtime.secret_files import write_secret
from ..runtime.services import services
from ..http.clients import request_info
from ..guard.repository import GuardedRepository
from ..security.decision import resolve_legal_representative
from ..security.devkeys import mint_token
from ..security.principal import LEGAL_REPRESENTATIVE, PATIENT, Principal

PORTAL_SCOPE = "openid fhirUser patient/*.cruds"
TOKEN_KEY = "token"
SECRET_FILE = "portal-session.key"
DEV_TOKEN_LIFETIME = 3600


class SignInRefused(Exception):
    """The token is valid but its holder may not use the portal (a PS, an administrator...)."""


def session_secret(config) -> bytes:
    """The key that signs session cookies: a random key kept in the data dir (mode 0600), so every
    worker process and every restart shares it."""
    path = Path(config.data_dir) / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    if not write_secret(path, key):  # another worker wrote it first: use theirs
        return path.read_bytes()
    return key


# ----------------------------------------------------------------------------- OIDC client

def init_oidc(app, config) -> None:
    """Register the portal's OIDC client when an issuer and a client id are configured."""
    if config.dev_mode or not config.portal_client_id:
        return
    from authlib.integrations.flask_client import OAuth
    oauth = OAuth(app)
    client_kwargs = {"scope": PORTAL_SCOPE, "code_challenge_method": "S256"}
    if not config.portal_client_secret:
        client_kwargs["token_endpoint_auth_method"] = "none"   # public client: PKCE only
    oauth.register("dmp", client_id=config.portal_client_id, client_secret=config.portal_client_secret,
                   server_metadata_url=config.issuer.rstrip("/") + "/.well-known/openid-configuration",
                   client_kwargs=client_kwargs)
    services(app).oidc = oauth.dmp


def oidc_client():
    return services().oidc


def redirect_uri(config) -> str:
    return config.public_origin + "/portal/callback"


def start_oidc(config):
    """Redirect to the issuer's authorization endpoint (state, nonce and PKCE verifier in session)."""
    return oidc_client().authorize_redirect(redirect_uri(config), resource=config.expected_audience)


def finish_oidc() -> str:
    """Redeem the code of the callback; return the access token (authlib raises OAuthError)."""
    token = oidc_client().authorize_access_token()
    return token["access_token"]


def dev_token(config, *, patient: str | None = None, related_person: str | None = None) -> str:
    """A dev token for a patient (``fhir-dmp dev-token patient``) or a legal representative
    (``fhir-dmp dev-token legal_representative --related-person``)."""
    if related_person:
        return mint_token(config, LEGAL_REPRESENTATIVE, related_person=related_person,
                          lifetime=DEV_TOKEN_LIFETIME)
    return mint_token(config, PATIENT, patient=patient, lifetime=DEV_TOKEN_LIFETIME)


# ----------------------------------------------------------------------------- session

def principal_of(token: str) -> Principal:
    """Verify ``token`` like an API token (same verifier, same Principal); FhirError when refused."""
    principal = services().verifier.authenticate(f"Bearer {token}")
    principal = resolve_legal_representative(services().storage, principal)
    if principal.kind not in (PATIENT, LEGAL_REPRESENTATIVE) or not principal.patient_id:
        raise SignInRefused("this space is for patients and their legal representatives")
    return principal


def _repository(principal: Principal) -> GuardedRepository:
    return GuardedRepository(services(), principal, request_info(services().config))


def sign_in(token: str) -> Principal:
    """Start a fresh session for the holder of ``token`` (a new session: no fixation), once their
    record is read through the access decision: a record that does not exist (or that they may
    not see) raises its 404 FhirError, and no session is created."""
    principal = principal_of(token)
    _repository(principal).read("Patient", principal.patient_id)
    session.clear()
    session[TOKEN_KEY] = token
    return principal


def sign_out() -> None:
    session.clear()


def load_signed_in() -> Principal | None:
    """The Principal of the session's token, with ``g.repo`` bound to it; None when there is no
    session or its token is no longer accepted (expired: the session ends with it)."""
    token = session.get(TOKEN_KEY)
    if not token:
        return None
    try:
        principal = principal_of(token)
    except SignInRefused:
        session.clear()
        return None
    except FhirError as exc:
        if exc.status != 401:
            raise                       # keys unavailable...: not the user's fault, keep the session
        session.clear()
        return None
    g.principal = principal
    g.repo = _repository(principal)
    return principal
