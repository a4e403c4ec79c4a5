"""Reads through the guard: read, vread, history (instance, type, system), search with its
includes, and Binary content.

    start (scope)  ->  storage query narrowed by the decision  ->
    can_see per resource (safety net)  ->  decrypt only after permit  ->
    a journal record per DMP touched (success or denial)

A denied read raises exactly the NotFound of a missing resource (``errors.not_found``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from .. import search
from ..http.errors import Gone, NotFound, not_found
from ..security.decision import DIRECTORY, Decision
from ..security.crypto import ContentUnavailable
from ..storage import RESOURCE_TYPES, Stored, merge_filters

log = logging.getLogger(__name__)

HOSTED = RESOURCE_TYPES     # the resource types served (storage/core.py holds the list)


@dataclass
class SearchPage:
    """One page of a guarded search: matches, includes, total (None = not counted), next cursor."""

    request: "search.SearchRequest"
    matches: list = field(default_factory=list)       # [Stored]
    included: list = field(default_factory=list)      # [Stored]
    total: int | None = None
    next_cursor: str | None = None


def named_patient_ids(rtype: str, args: list[tuple[str, str]]) -> set[str]:
    """Patient ids that a search names explicitly (patient, subject, Patient _id)."""
    names = {"patient", "subject", "patient:Patient", "subject:Patient"}
    out = set()
    for key, value in args:
        if key in names or (rtype == "Patient" and key == "_id"):
            for v in value.split(","):
                out.add(search.reference_id(v, "Patient") or v.strip())
    return {p for p in out if p and "/" not in p}


class Reads:
    """The read side of :class:`~fhir_dmp.guard.repository.GuardedRepository`.

    Uses what the repository holds: ``p`` (the principal), ``access`` (its RequestAccess),
    ``storage``, ``blobs``, ``config``, ``journal``, ``session`` and ``record``; a permit's
    obligations go to ``obligations`` (:class:`~fhir_dmp.guard.dmp.DmpOperations`).
    """

    _seen_docs: dict     # (type, id) -> does the caller see it now (journal views), per request

    # ------------------------------------------------------------ decisions
    def _see(self, rtype: str, stored: Stored, *, extra: dict | None = None) -> Decision:
        decision = self.access.can_see(rtype, stored.resource or {}, stored.pid, extra=extra)
        if decision.permit:
            self.obligations(decision, stored.pid)
        return decision

    def _current(self, rtype: str, rid: str) -> Stored | None:
        """The current version; a Patient comes with its decision context (one load, cached
        per process and invalidated on change: ``security/context_cache.py``)."""
        if rtype == "Patient" and self.session is None:
            doc = self.access.state(rid).doc
            return Stored.from_doc(rtype, {**doc, "res": dict(doc["res"]) if doc.get("res") else None}) \
                if doc else None
        return self.storage.read(rtype, rid, session=self.session)

    def visible(self, rtype: str, rid: str, interaction: str, *, deleted_ok: bool = False) -> Stored:
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
        decision = self.decide_current(rtype, stored)
        if not decision.permit:
            if stored.from_memory:
                # the database round trip a missing id costs, so that a denial read from the
                # document cache takes the time of a miss too (DESIGN.md "No leaks")
                self.storage.read(rtype, rid, session=self.session, memory=False)
            self.record(interaction, outcome="4", patient_id=stored.pid, resource=f"{rtype}/{rid}",
                        decision=decision, http_status=404)
            raise not_found(rtype, rid)
        if stored.deleted and not deleted_ok:
            self.record(interaction, outcome="4", patient_id=stored.pid, resource=f"{rtype}/{rid}",
                        decision=decision, http_status=410)
            raise Gone(f"Resource {rtype}/{rid} was deleted", headers={"ETag": f'W/"{stored.vid}"'})
        stored._decision = decision
        return stored

    def decide_current(self, rtype: str, current: Stored) -> Decision:
        """The read decision on a resource's current state; a deleted one is judged on its last
        version with content (so a 410 is only told to those who could see it)."""
        target = current
        if current.deleted and current.vid > 1:
            target = self.storage.vread(rtype, current.id, current.vid - 1, session=self.session) or current
        return self.decide_read(rtype, target)

    def decide_read(self, rtype: str, stored: Stored) -> Decision:
        if rtype == "Binary":
            return self._binary_decision(stored)
        return self._see(rtype, stored)

    def _binary_decision(self, stored: Stored) -> Decision:
        """A Binary is read under the decision of the DocumentReference it belongs to
        (``consent.can_see_binary``); the repository only fetches that document."""
        doc_id = search.reference_id(((stored.resource or {}).get("securityContext") or {}).get("reference"),
                                     "DocumentReference")
        doc = self.storage.read("DocumentReference", doc_id, session=self.session) if doc_id else None
        decision = self.access.documents.can_see_binary(stored.pid, doc and (doc.pid, doc.deleted, doc.resource))
        if decision.permit:
            self.obligations(decision, doc.pid)
        return decision

    # ------------------------------------------------------------------ reads
    def read(self, rtype: str, rid: str) -> Stored:
        self.access.start(rtype, "read")
        stored = self.visible(rtype, rid, "read")
        self.record("read", outcome="0", patient_id=stored.pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                    decision=stored._decision, http_status=200)
        return self._view(stored)

    def vread(self, rtype: str, rid: str, vid: str) -> Stored:
        self.access.start(rtype, "vread")
        # the current decision rules old versions; a deleted resource's versions stay readable
        # as its history lists them
        current = self.visible(rtype, rid, "vread", deleted_ok=True)
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
        seen = self._seen_docs
        if (rtype, rid) not in seen:
            cur = self.storage.read(rtype, rid, session=self.session)
            seen[(rtype, rid)] = bool(cur) and self.decide_current(rtype, cur).permit
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
            current = self.visible(rtype, rid, "history", deleted_ok=True)
            page = self.storage.history(rtype, rid, since=since, after_key=cursor, limit=count + 1,
                                        session=self.session)
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
                    verdict[v.id] = bool(cur) and self.decide_current(rtype, cur).permit
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
        cfg = self.config
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
        with self.storage.journal_scope():   # the page and its count: one state of the journal, read once
            if counted:
                docs = []
            else:
                flt = merge_filters(base, search.keyset_filter(req)) if req.cursor else base
                docs = self.storage.find_docs(rtype, flt, req.mongo_sort(), req.count + 1, session=self.session)
            if req.total != "none" or counted:
                # a first page that holds everything is its own total: no second pass over the data;
                # otherwise the matches are counted only when asked (_total=accurate|estimate,
                # _summary=count): a count walks every match, so a large DMP would pay for it on
                # every page
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
                decision = self.access.entry(st)[2]     # the request's entry decision (taken once)
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
            decision = self.decide_read(rtype, stored)
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
                                            [("_id", 1)], self.config.max_page_size, session=self.session):
                admit(inc.source_type, stored)
        return out

    # ----------------------------------------------------------------- Binary
    def binary_content(self, stored: Stored):
        """Decrypting iterator over a visible Binary's content (decision already taken by read).

        Content that cannot be opened (shredded data key, missing chunks) turns the journaled
        read into the 404 the caller gets.
        """
        try:
            return self.blobs.open(stored.pid, stored.id, stored.vid)
        except ContentUnavailable:
            self.journal.content_unavailable(stored.id)
            raise

