"""CONTRACT.md "Faults, failover and backups": ``fhir-dmp serve`` under mixed load through a fault.

Two workers of a real ``fhir-dmp serve`` (tests/serve_kit.py) on a SecantusDB of this module's own
(tests/faults/database_kit.py), ``FHIR_DMP_DB_WAIT=2``; threads read documents, deposit
DocumentReferences and write Consents, each request with its own ``X-Request-Id``, while the
primary steps down for longer than the wait, connections drop, or commits fail their write concern.
Then: no answer is a 500 (nor a broken connection); every 503 is an OperationOutcome ``transient``
with ``Retry-After``, given within the wait; every request started 2 s after the database's return
succeeds; every acknowledged deposit and Consent is readable with its creation in the journal; every
200 read has its AuditEvent (found by its request id).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import pytest
import requests

from tests import builders as b
from tests.faults.database_kit import (DB_WAIT_S, faulty_db, faulty_name, journal,  # noqa: F401 (fixtures)
                                       request_id, successes)

STEP_DOWN_S = 6          # longer than FHIR_DMP_DB_WAIT
FAULT_S = 4              # how long the failpoints stay on
BACK_S = 2               # every request started this long after the database's return succeeds
SLACK_S = 3              # a 503 comes within FHIR_DMP_DB_WAIT plus this (2 loaded cores)
WRITES = ["insert", "update", "delete", "find", "findAndModify", "bulkWrite", "commitTransaction", "aggregate"]


# serve_kit's ``serve`` on the faulty server: its ``mongo_server`` and ``db`` are this module's
@pytest.fixture
def mongo_server(faulty_db):
    return faulty_db


@pytest.fixture
def db(faulty_db, faulty_name):
    return faulty_db.admin[faulty_name]


@dataclass
class Answer:
    kind: str            # read | deposit | consent
    rid: str             # the X-Request-Id sent
    started: float
    ended: float
    status: int          # 0: no HTTP answer (connection refused or reset, a client timeout)
    body: dict | None
    retry_after: str | None


class Load:
    """Reader, depositor and Consent-writer threads on ``url`` until :meth:`stop`."""

    def __init__(self, url: str, idp, pid: str, doc_ids: list[str]):
        self.url, self.pid, self.doc_ids = url, pid, doc_ids
        self.ps = {"Authorization": f"Bearer {idp.ps(b.PS_DR)}", "Content-Type": "application/fhir+json"}
        self.patient = {"Authorization": f"Bearer {idp.patient(pid)}", "Content-Type": "application/fhir+json"}
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind, i), daemon=True)
                         for i, kind in enumerate(["read", "read", "deposit", "consent"])]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.answers

    def _request(self, session, kind: str, i: int) -> Answer:
        rid = f"{kind}-{uuid.uuid4().hex}"
        if kind == "read":
            method, path, body, headers = "GET", f"DocumentReference/{self.doc_ids[i % len(self.doc_ids)]}", None, self.ps
        elif kind == "deposit":
            method, path, body, headers = "POST", "DocumentReference", b.docref(self.pid, b.LAB), self.ps
        else:
            method, path, body, headers = "POST", "Consent", b.consent(self.pid, "permit", actor=b.PS_OTHER), self.patient
        started = time.monotonic()
        try:
            r = session.request(method, f"{self.url}/{path}", json=body, headers={**headers, "X-Request-Id": rid},
                                timeout=30)
            status, retry_after = r.status_code, r.headers.get("Retry-After")
            try:
                parsed = r.json()
            except ValueError:
                parsed = {"text": r.text[:300]}
        except requests.RequestException as exc:
            status, retry_after, parsed = 0, None, {"error": type(exc).__name__}
        return Answer(kind, rid, started, time.monotonic(), status, parsed, retry_after)

    def _run(self, kind: str, i: int) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                answer = self._request(session, kind, i)
                with self._lock:
                    self.answers.append(answer)
                if answer.status == 503:
                    self._stop.wait(0.2)      # the client honours Retry-After, shortened for the test


def _created(url: str, body: dict, headers: dict) -> str:
    """POST until 201 (a 503 is retried after its Retry-After, as a client would: a fresh server's
    first writes on a loaded machine may pass the wait); the new id."""
    deadline = time.monotonic() + 30
    while True:
        r = requests.post(url, json=body, headers=headers, timeout=30)
        if r.status_code != 503 or time.monotonic() > deadline:
            assert r.status_code == 201, r.text
            return r.json()["id"]
        time.sleep(int(r.headers["Retry-After"]))


def _setup(serve, idp):
    server = serve("a", workers=2, FHIR_DMP_DB_WAIT=str(DB_WAIT_S))
    headers = {"Authorization": f"Bearer {idp.ps(b.PS_DR)}", "Content-Type": "application/fhir+json"}
    pid = _created(f"{server.url}/Patient", b.patient(email=None), headers)
    docs = [_created(f"{server.url}/DocumentReference", b.docref(pid, code), headers)
            for code in (b.CONSULTATION, b.LAB)]
    return server, pid, docs


def _check(answers: list[Answer], back: float, server, idp, db) -> dict:
    """The contract's checks on what the load got (module docstring); counts by status."""
    assert answers, "no request was answered"
    broken = [a for a in answers if a.status not in (200, 201, 503)]
    assert not broken, [(a.kind, a.status, a.body) for a in broken[:5]] + [server.tail()]
    for a in answers:
        if a.status == 503:
            assert a.body["resourceType"] == "OperationOutcome" and a.body["issue"][0]["code"] == "transient", a.body
            assert a.retry_after and int(a.retry_after) > 0
            assert a.ended - a.started < DB_WAIT_S + SLACK_S, f"a 503 after {a.ended - a.started:.1f} s"
    late = [a for a in answers if a.started > back + BACK_S]
    assert late, "the load stopped too early"
    assert all(a.status in (200, 201) for a in late), \
        [(a.kind, a.status, round(a.started - back, 2)) for a in late if a.status not in (200, 201)][:5]

    events = journal(db)
    by_request: dict[str, list[dict]] = {}
    for e in events:
        by_request.setdefault(request_id(e), []).append(e)
    headers = {"Authorization": f"Bearer {idp.ps(b.PS_DR)}"}
    with requests.Session() as session:
        for a in answers:
            if a.status == 200 and a.kind == "read":
                assert any(e.get("action") == "R" and e.get("outcome") == "0" for e in by_request.get(a.rid, ())), \
                    f"a 200 read without its AuditEvent ({a.rid})"
            elif a.status == 201:
                ref = f"{a.body['resourceType']}/{a.body['id']}"
                assert successes(by_request.get(a.rid, []), "C", ref), f"{ref} acknowledged without its AuditEvent"
                r = session.get(f"{server.url}/{ref}", headers=(
                    headers if a.kind == "deposit" else {"Authorization": f"Bearer {idp.patient(a.body['patient']['reference'].split('/')[1])}"}),
                    timeout=30)
                assert r.status_code == 200, (ref, r.status_code, r.text[:300])
    counts: dict[int, int] = {}
    for a in answers:
        counts[a.status] = counts.get(a.status, 0) + 1
    return counts


def _under_load(serve, idp, db, fault) -> tuple[dict, list[Answer]]:
    """Mixed load, ``fault()`` (returns when the database is back: that instant), checks."""
    server, pid, docs = _setup(serve, idp)
    load = Load(server.url, idp, pid, docs).start()
    time.sleep(1.5)
    back = fault()
    time.sleep(BACK_S + 2)
    answers = load.stop()
    counts = _check(answers, back, server, idp, db)
    print(f"{fault.__name__}: answers by status {counts}")   # shown with pytest -s
    return counts, answers


def test_a_step_down_longer_than_the_wait_under_mixed_load(serve, idp, db, faulty_db):
    def step_down():
        began = faulty_db.step_down(STEP_DOWN_S)
        return faulty_db.back(STEP_DOWN_S + 10) if began else None
    counts, answers = _under_load(serve, idp, db, step_down)
    # the step-down did bite: writes past the wait were told to retry
    assert any(a.status == 503 and a.kind != "read" for a in answers), counts


def test_dropped_connections_under_mixed_load(serve, idp, db, faulty_db):
    def drop_connections():
        faulty_db.fail(WRITES, {"times": 30}, closeConnection=True)
        time.sleep(FAULT_S)
        return faulty_db.back(10)
    _under_load(serve, idp, db, drop_connections)


def test_write_concern_errors_at_commit_under_mixed_load(serve, idp, db, faulty_db):
    def write_concern_errors():
        faulty_db.fail(["commitTransaction"], {"times": 30},
                       writeConcernError={"code": 64, "codeName": "WriteConcernFailed", "errmsg": "timed out"})
        time.sleep(FAULT_S)
        return faulty_db.back(10)
    _under_load(serve, idp, db, write_concern_errors)
