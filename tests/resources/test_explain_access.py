"""``GET Patient/{id}/$explain-access`` over HTTP (issue 20, CONTRACT.md "Privacy operations")."""
from __future__ import annotations

from fhir_dmp.security.decision.basis import BASIS_EXTENSION, BASIS_SYSTEM
from tests import builders as b
from tests.builders import journal_entries

PS = "urn:oid:1.2.250.1.71.4.2.1"
FINESS = "urn:oid:1.2.250.1.71.4.2.2"


def explain(caller, pid, query):
    r = caller.get(f"Patient/{pid}/$explain-access?{query}")
    return r.status_code, r.json


def params(body) -> dict:
    out: dict = {}
    for p in body["parameter"]:
        value = next(v for k, v in p.items() if k.startswith("value"))
        out.setdefault(p["name"], []).append(value)
    return out


def test_explain_access_answers_what_a_real_request_gets(api, dmp, db):
    pid = dmp["pid"]
    me = api.as_patient(pid)
    status, body = explain(me, pid, f"actor={PS}|{b.PS_DR}")
    assert status == 200 and body["resourceType"] == "Parameters"
    got = params(body)
    assert got["decision"] == ["permit"] and got["documents"] == [2]
    assert got["basis"][0]["system"] == BASIS_SYSTEM and got["basis"][0]["code"] == "authorized"
    [consent] = got["consent"]
    assert consent["reference"].startswith("Consent/") and "/_history/1" in consent["reference"]
    assert "autorisé par le patient" in got["text"][0] and "2 documents" in got["text"][0]
    # the same actor, really: what it is served
    assert api.as_ps(b.PS_DR).search(f"DocumentReference?patient={pid}&_total=accurate")["total"] == 2

    got = params(explain(me, pid, f"actor={PS}|{b.PS_OTHER}")[1])
    assert got["decision"] == ["deny"] and got["basis"][0]["code"] == "not-authorized" and got["documents"] == [0]
    assert "refusé" in got["text"][0].lower()
    # break-glass and centre 15 as if asked now; a pharmacist sees fewer types
    got = params(explain(me, pid, f"actor={PS}|{b.PS_OTHER}&purpose=BTG")[1])
    assert (got["decision"], got["basis"][0]["code"], got["documents"]) == (["permit"], "break-glass", [2])
    got = params(explain(me, pid, f"actor={PS}|{b.PS_SAMU}&purpose=ETREAT")[1])
    assert (got["decision"], got["basis"][0]["code"]) == (["permit"], "centre-15")
    me.create(b.consent(pid, "permit", actor=b.PS_PHARMA))
    got = params(explain(me, pid, f"actor={PS}|{b.PS_PHARMA}&profession=21")[1])
    served = api.as_ps(b.PS_PHARMA, profession="21").search(f"DocumentReference?patient={pid}&_total=accurate")
    assert got["decision"] == ["permit"] and got["documents"] == [served["total"]]
    got = params(explain(me, pid, f"actor={PS}|{b.PS_PHARMA}&profession=99")[1])
    assert got["basis"][0]["code"] == "excluded-profession"
    # an establishment (AIR mode)
    got = params(explain(me, pid, f"actor={FINESS}|750000001")[1])
    assert got["basis"][0]["code"] == "not-authorized"

    # the administrator and a representative may ask; a professional, another patient: as missing
    assert explain(api.as_admin(), pid, f"actor={PS}|{b.PS_DR}")[0] == 200
    rp = me.create(b.related_person(pid))
    assert explain(api.as_legal_rep(rp["id"]), pid, f"actor={PS}|{b.PS_DR}")[0] == 200
    missing = api.as_ps(b.PS_DR).get("Patient/nope")
    status, body = explain(api.as_ps(b.PS_DR), pid, f"actor={PS}|{b.PS_DR}")
    assert status == 404 == missing.status_code and body["issue"][0]["code"] == missing.json["issue"][0]["code"]
    other = api.as_ps(b.PS_DR).create(b.patient())
    assert explain(api.as_patient(other["id"]), pid, f"actor={PS}|{b.PS_DR}")[0] == 404
    # bad parameters: 400
    assert explain(me, pid, "actor=810000000001")[0] == 400
    assert explain(me, pid, f"actor={PS}|{b.PS_DR}&purpose=HELLO")[0] == 400

    # journaled like a read, with its basis
    asked = [d["res"] for d in journal_entries(db) if d["res"]["subtype"][0]["code"] == "operation"]
    ok = [e for e in asked if e["outcome"] == "0"]
    assert ok and all(e["extension"][0]["url"] == BASIS_EXTENSION for e in asked)
    assert {e["extension"][0]["valueCoding"]["code"] for e in ok} == {"patient", "admin", "representative"}
    assert any(e["outcome"] == "4" for e in asked)
