"""The patient portal: the patient's own space at ``/portal/`` (CONTRACT.md "The patient portal").

Server-rendered French pages (Jinja), usable without JavaScript, for the
patient and legal representatives. The portal is one more client of the
guarded repository: the signed-in person's access token is verified like any
API token, the same Principal is built from it, and every read and action
goes through ``GuardedRepository`` (decision point + journal). It has no
other way to data.

- ``signin``: dev sign-in form, OpenID Connect code + PKCE (authlib's Flask
  client), session cookie, expiry with the token;
- ``views``: the pages and the form actions (CSRF-protected by Flask-WTF);
- ``present``: FHIR resources -> rows the templates show.
"""
from __future__ import annotations

from flask import Flask


def register(app: Flask, config) -> None:
    """Mount the portal at /portal/ with its session, CSRF protection and OIDC client."""
    from flask_wtf.csrf import CSRFProtect

    from . import signin, views

    app.secret_key = signin.session_secret(config)
    app.config.update(
        SESSION_COOKIE_NAME="fhir_dmp_portal",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.public_origin.startswith("https:"),
        SESSION_COOKIE_PATH="/portal",
        # CSRF is checked by the portal's own before_request, never on the FHIR API (bearer tokens)
        WTF_CSRF_CHECK_DEFAULT=False,
        # the token of a form lives as long as the session (which ends with the access token)
        WTF_CSRF_TIME_LIMIT=None,
    )
    csrf = CSRFProtect(app)
    app.extensions["fhir_dmp.portal.csrf"] = csrf
    signin.init_oidc(app, config)
    app.register_blueprint(views.bp)
