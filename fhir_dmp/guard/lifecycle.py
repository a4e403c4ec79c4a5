"""A DMP's life after it opens: close, reopen, retention, destroy (CONTRACT.md "Lifecycle of a DMP").

No HTTP, no policy. The guarded repository decides who may
(``security/decision/``) and journals; the database is changed through
:class:`~fhir_dmp.storage.Storage` (which alone runs the queries).

* :func:`stamp_active_change` — a DMP that closes gets ``closed_at`` on its
  stored Patient document (``Storage.mark_closed``: beside ``res``, not part of
  the resource); reopening removes it. Retention counts from ``closed_at``.
* ``Storage.purge_dmp`` — everything the database holds about one DMP, removed
  inside the caller's transaction (all or nothing): the data key
  (crypto-shredding), encrypted content, every resource of the compartment and
  its history, break-glass grants, notices (the outbox holds email addresses
  and phone numbers), access codes, and the DMP's own journal chain;
  :meth:`GuardedRepository.destroy_dmp <fhir_dmp.guard.dmp.DmpOperations.destroy_dmp>`
  runs it with :func:`destroy_event`, the one system-journal entry a destroy leaves.
* :func:`retention_due` / :func:`run_retention` / :class:`RetentionScheduler` —
  closed DMPs whose retention (``FHIR_DMP_RETENTION_YEARS``) has passed;
  ``fhir-dmp retention run`` destroys them, and ``serve`` does so once a day
  (one process at a time, through a lease in the ``scheduled_jobs`` collection),
  each destroy through a repository the caller's factory opens (this module
  imports no repository).
* :class:`DestroyedRegister` / :func:`reapply_destroys` — each destroy, once committed, appends
  a line (time, Patient id; nothing personal) to a file outside the database
  (``FHIR_DMP_DESTROYED_REGISTER``, default ``destroyed.log`` in the data dir); ``fhir-dmp
  restore`` purges again every DMP of a backup that the register says was destroyed after it.

What remains after a destroy (stated, not hidden): one entry in the system
journal (who destroyed a DMP and when; no patient id, INS, name or contact);
copies in database backups taken before the destroy — their document content
stays unreadable once every key-encryption key that wrapped the deleted data
key is retired (``fhir-dmp keys rotate`` retires them), but their metadata
(Patient, DocumentReference JSON) is plain and only ages out with the backups.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta, timezone

from ..audit.events import add_years
from ..security.decision.basis import BASIS_EXTENSION, basis_coding, outside_dmp_basis
from ..security.principal import ADMIN, Principal
from ..security.scopes import Scopes
from ..storage import instant
from ..storage.errors import Outage, StorageClosed, StorageError
from .journal import RequestInfo

log = logging.getLogger(__name__)

DAY = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- close / reopen ----------------------------------------------------------------------------
def active_change(old: dict | None, new: dict | None) -> str | None:
    """'close', 'reopen' or None for a Patient write (``active`` absent = open)."""
    was = (old or {}).get("active", True) is not False
    now_open = (new or {}).get("active", True) is not False
    if old is None:
        return "close" if not now_open else None
    if was and not now_open:
        return "close"
    if not was and now_open:
        return "reopen"
    return None


def stamp_active_change(storage, old: dict | None, new: dict | None, stored, *, session) -> None:
    """After a Patient write: closing stamps ``closed_at`` (retention counts from it), reopening
    removes it, in the write's transaction."""
    change = active_change(old, new)
    if change == "close":
        storage.mark_closed(stored.id, stored.lu, session=session)
    elif change == "reopen":
        storage.mark_reopened(stored.id, session=session)


# -- destroy -----------------------------------------------------------------------------------
def destroy_event(actor_kind: str, at: datetime, *, source_observer: str, reason: str) -> dict:
    """The one system-journal AuditEvent a destroy leaves: who (a role, not a person's
    identifier), when, why; nothing that names the patient."""
    return {
        "resourceType": "AuditEvent",
        "extension": [{"url": BASIS_EXTENSION, "valueCoding": basis_coding(outside_dmp_basis(actor_kind, True))}],
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "Restful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "delete",
                     "display": "delete"}],
        "action": "D",
        "recorded": instant(at),
        "outcome": "0",
        "outcomeDesc": f"a DMP was destroyed ({reason})",
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP"}]},
                   "role": [{"coding": [{"system": "urn:fhir-dmp:audit", "code": actor_kind}]}],
                   "requestor": True}],
        "source": {"observer": {"display": source_observer},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
        "entity": [{"type": {"system": "urn:fhir-dmp:audit", "code": "decision"},
                    "detail": [{"type": "rule", "valueString": "destroy-dmp"},
                               {"type": "result", "valueString": "permit"}]}],
    }


# -- the register of destroyed DMPs ---------------------------------------------------------------
class DestroyedRegister:
    """The destroyed DMP ids, one line each (``<ISO time> <Patient id>``), appended to a file kept
    outside the database so that a restored backup does not bring a destroyed DMP back."""

    def __init__(self, path):
        self.path = path

    def record(self, pid: str, at: datetime) -> None:
        """Append (one ``write`` in append mode: lines of concurrent writers do not interleave)
        and sync, after the destroy's transaction has committed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{instant(at)} {pid}\n")
            f.flush()
            os.fsync(f.fileno())

    def since(self, at: datetime) -> list[str]:
        """The ids recorded at or after ``at``, in order (none when there is no register)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            stamp, _, pid = line.strip().partition(" ")
            if pid and datetime.fromisoformat(stamp.replace("Z", "+00:00")) >= at and pid not in out:
                out.append(pid)
        return out


#: clocks of the hosts that destroy and back up may differ by this much: a purge applied twice is harmless
CLOCK_SKEW = timedelta(minutes=5)


def reapply_destroys(storage, register: DestroyedRegister, backup_time: datetime) -> list[str]:
    """After a restore: purge again (``Storage.purge_dmp``, one transaction each) every DMP of the
    restored database that ``register`` says was destroyed after the backup; returns their ids."""
    done = []
    for pid in register.since(backup_time - CLOCK_SKEW):
        if storage.was_destroyed(pid):
            continue
        storage.run_transaction(lambda s, pid=pid: storage.purge_dmp(pid, session=s))
        done.append(pid)
    return done


# -- retention -----------------------------------------------------------------------------------
def retention_due(storage, years: int, at: datetime) -> list[str]:
    """Ids of closed DMPs whose retention has passed at ``at``."""
    return storage.closed_before(add_years(at, -years))


def claim_daily_run(storage, owner: str, at: datetime, *, job: str = "retention") -> bool:
    """True for exactly one caller per day across processes (compare-and-set on ``next_run``)."""
    return storage.claim_daily_run(job, owner, at, DAY)


def run_retention(backend, open_repository, at: datetime | None = None) -> int:
    """Destroy every closed DMP past retention (``fhir-dmp retention run``); returns how many.

    Each destroy goes through a guarded repository, ``open_repository(backend, principal, info)``
    (:class:`~fhir_dmp.guard.repository.GuardedRepository`), as the system administrator, so it
    is decided, all or nothing, and leaves its system-journal entry like any other.
    """
    at = at or _now()
    system = Principal(kind=ADMIN, subject="fhir-dmp retention", scopes=Scopes.ALL)
    done = 0
    storage = backend.storage
    with storage.deadline():
        due = retention_due(storage, backend.config.retention_years, at)
    for pid in due:
        # each destroy bounded like a request's (FHIR_DMP_DB_WAIT): all or nothing, its event included
        with storage.deadline():
            repo = open_repository(backend, system, RequestInfo(request_id="retention"))
            repo.destroy_dmp(pid, reason="retention period over")
            repo.flush_audit()
        done += 1
    return done


class RetentionScheduler:
    """Runs ``job()`` at most once a day across every process sharing the database.

    Each ``serve`` worker starts one; they check every ``interval`` seconds and
    the database lease (:func:`claim_daily_run`) lets one of them run it.
    """

    def __init__(self, storage, job, *, owner: str, interval: float = 600.0):
        self.storage = storage
        self.job = job
        self.owner = owner
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Run the day's job if this process wins the day's claim; True if it did.

        A database away while the job runs (a StorageError) is waited out, short pauses, and the
        job run again (it is idempotent: it destroys what is still due) once the database is
        back; any other failure is logged and the job retried the next day."""
        with self.storage.deadline():
            if not claim_daily_run(self.storage, self.owner, _now()):
                return False
        outage = Outage(log, "retention run")
        while not self._stop.is_set():
            try:
                count = self.job()
                outage.ok()
                log.info("retention: %s closed DMP(s) past retention destroyed", count)
                return True
            except StorageClosed:
                raise
            except StorageError as exc:
                self._stop.wait(outage.failed(exc))
            except Exception:  # noqa: BLE001 — a failed run is retried the next day, the server goes on
                log.exception("retention run failed")
                return True
        return True

    def _loop(self) -> None:
        # the day's claim unreachable (database away): one log line, retried within a second or
        # so of the database's return, not at the next interval (storage.errors.Outage)
        outage = Outage(log, "retention scheduler")
        while not self._stop.is_set():
            try:
                self.tick()
                outage.ok()
                pause = self.interval
            except StorageClosed:   # the client was closed: this process is going away
                return
            except Exception as exc:  # noqa: BLE001 — database away: try again shortly
                pause = outage.failed(exc)
            self._stop.wait(pause)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fhir-dmp-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def start_daily_retention(app, open_repository) -> RetentionScheduler | None:
    """In a ``serve`` worker: the daily retention run through repositories ``open_repository``
    opens (as :func:`run_retention`); None for an app that is not ours."""
    backend = (getattr(app, "extensions", None) or {}).get("fhir_dmp")
    if backend is None:
        return None
    scheduler = RetentionScheduler(backend.storage, lambda: run_retention(backend, open_repository),
                                   owner=f"{socket.gethostname()}:{os.getpid()}")
    scheduler.start()
    return scheduler
