"""Break-glass and centre 15 review over HTTP (CONTRACT.md "Privacy operations"): one review Task per
grant and per open centre 15 case, opened with the access's journal; the privacy officer takes and
closes it, a completed case is frozen (409), the patient is told the verdict by email and a
Communication. Real parts: the app over HTTP, real tokens, an aiosmtpd sink, the outbox worker."""
from __future__ import annotations

from fhir_dmp.profiles.review_task import ACCESS_BASIS_SYSTEM, REVIEW_SYSTEM
from tests import builders as b
from tests.notifications.test_notify_http import (BTG_HEADERS, EMAIL, communications,  # noqa: F401
                                                  concurrent_break_glass_reads, drain, kind, napi, notify_app,
                                                  notify_config, open_dmp, with_document, worker)

CODE = f"{REVIEW_SYSTEM}|break-glass"


def tasks(caller, query: str = "") -> list[dict]:
    bundle = caller.search(f"Task?_count=50{'&' + query if query else ''}")
    return [e["resource"] for e in bundle.get("entry", [])]


def inputs(task: dict) -> dict:
    out = {}
    for i in task.get("input") or ():
        code = i["type"]["coding"][0]["code"]
        out[code] = next(v for k, v in i.items() if k.startswith("value"))
    return out


def test_a_break_glass_read_opens_exactly_one_task(napi, db):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    doc = with_document(napi, pid)
    er = napi.as_ps(b.PS_OTHER, profession="10")
    assert er.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    assert er.get(f"DocumentReference/{doc}", headers=BTG_HEADERS).status_code == 200   # same grant
    officer = napi.as_officer()
    found = tasks(officer, f"code={CODE}&patient=Patient/{pid}")
    assert len(found) == 1
    task = found[0]
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["for"] == {"reference": f"Patient/{pid}"} and task["authoredOn"]
    ev = inputs(task)
    assert ev["actor"] == {"system": b.IDNATPS, "value": b.PS_OTHER}
    assert ev["reason"] == BTG_HEADERS["X-Break-Glass-Reason"]
    assert ev["documents-read"] == 0                       # the first request read the Patient only
    assert "prior-basis" not in ev                          # no relationship before
    # focus: the first AuditEvent of the access, readable by the officer
    event = officer.get(task["focus"]["reference"]).json
    assert event["resourceType"] == "AuditEvent"
    assert any(e.get("what", {}).get("reference", "").startswith(f"Patient/{pid}") for e in event["entity"])
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "BTG"
    # the Task's creation is in the DMP's journal, by the server
    created = [e["res"] for e in b.journal_entries(db, {"pid": pid})
               if any(x.get("what", {}).get("reference") == f"Task/{task['id']}" for x in e["res"].get("entity", []))]
    assert len(created) == 1 and created[0]["agent"][0]["who"]["identifier"]["value"] == "fhir-dmp"


def test_prior_basis_when_the_ps_had_one(napi):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    gp = napi.as_ps(b.PS_DR)
    assert gp.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    task = tasks(napi.as_officer(), f"patient=Patient/{pid}")[0]
    prior = inputs(task)["prior-basis"]
    assert (prior["system"], prior["code"]) == (ACCESS_BASIS_SYSTEM, "medecin-traitant")


def test_concurrent_first_reads_open_one_task(notify_app, napi, idp):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    assert concurrent_break_glass_reads(notify_app, idp, pid, 5) == {200}
    assert len(tasks(napi.as_officer(), f"patient=Patient/{pid}")) == 1


def test_officer_takes_and_closes_the_patient_is_told(napi, worker, smtp):
    sink, _ = smtp
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    doc = with_document(napi, pid)
    er = napi.as_ps(b.PS_OTHER, profession="10")
    assert er.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    assert er.get(f"DocumentReference/{doc}", headers=BTG_HEADERS).status_code == 200
    drain(worker)
    sink.messages.clear()
    officer = napi.as_officer()
    task = tasks(officer, f"patient=Patient/{pid}")[0]
    tid = task["id"]

    # take it (PATCH): in-progress, owner the officer, documents-read counted from the journal
    r = officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/status", "value": "in-progress"}])
    assert r.status_code == 200, r.get_data(as_text=True)
    taken = r.json
    assert taken["status"] == "in-progress"
    assert taken["owner"]["identifier"]["value"] == "officer-1"
    assert inputs(taken)["documents-read"] == 1

    # an invalid transition: back to requested is refused (422), with an OperationOutcome
    r = officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/status", "value": "requested"}])
    assert r.status_code == 422 and r.json["resourceType"] == "OperationOutcome"
    # the evidence is the server's
    r = officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/for", "value": {"reference": "Patient/x"}}])
    assert r.status_code in (400, 422)
    # closing without a verdict or a note: 422
    r = officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/status", "value": "completed"}])
    assert r.status_code == 422

    # close it (PUT)
    closed = {**taken, "status": "completed",
              "businessStatus": {"coding": [{"system": REVIEW_SYSTEM, "code": "justified"}]},
              "note": [{"text": "Patient admis aux urgences, accès conforme."}]}
    r = officer.put(f"Task/{tid}", closed)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["status"] == "completed"

    # frozen: any further change is a 409
    again = {**r.json, "note": [{"text": "changé"}]}
    r = officer.put(f"Task/{tid}", again)
    assert r.status_code == 409 and r.json["resourceType"] == "OperationOutcome"
    r = officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/status", "value": "in-progress"}])
    assert r.status_code == 409

    # the patient is told: a Communication and an email
    me = napi.as_patient(pid)
    told = [c for c in communications(me, pid) if kind(c) == "review_outcome"]
    assert len(told) == 1
    assert drain(worker) == 1
    mail = sink.messages[-1]
    assert mail["To"] == EMAIL and "Examen d'un accès" in mail["Subject"]
    text = mail.get_content()
    assert "accès justifié" in text and "Patient admis aux urgences" in text
    assert b.PS_OTHER in text
    # the patient reads the case, not the professional
    assert me.get(f"Task/{tid}").json["businessStatus"]["coding"][0]["code"] == "justified"
    assert er.get(f"Task/{tid}").status_code == 404


def test_only_the_officer_changes_a_case_nobody_creates_or_deletes_one(napi):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    assert napi.as_ps(b.PS_OTHER).get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    officer = napi.as_officer()
    task = tasks(officer, f"patient=Patient/{pid}")[0]
    taken = {**task, "status": "in-progress"}
    # the patient reads it but may not change it (403); a professional does not see it (404)
    me = napi.as_patient(pid)
    assert me.get(f"Task/{task['id']}").status_code == 200
    assert me.put(f"Task/{task['id']}", taken).status_code == 403
    assert napi.as_ps(b.PS_DR).put(f"Task/{task['id']}", taken).status_code == 404
    assert napi.as_admin().put(f"Task/{task['id']}", taken).status_code == 403
    # nobody POSTs a review case, the officer included; nobody deletes one (405, as for the journal)
    new = {k: v for k, v in task.items() if k not in ("id", "meta")}
    for caller in (officer, me, napi.as_admin(), napi.as_ps(b.PS_DR)):
        r = caller.post("Task", new)
        assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, OPTIONS"
    r = officer.delete(f"Task/{task['id']}")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, PUT, PATCH, OPTIONS"
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "POST", "url": "Task"},
                                                                    "resource": new}]}
    assert officer.post("", batch).json["entry"][0]["response"]["status"].startswith("405")
    # a client-chosen id creates nothing either, not even for the administrator's import
    assert napi.as_admin().put("Task/fresh-id", {**new, "id": "fresh-id"}).status_code == 403
    assert officer.put("Task/fresh-id", {**new, "id": "fresh-id"}).status_code == 404
    assert officer.get(f"Task/{task['id']}").status_code == 200


def test_centre_15_one_open_case_per_professional_and_dmp(napi):
    pid = open_dmp(napi, email=EMAIL, gp=b.PS_DR)
    samu = napi.as_regulation()
    for _ in range(3):
        assert samu.get(f"Patient/{pid}").status_code == 200
    officer = napi.as_officer()
    found = tasks(officer, f"code={REVIEW_SYSTEM}|centre-15&patient=Patient/{pid}")
    assert len(found) == 1
    closed = {**found[0], "status": "completed",
              "businessStatus": {"coding": [{"system": REVIEW_SYSTEM, "code": "unjustified"}]},
              "note": [{"text": "Aucun appel au 15 ce jour-là."}]}
    assert officer.put(f"Task/{found[0]['id']}", closed).status_code == 200
    # closed: the next access opens a new case
    assert samu.get(f"Patient/{pid}").status_code == 200
    found = tasks(officer, f"code={REVIEW_SYSTEM}|centre-15&patient=Patient/{pid}&_sort=-authored-on")
    assert [t["status"] for t in found] == ["requested", "completed"]
    assert tasks(officer, f"code={REVIEW_SYSTEM}|centre-15&status=requested&patient=Patient/{pid}") == [found[0]]
