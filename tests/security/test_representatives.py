"""Everyone around a DMP (CONTRACT.md "Who the caller is", "Lifecycle of a DMP"): legal
representatives, opposition to feeding, the personal space, rubriques, first access with the
patient's code, establishments. Each rule and each refusal through the HTTP API, real tokens."""
import base64
import re
from datetime import date, datetime, timedelta, timezone

import pytest

from fhir_dmp.guard import access_codes
from fhir_dmp.runtime.services import services
from tests import builders as b
from tests.api import Api
from tests.builders import journal_entries

BASE = "https://dmp.test/fhir"
COLLECT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "collect"}]}
FINESS = "urn:oid:1.2.250.1.71.4.2.2"


def years_ago(years: int, days: int = 0) -> str:
    today = date.today()
    try:
        d = today.replace(year=today.year - years)
    except ValueError:
        d = today.replace(year=today.year - years, day=28)
    return (d - timedelta(days=days)).isoformat()


def open_dmp(api, birth_date="1985-03-12", **kw):
    pat = api.as_ps(b.PS_DR).create({**b.patient(**kw), "birthDate": birth_date})
    return pat["id"]


# -- legal representatives -----------------------------------------------------------------------
def test_guardian_reads_the_record_except_what_is_hidden_from_representatives(api):
    pid = open_dmp(api)
    dr = api.as_ps(b.PS_DR)
    shown = dr.create(b.docref(pid))
    hidden = dr.create(b.docref(pid, labels=("INVISIBLE_REPRESENTANTS_LEGAUX",)))
    rep = api.as_patient(pid).create(b.related_person(pid, "GUARD"))
    assert rep["patient"]["reference"] == f"Patient/{pid}"
    guardian = api.as_legal_rep(rep["id"])
    assert guardian.get(f"Patient/{pid}").status_code == 200
    assert guardian.get(f"DocumentReference/{shown['id']}").status_code == 200
    assert guardian.get(f"DocumentReference/{hidden['id']}").status_code == 404
    found = guardian.search(f"DocumentReference?patient={pid}")
    assert found["total"] == 1
    assert guardian.search(f"RelatedPerson?patient={pid}&relationship=GUARD&active=true")["total"] == 1
    # the journal names the representative by its RelatedPerson
    events = api.as_patient(pid).search(f"AuditEvent?patient=Patient/{pid}&_count=200")["entry"]
    assert any(e["resource"]["agent"][0]["who"].get("reference") == f"RelatedPerson/{rep['id']}"
               for e in events)


def test_ended_representative_gets_401(api):
    pid = open_dmp(api)
    me = api.as_patient(pid)
    rep = me.create(b.related_person(pid, "GUARD"))
    assert api.as_legal_rep(rep["id"]).get(f"Patient/{pid}").status_code == 200
    r = me.patch(f"RelatedPerson/{rep['id']}", [{"op": "replace", "path": "/active", "value": False}])
    assert r.status_code == 200
    r = api.as_legal_rep(rep["id"]).get(f"Patient/{pid}")
    assert r.status_code == 401 and "invalid_token" in r.headers["WWW-Authenticate"]


@pytest.mark.parametrize("period", [{"end": "2020-01-01"}, {"start": "2999-01"}, {"end": "2020"}])
def test_representative_outside_its_period_gets_401(api, period):
    pid = open_dmp(api)
    rep = api.as_patient(pid).create({**b.related_person(pid, "GUARD"), "period": period})
    assert api.as_legal_rep(rep["id"]).get(f"Patient/{pid}").status_code == 401


def test_minor_representatives_are_managed_by_the_administrator(api):
    pid = open_dmp(api, birth_date=years_ago(10))
    me = api.as_patient(pid)
    r = me.post("RelatedPerson", b.related_person(pid, "PRN"))
    assert r.status_code == 403 and "administrator" in r.json["issue"][0]["diagnostics"]
    parent = api.as_admin().create(b.related_person(pid, "PRN"))
    assert api.as_legal_rep(parent["id"]).get(f"Patient/{pid}").status_code == 200
    # a representative does not appoint others, a professional does not see them
    assert api.as_legal_rep(parent["id"]).post("RelatedPerson", b.related_person(pid, "GUARD")).status_code == 403
    assert api.as_ps(b.PS_DR).get(f"RelatedPerson/{parent['id']}").status_code == 404
    assert api.as_ps(b.PS_DR).search(f"RelatedPerson?patient={pid}")["total"] == 0
    assert api.as_ps(b.PS_DR).post("RelatedPerson", b.related_person(pid, "GUARD")).status_code == 403


def test_a_parents_access_ends_on_the_18th_birthday_a_guardians_does_not(api):
    pid = open_dmp(api, birth_date=years_ago(18))           # 18 today
    admin = api.as_admin()
    parent = admin.create(b.related_person(pid, "PRN"))
    guardian = admin.create(b.related_person(pid, "GUARD"))
    assert api.as_legal_rep(parent["id"]).get(f"Patient/{pid}").status_code == 401
    assert api.as_legal_rep(guardian["id"]).get(f"Patient/{pid}").status_code == 200
    young = open_dmp(api, birth_date=years_ago(18, days=-1))  # 18 tomorrow
    parent = admin.create(b.related_person(young, "PRN"))
    assert api.as_legal_rep(parent["id"]).get(f"Patient/{young}").status_code == 200


def test_representative_token_must_name_a_relatedperson_of_this_server(api, idp):
    pid = open_dmp(api)
    rep = api.as_patient(pid).create(b.related_person(pid, "GUARD"))
    ok = idp.legal_rep(rep["id"], fhirUser=f"{BASE}/RelatedPerson/{rep['id']}")
    assert api.as_token(ok).get(f"Patient/{pid}").status_code == 200
    for fhir_user in (f"https://other.example/fhir/RelatedPerson/{rep['id']}", "RelatedPerson/unknown",
                      f"Patient/{pid}"):
        r = api.as_token(idp.legal_rep(rep["id"], fhirUser=fhir_user)).get(f"Patient/{pid}")
        assert r.status_code == 401, fhir_user
    # a representative of one patient never reaches another
    other = open_dmp(api)
    assert api.as_legal_rep(rep["id"]).get(f"Patient/{other}").status_code == 404


def test_relatedperson_must_follow_its_profile(api):
    pid = open_dmp(api)
    me = api.as_patient(pid)
    for broken in ({**b.related_person(pid), "relationship": [{"text": "oncle"}]},
                   {**b.related_person(pid), "patient": {"reference": "Group/1"}}):
        r = me.post("RelatedPerson", broken)
        assert r.status_code == 422, r.json


# -- opposition to feeding -------------------------------------------------------------------------
def opposition(pid, actor=None):
    res = b.consent(pid, "deny", actor=actor)
    res["provision"].pop("purpose")
    res["provision"]["action"] = [COLLECT]
    return res


def test_opposition_to_every_professional_refuses_deposits_and_keeps_the_record(api):
    pid = open_dmp(api)
    dr = api.as_ps(b.PS_DR)
    kept = dr.create(b.docref(pid))
    api.as_patient(pid).create(opposition(pid))
    r = dr.post("DocumentReference", b.docref(pid))
    assert r.status_code == 403
    assert "opposed the feeding" in r.json["issue"][0]["diagnostics"]
    assert dr.get(f"DocumentReference/{kept['id']}").status_code == 200      # reading goes on
    assert dr.search(f"DocumentReference?patient={pid}")["total"] == 1


def test_opposition_to_one_professional(api):
    pid = open_dmp(api)
    dr, other = api.as_ps(b.PS_DR), api.as_ps(b.PS_OTHER)
    other.create(b.consent(pid, "permit", actor=b.PS_OTHER, verified=True))
    api.as_patient(pid).create(opposition(pid, actor=b.PS_OTHER))
    assert other.post("DocumentReference", b.docref(pid)).status_code == 403
    assert other.get(f"Patient/{pid}").status_code == 200          # not a block
    assert dr.post("DocumentReference", b.docref(pid)).status_code == 201


def test_revoked_opposition_lets_feeding_resume(api):
    pid = open_dmp(api)
    me = api.as_patient(pid)
    c = me.create(opposition(pid))
    assert api.as_ps(b.PS_DR).post("DocumentReference", b.docref(pid)).status_code == 403
    assert me.patch(f"Consent/{c['id']}", [{"op": "replace", "path": "/status", "value": "inactive"}]).status_code == 200
    assert api.as_ps(b.PS_DR).post("DocumentReference", b.docref(pid)).status_code == 201


# -- the personal space ------------------------------------------------------------------------------
def personal(pid, content=None, content_type="application/pdf", type_code=b.CONSULTATION):
    return b.docref(pid, type_code, content=content, content_type=content_type)


def test_patient_deposits_pdf_and_text_in_their_personal_space(api):
    pid = open_dmp(api)
    me = api.as_patient(pid)
    pdf = me.create(personal(pid))
    assert pdf["author"] == [{"reference": f"Patient/{pid}"}]
    assert pdf["category"][0]["coding"][0]["code"] == "espace-personnel"
    text = me.create(personal(pid, "Tension le matin: 13/8".encode(), "text/plain"))
    r = me.get(text["content"][0]["attachment"]["url"], headers={"Accept": "text/plain"})
    assert r.data.decode() == "Tension le matin: 13/8"
    # CDA or other content: not in the personal space
    r = me.post("DocumentReference", personal(pid, b"<ClinicalDocument/>", "text/xml"))
    assert r.status_code == 403
    found = me.search(f"DocumentReference?patient={pid}&category=espace-personnel")
    assert found["total"] == 2


def test_representative_deposits_for_the_patient(api):
    pid = open_dmp(api)
    rep = api.as_patient(pid).create(b.related_person(pid, "GUARD"))
    doc = api.as_legal_rep(rep["id"]).create(personal(pid))
    assert doc["author"] == [{"reference": f"Patient/{pid}"}]


def test_professionals_read_personal_documents_under_the_usual_rules(api):
    pid = open_dmp(api)
    doc = api.as_patient(pid).create(personal(pid, type_code=b.CONSULTATION))
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{doc['id']}").status_code == 200
    api.as_patient(pid).create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    # a pharmacist may not read consultation notes (habilitation by type)
    assert api.as_ps(b.PS_PHARMA, profession="21").get(f"DocumentReference/{doc['id']}").status_code == 404
    masked = api.as_patient(pid).create({**personal(pid), "securityLabel": [
        {"coding": [{"system": b.LABELS, "code": "MASQUE_PS"}]}]})
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{masked['id']}").status_code == 404


def test_only_the_patient_withdraws_personal_documents(api):
    pid = open_dmp(api)
    me = api.as_patient(pid)
    doc = me.create(personal(pid))
    dr = api.as_ps(b.PS_DR)
    r = dr.put(f"DocumentReference/{doc['id']}", {**doc, "status": "entered-in-error"})
    assert r.status_code == 403
    assert dr.delete(f"DocumentReference/{doc['id']}").status_code == 403
    r = me.put(f"DocumentReference/{doc['id']}", {**doc, "status": "entered-in-error"})
    assert r.status_code == 200 and r.json["status"] == "entered-in-error"
    assert me.delete(f"DocumentReference/{doc['id']}").status_code == 204
    # a professional's document is not the patient's to withdraw
    theirs = dr.create(b.docref(pid))
    assert me.delete(f"DocumentReference/{theirs['id']}").status_code == 403


# -- rubriques ---------------------------------------------------------------------------------------
def test_rubrique_filled_from_the_type_and_searchable(api):
    pid = open_dmp(api)
    dr = api.as_ps(b.PS_DR)
    lab = dr.create(b.docref(pid, b.LAB))
    imaging = dr.create(b.docref(pid, b.IMAGING))
    given = dr.create({**b.docref(pid, b.LAB), "category": [
        {"coding": [{"system": "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-rubrique", "code": "synthese"}]}]})
    assert lab["category"][0]["coding"][0]["code"] == "biologie"
    assert imaging["category"][0]["coding"][0]["code"] == "imagerie"
    assert given["category"][0]["coding"][0]["code"] == "synthese"            # the client's choice stays
    found = dr.search(f"DocumentReference?patient={pid}&category=biologie")
    assert {e["resource"]["id"] for e in found["entry"]} == {lab["id"]}
    r = dr.post("DocumentReference", {**b.docref(pid), "category": [
        {"coding": [{"system": "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-rubrique", "code": "divers"}]}]})
    assert r.status_code == 422


def test_rubrique_data_file_and_codesystem_agree():
    import json
    from pathlib import Path
    from fhir_dmp.documents import rubriques
    ig = Path(__file__).resolve().parents[2] / "ig"
    cs = json.loads((ig / "CodeSystem-dmp-rubrique.json").read_text())
    assert [c["code"] for c in cs["concept"]] == list(rubriques.RUBRIQUES)
    assert cs["url"] == rubriques.RUBRIQUE_SYSTEM
    assert set(rubriques.by_loinc().values()) <= set(rubriques.RUBRIQUES)
    assert rubriques.by_loinc()[b.LAB] == "biologie"


# -- first access with the patient's code ------------------------------------------------------------
@pytest.fixture
def code_api(config, build_app, idp):
    return Api(build_app(config.with_(first_access="patient-code")), idp)


def sent_code(api, pid):
    db = services(api.app).storage.db
    msg = db["notification_outbox"].find_one({"patient_id": pid, "kind": "access_code"}, sort=[("created_at", -1)])
    return re.search(r"10 minutes : (\d{6})", msg["body"]).group(1), msg


def test_first_access_with_the_patients_code(code_api):
    api = code_api
    pid = open_dmp(api, email="claire.code@example.org")
    other = api.as_ps(b.PS_OTHER)
    request = b.consent(pid, "permit", actor=b.PS_OTHER, verified=True)
    r = other.post(f"Patient/{pid}/$access-code")
    assert r.status_code == 200 and "email" in r.json["issue"][0]["diagnostics"]
    code, msg = sent_code(api, pid)
    assert len(code) == 6 and code.isdigit() and msg["to"] == "claire.code@example.org"
    db = services(api.app).storage.db
    stored = db["access_codes"].find_one({"pid": pid})
    assert code not in str(stored)                                            # only a hash is kept
    comms = api.as_patient(pid).search(f"Communication?subject=Patient/{pid}")
    notices = [e["resource"] for e in comms["entry"] if e["resource"]["topic"]["coding"][0]["code"] == "access_code"]
    assert notices and code not in str(notices)                               # nor in the Communication
    # missing or wrong: 403, nothing created
    assert other.post("Consent", request).status_code == 403
    wrong = "000000" if code != "000000" else "111111"
    r = other.post("Consent", request, headers={"X-Patient-Access-Code": wrong})
    assert r.status_code == 403 and "wrong" in r.json["issue"][0]["diagnostics"]
    assert other.get(f"Patient/{pid}").status_code == 404
    r = other.post("Consent", request, headers={"X-Patient-Access-Code": code})
    assert r.status_code == 201
    assert other.get(f"Patient/{pid}").status_code == 200
    # single use
    again = api.as_patient(pid).patch(f"Consent/{r.json['id']}", [{"op": "replace", "path": "/status",
                                                                     "value": "inactive"}])
    assert again.status_code == 200
    assert other.post("Consent", request, headers={"X-Patient-Access-Code": code}).status_code == 403


def test_access_code_void_after_five_wrong_tries(code_api):
    api = code_api
    pid = open_dmp(api, email="claire.tries@example.org")
    other = api.as_ps(b.PS_OTHER)
    request = b.consent(pid, "permit", actor=b.PS_OTHER, verified=True)
    assert other.post(f"Patient/{pid}/$access-code").status_code == 200
    code, _ = sent_code(api, pid)
    wrong = "000000" if code != "000000" else "111111"
    for _ in range(5):
        assert other.post("Consent", request, headers={"X-Patient-Access-Code": wrong}).status_code == 403
    assert other.post("Consent", request, headers={"X-Patient-Access-Code": code}).status_code == 403


def test_access_code_expires_after_ten_minutes(db_storage):
    db = db_storage       # the code store runs its queries through storage
    at = datetime.now(timezone.utc)
    code = access_codes.issue(db, "p1", "ps1", at=at)
    assert access_codes.consume(db, "p1", "ps1", code, at=at + timedelta(minutes=11)) is not None
    code = access_codes.issue(db, "p1", "ps1", at=at)
    assert access_codes.consume(db, "p1", "ps2", code, at=at) is not None     # another PS's code
    assert access_codes.consume(db, "p1", "ps1", code, at=at + timedelta(minutes=9)) is None


def test_access_code_refusals(code_api, api):
    pid = open_dmp(code_api)
    # only a professional in normal mode, on a DMP it may know of
    assert code_api.as_patient(pid).post(f"Patient/{pid}/$access-code").status_code in (403, 404)
    assert code_api.as_ps(b.PS_OTHER).post("Patient/nope/$access-code").status_code == 404
    code_api.as_patient(pid).create(b.consent(pid, "deny", actor=b.PS_OTHER))
    assert code_api.as_ps(b.PS_OTHER).post(f"Patient/{pid}/$access-code").status_code == 404
    # the default attestation mode needs no code and offers none
    pid2 = open_dmp(api)
    assert api.as_ps(b.PS_OTHER).post(f"Patient/{pid2}/$access-code").status_code == 400
    r = api.as_ps(b.PS_OTHER).post("Consent", b.consent(pid2, "permit", actor=b.PS_OTHER, verified=True))
    assert r.status_code == 201


# -- establishments (AIR mode) -------------------------------------------------------------------------
def establishment_consent(pid, value="10B0012345", system=FINESS):
    res = b.consent(pid, "permit")
    ident = {"value": value, **({"system": system} if system else {})}
    res["provision"]["actor"] = [{"role": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
        "reference": {"identifier": ident}}]
    return res


def test_establishment_authorization_covers_its_professionals_and_the_journal_names_both(api):
    pid = open_dmp(api)
    api.as_patient(pid).create(establishment_consent(pid))
    via = api.as_ps(b.PS_OTHER, organization=f"{FINESS}|10B0012345")
    assert via.get(f"Patient/{pid}").status_code == 200
    assert api.as_ps(b.PS_OTHER).get(f"Patient/{pid}").status_code == 404          # not through it
    assert api.as_ps(b.PS_OTHER, organization=f"{FINESS}|10B0099999").get(f"Patient/{pid}").status_code == 404
    events = api.as_patient(pid).search(f"AuditEvent?patient=Patient/{pid}&_count=200")["entry"]
    reads = [e["resource"] for e in events if e["resource"]["subtype"][0]["code"] == "read"
             and e["resource"]["outcome"] == "0" and e["resource"]["agent"][0]["who"].get("identifier", {})
             .get("value") == b.PS_OTHER]
    assert reads
    whos = [a["who"].get("identifier") for a in reads[0]["agent"]]
    assert {"system": b.IDNATPS, "value": b.PS_OTHER} in whos
    assert {"system": FINESS, "value": "10B0012345"} in whos


def test_establishment_identifier_without_system_never_matches(api):
    pid = open_dmp(api)
    api.as_patient(pid).create(establishment_consent(pid, system=None))
    via = api.as_ps(b.PS_OTHER, organization=f"{FINESS}|10B0012345")
    assert via.get(f"Patient/{pid}").status_code == 404


def test_personal_pdf_content_round_trip(api):
    pid = open_dmp(api)
    content = b.pdf_bytes("mes notes")
    doc = api.as_patient(pid).create(personal(pid, content))
    r = api.as_ps(b.PS_DR).get(doc["content"][0]["attachment"]["url"], headers={"Accept": "application/pdf"})
    assert r.status_code == 200 and r.data == content
    assert base64.b64encode(content)


def test_dev_token_for_a_legal_representative_names_the_relatedperson(tmp_path, monkeypatch, capsys):
    import json as _json
    from fhir_dmp.runtime import cli
    monkeypatch.delenv("FHIR_DMP_ISSUER", raising=False)
    monkeypatch.setenv("FHIR_DMP_DATA_DIR", str(tmp_path))
    assert cli.main(["dev-token", "legal_representative", "--related-person", "rp-42"]) == 0
    payload = capsys.readouterr().out.strip().split(".")[1]
    claims = _json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert (claims["fhirUser"], claims["dmp_role"]) == ("RelatedPerson/rp-42", "legal_representative")
    assert cli.main(["dev-token", "legal_representative", "--patient", "p1"]) != 0


def test_repository_representative_methods_for_the_portal(api):
    from fhir_dmp.guard.repository import GuardedRepository
    from fhir_dmp.security.auth import principal_from_claims
    pid = open_dmp(api)
    backend = services(api.app)
    me = GuardedRepository(backend, principal_from_claims({"fhirUser": f"Patient/{pid}", "scope": "patient/*.cruds"}))
    rp = me.add_representative(pid, "GUARD", "Martin", "Jeanne")
    assert [s.id for s in me.representatives(pid)] == [rp.id]
    assert api.as_legal_rep(rp.id).get(f"Patient/{pid}").status_code == 200
    assert me.end_representative(rp.id).resource["active"] is False
    me.flush_audit()
    assert api.as_legal_rep(rp.id).get(f"Patient/{pid}").status_code == 401


# -- profiles in ig/ ---------------------------------------------------------------------------------
def _invariants(name):
    import json
    from pathlib import Path
    sd = json.loads((Path(__file__).resolve().parents[2] / "ig" / f"StructureDefinition-{name}.json").read_text())
    return {c["key"]: c["expression"] for e in sd["differential"]["element"] for c in e.get("constraint", [])}


def _holds_all(resource, invariants) -> bool:
    from fhirpathpy import evaluate
    from fhirpathpy.models import models
    return all(evaluate(resource, expr, {}, models["r4"]) == [True] for expr in invariants.values())


def test_profile_invariants_describe_each_shape():
    pid = "p1"
    permit = b.consent(pid, "permit", actor=b.PS_DR)
    block = b.consent(pid, "deny", actor=b.PS_DR)
    optout = b.consent(pid, "deny", purpose="BTG")
    oppose, oppose_one = opposition(pid), opposition(pid, actor=b.PS_DR)
    shapes = {"dmp-consent-authorization": [permit], "dmp-consent-block": [block],
              "dmp-consent-optout": [optout], "dmp-consent-feeding-opposition": [oppose, oppose_one]}
    for name, good in shapes.items():
        inv = _invariants(name)
        for res in good:
            assert _holds_all(res, inv), name
        for other, resources in shapes.items():
            if other != name:
                assert not any(_holds_all(r, inv) for r in resources), (name, other)
    inv = _invariants("dmp-relatedperson")
    assert _holds_all(b.related_person(pid, "PRN"), inv) and _holds_all(b.related_person(pid, "GUARD"), inv)
    assert not _holds_all({**b.related_person(pid), "relationship": [{"text": "ami"}]}, inv)


def test_validate_operation_accepts_the_new_shapes(api):
    pid = open_dmp(api)
    admin = api.as_admin()
    for rtype, res in (("RelatedPerson", b.related_person(pid, "PRN")), ("Consent", opposition(pid)),
                       ("DocumentReference", {**b.docref(pid), "category": [{"coding": [{
                           "system": "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-rubrique",
                           "code": "biologie"}]}]})):
        r = admin.post(f"{rtype}/$validate", res)
        assert r.status_code == 200 and r.json["issue"][0]["severity"] == "information", (rtype, r.json)
    r = admin.post("RelatedPerson/$validate", {**b.related_person(pid), "relationship": [{"text": "ami"}]})
    assert r.json["issue"][0]["severity"] == "error"


# ---------- who the caller is (review hole 11, issue 18): fhirUser, tokens fitting no kind, establishments
def test_ps_with_patient_fhiruser_is_never_the_patient(api, idp, dmp):
    pid = dmp["pid"]
    token = idp.ps(b.PS_OTHER, fhirUser=f"Patient/{pid}")
    r = api.as_token(token).get(f"DocumentReference/{dmp['consult']['id']}")
    assert r.status_code == 404


@pytest.mark.parametrize("claims", [
    {"sub": "someone"},                                              # no role, no SubjectNameID, no fhirUser
    {"sub": "someone", "fhirUser": "Practitioner/p1"},               # a fhirUser that names no patient
    {"sub": "someone", "dmp_role": "occupational_medicine"},         # a role this server does not know
])
def test_token_fitting_no_kind_of_caller_is_401(api, idp, claims):
    """CONTRACT.md "Who the caller is": a token that fits none of the kinds gets 401 invalid_token."""
    r = api.as_token(idp.token(**claims)).get("Patient")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


def test_fhir_user_of_another_server_is_refused_and_journaled(api, idp, app, dmp):
    """CONTRACT.md "Who the caller is": a Patient or RelatedPerson ``fhirUser`` on another
    server's base URL names nobody here: 401 (journaled like any refused token), never the
    DMP of the same id, its MASQUE_PS documents included."""
    pid = dmp["pid"]
    masked = api.as_ps(b.PS_DR).create(b.docref(pid, b.LAB, labels=("MASQUE_PS",)))
    rep = api.as_patient(pid).create(b.related_person(pid, "GUARD"))
    db = services(app).storage.db

    def refusals() -> int:
        return len([e for e in journal_entries(db, {"pid": None}) if e["res"]["outcome"] == "4"])

    before = refusals()
    strangers = [idp.token(sub="x", fhirUser=f"https://other.example/fhir/Patient/{pid}", scope="patient/*.rs"),
                 idp.legal_rep(rep["id"], fhirUser=f"https://other.example/fhir/RelatedPerson/{rep['id']}"),
                 idp.patient(pid, fhirUser=f"{BASE}.evil/Patient/{pid}"),
                 idp.legal_rep(rep["id"], fhirUser=f"{BASE}X/RelatedPerson/{rep['id']}")]
    for token in strangers:
        for path in (f"DocumentReference?patient={pid}", f"DocumentReference/{masked['id']}", f"Patient/{pid}"):
            r = api.as_token(token).get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
            assert masked["id"] not in r.get_data(as_text=True)
    assert refusals() == before + 3 * len(strangers)
    # relative, or on this server's base URL (host in any case, explicit default port): the caller
    for fhir_user in (f"Patient/{pid}", f"{BASE}/Patient/{pid}", f"{BASE.replace('dmp.test', 'DMP.TEST:443')}/Patient/{pid}"):
        me = api.as_token(idp.patient(pid, fhirUser=fhir_user))
        assert me.get(f"DocumentReference/{masked['id']}").status_code == 200, fhir_user
    rep_token = idp.legal_rep(rep["id"], fhirUser=f"{BASE}/RelatedPerson/{rep['id']}")
    assert api.as_token(rep_token).get(f"Patient/{pid}").status_code == 200


def test_establishment_identifiers_match_on_system_and_value(api, idp, dmp):
    pid = dmp["pid"]
    consent = b.consent(pid, "permit")
    consent["provision"]["actor"] = [{"role": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
        "reference": {"identifier": {"system": FINESS, "value": "750000001"}}}]
    api.as_patient(pid).create(consent)
    doc = f"DocumentReference/{dmp['consult']['id']}"
    ok = api.as_token(idp.ps(b.PS_OTHER, organization=f"{FINESS}|750000001"))
    assert ok.get(doc).status_code == 200
    wrong_system = api.as_token(idp.ps(b.PS_OTHER, organization="urn:oid:9.9.9|750000001"))
    assert wrong_system.get(doc).status_code == 404
    bare = api.as_token(idp.ps(b.PS_OTHER, organization="750000001"))
    assert bare.get(doc).status_code == 404
    # an actor identifier without a system never matches
    api.as_patient(pid).create(dict(consent, provision=dict(consent["provision"], actor=[{
        "role": consent["provision"]["actor"][0]["role"],
        "reference": {"identifier": {"value": "750000002"}}}])))
    assert api.as_token(idp.ps(b.PS_OTHER, organization=f"{FINESS}|750000002")).get(doc).status_code == 404
