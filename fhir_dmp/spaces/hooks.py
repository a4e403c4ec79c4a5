"""What every page of a space goes through, and the sign-in routes every space has.

:func:`install` adds to a space's blueprint: CSRF first on every POST (a forged POST changes
nothing: 403), then the signed-in person or the login page (a person the space does not admit:
the login page again, or a 403 page for spaces that say so); security headers (a strict CSP, no
script; pages hold health data, never cached); errors as French pages (a denied id is a 404 like
a missing one, as in the FHIR API); and the routes ``login`` (GET: the dev form or the OIDC
redirect), ``callback``, ``logout`` and ``logged_out``. The space's blueprint adds its
``dev_login`` (POST ``login``) and its ``home``; its templates folder holds ``login.html``
and ``base.html`` (which the shared ``portal/error.html`` and ``portal/logged_out.html`` extend).
"""
from __future__ import annotations

import logging

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from ..http.errors import FhirError, ServiceUnavailable, unavailable
from ..runtime.services import services
from ..security.crypto import ContentUnavailable
from ..storage.errors import StorageError
from . import signin
from .signin import Space

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
PUBLIC = ("login", "dev_login", "callback", "logout", "logged_out", "static")
ERROR_TEMPLATE = "portal/error.html"
LOGGED_OUT_TEMPLATE = "portal/logged_out.html"
log = logging.getLogger(__name__)


def error_page(status: int, title: str, message: str):
    return render_template(ERROR_TEMPLATE, status=status, title=title, message=message), status


def not_found_page():
    return error_page(404, "Introuvable", "Cette page ou cet élément n'existe pas.")


def install(bp: Blueprint, space: Space) -> None:
    """Give ``bp`` the hooks, error pages and sign-in routes of ``space``."""
    public = {f"{space.name}.{endpoint}" for endpoint in PUBLIC}

    @bp.before_request
    def guard():
        if request.method == "POST":
            services().csrf.protect()
        if request.endpoint in public:
            return None
        try:
            principal = signin.load_signed_in(space)
        except signin.SignInRefused:
            if space.refused_page:
                return error_page(403, "Accès refusé", space.refusal + ".")
            principal = None
        if principal is None:
            return redirect(url_for(f"{space.name}.login"))
        return None

    @bp.after_request
    def security_headers(response):
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.endpoint != f"{space.name}.static":        # pages hold health data: never cached
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @bp.context_processor
    def space_context():
        return {"dev_mode": services().config.dev_mode, "signed_in": g.get("principal"),
                "space_base": f"{space.name}/base.html", "space_home": f"{space.name}.home"}

    @bp.errorhandler(CSRFError)
    def on_csrf(_exc):
        return error_page(403, "Requête refusée", "Le formulaire a expiré ou ne vient pas de ce site. "
                                                  "Rechargez la page et recommencez.")

    @bp.errorhandler(FhirError)
    def on_fhir_error(exc: FhirError):
        if exc.status == 404:
            return not_found_page()
        return error_page(exc.status, "Action impossible", exc.diagnostics)

    @bp.errorhandler(ServiceUnavailable)
    @bp.errorhandler(StorageError)
    def on_unavailable(exc):
        """The database away past FHIR_DMP_DB_WAIT, or the journal unwritable (CONTRACT.md "Faults,
        failover and backups"): a French page, 503 with ``Retry-After``, never a 500."""
        if isinstance(exc, StorageError):
            log.error("database error (%s request %s): %s", space.name, g.get("request_id"),
                      type(exc).__name__)
            exc = unavailable("the database is not available")
        page, status = error_page(503, "Service momentanément indisponible",
                                  "Le service est momentanément indisponible. Rien n'a été perdu : "
                                  "réessayez dans quelques instants.")
        return page, status, {**exc.headers, "Cache-Control": "no-store"}

    @bp.errorhandler(ContentUnavailable)
    def on_content_unavailable(_exc):
        return not_found_page()

    @bp.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException):
        if exc.code == 404:
            return not_found_page()
        return error_page(exc.code, exc.name, exc.description)

    @bp.get("/login", endpoint="login")
    def login():
        cfg = services().config
        if cfg.dev_mode:
            return render_template(f"{space.name}/login.html")
        if signin.oidc_client(space) is None:
            return error_page(503, "Connexion indisponible", "La connexion à cet espace n'est pas "
                                                             "configurée (FHIR_DMP_PORTAL_CLIENT_ID).")
        return signin.start_oidc(cfg, space)

    @bp.get("/callback", endpoint="callback")
    def callback():
        from authlib.integrations.base_client import OAuthError
        if signin.oidc_client(space) is None:
            abort(404)
        try:
            signin.sign_in(signin.finish_oidc(space), space)
        except (OAuthError, signin.SignInRefused, FhirError) as exc:
            signin.sign_out()
            if isinstance(exc, OAuthError):
                return error_page(401, "Connexion refusée", "La connexion a échoué ; recommencez.")
            return error_page(403 if space.refused_page else 401, "Connexion refusée",
                              f"{space.refusal} : l'identité transmise par le fournisseur d'identité "
                              "n'est pas acceptée.")
        return redirect(url_for(f"{space.name}.home"))

    @bp.route("/logout", methods=["GET", "POST"], endpoint="logout")
    def logout():
        """End the session (the identity provider's own session is the provider's business: the
        next sign-in may not ask for the password again)."""
        signin.sign_out()
        return redirect(url_for(f"{space.name}.logged_out"))

    @bp.get("/logged-out", endpoint="logged_out")
    def logged_out():
        return render_template(LOGGED_OUT_TEMPLATE)

