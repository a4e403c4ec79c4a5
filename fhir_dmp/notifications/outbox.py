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

Delivery, retries and the worker: :mod:`fhir_dmp.notifications.worker`.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import requests

from ..audit.events import PROFESSION_LABELS
from ..storage.core import OUTBOX  # noqa: F401  (its collection: storage/outbox.py runs its queries)
from ..security.principal import IDNATPS_SYSTEM

log = logging.getLogger(__name__)

NOTIFICATION_ID_SYSTEM = "urn:fhir-dmp:notification"
NOTIFICATION_KIND_SYSTEM = "urn:fhir-dmp:notification-kind"
CHANNEL_SYSTEM = "urn:fhir-dmp:notification-channel"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
MODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
NO_CONTACT_REASON = "Aucun moyen de contact (email/SMS) dans le dossier"

KINDS = ("first_access", "break_glass", "centre_15", "access_code", "review_outcome")
#: review_outcome: the privacy officer's verdict on an access (CONTRACT.md "Privacy operations")
VERDICT_LABELS = {"justified": "justifié", "unjustified": "injustifié"}
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
    #: review_outcome: ``justified`` or ``unjustified`` (``reason``: the officer's note)
    verdict: str | None = None


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
    elif notice.kind == "review_outcome":
        subject = "Examen d'un accès à votre dossier médical"
        what = (f"Le délégué à la protection des données a examiné l'accès de {actor} à votre dossier "
                f"médical partagé (DMP) du {day} à {hour} (mode {mode}) : accès "
                f"{VERDICT_LABELS.get(notice.verdict or '', notice.verdict)}.")
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
    if notice.reason and notice.kind == "review_outcome":
        lines.append(f"Note du délégué : {notice.reason}")
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
        # lists them (here, the name of the token; no directory read on the write path)
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
        self.storage = storage     # runs the outbox's queries (storage/outbox.py)
        self.config = config
        self._indexed = False

    def enqueue(self, notice: Notice, patient: dict, *, session=None, pending: list | None = None) -> list[dict]:
        """One outbox message per channel the Patient has (email, sms).

        Returns the Communication resources to store (``id`` set, status
        ``in-progress``, subject/recipient the Patient, category
        notification, topic the kind, payload the French text, medium the
        channel, identifier ``urn:fhir-dmp:notification|<message id>``).
        Each outbox doc carries ``communication_id`` = that Communication id.
        Without contact: one Communication ``not-done`` with statusReason
        "Aucun moyen de contact (email/SMS) dans le dossier", nothing queued.
        The outbox docs are inserted with ``session`` when given, or appended to ``pending``
        (the transaction's inserts not sent yet, ``Storage.queue_notices``) when given.
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
        self.storage.queue_notices(docs, session=session, pending=pending)
        log.info("notification %s queued: %s", notice.kind,
                 ", ".join(f"{d['_id']}/{d['channel']}" for d in docs))
        return comms
