"""Signing in to the portal through a real OpenID Connect provider (``tests/oidc_provider.py``,
authlib's server on a real socket), in a real headless Chromium.

The server runs with ``FHIR_DMP_ISSUER`` = the provider; the portal is its client
``dmp-portal`` (confidential, with PKCE S256). The access token the portal gets is the caller's
token: the journal names the patient, and a professional's token from the same provider sees
the effect of the patient's choices through the FHIR API.
"""
from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.services import services
from tests import builders
from tests.api import Api
from tests.oidc_provider import OidcProvider, load_clients
from tests.portal_kit import LiveServer, free_port, open_portal, unique_db

PATIENT_ID = "oidc-claire"
PS = "899700218896"                    # the kit's psc-ps-m2m professional (médecin)


@pytest.fixture(scope="module")
def oidc_server(mongo_server, mongo_client, tmp_path_factory):
    work = tmp_path_factory.mktemp("op")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    base = origin + "/fhir"
    clients = load_clients()
    clients["clients"].append({
        "client_id": "dmp-portal", "client_secret": "dmp-portal-secret",
        "token_endpoint_auth_method": "client_secret_basic", "grant_types": ["authorization_code"],
        "response_types": ["code"], "claims": {},
        # one client for every signed-in space (fhir_dmp.spaces): the portal, the officer's pages
        "redirect_uris": [origin + "/portal/callback", origin + "/privacy/callback"]})
    clients["accounts"]["claire"] = {"password": "claire-password",
                                     "profile": {"given_name": "Claire", "family_name": "Martin"},
                                     "claims": {"fhirUser": f"Patient/{PATIENT_ID}"}}
    clients["accounts"]["dpo"] = {"password": "dpo-password", "profile": {"given_name": "Anne", "family_name": "Leroy"},
                                  "claims": {"dmp_role": "privacy_officer", "name": "Anne Leroy"}}
    op = OidcProvider(clients=clients, audience=base)
    db = unique_db(mongo_client)
    cfg = Config(mongodb_uri=mongo_server.uri, db_name=db.name, data_dir=work / "data", base_url=base,
                 issuer=op.issuer, portal_client_id="dmp-portal", portal_client_secret="dmp-portal-secret",
                 notifications_worker=False, audit_sealer=False)
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    app = create_app(cfg, client=mongo_client, db=db)
    live = LiveServer(app, port)
    api = Api(app, None)
    ps = api.as_token(op.client_token("psc-ps-m2m", "user/*.cruds", base))
    # the DMP with the id the provider's account names: a client-chosen id is the administrator's
    # (fhir-dmp load), then the professional attests the patient's agreement (first access)
    from fhir_dmp.runtime.loader import LOADER
    from fhir_dmp.guard.repository import GuardedRepository
    admin = GuardedRepository(services(app), LOADER)
    admin.update("Patient", PATIENT_ID, {**builders.patient(), "id": PATIENT_ID})
    admin.flush_audit()
    attest = builders.consent(PATIENT_ID, "permit", actor=PS, verified=True)
    created = ps.post("Consent", attest)
    assert created.status_code == 201, created.get_data(as_text=True)
    yield SimpleNamespace(url=live.url, op=op, api=api, ps=ps, base=base)
    live.stop()
    stop_background(app)
    op.stop()
    mongo_client.drop_database(db.name)


def test_login_redirects_to_the_issuer_with_pkce_s256(oidc_server):
    r = requests.get(oidc_server.url + "/portal/login", allow_redirects=False, timeout=10)
    assert r.status_code == 302
    where = urlsplit(r.headers["Location"])
    assert f"{where.scheme}://{where.netloc}" == oidc_server.op.issuer
    query = parse_qs(where.query)
    assert query["client_id"] == ["dmp-portal"]
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) >= 43
    assert query["scope"] == ["openid fhirUser patient/*.cruds"]
    assert query["redirect_uri"] == [oidc_server.url + "/portal/callback"]
    assert query["resource"] == [oidc_server.base]
    assert query["state"] and query["nonce"]
    # the dev sign-in does not exist with an issuer
    assert 'data-testid="dev-login"' not in r.text


def _sign_in(portal, oidc_server, login: str, password: str, space: str = "/portal/") -> None:
    portal.go(space)
    assert portal.d.current_url.startswith(oidc_server.op.issuer + "/interaction/")
    form = portal.css("form#login")
    portal.fill(form, login=login, password=password)
    portal.submit(form)
    portal.submit(portal.css("form#consent"))       # the provider's consent page: Allow


def test_a_patient_signs_in_at_the_provider_and_revokes_a_professional(browser, oidc_server):
    portal = open_portal(browser, oidc_server.url)
    assert oidc_server.ps.get(f"Patient/{PATIENT_ID}").status_code == 200
    _sign_in(portal, oidc_server, "claire", "claire-password")
    assert portal.path == "/portal/", portal.d.page_source[:1500]
    assert "Claire Martin" in portal.css("h1").text
    assert portal.all("dev-banner") == []                             # not dev mode
    cookie = next(c for c in browser.get_cookies() if c["name"] == "fhir_dmp_portal")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/portal"

    portal.nav("Autorisations")
    portal.press(portal.find("revoke", portal.row("authorization", idnatps=PS)))
    assert "retirée" in portal.flash()
    assert oidc_server.ps.get(f"Patient/{PATIENT_ID}").status_code == 404

    portal.go("/portal/journal?qui=moi")
    assert any("Modification d'une autorisation" in e.text for e in portal.all("journal-entry"))
    portal.go(f"/portal/journal?ps={PS}")
    entries = portal.all("journal-entry")
    assert entries and all(PS in e.text and "Médecin" in e.text for e in entries)
    assert any(e.get_attribute("data-outcome") == "refused" for e in entries)    # after the revocation

    portal.press(portal.find("logout"))
    assert portal.path == "/portal/logged-out"
    requests_session = requests.get(oidc_server.url + "/portal/documents", allow_redirects=False,
                                    cookies={c["name"]: c["value"] for c in browser.get_cookies()},
                                    timeout=10)
    assert requests_session.status_code == 302


def test_a_professional_account_cannot_enter_the_patient_portal(browser, oidc_server):
    portal = open_portal(browser, oidc_server.url)
    _sign_in(portal, oidc_server, PS, "ps-password")
    assert portal.find("error").get_attribute("data-status") == "401"
    assert "réservé aux patients" in portal.find("error").text
    portal.go("/portal/documents")           # not signed in: back through the issuer, refused again
    assert portal.find("error").get_attribute("data-status") == "401"
    assert portal.all("document") == []


def test_the_provider_issues_psc_shaped_tokens_for_the_fhir_base_only(oidc_server):
    """The test provider's own contract (tests/oidc_provider.py): an RS256 at+jwt whose key is in
    its JWKS, aud = the FHIR base, the Pro Santé Connect claims of the client; another resource
    or a wrong secret is refused."""
    from joserfc import jwt
    from joserfc.jwk import KeySet
    op = oidc_server.op
    discovery = requests.get(op.issuer + "/.well-known/openid-configuration", timeout=10).json()
    keys = KeySet.import_key_set(requests.get(discovery["jwks_uri"], timeout=10).json())
    token = jwt.decode(op.client_token("psc-ps-m2m", "user/*.cruds", oidc_server.base), keys)
    assert token.header["alg"] == "RS256" and token.header["typ"] == "at+jwt"
    claims = token.claims
    assert claims["iss"] == op.issuer and claims["aud"] == oidc_server.base and claims["scope"] == "user/*.cruds"
    assert claims["sub"] == claims["SubjectNameID"] == PS and claims["SubjectRole"] == ["10"]
    assert claims["acr"] == "eidas1" and claims["purpose_of_use"] == "TREAT"
    elsewhere = requests.post(op.issuer + "/token", auth=("psc-ps-m2m", "psc-ps-m2m-secret"), timeout=10,
                              data={"grant_type": "client_credentials", "resource": "https://elsewhere/fhir"})
    assert elsewhere.status_code == 400 and elsewhere.json()["error"] == "invalid_target"
    wrong = requests.post(op.issuer + "/token", auth=("psc-ps-m2m", "not-the-secret"), timeout=10,
                          data={"grant_type": "client_credentials"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
