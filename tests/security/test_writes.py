"""The write rules (DESIGN.md "The access rules", rules 10-11; CONTRACT.md "REST behaviour").

Who may change what in a DMP: only the patient and the administrator name the médecin traitant or
close the record; only the author attaches content to a document or replaces it; the depositing PS
is the author of record; a CDA's recordTarget must be the DMP's INS. Each refusal is a decision of
the one decision module, journaled with its reason. Real app, real tokens, real SecantusDB.
"""
from fhir_dmp.runtime.services import services

from tests import builders as b
from tests.builders import journal_entries
from tests.security.test_access import PS_GP


def test_ps_cannot_make_itself_medecin_traitant(api, dmp):
    pid = dmp["pid"]
    dr = api.as_ps(b.PS_DR)
    pat = dr.get(f"Patient/{pid}").json
    gp = dict(pat, generalPractitioner=[{"identifier": {"system": b.IDNATPS, "value": b.PS_DR}}])
    r = dr.put(f"Patient/{pid}", gp)
    assert r.status_code == 403, r.json
    r = dr.patch(f"Patient/{pid}", [{"op": "add", "path": "/generalPractitioner",
                                     "value": [{"identifier": {"system": b.IDNATPS, "value": b.PS_DR}}]}])
    assert r.status_code == 403, r.json
    assert "generalPractitioner" not in api.as_admin().get(f"Patient/{pid}").json


def test_ps_cannot_close_the_dmp(api, dmp):
    pid = dmp["pid"]
    dr = api.as_ps(b.PS_DR)
    pat = dr.get(f"Patient/{pid}").json
    assert dr.put(f"Patient/{pid}", dict(pat, active=False)).status_code == 403
    assert dr.patch(f"Patient/{pid}", [{"op": "replace", "path": "/active", "value": False}]).status_code == 403


def test_patient_and_admin_set_medecin_traitant(api, dmp):
    pid = dmp["pid"]
    me = api.as_patient(pid)
    pat = me.get(f"Patient/{pid}").json
    gp = [{"identifier": {"system": b.IDNATPS, "value": PS_GP}}]
    assert me.put(f"Patient/{pid}", dict(pat, generalPractitioner=gp)).status_code == 200
    admin = api.as_admin()
    pat = admin.get(f"Patient/{pid}").json
    gp2 = [{"identifier": {"system": b.IDNATPS, "value": b.PS_OTHER}}]
    assert admin.put(f"Patient/{pid}", dict(pat, generalPractitioner=gp2)).status_code == 200
    # a PS may still change what is theirs to change (telecom) on a DMP they are authorized on
    dr = api.as_ps(b.PS_DR)
    pat = dr.get(f"Patient/{pid}").json
    assert dr.put(f"Patient/{pid}", dict(pat, telecom=[{"system": "phone", "value": "0600000000"}])
                  ).status_code == 200


def test_security_context_never_attaches_to_a_masked_document(api, dmp):
    pid = dmp["pid"]
    masked = api.as_ps(b.PS_DR).create(b.docref(pid, b.CONSULTATION, labels=("MASQUE_PS",)))
    api.as_patient(pid).create(b.consent(pid, "permit", actor=b.PS_OTHER))
    other = api.as_ps(b.PS_OTHER)
    headers = {"X-Security-Context": f"DocumentReference/{masked['id']}"}
    hidden = other.request("POST", "Binary", raw=b"%PDF-1.4 evil", content_type="application/pdf", headers=headers)
    ghost = other.request("POST", "Binary", raw=b"%PDF-1.4 evil", content_type="application/pdf",
                          headers={"X-Security-Context": "DocumentReference/0000000000000000"})
    assert hidden.status_code == ghost.status_code and hidden.status_code >= 400, (hidden.json, ghost.json)
    # not even the visible one: only the author attaches content to a document
    headers = {"X-Security-Context": f"DocumentReference/{dmp['consult']['id']}"}
    r = other.request("POST", "Binary", raw=b"%PDF-1.4 evil", content_type="application/pdf", headers=headers)
    assert r.status_code == 403, r.json


def _journaled_rules(app, pid):
    """The (rule, http_status) of the denials journaled in DMP ``pid``."""
    db = services(app).storage.db
    out = set()
    for doc in (e for e in journal_entries(db, {"pid": pid}) if e["res"]["outcome"] == "4"):
        for entity in doc["res"].get("entity") or []:
            details = {d["type"]: d["valueString"] for d in entity.get("detail") or []}
            if "rule" in details:
                out.add((details["rule"], details.get("http_status")))
    return out


def test_deposit_rules_are_decisions_journaled_with_their_reason(api, app):
    """Rules 10-11 (qualified INS, only the author replaces) are decided in security/decision/:
    the deny's reason is the OperationOutcome's, and the denial reaches the DMP's journal."""
    dr = api.as_ps(b.PS_DR)
    unqualified = dr.create(b.patient(status="PROV"))["id"]
    r = dr.post("DocumentReference", b.docref(unqualified))
    assert r.status_code == 422
    assert r.json["issue"][0]["diagnostics"] == \
        "documents are deposited only on a DMP whose INS is qualified (VALI or QUAL)"
    assert ("ins-not-qualified", "422") in _journaled_rules(app, unqualified)

    pid = dr.create(b.patient())["id"]
    first = dr.create(b.docref(pid))
    other = api.as_ps(b.PS_OTHER)
    assert other.post("Consent", b.consent(pid, actor=b.PS_OTHER, verified=True)).status_code == 201
    bad = b.docref(pid)
    bad["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{first['id']}"}}]
    r = other.post("DocumentReference", bad)
    assert r.status_code == 422
    assert r.json["issue"][0]["diagnostics"] == \
        "relatesTo.target must be a document of the same record by the same author"
    assert ("not-author", "422") in _journaled_rules(app, pid)


def test_author_of_record_is_decided_not_sent(api):
    """Rule 10: the depositing PS is the author whatever the client sent, and it never changes."""
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient())["id"]
    doc = dr.create(b.docref(pid, author=b.PS_OTHER))
    assert [a["identifier"]["value"] for a in doc["author"]] == [b.PS_DR]
    changed = dict(doc, author=[{"identifier": {"system": b.IDNATPS, "value": b.PS_OTHER}}])
    r = dr.put(f"DocumentReference/{doc['id']}", changed)
    assert r.status_code == 200 and [a["identifier"]["value"] for a in r.json["author"]] == [b.PS_DR]


def test_record_target_rule():
    from fhir_dmp.security.decision import record_target_matches
    ins = (b.NIR, "279017512345644")
    root = b.NIR[len("urn:oid:"):]
    assert record_target_matches(ins, [(root, "279017512345644")]).permit
    assert record_target_matches(ins, [(root, " 279017512345644 ")]).permit      # compared trimmed
    assert not record_target_matches(ins, [(root, "279017512345644"), (root, "199017512345678")]).permit
    assert not record_target_matches(ins, [("1.2.250.1.213.1.4.10", "279017512345644")]).permit
    denied = record_target_matches(ins, [(root, "199017512345678")])
    assert denied.rule == "cda-patient" and "199017512345678" not in denied.reason   # never echoed
    assert not record_target_matches(ins, []).permit
