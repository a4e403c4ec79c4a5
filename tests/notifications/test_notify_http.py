"""Patient notifications end to end over HTTP (issue "The patient's journal").

CONTRACT.md "Notifications" and DESIGN.md rules 6-8: a PS's attested first
access, a break-glass access and a centre 15 access each tell the patient
by email (SMTP) and SMS (HTTP webhook), in French, naming who (profession)
and how (access mode), never medical content; each notice is a
Communication the patient reads, ``completed`` once delivered; without a
contact on file it is ``not-done`` with a reason and the journal says the
patient could not be told.

Real parts only: the app over HTTP with real tokens, an aiosmtpd server and
an http.server SMS webhook on 127.0.0.1, the outbox worker of
``fhir_dmp.notifications`` wired exactly as ``app._start_worker`` wires it.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fhir_dmp.notifications.outbox import NO_CONTACT_REASON, OUTBOX
from fhir_dmp.notifications.worker import Worker
from fhir_dmp.resources.communications import notification_result
from fhir_dmp.runtime.services import services
from tests import builders as b
from tests.api import Api

BTG_HEADERS = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                           'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
               "X-Break-Glass-Reason": "patient inconscient aux urgences"}
EMAIL, PHONE = "claire@example.org", "+33612345678"
DOC_TITLE = "Compte rendu cardiologie confidentiel"


# --------------------------------------------------------------------------- real transports + app

@pytest.fixture
def notify_config(config, smtp, sms):
    return config.with_(smtp_host="127.0.0.1", smtp_port=smtp[1], sms_webhook_url=sms.url,
                        notifications_worker=False)


@pytest.fixture
def notify_app(notify_config, build_app):
    return build_app(notify_config)


@pytest.fixture
def napi(notify_app, idp):
    return Api(notify_app, idp)


@pytest.fixture
def worker(notify_app, db, notify_config, db_storage):
    """The outbox worker as app._start_worker builds it (driven by hand: run_once)."""
    backend = services(notify_app)
    return Worker(db_storage, notify_config, send_timeout=5,
                  on_result=lambda message, status, reason: notification_result(backend, message, status,
                                                                                reason))


def drain(worker) -> int:
    total = 0
    while True:
        n = worker.run_once()
        if not n:
            return total
        total += n


def open_dmp(napi, **contact) -> str:
    """A DMP opened by the administrator (so no PS has had a first access yet), one document."""
    pid = napi.as_admin().create(b.patient(**contact))["id"]
    return pid


def with_document(napi, pid: str) -> str:
    """PS_DR (médecin traitant) deposits a document whose title must never reach a notice."""
    doc = b.docref(pid, b.CONSULTATION, content=b.pdf_bytes(DOC_TITLE))
    doc["description"] = DOC_TITLE
    return napi.as_ps(b.PS_DR).create(doc)["id"]


def communications(caller, pid: str) -> list[dict]:
    bundle = caller.search(f"Communication?subject=Patient/{pid}&_count=100")
    return [e["resource"] for e in bundle.get("entry", [])]


def kind(comm: dict) -> str:
    return comm["topic"]["coding"][0]["code"]


def channel(comm: dict) -> str | None:
    for m in comm.get("medium", []):
        for c in m["coding"]:
            if c["system"] == "urn:fhir-dmp:notification-channel":
                return c["code"]
    return None


def concurrent_break_glass_reads(app, idp, pid: str, n: int) -> set[int]:
    """``n`` first break-glass reads of ``pid`` by PS_OTHER (an infirmier), started together
    (threads of one process); their statuses."""
    start = threading.Barrier(n)

    def read(_):
        er = Api(app, idp).as_ps(b.PS_OTHER, profession="60")
        start.wait(timeout=30)
        return er.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code

    with ThreadPoolExecutor(n) as ex:
        return set(ex.map(read, range(n)))


def assert_no_medical_content(text: str) -> None:
    for word in (DOC_TITLE, "cardiologie", b.CONSULTATION, "DocumentReference", "Compte rendu"):
        assert word not in text


# --------------------------------------------------------------------------- cases

def test_attested_first_access_is_emailed_and_texted_in_french(napi, worker, smtp, sms):
    sink, _ = smtp
    pid = open_dmp(napi, email=EMAIL, phone=PHONE, gp=None)
    pharma = napi.as_ps(b.PS_PHARMA, profession="21")
    assert pharma.get(f"Patient/{pid}").status_code == 404          # not yet authorized
    pharma.create(b.consent(pid, "permit", actor=b.PS_PHARMA, verified=True))

    me = napi.as_patient(pid)
    queued = communications(me, pid)
    assert {(kind(c), channel(c), c["status"]) for c in queued} == \
        {("first_access", "email", "in-progress"), ("first_access", "sms", "in-progress")}

    assert drain(worker) == 2
    assert len(sink.messages) == 1 and len(sms.received) == 1
    mail = sink.messages[0]
    assert mail["To"] == EMAIL
    assert mail["Subject"] == "Premier accès d'un professionnel de santé à votre dossier médical"
    text = mail.get_content()
    assert "(Pharmacien) a accédé pour la première fois à votre dossier médical" in text
    assert f"Identifiant national du professionnel : {b.PS_PHARMA}" in text
    assert "Mode d'accès : normal" in text
    assert_no_medical_content(text)
    payload, headers = sms.received[0]
    assert payload["to"] == PHONE and "(Pharmacien)" in payload["text"]
    assert "première fois" in payload["text"]
    assert_no_medical_content(payload["text"])

    delivered = communications(me, pid)
    assert {c["status"] for c in delivered} == {"completed"} and all(c.get("sent") for c in delivered)
    ids = {c["identifier"][0]["value"] for c in delivered}
    assert headers.get("Idempotency-Key") in ids and mail["Message-ID"].strip("<>").split("@")[0] in ids
    # read one by one too
    for c in delivered:
        assert me.get(f"Communication/{c['id']}").json["status"] == "completed"
    # nothing more to send, and a second access by the same PS is not a first access
    assert pharma.get(f"Patient/{pid}").status_code == 200
    assert drain(worker) == 0 and len(communications(me, pid)) == 2


def test_break_glass_notice_names_the_mode_and_reason(napi, worker, smtp, sms):
    sink, _ = smtp
    pid = open_dmp(napi, email=EMAIL, phone=PHONE, gp=b.PS_DR)
    doc = with_document(napi, pid)
    er = napi.as_ps(b.PS_OTHER, profession="60")                     # an infirmier
    assert er.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    found = er.search(f"DocumentReference?patient=Patient/{pid}", headers=BTG_HEADERS)   # grant in force
    assert doc not in str(found)                                     # not for an infirmier (matrix)

    me = napi.as_patient(pid)
    comms = [c for c in communications(me, pid) if kind(c) == "break_glass"]
    assert {channel(c) for c in comms} == {"email", "sms"}          # one notice per grant, not per read
    assert drain(worker) == 2
    mail = sink.messages[0]
    assert "bris de glace" in mail["Subject"]
    text = mail.get_content()
    assert "(Infirmier)" in text and "en mode « bris de glace »" in text
    assert "Mode d'accès : bris de glace (urgence)" in text
    assert f"Motif indiqué : {BTG_HEADERS['X-Break-Glass-Reason']}" in text
    assert_no_medical_content(text)
    assert "bris de glace" in sms.received[0][0]["text"]
    assert {c["status"] for c in communications(me, pid) if kind(c) == "break_glass"} == {"completed"}


def test_centre_15_notice_by_the_app_worker(notify_config, build_app, idp, smtp, sms):
    """Started by create_app (notifications_worker=True): delivered within a bounded wait."""
    sink, _ = smtp
    api = Api(build_app(notify_config.with_(notifications_worker=True)), idp)
    pid = open_dmp(api, email=EMAIL, phone=PHONE, gp=b.PS_DR)
    doc = with_document(api, pid)
    assert api.as_regulation().get(f"DocumentReference/{doc}").status_code == 200
    me = api.as_patient(pid)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        comms = [c for c in communications(me, pid) if kind(c) == "centre_15"]
        if len(comms) == 2 and all(c["status"] == "completed" for c in comms):
            break
        time.sleep(0.1)
    assert {(channel(c), c["status"]) for c in comms} == {("email", "completed"), ("sms", "completed")}
    mail = sink.messages[0]
    assert "Centre 15" in mail["Subject"]
    text = mail.get_content()
    assert "centre de régulation médicale (SAMU-Centre 15)" in text
    assert "Mode d'accès : centre 15 (régulation médicale)" in text
    assert_no_medical_content(text)
    assert "Centre 15" in sms.received[0][0]["text"]


def test_no_contact_means_not_done_and_the_journal_says_so(napi, worker, smtp, sms, db):
    sink, _ = smtp
    pid = open_dmp(napi, gp=b.PS_DR)                                  # no email, no phone
    doc = with_document(napi, pid)
    assert napi.as_regulation().get(f"DocumentReference/{doc}").status_code == 200

    me = napi.as_patient(pid)
    comms = communications(me, pid)
    assert len(comms) == 1
    comm = comms[0]
    assert comm["status"] == "not-done" and kind(comm) == "centre_15"
    assert comm["statusReason"]["text"] == NO_CONTACT_REASON
    assert "medium" not in comm
    assert db[OUTBOX].count_documents({"patient_id": pid}) == 0
    assert drain(worker) == 0 and not sink.messages and not sms.received

    journal = me.search(f"AuditEvent?patient=Patient/{pid}&_count=200")["entry"]
    told = [e["resource"] for e in journal
            if any((ent.get("what") or {}).get("reference") == f"Communication/{comm['id']}"
                   for ent in e["resource"].get("entity", []))]
    assert len(told) == 1
    event = told[0]
    assert event["outcome"] == "4"
    assert "could not be told" in event["outcomeDesc"]
    detail = {d["type"]: d["valueString"] for ent in event["entity"] if ent.get("detail")
              for d in ent["detail"]}
    assert detail["result"] == "deny" and detail["rule"] == "notify-centre_15"


def test_worker_stopped_mid_send_loses_nothing(napi, notify_app, notify_config, db, smtp, sms, db_storage):
    """A worker that claimed the messages and died: its lease expires, another delivers once."""
    sink, _ = smtp
    pid = open_dmp(napi, email=EMAIL, phone=PHONE, gp=b.PS_DR)
    doc = with_document(napi, pid)
    assert napi.as_regulation().get(f"DocumentReference/{doc}").status_code == 200

    backend = services(notify_app)

    def on_result(message, status, reason):
        notification_result(backend, message, status, reason)

    dead = Worker(db_storage, notify_config, worker_id="dead", lease_seconds=0.5, on_result=on_result)
    assert dead.claim() is not None and dead.claim() is not None     # ...and the process dies
    alive = Worker(db_storage, notify_config, worker_id="alive", on_result=on_result, send_timeout=5)
    assert alive.run_once() == 0                                       # the leases still hold
    me = napi.as_patient(pid)
    assert {c["status"] for c in communications(me, pid)} == {"in-progress"}
    time.sleep(0.6)
    assert drain(alive) == 2
    assert len(sink.messages) == 1 and len(sms.received) == 1
    assert {c["status"] for c in communications(me, pid)} == {"completed"}
    assert {d["claimed_by"] for d in db[OUTBOX].find({"patient_id": pid})} == {"alive"}


def test_communications_are_read_only_and_private(napi, smtp, sms):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    doc = with_document(napi, pid)
    napi.as_regulation().get(f"DocumentReference/{doc}")
    me = napi.as_patient(pid)
    comm = communications(me, pid)[0]
    assert me.put(f"Communication/{comm['id']}", dict(comm, status="completed")).status_code == 405
    assert me.delete(f"Communication/{comm['id']}").status_code == 405
    assert me.post("Communication", {k: v for k, v in comm.items() if k != "id"}).status_code == 405
    assert napi.as_ps(b.PS_DR).get(f"Communication/{comm['id']}").status_code == 404
    other = napi.as_admin().create(b.patient())["id"]
    assert napi.as_patient(other).get(f"Communication/{comm['id']}").status_code == 404


def test_ps_who_opens_a_dmp_is_a_first_access(napi, worker, smtp):
    """CONTRACT.md: a PS who creates a DMP is authorized on it (creating it attests that
    the patient agreed) -- that is the PS's first access, so the patient is told."""
    sink, _ = smtp
    pid = napi.as_ps(b.PS_DR).create(b.patient(email=EMAIL))["id"]
    comms = communications(napi.as_patient(pid), pid)
    assert [kind(c) for c in comms] == ["first_access"]
    assert drain(worker) == 1
    assert "(Médecin) a accédé pour la première fois" in sink.messages[0].get_content()


def test_concurrent_break_glass_reads_make_one_grant_and_one_notice(notify_app, napi, idp, worker, smtp):
    """Six break-glass reads of one PS started together (threads of one process; two processes in
    tests/runtime/test_two_processes.py): one grant, so one notice, not one per request."""
    sink, _ = smtp
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    assert concurrent_break_glass_reads(notify_app, idp, pid, 6) == {200}
    me = napi.as_patient(pid)
    assert [channel(c) for c in communications(me, pid) if kind(c) == "break_glass"] == ["email"]
    assert drain(worker) == 1 and len(sink.messages) == 1
