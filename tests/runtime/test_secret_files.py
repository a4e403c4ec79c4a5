"""Secret files created by several processes at once are never read half-written
(fhir_dmp/runtime/secret_files.py): the sealer's signing key, the portal's session secret, the dev
signing key and the KEK file all go through ``write_secret``."""
from __future__ import annotations

import multiprocessing
import stat

from cryptography.hazmat.primitives import serialization

from fhir_dmp.runtime.secret_files import write_secret
from fhir_dmp.audit.sealer import load_signing_key


def _load_key(path, start, out):
    start.wait()
    try:
        key = load_signing_key(path, create=True)
        out.put(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    except Exception as exc:  # noqa: BLE001 — reported to the parent
        out.put(repr(exc))


def test_processes_starting_together_share_one_whole_signing_key(tmp_path):
    """Workers booting together on a fresh data dir: each gets the same key, none reads an empty
    file (which a bare O_EXCL create-then-write allowed)."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"audit-{attempt}.pem"
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_load_key, args=(path, start, out)) for _ in range(8)]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert len(set(results)) == 1 and isinstance(results[0], bytes), results
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_secret_keeps_the_first_unless_asked_to_replace(tmp_path):
    path = tmp_path / "sub" / "secret"
    assert write_secret(path, b"first") is True
    assert write_secret(path, b"second") is False and path.read_bytes() == b"first"
    assert write_secret(path, b"third", replace=True) is True and path.read_bytes() == b"third"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]     # no temp file left
