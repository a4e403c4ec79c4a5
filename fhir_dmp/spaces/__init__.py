"""The signed-in spaces: server-rendered French pages for people, beside the FHIR API.

Two spaces share this package: the patient portal (``/portal/``, ``fhir_dmp.portal``) and the
privacy officer's pages (``/privacy/``, ``fhir_dmp.privacy``). Each is one more client of the
guarded repository: the signed-in person's access token is verified like any API token, the same
Principal is built from it, and every read and action goes through ``GuardedRepository``
(decision point + journal). What they share, here, once:

- :class:`Space`: a space's URL prefix, session cookie, who may enter, what it asks the issuer;
- ``session``: one signed-cookie session per space (its own cookie, its own path);
- ``signin``: dev tokens aside, OpenID Connect code + PKCE (authlib's Flask client), the session
  that holds the token and ends with it;
- ``hooks``: what every page of a space goes through (CSRF, sign-in, security headers, errors)
  and the sign-in routes (login, OIDC callback, logout).

The pages' stylesheet and base template are the portal's (``portal/static/portal.css``,
``portal/templates/portal/base.html``): a space's templates extend it and name their menu.
"""
from __future__ import annotations

from flask import Blueprint, Flask
from flask_wtf.csrf import CSRFProtect

from ..runtime.services import services
from . import session, signin
from .signin import Space

__all__ = ["Space", "init_app"]


def init_app(app: Flask, *mounted: tuple[Space, Blueprint]) -> None:
    """Mount the spaces (each a :class:`Space` and its blueprint, which ``hooks.install`` gave
    its hooks when its module was imported) with their sessions, CSRF protection and OIDC clients (Flask's extension pattern: after the app's services,
    ``runtime.services``, are registered)."""
    config = services(app).config
    app.secret_key = signin.session_secret(config)
    app.session_interface = session.SpaceSessionInterface({space.prefix: space.cookie for space, _ in mounted})
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.public_origin.startswith("https:"),
        # CSRF is checked by each space's own before_request, never on the FHIR API (bearer tokens)
        WTF_CSRF_CHECK_DEFAULT=False,
        # the token of a form lives as long as the session (which ends with the access token)
        WTF_CSRF_TIME_LIMIT=None,
    )
    services(app).csrf = CSRFProtect(app)
    signin.init_oidc(app, config, [space for space, _ in mounted])
    for _, bp in mounted:
        app.register_blueprint(bp)
