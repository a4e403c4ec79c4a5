"""The directory of professionals (CONTRACT.md "The directory of professionals"): Practitioner and
PractitionerRole imported by ``fhir-dmp load``, read and searched by every authenticated caller,
never written over REST, their reads journaled in the system journal."""
import pytest

from tests import builders as b


@pytest.fixture
def directory(api, config, tmp_path):
    """The sample directory loaded as the administrator's import loads it."""
    assert b.load_directory(config, tmp_path) == 2 * len(b.DIRECTORY)
    return api


def _ids(bundle, rtype=None):
    return sorted(e["resource"]["id"] for e in bundle.get("entry", [])
                  if rtype is None or e["resource"]["resourceType"] == rtype)


def test_every_caller_reads_the_directory(directory):
    pat = directory.as_ps().create(b.patient())
    for caller in (directory.as_ps(b.PS_PHARMA, profession="21"), directory.as_patient(pat["id"]),
                   directory.as_admin(), directory.as_regulation()):
        r = caller.get(f"Practitioner/ps-{b.PS_DR}")
        assert r.status_code == 200, r.json
        assert r.json["name"][0]["family"] == "Dupont"
        assert caller.get(f"PractitionerRole/role-{b.PS_DR}").json["practitioner"]["reference"] == \
            f"Practitioner/ps-{b.PS_DR}"
        assert caller.get(f"Practitioner/ps-{b.PS_DR}/_history/1").status_code == 200
    assert directory.anonymous().get(f"Practitioner/ps-{b.PS_DR}").status_code == 401
    assert directory.anonymous().get("Practitioner?name=dupont").status_code == 401


def test_search_by_each_parameter(directory):
    ps = directory.as_ps(b.PS_OTHER)
    assert _ids(ps.search(f"Practitioner?identifier={b.IDNATPS}|{b.PS_DR}")) == [f"ps-{b.PS_DR}"]
    assert _ids(ps.search(f"Practitioner?identifier={b.PS_OTHER}")) == [f"ps-{b.PS_OTHER}"]
    assert _ids(ps.search("Practitioner?name=dup")) == [f"ps-{b.PS_DR}"]
    assert _ids(ps.search("Practitioner?name=jeanne")) == [f"ps-{b.PS_DR}"]
    assert _ids(ps.search("Practitioner?family=Durand")) == [f"ps-{b.PS_OTHER}"]
    assert _ids(ps.search("Practitioner?given=lucie")) == [f"ps-{b.PS_PHARMA}"]
    assert _ids(ps.search("Practitioner?address-city=lyon")) == [f"ps-{b.PS_DR}", f"ps-{b.PS_PHARMA}"]
    assert _ids(ps.search("Practitioner?address-city=lyon&name=bern")) == [f"ps-{b.PS_PHARMA}"]
    # speciality and town: the roles of a speciality, with their Practitioners
    found = ps.search(f"PractitionerRole?specialty={b.SPECIALTY}|SM54&_include=PractitionerRole:practitioner")
    assert _ids(found, "PractitionerRole") == [f"role-{b.PS_DR}", f"role-{b.PS_SAMU}"]
    assert _ids(found, "Practitioner") == [f"ps-{b.PS_DR}", f"ps-{b.PS_SAMU}"]
    assert _ids(ps.search("PractitionerRole?role=21")) == [f"role-{b.PS_PHARMA}"]
    assert _ids(ps.search(f"PractitionerRole?practitioner=Practitioner/ps-{b.PS_OTHER}")) == [f"role-{b.PS_OTHER}"]
    # a town, then the professionals' roles
    town = ps.search("Practitioner?address-city=Marseille&_revinclude=PractitionerRole:practitioner")
    assert _ids(town) == [f"ps-{b.PS_SAMU}", f"role-{b.PS_SAMU}"]


def test_rest_writes_are_refused_with_allow(directory):
    admin = directory.as_admin()
    for rtype, res in (("Practitioner", b.practitioner(b.PS_DR)), ("PractitionerRole", b.practitioner_role(b.PS_DR))):
        for r in (admin.post(rtype, {k: v for k, v in res.items() if k != "id"}),
                  admin.put(f"{rtype}/{res['id']}", res),
                  admin.patch(f"{rtype}/{res['id']}", [{"op": "replace", "path": "/active", "value": False}]),
                  admin.delete(f"{rtype}/{res['id']}")):
            assert r.status_code == 405, (rtype, r.status_code, r.json)
            assert r.headers["Allow"] == "GET, HEAD, OPTIONS"
            assert r.json["resourceType"] == "OperationOutcome"
    tx = admin.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": b.practitioner(b.PS_DR), "request": {"method": "PUT", "url": f"Practitioner/ps-{b.PS_DR}"}}]})
    assert tx.status_code == 405
    assert admin.get(f"Practitioner/ps-{b.PS_DR}").json["meta"]["versionId"] == "1"


def test_reads_are_journaled_in_the_system_journal(directory, db):
    ps = directory.as_ps(b.PS_OTHER)
    ps.get(f"Practitioner/ps-{b.PS_DR}")
    ps.search("Practitioner?name=dupont")
    entries = [e for e in b.journal_entries(db, {"pid": None})
               if any((x.get("what") or {}).get("reference", "").startswith("Practitioner")
                      for x in e["res"].get("entity") or ())]
    assert entries, "the directory reads are journaled"
    agents = {a["who"].get("identifier", {}).get("value") for e in entries for a in e["res"]["agent"]}
    assert b.PS_OTHER in agents


def test_load_validates_directory_entries(api, config, tmp_path):
    import json

    from fhir_dmp.http.errors import FhirError
    from fhir_dmp.runtime.loader import load_files
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(dict(b.practitioner(b.PS_DR), birthDate="hier")) + "\n")
    with pytest.raises(FhirError) as caught:
        load_files(config, [bad], type("P", (), {"update": lambda self, n: None})())
    assert "bad.ndjson:1" in caught.value.diagnostics
    assert api.as_admin().get(f"Practitioner/ps-{b.PS_DR}").status_code == 404


def test_notices_say_whom_they_are_about(directory, smtp):
    """A notice names the professional by the token's family_name/given_name and says whom it is
    about (``Communication.about``: the idNatPs), which the portal looks up in the directory."""
    pid = directory.as_ps().create(b.patient(email="claire@example.org"))["id"]
    btg = directory.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="urgence vitale",
                          family_name="Durand", given_name="Paul")
    assert btg.get(f"Patient/{pid}").status_code == 200
    comms = directory.as_patient(pid).search(f"Communication?subject=Patient/{pid}")["entry"]
    glass = next(e["resource"] for e in comms if e["resource"]["topic"]["coding"][0]["code"] == "break_glass")
    assert "Paul Durand (Médecin)" in glass["payload"][0]["contentString"]
    assert glass["about"] == [{"identifier": {"system": b.IDNATPS, "value": b.PS_OTHER}, "display": "Paul Durand"}]
    first = next(e["resource"] for e in comms if e["resource"]["topic"]["coding"][0]["code"] == "first_access")
    assert first["about"] == [{"identifier": {"system": b.IDNATPS, "value": b.PS_DR}}]   # a token without names
