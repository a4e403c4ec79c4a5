"""The patient's journal, end to end over HTTP (issue "The patient's journal").

DESIGN.md "Audit (IHE BALP shape)" and CONTRACT.md "The journal": every
access to a DMP — authorized reads and searches, denials, break-glass,
centre 15, deposits — is an AuditEvent the patient reads with
``GET AuditEvent?patient=Patient/{id}``; professionals read none of it; no
client writes it; the privacy officer (admin) reads and filters all of it;
no data leaves when the journal cannot be written (fail closed); the hash
chains are checked by ``fhir-dmp audit verify``.

Real app, real tokens, real SecantusDB: nothing is mocked. The fail-closed
case makes the journal unwritable for real, with a MongoDB ``$jsonSchema``
validator that rejects every AuditEvent insert.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import datetime, timezone
from urllib.parse import quote

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as AuditEventModel

from tests import builders as b
from fhir_dmp.runtime.services import services
from fhir_dmp.storage import Storage
from tests.builders import journal_entries, rewrite_journal_entry

BTG_HEADERS = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                           'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
               "X-Break-Glass-Reason": "patient inconscient aux urgences"}
BASE = "https://dmp.test/fhir/"
ACT_REASON = b.ACT_REASON
TRE_G15 = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante"
TRE_R248 = "https://mos.esante.gouv.fr/NOS/TRE_R248"


# --------------------------------------------------------------------------- helpers

def entries(caller, query: str) -> list[dict]:
    """Every resource of a search, following ``next`` links (asserting 200)."""
    out, path = [], query
    while path:
        bundle = caller.search(path)
        out += [e["resource"] for e in bundle.get("entry", [])]
        nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        path = nxt[0][len(BASE):] if nxt else None
    return out


def journal(caller, pid: str) -> list[dict]:
    return entries(caller, f"AuditEvent?patient=Patient/{pid}&_count=200")


def agent_ps(event: dict) -> str | None:
    who = event["agent"][0].get("who") or {}
    ident = who.get("identifier") or {}
    return ident.get("value") if ident.get("system") == b.IDNATPS else None


def purpose(event: dict) -> str | None:
    codes = [c["code"] for pou in event["agent"][0].get("purposeOfUse", []) for c in pou["coding"]]
    return codes[0] if codes else None


def entity(event: dict, role: str) -> dict | None:
    """The entity with object-role ``role`` (1 patient, 4 resource, 24 query)."""
    for ent in event.get("entity", []):
        if (ent.get("role") or {}).get("code") == role:
            return ent
    return None


def details(event: dict) -> dict[str, str]:
    for ent in event.get("entity", []):
        if (ent.get("type") or {}).get("code") == "decision":
            return {d["type"]: d["valueString"] for d in ent["detail"]}
    return {}


def find(events, *, ps=None, interaction=None, outcome=None, resource=None, purpose_=None) -> list[dict]:
    out = []
    for ev in events:
        if ps is not None and agent_ps(ev) != ps:
            continue
        if interaction is not None and ev["subtype"][0]["code"] != interaction:
            continue
        if outcome is not None and ev["outcome"] != outcome:
            continue
        if resource is not None and not ((entity(ev, "4") or {}).get("what", {}).get("reference", "")
                                         .startswith(resource)):
            continue
        if purpose_ is not None and purpose(ev) != purpose_:
            continue
        out.append(ev)
    return out


def one(events, **kw) -> dict:
    found = find(events, **kw)
    assert len(found) == 1, (kw, [(agent_ps(e), e["subtype"][0]["code"], e["outcome"],
                                   (entity(e, "4") or {}).get("what")) for e in events])
    return found[0]


def assert_balp(event: dict, pid: str) -> None:
    """The IHE BALP RESTful shape every access event has (R4 AuditEvent valid)."""
    AuditEventModel.model_validate(event) if hasattr(AuditEventModel, "model_validate") \
        else AuditEventModel.parse_obj(event)
    assert event["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type"
    assert event["type"]["code"] == "rest"
    assert event["subtype"][0]["system"] == "http://hl7.org/fhir/restful-interaction"
    assert event["action"] in "CRUDE" and event["outcome"] in ("0", "4", "8", "12")
    assert event["recorded"].endswith("Z")
    user = event["agent"][0]
    assert user["requestor"] is True
    assert user["type"]["coding"][0]["code"] == "IRCP"
    assert event["source"]["observer"]["display"] == BASE.rstrip("/")
    patient = entity(event, "1")
    assert patient["what"]["reference"] == f"Patient/{pid}"
    assert patient["type"]["code"] == "1"
    assert event["meta"]["versionId"] == "1"


# --------------------------------------------------------------------------- the world

@pytest.fixture
def world(api):
    """A DMP opened by PS_DR with one document; then every kind of access to it."""
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email="claire@example.org", phone="+33612345678"))["id"]
    doc = dr.create(b.docref(pid))["id"]
    other_pid = dr.create(b.patient())["id"]
    assert dr.get(f"DocumentReference/{doc}").status_code == 200
    dr.search(f"DocumentReference?patient=Patient/{pid}&type=http://loinc.org|{b.CONSULTATION}")
    stranger = api.as_ps(b.PS_OTHER)
    assert stranger.get(f"DocumentReference/{doc}").status_code == 404
    mark = datetime.now(timezone.utc)
    assert stranger.get(f"DocumentReference/{doc}", headers=BTG_HEADERS).status_code == 200
    assert api.as_regulation().get(f"DocumentReference/{doc}").status_code == 200
    return {"pid": pid, "doc": doc, "other_pid": other_pid, "mark": mark}


# --------------------------------------------------------------------------- 1. the patient's view

def test_patient_reads_every_access_to_their_record(api, world):
    pid, doc = world["pid"], world["doc"]
    events = journal(api.as_patient(pid), pid)
    for ev in events:
        assert_balp(ev, pid)

    # deposits (create): the DMP itself, the creator's authorization, the document
    opened = one(events, ps=b.PS_DR, interaction="create", resource=f"Patient/{pid}")
    assert opened["action"] == "C" and opened["outcome"] == "0"
    assert details(opened)["rule"] == "ps-creates-dmp"
    deposit = one(events, ps=b.PS_DR, interaction="create", resource=f"DocumentReference/{doc}")
    assert deposit["action"] == "C" and purpose(deposit) == "TREAT"
    assert details(deposit)["http_status"] == "201"
    one(events, ps=b.PS_DR, interaction="create", resource="Consent/")

    # an authorized read: who (idNatPs, profession), why (TREAT, normal mode), what, decision
    read = one(events, ps=b.PS_DR, interaction="read", outcome="0")
    assert read["action"] == "R"
    user = read["agent"][0]
    assert {"system": TRE_G15, "code": "10", "display": "Médecin"} in \
        [c for role in user["role"] for c in role["coding"]]
    assert user["purposeOfUse"][0]["coding"][0] == {"system": ACT_REASON, "code": "TREAT",
                                                    "display": "treatment"}
    assert user["policy"] == [f"{TRE_R248}#normal"]
    assert entity(read, "4")["what"]["reference"] == f"DocumentReference/{doc}/_history/1"
    d = details(read)
    assert d["result"] == "permit" and d["rule"] == "authorized" and d["http_status"] == "200"
    assert d["consent"].startswith("Consent/") and "/_history/" in d["consent"]

    # a search by the same PS: action E, the query in base64 (BALP query entity)
    search = one(events, ps=b.PS_DR, interaction="search")
    assert search["action"] == "E" and search["outcome"] == "0"
    query = base64.b64decode(entity(search, "24")["query"]).decode()
    assert f"patient=Patient/{pid}" in query and b.CONSULTATION in query

    # a denied read by an unauthorized PS: outcome 4, decision deny, answered 404
    denied = one(events, ps=b.PS_OTHER, interaction="read", outcome="4")
    assert purpose(denied) == "TREAT"
    assert details(denied)["result"] == "deny" and details(denied)["rule"] == "not-authorized"
    assert details(denied)["http_status"] == "404"

    # break-glass: purpose BTG, mode bris_de_glace, the reason given
    btg = one(events, ps=b.PS_OTHER, interaction="read", outcome="0")
    assert purpose(btg) == "BTG"
    assert btg["purposeOfEvent"][0]["coding"][0]["code"] == "BTG"
    assert btg["agent"][0]["policy"] == [f"{TRE_R248}#bris_de_glace"]
    assert details(btg)["btg_reason"] == BTG_HEADERS["X-Break-Glass-Reason"]
    assert details(btg)["rule"] == "break-glass"

    # centre 15: the regulation centre, purpose ETREAT
    c15 = one(events, ps=b.PS_SAMU, interaction="read")
    assert c15["outcome"] == "0" and purpose(c15) == "ETREAT"
    assert c15["agent"][0]["policy"] == [f"{TRE_R248}#centre_15"]
    assert "regulation_centre" in [c["code"] for role in c15["agent"][0]["role"] for c in role["coding"]]
    assert details(c15)["rule"] == "centre-15"

    # the notices of break-glass and centre 15 are in the journal too
    notices = find(events, interaction="create", resource="Communication/")
    assert {"notify-break_glass", "notify-centre_15"} <= {details(n)["rule"] for n in notices}

    # nothing of the other DMP
    assert all(entity(ev, "1")["what"]["reference"] == f"Patient/{pid}" for ev in events)

    # the patient's own reading of the journal is journaled as well (next time they look)
    again = journal(api.as_patient(pid), pid)
    mine = [ev for ev in again if ev["agent"][0]["who"].get("reference") == f"Patient/{pid}"]
    assert mine and mine[0]["subtype"][0]["code"] == "search"
    assert "purposeOfUse" not in mine[0]["agent"][0]


def test_patient_reads_single_events(api, world):
    pid = world["pid"]
    me = api.as_patient(pid)
    ev = journal(me, pid)[0]
    r = me.get(f"AuditEvent/{ev['id']}")
    assert r.status_code == 200 and r.json == ev
    assert me.search(f"AuditEvent?patient=Patient/{pid}&_summary=count")["total"] >= 10


def test_professionals_read_none_of_the_journal(api, world):
    pid = world["pid"]
    event_id = journal(api.as_patient(pid), pid)[0]["id"]
    for caller, headers in ((api.as_ps(b.PS_DR), {}),          # authorized, creator
                            (api.as_ps(b.PS_OTHER), BTG_HEADERS),  # break-glass
                            (api.as_regulation(), {})):        # centre 15
        bundle = caller.search(f"AuditEvent?patient=Patient/{pid}", headers=headers)
        assert bundle["total"] == 0 and not bundle.get("entry")
        assert caller.get(f"AuditEvent/{event_id}", headers=headers).status_code == 404
        assert caller.search("AuditEvent", headers=headers)["total"] == 0
        assert caller.search(f"Communication?subject=Patient/{pid}", headers=headers)["total"] == 0


def test_another_patient_sees_nothing_of_this_journal(api, world):
    pid, other = world["pid"], world["other_pid"]
    event_id = journal(api.as_patient(pid), pid)[0]["id"]
    them = api.as_patient(other)
    bundle = them.search(f"AuditEvent?patient=Patient/{pid}")
    assert bundle["total"] == 0 and not bundle.get("entry")
    missing = them.get("AuditEvent/no-such-event")
    r = them.get(f"AuditEvent/{event_id}")
    assert r.status_code == 404 and r.json["issue"][0]["code"] == missing.json["issue"][0]["code"]
    own = journal(them, other)
    assert own and all(entity(ev, "1")["what"]["reference"] == f"Patient/{other}" for ev in own)
    assert not them.search(f"Communication?subject=Patient/{pid}").get("entry")


@pytest.mark.parametrize("who", ["patient", "admin", "ps"])
def test_no_client_writes_the_journal(api, world, who):
    pid = world["pid"]
    event = journal(api.as_patient(pid), pid)[0]
    caller = {"patient": api.as_patient(pid), "admin": api.as_admin(), "ps": api.as_ps(b.PS_DR)}[who]
    forged = {k: v for k, v in event.items() if k not in ("id", "meta")}
    assert caller.post("AuditEvent", forged).status_code == 405
    changed = dict(event, outcome="0")
    assert caller.put(f"AuditEvent/{event['id']}", changed).status_code == 405
    assert caller.patch(f"AuditEvent/{event['id']}",
                        [{"op": "replace", "path": "/outcome", "value": "0"}]).status_code == 405
    assert caller.delete(f"AuditEvent/{event['id']}").status_code == 405
    assert caller.delete(f"AuditEvent?patient=Patient/{pid}").status_code == 405
    entry = [{"resource": forged, "request": {"method": "POST", "url": "AuditEvent"}}]
    r = caller.post("", {"resourceType": "Bundle", "type": "transaction", "entry": entry})
    assert r.status_code == 405
    r = caller.post("", {"resourceType": "Bundle", "type": "batch", "entry": entry})
    assert r.status_code == 200 and r.json["entry"][0]["response"]["status"] == "405"
    assert api.as_patient(pid).get(f"AuditEvent/{event['id']}").json == event


# --------------------------------------------------------------------------- 2. the privacy officer

def test_admin_reads_all_events_and_filters(api, world):
    pid, other = world["pid"], world["other_pid"]
    admin = api.as_admin()
    everything = entries(admin, "AuditEvent?_count=500")
    patients = {(entity(ev, "1") or {}).get("what", {}).get("reference") for ev in everything}
    assert {f"Patient/{pid}", f"Patient/{other}"} <= patients
    assert len(find(everything, ps=b.PS_OTHER)) >= 3

    # by agent: everything the stranger did, and only that
    by_agent = entries(admin, f"AuditEvent?agent:identifier={b.IDNATPS}|{b.PS_OTHER}&_count=500")
    assert by_agent and all(agent_ps(ev) == b.PS_OTHER for ev in by_agent)
    assert {ev["id"] for ev in by_agent} == {ev["id"] for ev in find(everything, ps=b.PS_OTHER)}

    # by date: from the mark on, the break-glass and centre 15 accesses, not the deposits
    mark = world["mark"].isoformat(timespec="milliseconds").replace("+00:00", "Z")
    recent = entries(admin, f"AuditEvent?date=ge{quote(mark)}&_count=500")
    assert find(recent, ps=b.PS_SAMU, interaction="read")
    assert find(recent, ps=b.PS_OTHER, interaction="read", outcome="0")
    assert not find(recent, interaction="create", resource="DocumentReference/")
    assert all(ev["recorded"] >= mark for ev in recent)
    older = entries(admin, f"AuditEvent?date=lt{quote(mark)}&_count=500")
    assert not {ev["id"] for ev in older} & {ev["id"] for ev in recent}

    # by purpose: the break-glass review list
    review = entries(admin, "AuditEvent?purpose=BTG&_count=500")
    assert review and all(purpose(ev) == "BTG" for ev in review)
    read = one(review, interaction="read")
    assert details(read)["btg_reason"] == BTG_HEADERS["X-Break-Glass-Reason"]
    assert entries(admin, f"AuditEvent?purpose={ACT_REASON}|BTG&_count=500") == review
    assert {ev["id"] for ev in entries(admin, "AuditEvent?purpose=ETREAT&_count=500")} == \
        {ev["id"] for ev in find(everything, purpose_="ETREAT")}
    # combined with the patient: this DMP's break-glass accesses
    assert entries(admin, f"AuditEvent?purpose=BTG&patient=Patient/{pid}&_count=500") == review
    assert admin.search(f"AuditEvent?purpose=BTG&patient=Patient/{other}")["total"] == 0

    # the patient may use the same filter on their own journal
    assert [ev["id"] for ev in entries(api.as_patient(pid), f"AuditEvent?patient=Patient/{pid}&purpose=BTG")] \
        == [ev["id"] for ev in review]


def test_who_read_this_document_pages_newest_first_with_its_total(api, world):
    """Privacy operations (issue 22): ``AuditEvent?entity=DocumentReference/{id}``, newest first,
    paged two by two, ``_total=accurate`` on every page: the administrator sees every access to the
    document (its deposit, the reads, the break-glass and the centre 15 included), the patient
    the same ones inside their DMP, another patient nothing (the search stays pinned to the
    caller's DMP)."""
    pid, doc, other = world["pid"], world["doc"], world["other_pid"]
    query = f"AuditEvent?entity=DocumentReference/{doc}&_sort=-date&_count=2&_total=accurate"
    admin, patient = api.as_admin(), api.as_patient(pid)
    first = admin.search(query)
    seen = entries(admin, query)
    assert first["total"] == len(seen) >= 4 and len(first["entry"]) == 2
    assert all((entity(ev, "4") or {}).get("what", {}).get("reference", "").startswith(f"DocumentReference/{doc}")
               for ev in seen)
    assert [ev["recorded"] for ev in seen] == sorted((ev["recorded"] for ev in seen), reverse=True)
    assert find(seen, ps=b.PS_SAMU, interaction="read") and find(seen, ps=b.PS_OTHER, interaction="read")
    mine = entries(patient, query)
    assert [ev["id"] for ev in mine] == [ev["id"] for ev in seen]
    assert patient.search(query)["total"] == len(seen)
    assert api.as_patient(other).search(query)["total"] == 0


def test_purpose_search_parameter_is_declared():
    """``purpose`` is a standard SearchParameter resource of this server."""
    import json
    from importlib import resources

    bundle = json.loads(resources.files("fhir_dmp").joinpath("data/searchparameters.json").read_text())
    sp = [e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "AuditEvent-purpose"]
    assert len(sp) == 1
    sp = sp[0]
    assert sp["resourceType"] == "SearchParameter"
    assert sp["url"] == "https://fhir-dmp.example.org/fhir/SearchParameter/AuditEvent-purpose"
    assert (sp["code"], sp["type"], sp["base"], sp["expression"]) == \
        ("purpose", "token", ["AuditEvent"], "AuditEvent.agent.purposeOfUse")
    assert sp["status"] == "active"
    from fhir.resources.R4B.searchparameter import SearchParameter
    SearchParameter.model_validate(sp) if hasattr(SearchParameter, "model_validate") \
        else SearchParameter.parse_obj(sp)


# --------------------------------------------------------------------------- 3. fail closed

def _journal_unwritable(db, on: bool) -> None:
    """A real MongoDB validator that rejects every journal page insert (or lifts it)."""
    db.command("collMod", "AuditEvent_page", validator={"$jsonSchema": {"required": ["nope"]}} if on else {})


def test_no_data_leaves_when_the_journal_cannot_be_written(api, db):
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient(email="claire@example.org"))["id"]
    doc = dr.create(b.docref(pid))["id"]
    before = len(journal_entries(db))
    _journal_unwritable(db, True)
    try:
        for caller, path in ((dr, f"DocumentReference/{doc}"),
                             (dr, f"DocumentReference?patient=Patient/{pid}"),
                             (api.as_patient(pid), f"Patient/{pid}"),
                             (api.as_patient(pid), f"AuditEvent?patient=Patient/{pid}"),
                             (api.as_ps(b.PS_OTHER), f"DocumentReference/{doc}")):  # a denial too
            r = caller.get(path)
            assert r.status_code == 503, (path, r.status_code)
            body = r.json
            assert body["resourceType"] == "OperationOutcome"
            assert body["issue"][0]["severity"] in ("error", "fatal")
            text = r.get_data(as_text=True)
            assert doc not in text and "claire@example.org" not in text and "DocumentReference\"" not in text
            assert "ETag" not in r.headers and "Location" not in r.headers
        assert len(journal_entries(db)) == before
    finally:
        _journal_unwritable(db, False)
    assert dr.get(f"DocumentReference/{doc}").status_code == 200
    assert len(journal_entries(db)) == before + 1


def test_a_deposit_fails_closed_when_the_journal_cannot_be_written(api, db):
    """The document, its Binary and content go in one round trip with their journal entry
    (Storage.journal_insert): a refused entry leaves none of them."""
    dr = api.as_ps(b.PS_DR)
    pid = dr.create(b.patient())["id"]
    counts = {c: db[c].count_documents({}) for c in ("DocumentReference", "Binary", "content_blobs", "AuditEvent_page")}
    _journal_unwritable(db, True)
    try:
        r = dr.post("DocumentReference", b.docref(pid, content=b.pdf_bytes("refused")))
        assert r.status_code == 503 and r.json["resourceType"] == "OperationOutcome"
        assert "Location" not in r.headers
    finally:
        _journal_unwritable(db, False)
    assert {c: db[c].count_documents({}) for c in counts} == counts
    assert dr.post("DocumentReference", b.docref(pid, content=b.pdf_bytes("accepted"))).status_code == 201


# --------------------------------------------------------------------------- 4. the hash chains

def _audit(config, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_DMP_")}
    env.update(FHIR_DMP_MONGODB_URI=config.mongodb_uri, FHIR_DMP_DB=config.db_name,
               FHIR_DMP_DATA_DIR=str(config.data_dir))
    return subprocess.run([sys.executable, "-m", "fhir_dmp.runtime.cli", "audit", *args],
                          check=False, env=env, capture_output=True, text=True, timeout=60)


def _verify(config, *args) -> subprocess.CompletedProcess:
    return _audit(config, "verify", *args)


def test_audit_verify_after_real_traffic_then_tampering(api, world, config, db):
    pid, other = world["pid"], world["other_pid"]
    sealed = _audit(config, "seal")
    assert sealed.returncode == 0 and "sealed" in sealed.stdout, sealed.stdout + sealed.stderr
    assert db["AuditEvent_page"].count_documents({}) == 0
    ok = _verify(config)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout

    # tamper with one stored event of the patient: the outcome of the denied read
    victim = one(journal(api.as_patient(pid), pid), ps=b.PS_OTHER, interaction="read", outcome="4")
    [seq] = [e["chain"]["seq"] for e in Storage(db.client, db).sealed_events(pid) if e["_id"] == victim["id"]]
    rewrite_journal_entry(db, victim["id"], outcome="0")

    broken = _verify(config)
    assert broken.returncode != 0
    assert f"patient {pid}: event seq {seq} (AuditEvent/{victim['id']}) hash mismatch" in broken.stdout
    first = broken.stdout.splitlines()[0]
    assert victim["id"] in first   # the first broken link is named first

    only_this = _verify(config, "--patient", pid)
    assert only_this.returncode != 0 and victim["id"] in only_this.stdout
    untouched = _verify(config, "--patient", other)
    assert untouched.returncode == 0, untouched.stdout + untouched.stderr


# ---------- journal gaps (review holes 3, 8 and 11)
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


def test_refused_token_is_journaled_without_traceback(api, idp, app, caplog):
    caplog.set_level("INFO")
    r = api.as_token(idp.ps(b.PS_DR, acr="eidas0")).get("Patient")
    assert r.status_code == 401
    r = api.as_token("not-a-token").get("Patient")
    assert r.status_code == 401
    db = services(app).storage.db
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
