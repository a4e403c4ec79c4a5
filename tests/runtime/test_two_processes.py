"""Two ``fhir-dmp serve`` processes on one database stay correct together (issue 13).

Real parts only: two ``fhir-dmp serve`` processes (granian, 2 workers each, every worker
with its notification worker, sealer and context cache) started on the session's SecantusDB
(the sealer tests on a SecantusDB of their own, see ``own_database``), real tokens of ``tests/idp.py``, the aiosmtpd sink of ``tests/transports.py``, and the
``fhir-dmp audit`` CLI. Everything is checked through public behaviour only (HTTP answers, the
mail that arrives, the CLI's exit codes and output), not through the journal's storage:

* no double notice: concurrent accesses spread over both processes that call for a notice
  (attested first accesses, break-glass, centre 15) give exactly one email per notice, none
  lost, none twice, and each email matches one ``completed`` Communication the patient reads;
* no forked chain: concurrent reads and writes on both processes, both sealers competing
  for the one lease; the server holding it is killed in the middle of the load and the
  other takes over: ``fhir-dmp audit verify`` (no event left unsealed for more than 1 s)
  finds every chain and signed checkpoint intact, and every answered request is in the
  patient's journal; a sealer killed inside its sealing transaction is taken over once its
  lease expires (the taker ends the dead sealer's session, which SecantusDB would otherwise
  keep open with the lease document locked);
* no 409/503 under read load: many concurrent reads of one hot DMP over both processes.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from fhir_dmp.runtime.embedded_db import EmbeddedMongo
from tests import builders as b
from tests.faults.process_kit import BTG, call, communications, journal_request_ids, kind, message_id, verified


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
        r = call(method, f"{url}/{path}", token, body, headers)
        if r.status_code == 401:
            print("401 (shown on failure):", method, path, headers, r.headers.get("WWW-Authenticate"), r.text[:400])
        return r.status_code

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
        # one review case per grant, one open centre 15 case per professional and DMP (CONTRACT.md
        # "Privacy operations"), whichever process served the reads
        cases = call("GET", f"{urls[(i + 1) % 2]}/Task?patient=Patient/{pid}", idp.officer(), None, None).json()
        assert Counter(e["resource"]["code"]["coding"][0]["code"] for e in cases.get("entry", [])) == \
            Counter({"break-glass": 1, "centre-15": 1}), pid
    assert len(sent) == want


# --------------------------------------------------------------------------- no forked chain

@pytest.fixture
def own_database(tmp_path):
    """A SecantusDB for this test alone: a SIGKILLed server leaves an open transaction behind
    (the database aborts it only after its 60 s lifetime), which must not reach other tests."""
    server = EmbeddedMongo(tmp_path / "own-db")
    env = {"FHIR_DMP_MONGODB_URI": server.start(), "FHIR_DMP_DB": "two_processes"}
    yield env
    server.stop()


def open_hot_dmp(url: str, ps: str) -> tuple[str, str]:
    """A DMP opened by ``ps`` with one document: (patient id, document id)."""
    r = call("POST", f"{url}/Patient", ps, b.patient(email="hot@example.org"))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = call("POST", f"{url}/DocumentReference", ps, b.docref(pid))
    assert r.status_code == 201, r.text
    return pid, r.json()["id"]


def assert_lease_held(fhir_dmp_cli, env: dict) -> None:
    """A running server holds the sealer lease: ``fhir-dmp audit seal`` cannot take it."""
    seal = fhir_dmp_cli("audit", "seal", **env)
    assert seal.returncode != 0 and "holds the sealer lease" in seal.stderr + seal.stdout, seal


def test_two_processes_keep_one_chain_under_load_and_a_sealer_handover(own_database, serve, idp, fhir_dmp_cli):
    """Both sealers compete for the lease under concurrent reads and writes on both processes;
    the server holding it is killed in the middle of the load (SIGKILL: no drain, possibly inside
    a sealing transaction) and the other carries on: one unforked, signed chain, nothing left
    unsealed, nothing answered lost."""
    a = serve("a", **own_database)
    ps = idp.ps(b.PS_DR)
    pid, doc = open_hot_dmp(a.url, ps)
    assert_lease_held(fhir_dmp_cli, own_database)     # A runs alone: one of its workers holds it
    b_ = serve("b", **own_database)                   # B's sealers wait for it

    # 1. read load: 32 connections on one hot DMP over both processes, every answer 200
    reads = [f"Patient/{pid}", f"DocumentReference?patient={pid}", f"DocumentReference/{doc}"]

    def read_hot(i):
        codes = []
        with requests.Session() as s:
            for j in range(6):
                try:
                    codes.append(call("GET", f"{(a, b_)[i % 2].url}/{reads[j % 3]}", ps, session=s).status_code)
                except requests.ConnectionError as exc:    # shown in the assertion, not raised
                    codes.append(f"{(a, b_)[i % 2].name}: {exc}")
        return codes

    with ThreadPoolExecutor(32) as ex:
        statuses = [code for codes in ex.map(read_hot, range(32)) for code in codes]
    assert Counter(statuses) == Counter({200: 32 * 6}), Counter(statuses)

    # 2. reads and writes on both; A is stopped mid-load, its clients move to B
    stop, stopped, lock = threading.Event(), threading.Event(), threading.Lock()
    answered: dict[str, tuple] = {}    # request id -> (status, what, server, body of an error)
    refused: list[str] = []            # A no longer listening

    def load(i):
        with requests.Session() as s:
            j = 0
            while not stop.is_set():
                server = b_ if stopped.is_set() or i % 2 else a
                rid, write = f"load-{i}-{j}", j % 4 == 3
                what = "DocumentReference" if write else reads[j % 3]
                try:
                    r = call("POST" if write else "GET", f"{server.url}/{what}", ps,
                             b.docref(pid) if write else None, {"X-Request-Id": rid}, session=s)
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                    # A gone: refused, or killed between a response's headers and its body
                    with lock:
                        refused.append(rid)
                    s.close()
                else:
                    with lock:
                        answered[rid] = (r.status_code, what, server.name,
                                         "" if r.status_code < 300 else r.text[:300])
                j += 1

    with ThreadPoolExecutor(6) as ex:
        running = [ex.submit(load, i) for i in range(6)]
        time.sleep(3)
        a.kill()                   # SIGKILL: no drain, the lease may be held, a sealing transaction open
        stopped.set()
        time.sleep(3)
        stop.set()
        for f in running:
            f.result()
    codes = Counter(v[0] for v in answered.values())
    bad = Counter(v[:3] for v in answered.values() if v[0] not in (200, 201))
    assert not bad, (codes, bad, next(v[3] for v in answered.values() if v[0] not in (200, 201)))
    assert codes[201] >= 6, codes

    # B seals what A left: every chain and signed checkpoint intact, nothing left unsealed
    out = verified(fhir_dmp_cli, own_database, timeout=30)
    assert "audit chains intact" in out, out
    assert_lease_held(fhir_dmp_cli, own_database)     # by B now
    # every answered request is in the patient's journal (durable before its answer, also on A)
    assert set(answered) - journal_request_ids(b_.url, idp.patient(pid), pid) == set()


class CommitHolder:
    """A TCP relay to the database that never forwards a ``commitTransaction``: the client's
    transaction has done all its writes and stays open, as if the client died just before its
    commit (``caught`` is set then). Plain MongoDB wire protocol, nothing of the application."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.caught = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, to_db: bool):
        try:
            while data := src.recv(1 << 16):
                if to_db and b"commitTransaction" in data:
                    self.caught.set()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()

    def close(self):
        self.listener.close()


def test_a_sealer_killed_mid_transaction_is_taken_over_after_its_lease(own_database, serve, idp, fhir_dmp_cli):
    holder = CommitHolder(int(own_database["FHIR_DMP_MONGODB_URI"].rsplit(":", 1)[1].split("/")[0]))
    try:
        # `fhir-dmp audit seal` takes the lease and seals in a transaction; killed before its commit
        sealing = fhir_dmp_cli.spawn("audit", "seal", **{
            **own_database, "FHIR_DMP_MONGODB_URI": f"mongodb://127.0.0.1:{holder.port}/?directConnection=true"})
        assert holder.caught.wait(30), "the sealer never committed"
        leased = time.monotonic()  # its lease (10 s) was taken or renewed before this
        sealing.kill()
        sealing.wait()
        b_ = serve("b", **own_database)
        try:
            ps = idp.ps(b.PS_DR)
            pid, _ = open_hot_dmp(b_.url, ps)
            assert call("GET", f"{b_.url}/Patient/{pid}", ps).status_code == 200
            time.sleep(max(0.0, leased + 10.5 - time.monotonic()))   # the lease ran out: B takes it
            out = verified(fhir_dmp_cli, own_database, timeout=8)
            assert "audit chains intact" in out, out
        finally:
            b_.kill()              # its sealer threads may be stuck: no drain
    finally:
        holder.close()


# --------------------------------------------------------------------------- a withdrawn key, everywhere

def test_a_key_withdrawn_by_the_issuer_is_refused_by_every_worker_within_a_second(serve, idp, jwks_server):
    """CONTRACT.md "Access tokens" (issue 18): once any worker has seen that the issuer no longer
    publishes a key, every worker of every server refuses tokens signed with it within one
    second, although the others fetched the key set before and have no reason to fetch it again
    for minutes. Two servers of two workers each; the JWKS comes from a real HTTP server, which
    counts the fetches."""
    jwks_server.routes["/jwks"] = idp.jwks()
    keys_at = {"FHIR_DMP_JWKS_FILE": "", "FHIR_DMP_JWKS_URL": f"{jwks_server.url}/jwks"}
    urls = [f"{serve(name, **keys_at).url}/Patient?_count=1" for name in ("a", "b")]
    old = idp.admin()
    deadline = time.monotonic() + 30
    while jwks_server.hits.get("/jwks", 0) < 4:     # the four workers fetched the set (and trust the old key)
        assert [call("GET", url, old).status_code for url in urls] == [200, 200]
        assert time.monotonic() < deadline, "a worker never served a request"
    old_kid = idp.kid()
    idp.rotate()
    jwks_server.routes["/jwks"] = {"keys": [k for k in idp.jwks()["keys"] if k["kid"] != old_kid]}
    new = idp.admin()
    # one worker of server a sees the new set: the unknown kid makes it fetch (spaced by a few
    # seconds); the first 200 is the first fetch, so the three others still hold the old set
    deadline = time.monotonic() + 30
    while call("GET", urls[0], new).status_code != 200:
        assert time.monotonic() < deadline, "no worker fetched the new key set"
        time.sleep(0.2)
    fetched = jwks_server.hits["/jwks"]
    time.sleep(1.0)
    # new connections each: every worker answers
    for url in urls:
        assert [call("GET", url, old).status_code for _ in range(20)] == [401] * 20, url
    # the others take the new key at once, whatever the refetch spacing
    for url in urls:
        assert [call("GET", url, new).status_code for _ in range(20)] == [200] * 20, url
    # no fetch storm: each other worker fetches once, maybe twice (a record of a third worker
    # may reach it during its own fetch)
    assert jwks_server.hits["/jwks"] - fetched <= 6, jwks_server.hits
