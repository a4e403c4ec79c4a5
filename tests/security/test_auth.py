"""Authentication: SMART scopes, JWT verification against a real JWKS, Principal.

Every token here is really signed (tests/idp.py); attack tokens are crafted
byte by byte. The JWKS URL path is served by a real HTTP server on loopback.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from werkzeug.datastructures import Headers

from fhir_dmp.runtime.config import Config
from fhir_dmp.http.errors import ServiceUnavailable, Unauthorized
from fhir_dmp.security import devkeys
from fhir_dmp.security.auth import TokenVerifier
from fhir_dmp.security.principal import (ADMIN, BTG, ETREAT, LEGAL_REPRESENTATIVE, PATIENT, PS,
                                         REGULATION_CENTRE, TREAT)
from fhir_dmp.security.scopes import Scopes
from tests.idp import TestIdP
from tests.transports import JwksServer

PS_ID = "810001234567"
BTG_CATEGORY = ('http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"')


# ----------------------------------------------------------------------------- helpers

def b64(data) -> str:
    if not isinstance(data, bytes):
        data = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return f"{b64(header)}.{b64(claims)}.{b64(signature) if signature else ''}"


def hmac_token(alg: str, secret: bytes, header: dict, claims: dict) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64(header)}.{b64(claims)}".encode()
    return f"{signing_input.decode()}.{b64(hmac.new(secret, signing_input, digest).digest())}"


def good_claims(idp: TestIdP, **kw) -> dict:
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": idp.audience, "iat": now, "exp": now + 300,
              "SubjectNameID": PS_ID, "SubjectRole": ["10"], "acr": "eidas1",
              "scope": "user/*.cruds"}
    claims.update(kw)
    return claims


def refused(verifier: TokenVerifier, token: str, error: str = "invalid_token") -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        verifier.authenticate(f"Bearer {token}", {})
    exc = info.value
    assert exc.status == 401
    www = exc.headers["WWW-Authenticate"]
    assert www.startswith(f'Bearer error="{error}"'), www
    # the token never leaks into the error
    assert token not in exc.diagnostics and token not in www
    return exc


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def verifier(idp, tmp_path_factory) -> TokenVerifier:
    # the server's base URL is the tokens' audience, as in a deployment
    return TokenVerifier(Config(data_dir=tmp_path_factory.mktemp("data"), base_url=idp.audience,
                                **idp.config_kwargs()))


@pytest.fixture
def fresh_idp(tmp_path):
    """An IdP of its own, for tests that rotate keys."""
    idp = TestIdP(tmp_path / "idp")
    return idp, TokenVerifier(Config(data_dir=tmp_path / "data", **idp.config_kwargs()))


# ----------------------------------------------------------------------------- scopes

@pytest.mark.parametrize("scope, rtype, allowed", [
    # SMART v2
    ("patient/DocumentReference.rs", "DocumentReference", "rs"),
    ("patient/DocumentReference.rs", "Patient", ""),
    ("user/*.cruds", "Consent", "cruds"),
    ("system/Patient.r", "Patient", "r"),
    ("patient/Consent.cu", "Consent", "cu"),
    ("user/Patient.cud", "Patient", "cud"),
    ("patient/*.s", "AuditEvent", "s"),
    ("patient/DocumentReference.rs user/Binary.r", "Binary", "r"),
    # SMART v1
    ("user/*.read", "DocumentReference", "rs"),
    ("patient/Consent.write", "Consent", "cud"),
    ("patient/Consent.write", "Patient", ""),
    ("user/Patient.*", "Patient", "cruds"),
    ("patient/*.*", "Binary", "cruds"),
    ("patient/Consent.read patient/Consent.write", "Consent", "cruds"),
    # non-resource and malformed scopes grant nothing
    ("openid fhirUser launch/patient offline_access", "Patient", ""),
    ("patient/DocumentReference.sr", "DocumentReference", ""),     # wrong order
    ("patient/DocumentReference.rrs", "DocumentReference", ""),    # repeated letter
    ("patient/DocumentReference.x", "DocumentReference", ""),
    ("patient/documentReference.rs", "DocumentReference", ""),     # not a type name
    ("practitioner/*.cruds", "Patient", ""),                       # unknown context
    ("patient/*.", "Patient", ""),
    ("", "Patient", ""),
    # restricted scopes are kept but not enforced: they fail closed
    ("patient/DocumentReference.rs?category=http://loinc.org|11488-4", "DocumentReference", ""),
])
def test_scope_table(scope, rtype, allowed):
    scopes = Scopes.parse(scope)
    for letter in "cruds":
        assert scopes.allows(rtype, letter) is (letter in allowed), (scope, letter)


def test_scopes_keep_their_text_and_are_hashable():
    text = "openid fhirUser launch/patient patient/Observation.rs?category=laboratory user/*.read"
    scopes = Scopes.parse(text)
    assert str(scopes) == text
    assert scopes.has("openid") and "launch/patient" in scopes
    assert scopes.restrictions("Observation", "r") == ("category=laboratory",)
    assert scopes.restrictions("Observation", "c") == ()
    assert scopes.contexts() == {"patient", "user"}
    assert hash(scopes) == hash(Scopes.parse(text)) and scopes == Scopes.parse(text)
    assert {scopes, Scopes.parse(text)} == {scopes}
    assert Scopes.parse(["user/*.read", "openid  fhirUser"]) == Scopes.parse("user/*.read openid fhirUser")
    assert str(Scopes.parse(None)) == "" and not Scopes.parse(None)
    with pytest.raises(AttributeError):
        scopes.tokens = ()


def test_scopes_all_and_bad_interaction():
    for letter in "cruds":
        assert Scopes.ALL.allows("AuditEvent", letter)
    with pytest.raises(ValueError):
        Scopes.ALL.allows("Patient", "x")
    with pytest.raises(ValueError):
        Scopes.ALL.allows("Patient", "rs")


# ----------------------------------------------------------------------------- signatures and algorithms

@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token(verifier, idp, alg):
    token = idp.ps(PS_ID, alg=alg)
    claims = verifier.verify(token)
    assert claims["SubjectNameID"] == PS_ID and claims["iss"] == idp.issuer
    principal = verifier.authenticate(f"Bearer {token}", {})
    assert principal.kind == PS and principal.id_nat_ps == PS_ID
    # scheme is case-insensitive (RFC 7235 §2.1)
    assert verifier.authenticate(f"bearer {token}", {}).kind == PS


def test_alg_none_refused(verifier, idp):
    token = forge({"alg": "none", "typ": "JWT", "kid": idp.kid()}, good_claims(idp))
    exc = refused(verifier, token)
    assert "not accepted" in exc.diagnostics
    refused(verifier, forge({"alg": "None", "kid": idp.kid()}, good_claims(idp)))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_with_public_key_refused(verifier, idp, alg):
    """Algorithm confusion: HMAC keyed with the RSA public key (PEM and JWK JSON)."""
    for secret in (idp.public_pem(), json.dumps(idp.jwks()["keys"][0]).encode()):
        token = hmac_token(alg, secret, {"alg": alg, "kid": idp.kid()}, good_claims(idp))
        assert "not accepted" in refused(verifier, token).diagnostics


@pytest.mark.parametrize("alg", ["RS512", "PS256", "ES384", "EdDSA", "", None, 42])
def test_other_algorithms_refused(verifier, idp, alg):
    token = idp.ps(PS_ID)
    _, payload, sig = token.split(".")
    header = b64({"alg": alg, "kid": idp.kid()})
    refused(verifier, f"{header}.{payload}.{sig}")


def test_unknown_kid_refused(verifier, idp):
    exc = refused(verifier, idp.ps(PS_ID, kid="not-a-known-kid"))
    assert "kid" in exc.diagnostics


def test_kid_of_the_other_key_type_refused(verifier, idp):
    # an ES256 signature presented under the RSA key's kid
    refused(verifier, idp.ps(PS_ID, alg="ES256", kid=idp.kid("RS256")))


def test_foreign_key_with_same_kid_refused(verifier, idp, tmp_path):
    other = TestIdP(tmp_path, issuer=idp.issuer, audience=idp.audience)
    assert other.kid() == idp.kid()  # same kid, different key
    assert "signature" in refused(verifier, other.ps(PS_ID)).diagnostics


def test_tampered_payload_refused(verifier, idp):
    header, _, sig = idp.ps(PS_ID, purpose="TREAT").split(".")
    payload = b64(good_claims(idp, purpose_of_use="BTG"))
    refused(verifier, f"{header}.{payload}.{sig}")


def test_missing_kid(verifier, idp, dev_config):
    token = idp.token(good_claims(idp), header={"kid": None})
    assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert "kid" in refused(verifier, token).diagnostics  # the IdP has several keys
    # with a single key in the set, a token without kid is unambiguous
    key = devkeys.ensure_dev_key(dev_config)
    from joserfc import jwt
    now = int(time.time())
    token = jwt.encode({"alg": "ES256"}, {"iss": dev_config.expected_issuer, "exp": now + 60,
                                          "aud": dev_config.expected_audience}, key)
    assert TokenVerifier(dev_config).verify(token)["exp"] == now + 60


# ----------------------------------------------------------------------------- key rotation (JWKS file)

def test_rotation_in_jwks_file(fresh_idp):
    idp, verifier = fresh_idp
    old = idp.ps(PS_ID)
    assert verifier.verify(old)
    new_kid = idp.rotate()
    new = idp.ps(PS_ID)
    assert json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))["kid"] == new_kid
    assert verifier.verify(new)["SubjectNameID"] == PS_ID
    assert verifier.verify(old)  # the old key is still published
    # the IdP withdraws the old key: its tokens are refused from then on
    jwks = idp.jwks()
    jwks["keys"] = [k for k in jwks["keys"] if k["kid"] != json.loads(
        base64.urlsafe_b64decode(old.split(".")[0] + "=="))["kid"]]
    tmp = idp.jwks_file.with_suffix(".new")
    tmp.write_text(json.dumps(jwks))
    os.replace(tmp, idp.jwks_file)
    refused(verifier, old)
    assert verifier.verify(new)


def test_broken_jwks_file_keeps_previous_keys(fresh_idp):
    idp, verifier = fresh_idp
    token = idp.ps(PS_ID)
    assert verifier.verify(token)
    idp.jwks_file.write_text("{not json")
    assert verifier.verify(token)


def test_missing_jwks_file_is_503(tmp_path):
    config = Config(data_dir=tmp_path, issuer="https://idp.test", jwks_file=tmp_path / "none.json",
                    audience="https://dmp.test/fhir")
    idp = TestIdP(tmp_path / "idp")
    with pytest.raises(ServiceUnavailable):
        TokenVerifier(config).verify(idp.ps(PS_ID))


def test_concurrent_verification_during_rotation(fresh_idp):
    idp, verifier = fresh_idp
    tokens = [idp.ps(PS_ID, alg=alg) for alg in ("RS256", "ES256")]

    def work(i):
        if i % 10 == 0:
            idp.rotate("ES256")
        return verifier.verify(tokens[i % 2])["SubjectNameID"]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(work, range(60))) == {PS_ID}


# ----------------------------------------------------------------------------- registered claims

def test_wrong_issuer_and_audience(verifier, idp):
    assert "issuer" in refused(verifier, idp.ps(PS_ID, iss="https://evil.test")).diagnostics
    assert "audience" in refused(verifier, idp.ps(PS_ID, aud="https://other.test/fhir")).diagnostics
    refused(verifier, idp.ps(PS_ID, aud=["https://other.test/fhir"]))
    refused(verifier, idp.ps(PS_ID, iss=None))
    refused(verifier, idp.ps(PS_ID, aud=None))
    # aud may be a list that contains us
    assert verifier.verify(idp.ps(PS_ID, aud=["https://other.test", idp.audience]))


def test_expiry_and_leeway(verifier, idp):
    now = int(time.time())
    assert "expired" in refused(verifier, idp.ps(PS_ID, exp=now - 120, iat=now - 600)).diagnostics
    assert verifier.verify(idp.ps(PS_ID, exp=now - 30, iat=now - 600))  # within 60 s leeway
    assert "missing" in refused(verifier, idp.ps(PS_ID, exp=None)).diagnostics
    refused(verifier, idp.ps(PS_ID, exp="tomorrow"))


def test_not_before_and_issued_at(verifier, idp):
    now = int(time.time())
    assert "not yet valid" in refused(verifier, idp.ps(PS_ID, nbf=now + 300)).diagnostics
    assert verifier.verify(idp.ps(PS_ID, nbf=now + 30))
    assert "future" in refused(verifier, idp.ps(PS_ID, iat=now + 300)).diagnostics
    assert verifier.verify(idp.ps(PS_ID, iat=now + 30))


# ----------------------------------------------------------------------------- Authorization header

@pytest.mark.parametrize("authorization", [None, "", "   "])
def test_missing_token(verifier, authorization):
    with pytest.raises(Unauthorized) as info:
        verifier.authenticate(authorization, {})
    assert info.value.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b",
                                           "Token abc.def.ghi"])
def test_malformed_authorization(verifier, authorization):
    with pytest.raises(Unauthorized) as info:
        verifier.authenticate(authorization, {})
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_request"')


@pytest.mark.parametrize("token", [
    "abc", "a.b", "a.b.c", "....", "..", "a.b.c.d.e", "é.é.é", "%%%.%%%.%%%",
    b64(b"[1,2]") + ".e30.", b64(b"not json") + ".e30.", b64({"alg": "RS256"}) + ".bm90IGpzb24.c2ln",
    "x" * 20000,
])
def test_malformed_tokens(verifier, token):
    refused(verifier, token)


def test_bad_payload_with_valid_signature_shape(verifier, idp):
    # a real signature over a payload that is not a JSON object
    from joserfc import jws
    token = jws.serialize_compact({"alg": "RS256", "kid": idp.kid()}, b"[1,2,3]",
                                  idp.signing["RS256"], algorithms=["RS256"])
    refused(verifier, token)


def test_token_never_logged(verifier, idp, caplog):
    caplog.set_level(logging.DEBUG)
    bad = idp.ps(PS_ID, iss="https://evil.test")
    refused(verifier, bad)
    ok = idp.ps(PS_ID)
    verifier.authenticate(f"Bearer {ok}", {})
    assert bad not in caplog.text and ok not in caplog.text


# ----------------------------------------------------------------------------- two-factor (RFC 9470)

@pytest.mark.parametrize("acr", [None, "", "eidas2", "urn:mace:incommon:iap:silver"])
def test_ps_without_eidas1_gets_step_up(verifier, idp, acr):
    for token in (idp.ps(PS_ID, acr=acr), idp.regulation_centre(PS_ID, acr=acr)):
        exc = refused(verifier, token, error="insufficient_user_authentication")
        assert 'acr_values="eidas1"' in exc.headers["WWW-Authenticate"]


def test_patient_needs_no_eidas1(verifier, idp):
    assert verifier.authenticate(f"Bearer {idp.patient('p1')}", {}).kind == PATIENT


# ----------------------------------------------------------------------------- principals

def test_patient_principal(verifier, idp):
    p = verifier.authenticate(f"Bearer {idp.patient('p-42', name='Jeanne Martin')}", {})
    assert (p.kind, p.patient_id, p.id_nat_ps, p.name) == (PATIENT, "p-42", None, "Jeanne Martin")
    assert p.scopes.allows("DocumentReference", "r") and p.mode is None
    assert p.reference() == {"reference": "Patient/p-42"}
    # absolute fhirUser URL
    absolute = idp.token(fhirUser="https://dmp.test/fhir/Patient/p-43", scope="patient/*.rs")
    assert verifier.authenticate(f"Bearer {absolute}", {}).patient_id == "p-43"


def test_legal_representative_principal(verifier, idp):
    # the token names the RelatedPerson; the patient is found by the repository (test_lifecycle)
    p = verifier.authenticate(f"Bearer {idp.legal_rep('rp-7')}", {})
    assert (p.kind, p.patient_id, p.related_person_id) == (LEGAL_REPRESENTATIVE, None, "rp-7")
    refused(verifier, idp.token(dmp_role="legal_representative", fhirUser="Practitioner/1"))
    refused(verifier, idp.token(dmp_role="legal_representative", fhirUser="Patient/p-7"))


# CONTRACT.md "Who the caller is": a fhirUser is relative or on this server's base URL (issue 18)
OWN_BASES = ["https://dmp.test/fhir", "HTTPS://DMP.Test/fhir", "https://dmp.test:443/fhir"]
OTHER_BASES = ["https://other.example/fhir", "http://dmp.test/fhir", "https://dmp.test:8443/fhir",
               "https://dmp.test/fhir.evil", "https://dmp.test/fhirX", "https://dmp.test/fhir/x",
               "https://dmp.test", "https://dmp.test.evil/fhir", "https://dmp.test@evil.example/fhir",
               "https://evil.example/?https://dmp.test/fhir", "//dmp.test/fhir", "/fhir", "dmp.test/fhir",
               "https://dmp.test/FHIR", "https://dmp.test/fhir/"]


@pytest.mark.parametrize("base", OWN_BASES)
def test_fhir_user_on_this_server_names_the_caller(verifier, idp, base):
    p = verifier.authenticate(f"Bearer {idp.patient('p-1', fhirUser=f'{base}/Patient/p-1')}", {})
    assert (p.kind, p.patient_id, p.compartment) == (PATIENT, "p-1", "p-1")
    p = verifier.authenticate(f"Bearer {idp.legal_rep('rp-1', fhirUser=f'{base}/RelatedPerson/rp-1')}", {})
    assert (p.kind, p.related_person, p.related_person_id) == (LEGAL_REPRESENTATIVE, "RelatedPerson/rp-1", "rp-1")


@pytest.mark.parametrize("base", OTHER_BASES)
def test_fhir_user_on_another_server_is_refused(verifier, idp, base):
    refused(verifier, idp.patient("p-1", fhirUser=f"{base}/Patient/p-1", scope="patient/*.rs"))
    refused(verifier, idp.legal_rep("rp-1", fhirUser=f"{base}/RelatedPerson/rp-1"))
    # a professional's fhirUser (its Practitioner, often at the IdP) never names the patient
    assert verifier.authenticate(f"Bearer {idp.ps(PS_ID, fhirUser=f'{base}/Patient/p-1')}", {}).kind == PS


def test_base_url_with_a_trailing_slash(idp, tmp_path):
    verifier = TokenVerifier(Config(data_dir=tmp_path, base_url="https://dmp.test/fhir/", **idp.config_kwargs()))
    assert verifier.authenticate(
        f"Bearer {idp.patient('p-1', fhirUser='https://dmp.test/fhir/Patient/p-1')}", {}).patient_id == "p-1"
    refused(verifier, idp.patient("p-1", fhirUser="https://dmp.test/fhirX/Patient/p-1"))


def test_ps_principal(verifier, idp):
    token = idp.ps(PS_ID, profession="21", given_name="Paul", family_name="Durand",
                   organization="1.2.250.1.71.4.2.2|10B0012345", azp="lgc-app",
                   SubjectRole=["21^1.2.250.1.71.1.2.7", "10"])
    p = verifier.authenticate(f"Bearer {token}", {})
    assert p.kind == PS and p.is_professional and p.mode == "normal"
    assert p.professions == ("21", "10") and p.profession == "21"
    assert (p.name, p.organization, p.client_id, p.acr) == (
        "Paul Durand", "1.2.250.1.71.4.2.2|10B0012345", "lgc-app", "eidas1")
    assert p.purpose == TREAT and p.patient_id is None
    assert p.reference()["identifier"]["value"] == PS_ID
    # SubjectRole as one string, client_id preferred to azp
    p = verifier.authenticate(f"Bearer {idp.ps(PS_ID, SubjectRole='60^1.2.250.1.71.1.2.7', client_id='c1', azp='c2')}", {})
    assert p.professions == ("60",) and p.client_id == "c1"


def test_regulation_centre_principal(verifier, idp):
    p = verifier.authenticate(f"Bearer {idp.regulation_centre(PS_ID)}", {})
    assert (p.kind, p.id_nat_ps, p.professions, p.purpose, p.mode) == (
        REGULATION_CENTRE, PS_ID, ("10",), ETREAT, "centre_15")
    refused(verifier, idp.token(dmp_role="regulation_centre", acr="eidas1"))


def test_admin_and_unfitting_principals(verifier, idp):
    p = verifier.authenticate(f"Bearer {idp.admin()}", {})
    assert (p.kind, p.patient_id, p.id_nat_ps, p.subject) == (ADMIN, None, None, "admin-1")
    # CONTRACT.md "Who the caller is": a token that fits no kind gets 401 invalid_token
    refused(verifier, idp.token(sub='someone'))
    # a role outside the habilitation data fits no kind either, even with PS claims
    refused(verifier, idp.ps(PS_ID, dmp_role="occupational_medicine"))
    # the role wins over fhirUser: an admin is never the DMP owner
    assert verifier.authenticate(f"Bearer {idp.admin(fhirUser='Patient/p1')}", {}).patient_id is None


# ----------------------------------------------------------------------------- purpose of use

CODING_BTG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG"}


@pytest.mark.parametrize("claims, purpose", [
    ({}, TREAT),
    ({"purpose_of_use": "TREAT"}, TREAT),
    ({"purpose_of_use": "BTG"}, BTG),
    ({"purpose_of_use": "ETREAT"}, ETREAT),
    ({"purpose_of_use": CODING_BTG}, BTG),
    ({"purpose_of_use": {"coding": [CODING_BTG]}}, BTG),
    ({"purpose_of_use": ["BTG"]}, BTG),
    ({"purpose_of_use": "urn:oid:2.16.840.1.113883.5.8#ETREAT"}, ETREAT),
    ({"extensions": {"ihe_iua": {"purpose_of_use": CODING_BTG, "subject_name": "Dr X"}}}, BTG),
    ({"extensions": {"ihe_iua": {"purpose_of_use": {"code": "ETREAT"}}}}, ETREAT),
    ({"purpose_of_use": "BTG", "extensions": {"ihe_iua": {"purpose_of_use": CODING_BTG}}}, BTG),
])
def test_purpose_from_claims(verifier, idp, claims, purpose):
    p = verifier.authenticate(f"Bearer {idp.ps(PS_ID, **claims)}", {})
    assert p.purpose == purpose


@pytest.mark.parametrize("claims", [
    {"purpose_of_use": "HOPERAT"},
    {"purpose_of_use": {"system": "http://example.org/other", "code": "BTG"}},
    {"purpose_of_use": ["BTG", "TREAT"]},
    {"purpose_of_use": 3},
    {"purpose_of_use": "TREAT", "extensions": {"ihe_iua": {"purpose_of_use": CODING_BTG}}},
])
def test_bad_purpose_refused(verifier, idp, claims):
    refused(verifier, idp.ps(PS_ID, **claims))


def test_break_glass_from_category_header(verifier, idp):
    token = idp.ps(PS_ID)
    p = verifier.authenticate(f"Bearer {token}", {"Category": BTG_CATEGORY,
                                                  "X-Break-Glass-Reason": "patient inconscient"})
    assert (p.purpose, p.btg_reason, p.mode) == (BTG, "patient inconscient", "bris_de_glace")
    # header names are case-insensitive; werkzeug Headers with several Category values
    headers = Headers([("category", 'http://example.org/x#y; scheme="http://hl7.org/fhir/tag"'),
                       ("Category", f'http://example.org/a#b; scheme="urn:x", {BTG_CATEGORY}'),
                       ("x-break-glass-reason", "arrêt cardiaque".encode().decode("latin-1"))])
    p = verifier.authenticate(f"Bearer {token}", headers)
    assert (p.purpose, p.btg_reason) == (BTG, "arrêt cardiaque")
    # reason from the token
    p = verifier.authenticate(f"Bearer {idp.ps(PS_ID, btg_reason='urgence vitale')}",
                              {"category": BTG_CATEGORY})
    assert (p.purpose, p.btg_reason) == (BTG, "urgence vitale")


@pytest.mark.parametrize("category", [
    'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG',                                 # no scheme
    'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; scheme="http://example.org"',    # other scheme
    'http://terminology.hl7.org/CodeSystem/v3-ActReason#TREAT; scheme="http://hl7.org/fhir/tag/security"',
    'BTG; scheme="http://hl7.org/fhir/tag/security"',
    'garbage;;;"',
])
def test_other_category_headers_do_not_break_the_glass(verifier, idp, category):
    p = verifier.authenticate(f"Bearer {idp.ps(PS_ID)}", {"Category": category})
    assert p.purpose == TREAT


# ----------------------------------------------------------------------------- JWKS over HTTP

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _jwks_url_config(jwks_server, tmp_path, document=...) -> tuple[TestIdP, Config]:
    """An IdP whose key set the local HTTP server publishes at ``/jwks`` (``document`` instead
    when given; None: nothing there, 404), and the Config that trusts that URL."""
    idp = TestIdP(tmp_path / "idp")
    document = idp.jwks() if document is ... else document
    if document is not None:
        jwks_server.routes["/jwks"] = document
    return idp, Config(data_dir=tmp_path / "data", issuer=idp.issuer, audience=idp.audience,
                       jwks_url=f"{jwks_server.url}/jwks")


def test_jwks_url_refetch_on_unknown_kid(jwks_server, tmp_path):
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    clock = Clock()
    verifier = TokenVerifier(config, clock=clock)
    assert verifier.verify(idp.ps(PS_ID))
    assert verifier.verify(idp.ps(PS_ID, alg="ES256"))
    assert jwks_server.hits["/jwks"] == 1  # cached

    idp.rotate()
    jwks_server.routes["/jwks"] = idp.jwks()
    rotated = idp.ps(PS_ID)
    clock.now += 1  # too soon after the last fetch: no refetch, refused
    refused(verifier, rotated)
    assert jwks_server.hits["/jwks"] == 1
    clock.now += 5  # spacing elapsed: the unknown kid triggers one refetch
    assert verifier.verify(rotated)["SubjectNameID"] == PS_ID
    assert jwks_server.hits["/jwks"] == 2
    # a flood of unknown kids costs at most one fetch per interval
    for _ in range(20):
        refused(verifier, idp.ps(PS_ID, kid="bogus"))
    assert jwks_server.hits["/jwks"] == 2
    clock.now += 5
    refused(verifier, idp.ps(PS_ID, kid="bogus"))
    assert jwks_server.hits["/jwks"] == 3


def test_a_key_set_seen_elsewhere_withdraws_keys_but_never_adds_one(jwks_server, tmp_path):
    """CONTRACT.md "Access tokens" (issue 18): what another process recorded of the issuer's
    keys (auth.SharedKeys; between live servers: test_two_processes) withdraws the keys it no
    longer lists, and lets a kid this process lacks be fetched at once; it never makes a key
    trusted."""
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    clock = Clock()
    verifier = TokenVerifier(config, clock=clock)
    recorded = []
    verifier.keys.publish = recorded.append
    token = idp.ps(PS_ID)
    assert verifier.verify(token) and verifier.verify(idp.ps(PS_ID, alg="ES256"))
    assert recorded == []                  # a first load, no record yet: nothing to tell
    # a record older than this process's own load withdraws nothing; as it differs, the process
    # records what it loaded (kids and thumbprints: public data only)
    verifier.keys.adopt({"keys": [], "at": 1.0})
    assert verifier.verify(token)
    [mine] = recorded
    assert [kid for kid, _ in mine["keys"]] == sorted([idp.kid("RS256"), idp.kid("ES256")])
    assert mine["at"] > 1.0 and '"d"' not in json.dumps(recorded) and "'d'" not in str(recorded)
    listed = mine["keys"]
    verifier.keys.adopt(mine)              # its own record, back through the change stream
    assert verifier.verify(token) and len(recorded) == 1
    # a record that lists a key this process never loaded trusts nothing new; the next unknown
    # kid is fetched from the issuer at once (no refetch spacing: someone saw a newer set)
    verifier.keys.adopt({"keys": [*listed, ["bogus", "x"]], "at": time.time() + 1})
    assert verifier.verify(token)
    refused(verifier, idp.ps(PS_ID, kid="bogus"))
    assert jwks_server.hits["/jwks"] == 2
    # a later record without the RS256 key withdraws it, tokens verified before included, with
    # no fetch (too soon after the last); the ES256 key stays
    verifier = TokenVerifier(config, clock=clock)
    assert verifier.verify(token)
    verifier.keys.adopt({"keys": [p for p in listed if p[0] != idp.kid()], "at": time.time() + 1})
    refused(verifier, token)
    assert verifier.verify(idp.ps(PS_ID, alg="ES256"))
    assert jwks_server.hits["/jwks"] == 3
    # a later record with another key under its kid withdraws it too; that kid is fetched at once,
    # and what the issuer publishes decides (here: it still publishes the key)
    verifier = TokenVerifier(config, clock=clock)
    assert verifier.verify(token)
    verifier.keys.adopt({"keys": [[kid, "another" if kid == idp.kid() else jkt] for kid, jkt in listed],
                         "at": time.time() + 1})
    assert verifier.keys._keys.get_by_kid(idp.kid("ES256")) and len(verifier.keys._keys.keys) == 1
    assert verifier.verify(token) and jwks_server.hits["/jwks"] == 5
    # a load that finds a key gone records the new set at once, record or not
    recorded.clear()
    verifier.keys.publish = recorded.append
    old_kid = idp.kid()
    idp.rotate()
    jwks_server.routes["/jwks"] = {"keys": [k for k in idp.jwks()["keys"] if k["kid"] != old_kid]}
    clock.now += 5
    assert verifier.verify(idp.ps(PS_ID))
    [seen] = recorded
    assert sorted(kid for kid, _ in seen["keys"]) == sorted([idp.kid("RS256"), idp.kid("ES256")])
    refused(verifier, token)


def _rotate_and_withdraw(idp, jwks_server) -> str:
    """The IdP rotates its key and stops publishing the old one; the new kid."""
    old_kid = idp.kid()
    new_kid = idp.rotate()
    jwks_server.routes["/jwks"] = {"keys": [k for k in idp.jwks()["keys"] if k["kid"] != old_kid]}
    return new_kid if new_kid != old_kid else ""


def test_jwks_rotation_trusts_only_published_keys(jwks_server, tmp_path):
    """Review hole 10 (issue 9): after a rotation, a key the issuer no longer publishes is refused."""
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    clock = Clock()
    verifier = TokenVerifier(config, clock=clock)
    old_token = idp.token(sub="x")
    assert verifier.verify(old_token)["sub"] == "x"
    new_kid = _rotate_and_withdraw(idp, jwks_server)
    new_token = idp.token(sub="y")
    clock.now += 10                    # the new kid triggers a refetch (spaced)
    assert verifier.verify(new_token)["sub"] == "y"
    with pytest.raises(Unauthorized):
        verifier.verify(old_token)
    assert new_kid


def test_jwks_cache_has_a_bounded_lifetime(jwks_server, tmp_path):
    """Review hole 10 (issue 9): a withdrawn key stops being trusted within the cache's lifetime,
    even when no unknown kid ever triggers a refetch."""
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    clock = Clock()
    verifier = TokenVerifier(config, clock=clock)
    token = idp.token(sub="x")
    assert verifier.verify(token)["sub"] == "x"
    _rotate_and_withdraw(idp, jwks_server)   # the issuer replaced its key (compromise)...
    clock.now += 600                   # ten minutes later, without any unknown kid
    with pytest.raises(Unauthorized):
        verifier.verify(token)


def test_jwks_url_default_spacing_and_outage(jwks_server, tmp_path):
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    verifier = TokenVerifier(config)  # real clock, 5 s spacing
    token = idp.ps(PS_ID)
    assert verifier.verify(token)
    idp.rotate()
    jwks_server.routes["/jwks"] = idp.jwks()
    refused(verifier, idp.ps(PS_ID))  # within 5 s of the first fetch
    assert jwks_server.hits["/jwks"] == 1
    # the IdP goes down: cached keys keep working
    jwks_server.close()
    assert verifier.verify(token)


def test_jwks_url_unreachable_is_503(tmp_path):
    idp = TestIdP(tmp_path / "idp")
    server = JwksServer()
    url = f"{server.url}/jwks"
    server.close()  # nothing listens there any more
    config = Config(data_dir=tmp_path / "data", issuer=idp.issuer, audience=idp.audience, jwks_url=url)
    with pytest.raises(ServiceUnavailable):
        TokenVerifier(config).verify(idp.ps(PS_ID))


def test_jwks_from_discovery_document(jwks_server, tmp_path):
    issuer = jwks_server.url + "/realms/dmp"
    idp = TestIdP(tmp_path / "idp", issuer=issuer)
    jwks_server.routes["/realms/dmp/.well-known/openid-configuration"] = {
        "issuer": issuer, "jwks_uri": f"{jwks_server.url}/realms/dmp/certs"}
    jwks_server.routes["/realms/dmp/certs"] = idp.jwks()
    config = Config(data_dir=tmp_path / "data", issuer=issuer, audience=idp.audience)
    verifier = TokenVerifier(config, refetch_interval=0)
    assert verifier.authenticate(f"Bearer {idp.patient('p1')}", {}).patient_id == "p1"
    idp.rotate("ES256")
    jwks_server.routes["/realms/dmp/certs"] = idp.jwks()
    assert verifier.verify(idp.patient("p1", alg="ES256"))
    assert jwks_server.hits["/realms/dmp/.well-known/openid-configuration"] == 1
    assert jwks_server.hits["/realms/dmp/certs"] == 2


def test_discovery_issuer_mismatch_is_503(jwks_server, tmp_path):
    issuer = jwks_server.url + "/idp"
    idp = TestIdP(tmp_path / "idp", issuer=issuer)
    jwks_server.routes["/idp/.well-known/openid-configuration"] = {
        "issuer": "https://evil.test", "jwks_uri": f"{jwks_server.url}/certs"}
    jwks_server.routes["/certs"] = idp.jwks()
    verifier = TokenVerifier(Config(data_dir=tmp_path / "data", issuer=issuer, audience=idp.audience))
    with pytest.raises(ServiceUnavailable):
        verifier.verify(idp.ps(PS_ID))
    assert "/certs" not in jwks_server.hits


# ----------------------------------------------------------------------------- dev mode

@pytest.fixture
def dev_config(tmp_path):
    return Config(data_dir=tmp_path / "dev", port=8099)


def test_dev_key_created_once_private(dev_config):
    key = devkeys.ensure_dev_key(dev_config)
    assert key.kid and key.is_private
    assert oct(dev_config.dev_key_path.stat().st_mode & 0o777) == "0o600"
    assert devkeys.ensure_dev_key(dev_config).kid == key.kid
    assert [p.name for p in dev_config.dev_key_path.parent.iterdir()] == [dev_config.dev_key_path.name]


def test_dev_key_race(dev_config):
    with ThreadPoolExecutor(8) as pool:
        kids = set(pool.map(lambda _: devkeys.ensure_dev_key(dev_config).kid, range(16)))
    assert len(kids) == 1
    assert json.loads(dev_config.dev_key_path.read_text())["kid"] in kids


def test_dev_tokens_of_each_kind(dev_config):
    verifier = TokenVerifier(dev_config)
    mint = lambda kind, **kw: verifier.authenticate(f"Bearer {devkeys.mint_token(dev_config, kind, **kw)}", {})
    p = mint("patient", patient="p1")
    assert (p.kind, p.patient_id, p.client_id) == (PATIENT, "p1", devkeys.DEV_CLIENT_ID)
    assert p.scopes.allows("Consent", "c") and "patient" in p.scopes.contexts()
    assert mint("legal_representative", related_person="rp1").related_person_id == "rp1"
    p = mint("ps", id_nat_ps=PS_ID, profession="60", purpose="BTG", btg_reason="coma",
             organization="10B0012345", name="Dr Who", scope="user/DocumentReference.rs")
    assert (p.kind, p.professions, p.purpose, p.btg_reason, p.organization, p.name) == (
        PS, ("60",), BTG, "coma", "10B0012345", "Dr Who")
    assert p.scopes.allows("DocumentReference", "s") and not p.scopes.allows("Consent", "c")
    p = mint("regulation_centre", id_nat_ps=PS_ID)
    assert (p.kind, p.purpose) == (REGULATION_CENTRE, ETREAT)
    assert mint("admin").kind == ADMIN
    assert mint("ps", id_nat_ps=PS_ID, profession="10", extra={"dmp_role": "admin"}).kind == ADMIN
    claims = verifier.verify(devkeys.mint_token(dev_config, "admin", lifetime=60))
    assert claims["iss"] == dev_config.expected_issuer and claims["aud"] == "http://127.0.0.1:8099/fhir"
    assert claims["exp"] - claims["iat"] == 60
    # a dev PS token without two-factor is refused like any other
    with pytest.raises(Unauthorized) as info:
        mint("ps", id_nat_ps=PS_ID, profession="10", acr="loa1")
    assert "insufficient_user_authentication" in info.value.headers["WWW-Authenticate"]


@pytest.mark.parametrize("kind, kw, words", [
    ("ps", {"profession": "10"}, "id_nat_ps"),
    ("ps", {"id_nat_ps": PS_ID}, "profession"),
    ("patient", {}, "patient"),
    ("legal_representative", {}, "related_person"),
    ("regulation_centre", {}, "id_nat_ps"),
    ("nurse", {}, "unknown token kind"),
    ("ps", {"id_nat_ps": PS_ID, "profession": "10", "purpose": "FUN"}, "purpose"),
])
def test_mint_token_argument_errors(dev_config, kind, kw, words):
    with pytest.raises(ValueError, match=words):
        devkeys.mint_token(dev_config, kind, **kw)


def test_dev_and_idp_keys_do_not_mix(dev_config, verifier, idp):
    dev_token = devkeys.mint_token(dev_config, "admin")
    refused(verifier, dev_token)
    refused(TokenVerifier(dev_config), idp.admin(iss=dev_config.expected_issuer,
                                                 aud=dev_config.expected_audience))


def test_scope_claim_forms(verifier, idp):
    p = verifier.authenticate(f"Bearer {idp.patient('p1', scope=None, scp=['patient/Consent.rs'])}", {})
    assert p.scopes.allows("Consent", "s") and not p.scopes.allows("Consent", "c")
    p = verifier.authenticate(f"Bearer {idp.patient('p1', scope=None)}", {})
    assert not p.scopes and not p.scopes.allows("Patient", "r")
    refused(verifier, idp.patient("p1", scope=42))


@pytest.mark.parametrize("document", [None, {"keys": []}, {"keys": [{"kty": "RSA"}]}, {"nokeys": 1}])
def test_jwks_url_unusable_document_is_503(jwks_server, tmp_path, document):
    idp, config = _jwks_url_config(jwks_server, tmp_path, document)   # None: 404
    with pytest.raises(ServiceUnavailable):
        TokenVerifier(config, refetch_interval=0).verify(idp.ps(PS_ID))


def test_jwks_refreshed_ahead_off_the_request_path_and_tokens_cached(jwks_server, tmp_path):
    """Half-way through the key set's life a lookup answers from the cached set and fetches the
    next one in the background; a verified token is then served from the token cache until it
    expires, as long as its key is still published."""
    from fhir_dmp.security.auth import JWKS_MAX_AGE
    idp, config = _jwks_url_config(jwks_server, tmp_path)
    clock = Clock()
    verifier = TokenVerifier(config, clock=clock)
    token = idp.ps(PS_ID)
    assert verifier.verify(token) is verifier.verify(token)     # the second one from the cache
    assert jwks_server.hits["/jwks"] == 1
    clock.now += JWKS_MAX_AGE * 0.6
    assert verifier.verify(token)["SubjectNameID"] == PS_ID     # no wait for the fetch
    deadline = time.monotonic() + 5
    while jwks_server.hits["/jwks"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jwks_server.hits["/jwks"] == 2
    # the issuer withdraws the key: the cached token is not trusted any more
    idp.rotate()
    jwks_server.routes["/jwks"] = {"keys": [k for k in idp.jwks()["keys"] if k["kid"] != idp.kid("ES256")
                                            and k["kid"] == idp.kid()]}
    clock.now += JWKS_MAX_AGE   # the set expires: fetched again, the old key is gone
    refused(verifier, token)


# ----------------------------------------------------------------------------- the Principal of a verified token

def test_the_principal_of_a_verified_token_is_built_once_per_token_and_break_glass_headers(fresh_idp):
    """Issue 22: a token's Principal is remembered with its verification, per break-glass headers;
    a withdrawn key, another token or other break-glass headers build it again; a refusal is never
    remembered."""
    idp, verifier = fresh_idp
    token = idp.ps(PS_ID)
    first = verifier.authenticate(f"Bearer {token}", Headers())
    assert verifier.authenticate(f"Bearer {token}", Headers({"Accept": "application/fhir+json"})) is first
    btg = verifier.authenticate(f"Bearer {token}", Headers({"Category": BTG_CATEGORY,
                                                            "X-Break-Glass-Reason": "arrêt cardiaque"}))
    assert btg.purpose == BTG and btg.btg_reason == "arrêt cardiaque" and first.purpose != BTG
    other_reason = verifier.authenticate(f"Bearer {token}", Headers({"Category": BTG_CATEGORY,
                                                                     "X-Break-Glass-Reason": "malaise"}))
    assert other_reason.btg_reason == "malaise"
    assert verifier.authenticate(f"Bearer {idp.ps('810000000777')}", Headers()).id_nat_ps == "810000000777"
    assert verifier.authenticate(f"Bearer {token}", Headers()) is first
    # the key is withdrawn: the token is refused, though its Principal was remembered
    old_kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
    idp.rotate()
    jwks = idp.jwks()
    jwks["keys"] = [k for k in jwks["keys"] if k["kid"] != old_kid]
    tmp = idp.jwks_file.with_suffix(".new")
    tmp.write_text(json.dumps(jwks))
    os.replace(tmp, idp.jwks_file)
    with pytest.raises(Unauthorized):
        verifier.authenticate(f"Bearer {token}", Headers())
    # a refusal of the claims (a PS without eidas1: step-up) is asked again every time
    weak = idp.ps(PS_ID, acr="loa1")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.authenticate(f"Bearer {weak}", Headers())


def test_break_glass_headers_read_from_a_wsgi_environ_as_from_a_header_list(fresh_idp):
    """The request's headers (werkzeug's EnvironHeaders, read by key) give the same Principal as
    the same headers in a list: the break-glass Category among others (joined by the server, PEP
    3333), and its reason."""
    from werkzeug.datastructures import EnvironHeaders
    idp, verifier = fresh_idp
    token = idp.ps(PS_ID)
    joined = f'x; scheme="other", {BTG_CATEGORY}'
    environ = {"HTTP_CATEGORY": joined, "HTTP_X_BREAK_GLASS_REASON": "arrêt cardiaque".encode().decode("latin-1"),
               "HTTP_ACCEPT": "application/fhir+json"}
    from_environ = verifier.authenticate(f"Bearer {token}", EnvironHeaders(environ))
    from_list = verifier.authenticate(f"Bearer {token}", Headers([("Category", 'x; scheme="other"'),
                                                                  ("Category", BTG_CATEGORY),
                                                                  ("X-Break-Glass-Reason", "arrêt cardiaque")]))
    assert from_environ.purpose == from_list.purpose == BTG
    assert from_environ.btg_reason == from_list.btg_reason == "arrêt cardiaque"
    plain = verifier.authenticate(f"Bearer {token}", EnvironHeaders({"HTTP_ACCEPT": "application/fhir+json"}))
    assert plain.purpose != BTG
