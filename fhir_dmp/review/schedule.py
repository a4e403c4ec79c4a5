"""The hourly misuse scan of ``serve`` (CONTRACT.md "Privacy operations"): one process at a time.

Each server worker starts a :class:`ScanScheduler` (``runtime/services.py``); every ``interval``
seconds it tries to claim the hour's run in the database (``Storage.claim_daily_run`` with job
``privacy-scan`` and a period of one hour: a compare-and-set on the job's ``next_run`` in
``scheduled_jobs``, as retention's daily run), and the one worker that wins runs the scan over
the journal since the last scan (``review/scan.py``). A run that fails is retried the next hour;
the window then starts where the last successful scan ended.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from ..storage import now
from ..storage.errors import StorageClosed

log = logging.getLogger(__name__)

JOB = "privacy-scan"
PERIOD = timedelta(hours=1)


class ScanScheduler:
    """Runs ``scan()`` at most once per :data:`PERIOD` across every process on the database."""

    def __init__(self, storage, scan, *, owner: str | None = None, interval: float = 300.0):
        self.storage = storage
        self.scan = scan
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """Run the scan if this process claims the hour; True when it did."""
        if not self.storage.claim_daily_run(JOB, self.owner, now(), PERIOD):
            return False
        try:
            self.scan()
        except Exception:  # noqa: BLE001 — a failed scan is retried the next hour, the server goes on
            log.exception("privacy scan failed")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except StorageClosed:     # the client was closed: this process is going away
                return
            except Exception:  # noqa: BLE001 — database away: try again at the next tick
                log.warning("privacy scan scheduler could not reach the database")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fhir-dmp-privacy-scan", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
