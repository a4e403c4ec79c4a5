"""REST interactions over HTTP through the WSGI app, with real tokens and a real database."""
import json
import threading
from pathlib import Path

import pytest

from tests import builders as b

FIXTURES = Path(__file__).parents[1] / "fixtures" / "r4"


def strip(res):
    return {k: v for k, v in res.items() if k not in ("id", "meta")}


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("Patient-*.json")), ids=lambda p: p.stem)
def test_official_patient_examples_round_trip(api, path):
    admin = api.as_admin()
    original = json.loads(path.read_text())
    created = admin.create(original)
    assert strip(created) == strip(original)
    read = admin.get(f"Patient/{created['id']}")
    assert read.status_code == 200
    assert strip(read.json) == strip(original)
    assert read.headers["ETag"] == 'W/"1"'
    xml = admin.get(f"Patient/{created['id']}", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 200 and xml.content_type.startswith("application/fhir+xml")
    assert b"<Patient" in xml.data


def test_create_read_update_delete_history(api):
    admin = api.as_admin()
    r = admin.post("Patient", b.patient())
    assert r.status_code == 201
    pid = r.json["id"]
    assert r.headers["Location"].endswith(f"/Patient/{pid}/_history/1")
    assert r.headers["ETag"] == 'W/"1"' and r.headers["Last-Modified"]
    body = dict(r.json, gender="male")
    r = admin.put(f"Patient/{pid}", body, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "2"
    r = admin.put(f"Patient/{pid}", body, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert admin.get(f"Patient/{pid}/_history/1").json["gender"] == "female"
    hist = admin.search(f"Patient/{pid}/_history")
    assert hist["type"] == "history" and hist["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]
    assert admin.delete(f"Patient/{pid}").status_code == 204
    r = admin.get(f"Patient/{pid}")
    assert r.status_code == 410 and r.json["resourceType"] == "OperationOutcome"
    assert admin.search(f"Patient/{pid}/_history")["total"] == 3
    assert admin.search("Patient/_history")["type"] == "history"


def test_prefer_return(api):
    admin = api.as_admin()
    r = admin.post("Patient", b.patient(), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and r.data == b"" and r.headers["Location"]
    r = admin.post("Patient", b.patient(), headers={"Prefer": "return=OperationOutcome"})
    assert r.json["resourceType"] == "OperationOutcome"


def test_conditional_create(api):
    admin = api.as_admin()
    ins = b.nir()
    first = admin.post("Patient", b.patient(ins), headers={"If-None-Exist": f"identifier={b.NIR}|{ins}"})
    assert first.status_code == 201
    again = admin.post("Patient", b.patient(ins), headers={"If-None-Exist": f"identifier={b.NIR}|{ins}"})
    assert again.status_code == 200 and again.json["id"] == first.json["id"]


def test_conditional_update_creates_then_updates(api):
    admin = api.as_admin()
    ins = b.nir()
    r = admin.put(f"Patient?identifier={b.NIR}|{ins}", b.patient(ins))
    assert r.status_code == 201
    r2 = admin.put(f"Patient?identifier={b.NIR}|{ins}", dict(b.patient(ins), gender="male"))
    assert r2.status_code == 200 and r2.json["id"] == r.json["id"] and r2.json["meta"]["versionId"] == "2"


def test_if_match_race_one_wins(api):
    admin = api.as_admin()
    pat = admin.create(b.patient())
    results = []
    barrier = threading.Barrier(2)

    def worker(gender):
        client = api.app.test_client()
        barrier.wait()
        r = client.put(f"/fhir/Patient/{pat['id']}", data=json.dumps(dict(pat, gender=gender)),
                       headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "application/fhir+json",
                                "If-Match": 'W/"1"'})
        results.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(g,)) for g in ("male", "other")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [200, 412]


def test_xml_in_and_out(api):
    admin = api.as_admin()
    from fhir_dmp.http import formats
    xml = formats.to_xml(b.patient())
    r = admin.post("Patient", raw=xml, content_type="application/fhir+xml",
                   headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 201, r.data
    assert r.content_type.startswith("application/fhir+xml")
    created = formats.from_xml(r.data)
    r = admin.get(f"Patient/{created['id']}?_format=xml")
    assert r.content_type.startswith("application/fhir+xml")
    r = admin.get(f"Patient/{created['id']}", headers={"Accept": "text/plain"})
    assert r.status_code == 406


def test_json_patch_labels(api):
    ps = api.as_ps()
    pat = ps.create(b.patient())
    doc = ps.create(b.docref(pat["id"]))
    r = ps.patch(f"DocumentReference/{doc['id']}",
                 [{"op": "add", "path": "/securityLabel", "value": [{"coding": [{"system": b.LABELS,
                                                                                 "code": "INVISIBLE_PATIENT"}]}]}])
    assert r.status_code == 200, r.json
    assert r.json["securityLabel"][0]["coding"][0]["code"] == "INVISIBLE_PATIENT"
    r = ps.patch(f"DocumentReference/{doc['id']}", [{"op": "replace", "path": "/status", "value": "bogus"}])
    assert r.status_code == 422
    r = ps.patch(f"DocumentReference/{doc['id']}", [{"op": "remove", "path": "/nothere"}])
    assert r.status_code == 422


def test_transaction_with_urn_uuid_and_atomicity(api):
    ps = api.as_ps()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": b.patient(),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
         "resource": dict(b.docref("x"), subject={"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}),
         "request": {"method": "POST", "url": "DocumentReference"}}]}
    r = ps.post("", bundle)
    assert r.status_code == 200, r.json
    assert r.json["type"] == "transaction-response"
    pid = r.json["entry"][0]["response"]["location"].split("/")[1]
    doc = r.json["entry"][1]["resource"]
    assert doc["subject"]["reference"] == f"Patient/{pid}"
    # atomic: the second entry is invalid -> nothing of the first is stored
    before = api.as_admin().search("Patient?_summary=count")["total"]
    bad = json.loads(json.dumps(bundle))
    bad["entry"][1]["resource"]["status"] = "nonsense"
    r = ps.post("", bad)
    assert 400 <= r.status_code < 500
    assert api.as_admin().search("Patient?_summary=count")["total"] == before


def test_batch_entries_independent(api):
    admin = api.as_admin()
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": b.patient(), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}}]}
    r = admin.post("", bundle)
    assert r.status_code == 200
    assert r.json["entry"][0]["response"]["status"].startswith("201")
    assert r.json["entry"][1]["response"]["status"].startswith("404")


BAD_BODIES = [
    ("truncated json", b'{"resourceType": "Patient", "active": tr', "application/fhir+json", 400),
    ("not an object", b'[1,2]', "application/fhir+json", 400),
    ("wrong type for url", json.dumps({"resourceType": "Consent"}).encode(), "application/fhir+json", 400),
    ("unknown element", json.dumps({"resourceType": "Patient", "foo": 1}).encode(), "application/fhir+json", 422),
    ("string boolean", json.dumps({"resourceType": "Patient", "active": "yes"}).encode(), "application/fhir+json", 422),
    ("bad date", json.dumps({"resourceType": "Patient", "birthDate": "2023-02-30"}).encode(), "application/fhir+json", 422),
    ("bad gender", json.dumps({"resourceType": "Patient", "gender": "dragon"}).encode(), "application/fhir+json", 422),
    ("invalid INS key", json.dumps({"resourceType": "Patient", "identifier": [
        {"system": b.NIR, "value": "185037500000199"}]}).encode(), "application/fhir+json", 422),
    ("truncated xml", b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/>', "application/fhir+xml", 400),
    ("xxe", b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<Patient xmlns="http://hl7.org/fhir"><id value="&x;"/></Patient>', "application/fhir+xml", 400),
    ("unsupported media", b'hello', "text/plain", 415),
]


@pytest.mark.parametrize("name,body,ctype,status", BAD_BODIES, ids=[x[0] for x in BAD_BODIES])
def test_bad_input_is_a_clear_4xx(api, name, body, ctype, status):
    admin = api.as_admin()
    before = admin.search("Patient?_summary=count")["total"]
    r = admin.post("Patient", raw=body, content_type=ctype)
    assert r.status_code == status, r.data
    assert r.json["resourceType"] == "OperationOutcome"
    assert "Traceback" not in r.get_data(as_text=True)
    assert "root:" not in r.get_data(as_text=True)
    assert admin.search("Patient?_summary=count")["total"] == before


def test_invalid_ins_points_at_the_field(api):
    r = api.as_admin().post("Patient", {"resourceType": "Patient", "identifier": [
        {"system": b.NIR, "value": "185037500000199"}]})
    assert r.status_code == 422
    exprs = [e for i in r.json["issue"] for e in i.get("expression", [])]
    assert "Patient.identifier[0].value" in exprs


def test_put_id_mismatch_and_unknown_type_and_params(api):
    admin = api.as_admin()
    pat = admin.create(b.patient())
    r = admin.put(f"Patient/{pat['id']}", dict(pat, id="other"))
    assert r.status_code == 400
    assert admin.get("Observation/1").status_code == 404
    r = admin.get("Patient?foo=bar", headers={"Prefer": "handling=strict"})
    assert r.status_code == 400 and r.json["resourceType"] == "OperationOutcome"
    r = admin.get("Patient?foo=bar", headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200


@pytest.mark.parametrize("query", ["Patient?name[$ne]=x", "Patient?name=%24where", "Patient?_id[$gt]=",
                                   "Patient?name=.*", "Patient?family=(a+)+$", "Patient?_sort=$where",
                                   "Patient?_count=-1", "Patient?birthdate=notadate", "Patient?_cursor=zzz"])
def test_injection_attempts(api, query):
    admin = api.as_admin()
    admin.create(b.patient())
    r = admin.get(query, headers={"Prefer": "handling=strict"})
    assert r.status_code in (200, 400), (query, r.status_code)
    if r.status_code == 200:
        assert r.json.get("total", 0) == 0
    lenient = admin.get(query)      # by default an unknown parameter is ignored and reported
    assert lenient.status_code in (200, 400), (query, lenient.status_code)


def test_oversized_body(app, api, config):
    admin = api.as_admin()
    big = b'{"resourceType":"Patient","text":{"status":"generated","div":"' + b"a" * (config.max_body_bytes + 10) + b'"}}'
    r = admin.post("Patient", raw=big, content_type="application/fhir+json")
    assert r.status_code == 413
    assert r.json["resourceType"] == "OperationOutcome"


def test_auth_required_and_metadata_public(api):
    r = api.anonymous().get("Patient")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = api.anonymous().get("metadata")
    assert r.status_code == 200 and r.json["fhirVersion"] == "4.0.1"
    assert api.anonymous().get(".well-known/smart-configuration").status_code == 200


def test_scope_enforced(api, idp):
    caller = api.as_token(idp.admin(scope="user/Patient.rs"))
    assert caller.get("Patient").status_code == 200
    r = caller.post("Patient", b.patient())
    assert r.status_code == 403


def test_post_search_and_sort(api):
    admin = api.as_admin()
    for family, birth in (("Durand", "1990-01-01"), ("Bernard", "1970-05-05"), ("Petit", "1980-03-03")):
        admin.create(b.patient(family=family) | {"birthDate": birth})
    r = admin.post("Patient/_search", raw="family=Durand,Petit&_sort=-birthdate",
                   content_type="application/x-www-form-urlencoded")
    assert r.status_code == 200, r.json
    assert [e["resource"]["name"][0]["family"] for e in r.json["entry"]] == ["Durand", "Petit"]
    asc = admin.search("Patient?_sort=birthdate,family&_count=2")
    assert [e["resource"]["birthDate"] for e in asc["entry"]] == ["1970-05-05", "1980-03-03"]
    assert any(link["relation"] == "next" for link in asc["link"])
    r = admin.post("Patient/_search", raw=b'{"family": "x"}', content_type="application/json")
    assert r.status_code == 415


# ---------- scopes, transactions, vread of a deleted resource (review holes 6, 8 and 11)
def test_patient_scopes_confine_to_one_compartment(api, idp, dmp):
    pid = dmp["pid"]
    other = api.as_ps(b.PS_DR).create(b.patient())["id"]
    # a patient claim that differs from the patient's own record
    token = idp.patient(pid, patient=other)
    assert api.as_token(token).get(f"Patient/{pid}").status_code == 401
    # a PS with only patient/ scopes and no patient claim
    token = idp.ps(b.PS_DR, scope="openid patient/*.rs")
    assert api.as_token(token).get(f"Patient/{pid}").status_code == 401
    # a PS with patient/ scopes and a patient claim: only that compartment
    token = idp.ps(b.PS_DR, scope="openid patient/*.rs", patient=pid)
    caller = api.as_token(token)
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}").status_code == 200
    assert caller.search("Patient")["total"] == 1
    assert caller.get(f"Patient/{other}").status_code == 404
    assert caller.search(f"DocumentReference?patient={other}")["total"] == 0


def test_type_history_needs_search_scope(api, idp, dmp):
    token = idp.ps(b.PS_DR, scope="openid user/DocumentReference.r")
    caller = api.as_token(token)
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}").status_code == 200
    assert caller.get("DocumentReference/_history").status_code == 403
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}/_history").status_code == 200


def test_transaction_get_sees_own_writes(api):
    dr = api.as_ps(b.PS_DR)
    ins = b.nir()
    urn = "urn:uuid:11111111-1111-1111-1111-111111111111"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": urn, "resource": b.patient(ins), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": urn}},
        {"request": {"method": "GET", "url": f"Patient?identifier={b.NIR}|{ins}"}},
    ]}
    r = dr.post("", bundle)
    assert r.status_code == 200, r.json
    created = r.json["entry"][0]["resource"]["id"]
    read = r.json["entry"][1]
    assert read["response"]["status"].startswith("200"), read
    assert read["resource"]["id"] == created
    assert r.json["entry"][2]["resource"]["total"] == 1


def test_vread_first_version_of_deleted_resource_agrees_with_history(api, dmp):
    pid = dmp["pid"]
    me = api.as_patient(pid)
    consent = me.create(b.consent(pid, "permit", actor=b.PS_OTHER))
    assert me.delete(f"Consent/{consent['id']}").status_code == 204
    hist = me.search(f"Consent/{consent['id']}/_history")
    assert {e["response"]["status"][:3] if "response" in e else "200" for e in hist["entry"]}
    listed = [e for e in hist["entry"] if e.get("resource")]
    assert [e["resource"]["meta"]["versionId"] for e in listed] == ["1"]
    r = me.get(f"Consent/{consent['id']}/_history/1")
    assert r.status_code == 200, r.json
    assert r.json["meta"]["versionId"] == "1"
