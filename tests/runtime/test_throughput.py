"""Issue 13 under real conditions: durable journal, sealed chains, caches, two server processes.

* the AuditEvent of an answered request survives the database being killed right after;
* a server's reads under concurrent load, with the background sealer running: all 200, and
  the sealed chains and signed checkpoints verify;
* two ``fhir-dmp serve`` processes (2 workers each) on one database: a block written
  through one takes effect in every worker of the other within one second, and lifting it
  too; concurrent reads on both never answer 409/503; both sealers together leave one
  unforked, signed chain (``fhir-dmp audit verify``).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pymongo
import pytest
import requests

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.embedded_db import EmbeddedMongo, process_alive
from fhir_dmp.runtime.services import services
from tests import builders as b
from tests.builders import journal_entries
from tests.api import Api
from tests.conftest import BASE


def _by_request(db, request_id: str) -> list[dict]:
    return [e for e in journal_entries(db) if any((ent.get("what") or {}).get("identifier", {}).get("value") == request_id
                                                  for ent in e["res"].get("entity") or [])]


def test_journal_is_durable_before_the_answer(tmp_path, idp):
    """Kill -9 the database right after the answer: the read's AuditEvent is there after restart."""
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    server = EmbeddedMongo(tmp_path / "db")
    uri = server.start()
    config = Config(mongodb_uri=uri, db_name="durable", data_dir=tmp_path, base_url=BASE,
                    notifications_worker=False, audit_sealer=False, **idp.config_kwargs())
    app = create_app(config)
    try:
        api = Api(app, idp)
        pid = api.as_ps().post("Patient", b.patient()).json["id"]
        r = api.as_ps().get(f"Patient/{pid}", headers={"X-Request-Id": "durable-read-1"})
        assert r.status_code == 200
        r = api.as_ps(b.PS_OTHER).get(f"Patient/{pid}", headers={"X-Request-Id": "durable-denied-1"})
        assert r.status_code == 404
        db_pid = server.pid
        os.kill(db_pid, signal.SIGKILL)           # no clean shutdown, no flush
        deadline = time.monotonic() + 10
        while process_alive(db_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_background(app)
    again = EmbeddedMongo(tmp_path / "db")
    client = pymongo.MongoClient(again.start(), tz_aware=True)
    try:
        db = client["durable"]
        [read] = _by_request(db, "durable-read-1")
        assert read["res"]["outcome"] == "0" and read["pid"] == pid
        assert db["AuditEvent_page"].count_documents({"events._id": read["_id"]}) == 1   # for the sealer
        [denied] = _by_request(db, "durable-denied-1")
        assert denied["res"]["outcome"] == "4"
    finally:
        client.close()
        again.stop()


def test_concurrent_reads_then_sealed_chains_verify(app, idp, db, db_storage, config):
    """Many threads read one DMP while the sealer runs: all 200, every event sealed, chains
    and signed checkpoints intact."""
    from fhir_dmp.audit.verify import verify_chains
    from fhir_dmp.audit.sealer import Sealer
    api = Api(app, idp)
    pid = api.as_ps().post("Patient", b.patient()).json["id"]
    api.as_ps().post("DocumentReference", b.docref(pid))
    sealer = Sealer(db_storage, config.audit_key_path, interval=0.05)
    sealer.start()
    token = idp.ps(b.PS_DR)
    statuses = []

    def reader(i):
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        for j in range(15):
            path = f"/fhir/Patient/{pid}" if j % 2 else f"/fhir/DocumentReference?patient={pid}"
            statuses.append(client.get(path, headers=headers).status_code)

    try:
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(reader, range(8)))
    finally:
        sealer.stop()
    assert set(statuses) == {200} and len(statuses) == 120
    sealer.seal_all()
    sealer.release()
    assert db["AuditEvent_page"].count_documents({}) == 0
    assert len(list(db_storage.sealed_events(pid))) >= 120
    assert verify_chains(db_storage, check_signatures=True, public_key=sealer.key.public_key()) == []


def test_stop_background_leaves_nothing_running(config, build_app, idp):
    """What a test (or a worker going away) stops is stopped for good before its database is
    dropped: SecantusDB's dropDatabase, run while the app's sealer still works on that database,
    can spin for ever in WiredTiger, and every other client then waits (CI hung so)."""
    from fhir_dmp.runtime.services import stop_background
    from fhir_dmp.storage.core import SEALER_LEASE
    app = build_app(config.with_(audit_sealer=True, notifications_worker=True))
    api = Api(app, idp)
    pid = api.as_ps().post("Patient", b.patient()).json["id"]
    assert api.as_ps().get(f"Patient/{pid}").status_code == 200     # the journal's committer too
    running = services(app)
    background = [running.context_cache, running.sealer, running.worker]
    threads = [s._thread for s in background] + [running.audit_log._committer._thread]
    assert all(t.is_alive() for t in threads)
    stop_background(app)
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [t.name for t in threads if t.is_alive()] == []
    lease = services(app).storage.db[SEALER_LEASE]
    assert lease.find_one() is None                                 # the sealer gave its lease back
    sealer = running.sealer
    assert sealer.acquire()
    for service in background:                                      # a second stop (as at exit)
        service.stop()                                              # has nothing left to do:
    assert lease.find_one()["owner"] == sealer.owner                # not even the lease to give back
    sealer.release()


# --------------------------------------------------------------------------- two server processes

@pytest.fixture
def two_servers(serve):
    """Two ``fhir-dmp serve`` processes, 2 workers each, on the test's database (tests/serve_kit.py)."""
    return [serve(name).url for name in ("a", "b")]


def _get(session, url: str, token: str) -> int:
    r = session.get(url, headers={"Authorization": f"Bearer {token}",
                                     "Accept": "application/fhir+json"}, timeout=30)
    if r.status_code == 401:
        print("401 (shown on failure):", url, r.headers.get("WWW-Authenticate"), r.text[:400])
    return r.status_code


def _all_answer(session, urls, path, token) -> list[int]:
    """8 requests to each server (so every worker answers): their statuses."""
    return [_get(session, f"{u}/{path}", token) for u in urls for _ in range(8)]


def _one_second_after(t0: float) -> None:
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))


def test_two_processes_invalidate_within_a_second_and_never_conflict(two_servers, idp, db, fhir_dmp_cli):
    a, b_url = two_servers
    ps, s = idp.ps(b.PS_DR), requests.Session()
    headers = {"Authorization": f"Bearer {ps}", "Content-Type": "application/fhir+json",
               "Accept": "application/fhir+json"}
    r = s.post(f"{a}/Patient", json=b.patient(), headers=headers)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert s.post(f"{a}/DocumentReference", json=b.docref(pid), headers=headers).status_code == 201
    # every worker of both servers has the context cached
    assert set(_all_answer(s, [a, b_url], f"Patient/{pid}", ps)) == {200}

    # the patient blocks the médecin through server B: A and B refuse within one second
    patient = {"Authorization": f"Bearer {idp.patient(pid)}", "Content-Type": "application/fhir+json",
               "Accept": "application/fhir+json"}
    r = s.post(f"{b_url}/Consent", json=b.consent(pid, "deny", actor=b.PS_DR), headers=patient)
    t0 = time.monotonic()
    assert r.status_code == 201, r.text
    block_id = r.json()["id"]
    _one_second_after(t0)
    assert set(_all_answer(s, [a, b_url], f"Patient/{pid}", ps)) == {404}
    # lifted through A: B and A let the médecin back in within one second
    assert s.delete(f"{a}/Consent/{block_id}", headers=patient).status_code == 204
    t0 = time.monotonic()
    _one_second_after(t0)
    assert set(_all_answer(s, [a, b_url], f"Patient/{pid}", ps)) == {200}

    # read load on both processes: never a 409 or 503
    statuses: list[int] = []
    lock = threading.Lock()

    def reader(i):
        sess = requests.Session()
        base = a if i % 2 else b_url
        for j in range(20):
            path = f"Patient/{pid}" if j % 2 else f"DocumentReference?patient={pid}"
            code = _get(sess, f"{base}/{path}", ps)
            with lock:
                statuses.append(code)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(reader, range(8)))
    assert set(statuses) == {200}, sorted(set(statuses))

    # both servers' sealers took turns on the lease: everything sealed once, signed, unforked
    deadline = time.monotonic() + 20
    while db["AuditEvent_page"].count_documents({}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert db["AuditEvent_page"].count_documents({}) == 0
    verify = fhir_dmp_cli("audit", "verify")
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout + verify.stderr


def test_total_is_counted_only_when_asked_or_free(api):
    """A page that does not hold every match carries no total unless ``_total`` asks for it
    (a count walks every match of a large DMP on every page); a first page that holds
    everything is its own total."""
    ps = api.as_ps()
    pid = ps.post("Patient", b.patient()).json["id"]
    for _ in range(3):
        assert ps.post("DocumentReference", b.docref(pid)).status_code == 201
    page = ps.search(f"DocumentReference?patient={pid}&_count=2")
    assert "total" not in page and len(page["entry"]) == 2
    assert any(link["relation"] == "next" for link in page["link"])
    assert ps.search(f"DocumentReference?patient={pid}&_count=2&_total=accurate")["total"] == 3
    assert ps.search(f"DocumentReference?patient={pid}&_summary=count")["total"] == 3
    assert ps.search(f"DocumentReference?patient={pid}")["total"] == 3


def test_or_filters_run_as_flat_branches_give_the_same_page(db):
    """Storage runs a top-level ``$or`` (the access guard's) as one flat query per branch so that
    SecantusDB can use its indexes; the merged page and count equal the database's own."""
    from fhir_dmp.storage import or_branches, Storage
    assert or_branches({"pid": "p", "del": False}) is None
    assert or_branches({"pid": "p", "$or": [{"a": 1}, {"b": 2}]}) == [{"pid": "p", "a": 1}, {"pid": "p", "b": 2}]
    assert or_branches({"pid": "p", "$or": [{"pid": "q"}, {"b": 2}]}) is None      # a key twice
    assert or_branches({"pid": "p", "$nor": [{"a": 1}]}) is None
    coll = db["DocumentReference"]
    coll.insert_many([{"_id": f"d{i:02d}", "pid": "p" if i % 4 else "q", "del": i == 7, "a": i % 3,
                       "b": i % 5, "o": {"date~d": i % 6} if i % 9 else {}} for i in range(40)])
    storage = Storage(db.client, db)
    flt = {"pid": "p", "$or": [{"a": 1}, {"b": {"$in": [2, 3]}}]}
    sort = [("o.date~d", -1), ("_id", 1)]
    plain = list(coll.find({**flt, "del": False}).sort(sort).limit(7))
    assert [d["_id"] for d in storage.find_docs("DocumentReference", flt, sort, 7)] == [d["_id"] for d in plain]
    assert storage.count("DocumentReference", flt) == coll.count_documents({**flt, "del": False})
