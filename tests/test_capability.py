"""The CapabilityStatement says exactly what the server serves (routes, search parameters, profiles)."""
import json
from pathlib import Path

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from fhir_dmp import search
from fhir_dmp.profiles import PROFILES, dmp
from tests import builders as b

ROOT = Path(__file__).resolve().parents[1]
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
    xml = api.anonymous().get("metadata", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 200 and b"CapabilityStatement" in xml.data


def test_search_parameters_match_the_engine():
    for res in STATEMENT["rest"][0]["resource"]:
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


def test_interactions_match_the_routes(api):
    """Every declared interaction answers (not 404/405); every undeclared write answers 405."""
    admin = api.as_admin()
    pat = admin.create(b.patient())
    for res in STATEMENT["rest"][0]["resource"]:
        rtype = res["type"]
        codes = {i["code"] for i in res["interaction"]}
        if "search-type" in codes:
            assert admin.get(rtype).status_code == 200, rtype
        if "history-type" in codes:
            assert admin.get(f"{rtype}/_history").status_code == 200, rtype
        for code, call in (("create", lambda: admin.post(rtype, {"resourceType": rtype})),
                           ("update", lambda: admin.put(f"{rtype}/x", {"resourceType": rtype, "id": "x"})),
                           ("delete", lambda: admin.delete(f"{rtype}/x"))):
            status = call().status_code
            if code in codes:
                assert status != 405, (rtype, code)
            else:
                assert status == 405, (rtype, code, status)
    assert admin.get(f"Patient/{pat['id']}/_history/1").status_code == 200
    kinds = {i["code"] for i in STATEMENT["rest"][0]["interaction"]}
    assert kinds == {"transaction", "batch"}


def test_smart_configuration(api):
    r = api.anonymous().get(".well-known/smart-configuration")
    assert r.status_code == 200
    body = r.json
    for key in ("issuer", "jwks_uri", "token_endpoint", "capabilities", "scopes_supported"):
        assert key in body
    assert "permission-v2" in body["capabilities"]
