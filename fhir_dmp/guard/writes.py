"""Writes through the guard: create, update (and update-as-create), patch, delete, and the
matches of conditional operations.

Each write is decided (``RequestAccess.can_write``), prepared (documents go through the
:class:`~fhir_dmp.documents.pipeline.DocumentPipeline`), then stored in the request's unit of
work with its journal entry; every refusal is journaled too, in the DMP the write names.
"""
from __future__ import annotations

import jsonpatch

from .. import search
from ..http.errors import BadRequest, Conflict, FhirError, Forbidden, PreconditionFailed, Unprocessable, not_found
from ..profiles import dmp
from ..profiles.ins import INS_SYSTEMS
from ..security.decision import Decision
from ..security.principal import ADMIN
from ..storage import UNIQUE_INDEXES, DuplicateValue, Stored, VersionConflict, new_id
from . import lifecycle
from .reads import HOSTED


class Writes:
    """The write side of :class:`~fhir_dmp.guard.repository.GuardedRepository`.

    Uses what the repository holds (``p``, ``access``, ``storage``, ``journal``, ``work``,
    ``documents``, ``session``, ``record``, ``transaction``), its reads (``visible``,
    ``decide_current``, ``decide_read``, ``search``) and its DMP operations (``notify``,
    ``use_access_code``).
    """

    def deny_write(self, interaction: str, rtype: str, rid: str | None, pid: str | None,
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
        with self.journal.refusals_journaled("create", rtype) as target:
            return self._create(rtype, resource, target, session=session, rid=rid, content=content)

    def _create(self, rtype: str, resource: dict, target: dict, *, session, rid: str | None, content) -> Stored:
        pid = search.patient_id_of(rtype, resource)
        context = None
        if rtype == "Binary":
            pid, context = self._binary_context(resource)
        decision = self.access.can_write("create", rtype, resource, None, pid, context=context)
        if not decision.permit:
            raise self.deny_write("create", rtype, None, pid, decision)
        target["pid"] = pid
        if decision.obligations.get("patient_code"):
            self.use_access_code(pid)
        resource = self._prepare(rtype, resource, None, pid)

        # in its own transaction, a server id and no unique index (nothing to refuse it): the
        # version waits to go with the journal's documents, one round trip
        defer = session is None and rid is None and rtype not in UNIQUE_INDEXES

        def write(s):
            rid_ = rid or new_id()
            resource_, extra = self._store_content(rtype, rid_, 1, resource, pid, s, content)
            try:
                stored = self.storage.create(rtype, resource_, pid=pid, rid=rid_, session=s, extra=extra,
                                             pending=self.work.pending_inserts, defer=defer)
            except DuplicateValue:
                raise duplicate_dmp(resource) from None
            self._after_write("create", rtype, stored, None, decision, s, alone=session is None)
            self.record("create", outcome="0", patient_id=stored.pid,
                        resource=f"{rtype}/{stored.id}/_history/1", decision=decision, http_status=201)
            return stored

        return write(session) if session is not None else \
            self.transaction(write, interaction="create", rtype=rtype, pid=pid)

    def update(self, rtype: str, rid: str, resource: dict, *, if_match: str | None = None,
               session=None, interaction: str = "update") -> tuple[Stored, bool]:
        """Update (or create with the client's id when absent). Returns (stored, created)."""
        self.access.start(rtype, "update")
        with self.journal.refusals_journaled(interaction, f"{rtype}/{rid}") as target:
            return self._update(rtype, rid, resource, target, if_match=if_match, session=session,
                                interaction=interaction)

    def _update(self, rtype: str, rid: str, resource: dict, target: dict, *, if_match: str | None, session,
                interaction: str) -> tuple[Stored, bool]:
        current = self.storage.read(rtype, rid, session=session or self.session)
        if current is not None:
            target["pid"] = current.pid     # a refusal of this write is in that DMP's journal
        if current is not None and current.deleted and self.p.kind != ADMIN \
                and not self.decide_current(rtype, current).permit:
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
            seen = self.decide_read(rtype, current)
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
            raise self.deny_write(interaction, rtype, rid, pid, decision)
        expected = _expected_version(if_match, current)
        resource = self._prepare(rtype, resource, old, pid, interaction)

        def write(s):
            vid = expected + 1
            resource_, extra = self._store_content(rtype, rid, vid, resource, pid, s)
            try:
                stored = self.storage.update(rtype, rid, resource_, pid=pid, expected_vid=expected, session=s,
                                             extra=extra, pending=self.work.pending_inserts)
            except VersionConflict as exc:
                raise PreconditionFailed(f"version conflict: {rtype}/{rid} is at version {exc.current_vid}") \
                    if if_match else Conflict(f"concurrent update of {rtype}/{rid}; retry") from None
            except DuplicateValue:
                raise duplicate_dmp(resource) from None
            self._after_write(interaction, rtype, stored, old, decision, s)
            if rtype == "Patient":
                lifecycle.stamp_active_change(self.storage, old, resource, stored, session=s)
            self.record(interaction, outcome="0", patient_id=pid, resource=f"{rtype}/{rid}/_history/{stored.vid}",
                        decision=decision, http_status=200)
            return stored

        stored = write(session) if session is not None else \
            self.transaction(write, interaction=interaction, rtype=rtype, pid=pid)
        return stored, False

    def patch(self, rtype: str, rid: str, operations: list, *, if_match: str | None = None,
              validate=None, session=None) -> Stored:
        """RFC 6902 JSON Patch, then the same path as update."""
        self.access.start(rtype, "patch")
        current = self.visible(rtype, rid, "patch")
        with self.journal.refusals_journaled("patch", f"{rtype}/{rid}") as target:
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
        seen = self.decide_read(rtype, current)
        if not seen.permit:
            # answered like deleting nothing (CONTRACT.md "REST behaviour"); journaled as a denial
            self.record("delete", outcome="4", patient_id=current.pid, resource=f"{rtype}/{rid}",
                        decision=seen, http_status=204)
            return None
        decision = self.access.can_write("delete", rtype, None, current.resource, current.pid)
        if not decision.permit:
            raise self.deny_write("delete", rtype, rid, current.pid, decision)

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
            self.transaction(write, interaction="delete", rtype=rtype, pid=current.pid)

    def refused(self, interaction: str, exc: FhirError, rtype: str | None, rid: str | None,
                body: dict | None) -> None:
        """Every refused write is in the journal (issue 18): a refusal the repository did not
        journal itself (raised by the REST layer before calling it: a body that fails validation, an
        id that does not match, a 405, a 415...) is journaled once, in the journal of the DMP the
        request names (``rtype/rid``'s stored patient, else the body's subject or patient) when that
        DMP exists, else in the system journal. The answer stays the same."""
        if not self.journal.refused:
            self.journal.failure(interaction, exc, self._named_dmp(rtype, rid, body), _named(rtype, rid))

    def refusals_named(self, interaction: str, rtype: str | None, rid: str | None, body: dict | None):
        """The same for a Bundle entry (a context manager): a refusal raised in the block that the
        repository did not journal is journaled in the DMP the entry names, else the system's."""
        return self.journal.refusals_journaled(interaction, _named(rtype, rid),
                                               named=lambda: self._named_dmp(rtype, rid, body))

    def _named_dmp(self, rtype: str | None, rid: str | None, body: dict | None) -> str | None:
        """The existing DMP that ``rtype/rid`` (its stored patient) or else ``body`` names."""
        if rtype not in HOSTED:
            return None
        stored = self.storage.read(rtype, rid, session=self.session) if rid else None
        pid = stored.pid if stored else None
        if pid is None and isinstance(body, dict) and body.get("resourceType") == rtype:
            pid = search.patient_id_of(rtype, body)
        return pid if pid and self.storage.read("Patient", pid, session=self.session) else None

    # -------------------------------------------------------- conditional ops
    def find_matches(self, rtype: str, criteria: list[tuple[str, str]], interaction: str) -> list[Stored]:
        """Guarded search for conditional create/update/delete (only what the caller may see): at
        most one match, else 412, in the journal of each DMP matched
        (https://hl7.org/fhir/R4/http.html#cond-update)."""
        matches = self.search(rtype, [(k, v) for k, v in criteria] + [("_count", "2")]).matches
        if len(matches) > 1:
            exc = PreconditionFailed(f"the {interaction} criteria match several resources")
            for pid in sorted({m.pid for m in matches if m.pid}) or [None]:
                self.journal.failure(interaction, exc, pid, rtype)
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
            seen = self.decide_read("DocumentReference", doc) if doc and not doc.deleted else None
            if seen and seen.permit:
                return doc.pid, doc.resource
            if seen:    # refused as if missing (no DMP, no document), and in that document's journal
                self.journal.named("create", doc, None, seen, 422)
        return None, None

    def _prepare(self, rtype: str, resource: dict, old: dict | None, pid: str | None,
                 interaction: str = "create") -> dict:
        """Server-side rules on what is written (author, qualified INS, content checks)."""
        if rtype == "DocumentReference":
            return self.documents.prepare(resource, old, pid, interaction)
        if rtype == "Task" and old is not None:
            return self.prepare_task(old, resource)
        return resource

    def _store_content(self, rtype: str, rid: str, vid: int, resource: dict, pid: str | None, session,
                       content=None) -> tuple[dict, dict | None]:
        """Move inline content to encrypted blobs before the metadata is written; (the resource to
        store, fields stored beside it: a Binary's content size and hash)."""
        if rtype == "Binary":
            return self.documents.store_binary_content(rid, vid, resource, pid, session, stream=content)
        if rtype == "DocumentReference":
            return self.documents.store_inline_attachments(rid, resource, pid, session), None
        return resource, None

    def _after_write(self, interaction: str, rtype: str, stored: Stored, old: dict | None,
                     decision: Decision, session, *, alone: bool = False) -> None:
        """What a write brings with it, in its transaction. ``alone``: the write is its transaction's
        only one (not an entry of a transaction Bundle, whose next entries may read what this one
        wrote): the creator's Consent and the notices then wait to go with the journal's inserts,
        one round trip (``UnitOfWork.pending_inserts``; nothing in this transaction reads them)."""
        if decision.obligations.get("authorize_creator"):
            self._authorize_creator(stored, session, defer=alone)
        if decision.obligations.get("notify") == "first_access":
            # a new DMP: the Patient just written is the one to tell, no need to read it back
            self.notify("first_access", stored.pid, session=session, defer=alone,
                        patient=stored.resource if rtype == "Patient" and not stored.deleted else None)
        if rtype == "DocumentReference":
            self.documents.after_write(stored, old, session)
        if rtype == "Task":
            self.task_written(stored, old, session)
        self.access.states.pop(stored.pid, None)
        self.work.written(stored.pid)

    def _authorize_creator(self, patient: Stored, session, *, defer: bool = False) -> None:
        """A PS who opens a DMP is authorized on it (CONTRACT.md); ``defer``: see :meth:`_after_write`."""
        consent = dmp.patient_consent(patient.id, "permit", purpose="TREAT", actor=self.p.reference(),
                                      at=patient.resource["meta"]["lastUpdated"],
                                      verified_with=self.p.reference())
        stored = self.storage.create("Consent", consent, pid=patient.id, session=session,
                                     pending=self.work.pending_inserts, defer=defer)
        self.record("create", outcome="0", patient_id=patient.id, resource=f"Consent/{stored.id}/_history/1",
                    decision=Decision(True, "ps-creates-dmp", "creator authorized"), http_status=201)



def duplicate_dmp(patient: dict) -> Conflict:
    """One DMP per INS (CONTRACT.md "The DMP in FHIR terms"): 409 ``duplicate``, naming the way to
    the existing DMP (the exact-INS lookup, then the first-access attestation), never its id."""
    ins = next((f"{i['system']}|{i['value']}" for i in patient.get("identifier") or []
                if isinstance(i, dict) and i.get("system") in INS_SYSTEMS), "<INS>")
    return Conflict(f"a DMP already exists for this INS (open or closed): find it with GET "
                    f"Patient?identifier={ins}, then attest the patient's agreement with a Consent "
                    f"(provision.type permit, your idNatPs as actor, verification.verified true)",
                    code="duplicate", expression="Patient.identifier")


def _named(rtype: str | None, rid: str | None) -> str | None:
    return f"{rtype}/{rid}" if rtype and rid else rtype


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

