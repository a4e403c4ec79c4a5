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


def test_fhirpy_count_is_what_the_caller_may_see(live, idp):
    """Issue 18 hole 4: ``count()`` sends ``_count=0``; the answer is a searchset with ``total`` and
    no match, counting only what the caller may see (CONTRACT.md "REST behaviour")."""
    def client(token):
        return SyncFHIRClient(live, authorization=f"Bearer {token}",
                              extra_headers={"Accept": "application/fhir+json"})
    author = client(idp.ps(b.PS_DR))
    patient = author.resource("Patient", **b.patient())
    patient.save()
    for code in (b.CONSULTATION, b.LAB):
        author.resource("DocumentReference", **b.docref(patient["id"], code)).save()
    assert author.resources("DocumentReference").search(patient=patient["id"]).count() == 2
    assert client(idp.ps(b.PS_OTHER)).resources("DocumentReference").search(patient=patient["id"]).count() == 0
    raw = author.execute("DocumentReference", method="get", params={"patient": patient["id"], "_count": 0})
    assert raw["total"] == 2 and not [e for e in raw.get("entry", []) if e["search"]["mode"] == "match"]
