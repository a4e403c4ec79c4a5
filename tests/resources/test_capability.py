"""The CapabilityStatement says exactly what the server serves (routes, search parameters, profiles)."""
import json
from pathlib import Path

import pytest

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from fhir_dmp import search
from fhir_dmp.profiles import PROFILES, dmp
from tests import builders as b

ROOT = Path(__file__).resolve().parents[2]
STATEMENT = json.loads((ROOT / "capability_statement.json").read_text())


def test_statement_is_valid_r4_and_served(api, config):
    r = api.anonymous().get("metadata")
    assert r.status_code == 200
    cs = r.json
    CapabilityStatement.model_validate(cs)
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["implementation"]["url"] == config.fhir_base
    assert cs["software"]["version"] != "0"
    assert cs["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    from tests.http.test_conformance import empties
    assert empties(cs) == []        # R4 JSON: no empty arrays or objects (searchRevInclude: [] is invalid)
    xml = api.anonymous().get("metadata", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 200 and b"CapabilityStatement" in xml.data


def test_search_parameters_match_the_engine():
    for res in STATEMENT["rest"][0]["resource"]:
        if "search-type" not in {i["code"] for i in res["interaction"]}:
            assert "searchParam" not in res, res["type"]       # Binary: read by id, not searched
            continue
        declared = {p["name"] for p in res.get("searchParam", [])}
        assert declared == set(search.SUPPORTED[res["type"]]), res["type"]
        for p in res["searchParam"]:
            assert p["type"] == search.SUPPORTED[res["type"]][p["name"]].type


def test_profiles_are_ours():
    for res in STATEMENT["rest"][0]["resource"]:
        for url in res.get("supportedProfile", []):
            assert PROFILES.get(res["type"]) == url or url in dmp.PROFILES_CONSENT
            name = url.rsplit("/", 1)[1]
            assert (ROOT / "ig" / f"StructureDefinition-{name}.json").exists() or \
                any(name in p.name for p in (ROOT / "ig").glob("*.json"))


def test_operations_are_defined_and_routed(api):
    """Each declared operation has its OperationDefinition in ig/ and a route (not 404/405 on a
    missing Patient: the route answers as for the missing Patient, or 400 on a bad request)."""
    admin = api.as_admin()
    for res in STATEMENT["rest"][0]["resource"]:
        for op in res.get("operation", []):
            name = op["definition"].rsplit("/", 1)[1]
            definition = json.loads((ROOT / "ig" / f"OperationDefinition-{name}.json").read_text(encoding="utf-8"))
            assert definition["url"] == op["definition"] and definition["code"] == op["name"]
            assert definition["resource"] == [res["type"]]
            method = "get" if definition["affectsState"] is False else "post"
            r = getattr(admin, method)(f"{res['type']}/missing/${op['name']}")
            assert r.status_code in (400, 404) and r.json["resourceType"] == "OperationOutcome", (op, r.status_code)
            assert "no such endpoint" not in r.json["issue"][0]["diagnostics"], op


def test_interactions_match_the_routes(api):
    """Every declared write interaction answers (not 405); every undeclared write answers 405."""
    admin = api.as_admin()
    admin.create(b.patient())
    for res in STATEMENT["rest"][0]["resource"]:
        rtype = res["type"]
        codes = {i["code"] for i in res["interaction"]}
        for code, call in (("create", lambda: admin.post(rtype, {"resourceType": rtype})),
                           ("update", lambda: admin.put(f"{rtype}/x", {"resourceType": rtype, "id": "x"})),
                           ("patch", lambda: admin.patch(f"{rtype}/x", [])),
                           ("delete", lambda: admin.delete(f"{rtype}/x"))):
            status = call().status_code
            if code in codes:
                assert status != 405, (rtype, code)
            else:
                assert status == 405, (rtype, code, status)


@pytest.fixture
def record(api, smtp, config, tmp_path):
    """A DMP with one resource of every hosted type, and the patient who may read them all."""
    b.load_directory(config, tmp_path)
    ps = api.as_ps()
    pat = ps.create(b.patient(email="claire@example.org"))
    doc = ps.create(b.docref(pat["id"]))
    me = api.as_patient(pat["id"])
    ids = {"Patient": pat["id"], "DocumentReference": doc["id"],
           "Binary": doc["content"][0]["attachment"]["url"].split("/")[1],
           "Practitioner": f"ps-{b.PS_DR}", "PractitionerRole": f"role-{b.PS_DR}"}
    ids["RelatedPerson"] = me.create(b.related_person(pat["id"]))["id"]
    # a break-glass read opens a review Task the patient reads (CONTRACT.md "Privacy operations")
    assert api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="urgence").get(f"Patient/{pat['id']}").status_code == 200
    for rtype in ("Consent", "AuditEvent", "Communication", "Task"):
        ids[rtype] = me.search(f"{rtype}?patient={pat['id']}&_count=1")["entry"][0]["resource"]["id"]
    return me, ids


def test_every_declared_read_interaction_works(api, record):
    """Each declared read interaction of each type, once, by a caller allowed to see the data."""
    me, ids = record
    for res in STATEMENT["rest"][0]["resource"]:
        rtype, rid = res["type"], ids[res["type"]]
        codes = {i["code"] for i in res["interaction"]}
        calls = {"read": f"{rtype}/{rid}", "vread": f"{rtype}/{rid}/_history/1",
                 "history-instance": f"{rtype}/{rid}/_history", "history-type": f"{rtype}/_history",
                 "search-type": f"{rtype}?_id={rid}"}
        for code, path in calls.items():
            r = me.get(path)
            if code not in codes:
                continue
            assert r.status_code == 200, (rtype, code, r.status_code, r.get_data(as_text=True)[:300])
            body = r.json
            if code in ("read", "vread"):
                assert body["id"] == rid, (rtype, code)
            else:
                assert any((e.get("resource") or {}).get("id") == rid for e in body.get("entry", [])), (rtype, code)
    system = {i["code"] for i in STATEMENT["rest"][0]["interaction"]}
    assert system == {"transaction", "batch", "history-system"}
    assert me.get("_history").json["type"] == "history"
    assert me.post("", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{ids['Patient']}"}}]}).json["type"] == "batch-response"
    assert me.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{ids['Patient']}"}}]}).json["type"] == "transaction-response"


SAMPLE = {"token": "x", "date": "ge2000-01-01", "string": "a", "reference": "x", "number": "1", "uri": "x:y"}
# parameters whose values are checked against a closed list
VALUES = {"active": "true", "gender": "female", "outcome": "0"}


def test_every_declared_search_parameter_is_understood(api, record):
    """Each declared search parameter, _include and _revinclude, once, in strict handling."""
    me, ids = record
    strict = {"Prefer": "handling=strict"}
    for res in STATEMENT["rest"][0]["resource"]:
        rtype = res["type"]
        if "search-type" not in {i["code"] for i in res["interaction"]}:
            continue
        for p in res.get("searchParam", []):
            value = VALUES.get(p["name"], SAMPLE[p["type"]])
            r = me.get(f"{rtype}?{p['name']}={value}", headers=strict)
            assert r.status_code == 200, (rtype, p["name"], r.get_data(as_text=True)[:300])
        for key in ("searchInclude", "searchRevInclude"):
            for inc in res.get(key, []):
                name = "_include" if key == "searchInclude" else "_revinclude"
                r = me.get(f"{rtype}?_id={ids[rtype]}&{name}={inc}", headers=strict)
                assert r.status_code == 200, (rtype, name, inc, r.get_data(as_text=True)[:300])
    common = {"_count": "1", "_sort": "-_lastUpdated", "_total": "accurate", "_summary": "true",
              "_elements": "id", "_include": "Patient:general-practitioner", "_revinclude": "Consent:patient"}
    for p in STATEMENT["rest"][0]["searchParam"]:
        r = me.get(f"Patient?{p['name']}={common[p['name']]}", headers=strict)
        assert r.status_code == 200, (p["name"], r.get_data(as_text=True)[:300])


def test_declared_conditional_writes_work(api):
    """conditionalCreate / conditionalUpdate / conditionalDelete, once per type that declares them."""
    admin, ps = api.as_admin(), api.as_ps()
    pat = ps.create(b.patient())
    samples = {"Patient": (admin, b.patient()), "Consent": (admin, b.consent(pat["id"], actor=b.PS_OTHER)),
               "DocumentReference": (ps, b.docref(pat["id"])),
               "RelatedPerson": (admin, b.related_person(pat["id"]))}
    for res in STATEMENT["rest"][0]["resource"]:
        rtype = res["type"]
        if rtype not in samples:
            assert not res["conditionalCreate"] and not res["conditionalUpdate"], rtype
            assert res["conditionalDelete"] == "not-supported", rtype
            continue
        caller, body = samples[rtype]
        first = caller.create(body)
        if res["conditionalCreate"]:
            again = caller.post(rtype, body, headers={"If-None-Exist": f"_id={first['id']}"})
            assert again.status_code == 200 and again.json["id"] == first["id"], (rtype, again.json)
        if res["conditionalUpdate"]:
            current = caller.get(f"{rtype}/{first['id']}").json
            r = caller.put(f"{rtype}?_id={first['id']}", current)
            assert r.status_code == 200 and r.json["id"] == first["id"], (rtype, r.json)
        if res["conditionalDelete"] == "single":
            r = caller.delete(f"{rtype}?_id={first['id']}")
            assert r.status_code == 204, (rtype, r.json)
            assert caller.get(f"{rtype}/{first['id']}").status_code == 410, rtype
    assert admin.post("Binary", raw=b"x", content_type="text/plain",
                      headers={"If-None-Exist": "_id=x"}).status_code == 400
    assert admin.delete("Binary?_id=x").status_code == 400


def test_conditional_read_is_declared():
    for res in STATEMENT["rest"][0]["resource"]:
        assert res["conditionalRead"] == "full-support"
    assert STATEMENT["rest"][0]["security"]["cors"] is True


def test_smart_configuration(api, config):
    r = api.anonymous().get(".well-known/smart-configuration")
    assert r.status_code == 200
    body = r.json
    assert body["issuer"] == config.issuer
    for key in ("capabilities", "scopes_supported"):
        assert key in body
    assert "permission-v2" in body["capabilities"]


def test_update_as_create_is_not_declared(api):
    """Update-as-create is reserved to the administrator's import (issue 9, hole 9): the statement
    says updateCreate false and names the import in each updatable type's documentation."""
    pat = api.as_ps().create(b.patient())
    for res in STATEMENT["rest"][0]["resource"]:
        assert res["updateCreate"] is False, res["type"]
        if "update" in {i["code"] for i in res["interaction"]}:
            assert "client-chosen id" in res["documentation"], res["type"]
    # what it says holds: a PS PUT on a fresh id is 404, the administrator's creates
    body = b.consent(pat["id"], "permit", actor=b.PS_OTHER)
    assert api.as_ps().put("Consent/cap-fresh-id", dict(body, id="cap-fresh-id")).status_code == 404
    assert api.as_admin().put("Consent/cap-fresh-id", dict(body, id="cap-fresh-id")).status_code == 201


def test_binary_content_never_changes_in_place(api):
    """Issue 18 hole 5: no one may update a Binary (the author got 403, others 404): the statement
    does not declare it and ``PUT Binary`` answers 405 with ``Allow`` and an OperationOutcome."""
    binary = next(r for r in STATEMENT["rest"][0]["resource"] if r["type"] == "Binary")
    assert "update" not in {i["code"] for i in binary["interaction"]}
    ps = api.as_ps()
    pat = ps.create(b.patient())
    doc = ps.create(b.docref(pat["id"]))
    bid = doc["content"][0]["attachment"]["url"].split("/")[1]
    for caller in (ps, api.as_ps(b.PS_OTHER), api.as_admin()):
        for r in (caller.put(f"Binary/{bid}", raw=b"%PDF-1.4 new", content_type="application/pdf"),
                  caller.put(f"Binary/{bid}", {"resourceType": "Binary", "id": bid, "contentType": "text/plain",
                                               "data": "eA=="}),
                  caller.put(f"Binary?_id={bid}", {"resourceType": "Binary", "contentType": "text/plain"})):
            assert r.status_code == 405, r.get_data(as_text=True)
            assert "PUT" not in r.headers["Allow"] and "GET" in r.headers["Allow"]
            assert r.json["resourceType"] == "OperationOutcome"
            assert "relatesTo" in r.json["issue"][0]["diagnostics"]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{
        "resource": {"resourceType": "Binary", "id": bid, "contentType": "text/plain", "data": "eA=="},
        "request": {"method": "PUT", "url": f"Binary/{bid}"}}]}
    out = api.as_admin().post("", bundle)
    assert out.json["entry"][0]["response"]["status"] == "405"
    assert ps.get(f"Binary/{bid}", headers={"Accept": "application/pdf"}).data.startswith(b"%PDF")
