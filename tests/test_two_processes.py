"""Two ``fhir-dmp serve`` processes on one database stay correct together (issue 13).

Real parts only: two ``fhir-dmp serve`` processes (gunicorn, 2 workers each, every worker
with its notification worker, sealer and context cache) started on the session's SecantusDB,
real tokens of ``tests/idp.py``, the aiosmtpd sink of ``tests/transports.py``, and the
``fhir-dmp audit`` CLI. Everything is checked through public behaviour only (HTTP answers, the
mail that arrives, the CLI's exit codes and output), not through the journal's storage:

* no double notice: concurrent accesses spread over both processes that call for a notice
  (attested first accesses, break-glass, centre 15) give exactly one email per notice, none
  lost, none twice, and each email matches one ``completed`` Communication the patient reads;
* no forked chain: concurrent reads and writes on both processes, both sealers competing
  for the one lease; then the server holding it is SIGKILLed in the middle of the load, the
  other takes over once the lease expires, and ``fhir-dmp audit verify`` (no unsealed event
  allowed) finds every chain and signed checkpoint intact;
* no 409/503 under read load: many concurrent reads of one hot DMP over both processes.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from fhir_dmp.embedded_db import EmbeddedMongo
from tests import builders as b

BTG = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                   'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
       "X-Break-Glass-Reason": "patient inconscient aux urgences"}
ID_SYSTEM = "urn:fhir-dmp:notification"


def call(method: str, url: str, token: str, body: dict | None = None, headers: dict | None = None,
         session: requests.Session | None = None) -> requests.Response:
    """One FHIR request with a bearer token (JSON in, JSON out)."""
    h = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    if body is not None:
        h["Content-Type"] = "application/fhir+json"
    h.update(headers or {})
    return (session or requests).request(method, url, json=body, headers=h, timeout=60)


def communications(url: str, token: str, pid: str) -> list[dict]:
    r = call("GET", f"{url}/Communication?subject=Patient/{pid}&_count=200", token)
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def kind(comm: dict) -> str:
    return comm["topic"]["coding"][0]["code"]


def message_id(comm: dict) -> str | None:
    return next((i["value"] for i in comm.get("identifier", []) if i.get("system") == ID_SYSTEM), None)


# --------------------------------------------------------------------------- no double notice

def test_two_processes_send_each_notice_exactly_once(serve, smtp, idp):
    sink, port = smtp
    mail = {"FHIR_DMP_SMTP_HOST": "127.0.0.1", "FHIR_DMP_SMTP_PORT": str(port)}
    urls = [serve(name, **mail).url for name in ("a", "b")]
    admin = idp.admin()
    pids = []
    for i in range(4):
        r = call("POST", f"{urls[i % 2]}/Patient", admin, b.patient(gp=b.PS_DR, email=f"p{i}@example.org"))
        assert r.status_code == 201, r.text
        pids.append(r.json()["id"])

    pharma, kine = idp.ps(b.PS_PHARMA, "21"), idp.ps(b.PS_KINE, "70")
    emergency, samu = idp.ps(b.PS_OTHER, "60"), idp.regulation_centre(b.PS_SAMU)
    # per DMP: two attested first accesses (one notice each), four break-glass reads started
    # together (ONE grant, one notice), two centre 15 reads (one notice each); every kind on
    # both servers
    tasks = []
    for i, pid in enumerate(pids):
        tasks += [("POST", urls[i % 2], pharma, "Consent", b.consent(pid, actor=b.PS_PHARMA, verified=True), None),
                  ("POST", urls[(i + 1) % 2], kine, "Consent", b.consent(pid, actor=b.PS_KINE, verified=True), None)]
        tasks += [("GET", urls[j % 2], emergency, f"Patient/{pid}", None, BTG) for j in range(4)]
        tasks += [("GET", urls[j % 2], samu, f"Patient/{pid}", None, None) for j in range(2)]
    start = threading.Barrier(len(tasks))

    def run(task):
        method, url, token, path, body, headers = task
        start.wait(timeout=30)
        return call(method, f"{url}/{path}", token, body, headers).status_code

    with ThreadPoolExecutor(len(tasks)) as ex:
        statuses = list(ex.map(run, tasks))
    assert Counter(statuses) == Counter({201: 2 * len(pids), 200: 6 * len(pids)}), Counter(statuses)

    expected = {"first_access": 2, "break_glass": 1, "centre_15": 2}
    want = sum(expected.values()) * len(pids)
    deadline = time.monotonic() + 30
    while len(sink.messages) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.5)       # a second copy would come within the workers' next polls (1 s)
    sent = [m["Message-ID"].strip("<>").split("@")[0] for m in sink.messages]
    assert len(sent) == len(set(sent)), "an email was sent twice"

    for i, pid in enumerate(pids):
        comms = communications(urls[i % 2], idp.patient(pid), pid)
        assert Counter(kind(c) for c in comms) == Counter(expected), (pid, Counter(kind(c) for c in comms))
        assert {c["status"] for c in comms} == {"completed"}
        to_patient = [m for m in sink.messages if m["To"] == f"p{i}@example.org"]
        assert sorted(m["Message-ID"].strip("<>").split("@")[0] for m in to_patient) == \
            sorted(message_id(c) for c in comms)
    assert len(sent) == want


# --------------------------------------------------------------------------- no forked chain

def journal_request_ids(url: str, token: str, pid: str) -> set[str]:
    """The X-Request-Id of every entry of the patient's journal, as the patient reads it."""
    ids, next_url = set(), f"{url}/AuditEvent?patient=Patient/{pid}&_count=1000"
    while next_url:
        r = call("GET", next_url, token)
        assert r.status_code == 200, r.text
        bundle = r.json()
        for e in bundle.get("entry", []):
            for ent in e["resource"].get("entity", []):
                if ent.get("type", {}).get("code") == "XrequestId":
                    ids.add(ent["what"]["identifier"]["value"])
        link = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
        next_url = link and url + link.split("/fhir", 1)[1]
    return ids


def verified(fhir_dmp_cli, env: dict, timeout: float) -> str:
    """Poll ``fhir-dmp audit verify`` allowing no event unsealed for more than 1 s, until intact; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        out = fhir_dmp_cli("audit", "verify", FHIR_DMP_AUDIT_SEAL_BOUND="1", **env)
        if out.returncode == 0 or time.monotonic() > deadline:
            return out.stdout + out.stderr
        time.sleep(0.5)


@pytest.fixture
def own_database(tmp_path):
    """A SecantusDB for this test alone: a SIGKILLed server leaves an open transaction behind
    (the database aborts it only after its 60 s lifetime), which must not reach other tests."""
    server = EmbeddedMongo(tmp_path / "own-db")
    env = {"FHIR_DMP_MONGODB_URI": server.start(), "FHIR_DMP_DB": "two_processes"}
    yield env
    server.stop()


def test_two_processes_keep_one_chain_when_the_sealer_dies_mid_load(own_database, serve, idp, fhir_dmp_cli):
    a = serve("a", **own_database)
    ps = idp.ps(b.PS_DR)
    r = call("POST", f"{a.url}/Patient", ps, b.patient(email="hot@example.org"))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = call("POST", f"{a.url}/DocumentReference", ps, b.docref(pid))
    assert r.status_code == 201, r.text
    doc = r.json()["id"]
    # A runs alone, so one of its workers holds the sealer lease (the CLI cannot take it) ...
    seal = fhir_dmp_cli("audit", "seal", **own_database)
    assert seal.returncode != 0 and "holds the sealer lease" in seal.stderr + seal.stdout, seal
    b_ = serve("b", **own_database)      # ... and B's sealers wait for it

    # 1. read load: 32 connections on one hot DMP over both processes, every answer 200
    reads = [f"Patient/{pid}", f"DocumentReference?patient={pid}", f"DocumentReference/{doc}"]

    def read_hot(i):
        with requests.Session() as s:
            return [call("GET", f"{(a, b_)[i % 2].url}/{reads[j % 3]}", ps, session=s).status_code
                    for j in range(6)]

    with ThreadPoolExecutor(32) as ex:
        statuses = [code for codes in ex.map(read_hot, range(32)) for code in codes]
    assert Counter(statuses) == Counter({200: 32 * 6}), Counter(statuses)

    # 2. reads and writes on both; A (the sealer) is SIGKILLed mid-load; B takes over
    stop, killed, lock = threading.Event(), threading.Event(), threading.Lock()
    answered: dict[str, tuple] = {}    # request id -> (status, what, server, after the kill, body)
    lost: list[str] = []               # cut by the kill (A's connections)

    def load(i):
        with requests.Session() as s:
            j = 0
            while not stop.is_set():
                after = killed.is_set()
                server = b_ if after or i % 2 else a
                rid = f"load-{i}-{j}"
                what = "DocumentReference" if j % 4 == 3 else reads[j % 3]
                try:
                    r = call("POST" if j % 4 == 3 else "GET", f"{server.url}/{what}", ps,
                             b.docref(pid) if j % 4 == 3 else None, {"X-Request-Id": rid}, session=s)
                except requests.ConnectionError:
                    with lock:
                        lost.append(rid)
                    s.close()
                else:
                    with lock:
                        answered[rid] = (r.status_code, what, server.name, after,
                                         "" if r.status_code < 300 else r.text[:300])
                j += 1

    with ThreadPoolExecutor(6) as ex:
        running = [ex.submit(load, i) for i in range(6)]
        time.sleep(2)
        killed.set()               # new requests go to B; those in flight on A are cut
        a.kill()
        time.sleep(12)             # past the lease (10 s): B's sealer takes over under load
        stop.set()
        for f in running:
            f.result()
    codes = Counter(v[0] for v in answered.values())
    bad = Counter(v[:4] for v in answered.values() if v[0] not in (200, 201))
    assert not bad, (codes, bad, next(v[4] for v in answered.values() if v[0] not in (200, 201)))
    assert codes[201] >= 6 and len(lost) <= 6, (codes, lost)   # at most one request per thread cut

    # everything sealed, once, by B after A died: chains and signed checkpoints intact
    out = verified(fhir_dmp_cli, own_database, timeout=30)
    assert "audit chains intact" in out, out
    seal = fhir_dmp_cli("audit", "seal", **own_database)
    assert seal.returncode != 0 and "holds the sealer lease" in seal.stderr + seal.stdout, seal
    # and every answered request is in the patient's journal (durable before its answer, even on A)
    journal = journal_request_ids(b_.url, idp.patient(pid), pid)
    assert set(answered) - journal == set()
