"""The privacy officer (CONTRACT.md "Privacy operations"): ``dmp_role: privacy_officer``, never a PS;
reads every AuditEvent, Consent, Patient, RelatedPerson and review Task of every DMP, never document
content (as missing on every path), writes only review Tasks; its reads are journaled. The document
read paths are also walked by the access table (tests/security/test_access.py, row
``privacy_officer``)."""
from __future__ import annotations

import base64

from tests import builders as b

BTG = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                   'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
       "X-Break-Glass-Reason": "arrêt cardiaque"}


def _world(api):
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email="claire@example.org"))["id"]
    doc = dr.create(b.docref(pid, b.CONSULTATION))
    me = api.as_patient(pid)
    consent = me.create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    rep = me.create(b.related_person(pid, "GUARD"))
    assert api.as_ps(b.PS_OTHER).get(f"Patient/{pid}", headers=BTG).status_code == 200   # a review case
    return pid, doc, consent, rep


def _types(bundle) -> set[str]:
    return {e["resource"]["resourceType"] for e in bundle.get("entry", [])}


def test_officer_reads_journals_consents_patients_representatives_and_tasks(api, db):
    pid, doc, consent, rep = _world(api)
    officer = api.as_officer()
    assert officer.get(f"Patient/{pid}").status_code == 200
    assert officer.get(f"Consent/{consent['id']}").status_code == 200
    assert officer.get(f"RelatedPerson/{rep['id']}").status_code == 200
    assert officer.search("Patient?_summary=count&_total=accurate")["total"] >= 1
    journal = officer.search(f"AuditEvent?patient=Patient/{pid}&_count=200")
    assert len(journal["entry"]) >= 5
    assert officer.search(f"Consent?patient=Patient/{pid}")["total"] >= 2      # all of them, not only its own
    assert officer.search(f"RelatedPerson?patient=Patient/{pid}")["total"] == 1
    tasks = officer.search(f"Task?patient=Patient/{pid}")
    assert tasks["total"] == 1
    assert officer.get(f"Task/{tasks['entry'][0]['resource']['id']}/_history/1").status_code == 200
    # the system journal too (no DMP)
    assert officer.get("AuditEvent?_count=1").status_code == 200
    # its reads are journaled like any other, under its role
    mine = [e["res"] for e in b.journal_entries(db, {"pid": pid})
            if e["res"]["agent"][0].get("altId") == "officer-1"]
    assert mine and all(e["agent"][0]["role"][0]["coding"][0]["code"] == "privacy_officer" for e in mine)
    assert "privacy-officer" in {d["valueString"] for e in mine for ent in e.get("entity", []) if ent.get("detail")
                                 for d in ent["detail"] if d["type"] == "rule"}


def test_officer_never_reads_content(api):
    pid, doc, _, _ = _world(api)
    officer = api.as_officer()
    missing = officer.get("DocumentReference/does-not-exist")
    binary = doc["content"][0]["attachment"]["url"]
    for path in (f"DocumentReference/{doc['id']}", f"DocumentReference/{doc['id']}/_history/1",
                 f"DocumentReference/{doc['id']}/_history", binary):
        r = officer.get(path)
        assert r.status_code == 404, path
        assert set(r.json) == set(missing.json)
    assert officer.search(f"DocumentReference?patient=Patient/{pid}&_total=accurate")["total"] == 0
    assert officer.search("DocumentReference?_summary=count&_total=accurate")["total"] == 0
    rev = officer.search(f"Patient?_id={pid}&_revinclude=DocumentReference:subject")
    assert _types(rev) == {"Patient"}
    inc = officer.search(f"AuditEvent?patient=Patient/{pid}&_include=AuditEvent:entity&_count=200")
    assert not _types(inc) & {"DocumentReference", "Binary"}
    for path in ("DocumentReference/_history", "_history"):
        assert not _types(officer.search(path)) & {"DocumentReference", "Binary"}, path
    # nor the notices (Communications), which only the patient's side reads
    assert officer.search(f"Communication?subject=Patient/{pid}&_total=accurate")["total"] == 0
    # conditional operations match nothing it cannot see: a conditional delete deletes nothing
    assert officer.delete(f"DocumentReference?_id={doc['id']}").status_code in (200, 204)
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{doc['id']}").status_code == 200


def test_officer_writes_only_review_tasks(api):
    pid, doc, consent, rep = _world(api)
    officer = api.as_officer()
    patient = officer.get(f"Patient/{pid}").json
    assert officer.put(f"Patient/{pid}", {**patient, "active": False}).status_code == 403
    assert officer.post("Consent", b.consent(pid, "deny", actor=b.PS_DR)).status_code in (403, 422)
    assert officer.post("DocumentReference", b.docref(pid, b.CONSULTATION)).status_code in (403, 422)
    assert officer.delete(f"Consent/{consent['id']}").status_code == 403
    assert officer.post("Binary", raw=base64.b64decode(base64.b64encode(b"x")), content_type="text/plain",
                        headers={"X-Security-Context": f"Patient/{pid}"}).status_code in (403, 422)
    assert api.as_patient(pid).get(f"Patient/{pid}").json["active"] is not False


def test_a_ps_token_with_the_role_is_the_officer_not_a_ps(api, idp):
    pid, doc, _, _ = _world(api)
    both = api.as_token(idp.token(sub="officer-2", dmp_role="privacy_officer", SubjectNameID=b.PS_DR,
                                  SubjectRole=["10"], acr="eidas1", scope="openid user/*.cruds"))
    # PS_DR authored the document and opened the DMP: as the officer it reads no content
    assert both.get(f"DocumentReference/{doc['id']}").status_code == 404
    assert both.search(f"Task?patient=Patient/{pid}")["total"] == 1
    # nor may it write as that PS
    assert both.post("DocumentReference", b.docref(pid, b.CONSULTATION)).status_code in (403, 422)


def test_professionals_do_not_read_tasks(api):
    pid, *_ = _world(api)
    tid = api.as_officer().search(f"Task?patient=Patient/{pid}")["entry"][0]["resource"]["id"]
    for caller in (api.as_ps(b.PS_DR), api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="x"), api.as_regulation()):
        assert caller.get(f"Task/{tid}").status_code == 404
        assert caller.search(f"Task?patient=Patient/{pid}&_total=accurate")["total"] == 0
    me = api.as_patient(pid)
    assert me.search(f"Task?patient=Patient/{pid}")["total"] == 1


def test_destroy_removes_the_review_cases(api, db):
    pid, *_ = _world(api)
    officer = api.as_officer()
    tid = officer.search(f"Task?patient=Patient/{pid}")["entry"][0]["resource"]["id"]
    assert officer.patch(f"Task/{tid}", [{"op": "replace", "path": "/status", "value": "in-progress"}]).status_code == 200
    assert db["review_case_keys"].count_documents({"pid": pid}) == 1
    assert api.as_patient(pid).post(f"Patient/{pid}/$destroy").status_code == 204
    for coll in ("Task", "Task_history", "review_case_keys"):
        assert db[coll].count_documents({"pid": pid}) == 0, coll
    assert officer.get(f"Task/{tid}").status_code == 404
