"""Patient notifications: outbox, worker, real SMTP sink, real HTTP SMS webhook.

A SecantusDB is started for this module; mail goes to an aiosmtpd server and
SMS to an http.server, both on 127.0.0.1 (no mocks).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

import pytest

from tests.transports import Sink, SmsServer
from aiosmtpd.controller import Controller
from fhir.resources.R4B.communication import Communication

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.embedded_db import free_port as _free_port
from fhir_dmp.notifications.outbox import NO_CONTACT_REASON, OUTBOX, Notice, Outbox, contacts, render_text
from fhir_dmp.notifications.worker import Worker, send_email


@pytest.fixture
def client(mongo_client):
    """The session's SecantusDB client (tests/conftest.py); ``db`` is conftest's database per test."""
    return mongo_client


# --- real transports: tests/transports.py ---------------------------------------------


# --- data ---------------------------------------------------------------------------------

WHEN = datetime(2025, 1, 15, 13, 5, tzinfo=timezone.utc)  # 14h05 in Paris (CET)


def notice(kind="first_access", pid="p1", **kw):
    base = dict(kind=kind, patient_id=pid, actor_name="Dr Marie Curie", actor_profession="10",
                actor_id="810001234567", mode={"first_access": "normal", "break_glass": "bris_de_glace",
                                              "centre_15": "centre_15"}[kind], when=WHEN)
    base.update(kw)
    return Notice(**base)


def patient(email_addr="alice@example.org", phone="+33612345678", pid="p1"):
    telecom = []
    if email_addr:
        telecom.append({"system": "email", "value": email_addr})
    if phone:
        telecom.append({"system": "phone", "value": phone, "use": "mobile"})
    return {"resourceType": "Patient", "id": pid, "telecom": telecom}


class Results:
    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, message, status, reason):
        with self.lock:
            self.calls.append((message["_id"], message["communication_id"], status, reason))


def _validate(comm):
    return Communication.model_validate(comm) if hasattr(Communication, "model_validate") \
        else Communication.parse_obj(comm)


# --- tests ----------------------------------------------------------------------------

def test_render_text_french_paris_time():
    subject, body = render_text(notice())
    assert "Premier accès" in subject
    assert "Dr Marie Curie (Médecin)" in body and "15/01/2025 à 14h05" in body
    assert "Mode d'accès : normal" in body
    s2, b2 = render_text(notice("break_glass", reason="patient inconscient", actor_profession="60",
                                when=datetime(2025, 7, 1, 10, 0, tzinfo=timezone.utc)))
    assert "bris de glace" in s2 and "(Infirmier)" in b2 and "12h00" in b2  # CEST
    assert "Motif indiqué : patient inconscient" in b2
    s3, b3 = render_text(notice("centre_15", actor_name=None, actor_profession=None))
    assert "Centre 15" in s3 and "Un professionnel de santé" in b3


def test_contacts_selection():
    p = {"telecom": [{"system": "phone", "value": "0145000000", "use": "home"},
                     {"system": "email", "value": "old@example.org", "use": "old"},
                     {"system": "email", "value": "b@example.org", "rank": 2},
                     {"system": "email", "value": "a@example.org", "rank": 1},
                     {"system": "sms", "value": "+33700000000"}]}
    assert contacts(p) == {"email": "a@example.org", "sms": "+33700000000"}
    assert contacts({"telecom": [{"system": "phone", "value": "0145000000"}]}) == {}


def test_email_and_sms_delivered(db, smtp, sms, caplog, db_storage):
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port, sms_webhook_url=sms.url)
    comms = Outbox(db_storage, config).enqueue(notice("break_glass", reason="urgence vitale"), patient())
    assert len(comms) == 2 and {c["status"] for c in comms} == {"in-progress"}
    for c in comms:
        _validate(c)
        assert c["subject"] == {"reference": "Patient/p1"} and c["identifier"][0]["value"]
    results = Results()
    caplog.set_level(logging.DEBUG, logger="fhir_dmp.notifications")
    assert Worker(db_storage, config, on_result=results).run_once() == 2

    assert len(sink.messages) == 1
    mail = sink.messages[0]
    assert mail["To"] == "alice@example.org"
    assert "bris de glace" in mail["Subject"]
    text = mail.get_content()
    assert "Dr Marie Curie (Médecin)" in text and "14h05" in text and "urgence vitale" in text
    assert len(sms.received) == 1
    payload, headers = sms.received[0]
    assert payload["to"] == "+33612345678" and "bris de glace" in payload["text"]
    assert set(payload) == {"to", "text"}

    assert sorted(r[2] for r in results.calls) == ["completed", "completed"]
    assert {r[1] for r in results.calls} == {c["id"] for c in comms}
    assert {d["status"] for d in db[OUTBOX].find()} == {"sent"}
    assert all(d["sent_at"] for d in db[OUTBOX].find())
    logged = caplog.text
    assert "alice@example.org" not in logged and "+33612345678" not in logged
    assert "urgence vitale" not in logged and "Marie Curie" not in logged


def test_no_contact_is_not_done(db, db_storage):
    comms = Outbox(db_storage, Config()).enqueue(notice(), patient(email_addr=None, phone=None))
    assert len(comms) == 1
    assert comms[0]["status"] == "not-done"
    assert comms[0]["statusReason"]["text"] == NO_CONTACT_REASON
    _validate(comms[0])
    assert db[OUTBOX].count_documents({}) == 0


def test_unconfigured_channel_stays_queued(db, smtp, db_storage):
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port)  # no SMS webhook
    Outbox(db_storage, config).enqueue(notice(), patient())
    assert Worker(db_storage, config).run_once() == 1
    assert len(sink.messages) == 1
    queued = db[OUTBOX].find_one({"channel": "sms"})
    assert queued["status"] == "pending" and queued["attempts"] == 0
    assert Worker(db_storage, Config()).run_once() == 0  # nothing configured: nothing claimed


def test_smtp_down_then_up_is_retried_and_delivered_once(db, db_storage):
    port = _free_port()  # nobody listens yet
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
    results = Results()
    worker = Worker(db_storage, config, on_result=results, base_delay=0.2, send_timeout=2)
    assert worker.run_once() == 1
    msg = db[OUTBOX].find_one()
    assert msg["status"] == "pending" and msg["attempts"] == 1
    assert msg["last_error"] == "email: ConnectionRefusedError"
    assert msg["next_attempt_at"] > datetime.now(timezone.utc)
    assert worker.run_once() == 0  # not due yet: back-off respected
    assert results.calls == []

    sink = Sink()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        time.sleep(0.3)
        assert worker.run_once() == 1
        assert worker.run_once() == 0
    finally:
        ctl.stop()
    assert len(sink.messages) == 1
    assert [r[2] for r in results.calls] == ["completed"]
    assert db[OUTBOX].find_one()["attempts"] == 2


def test_gives_up_after_max_attempts(db, db_storage):
    config = Config(smtp_host="127.0.0.1", smtp_port=_free_port())
    comms = Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
    results = Results()
    worker = Worker(db_storage, config, on_result=results, max_attempts=2, base_delay=0.01, send_timeout=2)
    worker.run_once()
    time.sleep(0.05)
    worker.run_once()
    msg = db[OUTBOX].find_one()
    assert msg["status"] == "failed"
    assert results.calls == [(msg["_id"], comms[0]["id"], "not-done", "email: ConnectionRefusedError")]
    time.sleep(0.05)
    assert worker.run_once() == 0


def test_sms_webhook_error_is_retried(db, db_storage):
    server = SmsServer(statuses=[503])
    try:
        config = Config(sms_webhook_url=server.url)
        Outbox(db_storage, config).enqueue(notice("centre_15"), patient(email_addr=None))
        results = Results()
        worker = Worker(db_storage, config, on_result=results, base_delay=0.01)
        # one message at a time: a slow machine would otherwise find the retry already due
        worker.run_once(limit=1)
        assert db[OUTBOX].find_one()["last_error"] == "sms: HTTP 503"
        time.sleep(0.05)
        worker.run_once(limit=1)
        assert len(server.received) == 1
        assert server.received[0][1].get("Idempotency-Key") == db[OUTBOX].find_one()["_id"]
        assert [r[2] for r in results.calls] == ["completed"]
    finally:
        server.close()


def test_two_workers_deliver_each_message_exactly_once(db, smtp, db_storage):
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    outbox = Outbox(db_storage, config)
    for i in range(20):
        outbox.enqueue(notice(pid=f"p{i}"), patient(email_addr=f"patient{i}@example.org", phone=None,
                                                     pid=f"p{i}"))
    results = Results()
    workers = [Worker(db_storage, config, on_result=results, worker_id=f"w{i}", poll_interval=0.05)
               for i in range(2)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while db[OUTBOX].count_documents({"status": {"$ne": "sent"}}) and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in workers:
        w.stop()
    assert db[OUTBOX].count_documents({"status": "sent"}) == 20
    with sink.lock:
        ids = [m["Message-ID"] for m in sink.messages]
        to = sorted(m["To"] for m in sink.messages)
    assert len(ids) == 20 and len(set(ids)) == 20
    assert to == sorted(f"patient{i}@example.org" for i in range(20))
    assert len(results.calls) == 20 and {r[2] for r in results.calls} == {"completed"}


def test_worker_killed_mid_send_lease_expires(db, smtp, db_storage):
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
    dead = Worker(db_storage, config, worker_id="dead", lease_seconds=0.3)
    claimed = dead.claim()  # ...and the process dies before sending
    assert claimed["status"] == "sending" and claimed["claimed_by"] == "dead"
    results = Results()
    alive = Worker(db_storage, config, on_result=results, worker_id="alive")
    assert alive.run_once() == 0  # the lease still holds
    time.sleep(0.4)
    assert alive.run_once() == 1
    assert len(sink.messages) == 1
    msg = db[OUTBOX].find_one()
    assert msg["status"] == "sent" and msg["claimed_by"] == "alive" and msg["attempts"] == 2
    assert [r[2] for r in results.calls] == ["completed"]


def test_worker_killed_after_handing_an_email_over_is_not_sent_again(db, smtp, db_storage):
    """Killed between the relay's acceptance and ``sent``: the next worker does not send it twice
    (at-most-once across the hand-over, notifications/worker.py); its outcome is ``unknown``."""
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
    dead = Worker(db_storage, config, worker_id="dead", lease_seconds=0.3)
    claimed = dead.claim()
    assert db_storage.hand_over_notice(claimed["_id"], "dead", datetime.now(timezone.utc))
    send_email(config, claimed)        # the relay has it ... and the process dies before `sent`
    results = Results()
    alive = Worker(db_storage, config, on_result=results, worker_id="alive")
    time.sleep(0.4)
    assert alive.run_once() == 1
    assert len(sink.messages) == 1
    msg = db[OUTBOX].find_one()
    assert msg["status"] == "sent" and msg["outcome_unknown"] is True
    assert [r[2] for r in results.calls] == ["unknown"]


def test_an_smtp_refusal_after_the_hand_over_is_retried(db, db_storage):
    """A 4xx reply to DATA is a definite "not delivered": retried, then delivered once."""
    class Refusing(Sink):
        async def handle_DATA(self, server, session, envelope):
            if not self.refused:
                self.refused = True
                return "451 try again later"
            return await super().handle_DATA(server, session, envelope)
    sink = Refusing()
    sink.refused = False
    ctl = Controller(sink, hostname="127.0.0.1", port=_free_port())
    ctl.start()
    try:
        config = Config(smtp_host="127.0.0.1", smtp_port=ctl.port)
        Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
        results = Results()
        worker = Worker(db_storage, config, on_result=results, base_delay=0.01)
        worker.run_once(limit=1)
        msg = db[OUTBOX].find_one()
        assert msg["status"] == "pending" and msg["last_error"] == "email: SMTP 451" and msg["handed_over_at"] is None
        time.sleep(0.05)
        worker.run_once(limit=1)
    finally:
        ctl.stop()
    assert len(sink.messages) == 1
    assert db[OUTBOX].find_one()["outcome_unknown"] is False
    assert [r[2] for r in results.calls] == ["completed"]


def test_already_sent_message_is_not_sent_again(db, smtp, db_storage):
    """The late worker of a lease takeover finds `sent` and skips the transport."""
    sink, port = smtp
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    Outbox(db_storage, config).enqueue(notice(), patient(phone=None))
    slow = Worker(db_storage, config, worker_id="slow", lease_seconds=0.1)
    claimed = slow.claim()
    time.sleep(0.2)
    assert Worker(db_storage, config, worker_id="fast").run_once() == 1
    slow._handle(claimed)  # the stalled worker resumes
    assert len(sink.messages) == 1


def test_enqueue_in_transaction(client, db, db_storage):
    config = Config()
    outbox = Outbox(db_storage, config)
    db.create_collection(OUTBOX)
    with client.start_session() as s:
        with s.start_transaction():
            outbox.enqueue(notice(), patient(), session=s)
            s.abort_transaction()
    assert db[OUTBOX].count_documents({}) == 0
    with client.start_session() as s:
        s.with_transaction(lambda sess: outbox.enqueue(notice(), patient(), session=sess))
    assert db[OUTBOX].count_documents({"status": "pending"}) == 2
