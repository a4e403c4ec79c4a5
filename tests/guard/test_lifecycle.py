"""The DMP's whole life (CONTRACT.md "Lifecycle of a DMP"): close, reopen, retention, destroy.

Everything through the HTTP API with real tokens against the session's SecantusDB; the
retention clock is injected (``run_retention(backend, at=...)``), never patched.
"""
import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from fhir_dmp.guard import lifecycle
from fhir_dmp.guard.repository import GuardedRepository
from fhir_dmp.audit.verify import verify_chains
from tests import builders as b
from tests.builders import journal_entries
from fhir_dmp.runtime.services import services
from fhir_dmp.storage import unpack
from tests.api import Api

EMAIL = "claire.lifecycle@example.org"


def backend_of(api):
    return services(api.app)


@pytest.fixture
def dmp(api):
    """An open DMP with a document, a guardian and a notice (first access by a second PS)."""
    dr = api.as_ps(b.PS_DR)
    pat = dr.create(b.patient(email=EMAIL, phone="+33612345678"))
    pid = pat["id"]
    doc = dr.create(b.docref(pid, b.LAB))
    me = api.as_patient(pid)
    rep = me.create(b.related_person(pid, "GUARD"))
    api.as_ps(b.PS_OTHER).create(b.consent(pid, "permit", actor=b.PS_OTHER, verified=True))
    return {"pid": pid, "ins": pat["identifier"][0]["value"], "doc": doc, "rep": rep["id"]}


def close(caller, pid, how="patch"):
    if how == "patch":
        return caller.patch(f"Patient/{pid}", [{"op": "replace", "path": "/active", "value": False}])
    current = caller.get(f"Patient/{pid}").json
    return caller.put(f"Patient/{pid}", {**current, "active": False})


def reopen(caller, pid):
    return caller.patch(f"Patient/{pid}", [{"op": "replace", "path": "/active", "value": True}])


def stored_patient(api, pid):
    return backend_of(api).storage.db["Patient"].find_one({"_id": pid})


# -- close / reopen ---------------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["patient", "legal_rep", "admin"])
@pytest.mark.parametrize("how", ["patch", "put"])
def test_close_and_reopen_by_patient_representative_or_admin(api, dmp, who, how):
    pid, doc = dmp["pid"], dmp["doc"]
    caller = {"patient": api.as_patient(pid), "legal_rep": api.as_legal_rep(dmp["rep"]),
              "admin": api.as_admin()}[who]
    r = close(caller, pid, how)
    assert r.status_code == 200, r.json
    assert stored_patient(api, pid)["closed_at"] is not None
    # professionals then see nothing (as missing); the patient and the representative keep reading
    dr = api.as_ps(b.PS_DR)
    assert dr.get(f"Patient/{pid}").status_code == 404
    assert dr.get(f"DocumentReference/{doc['id']}").status_code == 404
    assert dr.post("DocumentReference", b.docref(pid)).status_code in (404, 422)
    assert api.as_patient(pid).get(f"DocumentReference/{doc['id']}").status_code == 200
    assert api.as_legal_rep(dmp["rep"]).get(f"Patient/{pid}").status_code == 200
    r = reopen(caller, pid)
    assert r.status_code == 200 and r.json["active"] is True
    assert "closed_at" not in stored_patient(api, pid)
    assert dr.get(f"DocumentReference/{doc['id']}").status_code == 200


def test_repository_close_and_reopen_methods(api, dmp):
    """The operations the portal calls (close_dmp / reopen_dmp / destroy_dmp), same decision."""
    from fhir_dmp.security.auth import principal_from_claims
    pid = dmp["pid"]
    me = principal_from_claims({"fhirUser": f"Patient/{pid}", "scope": "patient/*.cruds"})
    repo = GuardedRepository(backend_of(api), me)
    assert repo.close_dmp(pid).resource["active"] is False
    assert repo.reopen_dmp(pid).resource["active"] is True
    repo.flush_audit()


# -- retention -------------------------------------------------------------------------------------
@pytest.fixture
def short_api(config, build_app, idp):
    """A server keeping closed DMPs 1 year."""
    return Api(build_app(config.with_(retention_years=1)), idp)


def test_retention_destroys_closed_dmps_only_once_their_time_has_passed(short_api):
    api = short_api
    dr = api.as_ps(b.PS_DR)
    closed, reopened, still_open = (dr.create(b.patient())["id"] for _ in range(3))
    for pid in (closed, reopened):
        assert close(api.as_patient(pid), pid).status_code == 200
    assert reopen(api.as_admin(), reopened).status_code == 200
    backend = backend_of(api)
    now = datetime.now(timezone.utc)
    assert lifecycle.run_retention(backend, GuardedRepository, at=now + timedelta(days=300)) == 0   # within the year
    assert api.as_patient(closed).get(f"Patient/{closed}").status_code == 200
    assert lifecycle.run_retention(backend, GuardedRepository, at=now + timedelta(days=367)) == 1
    assert api.as_patient(closed).get(f"Patient/{closed}").status_code == 404
    assert api.as_admin().get(f"Patient/{closed}").status_code == 404
    for pid in (reopened, still_open):
        assert api.as_patient(pid).get(f"Patient/{pid}").status_code == 200
    assert verify_chains(backend.storage) == []


def test_retention_run_cli(api, dmp, config, monkeypatch, capsys):
    """`fhir-dmp retention run` destroys what is past retention (closed 11 years ago here)."""
    from fhir_dmp.runtime import cli
    pid = dmp["pid"]
    assert close(api.as_patient(pid), pid).status_code == 200
    db = backend_of(api).storage.db
    db["Patient"].update_one({"_id": pid}, {"$set": {"closed_at": datetime(2010, 1, 1, tzinfo=timezone.utc)}})
    for key, value in {"FHIR_DMP_MONGODB_URI": config.mongodb_uri, "FHIR_DMP_DB": config.db_name,
                       "FHIR_DMP_DATA_DIR": str(config.data_dir)}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["retention", "run"]) == 0
    assert "1 closed DMP(s) past retention destroyed" in capsys.readouterr().out
    assert db["Patient"].count_documents({"_id": pid}) == 0


def test_daily_retention_runs_once_a_day_across_processes(db_storage):
    storage = db_storage
    at = datetime(2030, 5, 1, 3, 0, tzinfo=timezone.utc)
    assert lifecycle.claim_daily_run(storage, "worker-1", at)
    assert not lifecycle.claim_daily_run(storage, "worker-2", at + timedelta(minutes=5))
    assert lifecycle.claim_daily_run(storage, "worker-2", at + timedelta(days=1, minutes=1))
    runs = []
    sched = lifecycle.RetentionScheduler(storage, lambda: runs.append(1) or 0, owner="w3")
    sched.tick()   # today's run was already claimed
    assert runs == []


def test_retention_years_configuration():
    from fhir_dmp.runtime.config import Config, ConfigError
    assert Config.from_env({}).retention_years == 10
    assert Config.from_env({"FHIR_DMP_RETENTION_YEARS": "3"}).retention_years == 3
    with pytest.raises(ConfigError):
        Config.from_env({"FHIR_DMP_RETENTION_YEARS": "0"})
    with pytest.raises(ConfigError):
        Config.from_env({"FHIR_DMP_FIRST_ACCESS": "sms"})


# -- destroy ---------------------------------------------------------------------------------------
def personal_data_left(db, *needles) -> list[str]:
    """Every collection, every document: where does any needle (or its base64) still appear?"""
    found = []
    for name in db.list_collection_names():
        for doc in db[name].find():
            doc = {**doc, "res": unpack(doc.get("res"))}   # journal entries are stored packed
            text = json.dumps(doc, default=str, ensure_ascii=False)
            # journal queries are stored base64 (BALP): read them too
            for ent in ((doc.get("res") or {}).get("entity") or []) if isinstance(doc.get("res"), dict) else []:
                if ent.get("query"):
                    text += base64.b64decode(ent["query"]).decode("utf-8", "replace")
            if any(n in text for n in needles):
                found.append(f"{name}/{doc.get('_id')}")
    return found


def test_patient_destroys_their_dmp_and_nothing_personal_remains(api, dmp):
    pid, ins = dmp["pid"], dmp["ins"]
    backend = backend_of(api)
    db = backend.storage.db
    blocked = "810000000066"
    api.as_patient(pid).create(b.consent(pid, "deny", actor=blocked))
    assert api.as_ps(blocked).get(f"Patient?identifier={b.NIR}|{ins}").status_code == 200
    assert db["notification_outbox"].count_documents({"patient_id": pid}) > 0   # pending notices
    assert personal_data_left(db, ins, EMAIL)
    r = api.as_patient(pid).post(f"Patient/{pid}/$destroy")
    assert r.status_code == 204
    assert personal_data_left(db, ins, EMAIL) == []
    for name in db.list_collection_names():
        assert db[name].count_documents({"$or": [{"pid": pid}, {"patient_id": pid}, {"p": pid},
                                                 {"items.p": pid}, {"_id": pid}],
                                         "destroyed": {"$ne": True}}) == 0, name
    # the chain's head stays as a bare tombstone (the random id the signed checkpoints name)
    assert db["AuditEvent_chain"].find_one({"_id": pid}, {"_id": 0}) == {"seq": 0, "hash": "0" * 64,
                                                                         "destroyed": True}
    # one entry in the system journal, naming no one
    entries = [e for e in journal_entries(db) if (e["res"].get("outcomeDesc") or "").startswith("a DMP was destroyed")]
    assert len(entries) == 1 and entries[0]["pid"] is None
    assert pid not in json.dumps(entries[0]["res"])
    assert verify_chains(backend.storage) == []
    # every later request answers as if it never existed
    missing = api.as_admin().get("Patient/never-was")
    for caller in (api.as_patient(pid), api.as_legal_rep(dmp["rep"]), api.as_ps(b.PS_DR), api.as_admin()):
        r = caller.get(f"Patient/{pid}")
        if r.status_code == 401:      # the representative's RelatedPerson is gone with the DMP
            continue
        assert r.status_code == 404
        assert r.json["issue"][0]["code"] == missing.json["issue"][0]["code"]
    lookup = api.as_ps(b.PS_DR).search(f"Patient?identifier={b.NIR}|{ins}")
    assert lookup["total"] == 0
    assert personal_data_left(db, ins, EMAIL) == []
    assert api.as_admin().post(f"Patient/{pid}/$destroy").status_code == 404
    # the INS is free again: a new DMP with it is a new, empty record
    again = api.as_ps(b.PS_DR).post("Patient", b.patient(ins))
    assert again.status_code == 201 and again.json["id"] != pid
    assert api.as_ps(b.PS_DR).search(f"DocumentReference?patient={again.json['id']}")["total"] == 0


def test_destroy_refusals(api, dmp):
    pid = dmp["pid"]
    other = api.as_ps(b.PS_DR).create(b.patient())["id"]
    # a representative or an authorized PS may not (403 inside a DMP they may enter)
    assert api.as_legal_rep(dmp["rep"]).post(f"Patient/{pid}/$destroy").status_code == 403
    assert api.as_ps(b.PS_DR).post(f"Patient/{pid}/$destroy").status_code == 403
    # another patient or an unauthorized PS: as if it did not exist
    for caller in (api.as_patient(other), api.as_ps("810000000077")):
        r = caller.post(f"Patient/{pid}/$destroy")
        assert r.status_code == 404
        missing = caller.post("Patient/no-such-dmp/$destroy")
        assert json.dumps(r.json).replace(pid, "X") == json.dumps(missing.json).replace("no-such-dmp", "X")
    assert api.as_patient(pid).get(f"Patient/{pid}").status_code == 200
    # the refused attempts reach the patient's journal (DESIGN.md "No leaks" / the journal)
    journal = api.as_patient(pid).search(f"AuditEvent?patient={pid}&_count=200")
    refused = [e["resource"] for e in journal["entry"]
               if e["resource"]["subtype"][0]["code"] == "delete" and e["resource"]["outcome"] != "0"]
    who = {((a.get("who") or {}).get("identifier") or {}).get("value") for ev in refused for a in ev["agent"]}
    assert "810000000077" in who


class FailingJournal:
    """The real journal that cannot take a destroy entry: the destroy must leave everything."""

    def __init__(self, real):
        self.real = real

    def append(self, events, *, session=None):
        if any("destroyed" in (e.get("outcomeDesc") or "") for e in events):
            from fhir_dmp.audit.log import AuditUnavailable
            raise AuditUnavailable()
        return self.real.append(events, session=session)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_destroy_is_all_or_nothing(api, dmp):
    pid, doc = dmp["pid"], dmp["doc"]
    backend = backend_of(api)
    db = backend.storage.db
    before = {name: db[name].count_documents({}) for name in db.list_collection_names()}
    backend.audit_log = FailingJournal(backend.audit_log)
    try:
        r = api.as_admin().post(f"Patient/{pid}/$destroy")
    finally:
        backend.audit_log = backend.audit_log.real
    assert r.status_code == 503
    after = {name: db[name].count_documents({}) for name in db.list_collection_names()}
    for name, count in before.items():
        if name not in ("AuditEvent", "AuditEvent_page", "AuditEvent_chain"):   # the failed attempt itself is journaled
            assert after[name] == count, name
    me = api.as_patient(pid)
    assert me.get(f"Patient/{pid}").status_code == 200
    url = doc["content"][0]["attachment"]["url"]
    r = me.get(url, headers={"Accept": "application/pdf"})
    assert r.status_code == 200 and r.data.startswith(b"%PDF")
    assert verify_chains(backend.storage) == []


def test_old_keks_retired_so_a_destroyed_data_key_cannot_come_back(api, dmp, config):
    """An old backup of the wrapped data keys plus the old KEK would undo crypto-shredding:
    `keys rotate` rewraps, then retires every KEK nothing uses any more."""
    from fhir_dmp.security.crypto import (KeyUnavailable, LocalKeyFileProvider, retire_unused_keks,
                                          rotate_kek)
    pid = dmp["pid"]
    db = backend_of(api).storage.db
    backup = db["datakeys"].find_one({"_id": pid})
    provider = LocalKeyFileProvider(config.kek_path)
    assert provider.unwrap(bytes(backup["wrapped"]), backup["kek_id"])      # the backup works today
    rotate_kek(config, backend_of(api).storage)
    assert retire_unused_keks(config, backend_of(api).storage) == [backup["kek_id"]]
    assert api.as_patient(pid).post(f"Patient/{pid}/$destroy").status_code == 204
    with pytest.raises(KeyUnavailable):
        LocalKeyFileProvider(config.kek_path).unwrap(bytes(backup["wrapped"]), backup["kek_id"])


# -- the whole life ---------------------------------------------------------------------------------
def test_a_record_through_its_whole_life(short_api, idp):
    api = short_api
    backend = backend_of(api)
    db = backend.storage.db
    email = "lea.enfant@example.org"
    ins = b.nir("2150875000123")
    twelve = (datetime.now(timezone.utc) - timedelta(days=12 * 366)).date().isoformat()
    # open: a médecin looks the INS up (nothing yet), opens the DMP of a 12-year-old, feeds it
    dr = api.as_ps(b.PS_DR)
    assert dr.search(f"Patient?identifier={b.NIR}|{ins}")["total"] == 0
    child = {**b.patient(ins, email=email, given="Léa"), "birthDate": twelve}
    pid = dr.create(child)["id"]
    doc = dr.create(b.docref(pid, b.LAB))
    assert doc["category"][0]["coding"][0]["code"] == "biologie"
    # the minor's parent, registered by the administrator, reads the record
    assert api.as_patient(pid).post("RelatedPerson", b.related_person(pid, "PRN")).status_code == 403
    parent = api.as_admin().create(b.related_person(pid, "PRN", given="Marc"))["id"]
    mum = api.as_legal_rep(parent)
    assert mum.get(f"DocumentReference/{doc['id']}").status_code == 200
    # opposition to feeding: the next deposit is refused, what is there stays
    mum.create({**b.consent(pid, "deny"), "provision": {
        "type": "deny", "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                                "code": "collect"}]}]}})
    r = dr.post("DocumentReference", b.docref(pid))
    assert r.status_code == 403 and "opposed" in r.json["issue"][0]["diagnostics"]
    assert dr.get(f"DocumentReference/{doc['id']}").status_code == 200
    # close, reopen, close
    assert close(mum, pid).status_code == 200
    assert dr.get(f"Patient/{pid}").status_code == 404
    assert reopen(api.as_admin(), pid).status_code == 200
    assert dr.get(f"Patient/{pid}").status_code == 200
    assert close(api.as_admin(), pid).status_code == 200
    # retention passes: destroyed
    later = datetime.now(timezone.utc) + timedelta(days=400)
    assert lifecycle.run_retention(backend, GuardedRepository, at=later) == 1
    assert mum.get(f"Patient/{pid}").status_code == 401          # the parent's RelatedPerson is gone
    assert api.as_patient(pid).get(f"Patient/{pid}").status_code == 404
    assert personal_data_left(db, ins, email) == []
    assert verify_chains(backend.storage) == []
    # the INS is reused for a new record, which starts empty; destroyed in turn, nothing is left
    again = dr.create({**child, "telecom": [{"system": "email", "value": email}]})
    assert again["id"] != pid
    assert dr.search(f"DocumentReference?patient={again['id']}")["total"] == 0
    assert api.as_patient(again["id"]).post(f"Patient/{again['id']}/$destroy").status_code == 204
    assert personal_data_left(db, ins, email) == []


def test_serve_workers_start_the_daily_retention(api):
    from flask import Flask
    assert lifecycle.start_daily_retention(Flask("other"), GuardedRepository) is None
    scheduler = lifecycle.start_daily_retention(api.app, GuardedRepository)
    try:
        assert scheduler is not None
    finally:
        scheduler.stop()


def test_a_write_that_races_a_destroy_is_purged_after_it_commits(api, dmp):
    """A deposit decided before the destroy but committed after it: nothing of it survives."""
    from fhir_dmp.security.auth import principal_from_claims
    pid = dmp["pid"]
    db = backend_of(api).storage.db
    ps = principal_from_claims({"SubjectNameID": b.PS_DR, "SubjectRole": ["10"], "acr": "eidas1",
                                "scope": "user/*.cruds"})
    late = GuardedRepository(backend_of(api), ps)
    late.access.state(pid)                      # the writer has seen the DMP open...
    assert api.as_admin().post(f"Patient/{pid}/$destroy").status_code == 204
    late.work.written(pid)                      # ...and its transaction commits after the destroy

    def write(s):
        db["DocumentReference"].insert_one({"_id": "late-doc", "pid": pid, "del": False,
                                            "res": {"subject": {"reference": f"Patient/{pid}"}}}, session=s)
    late.transaction(write, interaction="create", rtype="DocumentReference")
    assert db["DocumentReference"].count_documents({"pid": pid}) == 0
    # a DMP that never existed is not "destroyed": nothing is written for it
    assert not backend_of(api).storage.was_destroyed("never-existed")


def test_closing_is_all_or_nothing_with_its_retention(api, app):
    """Hole 6: the close and what retention counts from (the Patient's ``closed_at``) are one unit
    of work: a transaction that fails after the close leaves the DMP open, unstamped, and its
    journal untouched (no ``retain_until`` written beside it: the journal goes with the DMP); one
    that commits stamps ``closed_at`` at the closing version's time, which retention reads."""
    UNKNOWN_ID = "0123456789abcdef01234567"
    admin = api.as_admin()
    pat = admin.create(b.patient())
    db = services(app).storage.db
    closing = {"resource": dict(pat, active=False), "request": {"method": "PUT", "url": f"Patient/{pat['id']}"}}
    failing = {"resource": b.docref(pat["id"]) | {"id": UNKNOWN_ID},
               "request": {"method": "PUT", "url": f"DocumentReference/{UNKNOWN_ID}", "ifMatch": 'W/"4"'}}
    r = admin.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [closing, failing]})
    assert r.status_code == 412, r.json
    stored = db["Patient"].find_one({"_id": pat["id"]})
    assert "closed_at" not in stored
    assert db["AuditEvent"].find_one({"pid": pat["id"], "retain_until": {"$exists": True}}) is None
    assert admin.get(f"Patient/{pat['id']}").json["active"] is True
    closed = admin.put(f"Patient/{pat['id']}", dict(pat, active=False))
    assert closed.status_code == 200
    stored = db["Patient"].find_one({"_id": pat["id"]})
    assert stored["closed_at"].isoformat()[:19] == closed.json["meta"]["lastUpdated"][:19]
    at = stored["closed_at"].replace(tzinfo=timezone.utc)
    storage, years = backend_of(api).storage, backend_of(api).config.retention_years
    assert pat["id"] not in lifecycle.retention_due(storage, years, at + timedelta(days=365 * years - 1))
    assert pat["id"] in lifecycle.retention_due(storage, years, at + timedelta(days=366 * years))
