"""What the review cases (``fhir_dmp/review/``) keep beside their Tasks: one key document per case.

Collection ``review_case_keys``: ``{_id: <case key>, task: <Task id>, pid, release: bool}``.
Contract: a key is claimed at most once (:meth:`ReviewStore.claim_review_key`, an upsert inside
the caller's transaction: concurrent claims conflict on the one document, one commits, the
others retry and see it); a key claimed with ``release`` is freed when its Task is completed
(:meth:`ReviewStore.release_review_keys`: centre 15, one open case per regulation-centre
professional and DMP), the others never are (one break-glass case per grant, one anomaly case per
pair). Purged with the DMP (``LifecycleStore.purge_dmp``).
"""
from __future__ import annotations

from .core import JOURNAL, REVIEW_KEYS, _index
from .errors import translate_methods
from .pages import PageReads


@translate_methods
class ReviewStore(PageReads):
    """Review case keys and the counts of stored Tasks the review budget reads (module docstring)."""

    def ensure_review_indexes(self) -> None:
        """Keys by Task (release on completion) and by DMP (purge)."""
        _index(self.db[REVIEW_KEYS], [("task", 1)])
        _index(self.db[REVIEW_KEYS], [("pid", 1)])

    def claim_review_key(self, key: str, task_id: str, pid: str, *, release: bool, session) -> bool:
        """Claim ``key`` for Task ``task_id`` in ``session``'s transaction; False when it is taken."""
        result = self.db[REVIEW_KEYS].update_one(
            {"_id": key}, {"$setOnInsert": {"task": task_id, "pid": pid, "release": release}},
            upsert=True, session=session)
        return result.upserted_id is not None

    def release_review_keys(self, task_id: str, *, session) -> None:
        """The releasable keys of Task ``task_id`` are free again (it was completed)."""
        self.db[REVIEW_KEYS].delete_many({"task": task_id, "release": True}, session=session)

    def count_tasks_authored(self, code: str, since: str, until: str, *, session=None) -> int:
        """Current Tasks with ``code`` whose ``authoredOn`` (an instant in UTC, as the server
        writes it) is in ``[since, until)``: deleted ones count too (a budget is not refilled)."""
        return self.db["Task"].count_documents(
            {"res.code.coding.code": code, "res.authoredOn": {"$gte": since, "$lt": until}}, session=session)

    def count_document_reads(self, pid: str, actor: str, purpose: str, since, until=None) -> int:
        """Granted journal entries of DMP ``pid`` naming a document (DocumentReference, Binary), by
        the professional ``actor`` (idNatPs) under ``purpose`` (BTG, ETREAT), dated in
        ``[since, until)`` (``until`` None: up to now); unsealed ones included (``pages.py``)."""
        dates = {"$gte": since, **({"$lt": until} if until is not None else {})}
        flt = {"pid": pid, "s.agent.iv": actor, "s.purpose.c": purpose, "s.outcome.c": "0",
               "s.entity.t": {"$in": ["DocumentReference", "Binary"]}, "s.date.lo": dates}
        return self.journal_count(flt, lambda: self.db[JOURNAL].count_documents(flt))
