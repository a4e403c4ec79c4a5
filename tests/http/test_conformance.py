"""Conformance that real clients rely on (issue 10): CORS, conditional read, gzip, lenient search,
every declared interaction, resolvable canonicals, $validate, SMART configuration, home page,
JSON without empty arrays, 405 with Allow, empty bodies without Content-Type."""
from __future__ import annotations

import gzip
import json

import pytest

from fhir_dmp.runtime.config import Config
from tests import builders as b

ORIGIN = "https://app.example.org"


def empties(value, path="$"):
    """Paths of the empty arrays / objects / strings in a JSON value (R4 JSON forbids them)."""
    out = []
    if isinstance(value, dict):
        if not value:
            out.append(path)
        for k, v in value.items():
            out += empties(v, f"{path}.{k}")
    elif isinstance(value, list):
        if not value:
            out.append(path)
        for i, v in enumerate(value):
            out += empties(v, f"{path}[{i}]")
    elif value == "":
        out.append(path)
    return out


# ----------------------------------------------------------------------------- CORS
def test_cors_preflight_without_token(api):
    r = api.http.open("/fhir/Patient", method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, prefer, if-none-exist"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    allowed = r.headers["Access-Control-Allow-Headers"].lower()
    for h in ("authorization", "content-type", "prefer", "if-none-exist"):
        assert h in allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in r.headers      # bearer tokens, no cookies


def test_cors_on_answers_and_errors(api):
    admin = api.as_admin()
    pat = admin.create(b.patient())
    r = admin.get(f"Patient/{pat['id']}", headers={"Origin": ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    exposed = r.headers["Access-Control-Expose-Headers"].lower()
    for h in ("etag", "location", "content-location", "last-modified"):
        assert h in exposed
    r = api.anonymous().get("Patient", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_origins_from_config(app, config, build_app):
    assert Config.from_env({"FHIR_DMP_CORS_ORIGINS": "https://a.test, https://b.test"}).cors_origins == (
        "https://a.test", "https://b.test")
    limited = build_app(config.with_(cors_origins=("https://a.test",)))
    http = limited.test_client()
    ok = http.open("/fhir/metadata", headers={"Origin": "https://a.test"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://a.test"
    other = http.open("/fhir/metadata", headers={"Origin": "https://evil.test"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in http.get("/", headers={"Origin": "https://a.test"}).headers


# ------------------------------------------------------------------- conditional read
def test_conditional_read_after_the_decision(api):
    ps = api.as_ps()
    pat = ps.create(b.patient())
    r = ps.get(f"Patient/{pat['id']}")
    etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
    same = ps.get(f"Patient/{pat['id']}", headers={"If-None-Match": etag})
    assert same.status_code == 304 and same.data == b"" and "Content-Type" not in same.headers
    assert same.headers["ETag"] == etag
    assert ps.get(f"Patient/{pat['id']}", headers={"If-None-Match": 'W/"99"'}).status_code == 200
    assert ps.get(f"Patient/{pat['id']}", headers={"If-Modified-Since": modified}).status_code == 304
    assert ps.get(f"Patient/{pat['id']}",
                  headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
    other = api.as_ps(b.PS_OTHER)       # not authorized: 404 like a missing id, never 304
    denied = other.get(f"Patient/{pat['id']}", headers={"If-None-Match": etag})
    missing = other.get("Patient/nope", headers={"If-None-Match": etag})
    assert denied.status_code == missing.status_code == 404
    assert denied.json["issue"][0]["code"] == missing.json["issue"][0]["code"]


# ----------------------------------------------------------------------------- gzip
def test_gzip_response_and_request(api):
    admin = api.as_admin()
    for _ in range(3):
        admin.create(b.patient())
    r = admin.get("Patient", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in r.headers["Vary"]
    assert json.loads(gzip.decompress(r.data))["resourceType"] == "Bundle"
    small = admin.get("Patient/nope", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers          # under the threshold
    plain = admin.get("Patient")
    assert "Content-Encoding" not in plain.headers
    body = gzip.compress(json.dumps(b.patient()).encode())
    r = admin.post("Patient", raw=body, content_type="application/fhir+json",
                   headers={"Content-Encoding": "gzip"})
    assert r.status_code == 201, r.json
    r = admin.post("Patient", raw=b"not gzip at all", content_type="application/fhir+json",
                   headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and r.json["resourceType"] == "OperationOutcome"
    r = admin.post("Patient", raw=body, content_type="application/fhir+json", headers={"Content-Encoding": "br"})
    assert r.status_code == 415


def test_gzip_bomb_is_413(app, api, config):
    bomb = gzip.compress(b'{"resourceType":"Patient","text":{"div":"' + b"a" * (config.max_body_bytes + 10))
    r = api.as_admin().post("Patient", raw=bomb, content_type="application/fhir+json",
                            headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


# ------------------------------------------------------------------- lenient search
def test_unknown_parameters_ignored_and_reported(api):
    admin = api.as_admin()
    admin.create(b.patient(family="Lenient"))
    r = admin.get("Patient?family=Lenient&_totalMethod=accurate&foo=bar")
    assert r.status_code == 200
    body = r.json
    assert body["total"] == 1
    outcome = [e for e in body["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcome) == 1
    text = " ".join(i["diagnostics"] for i in outcome[0]["resource"]["issue"])
    assert "foo" in text and "_totalMethod" in text
    self_link = next(link["url"] for link in body["link"] if link["relation"] == "self")
    assert "foo" not in self_link and "_totalMethod" not in self_link and "family=Lenient" in self_link
    strict = admin.get("Patient?family=Lenient&foo=bar", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    batch = admin.post("", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Lenient&foo=bar"}}]}).json
    inner = batch["entry"][0]["resource"]
    assert inner["total"] == 1 and inner["entry"][-1]["search"]["mode"] == "outcome"


# -------------------------------------------------------- AuditEvent vread / history, system history
def test_audit_event_vread_and_history(api):
    ps = api.as_ps()
    pat = ps.create(b.patient())
    me = api.as_patient(pat["id"])
    entry = me.search(f"AuditEvent?patient=Patient/{pat['id']}&_count=1")["entry"][0]["resource"]
    r = me.get(f"AuditEvent/{entry['id']}/_history/1")
    assert r.status_code == 200 and r.json["id"] == entry["id"]
    assert me.get(f"AuditEvent/{entry['id']}/_history/2").status_code == 404
    hist = me.search(f"AuditEvent/{entry['id']}/_history")
    assert hist["type"] == "history" and hist["total"] == 1
    assert hist["entry"][0]["resource"]["id"] == entry["id"]
    typed = me.search("AuditEvent/_history?_count=2")
    assert typed["entry"] and all(e["resource"]["resourceType"] == "AuditEvent" for e in typed["entry"])
    other = api.as_ps(b.PS_OTHER)
    assert other.get(f"AuditEvent/{entry['id']}/_history/1").status_code == 404
    assert other.get(f"AuditEvent/{entry['id']}/_history").status_code == 404
    assert ps.put(f"AuditEvent/{entry['id']}", entry).status_code == 405


def test_system_history_through_the_decision(api):
    ps = api.as_ps()
    mine = ps.create(b.patient())
    ps.create(b.docref(mine["id"]))
    other = api.as_ps(b.PS_OTHER).create(b.patient())
    seen = set()
    url = "_history?_count=3"
    for _ in range(50):
        page = ps.search(url)
        assert page["type"] == "history"
        for e in page.get("entry", []):
            res = e.get("resource") or {}
            seen.add((res.get("resourceType"), res.get("id")))
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        url = nxt[0].split("/fhir/", 1)[1]
    assert ("Patient", mine["id"]) in seen
    assert ("Patient", other["id"]) not in seen
    assert any(t == "DocumentReference" for t, _ in seen)
    assert ps.get("_history?_at=2020").status_code == 400
    assert ps.get("Patient/_history?_at=2020").status_code == 400


# ------------------------------------------------------------ ig/ served, $validate
CANONICAL_BASE = "https://fhir-dmp.example.org/fhir/"


def test_every_canonical_of_the_statement_resolves(api):
    cs = api.anonymous().get("metadata").json
    text = json.dumps(cs)
    urls = sorted({u for u in json.loads(json.dumps(
        [v for v in _strings(cs) if v.startswith(CANONICAL_BASE)]))})
    assert any("StructureDefinition/dmp-patient" in u for u in urls) and "SearchParameter/AuditEvent-purpose" in text
    for url in urls:
        path = url[len(CANONICAL_BASE):]
        if path.startswith("CapabilityStatement/"):
            continue
        r = api.anonymous().get(path)
        assert r.status_code == 200, path
        assert r.json["url"] == url
        found = api.anonymous().get(f"{path.split('/')[0]}?url={url}").json
        assert found["total"] == 1 and found["entry"][0]["resource"]["url"] == url
    assert api.anonymous().get("StructureDefinition/nope").status_code == 404
    r = api.as_admin().put("StructureDefinition/dmp-patient", {"resourceType": "StructureDefinition"})
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_ig_search_parameter_is_the_engine_one():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    served = json.loads((root / "ig" / "SearchParameter-AuditEvent-purpose.json").read_text())
    data = json.loads((root / "fhir_dmp" / "data" / "searchparameters.json").read_text())
    engine = next(e["resource"] for e in data["entry"] if e["resource"].get("url") == served["url"])
    assert {**served, "status": None} == {**engine, "status": None}      # ig/ files are all draft


@pytest.mark.parametrize("rtype", ["Patient", "DocumentReference", "Consent", "AuditEvent", "Binary",
                                   "Communication"])
def test_validate_operation(api, rtype):
    admin = api.as_admin()
    r = admin.post(f"{rtype}/$validate", {"resourceType": rtype, "bogus": 1})
    assert r.status_code == 200 and r.json["resourceType"] == "OperationOutcome"
    assert any(i["severity"] == "error" for i in r.json["issue"])


def test_validate_valid_and_parameters(api):
    admin = api.as_admin()
    r = admin.post("Patient/$validate", b.patient())
    assert r.status_code == 200 and r.json["issue"][0]["severity"] == "information"
    r = admin.post("Patient/$validate", {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": b.patient(ins="185037500000199")}]})
    assert r.status_code == 200 and r.json["issue"][0]["severity"] == "error"
    assert admin.get("Patient?_summary=count").json["total"] == 0     # nothing stored


# ---------------------------------------------------------------- SMART configuration
def test_smart_configuration_in_dev_mode(tmp_path, build_app, db):
    from fhir_dmp.security.devkeys import mint_token
    config = Config(data_dir=tmp_path, base_url="https://dev.test/fhir", notifications_worker=False,
                    db_name=db.name)
    http = build_app(config).test_client()
    body = http.get("/fhir/.well-known/smart-configuration").json
    token = mint_token(config, "admin")
    from joserfc import jwt
    iss = jwt.decode(token, _dev_key(config)).claims["iss"]
    assert body["issuer"] == iss
    for absent in ("authorization_endpoint", "token_endpoint", "grant_types_supported"):
        assert absent not in body
    assert "launch-standalone" not in body["capabilities"] and "permission-v2" in body["capabilities"]
    jwks = http.get(body["jwks_uri"].replace("https://dev.test", ""))
    assert jwks.status_code == 200 and jwks.json["keys"][0]["kty"] == "EC"
    assert "d" not in jwks.json["keys"][0]
    cs = http.get("/fhir/metadata", headers={"Accept": "application/fhir+json"}).json
    assert "extension" not in cs["rest"][0]["security"]          # no oauth-uris it does not serve
    assert empties(body) == [] and empties(cs) == []


def _dev_key(config):
    from fhir_dmp.security.devkeys import dev_public_key
    return dev_public_key(config)


def test_smart_configuration_from_the_issuer(tmp_path, build_app, db):
    from tests.security.test_auth import JwksServer
    server = JwksServer()
    try:
        issuer = server.url + "/realms/dmp"
        server.routes["/realms/dmp/.well-known/openid-configuration"] = {
            "issuer": issuer, "jwks_uri": f"{issuer}/certs",
            "authorization_endpoint": f"{issuer}/auth", "token_endpoint": f"{issuer}/token",
            "revocation_endpoint": f"{issuer}/revoke", "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"]}
        config = Config(data_dir=tmp_path, base_url="https://dmp.test/fhir", notifications_worker=False,
                        issuer=issuer, db_name=db.name)
        http = build_app(config).test_client()
        body = http.get("/fhir/.well-known/smart-configuration").json
        assert body["issuer"] == issuer
        assert body["authorization_endpoint"] == f"{issuer}/auth"
        assert body["token_endpoint"] == f"{issuer}/token"
        assert body["revocation_endpoint"] == f"{issuer}/revoke"
        assert body["jwks_uri"] == f"{issuer}/certs"
        assert "client-confidential-asymmetric" in body["capabilities"]
        assert "client-confidential-symmetric" not in body["capabilities"]
        cs = http.get("/fhir/metadata", headers={"Accept": "application/fhir+json"}).json
        oauth = cs["rest"][0]["security"]["extension"][0]["extension"]
        assert {e["url"]: e["valueUri"] for e in oauth} == {"authorize": f"{issuer}/auth",
                                                             "token": f"{issuer}/token"}
        http.get("/fhir/.well-known/smart-configuration")
        assert server.hits["/realms/dmp/.well-known/openid-configuration"] == 1      # cached
        assert http.get("/fhir/.well-known/jwks.json").status_code == 404
    finally:
        server.close()


# ------------------------------------------------------------------- home page, base
def test_home_page_and_fhir_base_in_a_browser(api):
    r = api.http.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert '<html lang="fr">' in html
    assert 'href="/fhir/metadata"' in html and 'href="/portal/"' in html
    assert "<script" not in html and "http://" not in html.replace("http://127", "")
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    r = api.http.get("/fhir", headers={"Accept": browser})
    assert r.status_code == 303 and r.headers["Location"].endswith("/")
    r = api.http.get("/fhir/", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/fhir/metadata")


# ------------------------------------------- JSON without empties, 405 Allow, empty bodies, Accept
def test_no_empty_arrays_in_statement_and_empty_batches(api):
    cs = api.anonymous().get("metadata").json
    assert empties(cs) == []
    admin = api.as_admin()
    for btype in ("batch", "transaction"):
        r = admin.post("", {"resourceType": "Bundle", "type": btype})
        assert r.status_code == 200, r.json
        assert empties(r.json) == [], r.json
    r = admin.post("", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=Nobody"}}]})
    assert empties(r.json) == [], r.json


def test_405_has_allow(api):
    admin = api.as_admin()
    r = admin.post("AuditEvent", {"resourceType": "AuditEvent"})
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, OPTIONS"
    r = admin.patch("Binary/x", [])
    # Binary content never changes in place (CONTRACT.md "REST behaviour"): no PATCH, no PUT
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, DELETE, OPTIONS"
    r = api.http.open("/", method="DELETE")
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def test_empty_bodies_have_no_content_type(api):
    admin = api.as_admin()
    pat = admin.create(b.patient())
    r = admin.delete(f"Patient/{pat['id']}")
    assert r.status_code == 204 and "Content-Type" not in r.headers
    r = admin.post("Patient", b.patient(), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and "Content-Type" not in r.headers and r.headers["Location"]


def test_accept_application_json_is_answered_in_json(api):
    admin = api.as_admin()
    r = admin.get("metadata", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.mimetype == "application/json" and r.json["resourceType"]
    r = admin.get("Patient/nope", headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.mimetype == "application/json"
    r = admin.get("metadata", headers={"Accept": "application/fhir+json"})
    assert r.mimetype == "application/fhir+json"
