"""The application factory: ``create_app(config)`` is the only way to build the server.

It builds the process's services once (``runtime/services.py``: database, storage, decision
policy, audit log, notification outbox, encrypted blob store, token verifier), registers them
on the app, starts their background threads and mounts the FHIR blueprints at ``/fhir``, the
home page and the signed-in spaces (the portal, the privacy officer's pages). Request flow (DESIGN.md): authenticate -> handler -> guarded
repository -> audit flushed before the response (fail closed) -> JSON/XML or
OperationOutcome (``http/errors.py``; the one mapping is :func:`error_response`, here).
"""
from __future__ import annotations

import logging
import uuid
import weakref

from flask import Flask, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from .. import portal, privacy, spaces
from ..audit.events import AccessRecord, build_event
from ..guard.journal import ACTION, METHOD_INTERACTION
from ..guard.repository import GuardedRepository
from ..resources import bundles, capability, conformance, rest
from ..resources.conformance import is_public as conformance_is_public
from ..resources.http import respond
from ..runtime.config import Config
from ..runtime.logs import REQUEST_ID_ENVIRON
from ..runtime.services import Services, build_app_services
from ..security.crypto import ContentUnavailable
from ..security.decision import resolve_legal_representative
from ..storage import StorageError
from . import home
from .clients import request_info
from .compression import compress_response, decode_request_body
from .errors import FhirError, MethodNotAllowed, NotFound, PayloadTooLarge, unavailable

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/fhir/metadata", "/fhir/.well-known/smart-configuration", "/fhir/.well-known/jwks.json")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
BASE_PATHS = ("/fhir", "/fhir/")     # GET there is a hint for browsers (fhir_dmp/http/home.py), no data
# CORS for browser SMART apps (https://fetch.spec.whatwg.org/#http-cors-protocol): bearer tokens,
# no cookies; the FHIR request headers a client sends and the response headers it must read.
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "Accept", "Prefer", "If-Match", "If-None-Match",
                      "If-None-Exist", "If-Modified-Since", "Content-Encoding", "X-Request-Id",
                      "Category", "X-Break-Glass-Reason", "X-Security-Context", "X-Patient-Access-Code"]
CORS_EXPOSE_HEADERS = ["ETag", "Location", "Content-Location", "Last-Modified", "WWW-Authenticate",
                       "X-Request-Id", "Retry-After", "Allow"]



class _Flask(Flask):
    """Flask, its :meth:`ensure_sync` answered once per function: Flask asks
    ``inspect.iscoroutinefunction`` of every hook, view and handler on every request (issue 22).
    Weakly held: a function that goes (an ``after_this_request`` one) is forgotten."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain = weakref.WeakKeyDictionary()   # function -> is it synchronous

    def ensure_sync(self, func):
        try:
            plain = self._plain.get(func)
            if plain is None:     # a plain function is its own synchronous form
                plain = self._plain[func] = super().ensure_sync(func) is func
        except TypeError:         # not weakly referable
            plain = False
        return func if plain else super().ensure_sync(func)


def create_app(config: Config | None = None, *, client=None, db=None) -> Flask:
    """Build the WSGI app. ``client``/``db`` let tests share one database server."""
    config = config or Config.from_env()
    app = _Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    services = build_app_services(config, client, db)
    services.init_app(app)
    services.start_background()
    verifier = services.verifier

    for fhir in (capability, conformance, bundles, rest):   # under /fhir; metadata first: it needs no token
        app.register_blueprint(fhir.bp)
    app.register_blueprint(home.bp)
    spaces.init_app(app, (portal.PORTAL, portal.bp), (privacy.OFFICER, privacy.bp))
    _cors(app, config)

    @app.before_request
    def bound_database_work():
        # FHIR_DMP_DB_WAIT: the request's database work, its audit flush included, ends by this
        # deadline (StoreCore.deadline); past it a StorageError, answered 503 below
        g.db_deadline = services.storage.deadline()
        g.db_deadline.__enter__()

    @app.teardown_request
    def end_database_bound(_exc):
        deadline = g.pop("db_deadline", None)
        if deadline is not None:
            deadline.__exit__(None, None, None)

    @app.before_request
    def authenticate():
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request.environ[REQUEST_ID_ENVIRON] = g.request_id   # for the server's access line
        g.repo = None
        if _is_public(request.method, request.path):
            return None
        try:
            principal = verifier.authenticate(request.headers.get("Authorization"), request.headers)
            principal = resolve_legal_representative(services.storage, principal)
        except FhirError as exc:
            if exc.status == 401:
                _audit_refused(services, exc)
            raise
        g.repo = GuardedRepository(services, principal, request_info(
            services.config, access_code=request.headers.get("X-Patient-Access-Code")))
        return None

    @app.after_request
    def flush_audit(response):
        repo = getattr(g, "repo", None)
        if repo is None:
            return response
        try:
            if request.method in WRITES and 400 <= response.status_code < 500:
                _journal_refused(repo, response)
            repo.flush_audit()
        except Exception:   # noqa: BLE001 — fail closed: no data leaves without its trace
            log.exception("audit write failed; response withheld (request %s)", g.get("request_id"))
            # answered by the error handler of the request's blueprint (the portal's French page)
            # or the app's (an OperationOutcome)
            return app.make_response(app.handle_user_exception(
                unavailable("the access journal cannot be written; try again")))
        if not response.headers.getlist("X-Request-Id"):   # (setdefault, `in`: a KeyError raised)
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.before_request
    def decode_body():
        decode_request_body(request)

    @app.after_request
    def compress(response):
        return compress_response(request, response)

    @app.errorhandler(FhirError)
    def on_fhir_error(exc: FhirError):
        return error_response(exc)

    @app.errorhandler(ContentUnavailable)
    def on_content_unavailable(_exc):
        # a shredded or missing data key: the content is gone for good (crypto-shredding)
        return error_response(NotFound("the content of this resource is not available"))

    @app.errorhandler(StorageError)
    def on_database_error(exc):
        # the database is unreachable or refused the operation: nothing was half-written
        # (writes are transactions); the client may retry
        log.error("database error (request %s): %s", g.get("request_id"), type(exc).__name__)
        return error_response(unavailable("the database is not available; retry later"))

    @app.errorhandler(404)
    def on_404(_exc):
        return error_response(NotFound(f"no such endpoint: {request.path}"))

    @app.errorhandler(405)
    def on_405(exc):
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        return error_response(MethodNotAllowed(f"{request.method} is not supported on {request.path}",
                                               headers={"Allow": ", ".join(allowed)} if allowed else None))

    @app.errorhandler(413)
    def on_413(_exc):
        return error_response(PayloadTooLarge(f"request body larger than {config.max_body_bytes} bytes"))

    @app.errorhandler(Exception)
    def on_unexpected(exc):
        if isinstance(exc, HTTPException):
            return error_response(FhirError(exc.description or exc.name, status=exc.code or 400))
        log.exception("unexpected error (request %s)", g.get("request_id"))
        repo = getattr(g, "repo", None)
        if repo is not None and not repo.records:
            repo.record(_interaction(), outcome="8", patient_id=None, resource=request.path,
                        http_status=500)
        return error_response(FhirError("internal error; the request was not completed "
                                        f"(request id {g.get('request_id')})", status=500, code="exception"))

    return app


def _is_public(method: str, path: str) -> bool:
    """What needs no token: outside the FHIR API, CORS preflights, the server's self-description."""
    return (not path.startswith("/fhir") or method == "OPTIONS" or path in PUBLIC_PATHS
            or (method in ("GET", "HEAD") and path in BASE_PATHS)
            or conformance_is_public(method, path))


def _cors(app: Flask, config: Config) -> None:
    """CORS on the FHIR API only (CONTRACT.md "REST behaviour"), by flask-cors."""
    CORS(app, resources={r"/fhir/*": {}, r"/fhir": {}}, origins=list(config.cors_origins),
         allow_headers=CORS_ALLOW_HEADERS, expose_headers=CORS_EXPOSE_HEADERS,
         send_wildcard="*" in config.cors_origins, supports_credentials=False, max_age=600,
         vary_header=True)


def error_response(exc: FhirError):
    """The one mapping of errors to an OperationOutcome response."""
    g.error = exc      # for the journal of a refused write (_journal_refused)
    response = respond(exc.outcome(), exc.status, is_error=True)
    for name, value in exc.headers.items():
        response.headers[name] = value
    return response


def _interaction() -> str:
    """The restful-interaction code of the request's method (for events outside the repository)."""
    return METHOD_INTERACTION.get(request.method, "read")


def _journal_refused(repo: GuardedRepository, response) -> None:
    """Every refused write is in the journal (issue 18; CONTRACT.md "The journal"): a 4xx answer
    to a write the repository did not journal itself goes to the journal of the DMP its URL
    (``Type/id``) or body names, else to the system journal (:meth:`Writes.refused`)."""
    root, *parts = request.path.split("/")[1:]    # /fhir/Type/id/...
    if root != "fhir" or "_search" in parts:      # the portal answers its own; a search is no write
        return
    rtype = parts[0] if parts and parts[0] else None
    rid = parts[1] if len(parts) > 1 and parts[1] and parts[1][0] not in "$_" else None
    exc = g.get("error") or FhirError(f"HTTP {response.status_code}", status=response.status_code)
    repo.refused(_interaction(), exc, rtype, rid, g.get("body"))


def _audit_refused(services: Services, exc: FhirError) -> None:
    """Refused tokens go to the system journal (CONTRACT.md "The journal"; no patient, never the
    token). An expected refusal logs one line, no traceback."""
    try:
        interaction = _interaction()
        info = request_info(services.config)
        rec = AccessRecord(interaction=interaction, action=ACTION.get(interaction, "E"), outcome="4",
                           principal=None, patient_id=None,
                           resource=request.path, query=None,
                           decision={"result": "deny", "rule": "authentication", "reason": exc.diagnostics[:200],
                                     "consents": []},
                           http_status=401, client_ip=info.client_ip, request_id=info.request_id,
                           user_agent=info.user_agent)
        services.audit_log.append([build_event(rec, source_observer=services.config.fhir_base)])
    except Exception as err:   # noqa: BLE001 — the 401 goes out anyway; nothing was disclosed
        log.error("could not journal a refused token (request %s): %s", g.get("request_id"),
                  type(err).__name__)
