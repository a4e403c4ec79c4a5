"""Tests of fhir_dmp.search: parsing, filters, and the filters applied on a
real SecantusDB (started once for this module), sorting and keyset paging.

Spec: https://hl7.org/fhir/R4/search.html
"""
from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fhir_dmp.http.errors import BadRequest
from fhir_dmp.search import (SUPPORTED, Include, cursor_after, decode_cursor, decode_history_cursor,
                             encode_cursor, encode_history_cursor, extract, include_targets, index_specs, keyset_filter, parse_search,
                             patient_id_of, revinclude_filter)
from fhir_dmp.search.extract import values_of
from fhir_dmp.search.values import DATE_MAX, date_range, normalize

UTC = timezone.utc
FIXTURES = Path(__file__).parents[1] / "fixtures" / "r4"
BASE = "http://localhost/fhir"
NIR = "urn:oid:1.2.250.1.213.1.4.8"
RPPS = "urn:oid:1.2.250.1.71.4.2.1"
LOINC = "http://loinc.org"
CONF = "urn:oid:1.2.250.1.213.1.1.4.13"


# =========================================================================== data

def _meta(ts: str) -> dict:
    return {"versionId": "1", "lastUpdated": ts}


PATIENTS = [
    {"resourceType": "Patient", "id": "p-eloise", "meta": _meta("2024-01-01T10:00:00.000Z"),
     "identifier": [{"system": NIR, "value": "280051234567890", "type": {"text": "INS-NIR"}}],
     "name": [{"family": "Dupont", "given": ["Éloïse"]}], "gender": "female",
     "birthDate": "1980-05-12", "active": True,
     "generalPractitioner": [{"identifier": {"system": RPPS, "value": "810001234567"}}]},
    {"resourceType": "Patient", "id": "p-jean", "meta": _meta("2024-01-02T10:00:00.000Z"),
     "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "175012B12345678"}],
     "name": [{"family": "Dupond", "given": ["Jean", "Pierre"]}], "gender": "male",
     "birthDate": "1975", "active": False,
     "generalPractitioner": [{"reference": "Practitioner/pr1"}]},
    {"resourceType": "Patient", "id": "p-noname", "meta": _meta("2024-01-03T10:00:00.000Z"),
     "identifier": [{"value": "X-1"}], "gender": "unknown"},
]
MINE_P = "p-eloise,p-jean,p-noname"

DOCS = [
    {"resourceType": "DocumentReference", "id": "d1", "meta": _meta("2024-03-10T09:00:00.000Z"),
     "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4.1"},
     "identifier": [{"system": "urn:x", "value": "ID-1"}],
     "status": "current", "subject": {"reference": "Patient/p-eloise"},
     "type": {"coding": [{"system": LOINC, "code": "11488-4", "display": "Consultation note"}]},
     "category": [{"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.1", "code": "10",
                               "display": "Compte rendu"}]}],
     "date": "2024-03-10T10:00:00+01:00", "author": [{"reference": "Practitioner/pr1"}],
     "securityLabel": [{"coding": [{"system": CONF, "code": "MASQUE_PS"}]}],
     "content": [{"attachment": {"contentType": "application/pdf"},
                  "format": {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                             "code": "urn:ihe:iti:xds-sd:pdf:2008"}}]},
    {"resourceType": "DocumentReference", "id": "d2", "meta": _meta("2024-03-11T09:00:00.000Z"),
     "status": "superseded", "subject": {"reference": "Patient/p-jean"},
     "type": {"coding": [{"system": LOINC, "code": "11502-2"}]},
     "date": "2024-03-11T08:30:00Z",
     "author": [{"reference": "http://other.example/fhir/Practitioner/pr2"}],
     "content": [{"attachment": {"contentType": "text/xml"},
                  "format": {"code": "urn:ihe:iti:xds-sd:text:2008"}}]},
    {"resourceType": "DocumentReference", "id": "d3", "meta": _meta("2024-03-12T09:00:00.000Z"),
     "status": "current", "subject": {"reference": BASE + "/Patient/p-eloise"},
     "type": {"coding": [{"system": LOINC, "code": "11490-0"}]},
     "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/d1"}}],
     "author": [{"identifier": {"system": RPPS, "value": "810001234567"}}],
     "content": [{"attachment": {"contentType": "application/pdf"}}]},
    {"resourceType": "DocumentReference", "id": "d4", "meta": _meta("2024-03-13T09:00:00.000Z"),
     "status": "entered-in-error", "subject": {"reference": "Group/g1"},
     "date": "2024-02-01T00:00:00Z",
     "content": [{"attachment": {"contentType": "application/pdf"}}]},
]
MINE_D = "d1,d2,d3,d4"

CONSENTS = [
    {"resourceType": "Consent", "id": "c1", "meta": _meta("2024-02-01T11:00:00.000Z"),
     "status": "active",
     "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                           "code": "patient-privacy"}]},
     "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
     "patient": {"reference": "Patient/p-eloise"}, "dateTime": "2024-02-01T12:00:00+01:00",
     "provision": {"type": "permit",
                   "actor": [{"role": {"coding": [{"code": "PRCP"}]},
                              "reference": {"identifier": {"system": RPPS, "value": "810001234567"}}}],
                   "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                "code": "TREAT"}],
                   "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                           "code": "access"}]}]}},
    {"resourceType": "Consent", "id": "c2", "meta": _meta("2024-02-02T11:00:00.000Z"),
     "status": "inactive", "patient": {"reference": "Patient/p-jean"}, "dateTime": "2023-12-31",
     "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
     "provision": {"type": "deny",
                   "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                "code": "BTG"}]}},
]
MINE_C = "c1,c2"

AUDITS = [
    {"resourceType": "AuditEvent", "id": "a1", "meta": _meta("2024-04-01T08:00:01.000Z"),
     "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
     "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
     "action": "R", "recorded": "2024-04-01T08:00:00Z", "outcome": "0",
     "agent": [{"who": {"identifier": {"system": RPPS, "value": "810001234567"}}, "requestor": True},
               {"who": {"reference": "Device/app1"}, "requestor": False}],
     "source": {"observer": {"display": "fhir-dmp"}},
     "entity": [{"what": {"reference": "Patient/p-eloise"}},
                {"what": {"reference": "DocumentReference/d1"}}]},
    {"resourceType": "AuditEvent", "id": "a2", "meta": _meta("2024-04-02T08:00:01.000Z"),
     "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
     "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "search"}],
     "action": "E", "recorded": "2024-04-02T08:00:00.500Z", "outcome": "4",
     "agent": [{"who": {"reference": "Patient/p-jean"}, "requestor": True}],
     "source": {"observer": {"display": "fhir-dmp"}},
     "entity": [{"what": {"reference": "Patient/p-jean"}}]},
]
MINE_A = "a1,a2"

COMMS = [
    {"resourceType": "Communication", "id": "m1", "meta": _meta("2024-05-01T10:00:01.000Z"),
     "status": "completed", "subject": {"reference": "Patient/p-eloise"},
     "sent": "2024-05-01T10:00:00Z",
     "category": [{"coding": [{"system": "urn:x:dmp-notification", "code": "first-access"}]}]},
    {"resourceType": "Communication", "id": "m2", "meta": _meta("2024-05-02T10:00:01.000Z"),
     "status": "not-done", "subject": {"reference": "Patient/p-jean"},
     "category": [{"coding": [{"system": "urn:x:dmp-notification", "code": "break-glass"}]}]},
]


def _fixtures(rtype: str) -> list[dict]:
    out = []
    for f in sorted(FIXTURES.glob(f"{rtype}-*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        r.setdefault("meta", {})["lastUpdated"] = "2023-06-01T00:00:00.000Z"
        out.append(r)
    return out


def stored(rtype: str, resource: dict) -> dict:
    """A document shaped like fhir_dmp.storage's (see /tmp/storage_layout.md)."""
    s, o = extract(rtype, resource, base_url=BASE)
    return {"_id": resource["id"], "pid": patient_id_of(rtype, resource, base_url=BASE), "vid": 1,
            "lu": datetime.fromisoformat(resource["meta"]["lastUpdated"]), "del": False,
            "res": resource, "s": s, "o": o}


# =========================================================================== database

@pytest.fixture(scope="module")
def db(mongo_client):
    """A database of the session's SecantusDB (tests/conftest.py), seeded once for this module."""
    client = mongo_client
    name = f"search_test_{os.getpid()}"
    try:
        client.drop_database(name)
        database = client[name]
        data = {"Patient": _fixtures("Patient") + PATIENTS,
                "DocumentReference": _fixtures("DocumentReference") + DOCS,
                "Consent": _fixtures("Consent") + CONSENTS,
                "AuditEvent": _fixtures("AuditEvent") + AUDITS,
                "Communication": COMMS}
        for rtype, resources in data.items():
            col = database[rtype]
            for keys in index_specs(rtype):
                col.create_index(keys)
            col.insert_many([stored(rtype, r) for r in resources])
        yield database
    finally:
        client.drop_database(name)


def find_ids(db, rtype: str, params: list[tuple[str, str]], **kw) -> list[str]:
    req = parse_search(rtype, params, **kw)
    flt = {"$and": [req.mongo_filter(), {"del": False}]}
    return [d["_id"] for d in db[rtype].find(flt, {"_id": 1}).sort(req.mongo_sort())]


def q(s: str) -> list[tuple[str, str]]:
    """'a=1&b:x=2' -> [(a, 1), (b:x, 2)] (no URL decoding: tests write raw values)."""
    return [tuple(p.split("=", 1)) for p in s.split("&")] if s else []


# =========================================================================== registry / extraction

def test_supported_parameters_and_types():
    expect = {
        "Patient": {"identifier": "token", "name": "string", "family": "string", "given": "string",
                    "birthdate": "date", "gender": "token", "active": "token",
                    "general-practitioner": "reference"},
        "DocumentReference": {"patient": "reference", "subject": "reference", "identifier": "token",
                              "type": "token", "category": "token", "date": "date", "status": "token",
                              "author": "reference", "security-label": "token",
                              "relatesto": "reference", "format": "token", "contenttype": "token"},
        "Consent": {"patient": "reference", "status": "token", "category": "token",
                    "actor": "reference", "purpose": "token", "action": "token", "date": "date",
                    "scope": "token"},
        "AuditEvent": {"patient": "reference", "entity": "reference", "agent": "reference",
                       "date": "date", "type": "token", "subtype": "token", "action": "token",
                       "outcome": "token", "purpose": "token"},
        "Communication": {"subject": "reference", "patient": "reference", "status": "token",
                          "sent": "date", "category": "token"},
        "Binary": {},
    }
    for rtype, params in expect.items():
        got = {n: p.type for n, p in SUPPORTED[rtype].items()}
        assert got == {"_id": "token", "_lastUpdated": "date", **params}
    assert SUPPORTED["Consent"]["date"].expression == "Consent.dateTime"
    assert SUPPORTED["DocumentReference"]["identifier"].expression == \
        "DocumentReference.masterIdentifier | DocumentReference.identifier"
    assert SUPPORTED["Communication"]["patient"].paths[0].resolve_is == "Patient"


def test_searchparameter_bundle_is_standard_form():
    bundle = json.loads((Path(__file__).parents[2] / "fhir_dmp" / "data" /
                         "searchparameters.json").read_text(encoding="utf-8"))
    assert bundle["resourceType"] == "Bundle"
    for e in bundle["entry"]:
        sp = e["resource"]
        assert sp["resourceType"] == "SearchParameter"
        assert {"url", "name", "status", "code", "base", "type", "expression", "description"} <= set(sp)
        assert e["fullUrl"] == sp["url"]


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_paths_agree_with_fhirpath(path):
    """Our compiled paths select what the FHIRPath expression selects
    (resolve() excepted: fhirpathpy cannot resolve without a server)."""
    from fhirpathpy import evaluate
    resource = json.loads(path.read_text(encoding="utf-8"))
    rtype = resource["resourceType"]
    if rtype not in SUPPORTED:
        pytest.skip("not hosted")
    for name, param in SUPPORTED[rtype].items():
        if any(p.resolve_is for p in param.paths):
            continue
        expr = param.expression.replace("Resource.", rtype + ".")
        expected = evaluate(resource, expr)
        got = values_of(param, resource, rtype)
        assert json.dumps(got, sort_keys=True, default=str) == \
            json.dumps(expected, sort_keys=True, default=str), name


def test_extract_shapes():
    s, o = extract("Patient", PATIENTS[0])
    assert s["identifier"] == [{"s": NIR, "c": "280051234567890"}]
    assert s["identifier:text"] == ["ins-nir"]
    assert {"n": "eloise", "v": "Éloïse"} in s["name"] and {"n": "dupont", "v": "Dupont"} in s["name"]
    assert s["active"] == [{"c": "true"}]
    assert s["birthdate"] == [{"lo": datetime(1980, 5, 12, tzinfo=UTC),
                               "hi": datetime(1980, 5, 13, tzinfo=UTC)}]
    assert s["general-practitioner"] == [{"is": RPPS, "iv": "810001234567"}]
    assert "_id" not in s and "_id" not in o
    assert o["name"] == o["name~d"] == "dupont eloise"
    # sort keys always present, sentinels for missing elements
    s3, o3 = extract("Patient", PATIENTS[2])
    assert "birthdate" not in s3 and o3["birthdate"] == DATE_MAX and o3["given"] == "\U0010ffff"
    assert o3["given~d"] == ""
    # absolute reference under our base is stored relative, foreign ones kept
    s, _ = extract("DocumentReference", DOCS[2], base_url=BASE)
    assert s["patient"] == [{"r": "Patient/p-eloise", "t": "Patient", "i": "p-eloise"}]
    s, _ = extract("DocumentReference", DOCS[1])
    assert s["author"] == [{"r": "http://other.example/fhir/Practitioner/pr2",
                            "t": "Practitioner", "i": "pr2"}]
    s, _ = extract("DocumentReference", {"resourceType": "DocumentReference", "id": "x",
                                         "date": "not a date"})
    assert "date" not in s


def test_extract_twice_gives_equal_fresh_indexes():
    """Issue 22: reference parsing and normalisation are memoized; the index of a second extraction
    equals the first, and changing one index leaves the next extraction untouched."""
    event = {"resourceType": "AuditEvent", "recorded": "2026-01-02T03:04:05Z",
             "type": {"system": "s", "code": "rest", "display": "Restful Opération"},
             "action": "R", "outcome": "0",
             "agent": [{"who": {"reference": "Patient/p1"}, "requestor": True},
                       {"who": {"identifier": {"system": RPPS, "value": "8100"}}, "requestor": False}],
             "entity": [{"what": {"reference": "Patient/p1"}},
                        {"what": {"reference": f"{BASE}/DocumentReference/d1/_history/2"}},
                        {"what": {"reference": "#local"}}]}
    first, order = extract("AuditEvent", event, base_url=BASE)
    assert first["patient"] == [{"r": "Patient/p1", "t": "Patient", "i": "p1"}]
    assert {"r": "DocumentReference/d1", "t": "DocumentReference", "i": "d1"} in first["entity"]
    assert first["type:text"] == ["restful operation"]
    first["patient"][0]["r"] = "changed"
    first["entity"][0]["t"] = "changed"
    again, order_again = extract("AuditEvent", event, base_url=BASE)
    assert again["patient"] == [{"r": "Patient/p1", "t": "Patient", "i": "p1"}]
    assert again["entity"][0]["t"] == "Patient" and order_again == order
    long = "É" + "x" * 300     # beyond the memoized length: the same answer, not cached
    assert normalize(long) == normalize(long) == "e" + "x" * 300
    ref = "Patient/" + "a" * 300
    assert extract("AuditEvent", {"resourceType": "AuditEvent", "entity": [{"what": {"reference": ref}}]}
                   )[0]["entity"] == [{"r": ref}]


def test_period_values_index_as_ranges():
    from fhir_dmp.search.extract import _date_entries
    d = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    assert _date_entries([{"start": "2020-01-01", "end": "2020-02"}]) == [
        {"lo": d(2020, 1, 1), "hi": d(2020, 3, 1)}]
    from fhir_dmp.search.values import DATE_MIN
    assert _date_entries([{"start": "2020-01-01T10:00:00+01:00"}]) == [
        {"lo": d(2020, 1, 1, 9), "hi": DATE_MAX}]
    assert _date_entries([{"end": "2020"}]) == [{"lo": DATE_MIN, "hi": d(2021, 1, 1)}]
    assert _date_entries([{"start": "bad"}]) == []


def test_extract_never_raises_on_odd_content():
    odd = {"resourceType": "Patient", "id": "odd", "name": "oops", "identifier": [None, 3, {}],
           "birthDate": 1980, "generalPractitioner": [{"reference": "#x"}, "junk"],
           "meta": {"lastUpdated": "garbage"}}
    s, o = extract("Patient", odd)
    assert "birthdate" not in s and "_lastUpdated" not in s and set(o)


def test_patient_id_of():
    assert patient_id_of("Patient", PATIENTS[0]) == "p-eloise"
    assert patient_id_of("DocumentReference", DOCS[0]) == "p-eloise"
    assert patient_id_of("DocumentReference", DOCS[2]) is None  # absolute, base unknown
    assert patient_id_of("DocumentReference", DOCS[2], base_url=BASE) == "p-eloise"
    assert patient_id_of("DocumentReference", DOCS[3]) is None  # Group
    assert patient_id_of("Consent", CONSENTS[1]) == "p-jean"
    assert patient_id_of("AuditEvent", AUDITS[0]) == "p-eloise"
    assert patient_id_of("AuditEvent", AUDITS[1]) == "p-jean"
    ae = {"resourceType": "AuditEvent", "agent": [{"who": {"reference": "Patient/agent-p"}}],
          "entity": [{"what": {"reference": "Patient/ent-p/_history/2"}}]}
    assert patient_id_of("AuditEvent", ae) == "ent-p"  # entity.what first
    assert patient_id_of("Communication", COMMS[1]) == "p-jean"
    assert patient_id_of("Binary", {"resourceType": "Binary", "id": "b"}) is None
    foreign = {"subject": {"reference": "http://evil.example/fhir/Patient/p-eloise"}}
    assert patient_id_of("DocumentReference", foreign, base_url=BASE) is None


def test_date_range_precision():
    d = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    assert date_range("2020") == (d(2020, 1, 1), d(2021, 1, 1))
    assert date_range("2020-02") == (d(2020, 2, 1), d(2020, 3, 1))
    assert date_range("2020-12") == (d(2020, 12, 1), d(2021, 1, 1))
    assert date_range("2020-03-04") == (d(2020, 3, 4), d(2020, 3, 5))
    assert date_range("2020-03-04T10:00:00+02:00") == (d(2020, 3, 4, 8), d(2020, 3, 4, 8, 0, 1))
    assert date_range("2020-03-04T10:00Z") == (d(2020, 3, 4, 10), d(2020, 3, 4, 10, 1))
    assert date_range("2020-03-04T10:00:00.25Z") == (d(2020, 3, 4, 10, 0, 0, 250000),
                                                    d(2020, 3, 4, 10, 0, 0, 251000))
    for bad in ("2021-02-29", "2020-13", "20200304", "0000", "2020-03-04T25:00:00Z", "", "tomorrow"):
        assert date_range(bad) is None, bad


def test_normalize():
    assert normalize("  ÉLOÏSE  Ñúñez ") == "eloise nunez"
    assert normalize("Straße") == "strasse"


# =========================================================================== parsing

@pytest.mark.parametrize("params", [
    "foo=1", "name:foo=x", "gender:exact=male", "birthdate:exact=2020", "_id:missing=true",
    "subject.name=x", "general-practitioner:Patient=1", "_count:x=1",
])
def test_unknown_parameter_or_modifier_is_bad_request(params):
    with pytest.raises(BadRequest) as exc:
        parse_search("Patient" if "subject" not in params else "DocumentReference", q(params))
    name = q(params)[0][0]
    assert exc.value.issues[0].expression == [name] or exc.value.issues[0].expression == [name.split(":")[0]]


def test_lenient_drops_unknown():
    req = parse_search("Patient", q("foo=1&name=x&bar:baz=2&name:nope=y"), lenient=True)
    assert req.ignored == ["foo", "bar:baz", "name:nope"]
    assert [c.key for c in req.criteria] == ["name"]
    with pytest.raises(BadRequest):  # malformed values are still errors
        parse_search("Patient", q("birthdate=yesterday"), lenient=True)


@pytest.mark.parametrize("params,name", [
    ("birthdate=2020-13-01", "birthdate"), ("birthdate=xx2020", "birthdate"),
    ("birthdate=", "birthdate"), ("active=yes", "active"), ("identifier=a|b|c", "identifier"),
    ("identifier=|", "identifier"), ("name=  ", "name"), ("_id=a/b", "_id"), ("_id=a|b", "_id"),
    ("general-practitioner=Patient/1", "general-practitioner"), ("gender:missing=maybe", "gender"),
    ("general-practitioner=Practitioner/bad id", "general-practitioner"),
    ("_count=-1", "_count"), ("_count=ten", "_count"), ("_count=1.5", "_count"),
    ("_total=some", "_total"), ("_summary=yes", "_summary"), ("_elements=a.b", "_elements"),
    ("_sort=foo", "_sort"), ("_sort=name,-name", "_sort"), ("_count=1&_count=2", "_count"),
    ("_include=*", "_include"), ("_include=DocumentReference:subject", "_include"),
    ("_include=Patient:name", "_include"), ("_revinclude=DocumentReference:relatesto", "_revinclude"),
    ("_include=Patient:general-practitioner:Patient", "_include"), ("name=a,", "name"),
])
def test_malformed_values(params, name):
    with pytest.raises(BadRequest) as exc:
        parse_search("Patient", q(params))
    assert exc.value.issues[0].expression == [name]
    assert exc.value.status == 400


def test_count_total_summary_elements():
    req = parse_search("Patient", [])
    assert (req.count, req.total, req.summary, req.elements) == (50, "accurate", None, None)
    assert req.sort == [("_lastUpdated", -1)]
    assert req.mongo_sort() == [("o._lastUpdated~d", -1), ("_id", 1)]
    assert parse_search("Patient", q("_count=0")).count == 0
    assert parse_search("Patient", q("_count=5000"), max_count=100).count == 100
    assert parse_search("Patient", [], default_count=10).count == 10
    req = parse_search("Patient", q("_total=none&_summary=count&_elements=Patient.name,identifier"))
    assert (req.total, req.summary, req.elements) == ("none", "count", ["name", "identifier"])
    for v in ("true", "data", "text", "false"):
        assert parse_search("Patient", [("_summary", v)]).summary == v


def test_passthrough_and_cursor_not_criteria():
    req = parse_search("Patient", q("_format=json&_pretty=true&_cursor=abc&name=x"))
    assert [c.name for c in req.criteria] == ["name"]
    assert req.cursor == "abc"
    assert req.self_params() == [("name", "x"), ("_count", "50"), ("_format", "json"),
                                 ("_pretty", "true")]


def test_self_params_normalised():
    req = parse_search("DocumentReference", q(
        "patient=Patient/p1&status:not=current,superseded&_sort=-date,status&_count=5"
        "&_include=DocumentReference:author&_revinclude:iterate=AuditEvent:entity&_total=none"))
    assert req.self_params() == [
        ("patient", "Patient/p1"), ("status:not", "current,superseded"),
        ("_include", "DocumentReference:author"), ("_revinclude:iterate", "AuditEvent:entity"),
        ("_sort", "-date,status"), ("_count", "5"), ("_total", "none")]


def test_includes():
    req = parse_search("DocumentReference", q(
        "_include=DocumentReference:subject&_include=DocumentReference:patient:Patient"
        "&_include=DocumentReference:author&_include:iterate=Patient:general-practitioner"))
    assert req.include == [Include("DocumentReference", "subject"),
                           Include("DocumentReference", "patient", "Patient"),
                           Include("DocumentReference", "author"),
                           Include("Patient", "general-practitioner", None, True)]
    req = parse_search("Patient", q("_revinclude=DocumentReference:patient&_revinclude=Consent:patient"
                                    "&_revinclude=AuditEvent:patient"))
    assert [str(i) for i in req.revinclude] == ["DocumentReference:patient", "Consent:patient",
                                               "AuditEvent:patient"]
    assert parse_search("Consent", q("_include=Consent:patient")).include == [
        Include("Consent", "patient")]
    assert parse_search("AuditEvent", q("_include=AuditEvent:patient")).include == [
        Include("AuditEvent", "patient")]


@pytest.mark.parametrize("key,value", [
    ("$where", "1"), ("name[$ne]", "x"), ("name.$ne", "x"), ("s.name.n", "x"), ("_id[$gt]", ""),
    ("name:$regex", "x"), ("", "x"),
])
def test_injection_names_rejected(key, value):
    with pytest.raises(BadRequest):
        parse_search("Patient", [(key, value)])


def test_injection_values_are_data():
    flt = parse_search("Patient", q("family=.*&gender=$ne&identifier=[$ne]")).mongo_filter()
    text = json.dumps(flt, default=str)
    assert '"^\\\\.\\\\*"' in text  # escaped regex: a literal ".*" prefix
    assert {"s.gender.c": "$ne"} in flt["$and"]
    with pytest.raises(BadRequest):
        parse_search("Patient", [("name", {"$ne": 1})])  # type: ignore[list-item]


def test_filter_shapes():
    f = parse_search("Patient", q("gender=male,female")).mongo_filter()
    assert f == {"s.gender.c": {"$in": ["male", "female"]}}
    f = parse_search("Patient", q("gender:not=male")).mongo_filter()
    assert f == {"$nor": [{"s.gender.c": "male"}]}
    f = parse_search("Patient", q("family=a&family=b")).mongo_filter()
    assert f == {"$and": [{"s.family.n": {"$regex": "^a"}}, {"s.family.n": {"$regex": "^b"}}]}
    f = parse_search("Patient", q(r"identifier=sys\|x|v\,1")).mongo_filter()
    assert f == {"s.identifier": {"$elemMatch": {"s": "sys|x", "c": "v,1"}}}
    f = parse_search("Patient", q("_id=a,b")).mongo_filter()
    assert f == {"_id": {"$in": ["a", "b"]}}


# =========================================================================== on the database

CASES = [
    # --- Patient: token identifier / gender / active
    ("Patient", f"identifier={NIR}|280051234567890", ["p-eloise"]),
    ("Patient", "identifier=280051234567890", ["p-eloise"]),
    ("Patient", "identifier=|X-1", ["p-noname"]),
    ("Patient", "identifier=|280051234567890", []),
    ("Patient", f"identifier=urn:oid:1.2.250.1.213.1.4.10|&_id={MINE_P}", ["p-jean"]),
    ("Patient", f"identifier:not={NIR}|280051234567890&_id={MINE_P}", ["p-jean", "p-noname"]),
    ("Patient", f"identifier:missing=false&_id={MINE_P}", ["p-eloise", "p-jean", "p-noname"]),
    ("Patient", "identifier:text=ins", ["p-eloise"]),
    ("Patient", "identifier=urn:oid:1.2.36.146.595.217.0.1|12345", ["example"]),
    ("Patient", f"gender=female&_id={MINE_P}", ["p-eloise"]),
    ("Patient", f"gender=male,unknown&_id={MINE_P}", ["p-jean", "p-noname"]),
    ("Patient", f"gender:not=male&_id={MINE_P}", ["p-eloise", "p-noname"]),
    ("Patient", f"active=true&_id={MINE_P}", ["p-eloise"]),
    ("Patient", f"active=false", ["p-jean"]),
    ("Patient", f"active:not=true&_id={MINE_P}", ["p-jean", "p-noname"]),
    ("Patient", f"active:missing=true&_id={MINE_P}", ["p-noname"]),
    # --- Patient: strings
    ("Patient", "name=eloise", ["p-eloise"]),
    ("Patient", "name=ÉLO", ["p-eloise"]),
    ("Patient", "name=dupon", ["p-eloise", "p-jean"]),
    ("Patient", "name=upon", []),
    ("Patient", "name:exact=Dupont", ["p-eloise"]),
    ("Patient", "name:exact=dupont", []),
    ("Patient", "name:contains=upon", ["p-eloise", "p-jean"]),
    ("Patient", "name:contains=pont", ["p-eloise"]),
    ("Patient", "name:contains=IERR", ["p-jean"]),
    ("Patient", "name=chalmers", ["example"]),
    ("Patient", "family=dupont", ["p-eloise"]),
    ("Patient", "family=dupond,xyz", ["p-jean"]),
    ("Patient", "family=dup&family=dupond", ["p-jean"]),
    ("Patient", "family:exact=Dupond", ["p-jean"]),
    ("Patient", "family:missing=true&_id=" + MINE_P, ["p-noname"]),
    ("Patient", "given=pierre", ["p-jean"]),
    ("Patient", "given:exact=Éloïse", ["p-eloise"]),
    ("Patient", "given:contains=oi", ["p-eloise"]),
    # --- Patient: birthdate prefixes (p-eloise 1980-05-12, p-jean 1975)
    ("Patient", "birthdate=1980", ["p-eloise"]),
    ("Patient", "birthdate=1980-05", ["p-eloise"]),
    ("Patient", "birthdate=1980-05-12", ["p-eloise"]),
    ("Patient", "birthdate=eq1975&_id=" + MINE_P, ["p-jean"]),
    ("Patient", "birthdate=1975-06&_id=" + MINE_P, []),
    ("Patient", "birthdate=ne1975&_id=" + MINE_P, ["p-eloise"]),
    ("Patient", "birthdate=lt1976&_id=" + MINE_P, ["p-jean"]),
    ("Patient", "birthdate=gt1976&_id=" + MINE_P, ["p-eloise"]),
    ("Patient", "birthdate=gt1975-06-01&_id=" + MINE_P, ["p-eloise", "p-jean"]),
    ("Patient", "birthdate=ge1975&_id=" + MINE_P, ["p-eloise", "p-jean"]),
    ("Patient", "birthdate=le1975&_id=" + MINE_P, ["p-jean"]),
    ("Patient", "birthdate=le1980-05-12&_id=" + MINE_P, ["p-eloise", "p-jean"]),
    ("Patient", "birthdate=sa1975&_id=" + MINE_P, ["p-eloise"]),
    ("Patient", "birthdate=eb1980-05-12&_id=" + MINE_P, ["p-jean"]),
    ("Patient", "birthdate=ge1980&birthdate=lt1981&_id=" + MINE_P, ["p-eloise"]),
    ("Patient", "birthdate=1975,1980&_id=" + MINE_P, ["p-eloise", "p-jean"]),
    ("Patient", "birthdate:missing=true&_id=" + MINE_P, ["p-noname"]),
    # --- Patient: general-practitioner (references, by identifier)
    ("Patient", "general-practitioner=Practitioner/pr1", ["p-jean"]),
    ("Patient", "general-practitioner=pr1", ["p-jean"]),
    ("Patient", "general-practitioner:Practitioner=pr1", ["p-jean"]),
    ("Patient", f"general-practitioner:identifier={RPPS}|810001234567", ["p-eloise"]),
    ("Patient", "general-practitioner:identifier=810001234567", ["p-eloise"]),
    ("Patient", "general-practitioner:identifier=|810001234567", []),
    ("Patient", "general-practitioner:missing=true&_id=" + MINE_P, ["p-noname"]),
    ("Patient", "general-practitioner=Practitioner/example", ["glossy"]),
    # --- _id, _lastUpdated
    ("Patient", "_id=p-eloise", ["p-eloise"]),
    ("Patient", "_id:not=p-eloise&_id=p-eloise,p-jean", ["p-jean"]),
    ("Patient", "_lastUpdated=2024-01-02", ["p-jean"]),
    ("Patient", "_lastUpdated=ge2024-01-02", ["p-jean", "p-noname"]),
    ("Patient", "_lastUpdated=2024-01-01T10:00:00Z", ["p-eloise"]),
    ("Patient", "_lastUpdated=2024-01-01T11:00:00+01:00", ["p-eloise"]),
    ("Patient", "_lastUpdated=2024-01-01T10:00:00.001Z", []),
    # --- DocumentReference
    ("DocumentReference", "patient=Patient/p-eloise", ["d1", "d3"]),
    ("DocumentReference", "patient=p-eloise", ["d1", "d3"]),
    ("DocumentReference", "patient:Patient=p-eloise", ["d1", "d3"]),
    ("DocumentReference", f"patient={BASE}/Patient/p-eloise", ["d1", "d3"]),
    ("DocumentReference", "patient=http://elsewhere.example/fhir/Patient/p-eloise", ["d1", "d3"]),
    ("DocumentReference", "patient=Patient/xcda", ["example"]),
    ("DocumentReference", "subject=p-eloise", ["d1", "d3"]),
    ("DocumentReference", "subject=Group/g1", ["d4"]),
    ("DocumentReference", "patient=g1", []),
    ("DocumentReference", f"subject:missing=true&_id={MINE_D}", []),
    ("DocumentReference", "identifier=urn:ietf:rfc:3986|urn:oid:1.2.3.4.1", ["d1"]),
    ("DocumentReference", "identifier=urn:x|ID-1", ["d1"]),
    ("DocumentReference", "identifier=urn:oid:1.3.6.1.4.1.21367.2005.3.7.1234", ["example"]),
    ("DocumentReference", f"type={LOINC}|11488-4", ["d1"]),
    ("DocumentReference", "type=11502-2", ["d2"]),
    ("DocumentReference", f"type={LOINC}|", ["d1", "d2", "d3", "example"]),
    ("DocumentReference", "type:text=consultation", ["d1"]),
    ("DocumentReference", "type:text=note", ["d1", "example"]),
    ("DocumentReference", f"type:not=11488-4&_id={MINE_D}", ["d2", "d3", "d4"]),
    ("DocumentReference", f"type:missing=true&_id={MINE_D}", ["d4"]),
    ("DocumentReference", "category=urn:oid:1.2.250.1.213.1.1.4.1|10", ["d1"]),
    ("DocumentReference", "category:text=compte", ["d1"]),
    ("DocumentReference", "date=2024-03-10", ["d1"]),
    ("DocumentReference", "date=2024-03", ["d1", "d2"]),
    ("DocumentReference", "date=2024-03-10T10:00:00+01:00", ["d1"]),
    ("DocumentReference", "date=2024-03-10T09:00:00Z", ["d1"]),
    ("DocumentReference", "date=2024-03-10T10:00", []),
    ("DocumentReference", "date=gt2024-03-10", ["d2"]),
    ("DocumentReference", f"date=lt2024-03-11&_id={MINE_D}", ["d1", "d4"]),
    ("DocumentReference", "date=sa2024-02-01&_id=" + MINE_D, ["d1", "d2"]),
    ("DocumentReference", "date=eb2024-03-11&_id=" + MINE_D, ["d1", "d4"]),
    ("DocumentReference", "date:missing=true&_id=" + MINE_D, ["d3"]),
    ("DocumentReference", f"status=current", ["d1", "d3", "example"]),
    ("DocumentReference", f"status:not=current&_id={MINE_D}", ["d2", "d4"]),
    ("DocumentReference", "status=superseded,entered-in-error", ["d2", "d4"]),
    ("DocumentReference", "author=Practitioner/pr1", ["d1"]),
    ("DocumentReference", "author=http://other.example/fhir/Practitioner/pr2", ["d2"]),
    ("DocumentReference", "author=pr2", ["d2"]),
    ("DocumentReference", "author=Practitioner/pr2", []),
    ("DocumentReference", f"author:identifier={RPPS}|810001234567", ["d3"]),
    ("DocumentReference", f"author:missing=true&_id={MINE_D}", ["d4"]),
    ("DocumentReference", f"security-label={CONF}|MASQUE_PS", ["d1"]),
    ("DocumentReference", f"security-label:not={CONF}|MASQUE_PS&_id={MINE_D}", ["d2", "d3", "d4"]),
    ("DocumentReference", f"security-label:missing=true&_id={MINE_D}", ["d2", "d3", "d4"]),
    ("DocumentReference", "relatesto=DocumentReference/d1", ["d3"]),
    ("DocumentReference", "relatesto=d1", ["d3"]),
    ("DocumentReference", "format=urn:ihe:iti:xds-sd:pdf:2008", ["d1"]),
    ("DocumentReference", "format=|urn:ihe:iti:xds-sd:text:2008", ["d2"]),
    ("DocumentReference", "contenttype=application/pdf", ["d1", "d3", "d4"]),
    ("DocumentReference", "contenttype=text/xml", ["d2"]),
    ("DocumentReference", "patient=Patient/p-eloise&status=current&type=11490-0", ["d3"]),
    # --- Consent
    ("Consent", "patient=Patient/p-eloise", ["c1"]),
    ("Consent", "patient=p-jean", ["c2"]),
    ("Consent", f"status=active&_id={MINE_C}", ["c1"]),
    ("Consent", "status=inactive", ["c2"]),
    ("Consent", f"category={LOINC}|59284-0&_id={MINE_C}", ["c1", "c2"]),
    ("Consent", f"actor:identifier={RPPS}|810001234567", ["c1"]),
    ("Consent", "actor=Practitioner/f204", ["consent-example-notThem"]),
    ("Consent", "actor=Patient/example", ["consent-example-grantor"]),
    ("Consent", "purpose=http://terminology.hl7.org/CodeSystem/v3-ActReason|TREAT", ["c1"]),
    ("Consent", "purpose=BTG,ETREAT", ["c2", "consent-example-Emergency"]),
    ("Consent", f"action=access&_id={MINE_C}", ["c1"]),
    ("Consent", "date=2024-02", ["c1"]),
    ("Consent", f"date=le2023-12-31&_id={MINE_C}", ["c2"]),
    ("Consent", "scope=patient-privacy&_id=" + MINE_C, ["c1"]),
    ("Consent", "scope:missing=true&_id=" + MINE_C, ["c2"]),
    # --- AuditEvent
    ("AuditEvent", "patient=Patient/p-eloise", ["a1"]),
    ("AuditEvent", "patient=p-jean", ["a2"]),
    ("AuditEvent", "patient=Patient/example", ["example-disclosure", "example-rest"]),
    ("AuditEvent", "entity=DocumentReference/d1", ["a1"]),
    ("AuditEvent", "agent=Device/app1", ["a1"]),
    ("AuditEvent", f"agent:identifier={RPPS}|810001234567", ["a1"]),
    ("AuditEvent", "date=2024-04-02", ["a2"]),
    ("AuditEvent", "date=2024-04-02T08:00:00.500Z", ["a2"]),
    ("AuditEvent", "date=2024-04-02T08:00:00Z", ["a2"]),
    ("AuditEvent", "date=2024-04-02T08:00:00.499Z", []),
    ("AuditEvent", f"date=ge2024-04-01&_id={MINE_A}", ["a1", "a2"]),
    ("AuditEvent", f"type=rest&_id={MINE_A}", ["a1", "a2"]),
    ("AuditEvent", "subtype=http://hl7.org/fhir/restful-interaction|search&_id=" + MINE_A, ["a2"]),
    ("AuditEvent", f"action=E&_id={MINE_A}", ["a2"]),
    ("AuditEvent", f"action=e&_id={MINE_A}", []),  # codes are case-sensitive
    ("AuditEvent", f"outcome=4&_id={MINE_A}", ["a2"]),
    ("AuditEvent", f"outcome:not=0&_id={MINE_A}", ["a2"]),
    # --- Communication
    ("Communication", "subject=Patient/p-eloise", ["m1"]),
    ("Communication", "patient=p-jean", ["m2"]),
    ("Communication", "status=not-done", ["m2"]),
    ("Communication", "sent=2024-05", ["m1"]),
    ("Communication", "sent:missing=true", ["m2"]),
    ("Communication", "category=urn:x:dmp-notification|first-access", ["m1"]),
    # --- injection attempts are data
    ("Patient", "name=.*", []),
    ("Patient", "family=$where", []),
    ("Patient", "identifier=[$ne]", []),
    ("Patient", "gender=$ne", []),
]


@pytest.mark.parametrize("rtype,params,expected", CASES, ids=[f"{c[0]}?{c[1]}" for c in CASES])
def test_search_on_database(db, rtype, params, expected):
    assert sorted(find_ids(db, rtype, q(params))) == sorted(expected)


def test_base_url_reference_query(db):
    assert find_ids(db, "DocumentReference", q(f"patient={BASE}/Patient/p-eloise&_sort=_id"),
                    base_url=BASE) == ["d1", "d3"]
    assert find_ids(db, "DocumentReference",
                    q("author=http://other.example/fhir/Practitioner/pr2"), base_url=BASE) == ["d2"]
    assert find_ids(db, "DocumentReference",
                    q("patient=http://elsewhere.example/fhir/Patient/p-eloise"), base_url=BASE) == []


@pytest.mark.parametrize("value,now,expected", [
    # the window is widened by 10% of the distance from now (at least one day)
    ("ap1975-06-15", datetime(1985, 1, 1, tzinfo=UTC), {"p-jean"}),         # +-~11 months
    ("ap1980-06-01", datetime(1985, 1, 1, tzinfo=UTC), {"p-eloise"}),       # +-~5.5 months
    ("ap1980-05-20", datetime(1980, 5, 21, tzinfo=UTC), set()),            # +-1 day
    ("ap1980-05-13", datetime(1980, 5, 21, tzinfo=UTC), {"p-eloise"}),      # overlaps by the day
    ("ap1970", datetime(2030, 1, 1, tzinfo=UTC), {"p-jean"}),               # +-6 years
    ("ap1970", datetime(2100, 1, 1, tzinfo=UTC), {"p-jean", "p-eloise"}),   # +-13 years
])
def test_date_ap_is_relative_to_now(db, value, now, expected):
    req = parse_search("Patient", q(f"birthdate={value}&_id=" + MINE_P))
    req.now = now
    assert {d["_id"] for d in db.Patient.find(req.mongo_filter())} == expected


def test_date_ap_default_now(db):
    req = parse_search("DocumentReference", q(f"date=ap2024-03-10&_id={MINE_D}"))
    assert "d1" in {d["_id"] for d in db.DocumentReference.find(req.mongo_filter())}


def test_sort_on_multi_valued_and_missing(db):
    mine = [("_id", MINE_P)]
    assert find_ids(db, "Patient", mine + [("_sort", "given")]) == ["p-eloise", "p-jean", "p-noname"]
    assert find_ids(db, "Patient", mine + [("_sort", "-given")]) == ["p-jean", "p-eloise", "p-noname"]
    assert find_ids(db, "Patient", mine + [("_sort", "name")]) == ["p-jean", "p-eloise", "p-noname"]
    assert find_ids(db, "Patient", mine + [("_sort", "birthdate")]) == ["p-jean", "p-eloise", "p-noname"]
    assert find_ids(db, "Patient", mine + [("_sort", "-birthdate")]) == ["p-eloise", "p-jean", "p-noname"]
    assert find_ids(db, "Patient", mine) == ["p-noname", "p-jean", "p-eloise"]  # -_lastUpdated
    assert find_ids(db, "Patient", mine + [("_sort", "-_id")]) == ["p-noname", "p-jean", "p-eloise"]
    assert find_ids(db, "Patient", mine + [("_sort", "gender,_id")]) == ["p-eloise", "p-jean", "p-noname"]


def test_includes_on_database(db):
    d1 = db.DocumentReference.find_one({"_id": "d1"})
    inc = parse_search("DocumentReference", q("_include=DocumentReference:author")).include[0]
    assert include_targets(inc, d1) == [("Practitioner", "pr1")]
    inc = Include("DocumentReference", "subject", "Group")
    assert include_targets(inc, d1) == []
    d2 = db.DocumentReference.find_one({"_id": "d2"})  # foreign absolute: nothing local
    assert include_targets(Include("DocumentReference", "author"), d2) == []
    rev = parse_search("Patient", q("_revinclude=DocumentReference:patient")).revinclude[0]
    flt = revinclude_filter(rev, "Patient", ["p-eloise"])
    assert sorted(d["_id"] for d in db.DocumentReference.find(flt)) == ["d1", "d3"]
    rev = Include("AuditEvent", "patient")
    flt = revinclude_filter(rev, "Patient", ["p-jean", "example"])
    assert sorted(d["_id"] for d in db.AuditEvent.find(flt)) == ["a2", "example-disclosure",
                                                                  "example-rest"]


def test_index_specs(db):
    for rtype in ("DocumentReference", "Consent", "AuditEvent", "Communication", "Binary"):
        specs = index_specs(rtype)
        assert specs and all(spec[0] == ("pid", 1) for spec in specs
                             if spec[0][0] not in ("s.identifier.c", "s.entity.r", "s.agent.iv"))
    # the privacy operations' searches across DMPs (who read this document, what did this
    # professional read) have their own index on the journal
    assert [("s.entity.r", 1)] in index_specs("AuditEvent") and [("s.agent.iv", 1)] in index_specs("AuditEvent")
    assert [("o._lastUpdated~d", -1), ("_id", 1)] in index_specs("Patient")
    assert [("s.identifier.c", 1), ("s.identifier.s", 1)] in index_specs("Patient")
    # the indexes exist on the collections built by the fixture, and are used
    names = db.Patient.index_information()
    assert any("identifier" in n for n in names)
    plan = db.Patient.find(parse_search("Patient", q("identifier=280051234567890"))
                           .mongo_filter()).explain()
    assert "IXSCAN" in json.dumps(plan, default=str)


# =========================================================================== paging

PAGING_DATES = ["2024-01-01T10:00:00Z", "2024-01-01T10:00:00Z", None, "2023-12-31", "2024-01-02",
                "2024-01-01T10:00:00Z", None, "2022-06", "2024-01-02", "2021"]


@pytest.fixture(scope="module")
def paging_col(db):
    col = db["DocumentReference_paging"]
    docs = []
    for i in range(37):
        r = {"resourceType": "DocumentReference", "id": f"pg{i:03d}",
             "meta": _meta(f"2024-0{1 + i % 3}-0{1 + i % 5}T00:00:00.000Z"),
             "status": ["current", "superseded", "entered-in-error"][i % 3],
             "subject": {"reference": "Patient/p-eloise"}}
        if PAGING_DATES[i % len(PAGING_DATES)]:
            r["date"] = PAGING_DATES[i % len(PAGING_DATES)]
        if i % 4:
            r["type"] = {"coding": [{"system": LOINC, "code": ["11488-4", "11502-2", "18748-4"][i % 3]}]}
        docs.append(stored("DocumentReference", r))
    for keys in index_specs("DocumentReference"):
        col.create_index(keys)
    col.insert_many(docs)
    return col


def _page_all(col, params: str, count: int) -> list[str]:
    seen, cursor, pages = [], None, 0
    while True:
        pairs = q(params) + [("_count", str(count))] + ([("_cursor", cursor)] if cursor else [])
        req = parse_search("DocumentReference", pairs)
        flt = {"$and": [req.mongo_filter(), keyset_filter(req), {"del": False}]}
        docs = list(col.find(flt).sort(req.mongo_sort()).limit(req.count))
        seen += [d["_id"] for d in docs]
        pages += 1
        assert pages < 100
        if len(docs) < req.count:
            return seen
        cursor = cursor_after(req, docs[-1])
        assert ("_cursor", cursor) not in req.self_params()


@pytest.mark.parametrize("params", [
    "", "_sort=date", "_sort=-date", "_sort=status,-date", "_sort=-status,date", "_sort=_id",
    "_sort=-_id", "_sort=type,-_lastUpdated", "_sort=-type,date,status", "status=current&_sort=-date",
    "_sort=date,_id,status",
])
@pytest.mark.parametrize("count", [1, 4, 7, 50])
def test_keyset_paging(paging_col, params, count):
    req = parse_search("DocumentReference", q(params))
    expected = [d["_id"] for d in paging_col.find(req.mongo_filter()).sort(req.mongo_sort())]
    got = _page_all(paging_col, params, count)
    assert len(got) == len(set(got))          # no duplicates
    assert got == expected                    # no gaps, same order as one unpaged query
    assert len(expected) == (13 if params.startswith("status=") else 37)


@pytest.mark.parametrize("params", ["_sort=-date", "date=ge2023-01-01&date=lt2024-01-02&_sort=-date",
                                    "status=current&_sort=-date", "_sort=status,-date"])
def test_keyset_pages_run_as_flat_branches(paging_col, params):
    """A next page's filter (the cursor's bound and its ``$or`` on the same sort key, beside a date
    range's own ``$or``) is split by storage into flat branches (``or_branches``: a key twice
    becomes one condition with both operators), so that SecantusDB looks each one up by an index
    (bench/journal_search.py); the pages so read are those of the one unpaged query."""
    from fhir_dmp.storage import merge_filters, or_branches
    from fhir_dmp.storage.core import sort_docs
    req = parse_search("DocumentReference", q(params))
    expected = [d["_id"] for d in paging_col.find({"$and": [req.mongo_filter(), {"del": False}]})
                .sort(req.mongo_sort())]
    seen, cursor = [], None
    while len(seen) < 40:
        req = parse_search("DocumentReference", q(params) + [("_count", "3")] + ([("_cursor", cursor)] if cursor else []))
        flt = merge_filters({"pid": "p-eloise"}, req.mongo_filter(), keyset_filter(req), {"del": False})
        branches = or_branches(flt)
        if cursor:
            assert branches is not None and all(not k.startswith("$") for b in branches for k in b)
        found = {d["_id"]: d for b in (branches or [flt]) for d in paging_col.find(b)}
        docs = sort_docs(found.values(), req.mongo_sort())[:3]
        seen += [d["_id"] for d in docs]
        if len(docs) < 3:
            break
        cursor = cursor_after(req, docs[-1])
    assert seen == expected and expected


def test_sort_order_semantics(paging_col):
    req = parse_search("DocumentReference", q("_sort=-date"))
    docs = list(paging_col.find(req.mongo_filter()).sort(req.mongo_sort()))
    dates = [date_range(d["res"]["date"])[1] if "date" in d["res"] else None for d in docs]
    present = [x for x in dates if x is not None]
    assert dates[:len(present)] == present and all(x is None for x in dates[len(present):])
    assert present == sorted(present, reverse=True)
    ids_for_ties = [d["_id"] for d in docs if d["res"].get("date") == "2024-01-01T10:00:00Z"]
    assert ids_for_ties == sorted(ids_for_ties)   # ties break on _id ascending


def test_cursor_roundtrip_and_strict_decoding():
    when = datetime(2024, 1, 2, 3, 4, 5, 678000)
    c = encode_cursor([when, "current"], "pg001")
    assert decode_cursor(c) == ([when.replace(tzinfo=UTC), "current"], "pg001")
    assert "=" not in c and "+" not in c and "/" not in c
    req = parse_search("DocumentReference", [("_sort", "-date,status"), ("_cursor", c)])
    f = keyset_filter(req)
    w = when.replace(tzinfo=UTC)
    assert f == {"$and": [{"o.date~d": {"$lte": w}}, {"$or": [
        {"o.date~d": {"$lt": w}},
        {"o.date~d": w, "o.status": {"$gt": "current"}},
        {"o.date~d": w, "o.status": "current", "_id": {"$gt": "pg001"}}]}]}
    f = keyset_filter(parse_search("Patient", [("_sort", "-_id"), ("_cursor", encode_cursor([], "b"))]))
    assert f == {"_id": {"$lt": "b"}}
    assert keyset_filter(parse_search("Patient", [])) == {}

    def enc(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    bad = ["!!!", "a" * 5000, enc([1, 2]), enc({"v": [], "id": "x", "extra": 1}),
           enc({"v": [{"$gt": ""}], "id": "x"}), enc({"v": [{"d": "yesterday"}], "id": "x"}),
           enc({"v": [{"d": "2024-01-01T00:00:00"}], "id": "x"}), enc({"v": [1], "id": "x"}),
           enc({"v": [], "id": {"$ne": 1}}), enc({"v": [], "id": "a/b"}),
           base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("=")]
    for b in bad:
        with pytest.raises(BadRequest) as exc:
            keyset_filter(parse_search("DocumentReference", [("_sort", "-date"), ("_cursor", b)]))
        assert exc.value.issues[0].expression == ["_cursor"]
    # right shape but wrong types / arity for this sort
    for b in (encode_cursor(["x"], "a"), encode_cursor([], "a"),
              encode_cursor([when, when], "a")):
        with pytest.raises(BadRequest):
            keyset_filter(parse_search("DocumentReference", [("_sort", "-date"), ("_cursor", b)]))



def test_history_cursor_is_the_search_cursor_with_a_version_key():
    """A history page's next link carries (lastUpdated, "[Type/]id/vid") in the search cursor's
    encoding; anything else is the same 400 on ``_cursor``."""
    when = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    for key in ("Patient/p1/3", "ae-1/1"):
        c = encode_history_cursor((when, key))
        assert decode_history_cursor(c) == (when, key)
        assert decode_cursor(c, id_re=re.compile(".*")) == ([when], key)
    for b in ("zzz", encode_cursor([], "p1/1"), encode_cursor(["x"], "p1/1"), encode_cursor([when, when], "p1/1"),
              encode_history_cursor((when, "p1")), encode_history_cursor((when, "Patient/p1/x")),
              encode_history_cursor((when, "../p1/1/2"))):
        with pytest.raises(BadRequest) as exc:
            decode_history_cursor(b)
        assert exc.value.issues[0].expression == ["_cursor"]

def test_reference_id():
    from fhir_dmp.search import reference_id
    assert reference_id("Patient/abc", "Patient") == "abc"
    assert reference_id("https://dmp.test/fhir/Binary/b1/_history/2", "Binary") == "b1"
    assert reference_id("Practitioner/abc", "Patient") is None
    assert reference_id("abc", "Patient") is None
    assert reference_id("urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "Patient") is None
    assert reference_id(None, "Patient") is None
