"""Envelope encryption of document content (DESIGN.md "Storage": attachments).

Layers, all AES-256 from the ``cryptography`` library (nothing hand-rolled):

* **KEK** (key-encryption key): held by a :class:`KeyProvider`. The default
  :class:`LocalKeyFileProvider` keeps KEKs in a JSON key file
  (``config.kek_path``, created 0600); a KMS/HSM fits behind the same
  interface (``wrap`` / ``unwrap`` of a 32-byte data key).
* **Data key**: one random AES-256 key per patient, created on first use and
  stored *wrapped* by the current KEK in the ``datakeys`` collection
  ``{_id: patient_id, wrapped, kek_id, created}``. Deleting it destroys every
  ciphertext of the patient at once (crypto-shredding, :meth:`DocumentCrypto.shred`).
* **Content**: AES-256-GCM with a random 96-bit nonce per message; the
  associated data (AAD) binds each ciphertext to patient id, resource id and
  version, and for streamed chunks to the stream (blob) id, the chunk index
  and a "last chunk" flag, so ciphertexts cannot be moved to another
  patient/resource/version, reordered, swapped between blobs, or truncated.

Ciphertext layout (one message): ``b"\\x01" | nonce(12) | ciphertext | tag(16)``.

KEK rotation (:func:`rotate_kek`, CLI ``fhir-dmp keys rotate``) adds a new KEK
to the key file, makes it current and rewraps every data key online; content
is never re-encrypted. Older KEKs stay in the file (so data keys wrapped by
them keep working while the rewrap runs) until :func:`retire_unused_keks`
removes those no data key uses any more.

Any failure to decrypt (wrong AAD, tampered bytes, shredded data key, unknown
KEK) raises :class:`ContentUnavailable`; its message never contains key
material or content.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..runtime.secret_files import write_secret

FORMAT_V1 = b"\x01"
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = len(FORMAT_V1) + NONCE_LEN + TAG_LEN  # bytes added to each plaintext message
KEY_LEN = 32  # AES-256


class ContentUnavailable(Exception):
    """Content cannot be decrypted: wrong binding (AAD), tampered ciphertext,
    shredded data key or unavailable KEK. The app answers 404 (the content is
    gone for good) and the repository journals the read as failed."""


class KeyUnavailable(ContentUnavailable):
    """The data key or the KEK needed to unwrap it does not exist (any more)."""


# --------------------------------------------------------------------- KEKs

@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys with a key-encryption key it never exports.

    ``key_id`` is the id of the KEK that :meth:`wrap` uses now; :meth:`unwrap`
    takes the id stored next to the wrapped key (older KEKs must keep working).
    """

    key_id: str

    def wrap(self, data_key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, key_id: str) -> bytes: ...


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _new_kek_id() -> str:
    return "kek-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


class LocalKeyFileProvider:
    """KEKs in a JSON key file: ``{"format": 1, "current": id, "keys": {id: {"k": b64, "created": iso}}}``.

    * Created atomically with mode 0600 when absent (temp file + ``os.link``,
      so two processes starting together agree on one file).
    * Keeps older KEKs so data keys they wrapped still unwrap until rewrapped.
    * Wrapping is AES key wrap (RFC 3394, ``cryptography.hazmat.primitives.keywrap``):
      deterministic, integrity-checked, no nonce to manage.
    * The file is re-read when it changes on disk (another process rotated),
      checked on every wrap and on unwrap with an unknown KEK id.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: tuple[int, int] | None = None
        self._keys: dict[str, bytes] = {}
        self._current = ""
        if not self.path.exists():
            self._create()
        self._load()

    # -- file handling
    def _write_atomic(self, doc: dict, *, replace: bool) -> None:
        write_secret(self.path, json.dumps(doc, indent=1).encode("utf-8"), replace=replace)

    def _create(self) -> None:
        kid = _new_kek_id()
        doc = {"format": 1, "current": kid,
               "keys": {kid: {"k": _b64(AESGCM.generate_key(256)),
                              "created": datetime.now(timezone.utc).isoformat()}}}
        self._write_atomic(doc, replace=False)

    def _read_doc(self) -> dict:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            keys = {kid: base64.b64decode(v["k"]) for kid, v in doc["keys"].items()}
            current = doc["current"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyUnavailable(f"key-encryption key file {self.path} is unreadable") from exc
        if current not in keys or any(len(k) != KEY_LEN for k in keys.values()):
            raise KeyUnavailable(f"key-encryption key file {self.path} is inconsistent")
        return doc

    def _load(self) -> None:
        st = self.path.stat()
        doc = self._read_doc()
        with self._lock:
            self._keys = {kid: base64.b64decode(v["k"]) for kid, v in doc["keys"].items()}
            self._current = doc["current"]
            self._mtime = (st.st_mtime_ns, st.st_ino)

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        if (st.st_mtime_ns, st.st_ino) != self._mtime:
            self._load()

    def _edit(self, change) -> dict:
        """Read-modify-write the key file under an exclusive lock (rotations serialize)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            doc = self._read_doc()
            change(doc)
            self._write_atomic(doc, replace=True)
        finally:
            os.close(fd)  # releases the lock
        self._load()
        return doc

    # -- KeyProvider
    @property
    def key_id(self) -> str:
        self._refresh()
        return self._current

    @property
    def key_ids(self) -> list[str]:
        self._refresh()
        return list(self._keys)

    def wrap(self, data_key: bytes) -> bytes:
        self._refresh()
        with self._lock:
            kek = self._keys[self._current]
        return aes_key_wrap(kek, data_key)

    def wrap_with_id(self, data_key: bytes) -> tuple[bytes, str]:
        """Wrap with the current KEK and say which one (no race with a concurrent reload)."""
        self._refresh()
        with self._lock:
            kid, kek = self._current, self._keys[self._current]
        return aes_key_wrap(kek, data_key), kid

    def wrap_with(self, key_id: str, data_key: bytes) -> bytes:
        """Wrap with a named KEK (rotation)."""
        if key_id not in self._keys:
            self._refresh()
        kek = self._keys.get(key_id)
        if kek is None:
            raise KeyUnavailable(f"key-encryption key {key_id} is not in the key file")
        return aes_key_wrap(kek, data_key)

    def unwrap(self, wrapped: bytes, key_id: str) -> bytes:
        if key_id not in self._keys:
            self._refresh()
        kek = self._keys.get(key_id)
        if kek is None:
            raise KeyUnavailable(f"key-encryption key {key_id} is not in the key file")
        try:
            return aes_key_unwrap(kek, bytes(wrapped))
        except (InvalidUnwrap, ValueError) as exc:
            raise KeyUnavailable(f"data key does not unwrap with key-encryption key {key_id}") from exc

    # -- administration
    def add_kek(self) -> str:
        """Add a fresh KEK and make it current; returns its id. Older KEKs are kept."""
        kid = _new_kek_id()

        def change(doc):
            doc["keys"][kid] = {"k": _b64(AESGCM.generate_key(256)),
                                "created": datetime.now(timezone.utc).isoformat()}
            doc["current"] = kid
        self._edit(change)
        return kid

    def remove_kek(self, key_id: str) -> None:
        """Forget an old KEK (never the current one). Callers check no data key uses it."""
        def change(doc):
            if doc["current"] == key_id:
                raise ValueError("cannot remove the current key-encryption key")
            doc["keys"].pop(key_id, None)
        self._edit(change)


def key_provider(config) -> KeyProvider:
    """The KeyProvider for this configuration: the local key file ``config.kek_path``."""
    return LocalKeyFileProvider(config.kek_path)


def _wrap(provider: KeyProvider, data_key: bytes) -> tuple[bytes, str]:
    if hasattr(provider, "wrap_with_id"):
        return provider.wrap_with_id(data_key)
    kid = provider.key_id
    return provider.wrap(data_key), kid


# --------------------------------------------------------------------- AAD

def _aad(kind: bytes, *fields) -> bytes:
    """Unambiguous AAD: a domain tag then each field length-prefixed (no concatenation ambiguity)."""
    parts = [b"fhir-dmp/v1/", kind]
    for f in fields:
        raw = f if isinstance(f, bytes) else str(f).encode("utf-8")
        parts.append(struct.pack(">I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


# --------------------------------------------------------------------- data keys

class _KeyCache:
    """Bounded LRU of unwrapped data keys (as AESGCM objects) with a short TTL."""

    def __init__(self, size: int, ttl: float):
        self.size, self.ttl = size, ttl
        self._d: OrderedDict[str, tuple[float, AESGCM]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pid: str) -> AESGCM | None:
        with self._lock:
            hit = self._d.get(pid)
            if hit is None:
                return None
            if hit[0] < time.monotonic():
                del self._d[pid]
                return None
            self._d.move_to_end(pid)
            return hit[1]

    def put(self, pid: str, aead: AESGCM) -> None:
        with self._lock:
            self._d[pid] = (time.monotonic() + self.ttl, aead)
            self._d.move_to_end(pid)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def drop(self, pid: str) -> None:
        with self._lock:
            self._d.pop(pid, None)


class ChunkEncryptor:
    """Encrypts one stream of chunks (AAD: patient, resource, version, stream id, index, last flag).

    Call :meth:`encrypt_chunk` with indexes 0, 1, 2, ... and ``last=True`` on the
    final one (an empty stream is one empty last chunk).
    """

    def __init__(self, aead: AESGCM, patient_id, resource_id, version, stream_id: str):
        self._aead = aead
        self._ids = (patient_id, resource_id, version, stream_id)

    def encrypt_chunk(self, index: int, data: bytes, *, last: bool) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        aad = _aad(b"chunk", *self._ids, index, b"L" if last else b"-")
        return FORMAT_V1 + nonce + self._aead.encrypt(nonce, data, aad)


class ChunkDecryptor:
    """The reverse of :class:`ChunkEncryptor`; raises :class:`ContentUnavailable`."""

    def __init__(self, aead: AESGCM, patient_id, resource_id, version, stream_id: str):
        self._aead = aead
        self._ids = (patient_id, resource_id, version, stream_id)

    def decrypt_chunk(self, index: int, blob: bytes, *, last: bool) -> bytes:
        aad = _aad(b"chunk", *self._ids, index, b"L" if last else b"-")
        return _open(self._aead, blob, aad)


def _open(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    blob = memoryview(blob)
    if len(blob) < OVERHEAD or blob[:1] != FORMAT_V1:
        raise ContentUnavailable("encrypted content is malformed")
    try:
        return aead.decrypt(blob[1:1 + NONCE_LEN], blob[1 + NONCE_LEN:], aad)
    except InvalidTag:
        raise ContentUnavailable("encrypted content failed authentication "
                                 "(wrong patient/resource/version, tampered, or key destroyed)") from None


class DocumentCrypto:
    """Per-patient envelope encryption of content (see module docstring).

    ``storage`` (:class:`~fhir_dmp.storage.Storage`) keeps the wrapped data keys (collection
    ``datakeys``) and runs their queries.
    Unwrapped data keys are cached in memory (bounded LRU, ``cache_ttl``
    seconds): after :meth:`shred` in another process, that process may still
    decrypt for at most ``cache_ttl`` seconds — destroying a DMP also deletes
    its ciphertexts (``Storage.purge_dmp``), so nothing is left to read.
    """

    def __init__(self, storage, provider: KeyProvider, *, cache_size: int = 4096, cache_ttl: float = 60.0):
        self.storage = storage
        self.provider = provider
        self._cache = _KeyCache(cache_size, cache_ttl)

    # -- data keys
    def _unwrap_doc(self, doc: dict) -> AESGCM:
        raw = self.provider.unwrap(bytes(doc["wrapped"]), doc["kek_id"])
        return AESGCM(raw)

    def _key(self, patient_id: str, *, create: bool) -> AESGCM:
        """The patient's data key; created on first use when ``create`` (race-safe: unique _id)."""
        pid = str(patient_id)
        aead = self._cache.get(pid)
        if aead is not None:
            return aead
        doc = self.storage.data_key(pid)
        if doc is None:
            if not create:
                raise KeyUnavailable("no data key for this patient (never created or shredded)")
            raw = AESGCM.generate_key(256)
            wrapped, kid = _wrap(self.provider, raw)
            if self.storage.add_data_key({"_id": pid, "wrapped": wrapped, "kek_id": kid,
                                          "created": datetime.now(timezone.utc)}):
                aead = AESGCM(raw)
            else:  # another request created it first: use theirs
                doc = self.storage.data_key(pid)
                if doc is None:
                    raise KeyUnavailable("data key vanished while being created") from None
                aead = self._unwrap_doc(doc)
        else:
            aead = self._unwrap_doc(doc)
        self._cache.put(pid, aead)
        return aead

    # -- one-shot messages
    def encrypt(self, patient_id, resource_id, version, plaintext: bytes) -> bytes:
        """AES-256-GCM of ``plaintext`` under the patient's data key, bound to (patient, resource, version)."""
        aead = self._key(patient_id, create=True)
        nonce = os.urandom(NONCE_LEN)
        return FORMAT_V1 + nonce + aead.encrypt(nonce, plaintext, _aad(b"msg", patient_id, resource_id, version))

    def decrypt(self, patient_id, resource_id, version, blob: bytes) -> bytes:
        """Inverse of :meth:`encrypt`; :class:`ContentUnavailable` on any mismatch or missing key."""
        aead = self._key(patient_id, create=False)
        return _open(aead, blob, _aad(b"msg", patient_id, resource_id, version))

    # -- streams
    def encryptor(self, patient_id, resource_id, version, *, stream_id: str = "") -> ChunkEncryptor:
        """A :class:`ChunkEncryptor` for big content; ``stream_id`` (the blob id) is bound into every chunk."""
        return ChunkEncryptor(self._key(patient_id, create=True), patient_id, resource_id, version, stream_id)

    def decryptor(self, patient_id, resource_id, version, *, stream_id: str = "") -> ChunkDecryptor:
        return ChunkDecryptor(self._key(patient_id, create=False), patient_id, resource_id, version, stream_id)

    # -- lifecycle (crypto-shredding: Storage.purge_dmp deletes the data key first)
    def forget(self, patient_id) -> None:
        """Drop this process's cached copy of one patient's data key (after a destroy)."""
        self._cache.drop(str(patient_id))


# --------------------------------------------------------------------- rotation

def rotate_kek(config, storage, *, provider: LocalKeyFileProvider | None = None) -> int:
    """New KEK in the key file, then rewrap every data key with it, online.

    Content is never re-encrypted (data keys do not change). Each rewrap is a
    compare-and-set on the old wrapped value, so a data key shredded meanwhile
    stays deleted. Passes repeat until no data key is wrapped by an older KEK
    (covers keys created concurrently by processes that had not yet reloaded
    the key file). Returns the number of data keys rewrapped.
    """
    provider = provider or LocalKeyFileProvider(config.kek_path)
    new_id = provider.add_kek()
    count = 0
    for _ in range(10):
        for doc in storage.data_keys_not_wrapped_by(new_id):
            raw = provider.unwrap(bytes(doc["wrapped"]), doc["kek_id"])
            count += storage.rewrap_data_key(doc, provider.wrap_with(new_id, raw), new_id,
                                             datetime.now(timezone.utc))
        if storage.count_data_keys_not_wrapped_by(new_id) == 0:
            break
        time.sleep(0.05)
    return count


def retire_unused_keks(config, storage, *, provider: LocalKeyFileProvider | None = None) -> list[str]:
    """Remove from the key file every non-current KEK that no data key references; returns their ids."""
    provider = provider or LocalKeyFileProvider(config.kek_path)
    used = storage.kek_ids_in_use()
    removed = []
    for kid in provider.key_ids:
        if kid != provider.key_id and kid not in used:
            provider.remove_kek(kid)
            removed.append(kid)
    return removed
