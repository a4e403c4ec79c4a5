"""Tests of fhir_dmp.profiles: R4 validation, INS, DMP profiles, ig/ definitions."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models as fhirpath_models
from fhir.resources.R4B import get_fhir_model_class

from fhir_dmp.http.errors import BadRequest, Unprocessable
from fhir_dmp.profiles import (
    IDNATPS_SYSTEM, INS_SYSTEMS, INVISIBLE_PATIENT, LABEL_SYSTEM, MASQUE_PS, NIA, NIR,
    NIR_DEMO, NIR_TEST, PROFILES, SUPPORTED_TYPES, author_ids, doc_type_codes,
    general_practitioner_ids, identity_status, ins_key, is_ins_qualified, is_valid_ins, labels,
    patient_ins, set_labels, validate,
)
from fhir_dmp.profiles import dmp
from fhir_dmp.profiles.validation import REQUIRED_BINDINGS, _loc_to_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "r4")      # official R4 examples, in the repository
IG = os.path.join(ROOT, "ig")
XHTML = "http://www.w3.org/1999/xhtml"
RELIABILITY = dmp.IDENTITY_RELIABILITY_URL
STATUS_CS = dmp.IDENTITY_STATUS_SYSTEM


# --- helpers --------------------------------------------------------------------------


def with_key(body13: str) -> str:
    """The test's own statement of the rule: 97 - (body mod 97), 2A -> 19, 2B -> 18."""
    numeric = body13[:5] + {"2A": "19", "2B": "18"}.get(body13[5:7], body13[5:7]) + body13[7:]
    return body13 + "%02d" % (97 - int(numeric) % 97)


def reliability(code="VALI", system=STATUS_CS):
    return {"url": RELIABILITY,
            "extension": [{"url": "identityStatus", "valueCoding": {"system": system, "code": code}}]}


def dmp_patient(**extra) -> dict:
    p = {"resourceType": "Patient", "id": "p1", "active": True,
         "identifier": [{"system": NIR, "value": with_key("1850575123456")}],
         "extension": [reliability()],
         "name": [{"family": "Durand", "given": ["Marie"]}], "gender": "female",
         "birthDate": "1985-05-12",
         "generalPractitioner": [{"identifier": {"system": IDNATPS_SYSTEM, "value": "810001234567"}}]}
    p.update(extra)
    return p


def dmp_docref(**extra) -> dict:
    d = {"resourceType": "DocumentReference", "id": "d1", "status": "current",
         "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
         "subject": {"reference": "Patient/p1"}, "date": "2024-03-01T10:00:00+01:00",
         "author": [{"identifier": {"system": IDNATPS_SYSTEM, "value": "810001234567"}}],
         "content": [{"attachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"},
                      "format": {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                                 "code": "urn:ihe:iti:xds-sd:pdf:2008"}}]}
    d.update(extra)
    return d


def issues_of(resource, **kw) -> list[tuple[str, str]]:
    with pytest.raises(Unprocessable) as exc:
        validate(resource, **kw)
    assert exc.value.status == 422
    return [(i.expression[0] if i.expression else None, i.diagnostics) for i in exc.value.issues]


def paths_of(resource, **kw) -> list[str]:
    return [p for p, _ in issues_of(resource, **kw)]


def patient(**extra):
    return {"resourceType": "Patient", **extra}


# --- official R4 examples ---------------------------------------------------------------

# Official examples our DMP profile refuses, and why (none: a generalPractitioner given as a plain
# reference is kept as given; only an idNatPs identifier makes a médecin traitant).
DMP_REFUSED: dict = {}
EXAMPLES = sorted(
    os.path.basename(f) for f in glob.glob(os.path.join(FIXTURES, "*.json"))
    if os.path.basename(f).split("-")[0] in SUPPORTED_TYPES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_official_examples(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as fh:
        resource = json.load(fh)
    before = copy.deepcopy(resource)
    if name in DMP_REFUSED:
        assert paths_of(resource) == DMP_REFUSED[name]
    else:
        assert validate(resource, resource_type=resource["resourceType"]) is resource
    assert resource == before


def test_examples_cover_every_type_with_fixtures():
    kinds = {n.split("-")[0] for n in EXAMPLES}
    assert {"Patient", "DocumentReference", "Consent", "AuditEvent", "Binary"} <= kinds


def test_communication_valid():
    comm = {"resourceType": "Communication", "status": "completed", "priority": "routine",
            "subject": {"reference": "Patient/p1"}, "sent": "2024-01-02T03:04:05Z",
            "payload": [{"contentString": "Un professionnel a accédé à votre DMP"}],
            "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
                                    "code": "EMAILWRIT"}]}]}
    assert validate(comm) is comm


def test_dmp_samples_valid():
    p, d = dmp_patient(), dmp_docref()
    assert validate(p, resource_type="Patient") is p
    assert validate(d, resource_type="DocumentReference") is d


# --- resourceType -----------------------------------------------------------------------


@pytest.mark.parametrize("body,rtype", [
    ({"active": True}, None),
    ({"resourceType": "", "active": True}, None),
    ({"resourceType": 3}, None),
    ({"resourceType": "Patient", "active": True}, "DocumentReference"),
    ({"resourceType": "Observation", "status": "final"}, None),
    ({"resourceType": "Bundle", "type": "collection"}, None),
])
def test_resource_type_400(body, rtype):
    with pytest.raises(BadRequest) as exc:
        validate(body, resource_type=rtype)
    assert exc.value.status == 400
    assert exc.value.issues[0].expression == ["resourceType"]


def test_not_a_dict_400():
    with pytest.raises(BadRequest):
        validate(["Patient"])  # type: ignore[arg-type]


# --- R4 JSON and primitive rules -------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None])
def test_boolean_must_be_json_boolean(value):
    assert paths_of(patient(active=value)) == ["Patient.active"]


@pytest.mark.parametrize("value", ["2", 2.0, 2.5, True])
def test_integer_must_be_json_integer(value):
    assert paths_of(patient(multipleBirthInteger=value)) == ["Patient.multipleBirthInteger"]


def test_integer_range_and_kinds():
    assert paths_of(patient(multipleBirthInteger=2 ** 31)) == ["Patient.multipleBirthInteger"]
    att = {"contentType": "text/plain", "size": -1}
    assert paths_of(patient(photo=[att])) == ["Patient.photo[0].size"]
    ok = dmp_docref()
    ok["content"][0]["attachment"]["size"] = 12
    validate(ok)


def test_decimal_must_be_json_number():
    ext = [{"url": "http://example.org/x", "valueDecimal": "1.5"}]
    assert paths_of(patient(extension=ext)) == ["Patient.extension[0].valueDecimal"]
    ext = [{"url": "http://example.org/x", "valueDecimal": 1.5}]
    validate(patient(extension=ext))


@pytest.mark.parametrize("key", ["foo", "fhir_comments", "active__ext", "Active", "_gender_"])
def test_unknown_elements_refused(key):
    problems = issues_of(patient(**{key: True}))
    assert problems[0][0] == f"Patient.{key}"
    assert "unknown element" in problems[0][1]


def test_unknown_nested_element_refused():
    assert paths_of(patient(name=[{"family": "X", "nickname": "Y"}])) == ["Patient.name[0].nickname"]


def test_resource_type_inside_element_refused():
    assert paths_of(patient(name=[{"resourceType": "HumanName", "family": "X"}])) == \
        ["Patient.name[0].resourceType"]


@pytest.mark.parametrize("rid,ok", [
    ("a" * 64, True), ("A-1.b", True), ("a" * 65, False), ("a b", False), ("a_b", False),
    ("é", False), ("a/b", False),
])
def test_id_format(rid, ok):
    if ok:
        validate(patient(id=rid))
    else:
        assert paths_of(patient(id=rid)) == ["Patient.id"]


@pytest.mark.parametrize("value,ok", [
    ("2023", True), ("2023-02", True), ("2023-02-28", True), ("2024-02-29", True),
    ("2023-02-30", False), ("2023-02-29", False), ("2023-13", False), ("2023-1-01", False),
    ("0000-01-01", False), ("23-01-01", False), ("2023-01-01T10:00:00Z", False), ("", False),
])
def test_date(value, ok):
    if ok:
        validate(patient(birthDate=value))
    else:
        assert paths_of(patient(birthDate=value)) == ["Patient.birthDate"]


@pytest.mark.parametrize("value,ok", [
    ("2023-01-01T10:00:00Z", True), ("2023-01-01T10:00:00.123+14:00", True), ("2023", True),
    ("2023-01-01T10:00:60Z", True),            # leap second, allowed by the R4 regex
    ("2023-01-01T10:00:00", False),            # time without a time zone
    ("2023-01-01T10:00Z", False), ("2023-01-01T24:00:00Z", False),
    ("2023-02-30T10:00:00Z", False), ("2023-01-01T10:00:00+15:00", False),
    ("2023-01-01 10:00:00Z", False),
])
def test_datetime(value, ok):
    if ok:
        validate(patient(deceasedDateTime=value))
    else:
        assert paths_of(patient(deceasedDateTime=value)) == ["Patient.deceasedDateTime"]


@pytest.mark.parametrize("value,ok", [
    ("2023-01-01T10:00:00Z", True), ("2023-01-01T10:00:00.5-05:00", True),
    ("2023-01-01", False), ("2023-01-01T10:00:00", False), ("2023-04-31T10:00:00Z", False),
])
def test_instant(value, ok):
    res = patient(meta={"lastUpdated": value})
    if ok:
        validate(res)
    else:
        assert paths_of(res) == ["Patient.meta.lastUpdated"]


def test_time():
    ok = {"url": "http://example.org/t", "valueTime": "23:59:59"}
    validate(patient(extension=[ok]))
    bad = {"url": "http://example.org/t", "valueTime": "24:00:00"}
    assert paths_of(patient(extension=[bad])) == ["Patient.extension[0].valueTime"]


def test_empty_string_refused():
    assert paths_of(patient(name=[{"family": ""}])) == ["Patient.name[0].family"]


def test_empty_object_refused():
    assert paths_of(patient(name=[{}])) == ["Patient.name[0]"]
    assert paths_of(patient(maritalStatus={})) == ["Patient.maritalStatus"]


def test_empty_array_refused():
    assert paths_of(patient(name=[])) == ["Patient.name"]


def test_null_refused():
    assert paths_of(patient(gender=None)) == ["Patient.gender"]
    assert paths_of(patient(name=[None])) == ["Patient.name[0]"]
    assert paths_of(patient(name=[{"given": ["A", None]}])) == ["Patient.name[0].given[1]"]


def test_null_in_primitive_array_aligned_with_extension():
    ext = {"extension": [{"url": "http://example.org/why", "valueCode": "masked"}]}
    validate(patient(name=[{"given": ["A", None], "_given": [None, ext]}]))
    assert paths_of(patient(name=[{"given": ["A", "B"], "_given": [None]}])) == \
        ["Patient.name[0].given"]


def test_primitive_extension_checked():
    res = patient(_birthDate={"extension": [{"url": "http://example.org/x", "valueInteger": "1"}]})
    assert paths_of(res) == ["Patient.birthDate.extension[0].valueInteger"]
    validate(patient(birthDate="1970", _birthDate={"id": "b1"}))


def test_array_vs_single():
    assert paths_of(patient(name={"family": "X"})) == ["Patient.name"]
    assert paths_of(patient(gender=["male"])) == ["Patient.gender"]


def test_object_expected():
    assert paths_of(patient(maritalStatus="M")) == ["Patient.maritalStatus"]


def test_control_characters_refused():
    assert paths_of(patient(name=[{"family": "A\x00B"}])) == ["Patient.name[0].family"]
    validate(patient(name=[{"text": "line1\nline2\tend"}]))


def test_code_whitespace_refused():
    assert paths_of(patient(language=" fr")) == ["Patient.language"]


def test_uri_whitespace_refused():
    assert paths_of(patient(identifier=[{"system": "urn:a b", "value": "1"}])) == \
        ["Patient.identifier[0].system"]


def test_required_element():
    assert paths_of(patient(link=[{"type": "seealso"}])) == ["Patient.link[0].other"]
    assert paths_of({"resourceType": "Consent", "status": "active", "scope": {"text": "x"}}) == \
        ["Consent.category"]


def test_choice_only_one():
    res = patient(deceasedBoolean=True, deceasedDateTime="2020")
    assert paths_of(res) == ["Patient.deceasedDateTime"]


def test_r4b_only_type_refused():
    ext = [{"url": "http://example.org/x", "valueRatioRange": {"denominator": {"value": 1}}}]
    assert paths_of(patient(extension=ext)) == ["Patient.extension[0].valueRatioRange"]


def test_extension_rules():
    assert paths_of(patient(extension=[{"valueString": "x"}])) == ["Patient.extension[0].url"]
    both = {"url": "http://example.org/x", "valueString": "x",
            "extension": [{"url": "a", "valueBoolean": True}]}
    assert paths_of(patient(extension=[both])) == ["Patient.extension[0]"]       # ext-1


def test_references():
    assert paths_of(patient(managingOrganization={"reference": "#org"})) == \
        ["Patient.managingOrganization.reference"]                                # ref-1
    assert paths_of(patient(managingOrganization={"reference": "Patient/1"})) == \
        ["Patient.managingOrganization.reference"]                                # target type
    org = {"resourceType": "Organization", "id": "org", "name": "Cabinet"}
    validate(patient(contained=[org], managingOrganization={"reference": "#org"}))
    validate(patient(managingOrganization={"reference": "https://example.org/fhir/Organization/1"}))


def test_contained_rules():
    org = {"resourceType": "Organization", "id": "org", "name": "Cabinet"}
    assert paths_of(patient(contained=[org])) == ["Patient.contained[0]"]        # dom-3
    bad = dict(org, meta={"versionId": "1"})
    assert "Patient.contained[0].meta" in paths_of(
        patient(contained=[bad], managingOrganization={"reference": "#org"}))      # dom-4
    nested = dict(org, contained=[{"resourceType": "Organization", "id": "x", "name": "y"}],
                  partOf={"reference": "#x"})
    assert "Patient.contained[0].contained" in paths_of(
        patient(contained=[nested], managingOrganization={"reference": "#org"}))   # dom-2
    unknown = {"resourceType": "Nope", "id": "n"}
    assert "Patient.contained[0].resourceType" in paths_of(patient(contained=[unknown]))
    inner_bad = dict(org, active="yes")
    assert paths_of(patient(contained=[inner_bad], managingOrganization={"reference": "#org"})) \
        == ["Patient.contained[0].active"]


# --- REQUIRED bindings --------------------------------------------------------------------

BINDING_CASES = [
    (patient(gender="M"), "Patient.gender"),
    (patient(link=[{"other": {"reference": "Patient/2"}, "type": "same"}]), "Patient.link[0].type"),
    (patient(contact=[{"gender": "f"}]), "Patient.contact[0].gender"),
    (patient(identifier=[{"use": "main", "value": "1"}]), "Patient.identifier[0].use"),
    (patient(name=[{"use": "birth", "family": "X"}]), "Patient.name[0].use"),
    (patient(telecom=[{"system": "mail", "value": "a@b.c"}]), "Patient.telecom[0].system"),
    (patient(telecom=[{"system": "phone", "use": "cell", "value": "1"}]), "Patient.telecom[0].use"),
    (patient(address=[{"use": "house", "city": "Paris"}]), "Patient.address[0].use"),
    (patient(address=[{"type": "street", "city": "Paris"}]), "Patient.address[0].type"),
    (patient(text={"status": "done", "div": f'<div xmlns="{XHTML}">x</div>'}), "Patient.text.status"),
    (dmp_docref(status="final"), "DocumentReference.status"),
    (dmp_docref(docStatus="current"), "DocumentReference.docStatus"),
    (dmp_docref(relatesTo=[{"code": "updates", "target": {"reference": "DocumentReference/x"}}]),
     "DocumentReference.relatesTo[0].code"),
    ({"resourceType": "Consent", "status": "valid", "scope": {"text": "x"},
      "category": [{"text": "x"}]}, "Consent.status"),
    ({"resourceType": "Consent", "status": "active", "scope": {"text": "x"},
      "category": [{"text": "x"}], "provision": {"type": "allow"}}, "Consent.provision.type"),
    ({"resourceType": "Consent", "status": "active", "scope": {"text": "x"},
      "category": [{"text": "x"}],
      "provision": {"data": [{"meaning": "all", "reference": {"reference": "Patient/1"}}]}},
     "Consent.provision.data[0].meaning"),
    ({"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
      "action": "X", "agent": [{"requestor": True}], "source": {"observer": {"display": "s"}}},
     "AuditEvent.action"),
    ({"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
      "outcome": "1", "agent": [{"requestor": True}], "source": {"observer": {"display": "s"}}},
     "AuditEvent.outcome"),
    ({"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2024-01-01T00:00:00Z",
      "agent": [{"requestor": True, "network": {"address": "1.2.3.4", "type": "6"}}],
      "source": {"observer": {"display": "s"}}}, "AuditEvent.agent[0].network.type"),
    ({"resourceType": "Communication", "status": "sent"}, "Communication.status"),
    ({"resourceType": "Communication", "status": "completed", "priority": "high"},
     "Communication.priority"),
    (patient(extension=[{"url": "http://example.org/q", "valueQuantity": {"value": 1, "comparator": "=="}}]),
     "Patient.extension[0].valueQuantity.comparator"),
]


@pytest.mark.parametrize("resource,path", BINDING_CASES, ids=[p for _, p in BINDING_CASES])
def test_required_binding(resource, path):
    problems = issues_of(resource)
    assert [p for p, _ in problems] == [path]
    assert "required value set" in problems[0][1]


def test_required_bindings_agree_with_models():
    """Where fhir.resources lists enum values, our hand list (from R4) says the same."""
    for (cls_name, element), codes in REQUIRED_BINDINGS.items():
        field = get_fhir_model_class(cls_name).model_fields.get(element)
        assert field is not None, (cls_name, element)
        enum = (field.json_schema_extra or {}).get("enum_values")
        if enum:
            assert tuple(enum) == codes, (cls_name, element)


@pytest.mark.parametrize("ctype,ok", [
    ("text/plain", True), ("text/plain; charset=UTF-8", True), ("application/hl7-v3+xml", True),
    ("pdf", False), ("text/", False), ("text plain", False), ("/plain", False),
])
def test_mime_type_format(ctype, ok):
    res = patient(photo=[{"contentType": ctype}])
    if ok:
        validate(res)
    else:
        assert paths_of(res) == ["Patient.photo[0].contentType"]


# --- narrative ----------------------------------------------------------------------------


def _narr(div):
    return patient(text={"status": "generated", "div": div})


@pytest.mark.parametrize("div", [
    "<div>plain</div>",                                              # not in the XHTML namespace
    f'<p xmlns="{XHTML}">x</p>',                                     # root must be div
    f'<div xmlns="{XHTML}"><script>alert(1)</script></div>',
    f'<div xmlns="{XHTML}"><p onclick="x()">x</p></div>',
    f'<div xmlns="{XHTML}"><a href="javascript:x()">x</a></div>',
    f'<div xmlns="{XHTML}"><iframe src="x"/>x</div>',
    f'<div xmlns="{XHTML}">a&nbsp;b</div>',                          # HTML entity
    f'<!DOCTYPE div><div xmlns="{XHTML}">x</div>',
    f'<div xmlns="{XHTML}">   </div>',                               # txt-2
    f'<div xmlns="{XHTML}"><p>unclosed</div>',
    "not xml at all",
])
def test_narrative_refused(div):
    assert paths_of(_narr(div)) == ["Patient.text.div"]


def test_narrative_accepted():
    validate(_narr(f'<div xmlns="{XHTML}"><p>a &amp; b &lt; c &#160;</p>'
                   '<table><tr><td style="color:red">x</td></tr></table></div>'))
    validate(_narr(f'<div xmlns="{XHTML}"><img src="#a" alt=""/></div>'))


def test_narrative_div_required():
    assert paths_of(patient(text={"status": "generated"})) == ["Patient.text.div"]


# --- Binary -------------------------------------------------------------------------------


def test_binary_rules():
    validate({"resourceType": "Binary", "contentType": "application/pdf", "data": "JVBERi0xLjQK"})
    validate({"resourceType": "Binary", "contentType": "text/plain", "data": "aGVs\nbG8="})
    assert paths_of({"resourceType": "Binary", "data": "aGVsbG8="}) == ["Binary.contentType"]
    assert paths_of({"resourceType": "Binary", "contentType": "plain"}) == ["Binary.contentType"]
    for bad in ("aGVsbG8", "a$==", "====", "aGVsbG8=="):
        assert paths_of({"resourceType": "Binary", "contentType": "text/plain", "data": bad}) == \
            ["Binary.data"], bad


# --- several problems, diagnostics, pydantic layer -----------------------------------------


def test_all_problems_reported_together():
    res = patient(active="yes", gender="M", foo=1, birthDate="2023-02-30")
    assert sorted(paths_of(res)) == ["Patient.active", "Patient.birthDate", "Patient.foo",
                                     "Patient.gender"]


def test_diagnostics_do_not_echo_values():
    secret = "1850575123456" + "00"
    problems = issues_of(dmp_patient(identifier=[{"system": NIR, "value": secret}],
                                     birthDate="SECRET-DATE"))
    assert problems
    assert all(secret not in d and "SECRET" not in d for _, d in problems)


def test_loc_to_path():
    assert _loc_to_path("Patient", ("identifier", 0, "value")) == "Patient.identifier[0].value"
    assert _loc_to_path("Patient", ("_birthDate", "extension", 1)) == "Patient.birthDate.extension[1]"
    assert _loc_to_path("Patient", ("active__ext",)) == "Patient.active"
    assert _loc_to_path("Patient", ("root",)) == "Patient"
    assert _loc_to_path("Patient", ("contained", 0, "function-wrap[x]", "name")) == \
        "Patient.contained[0].name"


# --- INS ------------------------------------------------------------------------------------

KNOWN_GOOD = ["262087503203977", "163127847704294", "206127511100564"]   # published examples


def test_ins_systems():
    assert (NIR, NIA, NIR_TEST, NIR_DEMO) == tuple(f"urn:oid:1.2.250.1.213.1.4.{n}" for n in (8, 9, 10, 11))
    assert INS_SYSTEMS == {NIR, NIA, NIR_TEST, NIR_DEMO}


@pytest.mark.parametrize("value", KNOWN_GOOD)
def test_ins_known_good(value):
    assert is_valid_ins(value)
    assert ins_key(value[:13]) == int(value[13:])


@pytest.mark.parametrize("body", ["1850575123456", "2991299999999", "1000101001001", "7650199123456",
                                  "1234567890123", "2690549588157"])
def test_ins_key_rule(body):
    value = with_key(body)
    assert ins_key(body) == int(value[13:])
    assert 1 <= ins_key(body) <= 97
    assert is_valid_ins(value)


def test_ins_wrong_key():
    good = with_key("1850575123456")
    wrong = good[:13] + "%02d" % ((int(good[13:]) % 97) + 1)
    assert not is_valid_ins(wrong)
    assert not is_valid_ins(good[:13] + "00")


@pytest.mark.parametrize("value", ["18505751234567", "1850575123456789", "", "1"])
def test_ins_wrong_length(value):
    assert not is_valid_ins(value)


@pytest.mark.parametrize("value", ["18505X5123456", "A85057512345600", "185057512345X1",
                                   "1850575 234567", " 18505751234567", "185052C12345600",
                                   "1850575123456.7"])
def test_ins_letters_refused(value):
    assert not is_valid_ins(value)


def test_ins_corsica():
    for dept, replacement in (("2A", "19"), ("2B", "18")):
        body = f"18505{dept}123456"
        good = with_key(body)
        assert ins_key(body) == 97 - int(f"18505{replacement}123456") % 97
        assert is_valid_ins(good)
        # the key computed as if the department were "20" (no replacement) is wrong
        naive = body + "%02d" % (97 - int(f"1850520123456") % 97)
        assert naive != good and not is_valid_ins(naive)
    assert not is_valid_ins("2A505" + "75123456" + "00")     # letters only at characters 6-7
    with pytest.raises(ValueError):
        ins_key("185052C123456")


def test_ins_not_a_string():
    assert not is_valid_ins(185057512345600)  # type: ignore[arg-type]


# --- Patient profile -----------------------------------------------------------------------


@pytest.mark.parametrize("system", [NIR, NIA, NIR_TEST, NIR_DEMO])
def test_patient_ins_each_system(system):
    validate(dmp_patient(identifier=[{"system": system, "value": with_key("2690549588157")}]))
    problems = issues_of(dmp_patient(identifier=[{"system": system, "value": "269054958815700"}]))
    assert problems[0][0] == "Patient.identifier[0].value"
    assert "key" in problems[0][1]


@pytest.mark.parametrize("value,word", [
    ("18505751234", "15 characters"), ("1850575123456789", "15 characters"),
    ("18505X512345600", "digits"), ("185052A12345600", "key"),
])
def test_patient_ins_diagnostics(value, word):
    res = dmp_patient(identifier=[{"system": "http://example.org/mrn", "value": "42"},
                                  {"system": NIR, "value": value}])
    problems = issues_of(res)
    assert [p for p, _ in problems] == ["Patient.identifier[1].value"]
    assert word in problems[0][1]


def test_patient_corsica_ins():
    validate(dmp_patient(identifier=[{"system": NIR, "value": with_key("185052A123456")}]))
    validate(dmp_patient(identifier=[{"system": NIR, "value": with_key("185052B123456")}]))


def test_patient_ins_value_required():
    assert paths_of(dmp_patient(identifier=[{"system": NIR}])) == ["Patient.identifier[0].value"]


def test_patient_without_ins_is_accepted():
    res = dmp_patient(identifier=[{"system": "http://example.org/mrn", "value": "anything"}])
    res["extension"] = [reliability("PROV")]
    validate(res)
    assert patient_ins(res) is None and not is_ins_qualified(res)


def test_patient_at_most_one_ins():
    a, b = with_key("1850575123456"), with_key("2690549588157")
    res = dmp_patient(identifier=[{"system": NIR, "value": a}, {"system": NIA, "value": b}])
    assert paths_of(res) == ["Patient.identifier[1]"]
    res = dmp_patient(identifier=[{"system": NIR, "value": a}, {"system": NIR, "value": b}])
    assert paths_of(res) == ["Patient.identifier[1]"]
    # the same INS written twice is one INS
    validate(dmp_patient(identifier=[{"system": NIR, "value": a}, {"system": NIR, "value": a}]))


@pytest.mark.parametrize("code", ["PROV", "RECUP", "VALI", "QUAL"])
def test_identity_reliability_codes(code):
    res = dmp_patient(extension=[reliability(code)])
    validate(res)
    assert identity_status(res) == code
    assert is_ins_qualified(res) is (code in ("VALI", "QUAL"))


def test_identity_reliability_refused():
    assert paths_of(dmp_patient(extension=[reliability("OK")])) == \
        ["Patient.extension[0].extension[0].valueCoding.code"]
    assert paths_of(dmp_patient(extension=[reliability("VALI", "http://example.org")])) == \
        ["Patient.extension[0].extension[0].valueCoding.system"]
    no_status = {"url": RELIABILITY, "extension": [{"url": "validationDate", "valueDate": "2024-01-01"}]}
    assert paths_of(dmp_patient(extension=[no_status])) == ["Patient.extension[0].extension"]
    string_status = {"url": RELIABILITY, "extension": [{"url": "identityStatus", "valueString": "VALI"}]}
    assert paths_of(dmp_patient(extension=[string_status])) == \
        ["Patient.extension[0].extension[0].valueCoding"]
    assert paths_of(dmp_patient(extension=[reliability(), reliability("PROV")])) == \
        ["Patient.extension[1]"]


def test_identity_reliability_with_other_sub_extensions():
    ext = reliability("QUAL")
    ext["extension"].append({"url": "validationDate", "valueDate": "2024-01-01"})
    validate(dmp_patient(extension=[ext]))


def test_patient_helpers():
    p = dmp_patient()
    assert patient_ins(p) == (NIR, p["identifier"][0]["value"])
    assert identity_status(p) == "VALI" and is_ins_qualified(p)
    assert general_practitioner_ids(p) == {"810001234567"}
    assert identity_status({"resourceType": "Patient"}) is None
    assert general_practitioner_ids({}) == set()
    bad_key = dmp_patient(identifier=[{"system": NIR, "value": "185057512345600"}])
    assert not is_ins_qualified(bad_key)


def test_general_practitioner_idnatps_is_the_medecin_traitant():
    validate(dmp_patient(generalPractitioner=[
        {"reference": "Practitioner/1", "identifier": {"system": IDNATPS_SYSTEM, "value": "810001234567"}}]))
    plain = dmp_patient(generalPractitioner=[{"reference": "Practitioner/1"}])
    validate(plain)
    assert general_practitioner_ids(plain) == set()
    validate(dmp_patient(generalPractitioner=[{"identifier": {"system": "urn:oid:1.2.3", "value": "1"}}]))
    assert paths_of(dmp_patient(generalPractitioner=[{"identifier": {"system": IDNATPS_SYSTEM, "value": " "}}])) == \
        ["Patient.generalPractitioner[0].identifier.value"]


# --- DocumentReference profile --------------------------------------------------------------


def test_docref_subject():
    d = dmp_docref()
    del d["subject"]
    assert paths_of(d) == ["DocumentReference.subject"]
    for ref in ("Group/1", "Patient", "http://x/Patient/1", "#p"):
        assert "DocumentReference.subject.reference" in paths_of(dmp_docref(subject={"reference": ref})), ref
    assert paths_of(dmp_docref(subject={"display": "Marie"})) == ["DocumentReference.subject.reference"]


def test_docref_type_needs_loinc():
    assert paths_of(dmp_docref(type={"text": "Compte rendu"})) == ["DocumentReference.type"]
    assert paths_of(dmp_docref(type={"coding": [{"system": "http://snomed.info/sct", "code": "1"}]})) == \
        ["DocumentReference.type"]
    d = dmp_docref()
    del d["type"]
    assert paths_of(d) == ["DocumentReference.type"]


@pytest.mark.parametrize("ctype,ok", [
    ("application/pdf", True), ("text/xml", True), ("application/hl7-v3+xml", True),
    ("text/xml; charset=UTF-8", True), ("image/png", False), ("text/plain", True),
])
def test_docref_content_type(ctype, ok):
    d = dmp_docref()
    d["content"][0]["attachment"]["contentType"] = ctype
    if ok:
        validate(d)
    else:
        assert paths_of(d) == ["DocumentReference.content[0].attachment.contentType"]


def test_docref_content_type_required():
    d = dmp_docref()
    del d["content"][0]["attachment"]["contentType"]
    assert paths_of(d) == ["DocumentReference.content[0].attachment.contentType"]


def test_docref_format_is_coding():
    d = dmp_docref()
    d["content"][0]["format"] = {"coding": [{"code": "x"}]}      # a CodeableConcept
    assert "DocumentReference.content[0].format.coding" in paths_of(d)
    d["content"][0]["format"] = {"system": "urn:oid:1.2.3", "display": "no code"}
    assert paths_of(d) == ["DocumentReference.content[0].format"]


def test_docref_security_labels():
    v3 = {"system": dmp.CONFIDENTIALITY_SYSTEM, "code": "N"}
    ok = dmp_docref(securityLabel=[{"coding": [{"system": LABEL_SYSTEM, "code": MASQUE_PS}]},
                                   {"coding": [v3]}])
    validate(ok)
    for coding, path in [
        ({"system": LABEL_SYSTEM, "code": "SECRET"}, "DocumentReference.securityLabel[0].coding[0].code"),
        ({"system": dmp.CONFIDENTIALITY_SYSTEM, "code": "U"}, "DocumentReference.securityLabel[0].coding[0].code"),
        ({"system": "http://example.org/labels", "code": "x"}, "DocumentReference.securityLabel[0].coding[0].system"),
    ]:
        assert paths_of(dmp_docref(securityLabel=[{"coding": [coding]}])) == [path]


def test_docref_helpers():
    d = dmp_docref(securityLabel=[{"coding": [{"system": dmp.CONFIDENTIALITY_SYSTEM, "code": "R"},
                                              {"system": LABEL_SYSTEM, "code": MASQUE_PS}]}])
    assert labels(d) == {MASQUE_PS}
    assert doc_type_codes(d) == {"11488-4"}
    assert author_ids(d) == {"810001234567"}
    before = copy.deepcopy(d)
    out = set_labels(d, {INVISIBLE_PATIENT})
    assert d == before                                            # input untouched
    assert labels(out) == {INVISIBLE_PATIENT}
    kept = [c for sl in out["securityLabel"] for c in sl["coding"] if c["system"] != LABEL_SYSTEM]
    assert kept == [{"system": dmp.CONFIDENTIALITY_SYSTEM, "code": "R"}]
    validate(out)
    cleared = set_labels(out, set())
    assert labels(cleared) == set() and cleared["securityLabel"][0]["coding"][0]["code"] == "R"
    assert "securityLabel" not in set_labels(dmp_docref(), set())
    with pytest.raises(ValueError):
        set_labels(d, {"SECRET"})


# --- ig/ ------------------------------------------------------------------------------------


def _ig():
    out = {}
    for path in sorted(glob.glob(os.path.join(IG, "*.json"))):
        with open(path, encoding="utf-8") as fh:
            out[os.path.basename(path)] = json.load(fh)
    return out


def test_ig_files_parse_with_r4b_models():
    files = _ig()
    assert files
    for name, res in files.items():
        get_fhir_model_class(res["resourceType"]).model_validate(res)
        assert name == f"{res['resourceType']}-{res['id']}.json"
        assert res["url"] == f"https://fhir-dmp.example.org/fhir/{res['resourceType']}/{res['id']}"
        assert res["status"] in ("draft", "active")


def test_ig_profiles_match():
    all_sds = [r for r in _ig().values() if r["resourceType"] == "StructureDefinition"]
    sds = {r["type"]: r for r in all_sds if r["type"] not in ("Consent", "Extension")}
    assert {t: sd["url"] for t, sd in sds.items()} == PROFILES
    assert {sd["url"] for sd in all_sds if sd["type"] == "Consent"} == set(dmp.PROFILES_CONSENT)
    for sd in sds.values():
        assert (sd["fhirVersion"], sd["derivation"], sd["kind"]) == ("4.0.1", "constraint", "resource")
        assert sd["differential"]["element"][0]["path"] == sd["type"]
    labels_vs = _ig()["ValueSet-dmp-security-labels.json"]
    codes = {c["code"] for inc in labels_vs["compose"]["include"] if inc["system"] == LABEL_SYSTEM
             for c in inc["concept"]}
    assert codes == dmp.DMP_LABELS
    ct = _ig()["ValueSet-dmp-document-content-types.json"]
    assert {c["code"] for c in ct["compose"]["include"][0]["concept"]} == dmp.DOCUMENT_CONTENT_TYPES


def _invariants(sd_file):
    sd = _ig()[sd_file]
    return {c["key"]: c["expression"] for e in sd["differential"]["element"] for c in e.get("constraint", [])}


def _holds(resource, expression) -> bool:
    return fhirpath(resource, expression, {}, fhirpath_models["r4"]) == [True]


def test_ig_patient_invariants_agree_with_python():
    inv = _invariants("StructureDefinition-dmp-patient.json")
    samples = [with_key("1850575123456"), with_key("185052A123456"), with_key("185052B123456"),
               "185057512345600", "185052A12345600", "1850575123", "18505X512345600", *KNOWN_GOOD]
    for value in samples:
        res = dmp_patient(identifier=[{"system": NIR_TEST, "value": value}])
        assert _holds(res, inv["dmp-pat-1"]) is is_valid_ins(value), value
    two = dmp_patient(identifier=[{"system": NIR, "value": KNOWN_GOOD[0]}, {"system": NIA, "value": KNOWN_GOOD[1]}])
    assert not _holds(two, inv["dmp-pat-2"]) and _holds(dmp_patient(), inv["dmp-pat-2"])
    for code, ok in [("VALI", True), ("PROV", True), ("OK", False)]:
        assert _holds(dmp_patient(extension=[reliability(code)]), inv["dmp-pat-3"]) is ok


def test_ig_documentreference_invariants_agree_with_python():
    inv = _invariants("StructureDefinition-dmp-documentreference.json")
    assert _holds(dmp_docref(), inv["dmp-doc-1"]) and _holds(dmp_docref(), inv["dmp-doc-2"])
    assert not _holds(dmp_docref(subject={"reference": "Group/1"}), inv["dmp-doc-1"])
    assert not _holds(dmp_docref(type={"text": "x"}), inv["dmp-doc-2"])


# --- robustness -----------------------------------------------------------------------------


def test_too_deep_refused():
    ext = {"url": "http://example.org/x", "valueString": "a"}
    for _ in range(200):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    problems = issues_of(patient(extension=[ext]))
    assert len(problems) == 1 and "deeper" in problems[0][1]


WEIRD = [None, [], {}, 0, 1.5, True, "", "x", ["x"], [None], [{}], {"a": 1}, [["x"]]]


@pytest.mark.parametrize("weird", WEIRD, ids=repr)
def test_wrong_json_types_never_crash(weird):
    spots = [
        (dmp_patient, ("identifier",)), (dmp_patient, ("identifier", 0, "system")),
        (dmp_patient, ("identifier", 0, "value")), (dmp_patient, ("extension", 0, "extension")),
        (dmp_patient, ("extension", 0, "extension", 0, "valueCoding", "code")),
        (dmp_patient, ("generalPractitioner", 0, "identifier")), (dmp_patient, ("name", 0)),
        (dmp_docref, ("subject",)), (dmp_docref, ("type", "coding")),
        (dmp_docref, ("content", 0, "attachment", "contentType")), (dmp_docref, ("content",)),
        (dmp_docref, ("securityLabel",)), (dmp_docref, ("author", 0)),
    ]
    for make, path in spots:
        res = make(securityLabel=[{"coding": [{"system": LABEL_SYSTEM, "code": MASQUE_PS}]}]) \
            if make is dmp_docref else make()
        cur = res
        for key in path[:-1]:
            cur = cur[key]
        cur[path[-1]] = copy.deepcopy(weird)
        try:        # "x" is a fine system URI: only a non-FHIR exception would be a bug
            validate(res)
        except Unprocessable as exc:
            assert exc.status == 422 and all(i.expression for i in exc.issues)
