"""The guarded repository: the only way from REST handlers to stored data.

Every read, search, history, include, Binary fetch and write goes through a
:class:`GuardedRepository` bound to one request's principal:

    start (scope)  ->  storage query narrowed by the decision  ->
    can_see per resource (safety net)  ->  decrypt only after permit  ->
    audit record (success, denial or error) flushed once, before the response

A denied read raises exactly the NotFound of a missing resource
(``errors.not_found``). Storage knows nothing of this module; handlers know
nothing of storage.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import jsonpatch
from pymongo.errors import PyMongoError

from . import search
from .errors import (BadRequest, Conflict, FhirError, Forbidden, Gone, NotFound, PreconditionFailed,
                     Unprocessable, not_found)
from .profiles.ins import INS_SYSTEMS
from .security.consent import Decision, RequestAccess
from .security.principal import ADMIN, Principal
from .storage import Stored, VersionConflict, is_write_conflict, merge_filters, new_id, now

log = logging.getLogger(__name__)

ACTION = {"create": "C", "read": "R", "vread": "R", "history": "R", "search": "E", "update": "U",
          "patch": "U", "delete": "D"}
HOSTED = {"Patient", "DocumentReference", "Consent", "AuditEvent", "Binary", "Communication"}
WRITE_RETRIES = 8


@dataclass
class SearchPage:
    """One page of a guarded search: matches, includes, total (None = not counted), next cursor."""

    request: "search.SearchRequest"
    matches: list = field(default_factory=list)       # [Stored]
    included: list = field(default_factory=list)      # [Stored]
    total: int | None = None
    next_cursor: str | None = None


@dataclass
class RequestInfo:
    """What the audit wants to know about the HTTP request (no bodies)."""

    client_ip: str | None = None
    request_id: str | None = None


def named_patient_ids(rtype: str, args: list[tuple[str, str]]) -> set[str]:
    """Patient ids that a search names explicitly (patient, subject, Patient _id)."""
    names = {"patient", "subject", "patient:Patient", "subject:Patient"}
    out = set()
    for key, value in args:
        if key in names or (rtype == "Patient" and key == "_id"):
            for v in value.split(","):
                out.add(search.reference_id(v, "Patient") or v.strip())
    return {p for p in out if p and "/" not in p}


def is_ins_lookup(rtype: str, args: list[tuple[str, str]]) -> bool:
    """``Patient?identifier=<INS system>|<value>`` and nothing else (CONTRACT.md)."""
    if rtype != "Patient":
        return False
    criteria = [(k, v) for k, v in args if not k.startswith("_") or k in ("_id", "_lastUpdated")]
    if len(criteria) != 1 or criteria[0][0] != "identifier":
        return False
    system, _, value = criteria[0][1].partition("|")
    return system in INS_SYSTEMS and bool(value) and "," not in value


class Backend:
    """Application-wide services the repository uses (built once by create_app)."""

    def __init__(self, config, storage, policy, audit_log, outbox=None, blobs=None, crypto=None):
        self.config = config
        self.storage = storage
        self.policy = policy
        self.audit_log = audit_log
        self.outbox = outbox
        self.blobs = blobs
        self.crypto = crypto


class GuardedRepository:
    """One request's view of the store, for one principal."""

    def __init__(self, backend: Backend, principal: Principal, info: RequestInfo | None = None):
        self.b = backend
        self.storage = backend.storage
        self.p = principal
        self.access: RequestAccess = backend.policy.for_request(principal)
        self.info = info or RequestInfo()
        self.records: list = []
        self.effects: list = []          # callables(session) written with the journal at flush
        self._grants_done: set[str] = set()
        self._dirty_pids: set[str] = set()   # patients written: their cached context is dropped
        self.session = None      # the open write transaction, if any (reads inside it see its writes)

    # ------------------------------------------------------------------ audit
    def record(self, interaction: str, *, outcome: str, patient_id: str | None,
               resource: str | None = None, decision: Decision | None = None,
               http_status: int | None = None, query: str | None = None) -> None:
        from .security.audit import AccessRecord
        self.records.append(AccessRecord(
            interaction=interaction, action=ACTION.get(interaction, "E"), outcome=outcome,
            principal=self.p, patient_id=patient_id, resource=resource, query=query,
            decision=decision.as_record() if decision else None, http_status=http_status,
            client_ip=self.info.client_ip, request_id=self.info.request_id))

    def _events(self, records: list) -> list[dict]:
        from .security.audit import build_event
        return [build_event(r, source_observer=self.b.config.fhir_base) for r in records]

    def flush_audit(self) -> None:
        """Write the request's AuditEvents (one round trip). Raises if it cannot (fail closed).

        Side effects of reads (break-glass grants, centre 15 notices) are written in the same
        transaction as their events: if the journal cannot be written, nothing of them remains.
        """
        if not self.records and not self.effects:
            return
        records, self.records = self.records, []
        effects, self.effects = self.effects, []
        if not effects:
            self.b.audit_log.append(self._events(records))
            return
        for attempt in range(WRITE_RETRIES):
            try:
                with self.storage.transaction() as session:
                    for effect in effects:
                        effect(session)
                    more, self.records = self.records, []
                    self.b.audit_log.append(self._events(records + more), session=session)
                return
            except PyMongoError as exc:
                self.records = []
                if not is_write_conflict(exc) or attempt == WRITE_RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.005, 0.02) * 2 ** attempt)

    # ------------------------------------------------------------ decisions
    def _see(self, rtype: str, stored: Stored, *, extra: dict | None = None) -> Decision:
        decision = self.access.can_see(rtype, stored.resource or {}, stored.pid, extra=extra)
        if decision.permit:
            self._obligations(decision, stored.pid)
        return decision

    def _obligations(self, decision: Decision, pid: str | None) -> None:
        """Side effects a permit asks for: break-glass grants, centre 15 notices."""
        if not pid or pid in self._grants_done:
            return
        if decision.obligations.get("new_grant"):
            self._grants_done.add(pid)
            self._create_grant(pid)
        elif decision.obligations.get("notify") == "centre_15":
            self._grants_done.add(pid)
            self.effects.append(lambda session: self.notify("centre_15", pid, session=session))

    def _create_grant(self, pid: str) -> None:
        """A time-boxed break-glass grant, queued for review; the patient is told (at flush)."""
        expires = now() + timedelta(seconds=self.b.config.break_glass_ttl)
        grant = {"_id": new_id(), "pid": pid, "ps": self.p.id_nat_ps, "profession": self.p.profession,
                 "reason": self.p.btg_reason, "created": now(), "expires": expires, "reviewed": False}
        self.access.states[pid].grant = grant

        def effect(session):
            self.storage.db["btg_grants"].insert_one(grant, session=session)
            self.notify("break_glass", pid, session=session)
        self.effects.append(effect)

    def notify(self, kind: str, pid: str, *, session=None) -> None:
        """Queue a notice to the patient and store the matching Communication(s)."""
        if self.b.outbox is None:
            return
        from .notifications import Notice
        st = self.access.state(pid)
        if st.patient is None:
            return
        notice = Notice(kind=kind, patient_id=pid, actor_name=self.p.name,
                        actor_profession=self.p.profession, actor_id=self.p.id_nat_ps,
                        mode=self.p.mode or "normal", when=now(), reason=self.p.btg_reason)
        comms = self.b.outbox.enqueue(notice, st.patient, session=session)
        for comm in comms:
            stored = self.storage.create("Communication", comm, pid=pid, rid=comm.get("id"),
                                         session=session)
            status = comm.get("status")
            self.record("create", outcome="0" if status != "not-done" else "4", patient_id=pid,
                        resource=f"Communication/{stored.id}",
                        decision=Decision(status != "not-done", f"notify-{kind}",
                                          "patient notified" if status != "not-done" else
                                          "the patient could not be told: no contact on file"))

    def _current(self, rtype: str, rid: str) -> Stored | None:
        """The current version; a Patient comes with its decision context (one load, cached
        per process and invalidated on change: ``security/context_cache.py``)."""
        if rtype == "Patient" and self.session is None:
            doc = self.access.state(rid).doc
            return Stored.from_doc(rtype, {**doc, "res": dict(doc["res"]) if doc.get("res") else None}) \
                if doc else None
        return self.storage.read(rtype, rid)

    def _visible(self, rtype: str, rid: str, interaction: str) -> Stored:
        """Current version if the caller may see it; NotFound otherwise; Gone if deleted and seen."""
        stored = self._current(rtype, rid)
        if stored is None:
            # the same context queries as a denial, so a missing resource and a denied one also
            # take a similar time (DESIGN.md "No leaks")
            self.access.load([f"\x00missing/{rid}"])
            self.record(interaction, outcome="4", patient_id=None, resource=f"{rtype}/{rid}",
                        http_status=404)
            raise not_found(rtype, rid)
        decision = self._decide_current(rtype, stored)
        if not decision.permit:
            self.record(interaction, outcome="4", patient_id=stored.pid, resource=f"{rtype}/{rid}",
                        decision=decision, http_status=404)
            raise not_found(rtype, rid)
        if stored.deleted:
            self.record(interaction, outcome="4", patient_id=stored.pid, resource=f"{rtype}/{rid}",
                        decision=decision, http_status=410)
            raise Gone(f"Resource {rtype}/{rid} was deleted", headers={"ETag": f'W/"{stored.vid}"'})
        stored._decision = decision
        return stored

    def _decide_current(self, rtype: str, current: Stored) -> Decision:
        """The read decision on a resource's current state; a deleted one is judged on its last
        version with content (so a 410 is only told to those who could see it)."""
        target = current
        if current.deleted and current.vid > 1:
            target = self.storage.vread(rtype, current.id, current.vid - 1) or current
        return self._decide_read(rtype, target)

    def _decide_read(self, rtype: str, stored: Stored) -> Decision:
        if rtype == "Binary":
            return self._binary_decision(stored)
        return self._see(rtype, stored)

    def _binary_decision(self, stored: Stored) -> Decision:
        """A Binary is read under the decision of the DocumentReference it belongs to."""
        doc_id = search.reference_id(((stored.resource or {}).get("securityContext") or {}).get("reference"),
                        "DocumentReference")
        if doc_id:
            doc = self.storage.read("DocumentReference", doc_id)
            if doc and not doc.deleted and doc.pid == stored.pid:
                return self._see("DocumentReference", doc)
        return Decision(False, "binary-orphan", "content not attached to a readable document")

    # ------------------------------------------------------------------ reads
    def read(self, rtype: str, rid: str) -> Stored:
        self.access.start(rtype, "read")
        stored = self._visible(rtype, rid, "read")
        self.record("read", outcome="0", patient_id=stored.pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                    decision=stored._decision, http_status=200)
        return self._view(stored)

    def vread(self, rtype: str, rid: str, vid: str) -> Stored:
        self.access.start(rtype, "vread")
        current = self._visible(rtype, rid, "vread")   # the current decision rules old versions
        try:
            version = self.storage.vread(rtype, rid, int(vid)) if vid.isdigit() else None
        except ValueError:
            version = None
        if version is None:
            self.record("vread", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        http_status=404)
            raise NotFound(f"Resource {rtype}/{rid}/_history/{vid} is not known")
        if version.deleted:
            raise Gone(f"Version {vid} of {rtype}/{rid} is a deletion")
        self.record("vread", outcome="0", patient_id=current.pid,
                    resource=f"{rtype}/{rid}/_history/{vid}", decision=current._decision, http_status=200)
        version._decision = current._decision
        return self._view(version)

    def _view(self, stored: Stored) -> Stored:
        decision = getattr(stored, "_decision", None)
        if decision and stored.resource is not None:
            stored.resource = self.access.view(stored.resource, decision)
        return stored

    def history(self, rtype: str, rid: str | None, *, since: datetime | None, count: int,
                cursor: tuple | None) -> tuple[list[Stored], tuple | None, int | None]:
        """Versions newest first; (page, next cursor, total or None)."""
        self.access.start(rtype, "history")
        if rid is not None:
            current = self._visible_for_history(rtype, rid)
            page = self.storage.history(rtype, rid, since=since, after_key=cursor, limit=count + 1)
            total = self.storage.count_history(rtype, rid) if since is None else None
            self.record("history", outcome="0", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=current._decision, http_status=200)
            return self._page(page, count, total)
        pids = self.access.reachable_pids(set())
        pid_filter = None if pids is None else {"pid": {"$in": sorted(pids)}}
        if pids is not None and not pids:
            self.record("history", outcome="0", patient_id=None, resource=rtype, http_status=200)
            return [], None, 0
        out, scanned, after = [], 0, cursor
        verdict: dict[str, bool] = {}
        while len(out) <= count and scanned < 20 * (count + 1):
            batch = self.storage.history(rtype, None, pid_filter=pid_filter, since=since, after_key=after,
                                         limit=count + 1)
            if not batch:
                break
            scanned += len(batch)
            for v in batch:
                if v.id not in verdict:
                    cur = self.storage.read(rtype, v.id)
                    verdict[v.id] = bool(cur) and self._decide_current(rtype, cur).permit
                if verdict[v.id]:
                    out.append(v)
            after = (batch[-1].lu, f"{batch[-1].id}/{batch[-1].vid}")
            if len(batch) <= count:
                break
        for pid in sorted({v.pid for v in out if v.pid}):
            self.record("history", outcome="0", patient_id=pid, resource=rtype, http_status=200)
        if not out:
            self.record("history", outcome="0", patient_id=None, resource=rtype, http_status=200)
        return self._page(out, count, None)

    def _visible_for_history(self, rtype: str, rid: str) -> Stored:
        try:
            return self._visible(rtype, rid, "history")
        except Gone:
            stored = self.storage.read(rtype, rid)
            stored._decision = None
            return stored

    @staticmethod
    def _page(page: list[Stored], count: int, total):
        nxt = None
        if len(page) > count:
            page = page[:count]
            last = page[-1]
            nxt = (last.lu, f"{last.id}/{last.vid}")
        return page, nxt, total

    def search(self, rtype: str, args: list[tuple[str, str]], *, lenient: bool = False,
               query_string: str | None = None) -> SearchPage:
        self.access.start(rtype, "search")
        cfg = self.b.config
        req = search.parse_search(rtype, args, lenient=lenient, max_count=cfg.max_page_size,
                                  default_count=cfg.default_page_size)
        page = SearchPage(req)
        guard = self.access.search_filter(rtype, named_patient_ids(rtype, args),
                                          ins_lookup=is_ins_lookup(rtype, args))
        if guard is None:
            page.total = 0 if req.total != "none" or req.summary == "count" else None
            self.record("search", outcome="0", patient_id=None, resource=rtype, query=query_string,
                        decision=Decision(False, "search-scope", "nothing visible to this caller"),
                        http_status=200)
            return page
        base = merge_filters(guard, req.mongo_filter())     # the guard first: pid fails fast
        if req.summary == "count" or req.count == 0:
            docs = []
        else:
            flt = merge_filters(base, search.keyset_filter(req)) if req.cursor else base
            docs = self.storage.find_docs(rtype, flt, req.mongo_sort(), req.count + 1)
        if req.total != "none" or req.summary == "count":
            # a first page that holds everything is its own total: no second pass over the data;
            # otherwise the matches are counted only when asked (_total=accurate|estimate,
            # _summary=count): a count walks every match, so a large DMP would pay for it on
            # every page (issue 13)
            short = not req.cursor and len(docs) <= req.count and req.summary != "count" and req.count
            if short:
                page.total = len(docs)
            elif req.explicit_total or req.summary == "count":
                page.total = self.storage.count(rtype, base)
        if docs:
            if len(docs) > req.count:
                docs = docs[:req.count]
                page.next_cursor = search.cursor_after(req, docs[-1])
            extra = {"ins_lookup": True} if is_ins_lookup(rtype, args) else None
            for doc in docs:
                stored = Stored.from_doc(rtype, doc)
                decision = self._see(rtype, stored, extra=extra)
                if not decision.permit:
                    log.warning("search guard let %s/%s through; dropped by can_see (%s)", rtype,
                                stored.id, decision.rule)
                    continue
                stored.resource = self.access.view(stored.resource, decision)
                page.matches.append(stored)
            page.included = self._includes(req, docs, page.matches)
        touched = sorted({s.pid for s in page.matches + page.included if s.pid})
        for pid in touched or [None]:
            self.record("search", outcome="0", patient_id=pid, resource=rtype, query=query_string,
                        decision=Decision(True, "search", "filtered by the access decision"),
                        http_status=200)
        return page

    def _includes(self, req, docs: list[dict], matches: list[Stored]) -> list[Stored]:
        """_include / _revinclude, each included resource through the same decision."""
        out, seen = [], {(s.resource_type, s.id) for s in matches}
        visible_docs = [d for d in docs if (req.resource_type, d["_id"]) in seen]

        def admit(rtype: str, stored: Stored) -> None:
            if (rtype, stored.id) in seen:
                return
            decision = self._decide_read(rtype, stored)
            if decision.permit:
                stored.resource = self.access.view(stored.resource, decision)
                out.append(stored)
                seen.add((rtype, stored.id))

        for inc in req.include or []:
            targets: dict[str, list] = {}
            for doc in visible_docs:
                for t, i in search.include_targets(inc, doc):
                    if t in HOSTED:
                        targets.setdefault(t, []).append(i)
            for t, ids in targets.items():
                for stored in self.storage.read_many(t, sorted(set(ids))):
                    admit(t, stored)
        for inc in req.revinclude or []:
            if inc.source_type not in HOSTED or not matches:
                continue
            guard = self.access.search_filter(
                inc.source_type, {s.id for s in matches} if req.resource_type == "Patient" else set())
            if guard is None:
                continue
            flt = search.revinclude_filter(inc, req.resource_type, [s.id for s in matches])
            for stored in self.storage.find(inc.source_type, merge_filters(guard, flt),
                                            [("_id", 1)], self.b.config.max_page_size):
                admit(inc.source_type, stored)
        return out

    # ----------------------------------------------------------------- Binary
    def binary_content(self, stored: Stored):
        """Decrypting iterator over a visible Binary's content (decision already taken by read).

        Content that cannot be opened (shredded data key, missing chunks) turns the journaled
        read into the 404 the caller gets.
        """
        from .security.crypto import ContentUnavailable
        try:
            return self.b.blobs.open(stored.pid, stored.id, stored.vid)
        except ContentUnavailable:
            for rec in reversed(self.records):
                if rec.resource and rec.resource.startswith(f"Binary/{stored.id}") and rec.outcome == "0":
                    rec.outcome, rec.http_status = "4", 404
                    rec.decision = {**(rec.decision or {}), "reason": "content no longer available"}
                    break
            raise

    # ----------------------------------------------------------------- writes
    def _writing(self, fn, *, interaction: str = "transaction", rtype: str | None = None):
        """Run ``fn(session)`` in a transaction, retrying lost races (not If-Match conflicts).

        The AuditEvents recorded by ``fn`` are appended inside the same transaction: a write is
        never committed without its journal entry (fail closed), and a rolled-back attempt leaves
        no entry. A failure is journaled afterwards, at the end of the request.
        """
        mark = len(self.records)
        for attempt in range(WRITE_RETRIES):
            try:
                with self.storage.transaction() as session:
                    self.session = self.access.session = session
                    try:
                        result = fn(session)
                        if len(self.records) > mark:
                            self.b.audit_log.append(self._events(self.records[mark:]), session=session)
                    finally:
                        self._dirty_pids.update(r.patient_id for r in self.records[mark:] if r.patient_id)
                        del self.records[mark:]
                        self.session = self.access.session = None
                        self.access.states.clear()
                self._forget_contexts()   # committed: this process forgets at once, others by the stream
                return result
            except PyMongoError as exc:
                if not is_write_conflict(exc):
                    raise
                if attempt < WRITE_RETRIES - 1:
                    time.sleep(random.uniform(0.005, 0.02) * 2 ** attempt)   # jittered back-off
                    continue
                self.record(interaction, outcome="4", patient_id=None, resource=rtype, http_status=409)
                raise Conflict("the record is being changed by another request; retry",
                               code="transient", headers={"Retry-After": "1"}) from None
            except FhirError as exc:
                self.record(interaction, outcome="4" if exc.status < 500 else "8", patient_id=None,
                            resource=rtype, http_status=exc.status,
                            decision=Decision(False, "error", exc.diagnostics[:200]))
                raise

    def _deny_write(self, interaction: str, rtype: str, rid: str | None, pid: str | None,
                    decision: Decision) -> FhirError:
        self.record(interaction, outcome="4", patient_id=pid, resource=f"{rtype}/{rid}" if rid else rtype,
                    decision=decision, http_status=403)
        st_visible = pid and self.access.dmp_access(self.access.state(pid)).permit
        if not st_visible and decision.rule in ("dmp-state", "not-authorized", "patient-other",
                                                "dmp-closed", "no-patient", "role"):
            if rtype == "Patient" and rid:
                return not_found("Patient", rid)
            return Unprocessable(f"Patient/{pid} is not known", expression=f"{rtype}.subject"
                                 if rtype == "DocumentReference" else f"{rtype}.patient")
        return Forbidden(f"not allowed: {decision.reason}")

    def create(self, rtype: str, resource: dict, *, session=None, rid: str | None = None,
               content=None) -> Stored:
        """Create (server id). ``session`` given = inside a transaction Bundle."""
        self.access.start(rtype, "create")
        pid = search.patient_id_of(rtype, resource)
        if rtype == "Binary":
            pid = self._binary_pid(resource)
        decision = self.access.can_write("create", rtype, resource, None, pid)
        if not decision.permit:
            raise self._deny_write("create", rtype, None, pid, decision)
        resource = self._prepare(rtype, resource, None, pid)

        def write(s):
            rid_ = rid or new_id()
            resource_ = self._store_content(rtype, rid_, 1, resource, pid, s, content)
            stored = self.storage.create(rtype, resource_, pid=pid, rid=rid_, session=s)
            self._after_write("create", rtype, stored, None, decision, s)
            self.record("create", outcome="0", patient_id=stored.pid,
                        resource=f"{rtype}/{stored.id}/_history/1", decision=decision, http_status=201)
            return stored

        return write(session) if session is not None else self._writing(write, interaction="create", rtype=rtype)

    def update(self, rtype: str, rid: str, resource: dict, *, if_match: str | None = None,
               session=None, interaction: str = "update", content=None) -> tuple[Stored, bool]:
        """Update (or create with the client's id when absent). Returns (stored, created)."""
        self.access.start(rtype, "update")
        current = self.storage.read(rtype, rid, session=session)
        if current is None or current.deleted:
            if if_match:
                raise PreconditionFailed(f"{rtype}/{rid} does not exist; If-Match cannot hold")
            if current is None:
                return self.create(rtype, resource, session=session, rid=rid, content=content), True
        if current.deleted:
            old, pid = None, current.pid
            seen = Decision(True, "recreate", "deleted resource recreated")
        else:
            seen = self._decide_read(rtype, current)
            if not seen.permit:
                self.record(interaction, outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                            decision=seen, http_status=404)
                raise not_found(rtype, rid)
            old, pid = current.resource, current.pid
        new_pid = search.patient_id_of(rtype, resource) if rtype not in ("Patient", "Binary") else pid
        if new_pid != pid:
            raise Unprocessable("a resource cannot move to another patient's record",
                                expression=f"{rtype}.subject" if rtype == "DocumentReference" else rtype)
        decision = self.access.can_write(interaction, rtype, resource, old, pid)
        if not decision.permit:
            raise self._deny_write(interaction, rtype, rid, pid, decision)
        expected = _expected_version(if_match, current)
        resource = self._prepare(rtype, resource, old, pid)

        def write(s):
            vid = expected + 1
            resource_ = self._store_content(rtype, rid, vid, resource, pid, s, content)
            try:
                stored = self.storage.update(rtype, rid, resource_, pid=pid, expected_vid=expected, session=s)
            except VersionConflict as exc:
                raise PreconditionFailed(f"version conflict: {rtype}/{rid} is at version {exc.current_vid}") \
                    if if_match else Conflict(f"concurrent update of {rtype}/{rid}; retry") from None
            self._after_write(interaction, rtype, stored, old, decision, s)
            self.record(interaction, outcome="0", patient_id=pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                        decision=decision, http_status=200)
            return stored

        stored = write(session) if session is not None else \
            self._writing(write, interaction=interaction, rtype=rtype)
        if rtype == "Patient" and (old or {}).get("active", True) is not False \
                and resource.get("active") is False:
            # the DMP closes: its journal is kept 10 years from now (DESIGN.md "Audit")
            from .security.audit import mark_retention
            mark_retention(self.storage.db, pid, stored.lu)
        return stored, False

    def patch(self, rtype: str, rid: str, operations: list, *, if_match: str | None = None,
              validate=None, session=None) -> Stored:
        """RFC 6902 JSON Patch, then the same path as update."""
        self.access.start(rtype, "patch")
        current = self._visible(rtype, rid, "patch")
        try:
            patched = jsonpatch.apply_patch(current.resource, operations)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError) as exc:
            raise Unprocessable(f"JSON Patch cannot be applied: {exc}") from None
        if patched.get("resourceType") != rtype or patched.get("id") != rid:
            raise Unprocessable("JSON Patch may not change resourceType or id")
        if validate:
            patched = validate(patched)
        return self.update(rtype, rid, patched, if_match=if_match, session=session, interaction="patch")[0]

    def delete(self, rtype: str, rid: str, *, session=None) -> Stored | None:
        """Logical delete (410 afterwards, history kept). Deleting nothing is a success."""
        self.access.start(rtype, "delete")
        current = self.storage.read(rtype, rid, session=session)
        if current is None or current.deleted:
            self.record("delete", outcome="0", patient_id=current.pid if current else None,
                        resource=f"{rtype}/{rid}", http_status=204)
            return None
        seen = self._decide_read(rtype, current)
        if not seen.permit:
            self.record("delete", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=seen, http_status=404)
            raise not_found(rtype, rid)
        decision = self.access.can_write("delete", rtype, None, current.resource, current.pid)
        if not decision.permit:
            raise self._deny_write("delete", rtype, rid, current.pid, decision)

        def write(s):
            try:
                stored = self.storage.update(rtype, rid, None, pid=current.pid, expected_vid=current.vid,
                                             session=s, deleted=True)
            except VersionConflict:
                raise Conflict(f"concurrent change of {rtype}/{rid}; retry") from None
            self.record("delete", outcome="0", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=decision, http_status=204)
            return stored

        return write(session) if session is not None else self._writing(write, interaction="delete", rtype=rtype)

    # ------------------------------------------------------------ lifecycle
    def destroy_dmp(self, pid: str) -> None:
        """Destroy a DMP (DESIGN.md rule 3): the record becomes as if it never existed.

        Administrator only. The patient's data key is deleted first (crypto-shredding: every
        document becomes unrecoverable even from backups), then the encrypted chunks, the
        documents, Consents, Communications and their history; the Patient stays as a bare
        tombstone marked ``destroyed``. The journal is kept 10 years (``retain_until``).
        """
        from .security.audit import mark_retention
        self.access.start("Patient", "delete")
        current = self.storage.read("Patient", pid)
        st = self.access.state(pid)
        if current is None or not st.known:
            self.record("delete", outcome="4", patient_id=None, resource=f"Patient/{pid}", http_status=404)
            raise not_found("Patient", pid)
        if self.p.kind != ADMIN:
            decision = Decision(False, "destroy-dmp", "only an administrator destroys a DMP")
            if not self.access.dmp_access(st).permit:
                self.record("delete", outcome="4", patient_id=pid, resource=f"Patient/{pid}",
                            decision=decision, http_status=404)
                raise not_found("Patient", pid)
            raise self._deny_write("delete", "Patient", pid, pid, decision)
        at = now()
        self.b.crypto.shred(pid)
        self.b.blobs.delete_patient(pid)
        db = self.storage.db
        for rtype in ("DocumentReference", "Binary", "Consent", "Communication"):
            db[rtype].delete_many({"pid": pid})
            db[f"{rtype}_history"].delete_many({"pid": pid})
        db["Patient_history"].delete_many({"rid": pid})
        db["btg_grants"].delete_many({"pid": pid})
        db["Patient"].update_one({"_id": pid}, {"$set": {"destroyed": True, "destroyed_at": at, "del": True,
                                                        "res": None, "s": {}, "o": {}}})
        mark_retention(db, pid, at)
        self.access.states.pop(pid, None)
        self._dirty_pids.add(pid)
        self._forget_contexts()
        self.record("delete", outcome="0", patient_id=pid, resource=f"Patient/{pid}",
                    decision=Decision(True, "destroy-dmp", "DMP destroyed by an administrator"),
                    http_status=204)

    # -------------------------------------------------------- conditional ops
    def find_matches(self, rtype: str, criteria: list[tuple[str, str]], limit: int = 2) -> list[Stored]:
        """Guarded search for conditional create/update/delete (only what the caller may see)."""
        args = [(k, v) for k, v in criteria] + [("_count", str(limit))]
        return self.search(rtype, args).matches

    # ------------------------------------------------------- write internals
    def _binary_pid(self, resource: dict) -> str | None:
        ctx = ((resource.get("securityContext") or {}).get("reference"))
        pid = search.reference_id(ctx, "Patient")
        if pid:
            return pid
        doc_id = search.reference_id(ctx, "DocumentReference")
        if doc_id:
            doc = self.storage.read("DocumentReference", doc_id)
            return doc.pid if doc else None
        return None

    def _prepare(self, rtype: str, resource: dict, old: dict | None, pid: str | None) -> dict:
        """Server-side rules on what is written (author, qualified INS, content checks)."""
        from .documents.pipeline import prepare_document
        if rtype == "DocumentReference":
            return prepare_document(self, resource, old, pid)
        return resource

    def _store_content(self, rtype: str, rid: str, vid: int, resource: dict, pid: str | None, session,
                       content=None) -> dict:
        """Move inline content to encrypted blobs before the metadata is written."""
        from .documents.pipeline import store_binary_content, store_inline_attachments
        if rtype == "Binary":
            return store_binary_content(self, rid, vid, resource, pid, session, stream=content)
        if rtype == "DocumentReference":
            return store_inline_attachments(self, rid, resource, pid, session)
        return resource

    def _after_write(self, interaction: str, rtype: str, stored: Stored, old: dict | None,
                     decision: Decision, session) -> None:
        from .documents.pipeline import after_document_write, remember_blob
        if decision.obligations.get("authorize_creator"):
            self._authorize_creator(stored, session)
        if decision.obligations.get("notify") == "first_access":
            self.notify("first_access", stored.pid, session=session)
        if rtype == "DocumentReference":
            after_document_write(self, stored, old, session)
        if rtype == "Binary" and getattr(self, "_pending_blob", None):
            remember_blob(self, *self._pending_blob, session)
            self._pending_blob = None
        self.access.states.pop(stored.pid, None)
        self._dirty_pids.add(stored.pid)

    def _forget_contexts(self) -> None:
        """Drop the cached decision context of the patients this request wrote."""
        cache = self.b.policy.context_cache
        if cache is not None:
            for pid in self._dirty_pids:
                cache.invalidate(pid)
        self._dirty_pids.clear()

    def _authorize_creator(self, patient: Stored, session) -> None:
        """A PS who opens a DMP is authorized on it (CONTRACT.md)."""
        consent = {
            "resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient.id}"},
            "dateTime": patient.resource["meta"]["lastUpdated"],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN"}]},
            "verification": [{"verified": True, "verifiedWith": self.p.reference()}],
            "provision": {"type": "permit",
                          "actor": [{"role": {"coding": [{
                              "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                              "code": "PRCP"}]}, "reference": self.p.reference()}],
                          "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                       "code": "TREAT"}]},
        }
        stored = self.storage.create("Consent", consent, pid=patient.id, session=session)
        self.record("create", outcome="0", patient_id=patient.id, resource=f"Consent/{stored.id}/_history/1",
                    decision=Decision(True, "ps-creates-dmp", "creator authorized"), http_status=201)


def _expected_version(if_match: str | None, current: Stored) -> int:
    if not if_match:
        return current.vid
    tag = if_match.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"')
    if not tag.isdigit():
        raise BadRequest("If-Match must be a version ETag like W/\"3\"")
    if int(tag) != current.vid:
        raise PreconditionFailed(f"If-Match W/\"{tag}\" does not match the current version {current.vid}")
    return int(tag)
