"""CONTRACT.md "Faults, failover and backups": the background workers under a database that is away.

The journal sealer, the notification outbox worker, the retention scheduler and the decision-context
change stream (with the DMP document cache and the issuer's key set riding on it) never die of a
database away: their work is bounded by ``FHIR_DMP_DB_WAIT``, they log one line per outage, and
they are back at work within 2 s of the database's return, without a restart. The change stream
never lets a decision rest on what was cached before a gap: a block written while it was lost is in
force. Faults are real: ``replSetStepDown`` and ``failCommand`` on the commands the workers send,
on a SecantusDB of this module's own (tests/faults/database_kit.py).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone

import pytest

from fhir_dmp.guard.lifecycle import RetentionScheduler
from fhir_dmp.notifications.outbox import Notice, Outbox
from fhir_dmp.notifications.worker import Worker
from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.services import services
from fhir_dmp.storage.core import JOURNAL_PAGES, OUTBOX
from tests import builders as b
from tests.api import Api
from tests.idp import TestIdP
from tests.faults.database_kit import faulty_app, faulty_db, faulty_name  # noqa: F401 (fixtures)

OUTAGE_S = 3
BACK_S = 2          # back at work within this long of the database's return
#: a command failing as over a lost network path (HostUnreachable: retryable; not a "node is
#: recovering" error, which would make the driver drop the whole pool and stall the requests too)
UNREACHABLE = 6
#: a change stream's resume point the server no longer has: not resumable
HISTORY_LOST = 286


def _within(seconds: float, probe, what: str) -> float:
    """Poll ``probe()`` until true; the seconds it took (fails past ``seconds``)."""
    started = time.monotonic()
    while not probe():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _lines(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fault", ["failCommand", "step-down"])
def test_workers_are_back_within_2s_of_the_database(fault, faulty_app, faulty_db, faulty_name, smtp, idp, caplog):
    caplog.set_level(logging.INFO, logger="fhir_dmp")
    sink, port = smtp
    app = faulty_app(audit_sealer=True)
    storage = services(app).storage
    db = faulty_db.admin[faulty_name]
    dr = Api(app, idp).as_ps(b.PS_DR)
    pid = dr.create(b.patient(email=None))["id"]
    doc = dr.create(b.docref(pid, b.CONSULTATION))
    _within(5, lambda: db[JOURNAL_PAGES].count_documents({}) == 0, "journal sealed before the fault")
    config = Config(smtp_host="127.0.0.1", smtp_port=port)
    worker = Worker(storage, config, poll_interval=0.2)
    worker.start()
    runs = []
    retention = RetentionScheduler(storage, lambda: runs.append(1) or 0, owner="faults", interval=600)
    try:
        # the workers' own commands fail (the sealer's lease, the outbox's claim, the day's claim:
        # findAndModify) while requests still write: work piles up for them (reads, journaled)
        faulty_db.fail(["findAndModify"], errorCode=UNREACHABLE)
        assert dr.get(f"DocumentReference/{doc['id']}").status_code == 200
        Outbox(storage, config).enqueue(
            Notice(kind="first_access", patient_id=pid, actor_name="Dr Marie Curie", actor_profession="10",
                   actor_id=b.PS_DR, mode="normal", when=datetime.now(timezone.utc)),
            {"resourceType": "Patient", "id": pid, "telecom": [{"system": "email", "value": "a@example.org"}]})
        retention.start()
        if fault == "step-down":
            faulty_db.step_down(OUTAGE_S)
        else:
            time.sleep(OUTAGE_S)
        assert db[JOURNAL_PAGES].count_documents({}) > 0 and not sink.messages and not runs
        faulty_db.back(OUTAGE_S + 10)
        _within(BACK_S, lambda: db[JOURNAL_PAGES].count_documents({}) == 0, "sealer")
        _within(BACK_S, lambda: {d["status"] for d in db[OUTBOX].find()} == {"sent"}, "outbox worker")
        _within(BACK_S, lambda: runs == [1], "retention scheduler")
        assert len(sink.messages) == 1          # sent once
    finally:
        worker.stop()
        retention.stop()
    # one line per outage and worker, not one per try (the sealer's lease write that times out
    # reads as "another process holds it", which is no outage to report)
    for what in ("notification worker", "retention scheduler"):
        assert _lines(caplog, f"{what}: database unavailable") == 1, what
        assert _lines(caplog, f"{what}: database back") == 1, what
    assert _lines(caplog, "audit sealer: database unavailable") <= 1


@pytest.fixture
def two_processes(faulty_app, idp):
    """Two apps on the faulty database, each with its change stream live: ``(api1, api2, app1)``."""
    apps = [faulty_app(), faulty_app()]
    _within(10, lambda: all(services(a).context_cache.live for a in apps), "change streams")
    return Api(apps[0], idp), Api(apps[1], idp), apps[0]


def _blocked_while_lost(two_processes, faulty_db, lose) -> None:
    """A block written in process 2 while process 1's stream suffers ``lose()``: in force in
    process 1 within the usual second (CONTRACT.md: a block is in force on every process within a
    second), whether the stream resumed from its token and delivered the change or failed and
    dropped the caches (a getMore already in flight when the fault is set still answers: that is
    the second's window, not a gap)."""
    api1, api2, app1 = two_processes
    dr1 = api1.as_ps(b.PS_DR)
    pid = dr1.create(b.patient(email=None))["id"]
    doc = dr1.create(b.docref(pid, b.CONSULTATION))["id"]
    assert dr1.get(f"DocumentReference/{doc}").status_code == 200     # the DMP's context now cached
    lose()
    # the patient blocks the médecin in the other process while this one's stream is lost
    assert api2.as_patient(pid).post("Consent", b.consent(pid, "deny", actor=b.PS_DR)).status_code == 201
    # nothing decided on what was cached before the gap (a denied read is a 404)
    _within(1.5, lambda: dr1.get(f"DocumentReference/{doc}").status_code == 404, "block in force")
    faulty_db.off()
    cache = services(app1).context_cache
    _within(BACK_S, lambda: cache.live, "decision context stream")
    assert dr1.get(f"DocumentReference/{doc}").status_code == 404
    assert dr1.search(f"DocumentReference?patient={pid}").get("entry") in (None, [])


def test_a_block_written_while_the_stream_history_is_lost_is_in_force(two_processes, faulty_db):
    # a resume point the server no longer has (ChangeStreamHistoryLost): not resumable; the
    # caches are dropped and the stream opened afresh until the database lets it
    _blocked_while_lost(two_processes, faulty_db,
                        lambda: faulty_db.fail(["getMore"], errorCode=HISTORY_LOST))


def test_a_block_written_while_the_stream_drops_its_connection_is_in_force(two_processes, faulty_db):
    # connections dropped under the stream (resumable: pymongo resumes from its token; past one
    # resume the stream is reopened, caches dropped)
    _blocked_while_lost(two_processes, faulty_db,
                        lambda: faulty_db.fail(["getMore", "aggregate"], {"times": 3}, closeConnection=True))


def test_a_key_withdrawn_while_the_database_is_away_is_refused_everywhere_once_it_is_back(
        faulty_app, faulty_db, tmp_path):
    # two processes whose copies of the issuer's JWKS differ (one node's file is older): the one
    # that sees a key withdrawn while the database is stepped down cannot record it then; it
    # does once the database is back, and the other process refuses the key (auth.SharedKeys)
    idp = TestIdP(tmp_path / "idp")
    old_kid = idp.signing["RS256"].kid
    old = idp.ps(b.PS_DR)
    idp.rotate()
    older_copy = tmp_path / "older-jwks.json"
    shutil.copy(idp.jwks_file, older_copy)
    apps = [faulty_app(**idp.config_kwargs()), faulty_app(**{**idp.config_kwargs(), "jwks_file": older_copy})]
    _within(10, lambda: all(services(a).context_cache.live for a in apps), "change streams")
    first, second = (Api(app, idp).as_token(old) for app in apps)
    assert first.get("Patient/none").status_code == 404 and second.get("Patient/none").status_code == 404

    faulty_db.step_down(OUTAGE_S)
    jwks = idp.jwks()
    jwks["keys"] = [k for k in jwks["keys"] if k["kid"] != old_kid]
    idp.jwks_file.write_text(json.dumps(jwks))
    assert first.get("Patient/none").status_code == 401      # this process sees it gone at once
    faulty_db.back(OUTAGE_S + 10)
    _within(BACK_S, lambda: second.get("Patient/none").status_code == 401, "withdrawal shared")
