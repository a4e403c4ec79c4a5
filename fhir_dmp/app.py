"""The application factory: ``create_app(config)`` is the only way to build the server.

It wires the services once (database, storage, decision policy, audit log,
notification outbox, encrypted blob store, token verifier) and mounts the
FHIR blueprint at ``/fhir``. Request flow (DESIGN.md): authenticate ->
handler -> guarded repository -> audit flushed before the response (fail
closed) -> JSON/XML or OperationOutcome (``errors.py`` mapping, here).
"""
from __future__ import annotations

import atexit
import logging
import uuid

from flask import Flask, g, request
from pymongo.errors import PyMongoError

from .logs import REQUEST_ID_ENVIRON
from .compression import compress_response, decode_request_body
from .config import Config
from .errors import FhirError, MethodNotAllowed, NotFound, PayloadTooLarge, ServiceUnavailable
from .resources.conformance import is_public as conformance_is_public
from .repository import Backend, GuardedRepository, RequestInfo
from .security.auth import SharedKeys, TokenVerifier
from .security.crypto import ContentUnavailable
from .security.decision import AccessPolicy, access_facets, resolve_legal_representative
from .security.habilitations import Habilitations
from .storage import KEY_SETS, Storage

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/fhir/metadata", "/fhir/.well-known/smart-configuration", "/fhir/.well-known/jwks.json")
BASE_PATHS = ("/fhir", "/fhir/")     # GET there is a hint for browsers (fhir_dmp/home.py), no data
# CORS for browser SMART apps (https://fetch.spec.whatwg.org/#http-cors-protocol): bearer tokens,
# no cookies; the FHIR request headers a client sends and the response headers it must read.
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "Accept", "Prefer", "If-Match", "If-None-Match",
                      "If-None-Exist", "If-Modified-Since", "Content-Encoding", "X-Request-Id",
                      "Category", "X-Break-Glass-Reason", "X-Security-Context", "X-Patient-Access-Code"]
CORS_EXPOSE_HEADERS = ["ETag", "Location", "Content-Location", "Last-Modified", "WWW-Authenticate",
                       "X-Request-Id", "Retry-After", "Allow"]


def build_backend(config: Config, client=None, db=None) -> Backend:
    """Services shared by all requests of one process."""
    from .blobs import BlobStore
    from .notifications import Outbox
    from .security.audit import AuditLog
    from .security.crypto import DocumentCrypto, key_provider

    if db is None:
        from .database import open_database
        client, db = open_database(config)

    storage = Storage(client, db, annotate=access_facets)
    habilitations = Habilitations.load(config.habilitations_file)
    policy = AccessPolicy(storage, habilitations, config)
    crypto = DocumentCrypto(storage, key_provider(config))
    audit_log = AuditLog(storage)
    # Every index exists before the first request: SecantusDB leaves out of an index the documents
    # that a transaction already open when the index was built goes on to insert.
    storage.ensure_indexes()
    audit_log.ensure_indexes()
    storage.ensure_outbox_indexes()
    return Backend(config, storage, policy, audit_log, outbox=Outbox(storage, config),
                   blobs=BlobStore(storage, crypto), crypto=crypto)


def create_app(config: Config | None = None, *, client=None, db=None) -> Flask:
    """Build the WSGI app. ``client``/``db`` let tests share one database server."""
    config = config or Config.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    backend = build_backend(config, client, db)
    app.extensions["fhir_dmp"] = backend
    verifier = TokenVerifier(config)
    app.extensions["fhir_dmp.verifier"] = verifier
    if config.notifications_worker:
        _start_worker(app, backend)
    _start_journal_and_cache(app, backend)

    from .resources import register
    register(app)
    from . import home, portal
    app.register_blueprint(home.bp)
    portal.register(app, config)
    _cors(app, config)

    @app.before_request
    def authenticate():
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request.environ[REQUEST_ID_ENVIRON] = g.request_id   # for the server's access line
        g.repo = None
        if _is_public(request.method, request.path):
            return None
        try:
            principal = verifier.authenticate(request.headers.get("Authorization"), request.headers)
            principal = resolve_legal_representative(backend.storage, principal)
        except FhirError as exc:
            if exc.status == 401:
                _audit_refused(backend, exc)
            raise
        g.repo = GuardedRepository(backend, principal, RequestInfo(
            client_ip=request.remote_addr, request_id=g.request_id,
            access_code=request.headers.get("X-Patient-Access-Code")))
        return None

    @app.after_request
    def flush_audit(response):
        repo = getattr(g, "repo", None)
        if repo is None:
            return response
        try:
            repo.flush_audit()
        except Exception:   # noqa: BLE001 — fail closed: no data leaves without its trace
            log.exception("audit write failed; response withheld (request %s)", g.get("request_id"))
            return error_response(ServiceUnavailable("the access journal cannot be written; try again"))
        response.headers.setdefault("X-Request-Id", g.request_id)
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

    @app.errorhandler(PyMongoError)
    def on_database_error(exc):
        # the database is unreachable or refused the operation: nothing was half-written
        # (writes are transactions); the client may retry
        log.error("database error (request %s): %s", g.get("request_id"), type(exc).__name__)
        return error_response(ServiceUnavailable("the database is not available; retry later",
                                                 headers={"Retry-After": "2"}))

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
        from werkzeug.exceptions import HTTPException
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
    from flask_cors import CORS
    CORS(app, resources={r"/fhir/*": {}, r"/fhir": {}}, origins=list(config.cors_origins),
         allow_headers=CORS_ALLOW_HEADERS, expose_headers=CORS_EXPOSE_HEADERS,
         send_wildcard="*" in config.cors_origins, supports_credentials=False, max_age=600,
         vary_header=True)


def error_response(exc: FhirError):
    """The one mapping of errors to an OperationOutcome response."""
    from .resources.http import respond
    response = respond(exc.outcome(), exc.status, is_error=True)
    for name, value in exc.headers.items():
        response.headers[name] = value
    return response


def _interaction() -> str:
    """The restful-interaction code of the request's method (for events outside the repository)."""
    return {"GET": "read", "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete"}.get(request.method, "read")


def _audit_refused(backend: Backend, exc: FhirError) -> None:
    """Refused tokens go to the system journal (CONTRACT.md "The journal"; no patient, never the
    token). An expected refusal logs one line, no traceback."""
    from .repository import ACTION
    from .security.audit import AccessRecord, build_event
    try:
        interaction = _interaction()
        rec = AccessRecord(interaction=interaction, action=ACTION.get(interaction, "E"), outcome="4",
                           principal=None, patient_id=None,
                           resource=request.path, query=None,
                           decision={"result": "deny", "rule": "authentication", "reason": exc.diagnostics[:200],
                                     "consents": []},
                           http_status=401, client_ip=request.remote_addr, request_id=g.get("request_id"))
        backend.audit_log.append([build_event(rec, source_observer=backend.config.fhir_base)])
    except Exception as err:   # noqa: BLE001 — the 401 goes out anyway; nothing was disclosed
        log.error("could not journal a refused token (request %s): %s", g.get("request_id"),
                  type(err).__name__)


def _start_journal_and_cache(app: Flask, backend: Backend) -> None:
    """The decision context cache (its change stream), the DMP document cache it also
    invalidates (``doc_cache.py``), the issuer's key set shared through the same stream
    (``auth.SharedKeys``) and the journal sealer (issue 13): background threads of this
    process, started after the server's fork."""
    config = backend.config
    if config.context_cache:
        from .security.context_cache import ContextCache
        followers, listeners = {}, {}
        if config.document_cache_docs > 0:     # a DMP's documents, invalidated by the same stream
            from .doc_cache import CACHED_TYPE, DocumentCache
            followers[CACHED_TYPE] = backend.storage.doc_cache = DocumentCache(
                backend.storage, max_docs=config.document_cache_docs)
        keys = app.extensions["fhir_dmp.verifier"].keys
        if isinstance(keys, SharedKeys):       # a key the issuer withdrew: refused everywhere at once
            storage, issuer = backend.storage, config.expected_issuer
            keys.publish = lambda record: storage.record_key_set(issuer, record)
            listeners[KEY_SETS] = lambda: keys.adopt(storage.key_set(issuer))
        cache = ContextCache(backend.storage, followers=followers, listeners=listeners)
        cache.start()
        backend.policy.context_cache = cache
        app.extensions["fhir_dmp.context_cache"] = cache
        atexit.register(cache.stop)
    if config.audit_sealer:
        from .security.sealer import Sealer
        sealer = Sealer(backend.storage, config.audit_key_path)
        sealer.start()
        app.extensions["fhir_dmp.sealer"] = sealer
        atexit.register(sealer.stop)


def stop_background(app: Flask) -> None:
    """Stop this app's background threads (tests build many apps in one process), for good.

    Call it before the app's database is dropped: SecantusDB's ``dropDatabase``, run while the
    app's sealer still works on that database, can spin for ever in WiredTiger holding its
    storage lock, so that every other client waits too (how CI once hung for 90 minutes)."""
    for name in ("fhir_dmp.context_cache", "fhir_dmp.sealer", "fhir_dmp.worker"):
        service = app.extensions.get(name)
        if service is not None:
            service.stop()
            atexit.unregister(service.stop)
    app.extensions["fhir_dmp"].audit_log.close()


def _start_worker(app: Flask, backend: Backend) -> None:
    from .notifications import Worker
    from .resources.communications import notification_result

    worker = Worker(backend.storage, backend.config,
                    on_result=lambda message, status, reason: notification_result(backend, message, status,
                                                                                   reason))
    worker.start()
    app.extensions["fhir_dmp.worker"] = worker
    atexit.register(worker.stop)
