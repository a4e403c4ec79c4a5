"""Signing in to the privacy officer's pages through a real OpenID Connect provider
(``tests/oidc_provider.py``), in a real headless Chromium: the portal's OIDC server and client
(tests/portal/test_portal_oidc.py), whose provider also knows a privacy officer (``dpo``)."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import requests

from fhir_dmp.privacy.signin import OFFICER_SCOPE
from tests.portal.test_portal_oidc import _sign_in, oidc_server  # noqa: F401  (the server fixture)
from tests.portal_kit import open_portal


def test_login_asks_the_issuer_for_the_officers_scope(oidc_server):  # noqa: F811
    r = requests.get(oidc_server.url + "/privacy/login", allow_redirects=False, timeout=10)
    assert r.status_code == 302
    query = parse_qs(urlsplit(r.headers["Location"]).query)
    assert query["client_id"] == ["dmp-portal"] and query["code_challenge_method"] == ["S256"]
    assert query["scope"] == [OFFICER_SCOPE]
    assert query["redirect_uri"] == [oidc_server.url + "/privacy/callback"]
    assert 'data-testid="dev-login-officer"' not in r.text


def test_the_officer_signs_in_at_the_provider(browser, oidc_server):  # noqa: F811
    page = open_portal(browser, oidc_server.url)
    _sign_in(page, oidc_server, "dpo", "dpo-password", "/privacy/")
    assert page.path == "/privacy/", page.d.page_source[:1500]
    assert page.find("queue") and page.all("dev-banner") == []
    cookie = next(c for c in browser.get_cookies() if c["name"] == "fhir_dmp_privacy")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/privacy"
    page.press(page.find("logout"))
    assert page.path == "/privacy/logged-out"


def test_a_patient_account_is_refused_with_a_403_page(browser, oidc_server):  # noqa: F811
    page = open_portal(browser, oidc_server.url)
    _sign_in(page, oidc_server, "claire", "claire-password", "/privacy/")
    assert page.find("error").get_attribute("data-status") == "403"
    assert "délégué à la protection des données" in page.find("error").text
    assert page.all("case") == []
