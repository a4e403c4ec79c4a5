"""One request's unit of work: its writes, each with its journal entries, in one transaction.

:meth:`UnitOfWork.transaction` runs a write (pymongo ``with_transaction``) with the AuditEvents it
recorded and the inserts it left pending; after the commit it sweeps the DMPs destroyed meanwhile
(CONTRACT.md "Lifecycle of a DMP") and drops the cached decision contexts and documents of the
patients it wrote. Reads inside the transaction see its writes (:attr:`UnitOfWork.session`).
"""
from __future__ import annotations

import logging

from ..http.errors import Conflict, FhirError
from ..storage import StorageError, is_write_conflict

log = logging.getLogger(__name__)

#: what a write of these types changes is none of the decision's inputs (storage.DECISION_INPUTS):
#: the DMP's cached decision context stays warm for the next deposit
CONTEXT_FREE = frozenset({"DocumentReference", "Binary"})


class UnitOfWork:
    """The write transaction of one request, its journal (``journal``) and its caches to forget."""

    def __init__(self, storage, audit_log, journal, access, policy):
        self.storage = storage
        self.audit_log = audit_log
        self.journal = journal
        self.access = access
        self.policy = policy
        self.session = None      # the open write transaction, if any (reads inside it see its writes)
        self.pending_inserts: list = []         # inserts of the open transaction not sent yet
        self.fresh_binaries: set[str] = set()   # Binaries this request created for their document
        self._dirty_pids: set[str] = set()   # patients written: swept if destroyed meanwhile
        self._stale_pids: set[str] = set()   # their cached decision context is dropped (CONTEXT_FREE)
        self._consumed_streams: set[int] = set()

    def transaction(self, fn, *, interaction: str = "transaction", rtype: str | None = None,
                    pid: str | None = None):
        """Run ``fn(session)`` in a transaction (pymongo ``with_transaction``: lost races and
        unknown commit results are retried; If-Match conflicts are not).

        The AuditEvents recorded by ``fn`` are appended inside the same transaction: a write is
        never committed without its journal entry (fail closed), and a rolled-back attempt leaves
        no entry. Reads inside ``fn`` see its writes. When ``fn`` fails, the denials it recorded
        stay (journaled at the end of the request), its successes go with the rollback; a failure
        it did not journal is journaled then, in ``pid``'s journal when given.
        """
        journal = self.journal
        mark = journal.mark()

        def attempt(session):
            journal.drop_since(mark)            # a retried attempt starts clean
            self.pending_inserts.clear()
            self.access.states.clear()
            self.session = self.access.session = session
            result = fn(session)
            written = {r.patient_id for r in journal.since(mark) if r.patient_id}
            self._dirty_pids.update(written)
            if rtype not in CONTEXT_FREE:
                self._stale_pids.update(written)
            if journal.since(mark):             # the inserts not sent yet go with the journal's
                self.audit_log.append(journal.events(journal.since(mark)), session=session,
                                      pending=self.pending_inserts)
            if self.pending_inserts:           # every write goes with the transaction, never lost
                self.storage.insert_docs(self.pending_inserts, session=session)
                self.pending_inserts.clear()
            return result

        try:
            result = self.storage.run_transaction(attempt)
            journal.drop_since(mark)            # committed with the write
            self.sweep_destroyed(set(self._dirty_pids))
            self.forget_contexts()   # committed: this process forgets at once, others by the stream
            return result
        except StorageError as exc:
            journal.drop_since(mark)
            if not is_write_conflict(exc):
                raise
            journal.record(interaction, outcome="4", patient_id=pid, resource=rtype, http_status=409)
            raise Conflict("the record is being changed by another request; retry",
                           code="transient", headers={"Retry-After": "1"}) from None
        except FhirError as exc:
            if not journal.keep_refusals_since(mark):
                journal.failure(interaction, exc, pid, rtype)
            raise
        finally:
            self.session = self.access.session = None
            self.access.states.clear()

    def written(self, pid: str | None) -> None:
        """``pid``'s DMP was written in this transaction: swept if destroyed, its documents forgotten."""
        self._dirty_pids.add(pid)

    def stale(self, pid: str) -> None:
        """``pid``'s cached decision context is to be dropped after the commit."""
        self._stale_pids.add(pid)

    def take_stream(self, source) -> bool:
        """True the first time a request body is stored; a retried transaction gets False (a body
        can be read once: storing what is left of it would store empty or truncated content)."""
        if id(source) in self._consumed_streams:
            return False
        self._consumed_streams.add(id(source))
        return True

    def sweep_destroyed(self, pids) -> None:
        """After a commit into DMPs: one destroyed meanwhile is purged again, so nothing written
        by a request that raced its destroy survives it (CONTRACT.md "Lifecycle of a DMP")."""
        for pid in sorted(pids):
            if self.storage.was_destroyed(pid):
                log.warning("a write raced the destroy of a DMP; purged again")
                self.storage.run_transaction(lambda s, pid=pid: self.storage.purge_dmp(pid, session=s))

    def forget_contexts(self) -> None:
        """Drop the cached decision context of the patients whose decision inputs this request
        wrote (the same collections the cache's change stream watches), and the cached documents
        (``search/doc_cache.py``) of every patient it wrote."""
        cache = self.policy.context_cache
        if cache is not None:
            for pid in self._stale_pids:
                cache.invalidate(pid)
        documents = self.storage.doc_cache
        if documents is not None:
            for pid in self._dirty_pids | self._stale_pids:
                documents.invalidate(pid)
        self._stale_pids.clear()
        self._dirty_pids.clear()
