"""What happens to a document on its way into the record (DESIGN.md "Documents", rules 10-11).

A :class:`DocumentPipeline` is handed its collaborators by the guarded
repository (storage, the encrypted blob store, the request's unit of work,
its access decision and journal) and is called only after the access decision
permitted the write:

* :meth:`DocumentPipeline.prepare` — applies the deposit rules of the decision module
  (security/decision/documents.py: the author of record, a qualified INS, ``relatesTo
  replaces`` only by the author, the CDA's recordTarget naming the DMP's
  patient), each denial a 422 with its reason, journaled; CDA/PDF content is inspected
  (under the attachment's contentType, which must be its Binary's); an
  ``attachment.url`` names a Binary of the same record not attached to
  another document; ``size``/``hash`` always come from the stored content.
* :meth:`~DocumentPipeline.store_inline_attachments` / :meth:`~DocumentPipeline.store_binary_content` — content
  is encrypted, then kept in its Binary's own stored document when small, in the blob store
  otherwise (storage/content.py), in the write's transaction; the DocumentReference keeps
  ``attachment.url``, ``size`` and ``hash``.
* :meth:`DocumentPipeline.after_write` — links Binaries to their document and marks
  replaced documents ``superseded``.
"""
from __future__ import annotations

import base64
import binascii
import copy
import re
from dataclasses import dataclass
from typing import Any

from ..http.errors import Conflict, PayloadTooLarge, Unprocessable
from ..profiles import dmp
from ..search import reference_id
from ..security.decision import is_personal_document
from ..storage import VersionConflict, new_id
from .cda import check_cda_matches, inspect_cda
from .pdf import inspect_pdf
from .rubriques import fill_category

CDA_TYPES = {"text/xml", "application/xml", "application/hl7-v3+xml", "application/cda+xml"}
PDF_TYPES = {"application/pdf"}
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")   # FHIR id
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


def _decode(data: str, where: str, max_bytes: int) -> bytes:
    """Strict base64 (RFC 4648 alphabet and padding); line breaks allowed, as XML writers wrap it."""
    if not isinstance(data, str):
        raise Unprocessable("attachment data must be a base64 string", expression=where)
    raw = data.encode("ascii", "replace")
    if b"\n" in raw or b" " in raw or b"\r" in raw or b"\t" in raw:
        raw = _WHITESPACE.sub(b"", raw)
    if len(raw) > max_bytes * 4 // 3 + 4:
        raise PayloadTooLarge(f"attachment larger than {max_bytes} bytes", expression=where)
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("attachment data is not valid base64", expression=where) from None
    if len(decoded) > max_bytes:
        raise PayloadTooLarge(f"attachment larger than {max_bytes} bytes", expression=where)
    return decoded


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def inspect_content(content: bytes, content_type: str | None, where: str, *, max_bytes: int,
                    ins: tuple[str, str] | None = None, type_codes: set[str] | None = None,
                    journal=None) -> None:
    """Refuse hostile or mismatched documents (422) before anything is stored; a denial of the
    decision module (the CDA's patient) goes to ``journal`` first."""
    ctype = _base_type(content_type)
    if ctype in PDF_TYPES:
        inspect_pdf(content, max_bytes=max_bytes, expression=where)
    elif ctype in CDA_TYPES:
        info = inspect_cda(content, expression=where)
        if ins is not None and type_codes is not None:
            check_cda_matches(info, ins, type_codes, journal=journal)
    elif ctype == "text/plain":
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            raise Unprocessable("a text document must be UTF-8", expression=where) from None


def _urls(doc: dict) -> set[str]:
    return {(c.get("attachment") or {}).get("url") for c in doc.get("content") or []} - {None}




def blob_fields(info) -> dict:
    """What a Binary's stored document keeps of its content (``Storage.blob_info`` reads size and
    hash): small content itself, encrypted (``BlobInfo.inline``, storage/content.py)."""
    return {"blob": {"size": info.size, "sha1": info.sha1_b64, **(info.inline or {})}}




@dataclass(frozen=True, kw_only=True)
class DocumentPipeline:
    """The deposit rules and content storage of one request's documents, with the collaborators
    it is handed (it reaches into nothing else)."""

    storage: Any        # the Storage facade
    blobs: Any          # the encrypted content store (storage/content.py)
    work: Any           # the request's UnitOfWork: session, pending inserts, fresh Binaries, bodies read
    decision: Any       # the request's access decision (RequestAccess)
    journal: Any        # the request's RequestJournal
    max_bytes: int      # the largest attachment accepted

    def prepare(self, resource: dict, old: dict | None, pid: str, interaction: str = "create") -> dict:
        """The rules of security/decision/ on what a deposit carries (qualified INS, author of record,
        ``relatesTo replaces``, the CDA's patient), applied to ``resource``; a deny answers 422 with
        its reason and is journaled, also in the journal of another DMP a refused reference names."""
        resource = copy.deepcopy(resource)
        access = self.decision
        st = access.state(pid)

        def journal(decision, named=None):
            rid = (old or {}).get("id")
            self.journal.record(interaction, outcome="4", patient_id=pid, decision=decision, http_status=422,
                                resource=f"DocumentReference/{rid}" if rid else "DocumentReference")
            self.journal.named(interaction, named, pid, decision, 422)

        def enforce(decision, expression, named=None):
            if not decision.permit:
                journal(decision, named)
                raise Unprocessable(decision.reason, expression=expression)

        if old is None:
            enforce(access.documents.can_deposit(st), "DocumentReference.subject")
        author = access.documents.author_of_record(pid, old)
        if author is not None:
            resource["author"] = author
        for i, rel in enumerate(resource.get("relatesTo") or []):
            if rel.get("code") != "replaces":
                continue
            target_id = reference_id((rel.get("target") or {}).get("reference"), "DocumentReference")
            target = self.storage.read("DocumentReference", target_id, session=self.work.session) if target_id else None
            enforce(access.documents.may_replace(target, pid), f"DocumentReference.relatesTo[{i}].target", target)
        ins = dmp.patient_ins(st.patient) if st.patient else None
        codes = dmp.doc_type_codes(resource)
        fill_category(resource, codes, personal=is_personal_document(resource, pid))
        max_bytes = self.max_bytes
        for i, content in enumerate(resource.get("content") or []):
            att = content.get("attachment") or {}
            where = f"DocumentReference.content[{i}].attachment"
            if att.get("data"):
                inspect_content(_decode(att["data"], where + ".data", max_bytes), att.get("contentType"),
                                where, max_bytes=max_bytes, ins=ins, type_codes=codes, journal=journal)
                # the content gets a new Binary; a url may only name the id it is to take (ITI-65)
                bid = reference_id(att.get("url"), "Binary")
                if bid and self.storage.read("Binary", bid, session=self.work.session) is not None:
                    att.pop("url")    # taken (maybe in another DMP): the content gets a server id, no tell-tale
            elif att.get("url"):
                bid = reference_id(att["url"], "Binary")
                if bid is None:
                    continue
                binary = self.storage.read("Binary", bid, session=self.work.session)
                enforce(access.documents.may_attach(binary, pid, old), where + ".url", binary)
                if _base_type(binary.resource.get("contentType")) != _base_type(att.get("contentType")):
                    # else a PDF uploaded as application/octet-stream would escape inspection
                    raise Unprocessable("attachment.contentType differs from the contentType of its Binary",
                                        expression=where + ".contentType")
                if old is None or att.get("url") not in _urls(old):
                    blob = self.blobs.read(binary.pid, binary.id, binary.vid)
                    inspect_content(blob, att.get("contentType"), where, max_bytes=max_bytes,
                                    ins=ins, type_codes=codes, journal=journal)
                # size and hash always come from what is stored, never from the client
                info = self.storage.blob_info(bid, session=self.work.session)
                if info:
                    att["size"], att["hash"] = info.get("size"), info.get("sha1")
                else:
                    att.pop("size", None)
                    att.pop("hash", None)
        return resource


    def store_inline_attachments(self, rid: str, resource: dict, pid: str, session) -> dict:
        """Each inline ``attachment.data`` becomes an encrypted Binary; the metadata keeps url/size/hash."""
        contents = resource.get("content") or []
        if not any((c.get("attachment") or {}).get("data") for c in contents):
            return resource
        resource = copy.deepcopy(resource)
        for content in resource["content"]:
            att = content.get("attachment") or {}
            if not att.get("data"):
                continue
            data = _decode(att.pop("data"), "DocumentReference.content.attachment.data",
                           self.max_bytes)
            binary = {"resourceType": "Binary", "contentType": att.get("contentType") or "application/octet-stream",
                      "securityContext": {"reference": f"DocumentReference/{rid}"}}
            wanted = reference_id(att.get("url"), "Binary")
            wanted = wanted if wanted and _ID.fullmatch(wanted) else None
            bid = wanted or new_id()
            # the content first, then the Binary with its size and hash, no update; under a server id
            # (no conflict possible) both wait to go with the document's own inserts
            pending = None if wanted else self.work.pending_inserts
            info = self.blobs.put(pid, bid, 1, data, max_bytes=self.max_bytes,
                                  session=session, fresh=True, pending=pending, beside=True)
            try:
                self.storage.create("Binary", binary, pid=pid, rid=bid, session=session, extra=blob_fields(info),
                                    pending=pending, defer=pending is not None)
            except VersionConflict:
                raise Conflict("attachment.url names an existing Binary: send data or url, not both") from None
            self.work.fresh_binaries.add(bid)     # created attached to this document
            att["url"] = f"Binary/{bid}"
            att["size"] = info.size
            att["hash"] = info.sha1_b64
        return resource


    def store_binary_content(self, rid: str, vid: int, resource: dict, pid: str, session,
                             stream=None) -> tuple[dict, dict]:
        """Encrypt a Binary's content (inline ``data`` or a raw upload stream) into the blob store;
        (the Binary to store, the fields stored beside it: :func:`blob_fields`)."""
        resource = dict(resource)
        max_bytes = self.max_bytes
        source = stream
        if resource.get("data") is not None:
            source = _decode(resource.pop("data"), "Binary.data", max_bytes)
            inspect_content(source, resource.get("contentType"), "Binary.data", max_bytes=max_bytes)
        elif source is None:
            source = b""
        else:
            # a request body can be read once: a transaction retried after a write conflict
            # must not store what is left of it (empty or truncated content)
            if not self.work.take_stream(source):
                raise Conflict("concurrent write while storing the upload; send it again")
        info = self.blobs.put(pid, rid, vid, source, max_bytes=max_bytes, session=session, beside=True)
        return resource, blob_fields(info)


    def after_write(self, stored, old: dict | None, session) -> None:
        """Link the Binaries a document names to it; a new document marks those it replaces
        ``superseded``."""
        doc = stored.resource or {}
        for url in _urls(doc):
            bid = reference_id(url, "Binary")
            if bid and bid not in self.work.fresh_binaries:   # those were created pointing at this document
                self.storage.attach_binary(bid, stored.pid, f"DocumentReference/{stored.id}", session=session)
        if old is not None:
            return
        for rel in doc.get("relatesTo") or []:
            if rel.get("code") != "replaces":
                continue
            target_id = reference_id((rel.get("target") or {}).get("reference"), "DocumentReference")
            target = self.storage.read("DocumentReference", target_id, session=session)
            if target and not target.deleted and target.resource.get("status") != "superseded":
                replaced = dict(target.resource)
                replaced["status"] = "superseded"
                self.storage.update("DocumentReference", target.id, replaced, pid=target.pid,
                                    expected_vid=target.vid, session=session)
