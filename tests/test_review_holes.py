"""The access holes found in review (issue 9), one test (or more) per hole.

Each test reproduces the hole against the real stack (SecantusDB, signed tokens, WSGI app):
it failed before the fix and passes now.
"""
import threading
from datetime import datetime, timezone

import pytest

from tests import builders as b
from tests.builders import journal_entries

PS_GP = "810000000005"
FINESS = "urn:oid:1.2.250.1.71.4.2.2"


@pytest.fixture
def dmp(api):
    """A DMP opened by PS_DR (authorized as creator) with one consultation note and one lab report."""
    dr = api.as_ps(b.PS_DR)
    pat = dr.create(b.patient(email="claire@example.org"))
    pid = pat["id"]
    consult = dr.create(b.docref(pid, b.CONSULTATION))
    lab = dr.create(b.docref(pid, b.LAB))
    return {"pid": pid, "patient": pat, "consult": consult, "lab": lab}


def _outcome(r):
    issue = r.json["issue"][0]
    return r.status_code, issue["code"]


# ----------------------------------------------------------------- hole 1: partial FHIR dates
@pytest.mark.parametrize("start", ["2020", "2020-01", "2020-01-15T10:00:00+01:00", "2020-01-15T10:00:00Z"])
def test_block_with_partial_date_blocks(api, dmp, start):
    pid = dmp["pid"]
    block = b.consent(pid, "deny", actor=b.PS_DR)
    block["provision"]["period"] = {"start": start}
    api.as_patient(pid).create(block)
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{dmp['consult']['id']}").status_code == 404
    assert api.as_ps(b.PS_DR).search(f"DocumentReference?patient={pid}")["total"] == 0


@pytest.mark.parametrize("end", ["2099", "2099-12"])
def test_block_with_partial_end_date_blocks(api, dmp, end):
    pid = dmp["pid"]
    block = b.consent(pid, "deny", actor=b.PS_DR)
    block["provision"]["period"] = {"start": "2020", "end": end}
    api.as_patient(pid).create(block)
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{dmp['consult']['id']}").status_code == 404


def test_block_ending_in_the_past_year_no_longer_blocks(api, dmp):
    pid = dmp["pid"]
    block = b.consent(pid, "deny", actor=b.PS_DR)
    block["provision"]["period"] = {"start": "2019", "end": "2020-06"}
    api.as_patient(pid).create(block)
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{dmp['consult']['id']}").status_code == 200


@pytest.mark.parametrize("purpose,start", [("BTG", "2020-01"), ("BTG", "2021"), ("ETREAT", "2020-01")])
def test_opt_outs_with_partial_dates_hold(api, dmp, purpose, start):
    pid = dmp["pid"]
    optout = b.consent(pid, "deny", purpose=purpose)
    optout["provision"]["period"] = {"start": start}
    api.as_patient(pid).create(optout)
    if purpose == "BTG":
        caller = api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="urgence")
    else:
        caller = api.as_regulation()
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}").status_code == 404


def test_unreadable_deny_consent_denies():
    """A deny Consent whose period the server cannot read is in force; a permit is not."""
    from fhir_dmp.security.decision import consent_in_force
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    deny = {"status": "active", "provision": {"type": "deny", "period": {"start": "janvier 2020"}}}
    permit = {"status": "active", "provision": {"type": "permit", "period": {"start": "janvier 2020"}}}
    assert consent_in_force(deny, at) is True
    assert consent_in_force(permit, at) is False


# ----------------------------------------------------------------- hole 2: médecin traitant / active
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


# ----------------------------------------------------------------- hole 3: totals
def test_blocked_ps_ins_lookup_finds_nothing(api, dmp):
    pid = dmp["pid"]
    ins = dmp["patient"]["identifier"][0]["value"]
    api.as_patient(pid).create(b.consent(pid, "deny", actor=b.PS_OTHER))
    found = api.as_ps(b.PS_OTHER).search(f"Patient?identifier={b.NIR}|{ins}")
    assert found["total"] == 0 and not found.get("entry")
    unknown = api.as_ps(b.PS_OTHER).search(f"Patient?identifier={b.NIR}|{b.nir()}")
    assert unknown["total"] == 0
    found = api.as_ps(b.PS_PHARMA, profession="21").search(f"Patient?identifier={b.NIR}|{ins}")
    assert found["total"] == 1 and len(found["entry"]) == 1


def test_admin_audit_search_totals_and_pages_agree(api, dmp, idp):
    # refused tokens land in the system journal (no patient)
    for _ in range(3):
        api.as_token(idp.ps(b.PS_DR, acr="eidas0")).get(f"Patient/{dmp['pid']}")
    admin = api.as_admin()
    query = "AuditEvent?_count=5&outcome=4"        # the admin's own searches (outcome 0) do not count
    total = admin.search(query)["total"]
    assert total >= 3
    seen, url, pages = [], query, 0
    while url:
        page = admin.search(url)
        assert page["total"] == total
        entries = page.get("entry", [])
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if nxt:
            assert len(entries) == 5, "a page shorter than _count has a next link"
        seen += [e["resource"]["id"] for e in entries]
        url = nxt[0].split("/fhir/", 1)[1] if nxt else None
        pages += 1
        assert pages < 100
    assert len(seen) == len(set(seen)) == total


# ----------------------------------------------------------------- hole 4: one DMP per INS
def test_second_dmp_with_same_ins_is_409(api):
    ins = b.nir()
    dr = api.as_ps(b.PS_DR)
    first = dr.create(b.patient(ins))
    r = api.as_ps(b.PS_OTHER).post("Patient", b.patient(ins))
    assert r.status_code == 409, r.json
    assert r.json["issue"][0]["code"] == "duplicate"
    diag = r.json["issue"][0]["diagnostics"]
    assert "identifier" in diag and "verification" in diag and first["id"] not in diag
    # closed: still taken
    admin = api.as_admin()
    pat = admin.get(f"Patient/{first['id']}").json
    assert admin.put(f"Patient/{first['id']}", dict(pat, active=False)).status_code == 200
    assert admin.post("Patient", b.patient(ins)).status_code == 409
    # the test NIR system and another system with the same value are other identities
    other = b.patient(ins)
    other["identifier"] = [{"system": "urn:oid:1.2.250.1.213.1.4.10", "value": ins}]
    assert dr.post("Patient", other).status_code == 201


def test_ins_uniqueness_is_enforced_by_the_database(api):
    ins = b.nir()
    results = []

    def create(i):
        results.append(api.as_ps(b.PS_DR).post("Patient", b.patient(ins)).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(201) == 1, results
    assert all(s in (201, 409) for s in results), results


def test_ins_index_is_unique(app):
    storage = app.extensions["fhir_dmp"].storage
    info = storage.db["Patient"].index_information()
    assert any(ix.get("unique") and any(k[0] == "a.ins" for k in ix["key"]) for ix in info.values()), info


# ----------------------------------------------------------------- hole 5: type-level history
def test_type_history_does_not_lose_entries(api):
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient())["id"]
    dr.create(b.docref(pid, b.LAB))
    dr.create(b.docref(pid, b.LAB))
    for _ in range(45):
        dr.create(b.docref(pid, b.CONSULTATION))       # newer, not readable by a pharmacist
    api.as_patient(pid).create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    pharma = api.as_ps(b.PS_PHARMA, profession="21")
    seen, url, pages = [], "DocumentReference/_history?_count=1", 0
    while url:
        page = pharma.search(url)
        entries = page.get("entry", [])
        seen += [e["resource"]["id"] for e in entries if "resource" in e]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = nxt[0].split("/fhir/", 1)[1] if nxt else None
        pages += 1
        assert pages < 20
    assert len(seen) == 2, seen


# ----------------------------------------------------------------- hole 6: transaction reads
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


# ----------------------------------------------------------------- hole 8: journal gaps
def test_refused_token_is_journaled_without_traceback(api, idp, app, caplog):
    caplog.set_level("INFO")
    r = api.as_token(idp.ps(b.PS_DR, acr="eidas0")).get("Patient")
    assert r.status_code == 401
    r = api.as_token("not-a-token").get("Patient")
    assert r.status_code == 401
    db = app.extensions["fhir_dmp"].storage.db
    # the system journal: no patient (sealed into the "_system" chain off the request path)
    assert len([e for e in journal_entries(db, {"pid": None}) if e["res"]["outcome"] == "4"]) >= 2
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records]


def test_denied_search_naming_a_dmp_reaches_its_journal(api, dmp):
    pid = dmp["pid"]
    r = api.as_ps(b.PS_OTHER).get(f"DocumentReference?patient={pid}")
    assert r.status_code == 200 and r.json["total"] == 0
    journal = api.as_patient(pid).search(f"AuditEvent?patient={pid}&_count=100")
    searches = [e["resource"] for e in journal["entry"]
                if e["resource"]["subtype"][0]["code"] == "search"
                and any((a.get("who") or {}).get("identifier", {}).get("value") == b.PS_OTHER
                        for a in e["resource"]["agent"])]
    assert searches and searches[0]["outcome"] != "0"


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


# ----------------------------------------------------------------- hole 9: write existence oracle
def test_put_on_deleted_resource_of_another_dmp_looks_like_a_fresh_id(api, dmp):
    pid = dmp["pid"]
    me = api.as_patient(pid)
    consent = me.create(b.consent(pid, "permit", actor=b.PS_OTHER))
    assert me.delete(f"Consent/{consent['id']}").status_code == 204
    other = api.as_ps(b.PS_OTHER).create(b.patient())
    body = b.consent(other["id"], "permit", actor=b.PS_OTHER, verified=True)
    fresh = api.as_ps(b.PS_OTHER).put("Consent/fresh-id-never-used", dict(body, id="fresh-id-never-used"))
    taken = api.as_ps(b.PS_OTHER).put(f"Consent/{consent['id']}", dict(body, id=consent["id"]))
    assert taken.status_code == fresh.status_code, (taken.json, fresh.json)


# ----------------------------------------------------------------- hole 10: JWKS rotation
def _verifier(idp, jwks_server, now):
    """A TokenVerifier of ``idp``'s tokens reading its keys from ``jwks_server`` at ``/jwks``."""
    from types import SimpleNamespace

    from fhir_dmp.security.auth import TokenVerifier
    jwks_server.routes["/jwks"] = idp.jwks()
    url = f"{jwks_server.url}/jwks"
    cfg = SimpleNamespace(expected_issuer=idp.issuer, expected_audience=idp.audience, dev_mode=False,
                          jwks_file=None, jwks_url=url, issuer=idp.issuer)
    return TokenVerifier(cfg, clock=lambda: now[0])


def _rotate_and_withdraw(idp, jwks_server) -> str:
    """The IdP rotates its key and stops publishing the old one; the new kid."""
    old_kid = idp.kid()
    new_kid = idp.rotate()
    jwks_server.routes["/jwks"] = {"keys": [k for k in idp.jwks()["keys"] if k["kid"] != old_kid]}
    return new_kid if new_kid != old_kid else ""


def test_jwks_rotation_trusts_only_published_keys(idp, jwks_server):
    from fhir_dmp.http.errors import Unauthorized
    old_token = idp.token(sub="x")
    now = [1000.0]
    verifier = _verifier(idp, jwks_server, now)
    assert verifier.verify(old_token)["sub"] == "x"
    new_kid = _rotate_and_withdraw(idp, jwks_server)
    new_token = idp.token(sub="y")
    now[0] += 10                       # the new kid triggers a refetch (spaced)
    assert verifier.verify(new_token)["sub"] == "y"
    with pytest.raises(Unauthorized):
        verifier.verify(old_token)
    assert new_kid


def test_jwks_cache_has_a_bounded_lifetime(idp, jwks_server):
    from fhir_dmp.http.errors import Unauthorized
    token = idp.token(sub="x")
    now = [1000.0]
    verifier = _verifier(idp, jwks_server, now)
    assert verifier.verify(token)["sub"] == "x"
    _rotate_and_withdraw(idp, jwks_server)   # the issuer replaced its key (compromise)...
    now[0] += 600                       # ten minutes later, without any unknown kid
    with pytest.raises(Unauthorized):
        verifier.verify(token)


# ----------------------------------------------------------------- hole 11: the contract, everywhere
def test_ps_with_patient_fhiruser_is_never_the_patient(api, idp, dmp):
    pid = dmp["pid"]
    token = idp.ps(b.PS_OTHER, fhirUser=f"Patient/{pid}")
    r = api.as_token(token).get(f"DocumentReference/{dmp['consult']['id']}")
    assert r.status_code == 404


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


def test_ins_lookup_takes_no_other_parameter(api, dmp):
    ins = dmp["patient"]["identifier"][0]["value"]
    stranger = api.as_ps(b.PS_OTHER)
    for extra in ("_sort=birthdate", "_cursor=abc", "birthdate=1985-03-12", "_count=1", "foo=bar",
                  "_lastUpdated=gt2000-01-01"):
        for value in (ins, b.nir()):
            r = stranger.get(f"Patient?identifier={b.NIR}|{value}&{extra}")
            assert r.status_code == 400, (extra, r.status_code)
    for ok in ("_format=json", "_pretty=true", "_elements=identifier", "_summary=true"):
        assert stranger.get(f"Patient?identifier={b.NIR}|{ins}&{ok}").status_code == 200, ok
    # the same for an authorized PS (the answer never depends on the DMP), who searches otherwise as usual
    assert api.as_ps(b.PS_DR).get(f"Patient?identifier={b.NIR}|{ins}&_count=1").status_code == 400
    assert api.as_ps(b.PS_DR).search(f"Patient?family=Martin&_count=1")["total"] >= 1


def _same_refusal(refused, missing):
    print("REFUSAL", refused.status_code, refused.json["issue"][0].get("diagnostics"), "|", missing.json["issue"][0].get("diagnostics"))
    assert refused.status_code == missing.status_code, (refused.json, missing.json)
    assert refused.json["issue"][0]["code"] == missing.json["issue"][0]["code"]


def test_refused_writes_look_like_missing_targets(api, dmp):
    pid, doc = dmp["pid"], dmp["consult"]
    stranger = api.as_ps(b.PS_OTHER)
    ghost = "0000000000000000"
    # PUT / DELETE / PATCH on a document of a DMP the caller may not enter
    _same_refusal(stranger.put(f"DocumentReference/{doc['id']}", doc),
                  stranger.put(f"DocumentReference/{ghost}", dict(doc, id=ghost)))
    missing_delete = stranger.delete(f"DocumentReference/{ghost}")
    refused_delete = stranger.delete(f"DocumentReference/{doc['id']}")
    assert refused_delete.status_code == missing_delete.status_code
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{doc['id']}").status_code == 200   # still there
    ops = [{"op": "replace", "path": "/status", "value": "entered-in-error"}]
    _same_refusal(stranger.patch(f"DocumentReference/{doc['id']}", ops),
                  stranger.patch(f"DocumentReference/{ghost}", ops))
    # create naming the DMP
    _same_refusal(stranger.post("DocumentReference", b.docref(pid)),
                  stranger.post("DocumentReference", b.docref(ghost)))
    # relatesTo pointing at a document the caller may not see
    other_pid = stranger.create(b.patient())["id"]
    replaces = b.docref(other_pid)
    replaces["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{doc['id']}"}}]
    missing = b.docref(other_pid)
    missing["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{ghost}"}}]
    _same_refusal(stranger.post("DocumentReference", replaces), stranger.post("DocumentReference", missing))
    # attachment.url pointing at a Binary the caller may not see
    url = doc["content"][0]["attachment"]["url"]
    by_url = b.docref(other_pid)
    by_url["content"] = [{"attachment": {"contentType": "application/pdf", "url": url}}]
    by_ghost = b.docref(other_pid)
    by_ghost["content"] = [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{ghost}"}}]
    _same_refusal(stranger.post("DocumentReference", by_url), stranger.post("DocumentReference", by_ghost))
    # conditional update matching nothing visible vs nothing at all
    _same_refusal(stranger.put(f"DocumentReference?patient={pid}", b.docref(pid)),
                  stranger.put(f"DocumentReference?patient={ghost}", b.docref(ghost)))


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


def test_document_with_several_types_needs_every_one(api, dmp):
    pid = dmp["pid"]
    dr = api.as_ps(b.PS_DR)
    mixed = b.docref(pid, b.LAB)
    mixed["type"]["coding"].append({"system": b.LOINC, "code": b.CONSULTATION})
    doc = dr.create(mixed)
    api.as_patient(pid).create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    pharma = api.as_ps(b.PS_PHARMA, profession="21")
    assert pharma.get(f"DocumentReference/{doc['id']}").status_code == 404
    ids = {e["resource"]["id"] for e in pharma.search(f"DocumentReference?patient={pid}").get("entry", [])}
    assert doc["id"] not in ids and dmp["lab"]["id"] in ids


def test_type_history_needs_search_scope(api, idp, dmp):
    token = idp.ps(b.PS_DR, scope="openid user/DocumentReference.r")
    caller = api.as_token(token)
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}").status_code == 200
    assert caller.get("DocumentReference/_history").status_code == 403
    assert caller.get(f"DocumentReference/{dmp['consult']['id']}/_history").status_code == 200


def test_journal_lists_denials_from_bundles(api, dmp):
    pid = dmp["pid"]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"DocumentReference/{dmp['consult']['id']}"}}]}
    r = api.as_ps(b.PS_OTHER).post("", bundle)
    assert r.status_code == 200
    assert r.json["entry"][0]["response"]["status"].startswith("404")
    journal = api.as_patient(pid).search(f"AuditEvent?patient={pid}&_count=200")
    denials = [e["resource"] for e in journal["entry"] if e["resource"]["outcome"] != "0"
               and any((a.get("who") or {}).get("identifier", {}).get("value") == b.PS_OTHER
                       for a in e["resource"]["agent"])]
    assert denials


def test_journal_does_not_name_hidden_documents(api, dmp):
    pid = dmp["pid"]
    hidden = api.as_ps(b.PS_DR).create(b.docref(pid, b.CONSULTATION, labels=("INVISIBLE_PATIENT",)))
    api.as_ps(b.PS_DR).get(f"DocumentReference/{hidden['id']}")
    journal = api.as_patient(pid).get(f"AuditEvent?patient={pid}&_count=200")
    assert hidden["id"] not in journal.get_data(as_text=True)
    # the representative neither
    hidden_rep = api.as_ps(b.PS_DR).create(b.docref(pid, b.LAB, labels=("INVISIBLE_REPRESENTANTS_LEGAUX",)))
    journal = api.as_legal_rep(pid).get(f"AuditEvent?patient={pid}&_count=200")
    assert hidden_rep["id"] not in journal.get_data(as_text=True)
    assert hidden["id"] not in journal.get_data(as_text=True)


# ----------------------------------------------------------------- contract: a token that fits no kind
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


# ----------------------------------------------------------------- issue 18: fhirUser on another server
def test_fhir_user_of_another_server_is_refused_and_journaled(api, idp, app, dmp):
    """CONTRACT.md "Who the caller is": a Patient or RelatedPerson ``fhirUser`` on another
    server's base URL names nobody here: 401 (journaled like any refused token), never the
    DMP of the same id, its MASQUE_PS documents included."""
    from tests.conftest import BASE
    pid = dmp["pid"]
    masked = api.as_ps(b.PS_DR).create(b.docref(pid, b.LAB, labels=("MASQUE_PS",)))
    rep = api.as_patient(pid).create(b.related_person(pid, "GUARD"))
    db = app.extensions["fhir_dmp"].storage.db

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


# ----------------------------------------------------------------- issue 9: deposit rules in the decision module
def _journaled_rules(app, pid):
    """The (rule, http_status) of the denials journaled in DMP ``pid``."""
    db = app.extensions["fhir_dmp"].storage.db
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


# ----------------------------------------------------------------- issue 9: storage behind one module
def test_no_collection_is_touched_outside_storage():
    """Issue 9, "done when": grep finds no database collection touched outside storage/ and
    repository.py (the journal, its sealer and the decision cache included)."""
    import re
    from pathlib import Path
    import fhir_dmp
    root = Path(fhir_dmp.__file__).parent
    touch = re.compile(r"db\[|\.db\b|get_collection|\.coll\b")
    found = [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py"))
             if path.relative_to(root).parts[0] != "storage" and str(path.relative_to(root)) != "repository.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if touch.search(line)]
    assert found == [], found
