"""The journal sealer: links unsealed AuditEvents into their per-patient hash chains and
signs checkpoints of the chain heads (DESIGN.md "Audit").

Requests append their AuditEvents *unsealed* (``fhir_dmp.audit.log.AuditLog``): one page per
group commit (``AuditEvent_page``), durable before the answer, but outside any chain, so
concurrent reads of one DMP never conflict on its chain head (and readable at once: every read
of the journal sees through the pages, ``storage/pages.py``). The sealer, one at a time across
every server process, then:

1. holds a lease in the database (collection ``audit_sealer_lease``, one document
   ``{_id: "sealer", owner, until}``); a process seals only while it holds the lease, and
   each sealing transaction renews it (a fencing write: two sealers cannot both commit);
2. takes the oldest pages (time of append, then ``_id``) holding about ``batch`` events,
   derives each event's entry (the common layout, its search index ``s``/``o`` extracted here,
   off the request path: ``storage.pages.entries``), links each event to its chain from the
   content digest its page holds (one run of links per chain in ``AuditEvent_link``, as in
   ``chain.py``, which also holds the entries it seals: ``storage/runs.py``, one document per
   chain and pass instead of one per event, its metadata in one more), deletes those pages,
   moves the heads (``AuditEvent_chain``) and writes a signed checkpoint, all in ONE
   transaction: a crash leaves either everything or nothing, and running it again only seals
   what is still in a page (idempotent);
3. signs a checkpoint of the heads it moved, like Certificate Transparency's signed tree
   heads (RFC 6962 §3.5): ``{n, prev, at, heads: [[pid, seq, hash], ...]}`` in canonical
   JSON, Ed25519 signature by a key kept OUTSIDE the database (a PEM file, ``config.
   audit_key_path``), checkpoints chained by ``prev`` = SHA-256 of the previous one.
   Someone with write access to the database alone can no longer rebuild a chain unnoticed:
   the rebuilt hashes would not match the signed heads, and deleting checkpoints leaves
   sealed events that no checkpoint covers (``fhir-dmp audit verify`` reports both).

A database written by the previous version may still hold ``AuditEvent_queue`` documents (their
events already entries in ``AuditEvent``, not linked): each sealer looks for them when it starts,
and while it finds some it links them (from their queued digests), oldest first, before any page,
under the same rules (queue documents deleted, heads moved, checkpoint, one transaction). Once the
old collection is empty, nothing more is asked of it.

Several ``fhir-dmp serve`` processes on one database must share the key file.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..runtime.secret_files import write_secret
from ..storage.errors import Outage, StorageClosed, StorageError
from ..storage.pages import entries
from ..storage.runs import RUN_MAX_BYTES, stored_size
from .chain import GENESIS, SYSTEM_CHAIN, checkpoint_payload, key_id, link_hash

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another process holds the sealer lease."""


# --- the signing key (outside the database) ----------------------------------------------

def load_signing_key(path: Path, *, create: bool = False) -> Ed25519PrivateKey | None:
    """The Ed25519 private key in ``path`` (PEM, PKCS#8); created 0600 when asked and absent."""
    path = Path(path)
    if not path.exists():
        if not create:
            return None
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if not write_secret(path, pem):   # two processes starting together keep the first key
            return load_signing_key(path)
        return key
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


# --- the sealer ---------------------------------------------------------------------------

class Sealer:
    """Seals the journal while it holds the lease (see module docstring). Thread-safe enough
    to run as one background thread per process (:meth:`start`) or by hand (:meth:`seal_all`).
    """

    def __init__(self, storage, key_path: Path, *, lease_s: float = 10.0, batch: int = 500,
                 interval: float = 0.5, run_bytes: int = RUN_MAX_BYTES):
        self.storage = storage
        self.key = load_signing_key(key_path, create=True)
        self.kid = key_id(self.key.public_key())
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self.batch = batch
        self.interval = interval
        self.run_bytes = run_bytes
        self._stop = threading.Event()
        #: the last pass left pages behind it (:meth:`seal_once`)
        self.more = False
        #: look for the previous version's queue documents: at start, and while the last look found some
        self._old_queue = True
        self._thread: threading.Thread | None = None
        # every sealing transaction runs in this one session, named in the lease: whoever takes
        # the lease after it expired can end it (storage.take_sealer_lease), so a sealer killed
        # mid-transaction does not leave the lease document locked
        self._session = storage.client.start_session()

    # -- lease
    def acquire(self) -> bool:
        """Take or renew the lease; False when another live process holds it."""
        now = datetime.now(timezone.utc)
        with self.storage.deadline():
            return self.storage.take_sealer_lease(self.owner, now, now + timedelta(seconds=self.lease_s),
                                                  lsid=self._session.session_id)

    def release(self) -> None:
        try:
            self.storage.release_sealer_lease(self.owner)
        except StorageError:
            pass

    # -- sealing
    def seal_once(self) -> int:
        """Seal up to ``batch`` of the oldest unsealed events in one transaction; the number sealed.
        :attr:`more` then says whether pages were left beyond this pass (a pass takes whole pages,
        so it often seals a little less than ``batch`` with a backlog behind it).

        Raises :class:`LeaseLost` when this process does not hold the lease. Bounded, retries
        included, by FHIR_DMP_DB_WAIT (``StoreCore.deadline``): past it a StorageError and
        nothing sealed (the transaction is aborted).
        """
        with self.storage.deadline():
            return self.storage.run_in_session(self._session, self._seal)

    def seal_all(self) -> int:
        """Take the lease and seal until nothing is left (``fhir-dmp audit seal``, tests)."""
        if not self.acquire():
            raise LeaseLost("another process holds the sealer lease")
        total = 0
        while True:
            n = self.seal_once()
            total += n
            if not (n and self.more):
                return total

    def _seal(self, session) -> int:
        storage = self.storage
        now = datetime.now(timezone.utc)
        if not storage.renew_sealer_lease(self.owner, now, now + timedelta(seconds=self.lease_s),
                                          session=session):
            raise LeaseLost("the sealer lease is not held by this process")
        if self._old_queue:   # the previous version's queue first: its events were appended before any page
            queues, _ = storage.unsealed_pages(self.batch, session=session, old=True)
            if queues:
                self.more = True   # the next pass looks again, then goes on to the pages
                events = [{"_id": i["e"], "pid": i.get("p"), "d": i["d"]} for q in queues for i in q["items"]]
                return self._link(session, now, events, [], [q["_id"] for q in queues], old=True)
            self._old_queue = False
        pages, self.more = storage.unsealed_pages(self.batch, session=session)
        if not pages:
            return 0
        return self._link(session, now, [e for page in pages for e in page["events"]],
                          [d for page in pages for d in entries(page)], [page["_id"] for page in pages])

    def _link(self, session, now: datetime, events: list[dict], docs: list[dict], ids: list[str], *,
              old: bool = False) -> int:
        """Link ``events`` (``{_id, pid, d}``, in append order) into their chains, store each chain's
        run of links with the entries ``docs`` it seals, delete the pages (``old``: queue documents,
        whose entries are stored already: ``docs`` empty) ``ids``, move the heads and sign a
        checkpoint, in ``session``'s transaction; the number of events linked."""
        storage = self.storage
        pids = list(dict.fromkeys(e.get("pid") or SYSTEM_CHAIN for e in events))
        heads = {pid: (0, GENESIS) for pid in pids}
        heads.update(storage.heads_of(pids, session=session))
        by_id = {d["_id"]: d for d in docs}     # each run holds the entries it seals (storage/runs.py)
        runs: dict[str, list[dict]] = {}   # per chain, its runs of links (one, unless it grows too large)
        for e in events:   # the digest is in the page: the canonical JSON is not hashed again
            pid = e.get("pid") or SYSTEM_CHAIN
            seq, prev = heads[pid]
            size = stored_size(by_id[e["_id"]]) if e["_id"] in by_id else 0
            chain = runs.setdefault(pid, [])
            if not chain or chain[-1]["size"] + size > self.run_bytes:   # a run stays far below 16 MB
                chain.append({"pid": pid, "first": seq + 1, "prev": prev, "links": [], "size": 0})
            hsh = link_hash(prev, e["d"])
            heads[pid] = (seq + 1, hsh)
            chain[-1]["links"].append([e["_id"], hsh])
            chain[-1]["size"] += size
        storage.seal_pages([(run, [by_id[eid] for eid, _ in run["links"] if eid in by_id])
                            for chain in runs.values() for run in chain], ids, session=session, old=old)
        storage.move_heads(heads, now, session=session)
        last = storage.last_checkpoint(session=session)
        cp = {"n": (last["_id"] + 1) if last else 1, "prev": last["digest"] if last else GENESIS,
              "at": now.isoformat(timespec="milliseconds"),
              "heads": [[pid, heads[pid][0], heads[pid][1]] for pid in sorted(pids)]}
        body = checkpoint_payload(cp)
        storage.add_checkpoint({"_id": cp["n"], **cp, "digest": hashlib.sha256(body).hexdigest(),
                                "key_id": self.kid,
                                "sig": base64.b64encode(self.key.sign(body)).decode("ascii")},
                               session=session)
        return len(events)

    # -- background loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-sealer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and give the lease back; once (it is also registered to run at exit)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():   # stuck in a database call: the lease expires by itself
                return
        self.release()

    def _run(self) -> None:
        # a database away (step-down, dropped connections): each pass is bounded by
        # FHIR_DMP_DB_WAIT (StoreCore.deadline, in acquire and seal_once); one log line, short
        # pauses, sealing again within a second or so of its return (storage.errors.Outage)
        outage = Outage(log, "audit sealer")
        while not self._stop.is_set():
            pause = self.interval
            try:
                if self.acquire():   # False: another holds it, or the lease write timed out
                    while not self._stop.is_set() and self.seal_once() and self.more:
                        pass
                    outage.ok()
            except LeaseLost:
                pass
            except StorageClosed:   # the client was closed: this process is going away
                return
            except Exception as exc:   # noqa: BLE001 — keep sealing after a database hiccup
                pause = outage.failed(exc)
            self._stop.wait(pause)
