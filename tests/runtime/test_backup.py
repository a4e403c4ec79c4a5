"""``fhir-dmp backup`` / ``fhir-dmp restore`` (CONTRACT.md "Faults, failover and backups").

Real parts: DMPs with documents written through the API (the app on the test's database), the
``fhir-dmp`` CLI as a process on the session's SecantusDB, a second database as the restore
target, and a second app on it that serves the restored documents.
"""
from __future__ import annotations

import json
import shutil
import uuid

import pytest

from fhir_dmp.http.app import create_app
from fhir_dmp.runtime.services import stop_background
from tests import builders as b
from tests.api import Api


def binary_id(doc: dict) -> str:
    return doc["content"][0]["attachment"]["url"].split("/")[-1]


@pytest.fixture
def target(mongo_client):
    """An empty database to restore into, dropped at the end."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    mongo_client.drop_database(name)


def test_backup_restore_drill(tmp_path, api, config, fhir_dmp_cli, mongo_client, idp, target):
    # the CLI uses the app's key files and destroyed register (one deployment)
    keys = {"FHIR_DMP_AUDIT_KEY_FILE": str(config.audit_key_path), "FHIR_DMP_KEK_FILE": str(config.kek_path),
            "FHIR_DMP_DESTROYED_REGISTER": str(config.destroyed_register_path)}
    dr = api.as_ps(b.PS_DR)
    kept, gone = (dr.create(b.patient())["id"] for _ in range(2))
    contents = {}
    for pid in (kept, gone):
        for text in ("Compte rendu", "Bilan"):
            doc = dr.create(b.docref(pid, content=b.pdf_bytes(f"{text} {pid}")))
            contents[doc["id"]] = (pid, doc, b.pdf_bytes(f"{text} {pid}"))
    assert fhir_dmp_cli("audit", "seal", **keys).returncode == 0

    backup = tmp_path / "backup"
    r = fhir_dmp_cli("backup", str(backup), **keys)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["collections"]["DocumentReference"]["count"] == 4
    assert {"datakeys", "AuditEvent", "AuditEvent_checkpoint", "Patient_history"} <= set(manifest["collections"])
    assert manifest["server_version"] and manifest["time"]
    assert not any(p.name in (config.kek_path.name, config.audit_key_path.name) for p in backup.iterdir())

    # destroyed after the backup: the register outside the database says so
    assert api.as_patient(gone).post(f"Patient/{gone}/$destroy").status_code == 204
    assert gone in config.destroyed_register_path.read_text()

    # refused: a non-empty target, a damaged backup (nothing written to the target)
    r = fhir_dmp_cli("restore", str(backup), **keys)
    assert r.returncode != 0 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    blob = damaged / "DocumentReference.bson"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = fhir_dmp_cli("restore", str(damaged), FHIR_DMP_DB=target, **keys)
    assert r.returncode != 0 and "damaged backup" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert mongo_client[target].list_collection_names() == []

    r = fhir_dmp_cli("restore", str(backup), FHIR_DMP_DB=target, **keys)
    assert r.returncode == 0, r.stderr
    assert "1 DMP(s) destroyed since then purged again" in r.stdout
    r = fhir_dmp_cli("audit", "verify", FHIR_DMP_DB=target, **keys)
    assert r.returncode == 0, r.stdout + r.stderr

    restored = create_app(config.with_(db_name=target), client=mongo_client, db=mongo_client[target])
    try:
        ps = Api(restored, idp).as_ps(b.PS_DR)
        for doc_id, (pid, doc, content) in contents.items():
            if pid == gone:
                assert ps.get(f"DocumentReference/{doc_id}").status_code == 404
                continue
            assert ps.get(f"DocumentReference/{doc_id}").json == dr.get(f"DocumentReference/{doc_id}").json
            r = ps.get(f"Binary/{binary_id(doc)}", headers={"Accept": "application/pdf"})
            assert r.status_code == 200 and r.data == content
        assert ps.get(f"Patient/{gone}").status_code == 404
        assert ps.get(f"Patient/{kept}").status_code == 200
    finally:
        stop_background(restored)
