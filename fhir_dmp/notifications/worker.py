"""The notification worker: claims queued notices from the outbox and sends them (email, SMS).

Delivery (the transactional-outbox pattern; CONTRACT.md: a pending notice is sent once, also
across a SIGKILL of the server or of the database):

- a message is claimed atomically (``find_one_and_update``: pending and due,
  or sending with an expired lease -> sending, ``claimed_by``, ``lease_until``);
  a worker that dies before handing it over leaves a lease that expires, and
  another worker takes the message over: nothing is lost (at-least-once up
  to the hand-over);
- email, at-most-once across the hand-over: once the relay answered SMTP
  ``DATA`` with 354 (after the connection, STARTTLS, ``MAIL`` and ``RCPT`` were
  accepted) and before the message goes (from then on the relay may hold it
  whatever happens to us), the worker records ``handed_over_at`` while it
  still holds the lease. A message found
  with ``handed_over_at`` and an expired lease (its worker was killed, or the
  database went away before ``sent`` was written) is not sent again: it is
  completed with ``outcome_unknown`` and its Communication gets status
  ``unknown``; so is one whose ``DATA`` was cut off without an SMTP reply. SMTP
  has no idempotency key a relay must honour, so a second copy could not be
  taken back; the window where the copy may be lost is the transmission of
  one small message to the relay. An SMTP reply refusing it (4xx/5xx) is a
  definite "not delivered": retried or failed as below. The ``Message-ID``
  is the message id;
- SMS, at-least-once: the gateway deduplicates on the ``Idempotency-Key``
  header (the message id), so a message whose worker died is posted again;
- ``sent_at`` is set in the same update as ``status: sent`` (filtered on
  ``status != sent``, so only one worker completes a message and calls
  ``on_result``), and right before the transport call the worker re-reads the
  message and skips it if it is already ``sent``. The lease (60 s) is kept
  well above the transport timeouts (10 s) so a live worker never loses its
  lease while sending. While the database is away a worker retries recording its hand-over
  and ``sent`` (for up to half its lease), so that an outcome it knows is not left unknown.

Retries: exponential back-off (``base_delay * 2**(attempts-1)``, capped,
with jitter) on any transport failure (SMTP connection/4xx, HTTP non-2xx,
timeouts); after ``max_attempts`` the message is ``failed`` and
``on_result(msg, "not-done", reason)`` is called. An SMTP 5xx answer is
permanent and fails at once. A channel that is not configured (no SMTP host,
no SMS webhook) is never claimed: its messages stay ``pending`` (queued, not
sent) until a worker with that channel configured runs.

Logs carry message ids and channels only: never bodies, addresses or numbers.
"""
from __future__ import annotations

import logging
import random
import smtplib
import socket
import ssl
import threading
import uuid
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import formatdate
from typing import Callable

import requests

from ..storage import StorageError
from ..storage.errors import Outage, StorageClosed

log = logging.getLogger(__name__)


# --- transports -----------------------------------------------------------------

class PermanentFailure(Exception):
    """The transport refused the message for good: no retry."""


class LostMessage(Exception):
    """Another worker took the message over before this one handed it to the transport."""


class _SMTP(smtplib.SMTP):
    """smtplib's client calling ``before_data()`` once the relay answered ``DATA`` with 354 and
    before the message goes: from then on the relay may hold it (RFC 5321 4.1.1.4)."""

    def __init__(self, *args, before_data: Callable[[], None], **kwargs):
        self.before_data = before_data
        self._in_data = False
        super().__init__(*args, **kwargs)

    def data(self, msg):
        self._in_data = True
        try:
            return super().data(msg)
        finally:
            self._in_data = False

    def getreply(self):
        code, text = super().getreply()
        if self._in_data and code == 354:     # "start mail input": the message is next
            self._in_data = False
            self.before_data()
        return code, text


def send_email(config, message: dict, *, timeout: float = 10, hand_over: Callable[[], None] = lambda: None) -> None:
    """Deliver one email through ``config.smtp_host``: EHLO, STARTTLS when
    offered (certificate verified), UTF-8 body; ``hand_over()`` runs between the relay's 354
    and the message (it may raise :class:`LostMessage` to send nothing). SMTP 5xx -> PermanentFailure."""
    msg = EmailMessage()
    msg["Subject"] = message["subject"]
    msg["From"] = config.smtp_from
    msg["To"] = message["to"]
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{message['_id']}@fhir-dmp>"
    msg.set_content(message["body"], charset="utf-8")
    try:
        with _SMTP(config.smtp_host, config.smtp_port, timeout=timeout, before_data=hand_over) as smtp:
            smtp.ehlo()
            if smtp.has_extn("starttls"):
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            smtp.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [c for c, _ in exc.recipients.values()]
        if codes and all(c >= 500 for c in codes):
            raise PermanentFailure(f"SMTP {codes[0]}") from None
        raise RuntimeError(f"SMTP {codes[0] if codes else '?'}") from None
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500:
            raise PermanentFailure(f"SMTP {exc.smtp_code}") from None
        raise RuntimeError(f"SMTP {exc.smtp_code}") from None


def send_sms(config, message: dict, *, timeout: float = 10) -> None:
    """POST ``{"to", "text"}`` to ``config.sms_webhook_url``; non-2xx -> retry."""
    resp = requests.post(config.sms_webhook_url, json={"to": message["to"], "text": message["body"]},
                         headers={"Idempotency-Key": message["_id"]}, timeout=timeout)
    if not 200 <= resp.status_code < 300:
        raise RuntimeError(f"HTTP {resp.status_code}")


def _is_reply(exc: BaseException) -> bool:
    """The transport answered (an SMTP or HTTP status): a definite "not delivered"."""
    return isinstance(exc, (PermanentFailure, RuntimeError)) and str(exc).startswith(("SMTP", "HTTP"))


def _reason(channel: str, exc: BaseException) -> str:
    """A failure reason without personal data (no address, no body)."""
    if _is_reply(exc):
        return f"{channel}: {exc}"
    return f"{channel}: {type(exc).__name__}"


# --- worker -------------------------------------------------------------------

class Worker:
    """Claims due messages and sends them; ``start()`` runs it in a thread.

    ``on_result(message, "completed" | "not-done" | "unknown", reason)`` is called once
    per message, by the worker that completed or gave it up (``unknown``: module docstring).
    """

    def __init__(self, storage, config, *, on_result: Callable[[dict, str, str | None], None] | None = None,
                 worker_id: str | None = None, lease_seconds: float = 60, max_attempts: int = 6,
                 base_delay: float = 5, max_delay: float = 3600, poll_interval: float = 1,
                 send_timeout: float = 10):
        self.storage = storage     # runs the outbox's queries (storage/outbox.py)
        self.config = config
        self.on_result = on_result
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self.send_timeout = send_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._indexed = False

    @property
    def channels(self) -> list[str]:
        """Channels this worker can send: the configured ones."""
        out = []
        if getattr(self.config, "smtp_host", None):
            out.append("email")
        if getattr(self.config, "sms_webhook_url", None):
            out.append("sms")
        return out

    def claim(self) -> dict | None:
        """Atomically take one due message (or one whose lease expired)."""
        channels = self.channels
        if not channels:
            return None
        return self._db(self.storage.claim_notice, channels, self.worker_id, datetime.now(timezone.utc),
                        self.lease)

    def _db(self, operation, *args, **kwargs):
        """One outbox operation, bounded by FHIR_DMP_DB_WAIT (``StoreCore.bounded``): a database
        away makes it raise a StorageError, never hang the worker."""
        return self.storage.bounded(operation, *args, **kwargs)

    def run_once(self, limit: int = 10) -> int:
        """Claim and handle up to ``limit`` due messages; the number handled."""
        if not self._indexed:
            self._db(self.storage.ensure_outbox_indexes)
            self._indexed = True
        handled = 0
        while handled < limit:
            msg = self.claim()
            if msg is None:
                break
            self._handle(msg)
            handled += 1
        return handled

    def _handle(self, msg: dict) -> None:
        mid, channel = msg["_id"], msg["channel"]
        current = self._db(self.storage.notice_state, mid)
        if current is None or current.get("status") == "sent" or current.get("sent_at"):
            log.info("notification %s/%s already sent, skipped", mid, channel)
            return
        if msg.get("handed_over_at"):     # its worker died during the hand-over: never twice
            self._complete(msg, outcome_unknown=True)
            return
        handed_over = []

        def hand_over() -> None:
            if not self._retried(self.storage.hand_over_notice, mid, self.worker_id, datetime.now(timezone.utc),
                                 what=f"notification {mid}/{channel} handing it over"):
                raise LostMessage()
            handed_over.append(True)

        try:
            if channel == "email":
                send_email(self.config, msg, timeout=self.send_timeout, hand_over=hand_over)
            elif channel == "sms":
                send_sms(self.config, msg, timeout=self.send_timeout)
            else:
                raise PermanentFailure(f"unknown channel {channel}")
        except LostMessage:
            log.info("notification %s/%s taken over by another worker, not sent", mid, channel)
            return
        except Exception as exc:  # transport failure: retry or give up
            if handed_over and not _is_reply(exc):   # cut off after the 354: the relay may have it
                self._complete(msg, outcome_unknown=True)
            else:
                self._failed(msg, exc)
            return
        self._complete(msg)

    def _retried(self, write: Callable[..., dict | bool | None], *args, what: str, **kwargs):
        """``write(*args, **kwargs)`` (an idempotent outbox write, bounded by :meth:`_db`), the
        database away waited out (short pauses, one log line, within half the claim's lease): this
        worker knows what it did with the message, a successor would not (a hand-over recorded
        without the worker knowing, a delivery never marked sent: outcome unknown, never twice)."""
        outage = Outage(log, what)
        until = datetime.now(timezone.utc) + self.lease / 2
        while True:
            try:
                done = self._db(write, *args, **kwargs)
                outage.ok()
                return done
            except StorageClosed:
                raise
            except StorageError as exc:
                pause = outage.failed(exc)
                if self._stop.is_set() or datetime.now(timezone.utc) + timedelta(seconds=pause) > until:
                    raise
                self._stop.wait(pause)

    def _complete(self, msg: dict, *, outcome_unknown: bool = False) -> None:
        mid, channel = msg["_id"], msg["channel"]
        # a one-time code leaves the database once delivered
        done = self._retried(self.storage.mark_notice_sent, mid, self.worker_id, datetime.now(timezone.utc),
                             outcome_unknown=outcome_unknown, forget_body=msg.get("kind") == "access_code",
                             what=f"notification {mid}/{channel} delivered, marking it sent")
        if done is None:
            log.warning("notification %s/%s was completed by another worker (duplicate send)",
                        mid, channel)
            return
        if outcome_unknown:
            log.warning("notification %s/%s: hand-over cut off, outcome unknown, not sent again", mid, channel)
            self._report(done, "unknown", "delivery outcome unknown: the sender stopped while handing it over")
            return
        log.info("notification %s/%s sent (attempt %s)", mid, channel, msg.get("attempts"))
        self._report(done, "completed", None)

    def _failed(self, msg: dict, exc: BaseException) -> None:
        mid, channel = msg["_id"], msg["channel"]
        reason = _reason(channel, exc)
        attempts = int(msg.get("attempts") or 1)
        if isinstance(exc, PermanentFailure) or attempts >= self.max_attempts:
            gone = self._db(self.storage.update_claimed_notice,
                mid, self.worker_id, {"status": "failed", "lease_until": None, "last_error": reason})
            log.warning("notification %s/%s failed for good after %d attempt(s): %s",
                        mid, channel, attempts, reason)
            if gone is not None:
                self._report(gone, "not-done", reason)
            return
        delay = min(self.base_delay * 2 ** (attempts - 1), self.max_delay)
        delay *= 0.8 + 0.4 * random.random()
        self._db(self.storage.update_claimed_notice, mid, self.worker_id, {
            "status": "pending", "claimed_by": None, "lease_until": None, "last_error": reason, "handed_over_at": None,
            "next_attempt_at": datetime.now(timezone.utc) + timedelta(seconds=delay)})
        log.info("notification %s/%s attempt %d failed (%s), retry in %.1fs",
                 mid, channel, attempts, reason, delay)

    def _report(self, msg: dict, status: str, reason: str | None) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(msg, status, reason)
        except Exception:
            log.exception("notification %s: on_result failed", msg.get("_id"))

    # -- thread
    def _loop(self) -> None:
        # a database away: one log line, short pauses, claiming again within a second or so of
        # its return (storage.errors.Outage); each operation is bounded (:meth:`_db`)
        outage = Outage(log, "notification worker")
        while not self._stop.is_set():
            try:
                handled = self.run_once()
                outage.ok()
            except StorageClosed:   # the client was closed: this process is going away
                return
            except Exception as exc:   # noqa: BLE001 — keep sending after a database hiccup
                self._stop.wait(outage.failed(exc))
                continue
            if not handled:
                self._stop.wait(self.poll_interval)

    def start(self) -> None:
        """Run in a daemon thread, polling about every ``poll_interval`` s."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"notify-{self.worker_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
