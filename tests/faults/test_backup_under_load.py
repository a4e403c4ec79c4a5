"""``fhir-dmp backup`` while deposits run (CONTRACT.md "Faults, failover and backups").

Real parts: ``fhir-dmp serve`` (2 workers) under mixed load on the test's database, the
``fhir-dmp backup`` / ``restore`` / ``audit verify`` CLI as processes, a second ``serve`` on the
restored database. The backup is one instant of the database: every document in it was
acknowledged, every document acknowledged before the backup started is in it, each with its
version history and the AuditEvent of its deposit; the restored server serves them byte for byte
(resource and content), a DMP destroyed after the backup stays destroyed (the register outside
the database), and the restored journal verifies.
"""
from __future__ import annotations

import time
import uuid

import pytest

from tests import builders as b
from tests.faults.process_kit import MixedLoad, call, journal_request_ids, open_dmps, search_all, verified


@pytest.fixture
def target(mongo_client):
    """An empty database to restore into, dropped at the end: after the servers on it have stopped
    (a test names it before ``serve``, so that it is torn down after): SecantusDB's dropDatabase
    run while a server's sealer still works on that database can spin for ever."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    mongo_client.drop_database(name)


def test_backup_under_deposits_is_one_instant_and_restores_byte_for_byte(tmp_path, target, serve, idp, fhir_dmp_cli):
    shared = {"FHIR_DMP_DESTROYED_REGISTER": str(tmp_path / "destroyed.log")}   # one deployment
    source = serve("a", **shared)
    dr = idp.ps(b.PS_DR)
    pids = open_dmps(source.url, dr, 3)
    load = MixedLoad(lambda: source.url, idp, pids).start()
    try:
        time.sleep(2)
        before = set(load.acked)
        r = fhir_dmp_cli("backup", str(tmp_path / "backup"), **shared)
        after = set(load.acked)
        time.sleep(1)
    finally:
        load.stop()
    assert r.returncode == 0, r.stderr
    assert set(load.statuses()) <= {200, 201}, load.statuses()
    assert len(after - before) >= 3, "no deposit ran during the backup"
    gone, kept = pids[0], pids[1:]
    assert call("POST", f"{source.url}/Patient/{gone}/$destroy", idp.patient(gone)).status_code == 204

    r = fhir_dmp_cli("restore", str(tmp_path / "backup"), FHIR_DMP_DB=target, **shared)
    assert r.returncode == 0, r.stderr
    restored = serve("r", FHIR_DMP_DB=target, **shared)
    out = verified(fhir_dmp_cli, {"FHIR_DMP_DB": target, **shared}, timeout=20)
    assert "audit chains intact" in out, out

    assert call("GET", f"{restored.url}/Patient/{gone}", dr).status_code == 404
    in_backup = set()
    for pid in kept:
        docs = {d["id"]: d for d in search_all(restored.url, dr, f"DocumentReference?patient={pid}&_count=200")}
        in_backup |= set(docs)
        journal = journal_request_ids(restored.url, idp.patient(pid), pid)
        for doc_id, doc in docs.items():
            assert doc_id in after, f"{doc_id} is in the backup but was never acknowledged"
            assert doc == call("GET", f"{source.url}/DocumentReference/{doc_id}", dr).json()
            binary = doc["content"][0]["attachment"]["url"].split("/")[-1]
            r = call("GET", f"{restored.url}/Binary/{binary}", dr, headers={"Accept": "application/pdf"})
            assert r.status_code == 200 and r.content == load.acked[doc_id][1]
            history = call("GET", f"{restored.url}/DocumentReference/{doc_id}/_history", dr).json()
            assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [doc["meta"]["versionId"]]
            assert load.created_by[doc_id] in journal, f"{doc_id} is in the backup without its AuditEvent"
    assert {d for d in before if load.acked[d][0] in kept} <= in_backup
    for doc_id, (pid, _) in load.acked.items():
        if pid == gone:
            assert call("GET", f"{restored.url}/DocumentReference/{doc_id}", dr).status_code == 404
