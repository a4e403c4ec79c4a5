"""End-to-end smoke: a PS opens a DMP, deposits a document, the patient reads it."""
from tests import builders as b


def test_open_dmp_deposit_and_read(api):
    ps = api.as_ps()
    pat = ps.create(b.patient(email=None))
    pid = pat["id"]
    doc = ps.create(b.docref(pid))
    assert doc["content"][0]["attachment"]["url"].startswith("Binary/")
    me = api.as_patient(pid)
    r = me.get(f"DocumentReference/{doc['id']}")
    assert r.status_code == 200, r.json
    bundle = me.search(f"DocumentReference?patient={pid}")
    assert bundle["total"] == 1
    other = api.as_ps(b.PS_OTHER)
    r = other.get(f"DocumentReference/{doc['id']}")
    assert r.status_code == 404
