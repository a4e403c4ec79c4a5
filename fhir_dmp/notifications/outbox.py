"""Patient notifications: a transactional outbox in MongoDB and its worker.

CONTRACT.md "The DMP in FHIR terms" (Notifications) and DESIGN.md rules 6-8:
the patient is told of a first access by a PS, of every break-glass access
and of every centre 15 access, by email (SMTP) and SMS (HTTP webhook), and
each message is also a Communication (``subject`` = the Patient) the patient
can read. No medical content ever goes into a notification.

Flow::

    guard -> Outbox.enqueue(notice, patient, session)   -> outbox docs + Communication resources
             (the lead stores the Communications, same transaction when it has one)
    Worker (thread) -> claim -> send -> mark sent/retry/failed -> on_result(msg, status, reason)
             (the lead's on_result updates the Communication: completed / not-done)

Outbox document (collection ``notification_outbox``)::

    {_id, communication_id, patient_id, kind, channel: "email"|"sms", to, subject, body,
     status: "pending"|"sending"|"sent"|"failed", attempts, next_attempt_at,
     claimed_by, lease_until, sent_at, last_error, created_at}

Delivery is at-least-once (the transactional-outbox pattern):

- a message is claimed atomically (``find_one_and_update``: pending and due,
  or sending with an expired lease -> sending, ``claimed_by``, ``lease_until``);
  a worker that dies mid-send leaves a lease that expires, and another worker
  takes the message over: nothing is lost;
- idempotency marker: ``sent_at`` is set in the same update as ``status: sent``
  (filtered on ``status != sent``, so only one worker completes a message and
  calls ``on_result``), and right before the transport call the worker
  re-reads the message and skips it if it is already ``sent``;
- residual window (documented, not closable without the transport's help):
  a worker that delivered the message but died (or stalled past its lease)
  before writing ``sent`` lets another worker send it again. The lease
  (60 s) is kept well above the transport timeouts (10 s) so a live worker
  never loses its lease while sending; the email ``Message-ID`` and the SMS
  ``Idempotency-Key`` header are the message id, so a relay or a gateway
  that deduplicates can drop the second copy.

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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import formatdate
from typing import Callable

import requests
from pymongo.errors import PyMongoError

from ..security.audit import PROFESSION_LABELS
from ..storage import OUTBOX  # noqa: F401  (its collection: storage.py names it and runs its queries)
from ..security.principal import IDNATPS_SYSTEM

log = logging.getLogger(__name__)

NOTIFICATION_ID_SYSTEM = "urn:fhir-dmp:notification"
NOTIFICATION_KIND_SYSTEM = "urn:fhir-dmp:notification-kind"
CHANNEL_SYSTEM = "urn:fhir-dmp:notification-channel"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
MODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
NO_CONTACT_REASON = "Aucun moyen de contact (email/SMS) dans le dossier"

KINDS = ("first_access", "break_glass", "centre_15", "access_code")
MODE_LABELS = {"normal": "normal", "bris_de_glace": "bris de glace (urgence)",
               "centre_15": "centre 15 (régulation médicale)"}

try:  # system tz database (tzdata package not required where /usr/share/zoneinfo exists)
    from zoneinfo import ZoneInfo
    PARIS = ZoneInfo("Europe/Paris")
except Exception:  # pragma: no cover - platform without a tz database
    PARIS = None


@dataclass
class Notice:
    """What happened, no medical content.

    ``kind``: first_access | break_glass | centre_15; ``mode``: TRE_R248
    normal | bris_de_glace | centre_15; ``reason``: the break-glass reason
    (shown to the patient).
    """

    kind: str
    patient_id: str
    actor_name: str | None
    actor_profession: str | None
    actor_id: str | None
    mode: str
    when: datetime
    reason: str | None = None
    #: access_code: the one-time code, in the message sent only (never in the Communication)
    code: str | None = None


# --- the text -------------------------------------------------------------------

def _actor(notice: Notice) -> str:
    who = notice.actor_name or "Un professionnel de santé"
    code = (notice.actor_profession or "").split("^", 1)[0]
    label = PROFESSION_LABELS.get(code)
    return f"{who} ({label})" if label else who


def _local(when: datetime) -> tuple[str, str]:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if PARIS is None:  # pragma: no cover
        when = when.astimezone(timezone.utc)
        return when.strftime("%d/%m/%Y"), when.strftime("%Hh%M (UTC)")
    when = when.astimezone(PARIS)
    return when.strftime("%d/%m/%Y"), when.strftime("%Hh%M")


def render_text(notice: Notice) -> tuple[str, str]:
    """(subject, body) in French: who (name, TRE_G15 profession label), when
    (Europe/Paris local time), which access mode; the break-glass reason when
    given. Never medical content (no document, no diagnosis)."""
    actor = _actor(notice)
    day, hour = _local(notice.when)
    mode = MODE_LABELS.get(notice.mode, notice.mode)
    if notice.kind == "break_glass":
        subject = "Accès en urgence (bris de glace) à votre dossier médical"
        what = (f"{actor} a accédé à votre dossier médical partagé (DMP) en urgence, "
                f"en mode « bris de glace », le {day} à {hour}.")
    elif notice.kind == "access_code":
        subject = "Code d'accès à votre dossier médical"
        what = (f"{actor} demande à accéder pour la première fois à votre dossier médical "
                f"partagé (DMP) le {day} à {hour}. Si vous êtes d'accord, donnez-lui ce code "
                f"à usage unique, valable 10 minutes : {notice.code or '(envoyé séparément)'}")
    elif notice.kind == "centre_15":
        subject = "Accès du centre de régulation (SAMU-Centre 15) à votre dossier médical"
        what = (f"{actor}, du centre de régulation médicale (SAMU-Centre 15), a accédé "
                f"à votre dossier médical partagé (DMP) le {day} à {hour}.")
    else:
        subject = "Premier accès d'un professionnel de santé à votre dossier médical"
        what = (f"{actor} a accédé pour la première fois à votre dossier médical "
                f"partagé (DMP) le {day} à {hour}.")
    lines = ["Bonjour,", "", what]
    if notice.actor_id:
        lines.append(f"Identifiant national du professionnel : {notice.actor_id}.")
    lines.append(f"Mode d'accès : {mode}.")
    if notice.reason and notice.kind == "break_glass":
        lines.append(f"Motif indiqué : {notice.reason}")
    lines += [
        "",
        "Vous pouvez consulter l'historique des accès à votre dossier et gérer les "
        "autorisations des professionnels dans Mon espace santé.",
        "",
        "Ce message est envoyé automatiquement, merci de ne pas y répondre.",
    ]
    return subject, "\n".join(lines)


# --- contacts -------------------------------------------------------------------

def _usable(cp: dict) -> bool:
    if not cp.get("value") or cp.get("use") == "old":
        return False
    end = (cp.get("period") or {}).get("end")
    if end:
        try:
            end_dt = datetime.fromisoformat(end.replace("Z", "+00:00"))
            if end_dt.tzinfo is None:
                end_dt = end_dt.replace(tzinfo=timezone.utc)
            if end_dt < datetime.now(timezone.utc):
                return False
        except ValueError:
            pass
    return True


def contacts(patient: dict) -> dict[str, str]:
    """{"email": address, "sms": number} from Patient.telecom (best rank first).

    email: ``system`` email; sms: ``system`` sms, or ``system`` phone with
    ``use`` mobile. Old or ended contact points are skipped.
    """
    found: dict[str, tuple[int, str]] = {}
    for cp in patient.get("telecom") or ():
        if not isinstance(cp, dict) or not _usable(cp):
            continue
        system = cp.get("system")
        if system == "email":
            channel = "email"
        elif system == "sms" or (system == "phone" and cp.get("use") == "mobile"):
            channel = "sms"
        else:
            continue
        rank = cp.get("rank") if isinstance(cp.get("rank"), int) else 10 ** 6
        if channel not in found or rank < found[channel][0]:
            found[channel] = (rank, str(cp["value"]).strip())
    return {ch: v for ch, (_, v) in sorted(found.items())}


def _medium(channel: str) -> dict:
    if channel == "email":
        coding = [{"system": MODE_SYSTEM, "code": "EMAILWRIT", "display": "email"}]
    else:
        coding = [{"system": MODE_SYSTEM, "code": "ELECTRONIC", "display": "electronic data"}]
    coding.append({"system": CHANNEL_SYSTEM, "code": channel})
    return {"coding": coding, "text": "Email" if channel == "email" else "SMS"}


def _communication(notice: Notice, subject: str, body: str, *, status: str,
                   channel: str | None, message_id: str | None) -> dict:
    ref = {"reference": f"Patient/{notice.patient_id}"}
    comm: dict = {
        "resourceType": "Communication",
        "id": uuid.uuid4().hex,
        "status": status,
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "notification",
                                  "display": "Notification"}]}],
        "subject": ref,
        "topic": {"coding": [{"system": NOTIFICATION_KIND_SYSTEM, "code": notice.kind}],
                  "text": subject},
        "recipient": [ref],
        "sender": {"display": "Mon espace santé"},
        "payload": [{"contentString": body}],
    }
    if notice.actor_id:
        # whom it is about: the portal names them from the directory of professionals when it
        # lists them (here, the name of the token; no directory read on the write path, issue 13)
        about = {"identifier": {"system": IDNATPS_SYSTEM, "value": notice.actor_id}}
        if notice.actor_name:
            about["display"] = notice.actor_name
        comm["about"] = [about]
    if message_id:
        comm["identifier"] = [{"system": NOTIFICATION_ID_SYSTEM, "value": message_id}]
    if channel:
        comm["medium"] = [_medium(channel)]
    if status == "not-done":
        comm["statusReason"] = {"text": NO_CONTACT_REASON}
    return comm


# --- outbox -------------------------------------------------------------------

class Outbox:
    """Queue notifications for a patient, in the caller's transaction if any."""

    def __init__(self, storage, config):
        self.storage = storage     # runs the outbox's queries (storage.py)
        self.config = config
        self._indexed = False

    def enqueue(self, notice: Notice, patient: dict, *, session=None) -> list[dict]:
        """One outbox message per channel the Patient has (email, sms).

        Returns the Communication resources to store (``id`` set, status
        ``in-progress``, subject/recipient the Patient, category
        notification, topic the kind, payload the French text, medium the
        channel, identifier ``urn:fhir-dmp:notification|<message id>``).
        Each outbox doc carries ``communication_id`` = that Communication id.
        Without contact: one Communication ``not-done`` with statusReason
        "Aucun moyen de contact (email/SMS) dans le dossier", nothing queued.
        The outbox docs are inserted with ``session`` when given.
        """
        if notice.kind not in KINDS:
            raise ValueError(f"unknown notification kind {notice.kind!r}")
        subject, body = render_text(notice)
        # the Communication the patient reads later never holds a one-time code
        shown = render_text(replace(notice, code=None))[1] if notice.code else body
        found = contacts(patient)
        if not found:
            log.info("notification %s for a patient without contact: not-done", notice.kind)
            return [_communication(notice, subject, shown, status="not-done", channel=None,
                                   message_id=None)]
        if not self._indexed:
            self.storage.ensure_outbox_indexes()
            self._indexed = True
        now = datetime.now(timezone.utc)
        comms, docs = [], []
        for channel, address in found.items():
            message_id = uuid.uuid4().hex
            comm = _communication(notice, subject, shown, status="in-progress", channel=channel,
                                  message_id=message_id)
            comms.append(comm)
            docs.append({
                "_id": message_id, "communication_id": comm["id"], "patient_id": notice.patient_id,
                "kind": notice.kind, "channel": channel, "to": address,
                "subject": subject, "body": body,
                "status": "pending", "attempts": 0, "next_attempt_at": now,
                "claimed_by": None, "lease_until": None, "sent_at": None, "last_error": None,
                "created_at": now,
            })
        self.storage.queue_notices(docs, session=session)
        log.info("notification %s queued: %s", notice.kind,
                 ", ".join(f"{d['_id']}/{d['channel']}" for d in docs))
        return comms


# --- transports -----------------------------------------------------------------

class PermanentFailure(Exception):
    """The transport refused the message for good: no retry."""


def send_email(config, message: dict, *, timeout: float = 10) -> None:
    """Deliver one email through ``config.smtp_host``: EHLO, STARTTLS when
    offered (certificate verified), UTF-8 body. SMTP 5xx -> PermanentFailure."""
    msg = EmailMessage()
    msg["Subject"] = message["subject"]
    msg["From"] = config.smtp_from
    msg["To"] = message["to"]
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{message['_id']}@fhir-dmp>"
    msg.set_content(message["body"], charset="utf-8")
    try:
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=timeout) as smtp:
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


def _reason(channel: str, exc: BaseException) -> str:
    """A failure reason without personal data (no address, no body)."""
    if isinstance(exc, (PermanentFailure, RuntimeError)) and str(exc).startswith(("SMTP", "HTTP")):
        return f"{channel}: {exc}"
    return f"{channel}: {type(exc).__name__}"


# --- worker -------------------------------------------------------------------

class Worker:
    """Claims due messages and sends them; ``start()`` runs it in a thread.

    ``on_result(message, "completed" | "not-done", reason)`` is called once
    per message, by the worker that completed or gave it up.
    """

    def __init__(self, storage, config, *, on_result: Callable[[dict, str, str | None], None] | None = None,
                 worker_id: str | None = None, lease_seconds: float = 60, max_attempts: int = 6,
                 base_delay: float = 5, max_delay: float = 3600, poll_interval: float = 1,
                 send_timeout: float = 10):
        self.storage = storage     # runs the outbox's queries (storage.py)
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
        return self.storage.claim_notice(channels, self.worker_id, datetime.now(timezone.utc), self.lease)

    def run_once(self, limit: int = 10) -> int:
        """Claim and handle up to ``limit`` due messages; the number handled."""
        if not self._indexed:
            self.storage.ensure_outbox_indexes()
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
        current = self.storage.notice_state(mid)
        if current is None or current.get("status") == "sent" or current.get("sent_at"):
            log.info("notification %s/%s already sent, skipped", mid, channel)
            return
        try:
            if channel == "email":
                send_email(self.config, msg, timeout=self.send_timeout)
            elif channel == "sms":
                send_sms(self.config, msg, timeout=self.send_timeout)
            else:
                raise PermanentFailure(f"unknown channel {channel}")
        except Exception as exc:  # transport failure: retry or give up
            self._failed(msg, exc)
            return
        now = datetime.now(timezone.utc)
        # a one-time code leaves the database once delivered
        done = self.storage.mark_notice_sent(mid, now, forget_body=msg.get("kind") == "access_code")
        if done is None:
            log.warning("notification %s/%s was completed by another worker (duplicate send)",
                        mid, channel)
            return
        log.info("notification %s/%s sent (attempt %s)", mid, channel, msg.get("attempts"))
        self._report(done, "completed", None)

    def _failed(self, msg: dict, exc: BaseException) -> None:
        mid, channel = msg["_id"], msg["channel"]
        reason = _reason(channel, exc)
        attempts = int(msg.get("attempts") or 1)
        if isinstance(exc, PermanentFailure) or attempts >= self.max_attempts:
            gone = self.storage.update_claimed_notice(
                mid, self.worker_id, {"status": "failed", "lease_until": None, "last_error": reason})
            log.warning("notification %s/%s failed for good after %d attempt(s): %s",
                        mid, channel, attempts, reason)
            if gone is not None:
                self._report(gone, "not-done", reason)
            return
        delay = min(self.base_delay * 2 ** (attempts - 1), self.max_delay)
        delay *= 0.8 + 0.4 * random.random()
        self.storage.update_claimed_notice(mid, self.worker_id, {
            "status": "pending", "claimed_by": None, "lease_until": None, "last_error": reason,
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
        while not self._stop.is_set():
            try:
                handled = self.run_once()
            except PyMongoError as exc:
                log.warning("notification worker: database error %s", type(exc).__name__)
                handled = 0
            except Exception:
                log.exception("notification worker error")
                handled = 0
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
