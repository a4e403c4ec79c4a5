"""Drive a live server (real HTTP on a loopback port) with a real FHIR client library (fhirpy)."""
from fhirpy import SyncFHIRClient

from tests import builders as b


def test_fhirpy_create_search_page_update(live, idp):
    token = idp.ps(b.PS_DR)
    client = SyncFHIRClient(live, authorization=f"Bearer {token}", extra_headers={"Accept": "application/fhir+json"})
    ins = b.nir()
    patient = client.resource("Patient", **b.patient(ins))
    patient.save()
    assert patient["id"]
    found = client.resources("Patient").search(identifier=f"{b.NIR}|{ins}").fetch()
    assert [p["id"] for p in found] == [patient["id"]]
    for code in (b.CONSULTATION, b.LAB, b.IMAGING):
        client.resource("DocumentReference", **b.docref(patient["id"], code)).save()
    docs = client.resources("DocumentReference").search(patient=patient["id"]).limit(1).fetch_all()
    assert len(docs) == 3                       # fhirpy followed the next links page by page
    patient["gender"] = "other"
    patient.save()
    assert client.reference("Patient", patient["id"]).to_resource()["gender"] == "other"
