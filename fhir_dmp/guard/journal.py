"""The request's journal: what one request did, recorded as it happens, written once.

Every access the guard decides (success, denial or error) becomes an
:class:`~fhir_dmp.audit.events.AccessRecord` here; :meth:`RequestJournal.flush` writes them as
AuditEvents in one round trip before the response (fail closed), with the side effects of reads
(break-glass grants, centre 15 notices) in the same transaction. A write's records go with the
write instead (:class:`~fhir_dmp.guard.unit_of_work.UnitOfWork`). Queries journaled in no DMP's
chain lose their INS (:func:`redact_ins`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

from ..http.errors import FhirError
from ..audit.events import AccessRecord, build_event
from ..security.decision import Decision, RequestAccess
from ..storage import new_id

ACTION = {"create": "C", "read": "R", "vread": "R", "history": "R", "search": "E", "update": "U",
          "patch": "U", "delete": "D"}
#: the restful-interaction code of an HTTP method (for events recorded outside a repository call)
METHOD_INTERACTION = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "PATCH": "patch",
                      "DELETE": "delete"}

_INS_IN_QUERY = re.compile(r"((?:urn|URN)(?::|%3A|%3a)oid(?::|%3A|%3a)1\.2\.250\.1\.213\.1\.4\.(?:8|9|10|11)"
                           r"(?:\||%7C|%7c))([^&#;,]+)")


def redact_ins(query: str) -> str:
    """The query without INS values, for the system journal: what no DMP's chain holds must not
    keep a NIR once that DMP is destroyed (CONTRACT.md "Lifecycle": no personal data left)."""
    return _INS_IN_QUERY.sub(lambda m: m.group(1) + "[INS]", query)


@dataclass
class RequestInfo:
    """What the audit wants to know about the HTTP request (no bodies)."""

    client_ip: str | None = None
    request_id: str | None = None
    access_code: str | None = None      # X-Patient-Access-Code (first access in patient-code mode)
    user_agent: str | None = None       # the HTTP User-Agent (what the misuse scan compares)


class RequestJournal:
    """The records of one request, for one principal (``info``: its client IP and request id)."""

    def __init__(self, principal, info, audit_log, source_observer: str, access: RequestAccess):
        self.p = principal
        self.access = access             # the request's decision: the basis of each record
        self.info = info
        self.audit_log = audit_log
        self.source_observer = source_observer
        self.records: list = []
        self.effects: list = []          # callables(session) written with the journal at flush
        self.flushing: list = []         # (record, event) written by the flush running its effects
        self.refused = False             # a refusal or error was journaled during this request

    def record(self, interaction: str, *, outcome: str, patient_id: str | None,
               resource: str | None = None, decision: Decision | None = None,
               http_status: int | None = None, query: str | None = None) -> None:
        if patient_id is None and query:
            query = redact_ins(query)
        self.refused = self.refused or outcome != "0"
        self.records.append(AccessRecord(
            interaction=interaction, action=ACTION.get(interaction, "E"), outcome=outcome,
            principal=self.p, patient_id=patient_id, resource=resource, query=query,
            decision=self.access.complete(decision, patient_id), http_status=http_status,
            client_ip=self.info.client_ip, request_id=self.info.request_id, user_agent=self.info.user_agent))

    def events(self, records: list) -> list[dict]:
        """The AuditEvents of ``records`` (BALP shape)."""
        return [build_event(r, source_observer=self.source_observer) for r in records]

    def add_effect(self, effect) -> None:
        """``effect(session)`` is written at flush, in the journal's transaction."""
        self.effects.append(effect)

    def flush(self, run_transaction) -> set[str]:
        """Write the request's AuditEvents (one round trip). Raises if it cannot (fail closed).

        Side effects of reads (break-glass grants, centre 15 notices) are written in the same
        transaction as their events, through ``run_transaction``: if the journal cannot be written,
        nothing of them remains. Returns the patients of a flush that wrote effects (else empty).
        """
        if not self.records and not self.effects:
            return set()
        records, self.records = self.records, []
        effects, self.effects = self.effects, []
        if not effects:
            self.audit_log.append(self.events(records))
            return set()

        def attempt(session):
            self.records = []
            events = self.events(records)
            for event in events:        # known before the effects run: a review case names its access
                event.setdefault("id", new_id())
            self.flushing = list(zip(records, events))
            for effect in effects:
                effect(session)
            self.audit_log.append(events + self.events(self.records), session=session)

        try:
            run_transaction(attempt)
        finally:
            self.records = []
            self.flushing = []
        return {r.patient_id for r in records if r.patient_id}

    def first_event(self, pid: str) -> str | None:
        """During a flush's effects: the id of the first granted access to ``pid`` it writes."""
        return next((e["id"] for r, e in self.flushing if r.patient_id == pid and r.outcome == "0"), None)

    def documents_read(self, pid: str) -> int:
        """During a flush's effects: how many granted reads of documents of ``pid`` it writes."""
        return sum(1 for r, _ in self.flushing if r.patient_id == pid and r.outcome == "0"
                   and (r.resource or "").startswith(("DocumentReference/", "Binary/")))

    # -- marks, for a unit of work that commits or rolls back what it recorded ------------------
    def mark(self) -> int:
        return len(self.records)

    def since(self, mark: int) -> list:
        return self.records[mark:]

    def drop_since(self, mark: int) -> None:
        del self.records[mark:]

    def keep_refusals_since(self, mark: int) -> bool:
        """Drop the successes recorded since ``mark`` (rolled back), keep its refusals; any kept?"""
        kept = [r for r in self.records[mark:] if r.outcome != "0"]
        del self.records[mark:]
        self.records += kept
        return bool(kept)

    def forget_patient(self, pid: str) -> None:
        """Nothing about a destroyed DMP may be journaled after its chain is gone."""
        self.records = [r for r in self.records if r.patient_id != pid]

    # -- refusals ---------------------------------------------------------------------------------
    def failure(self, interaction: str, exc: FhirError, pid: str | None, resource: str | None) -> None:
        """A refusal or error nobody journaled yet, with its status and diagnostics."""
        self.record(interaction, outcome="4" if exc.status < 500 else "8", patient_id=pid, resource=resource,
                    http_status=exc.status, decision=Decision(False, "error", exc.diagnostics[:200]))

    @contextmanager
    def refusals_journaled(self, interaction: str, resource: str | None, named=None):
        """Every refused write is in the journal (issue 18): a refusal raised in the block that
        nothing journaled yet (If-Match, a move to another record, a patch that does not apply, a
        failed transaction) is journaled here, in the journal of the DMP the write names once the
        block has set ``target["pid"]`` (else ``named()``'s, asked only then), seen by the caller
        or not (the answer stays the same)."""
        mark, target = len(self.records), {"pid": None}
        try:
            yield target
        except FhirError as exc:
            if all(r.outcome == "0" for r in self.records[mark:]):
                pid = target["pid"] or (named() if named else None)
                self.failure(interaction, exc, pid, resource)
            raise

    def named(self, interaction: str, named, pid: str | None, decision: Decision, http_status: int) -> None:
        """A refused write naming a resource of another DMP than its own (``X-Security-Context``,
        ``relatesTo``, ``attachment.url``): that DMP's patient sees the attempt in their journal
        too, whatever the caller may see of it (the answer stays that of a missing one)."""
        if named is not None and named.pid and named.pid != pid:
            self.record(interaction, outcome="4", patient_id=named.pid, decision=decision,
                        resource=f"{named.resource_type}/{named.id}", http_status=http_status)

    def content_unavailable(self, binary_id: str) -> None:
        """The journaled read of a Binary whose content cannot be opened becomes the 404 answered."""
        for rec in reversed(self.records):
            if rec.resource and rec.resource.startswith(f"Binary/{binary_id}") and rec.outcome == "0":
                rec.outcome, rec.http_status = "4", 404
                rec.decision = {**(rec.decision or {}), "reason": "content no longer available"}
                break
