"""The guarded repository: the only way from REST handlers to stored data.

Every read, search, history, include, Binary fetch and write goes through a
:class:`GuardedRepository` bound to one request's principal:

    start (scope)  ->  storage query narrowed by the decision  ->
    can_see per resource (safety net)  ->  decrypt only after permit  ->
    audit record (success, denial or error) flushed once, before the response

A denied read raises exactly the NotFound of a missing resource
(``errors.not_found``). Storage knows nothing of this module; handlers know
nothing of storage.

The facade is composed of its parts, one file each: :class:`~fhir_dmp.guard.journal.RequestJournal`
(what the request did), :class:`~fhir_dmp.guard.unit_of_work.UnitOfWork` (its write transaction),
:class:`~fhir_dmp.guard.reads.Reads`, :class:`~fhir_dmp.guard.writes.Writes`,
:class:`~fhir_dmp.guard.dmp.DmpOperations` (destroy, close, access codes, grants, notices),
:class:`~fhir_dmp.guard.review.ReviewOperations` (the privacy review cases),
:class:`~fhir_dmp.guard.explain.Explanations` (``$explain-access``), and
the document pipeline (:class:`~fhir_dmp.documents.pipeline.DocumentPipeline`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..documents.pipeline import DocumentPipeline
from ..security.decision import RequestAccess
from ..security.principal import Principal
from .dmp import DmpOperations
from .explain import Explanations
from .journal import RequestInfo, RequestJournal
from .reads import Reads
from .review import ReviewOperations
from .unit_of_work import UnitOfWork
from .writes import Writes

if TYPE_CHECKING:   # the process's services (runtime/services.py), built by create_app
    from ..runtime.services import Services


class GuardedRepository(Reads, Writes, DmpOperations, ReviewOperations, Explanations):
    """One request's view of the store, for one principal."""

    def __init__(self, backend: Services, principal: Principal, info: RequestInfo | None = None):
        self.config = backend.config
        self.storage = backend.storage
        self.blobs = backend.blobs
        self.crypto = backend.crypto
        self.outbox = backend.outbox
        self.audit_log = backend.audit_log
        self.p = principal
        self.access: RequestAccess = backend.policy.for_request(principal)
        self.info = info or RequestInfo()
        self.journal = RequestJournal(principal, self.info, backend.audit_log, backend.config.fhir_base,
                                      self.access)
        self.work = UnitOfWork(backend.storage, backend.audit_log, self.journal, self.access, backend.policy)
        self.documents = DocumentPipeline(storage=backend.storage, blobs=backend.blobs, work=self.work,
                                          decision=self.access, journal=self.journal,
                                          max_bytes=backend.config.max_attachment_bytes)
        self._grants_done: set[str] = set()
        self._seen_docs: dict = {}

    @property
    def session(self):
        """The open write transaction, if any (reads inside it see its writes)."""
        return self.work.session

    @property
    def records(self) -> list:
        """The journal records not written yet."""
        return self.journal.records

    def record(self, interaction: str, **kwargs) -> None:
        """Journal one access (:meth:`RequestJournal.record`)."""
        self.journal.record(interaction, **kwargs)

    def transaction(self, fn, *, interaction: str = "transaction", rtype: str | None = None,
                    pid: str | None = None):
        """Run ``fn(session)`` in the request's unit of work (:meth:`UnitOfWork.transaction`):
        committed with its journal entries, or rolled back with them."""
        return self.work.transaction(fn, interaction=interaction, rtype=rtype, pid=pid)

    def flush_audit(self) -> None:
        """Write the request's AuditEvents (one round trip). Raises if it cannot (fail closed);
        the read side effects written with them are swept if their DMP was destroyed meanwhile."""
        self.work.sweep_destroyed(self.journal.flush(self.storage.run_transaction))
