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
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect

from ..runtime.services import services
from . import signin, views


class PortalSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, opened only for a request that carries the portal's cookie.

    Flask opens the session of every request before routing; the stock interface builds its
    itsdangerous signer first, even for the FHIR API calls that never have the cookie (its path
    is ``/portal``), a cost on every API request (bench/README.md, "The portal's session interface"). Without the
    cookie the answer is the same as Flask's: a new empty session (None without a secret key).
    """

    def open_session(self, app, request):
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    """Mount the portal at /portal/ with its session, CSRF protection and OIDC client (Flask's
    extension pattern: after the app's services, ``runtime.services``, are registered)."""
    config = services(app).config
    app.secret_key = signin.session_secret(config)
    app.session_interface = PortalSessionInterface()
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
    services(app).csrf = CSRFProtect(app)
    signin.init_oidc(app, config)
    app.register_blueprint(views.bp)
