"""One-time codes for a professional's first access (CONTRACT.md "Lifecycle of a DMP",
``FHIR_DMP_FIRST_ACCESS=patient-code``).

Storage side only (collection ``access_codes``, queried by :class:`~fhir_dmp.storage.Storage`); the guarded repository decides
who may ask for a code and when one is needed. A code is 6 digits, single use,
valid :data:`TTL`, void after :data:`MAX_TRIES` wrong tries. Only a salted
PBKDF2 hash of it is stored (the message to the patient carries the code until
it is delivered, then the outbox forgets it).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta, timezone

TTL = timedelta(minutes=10)
MAX_TRIES = 5
_ITERATIONS = 20_000


def _hash(code: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", code.encode("ascii", "replace"), salt, _ITERATIONS)


def issue(storage, pid: str, ps: str, *, at: datetime | None = None) -> str:
    """A new code for (DMP, PS); earlier unused codes of that pair are void."""
    at = at or datetime.now(timezone.utc)
    code = f"{secrets.randbelow(10 ** 6):06d}"
    salt = secrets.token_bytes(16)
    storage.replace_access_code({"_id": secrets.token_hex(12), "pid": pid, "ps": ps, "salt": salt,
                                 "hash": _hash(code, salt), "created": at, "expires": at + TTL,
                                 "tries": 0, "used": False})
    return code


def consume(storage, pid: str, ps: str, code: str | None, *, at: datetime | None = None) -> str | None:
    """Use the code (single use). None when it is right; else why it is refused."""
    at = at or datetime.now(timezone.utc)
    doc = storage.live_access_code(pid, ps, at, MAX_TRIES)
    if doc is None:
        return "no valid access code: ask for one with Patient/$access-code"
    if not code or not hmac.compare_digest(_hash(code.strip(), bytes(doc["salt"])), bytes(doc["hash"])):
        storage.count_access_code_try(doc["_id"])
        return "the patient's access code is missing or wrong (X-Patient-Access-Code)"
    return None if storage.use_access_code(doc["_id"], at) else "this access code has already been used"
