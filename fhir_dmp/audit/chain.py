"""The hash chains of the journal: canonical JSON, content digests, links, checkpoint bytes.

What is hashed and signed, shared by the writer (``log.py`` digests each event as it is
appended, ``sealer.py`` links and signs) and the checker (``verify.py``). Storage layout
(collections ``AuditEvent_link``, ``AuditEvent_chain``, ``AuditEvent_checkpoint``: ``log.py``,
``sealer.py``)::

    digest = SHA-256( canonical_json(res) )          # sorted keys, no whitespace, UTF-8
    hash   = SHA-256( prev_hex_ascii + digest_hex_ascii )
    prev   = hash of seq n-1, or 64 zeros (GENESIS) for seq 1

One chain per patient, and :data:`SYSTEM_CHAIN` for the events of no patient.
"""
from __future__ import annotations

import hashlib
import json

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SYSTEM_CHAIN = "_system"
GENESIS = "0" * 64


def canonical_json(res: dict) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (the bytes the chain hashes): orjson (bench/README.md,
    "JSON out"); the standard library's same bytes for what orjson refuses (an
    integer beyond 64 bits, a key that is not a string)."""
    try:
        return orjson.dumps(res, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(res, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_digest(res: dict | bytes) -> str:
    """SHA-256 of the event's canonical JSON (``res``, or those bytes already serialized):
    computed once at append time and queued with the event, so the sealer links events without
    reading them back."""
    return hashlib.sha256(res if isinstance(res, bytes) else canonical_json(res)).hexdigest()


def link_hash(prev: str, digest: str) -> str:
    """A chain link: SHA-256 of the previous link's hash and the event's content digest."""
    return hashlib.sha256(prev.encode("ascii") + digest.encode("ascii")).hexdigest()


def chain_hash(prev: str, res: dict) -> str:
    """The link of event ``res`` after ``prev`` (what the verifier recomputes)."""
    return link_hash(prev, content_digest(res))


def key_id(public: Ed25519PublicKey) -> str:
    """The short id of a checkpoint signing key: the first 16 hex digits of its raw bytes' SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_payload(cp: dict) -> bytes:
    """The bytes a checkpoint's signature and digest cover (``n``, ``prev``, ``at``, ``heads``)."""
    return canonical_json({k: cp[k] for k in ("n", "prev", "at", "heads")})
