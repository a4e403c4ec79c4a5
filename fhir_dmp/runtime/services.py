"""The services of one process, typed, built once, and their background threads started and
stopped in one place.

:class:`Services` is what every guarded repository of the process shares (storage, decision
policy, journal, outbox, encrypted blobs, data keys): built by :func:`build_services` for a
command that serves no request (``fhir-dmp load``, ``fhir-dmp retention run``).
:class:`AppServices` adds what a WSGI app needs (the token verifier, the issuer's metadata,
the signed-in spaces' CSRF and OIDC clients) and its background services; ``create_app`` builds it with
:func:`build_app_services`, registers it on the app once (:meth:`AppServices.init_app`, Flask's
extension pattern) and every handler reaches it through :func:`services`.

Background services (the notification worker, the decision context cache with its change
stream, the journal sealer) have ``start()``/``stop()``; they are kept in one list in start
order, started after the server's fork and stopped in reverse order by :func:`stop_background`.
"""
from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from flask import Flask, current_app

from ..audit.log import AuditLog
from ..audit.sealer import Sealer
from ..notifications.outbox import Outbox
from ..notifications.worker import Worker
from ..resources.communications import notification_result
from ..review.schedule import ScanScheduler
from ..security.auth import SharedKeys, TokenVerifier
from ..security.decision import AccessPolicy, access_facets
from ..security.context_cache import ContextCache
from ..security.crypto import DocumentCrypto, key_provider
from ..security.discovery import IssuerMetadata
from ..security.habilitations import Habilitations
from ..search.doc_cache import CACHED_TYPE, DocumentCache
from ..storage import Storage
from ..storage.content import BlobStore
from ..storage.core import KEY_SETS
from .config import Config
from .database import open_database

if TYPE_CHECKING:       # the signed-in spaces' pieces, typed only (fhir_dmp.spaces builds them)
    from authlib.integrations.flask_client import FlaskOAuth2App
    from flask_wtf.csrf import CSRFProtect

#: the one key of ``app.extensions`` this package uses
EXTENSION = "fhir_dmp"


class Background(Protocol):
    """A background service of the process: a thread started once, stopped for good."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(kw_only=True, eq=False)
class Services:
    """Application-wide services the guarded repository uses (one set per process)."""

    config: Config
    storage: Storage
    policy: AccessPolicy
    audit_log: AuditLog
    outbox: Outbox
    blobs: BlobStore
    crypto: DocumentCrypto


@dataclass(kw_only=True, eq=False)
class AppServices(Services):
    """The services of one WSGI app: :class:`Services`, the token verifier, the signed-in spaces' pieces
    and the background services, in the order they were started."""

    verifier: TokenVerifier
    issuer_metadata: IssuerMetadata | None     # the issuer's discovery document; None in dev mode
    background: list[Background] = field(default_factory=list)
    # each optional by configuration; also in ``background`` once started
    worker: Worker | None = None               # config.notifications_worker
    context_cache: ContextCache | None = None  # config.context_cache
    sealer: Sealer | None = None               # config.audit_sealer
    privacy_scan: ScanScheduler | None = None  # config.privacy_scan
    # set by the signed-in spaces' init (fhir_dmp.spaces): CSRF always, each space's OIDC client
    # (by space name) when configured
    csrf: CSRFProtect | None = None
    oidc: dict[str, FlaskOAuth2App] = field(default_factory=dict)

    def init_app(self, app: Flask) -> None:
        """Register these services on ``app`` (reached by :func:`services`)."""
        app.extensions[EXTENSION] = self

    def start_background(self) -> None:
        """Start what the configuration asks for (in each server worker, after the fork): the
        notification worker, the decision context cache (its feed of changes, its own change stream
        or under ``serve`` the node's change hub, also invalidates the
        DMP document cache, ``search/doc_cache.py``, and shares the issuer's key set, ``auth.SharedKeys``),
        the journal sealer and the hourly misuse scan (``review/schedule.py``)."""
        config = self.config
        if config.notifications_worker:
            self.worker = self._start(Worker(
                self.storage, config,
                on_result=lambda message, status, reason: notification_result(self, message, status, reason)))
        if config.context_cache:
            followers, listeners = {}, {}
            if config.document_cache_docs > 0:     # a DMP's documents, invalidated by the same stream
                followers[CACHED_TYPE] = self.storage.doc_cache = DocumentCache(
                    self.storage, max_docs=config.document_cache_docs)
            keys = self.verifier.keys
            if isinstance(keys, SharedKeys):       # a key the issuer withdrew: refused everywhere at once
                storage, issuer = self.storage, config.expected_issuer
                keys.publish = lambda record: storage.bounded(storage.record_key_set, issuer, record)
                listeners[KEY_SETS] = lambda: keys.adopt(storage.key_set(issuer))
            self.context_cache = self._start(ContextCache(self.storage, followers=followers,
                                                          listeners=listeners, hub=config.change_hub))
            self.policy.context_cache = self.context_cache
        if config.audit_sealer:
            self.sealer = self._start(Sealer(self.storage, config.audit_key_path))
        if config.privacy_scan:
            self.privacy_scan = self._start(ScanScheduler(self.storage, self.scan_privacy))

    def scan_privacy(self):
        """One misuse scan since the last one, opening its review cases (``review/scan.py``)."""
        from ..review.scan import run_scan  # lazy: scikit-learn (the privacy extra), only when a scan runs
        return run_scan(self.storage, budget=self.config.review_budget, audit_log=self.audit_log)

    def _start(self, service):
        service.start()
        self.background.append(service)
        atexit.register(service.stop)
        return service

    def stop(self) -> None:
        """Stop the background services in reverse start order, then the journal's committer."""
        while self.background:
            service = self.background.pop()
            service.stop()
            atexit.unregister(service.stop)
        self.audit_log.close()


def _core(config: Config, client=None, db=None) -> dict:
    if db is None:
        client, db = open_database(config)
    storage = Storage(client, db, annotate=access_facets, wait=config.db_wait)
    habilitations = Habilitations.load(config.habilitations_file)
    crypto = DocumentCrypto(storage, key_provider(config))
    audit_log = AuditLog(storage)
    # Every index exists before the first request: SecantusDB leaves out of an index the documents
    # that a transaction already open when the index was built goes on to insert.
    storage.ensure_indexes()
    audit_log.ensure_indexes()
    storage.ensure_outbox_indexes()
    return dict(config=config, storage=storage, policy=AccessPolicy(storage, habilitations, config),
                audit_log=audit_log, outbox=Outbox(storage, config), blobs=BlobStore(storage, crypto),
                crypto=crypto)


def build_services(config: Config, client=None, db=None) -> Services:
    """The services of a command (no request served, nothing in the background). ``client``/``db``:
    an open database (tests share one), else opened from ``config``."""
    return Services(**_core(config, client, db))


def build_app_services(config: Config, client=None, db=None) -> AppServices:
    """The services of a WSGI app; its background services are started by ``start_background``."""
    return AppServices(**_core(config, client, db), verifier=TokenVerifier(config),
                       issuer_metadata=None if config.dev_mode else IssuerMetadata(config.issuer))


def services(app: Flask | None = None) -> AppServices:
    """The services of ``app`` (default: the current app): the one way to them from a handler."""
    return (current_app if app is None else app).extensions[EXTENSION]


def stop_background(app: Flask) -> None:
    """Stop this app's background threads (tests build many apps in one process), for good.

    Call it before the app's database is dropped: SecantusDB's ``dropDatabase``, run while the
    app's sealer still works on that database, can spin for ever in WiredTiger holding its
    storage lock, so that every other client waits too (how CI once hung for 90 minutes)."""
    services(app).stop()
