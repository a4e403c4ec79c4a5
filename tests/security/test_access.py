"""The access rules (DESIGN.md "The access rules"), table-driven over principals x documents x read paths.

Every row states which documents of one DMP a principal may see; every read path
(read, vread, history, search, totals, _summary=count, paging, _include,
_revinclude, Binary) must agree with it, and every other document must look
exactly like a missing one.
"""
from datetime import datetime, timezone

import pytest

from fhir_dmp.runtime.services import services

from tests import builders as b

PS_GP = "810000000005"
BTG_HEADER = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                          'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
              "X-Break-Glass-Reason": "patient inconscient aux urgences"}

DOCS = {  # name: (type, labels)
    "consult": (b.CONSULTATION, ()),
    "lab": (b.LAB, ()),
    "imaging": (b.IMAGING, ()),
    "masked": (b.CONSULTATION, ("MASQUE_PS",)),
    "invisible": (b.CONSULTATION, ("INVISIBLE_PATIENT",)),
    "invisible_rep": (b.LAB, ("INVISIBLE_REPRESENTANTS_LEGAUX",)),
}
ALL = set(DOCS)


@pytest.fixture
def world(api):
    """One DMP opened by PS_DR (author of every document), a médecin traitant, choices of the patient."""
    dr = api.as_ps(b.PS_DR)
    pat = dr.create(b.patient(email="claire@example.org"))
    pid = pat["id"]
    # the patient names the médecin traitant (CONTRACT.md: a PS never sets it)
    me = api.as_patient(pid)
    assert me.put(f"Patient/{pid}", dict(pat, generalPractitioner=[
        {"identifier": {"system": b.IDNATPS, "value": PS_GP}}])).status_code == 200
    docs = {name: dr.create(b.docref(pid, t, labels=labels)) for name, (t, labels) in DOCS.items()}
    me.create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    me.create(b.consent(pid, "permit", actor=b.PS_KINE))
    me.create(b.consent(pid, "deny", actor=b.PS_KINE))
    other = api.as_ps(b.PS_DR).create(b.patient())
    rep = me.create(b.related_person(pid, "GUARD"))
    return {"pid": pid, "docs": docs, "other_pid": other["id"], "rep": rep["id"]}


def callers(api, world):
    pid = world["pid"]
    return {
        "patient": (api.as_patient(pid), {}, ALL - {"invisible"}),
        "legal_rep": (api.as_legal_rep(world["rep"]), {}, ALL - {"invisible", "invisible_rep"}),
        "other_patient": (api.as_patient(world["other_pid"]), {}, set()),
        "admin": (api.as_admin(), {}, set()),
        "privacy_officer": (api.as_officer(), {}, set()),   # CONTRACT.md "Privacy operations": no content
        "author": (api.as_ps(b.PS_DR), {}, ALL),
        "unauthorized_ps": (api.as_ps(b.PS_OTHER), {}, set()),
        "pharmacien_permit": (api.as_ps(b.PS_PHARMA, profession="21"), {}, {"lab", "invisible_rep"}),
        "blocked_kine": (api.as_ps(b.PS_KINE, profession="70"), {}, set()),
        "blocked_kine_btg": (api.as_ps(b.PS_KINE, profession="70"), BTG_HEADER, set()),
        "medecin_traitant": (api.as_ps(PS_GP), {}, ALL),
        "btg_header": (api.as_ps(b.PS_OTHER), BTG_HEADER, ALL - {"masked"}),
        "btg_claim": (api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="arrêt cardiaque"), {}, ALL - {"masked"}),
        "btg_without_reason": (api.as_ps(b.PS_OTHER, purpose="BTG"), {}, set()),
        "centre_15": (api.as_regulation(), {}, ALL - {"masked"}),
        "excluded_role": (api.as_ps("810000000099", profession="99"), {}, set()),
        "ps_as_etreat_without_role": (api.as_ps(b.PS_OTHER, purpose="ETREAT"), {}, set()),
    }


ROWS = ["patient", "legal_rep", "other_patient", "admin", "privacy_officer", "author", "unauthorized_ps", "pharmacien_permit",
        "blocked_kine", "blocked_kine_btg", "medecin_traitant", "btg_header", "btg_claim", "btg_without_reason",
        "centre_15", "excluded_role", "ps_as_etreat_without_role"]


def _ids(bundle, rtype="DocumentReference", mode="match"):
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if e["resource"]["resourceType"] == rtype and e.get("search", {}).get("mode", "match") == mode}


@pytest.mark.parametrize("row", ROWS)
def test_every_read_path_agrees_with_the_rules(api, world, row):
    caller, headers, visible = callers(api, world)[row]
    pid, docs = world["pid"], world["docs"]
    expected = {docs[name]["id"] for name in visible}
    missing = api.as_admin().get("DocumentReference/does-not-exist")

    # read, vread, history, Binary: visible ones answer, the others look missing
    for name, doc in docs.items():
        for path in (f"DocumentReference/{doc['id']}", f"DocumentReference/{doc['id']}/_history/1",
                     f"DocumentReference/{doc['id']}/_history"):
            r = caller.get(path, headers=headers)
            if name in visible:
                assert r.status_code == 200, (row, name, path, r.json)
            else:
                assert r.status_code == 404, (row, name, path, r.status_code)
                assert r.json["issue"][0]["code"] == "not-found"
                assert set(r.json) == set(missing.json)
        binary = doc["content"][0]["attachment"]["url"]
        r = caller.get(binary, headers={**headers, "Accept": "application/pdf"})
        assert r.status_code == (200 if name in visible else 404), (row, name, "binary")
        if name in visible:
            assert r.data.startswith(b"%PDF-")

    # search, total, _summary=count, paging
    bundle = caller.search(f"DocumentReference?patient=Patient/{pid}", headers=headers)
    assert _ids(bundle) == expected, row
    assert bundle["total"] == len(expected)
    assert caller.search(f"DocumentReference?patient={pid}&_summary=count", headers=headers)["total"] == len(expected)
    assert caller.search("DocumentReference?_summary=count&_total=accurate", headers=headers)["total"] >= 0
    seen, url, pages = set(), f"DocumentReference?patient={pid}&_count=2&_total=accurate", 0
    while url:
        page = caller.search(url, headers=headers)
        assert page["total"] == len(expected)
        assert len(page.get("entry", [])) <= 2
        seen |= _ids(page)
        nxt = [l["url"] for l in page["link"] if l["relation"] == "next"]
        url = nxt[0].split("/fhir/", 1)[1] if nxt else None
        pages += 1
        assert pages < 10
    assert seen == expected

    # _include: the Patient comes with visible documents only
    inc = caller.search(f"DocumentReference?patient={pid}&_include=DocumentReference:subject", headers=headers)
    assert _ids(inc) == expected
    # _revinclude from the Patient: only visible documents ride along
    rev = caller.search(f"Patient?_id={pid}&_revinclude=DocumentReference:subject", headers=headers)
    assert _ids(rev, mode="include") <= expected
    if _ids(rev, "Patient"):
        assert _ids(rev, mode="include") == expected


def test_denied_read_looks_like_missing(api, world):
    doc = world["docs"]["consult"]
    stranger = api.as_ps(b.PS_OTHER)
    denied = stranger.get(f"DocumentReference/{doc['id']}")
    missing = stranger.get("DocumentReference/0000000000000000")
    assert denied.status_code == missing.status_code == 404
    assert denied.json["issue"][0]["code"] == missing.json["issue"][0]["code"]
    assert denied.json["issue"][0]["diagnostics"].replace(doc["id"], "X") == \
        missing.json["issue"][0]["diagnostics"].replace("0000000000000000", "X")


def test_break_glass_refused_after_opt_out(api, world):
    pid = world["pid"]
    api.as_patient(pid).create(b.consent(pid, "deny", purpose="BTG"))
    r = api.as_ps(b.PS_OTHER).get(f"DocumentReference/{world['docs']['consult']['id']}", headers=BTG_HEADER)
    assert r.status_code == 404
    api.as_patient(pid).create(b.consent(pid, "deny", purpose="ETREAT"))
    r = api.as_regulation().get(f"DocumentReference/{world['docs']['consult']['id']}")
    assert r.status_code == 404


def test_break_glass_grant_is_recorded_and_expires(api, world, app):
    ps = api.as_ps(b.PS_OTHER)
    assert ps.get(f"DocumentReference/{world['docs']['lab']['id']}", headers=BTG_HEADER).status_code == 200
    db = services(app).storage.db
    grants = list(db["btg_grants"].find({"pid": world["pid"]}))
    assert len(grants) == 1 and grants[0]["reason"] == BTG_HEADER["X-Break-Glass-Reason"]
    # a second access inside the window reuses the grant
    ps.get(f"DocumentReference/{world['docs']['consult']['id']}", headers=BTG_HEADER)
    assert db["btg_grants"].count_documents({"pid": world["pid"]}) == 1
    # the grant does not open normal mode
    assert ps.get(f"DocumentReference/{world['docs']['lab']['id']}").status_code == 404


def test_closed_dmp_denies_professionals_not_the_patient(api, world):
    pid = world["pid"]
    admin = api.as_admin()
    pat = admin.get(f"Patient/{pid}").json
    assert admin.put(f"Patient/{pid}", dict(pat, active=False)).status_code == 200
    doc = world["docs"]["consult"]["id"]
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{doc}").status_code == 404
    assert api.as_ps(PS_GP).get(f"DocumentReference/{doc}").status_code == 404
    assert api.as_patient(pid).get(f"DocumentReference/{doc}").status_code == 200


def test_ps_without_two_factor_gets_step_up(api, idp, world):
    r = api.as_token(idp.ps(b.PS_DR, acr="eidas0")).get(f"DocumentReference/{world['docs']['consult']['id']}")
    assert r.status_code == 401
    assert 'insufficient_user_authentication' in r.headers["WWW-Authenticate"]
    assert 'acr_values="eidas1"' in r.headers["WWW-Authenticate"]


def test_unauthorized_ps_finds_dmp_only_by_exact_ins(api, world):
    pid = world["pid"]
    pat = api.as_admin().get(f"Patient/{pid}").json
    ins = pat["identifier"][0]["value"]
    stranger = api.as_ps(b.PS_OTHER)
    found = stranger.search(f"Patient?identifier={b.NIR}|{ins}")
    assert found["total"] == 1
    assert set(found["entry"][0]["resource"]) <= {"resourceType", "id", "meta", "identifier", "active"}
    assert stranger.search("Patient?family=Martin")["total"] == 0
    assert stranger.search(f"Patient?identifier={ins}")["total"] == 0
    assert stranger.get(f"Patient/{pid}").status_code == 404


def test_first_access_attestation(api, world):
    pid = world["pid"]
    stranger = api.as_ps(b.PS_OTHER)
    r = stranger.post("Consent", b.consent(pid, "permit", actor=b.PS_OTHER))
    assert r.status_code == 403                                   # not attested
    r = stranger.post("Consent", b.consent(pid, "permit", actor=b.PS_PHARMA, verified=True))
    assert r.status_code == 403                                   # for someone else
    r = stranger.post("Consent", b.consent(pid, "deny", purpose="BTG", verified=True))
    assert r.status_code == 403                                   # never an opt-out
    r = stranger.post("Consent", b.consent(pid, "permit", actor=b.PS_OTHER, verified=True))
    assert r.status_code == 201, r.json
    assert stranger.get(f"DocumentReference/{world['docs']['consult']['id']}").status_code == 200
    # the patient is told: a Communication they can read
    comms = api.as_patient(pid).search(f"Communication?subject=Patient/{pid}")
    assert comms["total"] >= 1


def test_blocked_ps_cannot_attest_and_gp_cannot_be_blocked(api, world):
    pid = world["pid"]
    me = api.as_patient(pid)
    me.create(b.consent(pid, "deny", actor=b.PS_OTHER))
    r = api.as_ps(b.PS_OTHER).post("Consent", b.consent(pid, "permit", actor=b.PS_OTHER, verified=True))
    assert r.status_code in (403, 422)
    me.create(b.consent(pid, "deny", actor=PS_GP))
    assert api.as_ps(PS_GP).get(f"DocumentReference/{world['docs']['consult']['id']}").status_code == 200


def test_patient_revokes_authorization(api, world):
    pid = world["pid"]
    me = api.as_patient(pid)
    consents = me.search(f"Consent?patient={pid}&actor:identifier={b.IDNATPS}|{b.PS_PHARMA}")
    permit = [e["resource"] for e in consents["entry"] if e["resource"]["provision"]["type"] == "permit"][0]
    assert me.put(f"Consent/{permit['id']}", dict(permit, status="inactive")).status_code == 200
    assert api.as_ps(b.PS_PHARMA, profession="21").get(
        f"DocumentReference/{world['docs']['lab']['id']}").status_code == 404


def test_document_write_rules(api, world):
    pid, docs = world["pid"], world["docs"]
    doc = docs["consult"]
    me = api.as_patient(pid)
    # the patient masks and unmasks, nothing else
    masked = dict(doc, securityLabel=[{"coding": [{"system": b.LABELS, "code": "MASQUE_PS"}]}])
    r = me.put(f"DocumentReference/{doc['id']}", masked)
    assert r.status_code == 200, r.json
    assert me.put(f"DocumentReference/{doc['id']}", dict(r.json, status="entered-in-error")).status_code == 403
    inv = dict(r.json, securityLabel=r.json["securityLabel"] + [{"coding": [{"system": b.LABELS,
                                                                            "code": "INVISIBLE_PATIENT"}]}])
    assert me.put(f"DocumentReference/{doc['id']}", inv).status_code == 403
    # the médecin traitant is not the author: no rewrite, no withdrawal
    gp = api.as_ps(PS_GP)
    current = gp.get(f"DocumentReference/{doc['id']}").json
    assert gp.put(f"DocumentReference/{doc['id']}", dict(current, status="entered-in-error")).status_code == 403
    assert gp.delete(f"DocumentReference/{doc['id']}").status_code == 403
    # the author withdraws
    dr = api.as_ps(b.PS_DR)
    r = dr.put(f"DocumentReference/{doc['id']}", dict(current, status="entered-in-error"))
    assert r.status_code == 200, r.json
    # the server records the depositing PS as author whatever the client sent
    forged = dr.create(b.docref(pid, author=b.PS_OTHER))
    assert forged["author"][0]["identifier"]["value"] == b.PS_DR


def test_replacement_supersedes(api, world):
    pid, old = world["pid"], world["docs"]["lab"]
    dr = api.as_ps(b.PS_DR)
    new = b.docref(pid, b.LAB)
    new["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{old['id']}"}}]
    dr.create(new)
    assert dr.get(f"DocumentReference/{old['id']}").json["status"] == "superseded"
    gp_new = dict(new)
    assert api.as_ps(PS_GP).post("DocumentReference", gp_new).status_code == 422   # not the author


def test_deposit_needs_qualified_ins_and_authorization(api):
    dr = api.as_ps(b.PS_DR)
    prov = dr.create(b.patient(status="PROV"))
    r = dr.post("DocumentReference", b.docref(prov["id"]))
    assert r.status_code == 422
    ok = dr.create(b.patient())
    r = api.as_ps(b.PS_OTHER).post("DocumentReference", b.docref(ok["id"]))
    assert r.status_code == 422 and "not known" in r.json["issue"][0]["diagnostics"]


def test_journal_and_communications_not_for_professionals(api, world):
    pid = world["pid"]
    assert api.as_ps(b.PS_DR).search(f"AuditEvent?patient={pid}")["total"] == 0
    assert api.as_patient(pid).search(f"AuditEvent?patient={pid}")["total"] > 0
    assert api.as_patient(world["other_pid"]).search(f"AuditEvent?patient={pid}")["total"] == 0
    for method in ("post", "put", "delete"):
        r = getattr(api.as_admin(), method)("AuditEvent" if method == "post" else "AuditEvent/x",
                                            **({"body": {"resourceType": "AuditEvent"}} if method != "delete" else {}))
        assert r.status_code == 405


def test_conditional_create_does_not_reveal(api, world):
    """If-None-Exist only sees what the caller may see: a hidden match is not returned."""
    pid = world["pid"]
    stranger = api.as_ps(b.PS_OTHER)
    r = stranger.post("Consent", b.consent(pid, "permit", actor=b.PS_OTHER, verified=True),
                      headers={"If-None-Exist": f"patient={pid}&actor:identifier={b.IDNATPS}|{b.PS_KINE}"})
    assert r.status_code == 201
    assert r.json["provision"]["actor"][0]["reference"]["identifier"]["value"] == b.PS_OTHER


def test_destroyed_dmp_is_as_if_it_never_existed(api, world, app):
    pid, doc = world["pid"], world["docs"]["consult"]
    assert api.as_legal_rep(world["rep"]).post(f"Patient/{pid}/$destroy").status_code == 403
    assert api.as_ps(b.PS_DR).post(f"Patient/{pid}/$destroy").status_code == 403
    assert api.as_ps(b.PS_OTHER).post(f"Patient/{pid}/$destroy").status_code == 404
    assert api.as_patient(world["other_pid"]).post(f"Patient/{pid}/$destroy").status_code == 404
    admin = api.as_admin()
    db = services(app).storage.db
    assert b.journal_entries(db, {"pid": pid})
    assert admin.post(f"Patient/{pid}/$destroy").status_code == 204
    assert b.journal_entries(db, {"pid": pid}) == []        # the DMP's journal goes with it
    # only a tombstone head stays (an id, no personal data) so that signed checkpoints verify
    assert db["AuditEvent_chain"].count_documents({"_id": pid, "destroyed": {"$ne": True}}) == 0
    for caller in (api.as_patient(pid), api.as_ps(b.PS_DR), api.as_ps(PS_GP), admin):
        assert caller.get(f"Patient/{pid}").status_code == 404
        assert caller.get(f"DocumentReference/{doc['id']}").status_code == 404
        assert caller.get(doc["content"][0]["attachment"]["url"], headers={"Accept": "application/pdf"}).status_code == 404
        assert caller.search(f"DocumentReference?patient={pid}")["total"] == 0
    assert db["datakeys"].count_documents({"_id": pid}) == 0          # crypto-shredded
    assert db["DocumentReference"].count_documents({"pid": pid}) == 0
    assert admin.post(f"Patient/{pid}/$destroy").status_code == 404


# ---------- review holes 1, 3 and 5 (issue 9): partial Consent dates, the INS lookup, type-level history
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
