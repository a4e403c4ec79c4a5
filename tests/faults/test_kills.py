"""SIGKILL under load (CONTRACT.md "Faults, failover and backups"): of one server worker, of the
whole ``fhir-dmp serve`` (master and workers), of the database; then what was killed comes back.

Real parts: ``fhir-dmp serve`` (granian, 2 workers) on a SecantusDB of the test's own
(``--sync-on-commit``; a killed server leaves open transactions there that must not reach other
tests), an aiosmtpd relay that answers 250 only 0.3 s after it has the message (so a kill often
falls between the relay's acceptance and the sender's ``sent``), real tokens, the ``fhir-dmp``
CLI. Under mixed load (deposits, reads, searches, centre 15 reads that notify the patient):

- nothing acknowledged is lost: every 201 deposit reads back, its content byte for byte;
- every answered request has its AuditEvent in the patient's journal, ``fhir-dmp audit verify``
  passes once the restarted server has sealed what the killed one left;
- no answer is a 500 (a request cut by the kill gets no answer; one waiting on the killed
  database gets 503);
- each notice is sent once: one email per notice id at the relay (the killed worker's leases are
  expired by hand, as the 60 s after its claim would).
"""
from __future__ import annotations

import time

import pymongo
import pytest
from aiosmtpd.controller import Controller

from fhir_dmp.runtime.embedded_db import free_port
from tests import builders as b
from tests.faults.process_kit import (MixedLoad, SlowSink, assert_nothing_lost, assert_notices_sent_once, back_within,
                                      kill_database, kill_worker, open_dmps, own_database, verified, worker_pids)

LOAD_S = 3          # of load before the kill, and again after the restart


@pytest.fixture
def rig(tmp_path, serve):
    """``(env, database, sink, started)``: the settings of a server on a database of the test's
    own with the slow relay; servers in ``started`` are stopped before the database."""
    database = own_database(tmp_path / "own-db")
    sink = SlowSink(0.3)
    relay = Controller(sink, hostname="127.0.0.1", port=free_port())
    relay.start()
    env = {"FHIR_DMP_MONGODB_URI": database.uri, "FHIR_DMP_DB": "kills", "FHIR_DMP_DB_WAIT": "2",
           "FHIR_DMP_SMTP_HOST": "127.0.0.1", "FHIR_DMP_SMTP_PORT": str(relay.port)}
    started = []
    yield env, database, sink, started
    for server in started:
        server.stop()
    relay.stop()
    database.stop()


@pytest.mark.parametrize("victim", ["worker", "serve", "database"])
def test_sigkill_under_load_loses_nothing_and_notices_go_once(victim, rig, serve, idp, fhir_dmp_cli):
    env, database, sink, started = rig
    started.append(serve("a", **env))
    dr = idp.ps(b.PS_DR)
    pids = open_dmps(started[0].url, dr, 3)
    load = MixedLoad(lambda: started[-1].url, idp, pids).start()
    time.sleep(LOAD_S)

    if victim == "worker":
        master = started[0].proc.pid
        killed = kill_worker(master)
        deadline = time.monotonic() + 20            # granian respawns it
        while len([p for p in worker_pids(master) if p != killed]) < 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
    elif victim == "serve":
        started[0].kill()
        started.append(serve("b", **env))
    else:
        kill_database(database)
        time.sleep(1)
        database.start()
    back = back_within(f"{started[-1].url}/Patient/{pids[0]}", dr, timeout=20)
    time.sleep(LOAD_S)
    load.stop()
    if victim == "database":
        assert back < 5, f"served again {back:.1f} s after the database's return"

    url = started[-1].url
    assert_nothing_lost(load, url, idp)
    out = verified(fhir_dmp_cli, env, timeout=20)
    assert "audit chains intact" in out, out
    with pymongo.MongoClient(database.uri, tz_aware=True) as client:
        notices = assert_notices_sent_once(client["kills"], sink)
    assert notices["notices"] >= 2, notices
    print(victim, load.statuses(), f"cut {len(load.cut)}", notices, f"back after {back:.1f} s")
