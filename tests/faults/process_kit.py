"""What a fault test drives, kills and checks (CONTRACT.md "Faults, failover and backups").

Real parts only: a SecantusDB of the test's own (:class:`~fhir_dmp.runtime.embedded_db.EmbeddedMongo`
on a fixed port, so that a killed one comes back where the servers look for it), ``fhir-dmp serve``
processes (``tests/serve_kit.py``), an aiosmtpd sink, real tokens. ``bench/chaos.py`` uses the same.

- :func:`call`, :func:`search_all`, :func:`journal_request_ids`, :func:`verified`,
  :func:`open_dmps`: one FHIR request; every page of a search; the X-Request-Id of every entry of
  a patient's journal as the patient reads it; ``fhir-dmp audit verify`` polled until intact;
  DMPs to load;
- :func:`own_database`, :func:`kill_database`, :func:`worker_pids`, :func:`hub_pids`, :func:`kill_worker`: a
  database to kill (with its test commands for fault injection when asked); SIGKILL, no goodbye;
- :class:`SlowSink`: an SMTP relay slow to answer 250 (a kill lands between its acceptance and
  the sender's ``sent``);
- :class:`MixedLoad`: client threads depositing documents (each its own content), reading them,
  searching, and reading as a centre 15 (each such read queues a notice to the patient); every
  request carries its X-Request-Id; it keeps what was acknowledged and what was answered;
- :func:`back_within`: how long until a URL answers 200 again;
- :func:`losses`, :func:`assert_nothing_lost`: every acknowledged deposit reads back byte for byte,
  every answered request is in its patient's journal, no answer was a 500;
- :func:`assert_notices_sent_once`: once the outbox is drained (the killed workers' leases expired
  by hand, as the 60 s after their claim would), one email per notice at the relay.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import requests

from fhir_dmp.notifications.outbox import OUTBOX
from fhir_dmp.runtime.embedded_db import EmbeddedMongo, free_port
from tests import builders as b
from tests.transports import Sink

BTG = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                   'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
       "X-Break-Glass-Reason": "patient inconscient aux urgences"}
ID_SYSTEM = "urn:fhir-dmp:notification"
# a request cut by a kill: refused, reset, or killed between a response's headers and its body
CUT = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout)


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


def search_all(url: str, token: str, query: str) -> list[dict]:
    """Every resource a search finds, following its ``next`` links."""
    out, next_url = [], f"{url}/{query}"
    while next_url:
        r = call("GET", next_url, token)
        assert r.status_code == 200, r.text
        bundle = r.json()
        out += [e["resource"] for e in bundle.get("entry", [])]
        link = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
        next_url = link and url + link.split("/fhir", 1)[1]
    return out


def request_ids(events) -> set[str]:
    """The X-Request-Id that AuditEvents name."""
    return {ent["what"]["identifier"]["value"] for event in events
            for ent in event.get("entity", []) if ent.get("type", {}).get("code") == "XrequestId"}


def journal_request_ids(url: str, token: str, pid: str) -> set[str]:
    """The X-Request-Id of every entry of the patient's journal, as the patient reads it."""
    return request_ids(search_all(url, token, f"AuditEvent?patient=Patient/{pid}&_count=200"))


def verified(fhir_dmp_cli, env: dict, timeout: float) -> str:
    """Poll ``fhir-dmp audit verify`` allowing no event unsealed for more than 1 s, until intact; its last output."""
    deadline = time.monotonic() + timeout
    while True:
        out = fhir_dmp_cli("audit", "verify", FHIR_DMP_AUDIT_SEAL_BOUND="1", **env)
        if out.returncode == 0 or time.monotonic() > deadline:
            return out.stdout + out.stderr
        time.sleep(0.5)


def open_dmps(url: str, token: str, n: int) -> list[str]:
    """``n`` DMPs opened by the PS of ``token`` (patients reachable by email); their ids."""
    pids = []
    for i in range(n):
        for _ in range(20):           # a server still warming up may answer 503: retried
            r = call("POST", f"{url}/Patient", token, b.patient(email=f"p{i}@example.org"))
            if r.status_code != 503:
                break
            time.sleep(0.5)
        assert r.status_code == 201, r.text
        pids.append(r.json()["id"])
    return pids


# --------------------------------------------------------------------------- kills

def own_database(home: Path, *, test_commands: bool = False) -> EmbeddedMongo:
    """A started SecantusDB of the caller's own in ``home`` (``--sync-on-commit``; fault injection
    with ``test_commands``), on a port it keeps across restarts."""
    server = EmbeddedMongo(home, port=free_port(), test_commands=test_commands)
    server.start()
    return server


def kill_database(server: EmbeddedMongo) -> None:
    """SIGKILL the database (WiredTiger replays its journal on the next start)."""
    os.kill(server.pid, signal.SIGKILL)
    server.stop()           # reaps it, forgets its pid file


def children(master: int) -> list[int]:
    """The live child processes of ``master``, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == master and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def _is_hub(pid: int) -> bool:
    try:
        return b"fhir_dmp.runtime.change_hub" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def worker_pids(master: int) -> list[int]:
    """granian's workers: the live child processes of ``master`` but its change hub."""
    return [pid for pid in children(master) if not _is_hub(pid)]


def hub_pids(master: int) -> list[int]:
    """The change hub of ``serve``'s ``master`` (one, or none while it is restarted)."""
    return [pid for pid in children(master) if _is_hub(pid)]


def kill_worker(master: int) -> int:
    """SIGKILL one of ``master``'s workers; its pid."""
    pid = random.choice(worker_pids(master))
    os.kill(pid, signal.SIGKILL)
    return pid


class SlowSink(Sink):
    """An SMTP relay that has the message (kept) ``delay`` s before it answers 250: a kill of
    the sender then often falls between the relay's acceptance and the sender's ``sent``."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        answer = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return answer


def sent_ids(sink: Sink) -> Counter:
    """How many emails the sink got per notice (its Message-ID)."""
    with sink.lock:
        return Counter(m["Message-ID"].strip("<>").split("@")[0] for m in sink.messages)


# --------------------------------------------------------------------------- load

class MixedLoad:
    """``threads`` clients calling ``url()`` (read at each request: it changes when a killed
    server is replaced) until :meth:`stop`: per 10 requests 4 deposits (a PDF of its own), 3
    reads of an acknowledged document, 2 searches, 1 centre 15 read (a notice to the patient).

    ``acked``: document id -> (patient id, content) of every 201 deposit; ``answered``: request id
    -> (status, patient id, what) of every answer; ``cut``: requests a kill cut off. ``pad``: bytes of
    random title that each document carries (its size, to fill a disk).
    """

    def __init__(self, url: Callable[[], str], idp, pids: list[str], *, threads: int = 4, pad: int = 0):
        self.url, self.pids, self.threads, self.pad = url, pids, threads, pad
        self.dr, self.samu = idp.ps(b.PS_DR), idp.regulation_centre(b.PS_SAMU)
        self.acked: dict[str, tuple[str, bytes]] = {}
        self.created_by: dict[str, str] = {}       # document id -> request id of its deposit
        self.answered: dict[str, tuple[int, str, str]] = {}
        self.cut: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._runners: list[threading.Thread] = []
        self._prefix = uuid.uuid4().hex[:6]

    def start(self) -> "MixedLoad":
        self._runners = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for t in self._runners:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._runners:
            t.join(90)

    def statuses(self) -> Counter:
        with self.lock:
            return Counter(v[0] for v in self.answered.values())

    def _run(self, i: int) -> None:
        rng = random.Random(f"{self._prefix}-{i}")
        with requests.Session() as s:
            for j in itertools.count():
                if self._stop.is_set():
                    return
                self._one(s, rng, f"load-{self._prefix}-{i}-{j}", j % 10)

    def _one(self, s: requests.Session, rng: random.Random, rid: str, slot: int) -> None:
        pid = rng.choice(self.pids)
        content = None
        with self.lock:
            docs = list(self.acked)
        token, method, body = self.dr, "GET", None
        if slot < 4 or not docs:
            content = b.pdf_bytes(f"Compte rendu {rid} {rng.randbytes(self.pad).hex()}")
            method, what, body = "POST", "DocumentReference", b.docref(pid, content=content)
        elif slot < 7:
            doc = rng.choice(docs)
            pid, what = self.acked[doc][0], f"DocumentReference/{doc}"
        elif slot < 9:
            what = f"DocumentReference?patient={pid}&_count=5"
        else:
            token, what = self.samu, f"Patient/{pid}"
        try:
            r = call(method, f"{self.url()}/{what}", token, body, {"X-Request-Id": rid}, session=s)
        except CUT:
            with self.lock:
                self.cut.append(rid)
            s.close()
            time.sleep(0.05)
            return
        with self.lock:
            self.answered[rid] = (r.status_code, pid, what)
            if r.status_code == 201 and content is not None:
                self.acked[r.json()["id"]] = (pid, content)
                self.created_by[r.json()["id"]] = rid
        if r.status_code == 503:
            time.sleep(0.1)


# --------------------------------------------------------------------------- checks

def back_within(url: str, token: str, timeout: float) -> float:
    """Seconds until ``url`` answers 200 again."""
    t0 = time.monotonic()
    while True:
        try:
            if call("GET", url, token).status_code == 200:
                return time.monotonic() - t0
        except Exception:   # noqa: BLE001 - refused or cut while the killed part comes back
            pass
        assert time.monotonic() - t0 < timeout, f"{url} not back within {timeout} s"
        time.sleep(0.1)



def losses(load: MixedLoad, url: str, idp, journal: Callable[[str], set[str]] | None = None) -> dict:
    """What a check after the faults finds: ``acked`` deposits and how many ``read_back`` (content
    byte for byte), ``answered`` 2xx requests and how many are ``journaled`` (their AuditEvent, by
    X-Request-Id, in ``journal(pid)``: by default the patient's journal as the patient reads it);
    ``missing``: a few of those not found."""
    journal = journal or (lambda pid: journal_request_ids(url, idp.patient(pid), pid))

    def read_back(doc: str) -> bool:
        pid, content = load.acked[doc]
        r = call("GET", f"{url}/DocumentReference/{doc}", load.dr)
        if r.status_code != 200:
            return False
        binary = r.json()["content"][0]["attachment"]["url"].split("/")[-1]
        r = call("GET", f"{url}/Binary/{binary}", load.dr, headers={"Accept": "application/pdf"})
        return r.status_code == 200 and r.content == content

    with ThreadPoolExecutor(8) as ex:
        found = dict(zip(load.acked, ex.map(read_back, list(load.acked))))
    missing = [f"DocumentReference/{doc}" for doc, ok in found.items() if not ok]
    answered = journaled = 0
    for pid in load.pids:
        rids = {rid for rid, (status, p, _) in load.answered.items() if p == pid and status < 300}
        unjournaled = rids - journal(pid)
        answered, journaled = answered + len(rids), journaled + len(rids) - len(unjournaled)
        missing += [f"AuditEvent of {rid}" for rid in sorted(unjournaled)]
    return {"acked": len(found), "read_back": sum(found.values()), "answered": answered, "journaled": journaled,
            "missing": missing[:5]}


def assert_nothing_lost(load: MixedLoad, url: str, idp) -> None:
    """No 500 (nor any 3xx/4xx); every acknowledged deposit readable, content byte for byte;
    every 2xx answer journaled."""
    codes = load.statuses()
    assert not [c for c in codes if c >= 500 and c != 503], codes
    assert not [c for c in codes if 300 <= c < 500], codes
    assert codes[201] > 0 and codes[200] > 0, codes
    found = losses(load, url, idp)
    assert found["read_back"] == found["acked"] and found["journaled"] == found["answered"], found


def expire_leases(db) -> int:
    """Expire every outbox lease, as the 60 s after a killed worker's claim would."""
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    return db[OUTBOX].update_many({"status": "sending"}, {"$set": {"lease_until": past}}).modified_count


def assert_notices_sent_once(db, sink: Sink, timeout: float = 30) -> dict:
    """Wait until every email notice is sent (leases of killed workers expired by hand), then:
    one email per notice, none twice, none of another; the count of outcome-unknown ones."""
    deadline = time.monotonic() + timeout
    while db[OUTBOX].count_documents({"channel": "email", "status": {"$ne": "sent"}}):
        assert time.monotonic() < deadline, list(db[OUTBOX].find({"status": {"$ne": "sent"}}, {"body": 0}))
        expire_leases(db)
        time.sleep(0.3)
    time.sleep(1.5)          # a second copy would come within the workers' next polls (1 s)
    notices = {m["_id"]: m for m in db[OUTBOX].find({"channel": "email"}, {"outcome_unknown": 1})}
    got = sent_ids(sink)
    assert notices, "no notice was queued"
    assert max(got.values()) == 1, [k for k, n in got.items() if n > 1]
    assert set(got) <= set(notices)
    unknown = {k for k, m in notices.items() if m.get("outcome_unknown")}
    assert set(notices) - unknown <= set(got), "a notice marked sent never reached the relay"
    return {"notices": len(notices), "emails": sum(got.values()), "outcome_unknown": len(unknown)}
