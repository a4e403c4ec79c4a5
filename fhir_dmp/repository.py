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
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import jsonpatch
from pymongo.errors import PyMongoError

from . import search
from .errors import (BadRequest, Conflict, FhirError, Forbidden, Gone, NotFound, PreconditionFailed,
                     Unprocessable, not_found)
from .profiles import dmp
from .profiles.ins import INS_SYSTEMS
from .security.decision import DIRECTORY, ROLE_CODE_SYSTEM, Decision, RequestAccess
from .security.principal import ADMIN, Principal
from .storage import (RESOURCE_TYPES, UNIQUE_INDEXES, DuplicateValue, Stored, VersionConflict, instant,
                      is_write_conflict, merge_filters, new_id, now)

log = logging.getLogger(__name__)

ACTION = {"create": "C", "read": "R", "vread": "R", "history": "R", "search": "E", "update": "U",
          "patch": "U", "delete": "D"}
#: what a write of these types changes is none of the decision's inputs (storage.DECISION_INPUTS):
#: the DMP's cached decision context stays warm for the next deposit (issue 13)
CONTEXT_FREE = frozenset({"DocumentReference", "Binary"})
HOSTED = RESOURCE_TYPES     # the resource types served (storage.py holds the list)


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
    access_code: str | None = None      # X-Patient-Access-Code (first access in patient-code mode)


def named_patient_ids(rtype: str, args: list[tuple[str, str]]) -> set[str]:
    """Patient ids that a search names explicitly (patient, subject, Patient _id)."""
    names = {"patient", "subject", "patient:Patient", "subject:Patient"}
    out = set()
    for key, value in args:
        if key in names or (rtype == "Patient" and key == "_id"):
            for v in value.split(","):
                out.add(search.reference_id(v, "Patient") or v.strip())
    return {p for p in out if p and "/" not in p}


_INS_IN_QUERY = re.compile(r"((?:urn|URN)(?::|%3A|%3a)oid(?::|%3A|%3a)1\.2\.250\.1\.213\.1\.4\.(?:8|9|10|11)"
                           r"(?:\||%7C|%7c))([^&#;,]+)")


def redact_ins(query: str) -> str:
    """The query without INS values, for the system journal: what no DMP's chain holds must not
    keep a NIR once that DMP is destroyed (CONTRACT.md "Lifecycle": no personal data left)."""
    return _INS_IN_QUERY.sub(lambda m: m.group(1) + "[INS]", query)


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
        self.fresh_binaries: set[str] = set()   # Binaries this request created for their document
        self.pending_inserts: list = []         # inserts of the open transaction not sent yet
        self._dirty_pids: set[str] = set()   # patients written: swept if destroyed meanwhile
        self._stale_pids: set[str] = set()   # their cached decision context is dropped (CONTEXT_FREE)
        self.session = None      # the open write transaction, if any (reads inside it see its writes)

    # ------------------------------------------------------------------ audit
    def record(self, interaction: str, *, outcome: str, patient_id: str | None,
               resource: str | None = None, decision: Decision | None = None,
               http_status: int | None = None, query: str | None = None) -> None:
        from .security.audit import AccessRecord
        if patient_id is None and query:
            query = redact_ins(query)
        self.records.append(AccessRecord(
            interaction=interaction, action=ACTION.get(interaction, "E"), outcome=outcome,
            principal=self.p, patient_id=patient_id, resource=resource, query=query,
            decision=self.access.complete(decision), http_status=http_status,
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

        def attempt(session):
            self.records = []
            for effect in effects:
                effect(session)
            self.b.audit_log.append(self._events(records + self.records), session=session)

        try:
            self.storage.run_transaction(attempt)
        finally:
            self.records = []
        self._sweep_destroyed({r.patient_id for r in records if r.patient_id})

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
        """A time-boxed break-glass grant, queued for review; the patient is told (at flush), once
        per grant even when concurrent requests of this PS all asked for one."""
        expires = now() + timedelta(seconds=self.b.config.break_glass_ttl)
        grant = {"_id": new_id(), "pid": pid, "ps": self.p.id_nat_ps, "profession": self.p.profession,
                 "reason": self.p.btg_reason, "created": now(), "expires": expires, "reviewed": False}
        self.access.states[pid].grant = grant

        def effect(session):
            in_force = self.storage.add_grant_once(grant, session=session)
            if in_force is None:
                self.notify("break_glass", pid, session=session)
            else:    # a concurrent request of this PS created it (and told the patient)
                self.access.states[pid].grant = in_force
        self.effects.append(effect)

    def notify(self, kind: str, pid: str, *, session=None, code: str | None = None,
               patient: dict | None = None) -> list[dict]:
        """Queue a notice to the patient and store the matching Communication(s). ``patient``:
        the Patient resource this transaction just wrote (else the DMP's state is loaded)."""
        if self.b.outbox is None:
            return []
        from .notifications import Notice
        if patient is None:
            patient = self.access.state(pid).patient
        if patient is None:
            return []
        notice = Notice(kind=kind, patient_id=pid, actor_name=self.p.name,
                        actor_profession=self.p.profession, actor_id=self.p.id_nat_ps,
                        mode=self.p.mode or "normal", when=now(), reason=self.p.btg_reason, code=code)
        comms = self.b.outbox.enqueue(notice, patient, session=session)
        for comm in comms:
            stored = self.storage.create("Communication", comm, pid=pid, rid=comm.get("id"),
                                         session=session)
            status = comm.get("status")
            self.record("create", outcome="0" if status != "not-done" else "4", patient_id=pid,
                        resource=f"Communication/{stored.id}",
                        decision=Decision(status != "not-done", f"notify-{kind}",
                                          "patient notified" if status != "not-done" else
                                          "the patient could not be told: no contact on file"))
        return comms

    def _current(self, rtype: str, rid: str) -> Stored | None:
        """The current version; a Patient comes with its decision context (one load, cached
        per process and invalidated on change: ``security/context_cache.py``)."""
        if rtype == "Patient" and self.session is None:
            doc = self.access.state(rid).doc
            return Stored.from_doc(rtype, {**doc, "res": dict(doc["res"]) if doc.get("res") else None}) \
                if doc else None
        return self.storage.read(rtype, rid, session=self.session)

    def _visible(self, rtype: str, rid: str, interaction: str, *, deleted_ok: bool = False) -> Stored:
        """Current version if the caller may see it; NotFound otherwise; Gone if deleted and seen
        (unless ``deleted_ok``: history and vread of a deleted resource answer like its history)."""
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
        if stored.deleted and not deleted_ok:
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
            target = self.storage.vread(rtype, current.id, current.vid - 1, session=self.session) or current
        return self._decide_read(rtype, target)

    def _decide_read(self, rtype: str, stored: Stored) -> Decision:
        if rtype == "Binary":
            return self._binary_decision(stored)
        return self._see(rtype, stored)

    def _binary_decision(self, stored: Stored) -> Decision:
        """A Binary is read under the decision of the DocumentReference it belongs to
        (``decision.documents.can_see_binary``); the repository only fetches that document."""
        doc_id = search.reference_id(((stored.resource or {}).get("securityContext") or {}).get("reference"),
                                     "DocumentReference")
        doc = self.storage.read("DocumentReference", doc_id, session=self.session) if doc_id else None
        decision = self.access.documents.can_see_binary(stored.pid, doc and (doc.pid, doc.deleted, doc.resource))
        if decision.permit:
            self._obligations(decision, doc.pid)
        return decision

    # ------------------------------------------------------------------ reads
    def read(self, rtype: str, rid: str) -> Stored:
        self.access.start(rtype, "read")
        stored = self._visible(rtype, rid, "read")
        self.record("read", outcome="0", patient_id=stored.pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                    decision=stored._decision, http_status=200)
        return self._view(stored)

    def vread(self, rtype: str, rid: str, vid: str) -> Stored:
        self.access.start(rtype, "vread")
        # the current decision rules old versions; a deleted resource's versions stay readable
        # as its history lists them
        current = self._visible(rtype, rid, "vread", deleted_ok=True)
        try:
            version = self.storage.vread(rtype, rid, int(vid), session=self.session) if vid.isdigit() else None
        except ValueError:
            version = None
        if version is None:
            self.record("vread", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        http_status=404)
            raise NotFound(f"Resource {rtype}/{rid}/_history/{vid} is not known")
        if version.deleted:
            self.record("vread", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}/_history/{vid}",
                        decision=current._decision, http_status=410)
            raise Gone(f"Version {vid} of {rtype}/{rid} is a deletion")
        self.record("vread", outcome="0", patient_id=current.pid,
                    resource=f"{rtype}/{rid}/_history/{vid}", decision=current._decision, http_status=200)
        version._decision = current._decision
        return self._view(version)

    def _sees(self, rtype: str, rid: str) -> bool:
        """Does the caller see this document or content now (for journal views)? Cached per request."""
        seen = self.__dict__.setdefault("_seen_docs", {})
        if (rtype, rid) not in seen:
            cur = self.storage.read(rtype, rid, session=self.session)
            seen[(rtype, rid)] = bool(cur) and self._decide_current(rtype, cur).permit
        return seen[(rtype, rid)]

    def _view(self, stored: Stored) -> Stored:
        decision = getattr(stored, "_decision", None)
        if decision and stored.resource is not None:
            stored.resource = self.access.will_see(stored.resource, decision, self._sees)
        return stored

    def history(self, rtype: str, rid: str | None, *, since: datetime | None, count: int,
                cursor: tuple | None) -> tuple[list[Stored], tuple | None, int | None]:
        """Versions newest first; (page, next cursor, total or None)."""
        self.access.start(rtype, "history" if rid is not None else "history-type")
        if rid is not None:
            current = self._visible(rtype, rid, "history", deleted_ok=True)
            page = self.storage.history(rtype, rid, since=since, after_key=cursor, limit=count + 1, session=self.session)
            total = self.storage.count_history(rtype, rid, session=self.session) if since is None else None
            self.record("history", outcome="0", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=current._decision, http_status=200)
            return self._page(page, count, total)
        # the directory is in no DMP: every version is judged below (all readable)
        pids = None if rtype in DIRECTORY else self.access.dmp.reachable_pids(set())
        pid_filter = None if pids is None else {"pid": {"$in": sorted(pids)}}
        if pids is not None and not pids:
            self.record("history", outcome="0", patient_id=None, resource=rtype, http_status=200)
            return [], None, 0
        # every version is judged until the page is full or the history ends: a page never stops
        # early without a next link (versions the caller may not see are skipped, not lost)
        out, after = [], cursor
        verdict: dict[str, bool] = {}
        size = max(count + 1, 50)
        while len(out) <= count:
            batch = self.storage.history(rtype, None, pid_filter=pid_filter, since=since, after_key=after,
                                         limit=size, session=self.session)
            if not batch:
                break
            for v in batch:
                if v.id not in verdict:
                    cur = self.storage.read(rtype, v.id, session=self.session)
                    verdict[v.id] = bool(cur) and self._decide_current(rtype, cur).permit
                if verdict[v.id]:
                    out.append(v)
            after = (batch[-1].lu, f"{batch[-1].id}/{batch[-1].vid}")
            if len(batch) < size:
                break
        for pid in sorted({v.pid for v in out if v.pid}):
            self.record("history", outcome="0", patient_id=pid, resource=rtype, http_status=200)
        if not out:
            self.record("history", outcome="0", patient_id=None, resource=rtype, http_status=200)
        return self._page(out, count, None)

    # ------------------------------------------------- system-level history
    def system_history(self, *, since: datetime | None, count: int,
                       cursor: tuple | None) -> tuple[list[Stored], tuple | None]:
        """``GET [base]/_history`` (https://hl7.org/fhir/R4/http.html#history): the type-level
        histories of every hosted type the token's scopes allow, each through :meth:`history`
        (the same decision per version), merged newest first.

        The cursor is ``(lastUpdated, "Type/id/vid")``; versions are ordered by lastUpdated
        descending, then by that key ascending, so pages neither repeat nor skip a version.
        Returns (page, next cursor or None); no total (it would take a pass over every type).
        """
        merged: list[Stored] = []
        for rtype in sorted(HOSTED):
            if not self.access.in_scope(rtype, "history-type"):     # SMART v2: beyond an instance, a search
                continue
            after = None
            if cursor is not None:
                lu, key = cursor
                ctype, _, rest = key.partition("/")
                # versions of the same instant: those of a later type, or later in the cursor's type
                after = (lu, rest if rtype == ctype else ("" if rtype > ctype else "\uffff"))
            page, _, _ = self.history(rtype, None, since=since, count=count, cursor=after)
            merged.extend(page)
        merged.sort(key=lambda v: (-v.lu.timestamp(), f"{v.resource_type}/{v.id}/{v.vid}"))
        nxt = None
        if len(merged) > count:
            merged = merged[:count]
            last = merged[-1]
            nxt = (last.lu, f"{last.resource_type}/{last.id}/{last.vid}")
        return merged, nxt


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
        ins_lookup = self.access.dmp.ins_lookup(rtype, args)
        named = named_patient_ids(rtype, args)
        guard = self.access.narrow(rtype, named, ins_lookup=ins_lookup)
        # a search naming a DMP the caller may not enter is a denial in that DMP's journal
        denied = {} if ins_lookup else self._denied_dmps(named)
        for pid, decision in denied.items():
            self.record("search", outcome="4", patient_id=pid, resource=rtype, query=query_string,
                        decision=decision, http_status=200)
        # no entry asked: the total is the answer (CONTRACT.md "REST behaviour": whenever _count=0)
        counted = req.summary == "count" or req.count == 0
        if guard is None:
            page.total = 0 if req.total != "none" or counted else None
            if not denied:
                self.record("search", outcome="0", patient_id=None, resource=rtype, query=query_string,
                            decision=Decision(False, "search-scope", "nothing visible to this caller"),
                            http_status=200)
            return page
        base = merge_filters(guard, req.mongo_filter())     # the guard first: pid fails fast
        if counted:
            docs = []
        else:
            flt = merge_filters(base, search.keyset_filter(req)) if req.cursor else base
            docs = self.storage.find_docs(rtype, flt, req.mongo_sort(), req.count + 1, session=self.session)
        if req.total != "none" or counted:
            # a first page that holds everything is its own total: no second pass over the data;
            # otherwise the matches are counted only when asked (_total=accurate|estimate,
            # _summary=count): a count walks every match, so a large DMP would pay for it on
            # every page (issue 13)
            if not req.cursor and len(docs) <= req.count and not counted:
                page.total = len(docs)
            elif req.explicit_total or counted:
                page.total = self.storage.count(rtype, base, session=self.session)
        if docs:
            if len(docs) > req.count:
                docs = docs[:req.count]
                page.next_cursor = search.cursor_after(req, docs[-1])
            extra = {"ins_lookup": True} if ins_lookup else None
            for doc in docs:
                stored = Stored.from_doc(rtype, doc)
                decision = self._see(rtype, stored, extra=extra)
                if not decision.permit:
                    log.warning("search guard let %s/%s through; dropped by can_see (%s)", rtype,
                                stored.id, decision.rule)
                    continue
                stored.resource = self.access.will_see(stored.resource, decision, self._sees)
                page.matches.append(stored)
            page.included = self._includes(req, docs, page.matches)
        touched = sorted({s.pid for s in page.matches + page.included if s.pid})
        for pid in touched or ([] if denied else [None]):
            self.record("search", outcome="0", patient_id=pid, resource=rtype, query=query_string,
                        decision=Decision(True, "search", "filtered by the access decision"),
                        http_status=200)
        return page

    def _denied_dmps(self, pids: set[str]) -> dict[str, Decision]:
        """The existing DMPs among ``pids`` the caller may not enter, with the denial."""
        self.access.load(pids)
        out = {}
        for pid in sorted(pids):
            st = self.access.states[pid]
            if st.known:
                decision = self.access.dmp_access(st)
                if not decision.permit:
                    out[pid] = decision
        return out

    def _includes(self, req, docs: list[dict], matches: list[Stored]) -> list[Stored]:
        """_include / _revinclude, each included resource through the same decision."""
        out, seen = [], {(s.resource_type, s.id) for s in matches}
        visible_docs = [d for d in docs if (req.resource_type, d["_id"]) in seen]

        def admit(rtype: str, stored: Stored) -> None:
            if (rtype, stored.id) in seen:
                return
            decision = self._decide_read(rtype, stored)
            if decision.permit:
                stored.resource = self.access.will_see(stored.resource, decision, self._sees)
                out.append(stored)
                seen.add((rtype, stored.id))

        for inc in req.include or []:
            targets: dict[str, list] = {}
            for doc in visible_docs:
                for t, i in search.include_targets(inc, doc):
                    if t in HOSTED:
                        targets.setdefault(t, []).append(i)
            for t, ids in targets.items():
                for stored in self.storage.read_many(t, sorted(set(ids)), session=self.session):
                    admit(t, stored)
        for inc in req.revinclude or []:
            if inc.source_type not in HOSTED or not matches:
                continue
            guard = self.access.narrow(
                inc.source_type, {s.id for s in matches} if req.resource_type == "Patient" else set())
            if guard is None:
                continue
            flt = search.revinclude_filter(inc, req.resource_type, [s.id for s in matches])
            for stored in self.storage.find(inc.source_type, merge_filters(guard, flt),
                                            [("_id", 1)], self.b.config.max_page_size, session=self.session):
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
    def _writing(self, fn, *, interaction: str = "transaction", rtype: str | None = None,
                 pid: str | None = None):
        """Run ``fn(session)`` in a transaction (pymongo ``with_transaction``: lost races and
        unknown commit results are retried; If-Match conflicts are not).

        The AuditEvents recorded by ``fn`` are appended inside the same transaction: a write is
        never committed without its journal entry (fail closed), and a rolled-back attempt leaves
        no entry. Reads inside ``fn`` see its writes. When ``fn`` fails, the denials it recorded
        stay (journaled at the end of the request), its successes go with the rollback; a failure
        it did not journal is journaled then, in ``pid``'s journal when given.
        """
        mark = len(self.records)

        def attempt(session):
            del self.records[mark:]            # a retried attempt starts clean
            self.pending_inserts.clear()
            self.access.states.clear()
            self.session = self.access.session = session
            result = fn(session)
            written = {r.patient_id for r in self.records[mark:] if r.patient_id}
            self._dirty_pids.update(written)
            if rtype not in CONTEXT_FREE:
                self._stale_pids.update(written)
            if len(self.records) > mark:       # the inserts not sent yet go with the journal's
                self.b.audit_log.append(self._events(self.records[mark:]), session=session,
                                        pending=self.pending_inserts)
            if self.pending_inserts:           # every write goes with the transaction, never lost
                self.storage.insert_docs(self.pending_inserts, session=session)
                self.pending_inserts.clear()
            return result

        try:
            result = self.storage.run_transaction(attempt)
            del self.records[mark:]            # committed with the write
            self._sweep_destroyed(set(self._dirty_pids))
            self._forget_contexts()   # committed: this process forgets at once, others by the stream
            return result
        except PyMongoError as exc:
            del self.records[mark:]
            if not is_write_conflict(exc):
                raise
            self.record(interaction, outcome="4", patient_id=pid, resource=rtype, http_status=409)
            raise Conflict("the record is being changed by another request; retry",
                           code="transient", headers={"Retry-After": "1"}) from None
        except FhirError as exc:
            kept = [r for r in self.records[mark:] if r.outcome != "0"]
            del self.records[mark:]
            self.records += kept
            if not kept:
                self._record_failure(interaction, exc, pid, rtype)
            raise
        finally:
            self.session = self.access.session = None
            self.access.states.clear()

    def _record_failure(self, interaction: str, exc: FhirError, pid: str | None, resource: str | None) -> None:
        self.record(interaction, outcome="4" if exc.status < 500 else "8", patient_id=pid, resource=resource,
                    http_status=exc.status, decision=Decision(False, "error", exc.diagnostics[:200]))

    @contextmanager
    def _refusals_journaled(self, interaction: str, resource: str):
        """Every refused write is in the journal (issue 18): a refusal raised in the block that
        nothing journaled yet (If-Match, a move to another record, a patch that does not apply, a
        failed transaction) is journaled here, in the journal of the DMP the write names once the
        block has set ``target["pid"]``, seen by the caller or not (the answer stays the same)."""
        mark, target = len(self.records), {"pid": None}
        try:
            yield target
        except FhirError as exc:
            if all(r.outcome == "0" for r in self.records[mark:]):
                self._record_failure(interaction, exc, target["pid"], resource)
            raise

    def journal_named(self, interaction: str, named: Stored | None, pid: str | None, decision: Decision,
                      http_status: int) -> None:
        """A refused write naming a resource of another DMP than its own (``X-Security-Context``,
        ``relatesTo``, ``attachment.url``): that DMP's patient sees the attempt in their journal
        too, whatever the caller may see of it (the answer stays that of a missing one)."""
        if named is not None and named.pid and named.pid != pid:
            self.record(interaction, outcome="4", patient_id=named.pid, decision=decision,
                        resource=f"{named.resource_type}/{named.id}", http_status=http_status)

    def _deny_write(self, interaction: str, rtype: str, rid: str | None, pid: str | None,
                    decision: Decision) -> FhirError:
        self.record(interaction, outcome="4", patient_id=pid, resource=f"{rtype}/{rid}" if rid else rtype,
                    decision=decision, http_status=403)
        if self.access.dmp.refusal_looks_missing(pid, decision):
            if rtype == "Patient" and rid:
                return not_found("Patient", rid)
            if rtype == "Binary":
                return Unprocessable("the securityContext names no document or DMP known to the caller",
                                     expression="Binary.securityContext")
            return Unprocessable(f"Patient/{pid} is not known", expression=f"{rtype}.subject"
                                 if rtype == "DocumentReference" else f"{rtype}.patient")
        return Forbidden(f"not allowed: {decision.reason}")

    def create(self, rtype: str, resource: dict, *, session=None, rid: str | None = None,
               content=None) -> Stored:
        """Create (server id). ``session`` given = inside a transaction Bundle."""
        self.access.start(rtype, "create")
        with self._refusals_journaled("create", rtype) as target:
            return self._create(rtype, resource, target, session=session, rid=rid, content=content)

    def _create(self, rtype: str, resource: dict, target: dict, *, session, rid: str | None, content) -> Stored:
        pid = search.patient_id_of(rtype, resource)
        context = None
        if rtype == "Binary":
            pid, context = self._binary_context(resource)
        decision = self.access.can_write("create", rtype, resource, None, pid, context=context)
        if not decision.permit:
            raise self._deny_write("create", rtype, None, pid, decision)
        target["pid"] = pid
        if decision.obligations.get("patient_code"):
            self._use_access_code(pid)
        resource = self._prepare(rtype, resource, None, pid)

        # in its own transaction, a server id and no unique index (nothing to refuse it): the
        # version waits to go with the journal's documents, one round trip (issue 13)
        defer = session is None and rid is None and rtype not in UNIQUE_INDEXES

        def write(s):
            rid_ = rid or new_id()
            resource_, extra = self._store_content(rtype, rid_, 1, resource, pid, s, content)
            try:
                stored = self.storage.create(rtype, resource_, pid=pid, rid=rid_, session=s, extra=extra,
                                             pending=self.pending_inserts, defer=defer)
            except DuplicateValue:
                raise duplicate_dmp(resource) from None
            self._after_write("create", rtype, stored, None, decision, s)
            self.record("create", outcome="0", patient_id=stored.pid,
                        resource=f"{rtype}/{stored.id}/_history/1", decision=decision, http_status=201)
            return stored

        return write(session) if session is not None else \
            self._writing(write, interaction="create", rtype=rtype, pid=pid)

    def update(self, rtype: str, rid: str, resource: dict, *, if_match: str | None = None,
               session=None, interaction: str = "update") -> tuple[Stored, bool]:
        """Update (or create with the client's id when absent). Returns (stored, created)."""
        self.access.start(rtype, "update")
        with self._refusals_journaled(interaction, f"{rtype}/{rid}") as target:
            return self._update(rtype, rid, resource, target, if_match=if_match, session=session,
                                interaction=interaction)

    def _update(self, rtype: str, rid: str, resource: dict, target: dict, *, if_match: str | None, session,
                interaction: str) -> tuple[Stored, bool]:
        current = self.storage.read(rtype, rid, session=session or self.session)
        if current is not None:
            target["pid"] = current.pid     # a refusal of this write is in that DMP's journal
        if current is not None and current.deleted and self.p.kind != ADMIN \
                and not self._decide_current(rtype, current).permit:
            current = None          # a deleted resource the caller may not see: as if it never existed
        if current is None and not self.access.writes.can_create_with_id(rtype).permit:
            # update-as-create (a client-chosen id) is the administrator's (fhir-dmp load): for anyone
            # else an id that does not exist answers like one they may not see (CONTRACT.md "REST")
            self.record(interaction, outcome="4", patient_id=target["pid"], resource=f"{rtype}/{rid}",
                        http_status=404)
            raise not_found(rtype, rid)
        if current is None or current.deleted:
            if if_match:
                raise PreconditionFailed(f"{rtype}/{rid} does not exist; If-Match cannot hold")
            if current is None:
                return self.create(rtype, resource, session=session, rid=rid), True
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
        resource = self._prepare(rtype, resource, old, pid, interaction)

        def write(s):
            vid = expected + 1
            resource_, extra = self._store_content(rtype, rid, vid, resource, pid, s)
            try:
                stored = self.storage.update(rtype, rid, resource_, pid=pid, expected_vid=expected, session=s,
                                             extra=extra, pending=self.pending_inserts)
            except VersionConflict as exc:
                raise PreconditionFailed(f"version conflict: {rtype}/{rid} is at version {exc.current_vid}") \
                    if if_match else Conflict(f"concurrent update of {rtype}/{rid}; retry") from None
            except DuplicateValue:
                raise duplicate_dmp(resource) from None
            self._after_write(interaction, rtype, stored, old, decision, s)
            if rtype == "Patient":
                self._after_patient_write(old, resource, stored, s)
            self.record(interaction, outcome="0", patient_id=pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                        decision=decision, http_status=200)
            return stored

        stored = write(session) if session is not None else \
            self._writing(write, interaction=interaction, rtype=rtype, pid=pid)
        return stored, False

    def patch(self, rtype: str, rid: str, operations: list, *, if_match: str | None = None,
              validate=None, session=None) -> Stored:
        """RFC 6902 JSON Patch, then the same path as update."""
        self.access.start(rtype, "patch")
        current = self._visible(rtype, rid, "patch")
        with self._refusals_journaled("patch", f"{rtype}/{rid}") as target:
            target["pid"] = current.pid
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
            # answered like deleting nothing (CONTRACT.md "REST behaviour"); journaled as a denial
            self.record("delete", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=seen, http_status=204)
            return None
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

        return write(session) if session is not None else \
            self._writing(write, interaction="delete", rtype=rtype, pid=current.pid)

    # ------------------------------------------------------------ lifecycle
    def destroy_dmp(self, pid: str, *, reason: str | None = None) -> None:
        """Destroy a DMP (CONTRACT.md "Lifecycle of a DMP"): afterwards it never existed.

        The patient or the administrator (``decision.dmp_access.can_destroy``). One transaction removes
        everything the database holds about it (``lifecycle.purge_dmp``: data key first, then
        content, resources, notices, access codes and its journal) and writes the one
        system-journal entry that stays, without personal data; if any part fails nothing
        changes (fail closed). The INS is free again.
        """
        from . import lifecycle
        self.access.start("Patient", "delete")
        st = self.access.state(pid)
        decision = self.access.dmp.can_destroy(st)
        if not decision.permit:
            if not st.known or not self.access.dmp_access(st).permit:
                # answered as missing, but a DMP that exists sees the attempt in its journal
                self.record("delete", outcome="4", patient_id=pid if st.known else None,
                            resource=f"Patient/{pid}", decision=decision, http_status=404)
                raise not_found("Patient", pid)
            raise self._deny_write("delete", "Patient", pid, pid, decision)
        actor = "admin" if self.p.kind == ADMIN else "patient"
        event = lifecycle.destroy_event(actor, now(), source_observer=self.b.config.fhir_base,
                                        reason=reason or f"asked by the {actor}")
        # nothing about this DMP may be journaled after its chain is gone
        self.records = [r for r in self.records if r.patient_id != pid]

        def write(s):
            lifecycle.purge_dmp(self.storage, pid, session=s)
            self.b.audit_log.append([event], session=s)

        self._writing(write, interaction="delete", rtype="Patient")
        # a write decided before the destroy but committed after its snapshot: swept here, or by
        # that writer itself if it commits after this sweep (_sweep_destroyed)
        self.storage.run_transaction(lambda s: lifecycle.purge_dmp(self.storage, pid, session=s))
        self.b.crypto.forget(pid)       # the key is gone from the database: drop this process's copy
        self.access.states.pop(pid, None)
        self._stale_pids.add(pid)
        self._forget_contexts()

    def _sweep_destroyed(self, pids) -> None:
        """After a commit into DMPs: one destroyed meanwhile is purged again, so nothing written
        by a request that raced its destroy survives it (CONTRACT.md "Lifecycle of a DMP")."""
        from . import lifecycle
        for pid in sorted(pids):
            if lifecycle.was_destroyed(self.storage, pid):
                log.warning("a write raced the destroy of a DMP; purged again")
                self.storage.run_transaction(
                    lambda s, pid=pid: lifecycle.purge_dmp(self.storage, pid, session=s))

    def send_access_code(self, pid: str) -> list[dict]:
        """``Patient/$access-code``: a one-time code to the patient (email/SMS + Communication).

        Returns the Communications written (the caller says how the code went out, never it).
        """
        from . import access_codes
        self.access.start("Patient", "read")
        st = self.access.state(pid)
        decision = self.access.dmp.can_ask_access_code(st)
        if not decision.permit:
            self.record("operation", outcome="4", patient_id=pid if st.exists else None,
                        resource=f"Patient/{pid}", decision=decision, http_status=404)
            raise not_found("Patient", pid)
        code = access_codes.issue(self.storage, pid, self.p.id_nat_ps)
        written: list[dict] = []

        def write(s):
            written.extend(self.notify("access_code", pid, session=s, code=code))
            self.record("operation", outcome="0", patient_id=pid, resource=f"Patient/{pid}",
                        decision=decision, http_status=200)
        self._writing(write, interaction="operation", rtype="Patient")
        return written

    def _use_access_code(self, pid: str) -> None:
        """The patient's one-time code must come with the PS's first authorization (403 else)."""
        from . import access_codes
        refused = access_codes.consume(self.storage, pid, self.p.id_nat_ps, self.info.access_code)
        if refused:
            decision = Decision(False, "access-code", refused)
            self.record("create", outcome="4", patient_id=pid, resource="Consent", decision=decision,
                        http_status=403)
            raise Forbidden(f"not allowed: {refused}")

    def close_dmp(self, pid: str) -> Stored:
        """Close a DMP (``active: false``): the patient, a legal representative or the admin."""
        return self._set_active(pid, False)

    def reopen_dmp(self, pid: str) -> Stored:
        """Reopen a closed DMP within its retention."""
        return self._set_active(pid, True)

    def representatives(self, pid: str) -> list[Stored]:
        """The DMP's legal representatives the caller may see (RelatedPerson?patient=pid)."""
        return self.search("RelatedPerson", [("patient", pid), ("_count", str(self.b.config.max_page_size))]).matches

    def add_representative(self, pid: str, relationship: str, family: str, given: str | None = None, *,
                           start: str | None = None, end: str | None = None) -> Stored:
        """Register a parent (``PRN``) or guardian (``GUARD``) of the patient (same decision as POST)."""
        from .profiles import validate
        resource = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{pid}"},
                    "relationship": [{"coding": [{"system": ROLE_CODE_SYSTEM, "code": relationship}]}],
                    "name": [{"family": family, **({"given": [given]} if given else {})}]}
        if start or end:
            resource["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        return self.create("RelatedPerson", validate(resource, resource_type="RelatedPerson"))

    def end_representative(self, rp_id: str) -> Stored:
        """End a legal representative (``active: false``): their token stops working at once."""
        return self.patch("RelatedPerson", rp_id, [{"op": "add", "path": "/active", "value": False}])

    def _set_active(self, pid: str, active: bool) -> Stored:
        return self.patch("Patient", pid, [{"op": "add", "path": "/active", "value": active}])

    def _after_patient_write(self, old: dict | None, new: dict | None, stored: Stored, session) -> None:
        """Closing stamps ``closed_at`` (retention counts from it); reopening removes it."""
        from . import lifecycle
        change = lifecycle.active_change(old, new)
        if change == "close":
            lifecycle.mark_closed(self.storage, stored.id, stored.lu, session=session)
        elif change == "reopen":
            lifecycle.mark_reopened(self.storage, stored.id, session=session)

    # -------------------------------------------------------- conditional ops
    def find_matches(self, rtype: str, criteria: list[tuple[str, str]], interaction: str) -> list[Stored]:
        """Guarded search for conditional create/update/delete (only what the caller may see): at
        most one match, else 412, in the journal of each DMP matched
        (https://hl7.org/fhir/R4/http.html#cond-update)."""
        matches = self.search(rtype, [(k, v) for k, v in criteria] + [("_count", "2")]).matches
        if len(matches) > 1:
            exc = PreconditionFailed(f"the {interaction} criteria match several resources")
            for pid in sorted({m.pid for m in matches if m.pid}) or [None]:
                self._record_failure(interaction, exc, pid, rtype)
            raise exc
        return matches

    # ------------------------------------------------------- write internals
    def _binary_context(self, resource: dict) -> tuple[str | None, dict | None]:
        """(DMP, DocumentReference) a new Binary's securityContext names. A document the caller may
        not see counts as missing (CONTRACT.md "REST behaviour": X-Security-Context)."""
        ctx = ((resource.get("securityContext") or {}).get("reference"))
        pid = search.reference_id(ctx, "Patient")
        if pid:
            return pid, None
        doc_id = search.reference_id(ctx, "DocumentReference")
        if doc_id:
            doc = self.storage.read("DocumentReference", doc_id, session=self.session)
            seen = self._decide_read("DocumentReference", doc) if doc and not doc.deleted else None
            if seen and seen.permit:
                return doc.pid, doc.resource
            if seen:    # refused as if missing (no DMP, no document), and in that document's journal
                self.journal_named("create", doc, None, seen, 422)
        return None, None

    def _prepare(self, rtype: str, resource: dict, old: dict | None, pid: str | None,
                 interaction: str = "create") -> dict:
        """Server-side rules on what is written (author, qualified INS, content checks)."""
        from .documents.pipeline import prepare_document
        if rtype == "DocumentReference":
            return prepare_document(self, resource, old, pid, interaction)
        return resource

    def _store_content(self, rtype: str, rid: str, vid: int, resource: dict, pid: str | None, session,
                       content=None) -> tuple[dict, dict | None]:
        """Move inline content to encrypted blobs before the metadata is written; (the resource to
        store, fields stored beside it: a Binary's content size and hash)."""
        from .documents.pipeline import store_binary_content, store_inline_attachments
        if rtype == "Binary":
            return store_binary_content(self, rid, vid, resource, pid, session, stream=content)
        if rtype == "DocumentReference":
            return store_inline_attachments(self, rid, resource, pid, session), None
        return resource, None

    def _after_write(self, interaction: str, rtype: str, stored: Stored, old: dict | None,
                     decision: Decision, session) -> None:
        from .documents.pipeline import after_document_write
        if decision.obligations.get("authorize_creator"):
            self._authorize_creator(stored, session)
        if decision.obligations.get("notify") == "first_access":
            # a new DMP: the Patient just written is the one to tell, no need to read it back
            self.notify("first_access", stored.pid, session=session,
                        patient=stored.resource if rtype == "Patient" and not stored.deleted else None)
        if rtype == "DocumentReference":
            after_document_write(self, stored, old, session)
        self.access.states.pop(stored.pid, None)
        self._dirty_pids.add(stored.pid)

    def _forget_contexts(self) -> None:
        """Drop the cached decision context of the patients whose decision inputs this request
        wrote (the same collections the cache's change stream watches), and the cached documents
        (``doc_cache.py``) of every patient it wrote."""
        cache = self.b.policy.context_cache
        if cache is not None:
            for pid in self._stale_pids:
                cache.invalidate(pid)
        documents = self.storage.doc_cache
        if documents is not None:
            for pid in self._dirty_pids | self._stale_pids:
                documents.invalidate(pid)
        self._stale_pids.clear()
        self._dirty_pids.clear()

    def _authorize_creator(self, patient: Stored, session) -> None:
        """A PS who opens a DMP is authorized on it (CONTRACT.md)."""
        consent = dmp.patient_consent(patient.id, "permit", purpose="TREAT", actor=self.p.reference(),
                                      at=patient.resource["meta"]["lastUpdated"],
                                      verified_with=self.p.reference())
        stored = self.storage.create("Consent", consent, pid=patient.id, session=session)
        self.record("create", outcome="0", patient_id=patient.id, resource=f"Consent/{stored.id}/_history/1",
                    decision=Decision(True, "ps-creates-dmp", "creator authorized"), http_status=201)


def record_notice_outcome(backend: Backend, cid: str, status: str, reason: str | None) -> None:
    """The server's own write of a notice's outcome on its Communication (``completed`` with
    ``sent``, or ``not-done`` with the reason), in one transaction through ``with_transaction``;
    a concurrent change of the Communication is re-read and tried again (a few times)."""
    storage = backend.storage

    def write(session) -> bool:
        current = storage.read("Communication", cid, session=session)
        if current is None or current.deleted or current.resource.get("status") == status:
            return True
        res = dict(current.resource, status=status)
        if status == "completed":
            res["sent"] = instant(now())
        if reason and status == "not-done":
            res["statusReason"] = {"text": reason[:500]}
        try:
            storage.update("Communication", cid, res, pid=current.pid, expected_vid=current.vid, session=session)
        except VersionConflict:
            return False
        return True

    for _ in range(5):
        if storage.run_transaction(write):
            return


def duplicate_dmp(patient: dict) -> Conflict:
    """One DMP per INS (CONTRACT.md "The DMP in FHIR terms"): 409 ``duplicate``, naming the way to
    the existing DMP (the exact-INS lookup, then the first-access attestation), never its id."""
    ins = next((f"{i['system']}|{i['value']}" for i in patient.get("identifier") or []
                if isinstance(i, dict) and i.get("system") in INS_SYSTEMS), "<INS>")
    return Conflict(f"a DMP already exists for this INS (open or closed): find it with GET "
                    f"Patient?identifier={ins}, then attest the patient's agreement with a Consent "
                    f"(provision.type permit, your idNatPs as actor, verification.verified true)",
                    code="duplicate", expression="Patient.identifier")


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
