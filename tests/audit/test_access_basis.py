"""Why, on every AuditEvent (issue 20, CONTRACT.md "Privacy operations").

Every rule and mode over HTTP with the real test kit (tokens from tests/idp.py, the real
SecantusDB): each access's AuditEvents carry the ``dmp-access-basis`` extension with the rule
that decided for the DMP, the deciding Consent by version (IHE BALP AuthZ consent entity) and,
for the médecin traitant, the Patient version naming the GP; the misuse scan's facts (client
address behind trusted proxies, user agent); and every AuditEvent stored carries a basis.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models as fhirpath_models

from fhir_dmp.http.clients import client_address
from fhir_dmp.runtime.config import Config, ConfigError
from fhir_dmp.security.decision.basis import (BASIS_EXTENSION, BASIS_SYSTEM, FRENCH, GRANTED, REFUSED,
                                              RULE_BASIS, basis_french)
from tests import builders as b
from tests.api import Api
from tests.builders import journal_entries

FINESS = "urn:oid:1.2.250.1.71.4.2.2"
BTG = {"Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                   'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
       "X-Break-Glass-Reason": "patient inconscient aux urgences"}
COLLECT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "collect"}]}
IG = Path(__file__).resolve().parents[2] / "ig"


class Journal:
    """The AuditEvents stored since the last look (raw, from the database)."""

    def __init__(self, db):
        self.db = db
        self.seen: set = set()

    def new(self) -> list[dict]:
        out = [d["res"] for d in journal_entries(self.db) if d["_id"] not in self.seen]
        self.seen |= {d["_id"] for d in journal_entries(self.db)}
        return out


def basis(event: dict) -> str:
    [ext] = [e for e in event.get("extension", []) if e["url"] == BASIS_EXTENSION]
    assert ext["valueCoding"]["system"] == BASIS_SYSTEM
    return ext["valueCoding"]["code"]


def typed(event: dict, rtype: str) -> list[str]:
    """``what.reference`` of the entities typed ``resource-types|rtype``."""
    return [e["what"]["reference"] for e in event.get("entity", [])
            if (e.get("type") or {}).get("system") == "http://hl7.org/fhir/resource-types"
            and e["type"]["code"] == rtype]


def only(events: list[dict], code: str, *, consents: list[str] | None = None) -> list[dict]:
    """Every new event has basis ``code`` (and, given, exactly these Consent entities); the review
    case an emergency access opens is the server's own entry, on the privacy review's basis."""
    cases = [e for e in events if (e.get("outcomeDesc") or "").startswith("review case opened")]
    assert all(basis(e) == "privacy-officer" for e in cases), [basis(e) for e in cases]
    events = [e for e in events if e not in cases]
    assert events, code
    assert [basis(e) for e in events] == [code] * len(events), [(e["subtype"][0]["code"], e.get("outcomeDesc"),
                                                                 basis(e)) for e in events]
    if consents is not None:
        for e in events:
            assert typed(e, "Consent") == consents, (code, e)
    return events


def consent_ref(res: dict) -> str:
    return f"Consent/{res['id']}/_history/{res['meta']['versionId']}"


def test_codes_mapping_and_ig_agree():
    cs = json.loads((IG / "CodeSystem-dmp-access-basis.json").read_text(encoding="utf-8"))
    assert cs["url"] == BASIS_SYSTEM and [c["code"] for c in cs["concept"]] == [*GRANTED, *REFUSED]
    assert set(GRANTED) == {"patient", "representative", "creator", "authorized", "establishment",
                            "medecin-traitant", "break-glass", "centre-15", "admin", "privacy-officer"}
    assert set(REFUSED) == {"blocked", "not-authorized", "break-glass-refused", "centre-15-refused",
                            "excluded-profession", "closed", "feeding-opposition", "not-author", "access-code",
                            "scope"}
    assert set(RULE_BASIS.values()) <= set(GRANTED) | set(REFUSED) == set(FRENCH)
    ext = json.loads((IG / "StructureDefinition-dmp-access-basis.json").read_text(encoding="utf-8"))
    assert ext["url"] == BASIS_EXTENSION
    assert basis_french("blocked") == "refusé : professionnel bloqué"
    assert basis_french("medecin-traitant") == "médecin traitant"


def test_every_rule_and_mode_has_its_basis(api, db):
    log = Journal(db)
    dr = api.as_ps(b.PS_DR)
    pat = dr.create(b.patient(email="claire@example.org"))
    pid = pat["id"]
    created = log.new()
    assert "creator" in {basis(e) for e in created}
    consult = dr.create(b.docref(pid, b.CONSULTATION))
    me = api.as_patient(pid)
    [creator_consent] = [e["resource"] for e in me.search(f"Consent?patient={pid}")["entry"]]
    log.new()

    # granted
    assert dr.get(f"Patient/{pid}").status_code == 200
    only(log.new(), "authorized", consents=[consent_ref(creator_consent)])
    assert me.get(f"Patient/{pid}").status_code == 200
    only(log.new(), "patient", consents=[])
    rp = me.create(b.related_person(pid))
    log.new()
    assert api.as_legal_rep(rp["id"]).get(f"Patient/{pid}").status_code == 200
    only(log.new(), "representative")
    assert api.as_admin().get(f"Patient/{pid}").status_code == 200
    only(log.new(), "admin")
    # AIR mode: the patient authorized the establishment
    air = b.consent(pid, "permit")
    air["provision"]["actor"] = [{"role": {"coding": [{"code": "PRCP"}]},
                                  "reference": {"identifier": {"system": FINESS, "value": "750000001"}}}]
    air = me.create(air)
    log.new()
    nurse = api.as_ps("810000000077", profession="60", organization=f"{FINESS}|750000001")
    assert nurse.get(f"Patient/{pid}").status_code == 200
    only(log.new(), "establishment", consents=[consent_ref(air)])
    # a document hidden inside a granted request (habilitation) does not change the basis
    assert nurse.get(f"DocumentReference/{consult['id']}").status_code == 404
    only(log.new(), "establishment", consents=[consent_ref(air)])
    # médecin traitant: the Patient version naming the GP
    r = me.patch(f"Patient/{pid}", [{"op": "add", "path": "/generalPractitioner",
                                      "value": b.patient(gp=b.PS_OTHER)["generalPractitioner"]}])
    assert r.status_code == 200
    version = r.json["meta"]["versionId"]
    log.new()
    gp = api.as_ps(b.PS_OTHER)
    assert gp.search(f"DocumentReference?patient={pid}")["total"] == 1
    for e in only(log.new(), "medecin-traitant", consents=[]):
        assert typed(e, "Patient") == [f"Patient/{pid}/_history/{version}"]
    # break-glass (a new grant, then the grant in force) and centre 15
    urgent = api.as_ps("810000000009")
    assert urgent.get(f"DocumentReference?patient={pid}", headers=BTG).status_code == 200
    assert urgent.get(f"Patient/{pid}", headers=BTG).status_code == 200
    only(log.new(), "break-glass")
    samu = api.as_regulation()
    assert samu.get(f"DocumentReference?patient={pid}").status_code == 200
    only(log.new(), "centre-15")

    # refused
    assert api.as_ps(b.PS_PHARMA, profession="21").get(f"Patient/{pid}").status_code == 404
    only(log.new(), "not-authorized", consents=[])
    block = me.create(b.consent(pid, "deny", actor=b.PS_PHARMA))
    log.new()
    assert api.as_ps(b.PS_PHARMA, profession="21").get(f"Patient/{pid}").status_code == 404
    only(log.new(), "blocked", consents=[consent_ref(block)])
    assert api.as_ps("810000000010", profession="99").get(f"Patient/{pid}").status_code == 404
    assert {basis(e) for e in log.new()} == {"excluded-profession"}
    assert api.as_ps("810000000011").get(f"Patient/{pid}", headers={**BTG, "X-Break-Glass-Reason": " "}) \
        .status_code == 404
    only(log.new(), "break-glass-refused")
    optout = me.create(b.consent(pid, "deny", purpose="BTG"))
    log.new()
    assert api.as_ps("810000000011").get(f"Patient/{pid}", headers=BTG).status_code == 404
    only(log.new(), "break-glass-refused", consents=[consent_ref(optout)])
    optout15 = me.create(b.consent(pid, "deny", purpose="ETREAT"))
    log.new()
    assert samu.get(f"Patient/{pid}").status_code == 404
    only(log.new(), "centre-15-refused", consents=[consent_ref(optout15)])
    lab = dr.create(b.docref(pid, b.LAB))
    log.new()
    assert gp.get(f"DocumentReference/{lab['id']}").status_code == 200
    only(log.new(), "medecin-traitant")
    # not the author: the GP withdraws the creator's document
    assert gp.delete(f"DocumentReference/{lab['id']}").status_code == 403
    only(log.new(), "not-author")
    # opposition to feeding
    oppose = b.consent(pid, "deny")
    oppose["provision"]["action"] = [COLLECT]
    oppose = me.create(oppose)
    log.new()
    assert dr.post("DocumentReference", b.docref(pid, b.CONSULTATION)).status_code == 403
    assert "feeding-opposition" in {basis(e) for e in log.new()}
    # closed
    assert me.patch(f"Patient/{pid}", [{"op": "replace", "path": "/active", "value": False}]).status_code == 200
    log.new()
    assert dr.get(f"Patient/{pid}").status_code == 404
    only(log.new(), "closed")
    # no DMP: a refused token, a search that reaches none
    assert api.anonymous().get(f"Patient/{pid}").status_code == 401
    assert api.as_token("not-a-token").get("Patient").status_code == 401
    only(log.new(), "scope")
    assert dr.search("DocumentReference")["total"] == 0
    only(log.new(), "scope")

    # every AuditEvent stored carries its basis, and holds the profile's invariant
    everything = journal_entries(db)
    assert len(everything) > 30
    profile = json.loads((IG / "StructureDefinition-dmp-auditevent.json").read_text(encoding="utf-8"))
    [invariant] = [c["expression"] for e in profile["differential"]["element"] for c in e.get("constraint", [])]
    for d in everything:
        assert basis(d["res"]) in GRANTED or basis(d["res"]) in REFUSED
        assert fhirpath(d["res"], invariant, {}, fhirpath_models["r4"]) == [True]
    assert fhirpath({"resourceType": "AuditEvent", "entity": [{
        "what": {"reference": "Consent/1"}, "type": {"system": "http://hl7.org/fhir/resource-types",
                                                      "code": "Consent"}}]}, invariant, {}, fhirpath_models["r4"]) == [False]

    # a destroy leaves one system-journal entry, with the basis of who destroyed
    assert me.post(f"Patient/{pid}/$destroy").status_code == 204
    [left] = [d["res"] for d in journal_entries(db) if d["res"].get("outcomeDesc", "").startswith("a DMP was destroyed")]
    assert basis(left) == "patient"


def test_access_code_refusal_has_its_basis(config, build_app, idp, db):
    api = Api(build_app(config.with_(first_access="patient-code")), idp)
    pid = api.as_ps(b.PS_DR).create(b.patient(email="claire.code@example.org"))["id"]
    log = Journal(db)
    log.new()
    other = api.as_ps(b.PS_OTHER)
    request = b.consent(pid, "permit", actor=b.PS_OTHER, verified=True)
    assert other.post("Consent", request, headers={"X-Patient-Access-Code": "000000"}).status_code == 403
    assert "access-code" in {basis(e) for e in log.new()}


def test_client_address_and_user_agent(config, build_app, idp, db):
    ua = "Mozilla/5.0 " + "x" * 400
    plain = Api(build_app(config), idp)
    pid = plain.as_ps(b.PS_DR).create(b.patient())["id"]
    log = Journal(db)
    log.new()
    me = plain.as_patient(pid)
    me.get(f"Patient/{pid}", headers={"X-Forwarded-For": "203.0.113.9", "User-Agent": ua})
    [event] = log.new()
    assert event["agent"][0]["network"]["address"] == "127.0.0.1"      # no trusted proxy: the TCP peer
    [decision] = [e for e in event["entity"] if e["type"]["code"] == "decision"]
    [agent] = [d["valueString"] for d in decision["detail"] if d["type"] == "user-agent"]
    assert agent == ua[:256]
    behind = Api(build_app(config.with_(trusted_proxies="127.0.0.1, 10.0.0.0/8")), idp)
    behind.as_patient(pid).get(f"Patient/{pid}", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.1.2.3"})
    [event] = log.new()
    assert event["agent"][0]["network"]["address"] == "203.0.113.9"


def test_client_address_rules():
    proxies = Config(trusted_proxies="10.0.0.0/8,::1").trusted_proxies
    assert client_address("10.0.0.1", "1.2.3.4", ()) == "10.0.0.1"
    assert client_address("192.0.2.1", "1.2.3.4", proxies) == "192.0.2.1"            # peer not trusted
    assert client_address("10.0.0.1", "1.2.3.4, 10.9.9.9", proxies) == "1.2.3.4"
    assert client_address("::1", "2001:db8::5", proxies) == "2001:db8::5"
    assert client_address("10.0.0.1", "10.2.2.2", proxies) == "10.2.2.2"             # all trusted: the first
    assert client_address("10.0.0.1", None, proxies) == "10.0.0.1"
    with pytest.raises(ConfigError):
        Config(trusted_proxies="not-an-address")
    assert Config.from_env({"FHIR_DMP_TRUSTED_PROXIES": "192.168.0.0/16"}).trusted_proxies[0].prefixlen == 16
