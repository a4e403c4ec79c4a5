"""``fhir-dmp audit verify``: the journal's chains and signed checkpoints checked end to end.

Recomputes every link from the stored events (``chain.py``) and checks the heads, the events
left unsealed too long and, with the audit key, the signed checkpoints of ``sealer.py``.
"""
from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import GENESIS, SYSTEM_CHAIN, chain_hash, checkpoint_payload, key_id


def verify_chains(storage, patient_id: str | None = None, *, unsealed_bound_s: float = 60.0,
                  check_signatures: bool = False, public_key=None) -> list[str]:
    """Check every sealed chain (or one patient's): the problems found, [] when intact.

    Per chain, in seq order, first broken link first: ``patient X: missing
    seq 7``, ``patient X: event seq 12 (AuditEvent/abc) hash mismatch``,
    ``... prev does not match seq 11``, ``... pid field does not match its
    chain``, ``patient X: head points past last event``, ``... head hash
    does not match event seq n``. A head behind the newest event is not a
    problem (a crash between the event write and the head write).

    A run of entries whose metadata document is missing or names other entries (another ``u``,
    other ids: ``storage/runs.py``) is reported: searches would not find its entries.
    Events still unsealed are fine while young; ``N AuditEvent(s) left unsealed for more than
    S s`` once older than ``unsealed_bound_s`` (the sealer is not running or is stuck).
    With ``check_signatures`` the signed checkpoints (``sealer.py``) are checked with
    ``public_key`` (an Ed25519 public key, None = not configured): signatures, their chain,
    every chain's newest signed head against the stored event (a rebuilt chain), and sealed
    events that no checkpoint covers (deleted checkpoints).
    """
    problems: list[str] = []
    last: dict[str, tuple[int, str]] = {}
    signed: dict[str, tuple[int, str]] = {}
    if check_signatures:
        problems, signed = verify_checkpoints(storage, public_key, patient_id)

    cutoff = datetime.now(timezone.utc) - timedelta(seconds=unsealed_bound_s)
    stale = storage.count_unsealed_before(cutoff, patient_id)
    if stale:
        problems.append(f"{stale} AuditEvent(s) left unsealed for more than {unsealed_bound_s:g} s")
    orphans = storage.count_unchained(patient_id)
    if orphans:
        problems.append(f"{orphans} AuditEvent(s) without a chain position")
    unlisted = storage.runs_unlisted(patient_id)
    if unlisted:
        problems.append(f"{len(unlisted)} run(s) whose metadata does not list their entries (searches miss them): "
                        + ", ".join(unlisted[:5]))

    pid = None
    expected, prev_hash = 1, GENESIS
    for doc in storage.sealed_events(patient_id):
        chain = doc["chain"]
        if chain["pid"] != pid:
            pid, expected, prev_hash = chain["pid"], 1, GENESIS
        where = f"patient {pid}"
        seq = chain["seq"]
        ref = f"AuditEvent/{doc['_id']}"
        gap = seq != expected
        if gap:
            missing = f"{expected}" if seq == expected + 1 else f"{expected}-{seq - 1}"
            problems.append(f"{where}: missing seq {missing}")
        elif chain.get("prev") != prev_hash:
            problems.append(f"{where}: event seq {seq} ({ref}) prev does not match seq {seq - 1}")
        if chain_hash(chain.get("prev") or "", doc.get("res") or {}) != chain.get("hash"):
            problems.append(f"{where}: event seq {seq} ({ref}) hash mismatch")
        expected_pid = None if pid == SYSTEM_CHAIN else pid
        if doc.get("pid") != expected_pid or (doc.get("res") or {}).get("id") != doc["_id"]:
            problems.append(f"{where}: event seq {seq} ({ref}) pid or id field does not match its chain")
        if check_signatures and pid in signed and signed[pid][0] == seq and signed[pid][1] != chain.get("hash"):
            problems.append(f"{where}: event seq {seq} ({ref}) does not match the signed checkpoint "
                            "(the chain was rebuilt)")
        expected, prev_hash = seq + 1, chain.get("hash")
        last[pid] = (seq, chain.get("hash"))

    if check_signatures:
        for cpid, (seq, _h) in sorted(last.items()):
            signed_seq = signed.get(cpid, (0, ""))[0]
            if seq > signed_seq:
                problems.append(f"patient {cpid}: seq {signed_seq + 1}-{seq} not covered by a signed checkpoint")
            elif signed_seq > seq:
                problems.append(f"patient {cpid}: a signed checkpoint has seq {signed_seq} "
                                f"but the chain ends at {seq}")
        destroyed = storage.destroyed_chains()
        for cpid, (signed_seq, _h) in sorted(signed.items()):
            if cpid not in last and cpid not in destroyed:
                problems.append(f"patient {cpid}: a signed checkpoint has seq {signed_seq} "
                                "but the chain has no event")

    for head in storage.chain_heads(patient_id):
        hpid = head["_id"]
        seq, hsh = last.get(hpid, (0, GENESIS))
        if head["seq"] > seq:
            problems.append(f"patient {hpid}: head points past last event "
                            f"(head seq {head['seq']}, last event seq {seq})")
        elif head["seq"] == seq and head.get("hash") != hsh:
            problems.append(f"patient {hpid}: head hash does not match event seq {seq}")
    return problems


def verify_checkpoints(storage, public: Ed25519PublicKey | None, patient_id: str | None = None
                       ) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """Check the checkpoint chain and signatures; (problems, latest signed head per chain).

    With ``public`` None nothing can be checked: a problem if checkpoints exist.
    """
    problems: list[str] = []
    signed: dict[str, tuple[int, str]] = {}
    if public is None:
        if storage.has_checkpoints():
            problems.append("signed checkpoints exist but no audit signing key is configured to check them")
        return problems, signed
    kid = key_id(public)
    expected, prev = 1, GENESIS
    for cp in storage.checkpoints():
        n = cp["_id"]
        if n != expected:
            problems.append(f"checkpoint {expected} missing" if n == expected + 1
                            else f"checkpoints {expected}-{n - 1} missing")
        elif cp.get("prev") != prev:
            problems.append(f"checkpoint {n} does not follow checkpoint {n - 1}")
        try:
            body = checkpoint_payload(cp)
            if cp.get("key_id") != kid:
                raise InvalidSignature()
            public.verify(base64.b64decode(cp.get("sig") or ""), body)
        except (InvalidSignature, KeyError, ValueError, TypeError):
            problems.append(f"checkpoint {n}: signature does not verify with the audit key")
            expected, prev = n + 1, cp.get("digest")
            continue
        if hashlib.sha256(body).hexdigest() != cp.get("digest"):
            problems.append(f"checkpoint {n}: digest mismatch")
        for pid, seq, hsh in cp.get("heads") or ():
            if patient_id is not None and pid != patient_id:
                continue
            if seq >= signed.get(pid, (0, ""))[0]:
                signed[pid] = (seq, hsh)
        expected, prev = n + 1, cp.get("digest")
    return problems, signed
