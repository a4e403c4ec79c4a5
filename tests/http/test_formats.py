"""fhir_dmp.http.formats: JSON/XML round trips, negotiation, body parsing, XML safety."""
from __future__ import annotations

import copy
import decimal
import json
import pathlib

import pytest
from lxml import etree

from fhir_dmp.http import formats
from fhir_dmp.http.errors import (BadRequest, NotAcceptable, PayloadTooLarge, Unprocessable,
                             UnsupportedMediaType)
from fhir_dmp.http.formats import JSON, XML, from_xml, negotiate, parse_body, render, to_xml

FIXTURES = sorted((pathlib.Path(__file__).parents[1] / "fixtures" / "r4").glob("*.json"))
MAX = 1 << 20
XHTML = "http://www.w3.org/1999/xhtml"


def load(path: pathlib.Path) -> dict:
    return formats.loads_json(path.read_bytes())


# --- constructed resources --------------------------------------------------

PATIENT = {
    "resourceType": "Patient", "id": "p1",
    "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00.000+02:00",
             "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                           "code": "N"}]},
    "text": {"status": "generated",
             "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Jean &amp; '
                    '&quot;Jo&quot; <b>Dupont</b> &lt;1&gt;</p><br/></div>'},
    "extension": [{"url": "https://hl7.fr/ig/fhir/core/StructureDefinition/"
                          "fr-core-identity-reliability",
                   "extension": [{"url": "identityStatus",
                                  "valueCoding": {"system": "https://hl7.fr/ig/fhir/core/"
                                                            "CodeSystem/fr-core-cs-identity-status",
                                                  "code": "VALI"}}]}],
    "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "180032B02512345"}],
    "active": True,
    "name": [{"family": "Dupont", "given": ["Jean", None, "Marie"],
              "_given": [None, {"extension": [{"url": "http://example.org/absent",
                                               "valueCode": "unknown"}]},
                         {"id": "g3"}]}],
    "gender": "male", "birthDate": "1980-03-02",
    "_birthDate": {"id": "bd", "extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
         "valueDateTime": "1980-03-02T14:35:45+01:00"}]},
    "multipleBirthInteger": 2,
    "generalPractitioner": [{"identifier": {"system": "urn:oid:1.2.250.1.71.4.2.1",
                                            "value": "810000000001"}}],
}

OBSERVATION = {
    "resourceType": "Observation", "id": "o1", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": decimal.Decimal("72.50"), "unit": "kg",
                      "system": "http://unitsofmeasure.org", "code": "kg"},
    "referenceRange": [{"low": {"value": decimal.Decimal("1E+2")},
                        "high": {"value": 120}}],
    "extension": [{"url": "http://example.org/ratio",
                   "valueDecimal": decimal.Decimal("0.000100")}],
    "component": [{"code": {"text": "flag"}, "valueBoolean": False},
                  {"code": {"text": "count"}, "valueInteger": -3}],
    "modifierExtension": [{"url": "http://example.org/mod", "valueString": "x"}],
}

DOCREF = {
    "resourceType": "DocumentReference", "id": "d1", "status": "current",
    "contained": [{"resourceType": "Practitioner", "id": "author",
                   "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.1",
                                   "value": "810000000001"}]}],
    "securityLabel": [{"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.13",
                                   "code": "MASQUE_PS"}]}],
    "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
    "subject": {"reference": "Patient/p1"}, "author": [{"reference": "#author"}],
    "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/b1",
                                "size": 1234, "hash": "2jmj7l5rSw0yVb/vlWAYkK/YBwk="},
                 "format": {"system": "http://ihe.net/fhir/ValueSet/IHE.FormatCode.codesystem",
                            "code": "urn:ihe:iti:xds-sd:pdf:2008"}}],
}

BINARY = {"resourceType": "Binary", "id": "b1", "contentType": "application/pdf",
          "data": "JVBERi0xLjQK"}

COMMUNICATION = {
    "resourceType": "Communication", "id": "c1", "status": "not-done",
    "statusReason": {"text": "no contact on file"},
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                        "communication-category", "code": "notification"}]}],
    "subject": {"reference": "Patient/p1"}, "sent": "2024-05-01T10:00:00+02:00",
    "payload": [{"contentString": "Premier accès à votre DMP par Dr Martin"},
                {"contentReference": {"reference": "AuditEvent/a1"}}],
}

OPERATION_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "invalid",
               "diagnostics": "Patient.identifier[0].value: bad INS key",
               "expression": ["Patient.identifier[0].value"]},
              {"severity": "information", "code": "informational", "diagnostics": "ok"}],
}

CAPABILITY = {
    "resourceType": "CapabilityStatement", "status": "active", "date": "2024-05-01",
    "kind": "instance", "fhirVersion": "4.0.1", "format": ["json", "xml"],
    "patchFormat": ["application/json-patch+json"],
    "implementation": {"description": "fhir_dmp", "url": "http://localhost/fhir"},
    "rest": [{"mode": "server",
              "security": {
                  "extension": [{"url": "http://fhir-registry.smarthealthit.org/"
                                        "StructureDefinition/oauth-uris",
                                 "extension": [{"url": "token",
                                                "valueUri": "https://idp/token"}]}],
                  "cors": True,
                  "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                     "restful-security-service",
                                           "code": "SMART-on-FHIR"}]}]},
              "resource": [{"type": "Patient",
                            "interaction": [{"code": "read"}, {"code": "search-type"}],
                            "versioning": "versioned", "readHistory": True,
                            "conditionalDelete": "not-supported",
                            "searchParam": [{"name": "identifier", "type": "token",
                                             "definition": "http://hl7.org/fhir/SearchParameter/"
                                                           "Patient-identifier"}]}],
              "operation": [{"name": "everything",
                             "definition": "http://hl7.org/fhir/OperationDefinition/"
                                           "Patient-everything"}]}],
}

PARAMETERS = {
    "resourceType": "Parameters",
    "parameter": [{"name": "count", "valueInteger": 3},
                  {"name": "patient", "resource": {"resourceType": "Patient", "id": "x"}},
                  {"name": "nested", "part": [{"name": "a", "valueString": "b"}]}],
}


def searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "id": "s1", "type": "searchset", "total": len(resources),
            "link": [{"relation": "self", "url": "http://localhost/fhir/Patient?active=true"},
                     {"relation": "next", "url": "http://localhost/fhir/Patient?page=2&x=\"y\""}],
            "entry": [{"fullUrl": f"http://localhost/fhir/{r['resourceType']}/{r.get('id')}",
                       "resource": r, "search": {"mode": "match", "score": decimal.Decimal("1.0")}}
                      for r in resources]
                     + [{"resource": OPERATION_OUTCOME, "search": {"mode": "outcome"}}]}


TRANSACTION = {
    "resourceType": "Bundle", "type": "transaction",
    "meta": {"profile": ["https://profiles.ihe.net/ITI/MHD/StructureDefinition/"
                         "IHE.MHD.Comprehensive.ProvideBundle"]},
    "entry": [{"fullUrl": "urn:uuid:0c287d32-01e3-4d87-9953-9fcc9404eb21", "resource": DOCREF,
               "request": {"method": "POST", "url": "DocumentReference"}},
              {"fullUrl": "urn:uuid:1c287d32-01e3-4d87-9953-9fcc9404eb21", "resource": BINARY,
               "request": {"method": "PUT", "url": "Binary/b1", "ifMatch": "W/\"2\""}},
              {"request": {"method": "DELETE", "url": "Consent/c9"}}],
}

CONSTRUCTED = {
    "patient": PATIENT, "observation": OBSERVATION, "docref": DOCREF, "binary": BINARY,
    "communication": COMMUNICATION, "outcome": OPERATION_OUTCOME, "capability": CAPABILITY,
    "parameters": PARAMETERS, "transaction": TRANSACTION,
    "searchset": searchset([PATIENT, DOCREF, COMMUNICATION, OBSERVATION]),
}
ALL = [pytest.param(p, id=p.stem) for p in FIXTURES]


# --- round trips ------------------------------------------------------------

def test_fixtures_are_there():
    names = {p.stem.split("-")[0] for p in FIXTURES}
    assert {"Patient", "DocumentReference", "Consent", "AuditEvent", "Binary", "Organization",
            "Practitioner"} <= names


@pytest.mark.parametrize("path", ALL)
def test_fixture_json_xml_json(path):
    res = load(path)
    xml = to_xml(res)
    assert from_xml(xml) == res
    assert to_xml(from_xml(xml)) == xml  # XML -> JSON -> XML, byte for byte
    assert from_xml(to_xml(res, pretty=True)) == res
    assert parse_body(XML, render(res, XML), max_bytes=MAX) == res


@pytest.mark.parametrize("path", ALL)
def test_fixture_json_round_trip(path):
    res = load(path)
    for pretty in (False, True):
        again = parse_body(JSON, render(res, JSON, pretty=pretty), max_bytes=MAX)
        assert again == res
        assert json.dumps(again, default=str, sort_keys=True) == json.dumps(
            res, default=str, sort_keys=True)  # types too (Decimal stays Decimal)
    assert json.loads(path.read_bytes()) == json.loads(render(res, JSON))


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_constructed_round_trips(name):
    res = CONSTRUCTED[name]
    snapshot = copy.deepcopy(res)
    xml = to_xml(res)
    back = from_xml(xml)
    assert back == res
    assert to_xml(back) == xml
    assert from_xml(to_xml(res, pretty=True)) == res
    assert parse_body(JSON, render(res, JSON), max_bytes=MAX) == res
    assert res == snapshot  # inputs untouched


def test_fixture_xml_agrees_with_fhir_resources_reader():
    """An independent reader (fhir.resources' XML parser) sees the same content
    in our XML as in the JSON. Narratives are left out: that reader unescapes
    &quot; in them."""
    from fhir.resources.R4B import get_fhir_model_class
    for path in FIXTURES[::4]:
        res = json.loads(path.read_bytes())
        model = get_fhir_model_class(res["resourceType"])
        ours = model.model_validate_xml(to_xml(load(path))).model_dump(mode="json")
        ref = model.model_validate(res).model_dump(mode="json")
        ours.pop("text", None), ref.pop("text", None)
        assert ours == ref, path.name


def test_xml_shape_follows_fhir_xml_rules():
    xml = to_xml(PATIENT)
    root = etree.fromstring(xml)
    ns = {"f": "http://hl7.org/fhir", "h": XHTML}
    assert root.tag == "{http://hl7.org/fhir}Patient"
    assert root.find("f:id", ns).get("value") == "p1"  # Resource.id is an element
    order = [etree.QName(c).localname for c in root]
    assert order == ["id", "meta", "text", "extension", "identifier", "active", "name",
                     "gender", "birthDate", "multipleBirthInteger", "generalPractitioner"]
    ext = root.find("f:extension", ns)
    assert ext.get("url").endswith("fr-core-identity-reliability")  # url is an attribute
    assert ext.find("f:extension/f:valueCoding/f:code", ns).get("value") == "VALI"
    given = root.findall("f:name/f:given", ns)
    assert [g.get("value") for g in given] == ["Jean", None, "Marie"]
    assert given[1].find("f:extension", ns) is not None and given[2].get("id") == "g3"
    bd = root.find("f:birthDate", ns)
    assert bd.get("id") == "bd" and bd.get("value") == "1980-03-02"
    assert root.find("f:active", ns).get("value") == "true"
    assert root.find("f:text/h:div", ns) is not None
    bundle = etree.fromstring(to_xml(CONSTRUCTED["searchset"]))
    assert bundle.find("f:entry/f:resource/f:Patient/f:id", ns).get("value") == "p1"
    assert bundle.find("f:entry/f:search/f:score", ns).get("value") == "1.0"
    doc = etree.fromstring(to_xml(DOCREF))
    assert doc.find("f:contained/f:Practitioner", ns) is not None


def test_decimal_precision_kept():
    body = (b'{"resourceType":"Observation","status":"final","code":{"text":"w"},'
            b'"valueQuantity":{"value":72.50},"extension":[{"url":"a",'
            b'"valueDecimal":1e-7},{"url":"b","valueDecimal":100}]}')
    res = parse_body(JSON, body, max_bytes=MAX)
    assert isinstance(res["valueQuantity"]["value"], decimal.Decimal)
    assert b'"value":72.50' in render(res, JSON)
    assert b'value="72.50"' in to_xml(res)
    back = from_xml(to_xml(res))
    assert back == res and str(back["valueQuantity"]["value"]) == "72.50"
    assert isinstance(back["extension"][1]["valueDecimal"], int)  # as JSON gives it
    assert back["extension"][0]["valueDecimal"] == decimal.Decimal("1E-7")
    assert parse_body(JSON, render(back, JSON), max_bytes=MAX) == res


def test_json_decimal_placeholder_cannot_be_forged():
    res = {"resourceType": "Basic", "code": {"text": "\ue000deadbeef:0"},
           "extension": [{"url": "u", "valueDecimal": decimal.Decimal("1.10")}]}
    out = render(res, JSON)
    assert json.loads(out)["code"]["text"] == "\ue000deadbeef:0" and b"1.10" in out


def test_json_output_is_the_standard_librarys_bytes():
    """dumps_json writes through orjson (issue 13): the same bytes as the standard library's
    encoder, compact and _pretty, Decimals digit for digit; an integer beyond 64 bits (which a
    body may carry) and NaN are handled as before."""
    body = b'{"resourceType":"Basic","code":{"text":"\xc3\xa9\\u2028"},"extension":[{"url":"a","valueInteger":123456789012345678901234567890}]}'
    big = parse_body(JSON, body, max_bytes=MAX)
    for res in (big, {**big, "extension": [{"url": "d", "valueDecimal": decimal.Decimal("0.000100")}]}):
        for pretty in (False, True):
            assert formats.dumps_json(res, pretty=pretty) == formats._dumps_json_stdlib(res, pretty=pretty)
    assert b"123456789012345678901234567890" in render(big, JSON)
    with pytest.raises(ValueError):
        formats.dumps_json({"resourceType": "Basic", "x": decimal.Decimal("NaN")})


def test_div_without_xmlns_is_normalized_and_injection_refused():
    res = {"resourceType": "Basic", "code": {"text": "x"},
           "text": {"status": "generated", "div": "<div><p>a</p></div>"}}
    assert from_xml(to_xml(res))["text"]["div"] == f'<div xmlns="{XHTML}"><p>a</p></div>'
    evil = dict(res, text={"status": "generated",
                           "div": f'<div xmlns="{XHTML}">a</div></text><id value="x"/>'})
    with pytest.raises(Unprocessable) as e:
        to_xml(evil)
    assert e.value.issues[0].expression == ["Basic.text.div"]
    doctype = dict(res, text={"status": "generated",
                              "div": '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                     f'<div xmlns="{XHTML}">&x;</div>'})
    with pytest.raises(Unprocessable):
        to_xml(doctype)


@pytest.mark.parametrize("res, where", [
    ({"resourceType": "Patient", "foo": 1}, "Patient.foo"),
    ({"resourceType": "Patient", "name": {"family": "x"}}, "Patient.name"),
    ({"resourceType": "Patient", "gender": ["male"]}, "Patient.gender"),
    ({"resourceType": "Patient", "name": [{"given": ["a"], "_given": [None, None]}]},
     "Patient.name[0].given"),
    ({"resourceType": "Patient", "_name": {}}, "Patient._name"),
    ({"resourceType": "Bundle", "type": "searchset",
      "entry": [{"resource": {"resourceType": "Nope"}}]}, "Bundle.entry[0].resource.resourceType"),
    ({"resourceType": "Patient", "birthDate": {"x": 1}}, "Patient.birthDate"),
    ({"resourceType": "Nope"}, "resourceType"),
])
def test_to_xml_refuses_invalid_structure(res, where):
    with pytest.raises(Unprocessable) as e:
        to_xml(res)
    assert e.value.issues[0].expression == [where]


# --- negotiation ------------------------------------------------------------

@pytest.mark.parametrize("accept, fmt, expected", [
    (None, None, JSON),
    ("", None, JSON),
    ("*/*", None, JSON),
    ("application/fhir+json", None, JSON),
    ("application/json", None, JSON),
    ("application/fhir+xml", None, XML),
    ("application/xml", None, XML),
    ("text/xml", None, XML),
    ("application/fhir+xml;fhirVersion=4.0", None, XML),
    ("application/fhir+json; fhirVersion=4.0; charset=utf-8", None, JSON),
    ("application/fhir+json;q=0.5, application/fhir+xml;q=0.9", None, XML),
    ("application/fhir+xml;q=0.1, application/*;q=0.5", None, JSON),
    ("application/*;q=0.1, application/fhir+xml", None, XML),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", None, XML),
    ("application/xml, application/json", None, JSON),  # tie -> JSON
    ("text/*, application/fhir+json;q=0.1", None, XML),
    ("application/fhir+json;q=0, */*", None, XML),  # most specific range decides
    ("application/fhir+xml;q=0, application/*", None, JSON),
    ("APPLICATION/FHIR+XML", None, XML),
    (None, "XML", XML),
    ("application/fhir+xml;fhirVersion=3.0, application/fhir+json;q=0.2", None, JSON),
    ("application/fhir+xml;q=abc", None, JSON),  # unparseable Accept is ignored
    # _format wins over Accept
    ("application/fhir+json", "xml", XML),
    ("application/fhir+xml", "json", JSON),
    ("text/html", "application/fhir+xml", XML),
    (None, "application/fhir json", JSON),  # '+' decoded to ' ' in the query string
    (None, "application/fhir+xml;fhirVersion=4.0", XML),
    (None, "application/xml", XML),
    (None, "text/xml", XML),
    (None, "application/json", JSON),
    ("application/fhir+xml", "", XML),  # empty _format is ignored
])
def test_negotiate(accept, fmt, expected):
    assert negotiate(accept, fmt) == expected


@pytest.mark.parametrize("accept, fmt", [
    ("text/html", None),
    ("image/png, text/plain;q=0.5", None),
    ("application/fhir+json;q=0, application/fhir+xml;q=0, application/json;q=0, "
     "application/xml;q=0, text/xml;q=0, */*", None),  # q=0 beats the wildcard
    ("*/*;q=0", None),
    ("application/fhir+json;fhirVersion=3.0", None),
    (None, "html"),
    (None, "text/html"),
    ("application/fhir+json", "application/fhir+json;fhirVersion=5.0"),
    (None, "turtle"),
    (None, "text/json"),
])
def test_negotiate_406(accept, fmt):
    with pytest.raises(NotAcceptable) as e:
        negotiate(accept, fmt)
    assert e.value.status == 406


def test_negotiate_is_the_same_memoized_or_not():
    """Short headers are memoized (issue 22): the same answer as unmemoized, a 406 every time,
    and a header past the memo's bound is still negotiated."""
    for accept in ("application/fhir+xml;q=0.9, application/fhir+json", "application/xml", None, "*/*"):
        assert negotiate(accept, None) == negotiate(accept, None) == formats._negotiate(accept, None)
    for _ in range(2):
        with pytest.raises(NotAcceptable):
            negotiate("text/csv", None)
    long_accept = "application/fhir+xml, " + ", ".join(f"text/x-{i}" for i in range(60))
    assert len(long_accept) > 256 and negotiate(long_accept, None) == XML


# --- request bodies ---------------------------------------------------------

SECRET = "SECRET-Dupont-180032B02512345"


def assert_no_echo(err):
    text = json.dumps(err.outcome())
    assert SECRET not in text and "passwd" not in text and "root:" not in text


@pytest.mark.parametrize("ctype", [
    None, "", "text/plain", "application/octet-stream", "application/json-patch+json",
    "application/fhir+json; fhirVersion=3.0", "application/fhir+json; charset=klingon",
    "multipart/form-data; boundary=x", "application/fhir+json; charset=rot13",
    "application/fhir+xml; charset=hex", "application/fhir+xml; charset=mbcs",
    "application/fhir+xml; charset=punycode",
])
def test_parse_body_415(ctype):
    with pytest.raises(UnsupportedMediaType) as e:
        parse_body(ctype, b'{"resourceType":"Patient"}', max_bytes=MAX)
    assert e.value.status == 415


@pytest.mark.parametrize("ctype, body", [
    ("application/fhir+json", b'{"resourceType":"Patient","id":"' + b"x" * 100 + b'"}'),
    ("application/fhir+xml", b'<Patient xmlns="http://hl7.org/fhir"><id value="'
                             + b"x" * 100 + b'"/></Patient>'),
])
def test_parse_body_413(ctype, body):
    with pytest.raises(PayloadTooLarge) as e:
        parse_body(ctype, body, max_bytes=64)
    assert e.value.status == 413
    assert parse_body(ctype, body, max_bytes=len(body))["resourceType"] == "Patient"


@pytest.mark.parametrize("ctype", ["application/fhir+json", "application/json",
                                   "application/json;charset=UTF-8",
                                   "application/fhir+json;fhirVersion=4.0"])
def test_parse_body_json_types(ctype):
    assert parse_body(ctype, b'{"resourceType":"Patient"}', max_bytes=MAX) == {
        "resourceType": "Patient"}


@pytest.mark.parametrize("body, needle", [
    (b'{"resourceType":"Patient","name":[{"family":"' + SECRET.encode() + b'"}]',
     "line 1, column"),  # truncated
    (b'{\n  "resourceType": "Patient",\n  "gender": "' + SECRET.encode() + b'" x\n}',
     "line 3, column"),
    (b'{"resourceType":"Patient",}', "line 1, column 27"),
    (b"[]", "must be an object"),
    (b'"' + SECRET.encode() + b'"', "must be an object"),
    (b"42", "must be an object"),
    (b'{"gender":"' + SECRET.encode() + b'"}', "resourceType"),
    (b'{"resourceType":"Patient","gender":"male","gender":"' + SECRET.encode() + b'"}',
     "duplicate key 'gender'"),
    (b'{"resourceType":"Patient","multipleBirthInteger":NaN}', "NaN"),
    (b'{"resourceType":"Patient","multipleBirthInteger":-Infinity}', "Infinity"),
    (b'{"resourceType":"Patient","gender":"a\\u0001' + SECRET.encode() + b'"}',
     "control character"),
    (b'{"resourceType":"Patient","gender":"\\ud800"}', "surrogate"),
    (b'{"resourceType":"Patient","gender":"\xff\xfe' + SECRET.encode() + b'"}', "UTF-8"),
    (b"   ", "Empty body"),
    (b"[" * 100000, "nested too deeply"),
])
def test_parse_body_bad_json(body, needle):
    with pytest.raises(BadRequest) as e:
        parse_body(JSON, body, max_bytes=MAX)
    assert e.value.status == 400
    assert needle in e.value.diagnostics
    assert_no_echo(e.value)


def test_parse_body_charsets():
    res = {"resourceType": "Patient", "name": [{"family": "Lefèvre"}]}
    text = json.dumps(res, ensure_ascii=False)
    assert parse_body("application/fhir+json; charset=utf-16", text.encode("utf-16"),
                      max_bytes=MAX) == res
    assert parse_body(JSON, b"\xef\xbb\xbf" + text.encode(), max_bytes=MAX) == res  # BOM
    xml = '<Patient xmlns="http://hl7.org/fhir"><name><family value="Lefèvre"/></name></Patient>'
    assert parse_body("application/fhir+xml; charset=ISO-8859-1", xml.encode("latin-1"),
                      max_bytes=MAX) == res
    declared = '<?xml version="1.0" encoding="ISO-8859-1"?>' + xml
    assert parse_body("text/xml", declared.encode("latin-1"), max_bytes=MAX) == res
    assert parse_body("application/xml", to_xml(res), max_bytes=MAX) == res


def _x(inner: str, root: str = "Patient") -> bytes:
    return (f'<{root} xmlns="http://hl7.org/fhir">{inner}</{root}>').encode()


@pytest.mark.parametrize("body, needle", [
    (_x('<name><family value="' + SECRET + '"/></name>')[:-12], "Malformed XML"),  # truncated
    (_x('<name><family value="' + SECRET + '"></name>'), "line 1, column"),
    (b'<Patient xmlns="http://hl7.org/fhir/x"><id value="a"/></Patient>', "FHIR namespace"),
    (b'<Patient><id value="a"/></Patient>', "FHIR namespace"),
    (b'<x:Patient xmlns:x="urn:evil"/>', "FHIR namespace"),
    (_x("", root="Narrative"), "not a FHIR resource"),
    (_x("", root="DomainResource"), "not a FHIR resource"),
    (_x('<foo value="' + SECRET + '"/>'), "Unknown element 'foo'"),
    (_x("<gender>" + SECRET + "</gender>"), "Text content"),
    (_x(SECRET), "Text content"),
    (_x('<active value="yes' + SECRET + '"/>'), "Invalid boolean"),
    (_x('<multipleBirthInteger value="2.5"/>'), "Invalid integer"),
    (_x('<gender value="male"/><gender value="female"/>'), "repeated"),
    (_x('<gender/>'), "without a value"),
    (_x('<gender value="male" bogus="' + SECRET + '"/>'), "Unexpected attribute 'bogus'"),
    (_x('<name id="n"><id value="x"/></name>'), "Unknown element 'id'"),
    (_x('<extension><url value="u"/></extension>'), "Unknown element 'url'"),
    (_x('<text><status value="generated"/><div><p>x</p></div></text>'), "XHTML div"),
    (_x('<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">'
        '<svg xmlns="http://www.w3.org/2000/svg"/></div></text>'), "only contain XHTML"),
    (_x('<contained><Patient/><Patient/></contained>'), "exactly one resource"),
    (_x('<contained><Nope/></contained>'), "not a FHIR resource"),
    (b"", "Empty body"),
    (b"not xml at all " + SECRET.encode(), "Malformed XML"),
])
def test_parse_body_bad_xml(body, needle):
    with pytest.raises(BadRequest) as e:
        parse_body(XML, body, max_bytes=MAX)
    assert e.value.status == 400
    assert needle in e.value.diagnostics, e.value.diagnostics
    assert_no_echo(e.value)


def test_xml_error_location():
    body = (b'<Bundle xmlns="http://hl7.org/fhir">\n<type value="searchset"/>\n'
            b'<entry><resource><Patient><id value="a"/></Patient></resource></entry>\n'
            b'<entry><resource><Patient>\n<active value="maybe"/></Patient></resource></entry>\n'
            b'</Bundle>')
    with pytest.raises(BadRequest) as e:
        from_xml(body)
    assert e.value.issues[0].expression == ["Bundle.entry[1].resource.active"]
    assert "line 5" in e.value.diagnostics


def test_xml_lenient_on_order_and_ignores_comments_and_xsi():
    body = (b'<?xml version="1.0"?><!-- c --><Patient xmlns="http://hl7.org/fhir" '
            b'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            b'xsi:schemaLocation="http://hl7.org/fhir patient.xsd">\n'
            b'  <gender value="female"/><!-- note --><id value="a"/>\n'
            b'  <name><given value="A"/><family value="B"/><given value="C"/></name>\n'
            b'</Patient>')
    assert from_xml(body) == {"resourceType": "Patient", "gender": "female", "id": "a",
                              "name": [{"given": ["A", "C"], "family": "B"}]}


# --- XML attacks --------------------------------------------------------------

XXE = (b'<?xml version="1.0"?>\n<!DOCTYPE Patient [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
       b'<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/>'
       b'<div xmlns="http://www.w3.org/1999/xhtml">&xxe;</div></text>'
       b'<name><family value="&xxe;"/></name></Patient>')
XXE_EXTERNAL_DTD = (b'<?xml version="1.0"?><!DOCTYPE Patient SYSTEM "http://127.0.0.1:9/x.dtd">'
                    b'<Patient xmlns="http://hl7.org/fhir"/>')
XXE_PARAMETER = (b'<?xml version="1.0"?><!DOCTYPE Patient [<!ENTITY % p SYSTEM '
                 b'"file:///etc/passwd"> %p;]><Patient xmlns="http://hl7.org/fhir"/>')


def _laughs(levels: int) -> bytes:
    ents = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels))
    return (f'<?xml version="1.0"?><!DOCTYPE Patient [{ents}]>'
            f'<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/>'
            f'<div xmlns="http://www.w3.org/1999/xhtml">&lol{levels - 1};</div></text>'
            f'</Patient>').encode()


QUADRATIC = ('<?xml version="1.0"?><!DOCTYPE Patient [<!ENTITY a "' + "A" * 50000 + '">]>'
             '<Patient xmlns="http://hl7.org/fhir"><gender value="' + "&a;" * 5000 + '"/>'
             '</Patient>').encode()


@pytest.mark.parametrize("body", [XXE, XXE_EXTERNAL_DTD, XXE_PARAMETER, _laughs(10),
                                  _laughs(30), QUADRATIC,
                                  XXE.decode().replace('<?xml version="1.0"?>', "")
                                  .encode("utf-16")],
                         ids=["xxe", "external-dtd", "parameter-entity", "billion-laughs",
                              "laughs-30", "quadratic-blowup", "xxe-utf16"])
def test_xml_attacks_refused(body):
    with pytest.raises(BadRequest) as e:
        parse_body(XML, body, max_bytes=MAX)
    assert "DOCTYPE" in e.value.diagnostics
    assert_no_echo(e.value)


def test_undeclared_entity_refused():
    with pytest.raises(BadRequest):
        from_xml(_x('<gender value="&xxe;"/>'))


def test_render_formats():
    assert render(PATIENT, JSON).startswith(b'{"resourceType":"Patient"')
    assert b"\n  " in render(PATIENT, JSON, pretty=True)
    assert render(PATIENT, XML).startswith(b'<?xml version="1.0" encoding="UTF-8"?><Patient')
    pretty = render(PATIENT, XML, pretty=True)
    assert b'\n  <id value="p1"/>' in pretty and from_xml(pretty) == PATIENT
    assert "accès".encode() in render(COMMUNICATION, JSON)  # UTF-8, not \u escapes
    with pytest.raises(ValueError):
        render(PATIENT, "text/turtle")


def test_json_mime_follows_accept_memoized_or_not():
    """``application/json`` only for a client that ranks it above FHIR JSON and names it."""
    assert formats.prefers_plain_json("application/json") is True
    assert formats.prefers_plain_json("application/json;q=0.5, application/fhir+json") is False
    assert formats.prefers_plain_json("*/*") is False and formats.prefers_plain_json(None) is False
    long_accept = "application/json, " + ", ".join(f"text/x-{i};q=0.1" for i in range(40))
    assert len(long_accept) > 256 and formats.prefers_plain_json(long_accept) is True
