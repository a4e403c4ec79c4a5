"""Who is signed in to a space, and how they got there.

- With ``FHIR_DMP_ISSUER``: OpenID Connect authorization code + PKCE (S256) at the issuer, as
  client ``FHIR_DMP_PORTAL_CLIENT_ID`` (with its secret if given; one client for every space,
  registered with each space's redirect ``<origin><prefix>/callback``), with the space's scope
  (authlib's Flask client, which keeps state, nonce and code verifier in the session and checks
  the ID token). The ACCESS token it gets is the caller's token: verified by the same
  ``TokenVerifier`` as API tokens, it gives the same Principal.
- Dev mode (no issuer): each space's form mints a dev token with the dev key, exactly like
  ``fhir-dmp dev-token`` (the space's own module says for whom).

The session cookie (HttpOnly, SameSite=Lax, Secure on https, ``session.SpaceSessionInterface``)
holds the token; each request verifies it again, so the session ends when the token expires.
Only those the space admits may use it.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flask import g, session

from ..guard.repository import GuardedRepository
from ..http.clients import request_info
from ..http.errors import FhirError
from ..runtime.secret_files import write_secret
from ..runtime.services import services
from ..security.decision import resolve_legal_representative
from ..security.principal import Principal

TOKEN_KEY = "token"
SECRET_FILE = "portal-session.key"
DEV_TOKEN_LIFETIME = 3600


@dataclass(frozen=True)
class Space:
    """One signed-in space.

    ``name`` is its blueprint's name (and its templates' folder, its OIDC client's name);
    ``prefix`` its URL prefix (and its session cookie's path); ``scope`` what its sign-in asks
    the issuer; ``admits`` says who may use it; ``refusal`` tells, in French, who it is for;
    ``refused_page``: a signed-in holder of a token it does not admit gets a 403 page (else
    the session ends and the login page comes back); ``check`` runs at sign-in through the
    person's guarded repository (the portal reads the person's record).
    """

    name: str
    prefix: str
    cookie: str
    scope: str
    admits: Callable[[Principal], bool]
    refusal: str
    refused_page: bool = False
    check: Callable[[GuardedRepository, Principal], object] | None = None


class SignInRefused(Exception):
    """The token is valid but its holder may not use this space (a PS in the portal...)."""


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

def init_oidc(app, config, spaces: list[Space]) -> None:
    """Register each space's OIDC client when an issuer and a client id are configured."""
    if config.dev_mode or not config.portal_client_id:
        return
    from authlib.integrations.flask_client import OAuth  # lazy: only with an issuer (not in dev mode)
    oauth = OAuth(app)
    for space in spaces:
        client_kwargs = {"scope": space.scope, "code_challenge_method": "S256"}
        if not config.portal_client_secret:
            client_kwargs["token_endpoint_auth_method"] = "none"   # public client: PKCE only
        services(app).oidc[space.name] = oauth.register(
            space.name, client_id=config.portal_client_id, client_secret=config.portal_client_secret,
            server_metadata_url=config.issuer.rstrip("/") + "/.well-known/openid-configuration",
            client_kwargs=client_kwargs)


def oidc_client(space: Space):
    return services().oidc.get(space.name)


def start_oidc(config, space: Space):
    """Redirect to the issuer's authorization endpoint (state, nonce and PKCE verifier in session)."""
    return oidc_client(space).authorize_redirect(config.public_origin + space.prefix + "/callback",
                                                 resource=config.expected_audience)


def finish_oidc(space: Space) -> str:
    """Redeem the code of the callback; return the access token (authlib raises OAuthError)."""
    token = oidc_client(space).authorize_access_token()
    return token["access_token"]


# ----------------------------------------------------------------------------- session

def principal_of(token: str, space: Space) -> Principal:
    """Verify ``token`` like an API token (same verifier, same Principal); FhirError when refused,
    SignInRefused when the space does not admit its holder."""
    principal = services().verifier.authenticate(f"Bearer {token}")
    principal = resolve_legal_representative(services().storage, principal)
    if not space.admits(principal):
        raise SignInRefused(space.refusal)
    return principal


def repository(principal: Principal) -> GuardedRepository:
    """The guarded repository of the signed-in person, for this request (journaled like the API)."""
    return GuardedRepository(services(), principal, request_info(services().config))


def sign_in(token: str, space: Space) -> Principal:
    """Start a fresh session for the holder of ``token`` (a new session: no fixation), once the
    space's ``check`` passed (the portal's: a record that does not exist, or that they may not
    see, raises its 404 FhirError); when it raises, no session is created."""
    principal = principal_of(token, space)
    if space.check is not None:
        space.check(repository(principal), principal)
    session.clear()
    session[TOKEN_KEY] = token
    return principal


def sign_out() -> None:
    session.clear()


def load_signed_in(space: Space) -> Principal | None:
    """The Principal of the session's token, with ``g.principal`` and ``g.repo`` bound to it; None
    when there is no session or its token is no longer accepted (expired: the session ends with
    it). A token the space does not admit ends the session and raises SignInRefused."""
    token = session.get(TOKEN_KEY)
    if not token:
        return None
    try:
        principal = principal_of(token, space)
    except SignInRefused:
        session.clear()
        raise
    except FhirError as exc:
        if exc.status != 401:
            raise                       # keys unavailable...: not the user's fault, keep the session
        session.clear()
        return None
    g.principal = principal
    g.repo = repository(principal)
    return principal
