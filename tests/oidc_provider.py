"""A test OpenID Connect provider in Python, shaped like Pro Santé Connect: the portal's tests sign in
through it, so no node kit is needed beside the repository. TEST USE ONLY.

Modelled on the workspace's node kit (``shared/tools/oidc/op.mjs``, oidc-provider); the protocol
is authlib's (its OAuth 2.0 authorization server, RFC 7636 PKCE, OpenID Connect code flow, RFC 9068
JWT access tokens), keys and JWTs are joserfc's. It is served by a real HTTP server (werkzeug) in a
thread, on a free loopback port:

- ``/.well-known/openid-configuration`` (checked by authlib's ``OpenIDProviderMetadata``), ``/jwks``;
- ``/authorize``: authorization code with PKCE S256 only, a nonce required; it sends the browser to
  ``/interaction/<uid>``: a login form (``form#login``: login, password) then a consent page
  (``form#consent``: Allow), or ``/interaction/<uid>/abort`` (access_denied). The sign-in opens a
  provider session (cookie ``op_session``): while it lasts, ``/authorize`` answers at once, as
  single sign-on does (``prompt=login`` asks again);
- ``/token``: ``authorization_code`` and ``client_credentials``; the access token is an RS256
  ``at+jwt`` whose ``aud`` is the FHIR base (the ``resource`` indicator, RFC 8707: another one is
  ``invalid_target``), carrying the client's ``claims`` then, for a signed-in account, the
  account's ``claims`` (SubjectNameID, SubjectRole, acr, purpose_of_use, fhirUser...; a ``sub``
  among them wins, as Pro Santé Connect's sub is the idNatPs);
- clients and accounts come from a dict of the kit's ``clients.json`` form
  (``tests/fixtures/oidc/clients.json`` is the kit's, the tests add theirs).
"""
from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import urlencode

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, OAuth2Request, grants
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from authlib.oidc.discovery import OpenIDProviderMetadata
from flask import Flask, abort, jsonify, request
from joserfc.jwk import KeySet, RSAKey

from tests.portal_kit import LiveServer, free_port

CLIENTS_FILE = Path(__file__).resolve().parent / "fixtures" / "oidc" / "clients.json"
TOKEN_LIFETIME = 3600
CODE_LIFETIME = 60
SESSION_COOKIE = "op_session"
# SMART App Launch scopes v2 and v1 (the kit's pattern), and the OpenID Connect ones the tests ask
SMART_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]*)\.(\*|read|write|c?r?u?d?s?)(\?\S+)?$")
OIDC_SCOPES = {"openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access"}


def load_clients(path: Path = CLIENTS_FILE) -> dict:
    """The kit's clients/accounts document (a fresh copy the caller may extend)."""
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Client(ClientMixin):
    """A client entry of ``clients.json``: OAuth metadata plus the ``claims`` its tokens carry."""
    entry: dict

    def get_client_id(self):
        return self.entry["client_id"]

    def get_default_redirect_uri(self):
        return (self.entry.get("redirect_uris") or [None])[0]

    def get_allowed_scope(self, scope):
        return " ".join(s for s in (scope or "").split() if s in OIDC_SCOPES or SMART_SCOPE.match(s))

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri in self.entry.get("redirect_uris", [])

    def check_client_secret(self, client_secret):
        secret = self.entry.get("client_secret")
        return bool(secret) and hmac.compare_digest(secret, client_secret or "")

    def check_endpoint_auth_method(self, method, endpoint):
        return method == self.entry.get("token_endpoint_auth_method", "client_secret_basic")

    def check_response_type(self, response_type):
        return response_type in self.entry.get("response_types", [])

    def check_grant_type(self, grant_type):
        return grant_type in self.entry.get("grant_types", [])


@dataclass
class Account:
    """An account of ``clients.json``: the password, the profile (ID token) and the claims its
    access tokens carry."""
    id: str
    password: str
    profile: dict = field(default_factory=dict)
    claims: dict = field(default_factory=dict)

    def get_user_id(self):
        return self.id


@dataclass
class AuthorizationCode:
    """What authlib's grants ask of a stored code (AuthorizationCodeMixin and the OIDC getters)."""
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: Account
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return self.nonce

    def get_auth_time(self):
        return self.auth_time

    def get_acr(self):
        return self.user.claims.get("acr")

    def get_amr(self):
        return ["pwd"]

    def is_expired(self):
        return time.time() > self.auth_time + CODE_LIFETIME


def _page(title: str, body: str, status: int = 200):
    html = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title></head>\n'
            f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n")
    return html, status, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}


class OidcProvider:
    """The provider on a free loopback port, until :meth:`stop`.

    ``clients``: the kit's ``clients.json`` document; ``audience``: the FHIR base URL, the only
    resource it issues tokens for."""

    def __init__(self, *, clients: dict, audience: str):
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.audience = audience
        self.clients = {c["client_id"]: Client(c) for c in clients["clients"]}
        self.accounts = {login: Account(login, a["password"], a.get("profile", {}), a.get("claims", {}))
                         for login, a in clients["accounts"].items()}
        key = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"}, auto_kid=True)
        self.keys = KeySet([key])
        self.codes: dict[str, AuthorizationCode] = {}
        self.interactions: dict[str, dict] = {}       # uid -> the authorization request, + "account"
        self.sessions: dict[str, str] = {}            # op_session cookie -> account id
        self.app = self._app()
        self.server = LiveServer(self.app, self.port)

    def stop(self) -> None:
        self.server.stop()

    def client_token(self, client_id: str, scope: str, resource: str) -> str:
        """An access token by client credentials, the client authenticating with its secret
        (``<client_id>-secret`` in the kit's file) by HTTP Basic."""
        import requests
        r = requests.post(self.issuer + "/token", auth=(client_id, f"{client_id}-secret"), timeout=10,
                          data={"grant_type": "client_credentials", "scope": scope, "resource": resource})
        r.raise_for_status()
        return r.json()["access_token"]

    # ----------------------------------------------------------------- authlib's server

    def _authorization_server(self, app) -> AuthorizationServer:
        op = self

        class CodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

            def save_authorization_code(self, code, req):
                data = req.payload.data
                op.codes[code] = AuthorizationCode(
                    code=code, client_id=req.client.get_client_id(), redirect_uri=req.payload.redirect_uri,
                    scope=req.payload.scope, user=req.user, nonce=data.get("nonce"),
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"))

            def query_authorization_code(self, code, client):
                found = op.codes.get(code)
                if found and found.client_id == client.get_client_id() and not found.is_expired():
                    return found
                return None

            def delete_authorization_code(self, authorization_code):
                op.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return authorization_code.user

        class CredentialsGrant(grants.ClientCredentialsGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

        class IdToken(OpenIDCode):
            def resolve_client_private_key(self, client):
                return op.keys

            def get_client_claims(self, client):
                return {"iss": op.issuer, "aud": [client.get_client_id()],
                        "exp": int(time.time()) + TOKEN_LIFETIME}

            def exists_nonce(self, nonce, req):
                return any(c.nonce == nonce for c in op.codes.values())

            def generate_user_info(self, user, scope):
                return UserInfo(sub=user.id, **user.profile, fhirUser=user.claims.get("fhirUser"))

        class AccessTokens(JWTBearerTokenGenerator):
            def get_jwks(self):
                return op.keys      # a set: joserfc names the key's kid in the header

            def get_audiences(self, client, user, scope):
                return op.audience

            def get_extra_claims(self, client, grant_type, user, scope):
                return {**client.entry.get("claims", {}), **(user.claims if user else {})}

        server = AuthorizationServer(app, query_client=self.clients.get, save_token=lambda *_: None)
        server.register_grant(CodeGrant, [CodeChallenge(required=True), IdToken(require_nonce=True)])
        server.register_grant(CredentialsGrant)
        server.register_token_generator(
            "default", AccessTokens(self.issuer, expires_generator=lambda *_: TOKEN_LIFETIME))
        return server

    def metadata(self) -> dict:
        doc = OpenIDProviderMetadata(
            issuer=self.issuer, authorization_endpoint=self.issuer + "/authorize",
            token_endpoint=self.issuer + "/token", jwks_uri=self.issuer + "/jwks",
            response_types_supported=["code"], subject_types_supported=["public"],
            id_token_signing_alg_values_supported=["RS256"], code_challenge_methods_supported=["S256"],
            grant_types_supported=["authorization_code", "client_credentials"],
            token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post", "none"],
            scopes_supported=sorted(OIDC_SCOPES), acr_values_supported=["eidas1"])
        doc.validate()
        return dict(doc)

    # ----------------------------------------------------------------- HTTP

    def _app(self) -> Flask:
        app = Flask("oidc_provider")
        server = self._authorization_server(app)
        op = self

        def resource_refused():
            wanted = request.values.get("resource")
            return wanted is not None and wanted != op.audience

        @app.get("/.well-known/openid-configuration")
        def discovery():
            return jsonify(op.metadata())

        @app.get("/jwks")
        def jwks():
            return jsonify(op.keys.as_dict(private=False))

        @app.post("/token")
        def token():
            if resource_refused():
                return jsonify(error="invalid_target", error_description="unknown resource"), 400
            return server.create_token_response()

        @app.get("/authorize")
        def authorize():
            from authlib.oauth2 import OAuth2Error
            if resource_refused():
                return _page("Error", '<pre id="error">invalid_target: unknown resource</pre>', 400)
            try:
                server.get_consent_grant(end_user=None)      # client, redirect, PKCE, nonce checked
            except OAuth2Error as exc:
                return _page("Error", f'<pre id="error">{escape(exc.error)}: '
                                      f'{escape(exc.description or "")}</pre>', 400)
            uid = secrets.token_urlsafe(16)
            op.interactions[uid] = request.args.to_dict()
            signed_in = op.accounts.get(op.sessions.get(request.cookies.get(SESSION_COOKIE, ""), ""))
            if signed_in is not None and "login" not in request.args.get("prompt", "").split():
                return finish(uid, signed_in)
            return "", 303, {"Location": f"/interaction/{uid}"}

        def interaction(uid):
            found = op.interactions.get(uid)
            if found is None:
                abort(404)
            return found

        def finish(uid, account):
            params = op.interactions.pop(uid)
            req = OAuth2Request("GET", f"{op.issuer}/authorize?{urlencode(params)}")
            req.payload = BasicOAuth2Payload(params)
            return server.create_authorization_response(req, grant_user=account)   # None: denied

        def login_form(uid, error=""):
            params = interaction(uid)
            return _page("Sign-in", (f'<p id="error">{escape(error)}</p>' if error else "") + f"""
<p>Client: <code>{escape(params.get("client_id", ""))}</code></p>
<form id="login" method="post" action="/interaction/{uid}/login" autocomplete="off">
  <input type="text" name="login" placeholder="account (idNatPs)" required>
  <input type="password" name="password" placeholder="password" required>
  <button type="submit">Sign-in</button>
</form>
<p><a href="/interaction/{uid}/abort">Cancel</a></p>""", 401 if error else 200)

        @app.get("/interaction/<uid>")
        def interaction_page(uid):
            return login_form(uid)

        @app.post("/interaction/<uid>/login")
        def interaction_login(uid):
            params = interaction(uid)
            account = op.accounts.get(request.form.get("login", ""))
            if account is None or not hmac.compare_digest(account.password, request.form.get("password", "")):
                return login_form(uid, "Invalid login or password")
            params["account"] = account.id
            scopes = "".join(f"<li>scope <code>{escape(s)}</code></li>" for s in params.get("scope", "").split())
            return _page("Authorize", f"""<p>Client <code>{escape(params.get("client_id", ""))}</code> asks for:</p>
<ul>{scopes}</ul>
<form id="consent" method="post" action="/interaction/{uid}/confirm">
  <button type="submit">Allow</button>
</form>
<p><a href="/interaction/{uid}/abort">Deny</a></p>""")

        @app.post("/interaction/<uid>/confirm")
        def interaction_confirm(uid):
            account = op.accounts.get(interaction(uid).pop("account", ""))
            if account is None:
                return _page("Error", "not signed in", 400)
            session = secrets.token_urlsafe(16)
            op.sessions[session] = account.id
            response = finish(uid, account)
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="Lax")
            return response

        @app.get("/interaction/<uid>/abort")
        def interaction_abort(uid):
            interaction(uid)
            return finish(uid, None)

        return app
