"""``fhir-dmp load``: Bundle and NDJSON import through the guarded repository, as a real subprocess."""
import json
import os
import subprocess
import sys

from tests import builders as b


def run_cli(args, config, mongo_server, db):
    env = dict(os.environ, FHIR_DMP_MONGODB_URI=mongo_server.uri, FHIR_DMP_DB=db.name,
               FHIR_DMP_DATA_DIR=str(config.data_dir))
    return subprocess.run([sys.executable, "-m", "fhir_dmp.runtime.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_load_bundle_and_ndjson(tmp_path, config, mongo_server, db):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": dict(b.patient(), id="loaded-1")}, {"resource": b.patient()}]}
    (tmp_path / "patients.json").write_text(json.dumps(bundle))
    (tmp_path / "more.ndjson").write_text("\n".join(json.dumps(b.patient()) for _ in range(3)) + "\n")
    r = run_cli(["load", str(tmp_path / "patients.json"), str(tmp_path / "more.ndjson")], config, mongo_server, db)
    assert r.returncode == 0, r.stderr
    assert "loaded 5 resources" in r.stderr + r.stdout
    assert db["Patient"].count_documents({"del": False}) == 5
    assert db["Patient"].find_one({"_id": "loaded-1"})
    assert len(b.journal_entries(db)) >= 5          # journaled like any write


def test_load_stops_at_bad_resource_with_its_location(tmp_path, config, mongo_server, db):
    lines = [json.dumps(b.patient()), json.dumps({"resourceType": "Patient", "gender": "dragon"})]
    (tmp_path / "bad.ndjson").write_text("\n".join(lines) + "\n")
    r = run_cli(["load", str(tmp_path / "bad.ndjson")], config, mongo_server, db)
    assert r.returncode != 0
    assert "bad.ndjson:2" in r.stderr and "Traceback" not in r.stderr
    assert db["Patient"].count_documents({}) == 1


def test_load_the_directory_of_professionals(tmp_path, config, mongo_server, db):
    """The national directory's FHIR export (here a small sample) is imported by ``fhir-dmp load``."""
    (tmp_path / "annuaire.json").write_text(json.dumps(b.directory_bundle()))
    r = run_cli(["load", str(tmp_path / "annuaire.json")], config, mongo_server, db)
    assert r.returncode == 0, r.stderr
    assert db["Practitioner"].count_documents({"del": False}) == len(b.DIRECTORY)
    assert db["PractitionerRole"].count_documents({"del": False}) == len(b.DIRECTORY)
    again = run_cli(["load", str(tmp_path / "annuaire.json")], config, mongo_server, db)
    assert again.returncode == 0, again.stderr          # a new export replaces the entries (version 2)
    assert db["Practitioner"].find_one({"_id": f"ps-{b.PS_DR}"})["vid"] == 2
