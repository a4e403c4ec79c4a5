"""Encrypted, chunked, streamed content storage in MongoDB (DESIGN.md "Storage": attachments), and
the wrapped per-DMP data keys (collection ``datakeys``: security/crypto.py wraps, this stores).

Content (Binary data, DocumentReference attachments) never reaches the
database in clear: it is cut into ``chunk_size`` pieces and each piece is one
AES-256-GCM message from :class:`fhir_dmp.security.crypto.ChunkEncryptor`,
whose AAD binds patient id, resource (Binary) id, version, blob id, chunk index
and a last-chunk flag — chunks cannot be reordered, swapped between blobs or
versions, dropped from the end, or moved to another patient.

Layout — two collections of our own rather than a GridFS bucket:

* ``content_chunks`` ``{_id: "<blob_id>:<n>", p: patient, r: binary id, v: version, b: blob_id, n: index, d: ciphertext}``
* ``content_blobs``  ``{_id: blob_id, p, r, v, size, n: chunk count, cs: chunk size, created[, d]}``

Content of one chunk of at most :data:`INLINE_MAX` bytes keeps its only ciphertext in its
``content_blobs`` document (``d``, the same AEAD message chunk 0 would hold, flagged last) and has
no ``content_chunks`` document: one insert instead of two. Blobs written before that have their
chunk; both are read.

Content in its resource (issue 22): the Binary's content of one chunk whose ciphertext is at most
:data:`RESOURCE_INLINE_MAX` bytes (``put(..., beside=True)``: most documents, a CDA or a PDF
report) has no ``content_blobs`` document at all. :meth:`BlobStore.put` hands the sealed message
back (:attr:`BlobInfo.inline`) and the Binary's own stored document keeps it beside its resource:
``blob: {size, sha1, v: version, b: stream id, d: ciphertext}`` (the same AEAD message, AAD and
data key as a header's; ``documents/pipeline.py`` ``blob_fields``). The Binary's version and its
content are then one insert, as atomic as any. :meth:`ContentStore.inline_content` finds it on the
current document, or on the history copy of a superseded version (``storage/resources.py`` copies
``blob`` there); every other read of a Binary leaves ``blob.d`` out (``resources.CONTENT_HOLDERS``).
Destroying a DMP deletes its Binaries with their ciphertext and its data key (crypto-shredding).
Reads look beside the resource first, then in ``content_blobs``: content stored before, or larger,
keeps reading.

Why 64 KiB of ciphertext: well under the 16 MiB document limit whatever the resource beside it,
small enough that the reads that fetch a whole Binary document (its history copy, a backup, the
database's own oplog and cache) carry little, large enough for a structured CDA or a few-page PDF
report, the common deposit. Above it the content has a document of its own (and chunks past
:data:`INLINE_MAX`): one insert more is nothing next to moving those bytes.

Why not GridFS: GridFS cuts *one* byte stream at fixed offsets, whereas each
of our chunks is an independent AEAD message (own nonce and tag, a little
larger than its plaintext) that must stay whole; its ``files`` document has no
patient id, while DESIGN.md wants every index and the shard key to start
with the patient (``(p, b, n)`` and ``(p, r, v)`` here), so a patient's content
lives on one shard and is removed with one ``delete_many``. pymongo's GridFS
buys nothing else we use (no MD5, no filenames).

Visibility and atomicity: chunks are written first, the ``content_blobs``
document last; readers look the blob up by that document, so a half-written
blob is never read. Over ``max_bytes`` or on any error, the chunks written so
far are deleted before the exception propagates. The document pipeline writes
content, whatever its size, inside the write's transaction (``session``), so
a rolled-back write leaves none; :meth:`BlobStore.delete` removes what a
write outside a transaction left behind.

Memory stays bounded (a few chunks) whatever the size, on write and read.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import BinaryIO, Iterable, Iterator

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..http.errors import Conflict, PayloadTooLarge
from ..security.crypto import ContentUnavailable, DocumentCrypto
from .core import BLOBS, CHUNKS, DATAKEYS, StoreCore
from .errors import DuplicateKey, StorageError, translate_methods

log = logging.getLogger(__name__)

MAX_CHUNK_SIZE = 8 << 20  # well under the 16 MiB BSON document limit
INLINE_MAX = 256 << 10    # a one-chunk blob this small lives in its header document
RESOURCE_INLINE_MAX = 64 << 10   # ciphertext this small lives in its Binary's document (docstring)


class BlobNotFound(ContentUnavailable):
    """No (complete) content is stored for this patient / binary id / version."""


@dataclass(frozen=True)
class BlobInfo:
    """What :meth:`BlobStore.put` stored: ``sha1_b64`` is FHIR ``Attachment.hash`` (base64 SHA-1).
    ``inline``: the content was not stored, its caller stores this beside its resource
    (``{v, b, d}``: version, stream id, sealed message; module docstring)."""

    blob_id: str
    size: int
    sha1_b64: str
    sha256_hex: str
    inline: dict | None = None

    def __repr__(self) -> str:      # never the ciphertext in a log line
        return f"BlobInfo(blob_id={self.blob_id!r}, size={self.size}, inline={self.inline is not None})"


def _rechunk(pieces: Iterable, size: int) -> Iterator[bytes]:
    """Re-cut any sequence of bytes-like pieces into ``size`` chunks (last one shorter, never empty).

    Yields fresh ``bytes`` so callers that reuse their buffer are safe.
    """
    buf = bytearray()
    for piece in pieces:
        if not piece:
            continue
        mv = memoryview(piece).cast("B")
        if buf:
            take = min(size - len(buf), len(mv))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) < size:
                continue
            yield bytes(buf)
            buf = bytearray()
        while len(mv) >= size:
            yield bytes(mv[:size])
            mv = mv[size:]
        if len(mv):
            buf += mv
    if buf:
        yield bytes(buf)


def _pieces(source, size: int) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        mv = memoryview(source).cast("B")
        return (mv[i:i + size] for i in range(0, len(mv), size))
    if hasattr(source, "read"):
        return _rechunk(iter(lambda: source.read(size), b""), size)
    return _rechunk(source, size)


def _with_last(chunks: Iterator) -> Iterator[tuple[int, object, bool]]:
    """(index, chunk, is_last); an empty source is one empty last chunk (still authenticated)."""
    prev = next(chunks, None)
    if prev is None:
        yield 0, b"", True
        return
    index = 0
    for cur in chunks:
        yield index, prev, False
        prev = cur
        index += 1
    yield index, prev, True


@translate_methods
class ContentStore(StoreCore):
    """The queries on ``content_blobs``, ``content_chunks`` and ``datakeys`` (:class:`BlobStore`
    encrypts, ``security/crypto.py`` wraps the keys; this stores)."""

    def ensure_blob_indexes(self) -> None:
        """Patient-first indexes (also usable as shard keys): one blob per (p, r, v)."""
        self.db[BLOBS].create_index([("p", ASCENDING), ("r", ASCENDING), ("v", ASCENDING)], unique=True)
        self.db[CHUNKS].create_index([("p", ASCENDING), ("b", ASCENDING), ("n", ASCENDING)], unique=True)
        self.db[CHUNKS].create_index([("p", ASCENDING), ("r", ASCENDING), ("v", ASCENDING)])

    def add_blob_chunk(self, doc: dict, *, session=None) -> None:
        self.db[CHUNKS].insert_one(doc, session=session)

    def add_blob(self, doc: dict, *, session=None) -> None:
        """The blob's header, written after its chunks (DuplicateKey, pymongo's own in a transaction: that version has one)."""
        self.db[BLOBS].insert_one(doc, session=session)

    def blob_meta(self, pid: str, rid: str, ver: int, *, session=None, data: bool = True) -> dict | None:
        """A blob's header; ``data=False`` leaves out the ciphertext a one-chunk blob keeps there."""
        return self.db[BLOBS].find_one({"p": pid, "r": rid, "v": ver}, None if data else {"d": 0},
                                       session=session)

    def inline_content(self, pid: str, rid: str, ver: int, *, session=None) -> dict | None:
        """The content a Binary version keeps beside its resource (``blob``: ``{size, v, b, d}``), on
        its current document or, for a superseded version, its history copy; None when it has none
        (stored in ``content_blobs``: content stored before, or larger)."""
        doc = self.db["Binary"].find_one({"_id": rid, "pid": pid}, {"vid": 1, "blob": 1}, session=session)
        if doc is None:
            return None
        blob = doc.get("blob") or {}
        if blob.get("v") == ver and "d" in blob:
            return blob
        if doc["vid"] <= ver:       # the current version, or none: nothing in the history
            return None
        copy = self.db["Binary_history"].find_one({"_id": f"{rid}/{ver}", "pid": pid, "blob.v": ver,
                                                   "blob.d": {"$exists": True}}, {"blob": 1}, session=session)
        return copy["blob"] if copy else None

    def blob_exists(self, pid: str, rid: str, ver: int, *, session=None) -> bool:
        return self.db[BLOBS].count_documents({"p": pid, "r": rid, "v": ver}, limit=1, session=session) > 0

    def blob_chunks(self, pid: str, blob_id: str, *, session=None):
        """A cursor over the chunks of one blob in order (``n``, ``d``); close it when done."""
        return (self.db[CHUNKS].find({"p": pid, "b": blob_id}, {"n": 1, "d": 1}, session=session)
                .sort("n", ASCENDING).batch_size(4))

    def discard_blob_chunks(self, pid: str, blob_id: str, *, session=None) -> None:
        self.db[CHUNKS].delete_many({"p": pid, "b": blob_id}, session=session)

    def delete_blobs(self, flt: dict, *, session=None) -> None:
        """Remove blobs and chunks matching ``flt`` (over ``p``, ``r``, ``v``)."""
        self.db[BLOBS].delete_many(flt, session=session)
        self.db[CHUNKS].delete_many(flt, session=session)

    def data_key(self, pid: str) -> dict | None:
        return self.db[DATAKEYS].find_one({"_id": pid})

    def add_data_key(self, doc: dict) -> bool:
        """Store a new wrapped data key; False when another request created that DMP's key first
        (its unique ``_id``): then read theirs."""
        try:
            self.db[DATAKEYS].insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    def data_keys_not_wrapped_by(self, kek_id: str) -> list[dict]:
        return list(self.db[DATAKEYS].find({"kek_id": {"$ne": kek_id}}))

    def count_data_keys_not_wrapped_by(self, kek_id: str) -> int:
        return self.db[DATAKEYS].count_documents({"kek_id": {"$ne": kek_id}})

    def rewrap_data_key(self, doc: dict, wrapped: bytes, kek_id: str, at: datetime) -> int:
        """Compare-and-set on the old wrapped value (a key shredded meanwhile stays deleted)."""
        return self.db[DATAKEYS].update_one(
            {"_id": doc["_id"], "wrapped": doc["wrapped"], "kek_id": doc["kek_id"]},
            {"$set": {"wrapped": wrapped, "kek_id": kek_id, "rewrapped": at}}).modified_count

    def kek_ids_in_use(self) -> set[str]:
        return set(self.db[DATAKEYS].distinct("kek_id"))


class BlobStore:
    """Encrypted chunked content of one database (see module docstring)."""

    def __init__(self, storage, crypto: DocumentCrypto, *, chunk_size: int = 1 << 20):
        """``storage`` (:class:`~fhir_dmp.storage.Storage`, whose :class:`ContentStore`) runs the queries on the chunks."""
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        self.storage = storage
        self.crypto = crypto
        self.chunk_size = chunk_size
        self.ensure_indexes()

    def ensure_indexes(self) -> None:
        """Patient-first indexes (also usable as shard keys): one blob per (p, r, v)."""
        self.storage.ensure_blob_indexes()

    # ------------------------------------------------------------- write
    def put(self, patient_id: str, binary_id: str, version: int,
            source: bytes | BinaryIO | Iterable[bytes], *, max_bytes: int, session=None,
            expression: str = "Binary.data", fresh: bool = False, pending: list | None = None,
            beside: bool = False) -> BlobInfo:
        """Encrypt and store ``source`` as the content of (patient, binary, version).

        Computes size, SHA-1 (base64) and SHA-256 (hex) of the plaintext while
        streaming. More than ``max_bytes`` -> :class:`PayloadTooLarge` (413) and
        nothing stays stored (``expression`` goes into that error). Content already
        stored for this version -> :class:`Conflict` (versions are immutable; :meth:`delete` it first).
        ``fresh``: the Binary is created in this same transaction, so no content can be stored for
        it yet; the early look-up is skipped (the unique index still decides). ``pending``: the
        header is appended to this list of the transaction's inserts not sent yet
        (``Storage.create``), still after the chunks (for a new Binary only: no conflict possible).
        ``beside``: content of one chunk whose ciphertext is at most :data:`RESOURCE_INLINE_MAX`
        bytes is stored nowhere: :attr:`BlobInfo.inline` holds it for the caller to write with its
        Binary, in the same transaction (module docstring); larger content is stored as without it.
        """
        pid, rid, ver = str(patient_id), str(binary_id), int(version)
        if isinstance(source, (bytes, bytearray, memoryview)) and memoryview(source).nbytes > max_bytes:
            raise self._too_large(max_bytes, expression)
        if not fresh and self.exists(pid, rid, ver, session=session):  # early refusal; the unique index decides
            raise Conflict(f"content of Binary/{rid} version {ver} is already stored")
        blob_id = uuid.uuid4().hex
        enc = self.crypto.encryptor(pid, rid, ver, stream_id=blob_id)
        sha1, sha256 = hashlib.sha1(), hashlib.sha256()
        size = count = 0
        header = {"_id": blob_id, "p": pid, "r": rid, "v": ver}
        try:
            for index, chunk, last in _with_last(_pieces(source, self.chunk_size)):
                size += len(chunk)
                if size > max_bytes:
                    raise self._too_large(max_bytes, expression)
                sha1.update(chunk)
                sha256.update(chunk)
                sealed = enc.encrypt_chunk(index, chunk, last=last)
                if beside and index == 0 and last and len(sealed) <= RESOURCE_INLINE_MAX:
                    info = self._info(blob_id, size, sha1, sha256)
                    return replace(info, inline={"v": ver, "b": blob_id, "d": sealed})
                if index == 0 and last and len(chunk) <= INLINE_MAX:
                    header["d"] = sealed        # the only chunk, kept in the header (module docstring)
                else:
                    self.storage.add_blob_chunk({"_id": f"{blob_id}:{index}", "p": pid, "r": rid, "v": ver,
                                                 "b": blob_id, "n": index, "d": sealed}, session=session)
                count += 1
            header.update(size=size, n=count, cs=self.chunk_size, created=datetime.now(timezone.utc))
            if pending is not None:
                pending.append((BLOBS, header))
                return self._info(blob_id, size, sha1, sha256)
            try:
                self.storage.add_blob(header, session=session)
            except (DuplicateKeyError, DuplicateKey):   # raw in a transaction (storage/errors.py)
                raise Conflict(f"content of Binary/{rid} version {ver} is already stored") from None
        except BaseException:
            self._discard(pid, blob_id, session)
            raise
        return self._info(blob_id, size, sha1, sha256)

    @staticmethod
    def _info(blob_id: str, size: int, sha1, sha256) -> BlobInfo:
        return BlobInfo(blob_id, size, base64.b64encode(sha1.digest()).decode("ascii"), sha256.hexdigest())

    @staticmethod
    def _too_large(max_bytes: int, expression: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"attachment content exceeds the limit of {max_bytes} bytes",
                               expression=expression)

    def _discard(self, pid: str, blob_id: str, session) -> None:
        """Best-effort removal of a failed put's chunks (inside the session if one was given).

        Never masks the original error: in an aborted transaction the writes vanished
        anyway; otherwise the orphans stay until :meth:`delete` of that version.
        """
        try:
            self.storage.discard_blob_chunks(pid, blob_id, session=session)
        except (PyMongoError, StorageError):     # raw in a transaction (storage/errors.py)
            if session is None:
                log.warning("could not remove the chunks of failed blob %s; delete() that version", blob_id)

    # ------------------------------------------------------------- read
    def _meta(self, pid: str, rid: str, ver: int, session=None, *, data: bool = True) -> dict:
        """The content's header: beside its Binary's resource (shaped as a header of one chunk),
        else its ``content_blobs`` document (module docstring)."""
        inline = self.storage.inline_content(pid, rid, ver, session=session)
        if inline is not None:
            return {"_id": inline["b"], "size": inline["size"], "n": 1, "d": inline["d"]}
        meta = self.storage.blob_meta(pid, rid, ver, session=session, data=data)
        if meta is None:
            raise BlobNotFound("no content stored for this binary version")
        return meta

    def size(self, patient_id, binary_id, version, *, session=None) -> int:
        """Plaintext size in bytes (for Content-Length before streaming); BlobNotFound if absent."""
        return int(self._meta(str(patient_id), str(binary_id), int(version), session, data=False)["size"])

    def exists(self, patient_id, binary_id, version, *, session=None) -> bool:
        """Content stored in ``content_blobs`` (content beside its Binary exists with that Binary)."""
        return self.storage.blob_exists(str(patient_id), str(binary_id), int(version), session=session)

    def open(self, patient_id, binary_id, version, *, session=None) -> Iterator[bytes]:
        """Decrypting iterator over the plaintext, a chunk at a time (bounded memory).

        The lookup and key retrieval happen now, so a missing blob
        (:class:`BlobNotFound`) or a shredded key (:class:`ContentUnavailable`)
        raise before any byte is produced. Corruption found later (missing,
        reordered or tampered chunk) raises :class:`ContentUnavailable` from
        the iterator.
        """
        pid, rid, ver = str(patient_id), str(binary_id), int(version)
        meta = self._meta(pid, rid, ver, session)
        dec = self.crypto.decryptor(pid, rid, ver, stream_id=meta["_id"])
        return self._iter(pid, meta, dec, session)

    def _iter(self, pid, meta, dec, session) -> Iterator[bytes]:
        total, expected = int(meta["n"]), 0
        size = 0
        if "d" in meta:      # one chunk, kept in the header
            if total != 1:
                raise ContentUnavailable("stored content is inconsistent (chunk sequence)")
            plain = dec.decrypt_chunk(0, meta["d"], last=True)
            if len(plain) != meta["size"]:
                raise ContentUnavailable("stored content is incomplete")
            yield plain
            return
        cursor = self.storage.blob_chunks(pid, meta["_id"], session=session)
        try:
            for doc in cursor:
                if doc.get("n") != expected or expected >= total:
                    raise ContentUnavailable("stored content is inconsistent (chunk sequence)")
                plain = dec.decrypt_chunk(expected, doc["d"], last=expected == total - 1)
                size += len(plain)
                expected += 1
                yield plain
        finally:
            cursor.close()
        if expected != total or size != meta["size"]:
            raise ContentUnavailable("stored content is incomplete")

    def read(self, patient_id, binary_id, version, *, session=None) -> bytes:
        """The whole plaintext (for small content; prefer :meth:`open` to stream).

        Built in a BytesIO, whose ``getvalue`` hands over its buffer: peak memory
        about 1x the content instead of 2x for a join.
        """
        buf = io.BytesIO()
        for chunk in self.open(patient_id, binary_id, version, session=session):
            buf.write(chunk)
        return buf.getvalue()

    # ------------------------------------------------------------- delete
    def delete(self, patient_id, binary_id, version, *, session=None) -> None:
        """Remove the content of one version, committed or orphaned (GC after a failed transaction)."""
        self.storage.delete_blobs({"p": str(patient_id), "r": str(binary_id), "v": int(version)},
                                  session=session)
