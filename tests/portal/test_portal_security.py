"""The portal's security properties, over real HTTP through the WSGI app (CONTRACT.md "The
patient portal"): CSRF on every form POST, cookie flags, another DMP's ids in URLs, nothing the
FHIR API would deny, session ending with the token, only patients signed in, every action in the
journal. Dev mode (the dev signing key), a fresh database per test.
"""
from __future__ import annotations

import html
import re

import pytest

from fhir_dmp.runtime.config import Config
from fhir_dmp.security.devkeys import mint_token
from tests import builders
from tests.api import Api
from tests.portal_kit import csrf_token

BASE = "http://dmp.test/fhir"


@pytest.fixture
def make_app(tmp_path, mongo_server, db, build_app):
    """(config, app) on this test's database for ``base`` and the given settings."""
    def make(base=BASE, **kw):
        cfg = Config(mongodb_uri=mongo_server.uri, db_name=db.name, data_dir=tmp_path, base_url=base,
                     notifications_worker=False, audit_sealer=False, **kw)
        return cfg, build_app(cfg)
    return make


@pytest.fixture
def dev(make_app):
    cfg, app = make_app()
    api = Api(app, None)

    class Dev:
        config, http = cfg, app

        def as_(self, kind, **kw):
            return api.as_token(mint_token(cfg, kind, **kw))

        def ps(self, ps=builders.PS_DR, profession="10", **kw):
            return self.as_("ps", id_nat_ps=ps, profession=profession, **kw)

        def dmp(self, docs=(builders.CONSULTATION,), **kw):
            dr = self.ps()
            pid = dr.create(builders.patient(**kw))["id"]
            return pid, [dr.create(builders.docref(pid, code))["id"] for code in docs]

        def browser(self, pid=None):
            """A signed-in test client (cookie jar) and its CSRF token."""
            client = app.test_client()
            if pid is not None:
                token = csrf_token(client.get("/portal/login").get_data(as_text=True))
                r = client.post("/portal/login", data={"patient": pid, "csrf_token": token})
                assert r.status_code == 302 and r.headers["Location"].endswith("/portal/"), r.get_data(True)
            return client

    return Dev()


def page_token(client, path="/portal/autorisations") -> str:
    r = client.get(path)
    assert r.status_code == 200
    return csrf_token(r.get_data(as_text=True))


def active_consents(dev, pid) -> list[dict]:
    bundle = dev.as_("patient", patient=pid).search(f"Consent?patient={pid}&status=active")
    return [e["resource"] for e in bundle.get("entry", [])]


# ----------------------------------------------------------------------------- CSRF

@pytest.mark.parametrize("path, data", [
    ("/portal/autorisations", {"idnatps": builders.PS_OTHER}),
    ("/portal/blocages", {"idnatps": builders.PS_OTHER}),
    ("/portal/urgence/btg", {"refuse": "1"}),
    ("/portal/coordonnees", {"email": "x@example.org", "phone": ""}),
    ("/portal/dossier/close", {}),
])
def test_a_post_without_csrf_token_is_refused_and_changes_nothing(dev, path, data):
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    before_consents = active_consents(dev, pid)
    before_patient = dev.as_("admin").get(f"Patient/{pid}").json
    for extra in ({}, {"csrf_token": "forged"}):
        r = client.post(path, data={**data, **extra})
        assert r.status_code == 403
        assert "Requête refusée" in r.get_data(as_text=True)
    assert active_consents(dev, pid) == before_consents
    assert dev.as_("admin").get(f"Patient/{pid}").json == before_patient
    # the same POST with the token works (the test is not vacuous)
    r = client.post(path, data={**data, "csrf_token": page_token(client)})
    assert r.status_code == 302


def test_the_csrf_token_of_another_session_is_refused(dev):
    pid, _ = dev.dmp()
    mine, theirs = dev.browser(pid), dev.browser(pid)
    r = mine.post("/portal/autorisations", data={"idnatps": builders.PS_OTHER,
                                                 "csrf_token": page_token(theirs)})
    assert r.status_code == 403
    assert len(active_consents(dev, pid)) == 1


def test_dev_login_needs_the_csrf_token_too(dev):
    pid, _ = dev.dmp()
    client = dev.browser()
    r = client.post("/portal/login", data={"patient": pid})
    assert r.status_code == 403
    assert client.get("/portal/").status_code == 302


# ----------------------------------------------------------------------------- cookies, session

def _set_cookie(response) -> str:
    (cookie,) = [v for k, v in response.headers.items() if k == "Set-Cookie"
                 and v.startswith("fhir_dmp_portal=")]
    return cookie


def test_session_cookie_flags_http(dev):
    pid, _ = dev.dmp()
    client = dev.browser()
    token = csrf_token(client.get("/portal/login").get_data(as_text=True))
    cookie = _set_cookie(client.post("/portal/login", data={"patient": pid, "csrf_token": token}))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/portal" in cookie
    assert "Secure" not in cookie


def test_session_cookie_is_secure_when_the_base_url_is_https(make_app):
    cfg, app = make_app(base="https://dmp.test/fhir")
    client = app.test_client()
    r = client.get("/portal/login", base_url="https://dmp.test")
    cookie = _set_cookie(r)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_logout_ends_the_session(dev):
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    r = client.post("/portal/logout", data={"csrf_token": page_token(client)})
    assert r.status_code == 302 and r.headers["Location"].endswith("/portal/logged-out")
    assert client.get("/portal/documents").status_code == 302
    # GET /portal/logout also ends it
    client = dev.browser(pid)
    assert client.get("/portal/logout").status_code == 302
    assert client.get("/portal/documents").headers["Location"].endswith("/portal/login")


def test_the_session_ends_when_the_token_expires(dev):
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    with client.session_transaction() as sess:
        sess["token"] = mint_token(dev.config, "patient", patient=pid, lifetime=1,
                                   extra={"exp": 1_000_000_000, "iat": 999_999_000, "nbf": 999_999_000})
    r = client.get("/portal/documents")
    assert r.status_code == 302 and r.headers["Location"].endswith("/portal/login")
    with client.session_transaction() as sess:
        assert "token" not in sess


def test_only_patients_and_representatives_use_the_portal(dev):
    pid, _ = dev.dmp()
    client = dev.browser()
    with client.session_transaction() as sess:
        sess["token"] = mint_token(dev.config, "ps", id_nat_ps=builders.PS_DR, profession="10")
    assert client.get("/portal/documents").status_code == 302
    with client.session_transaction() as sess:
        sess["token"] = mint_token(dev.config, "admin")
    assert client.get("/portal/").status_code == 302


def test_security_headers(dev):
    pid, _ = dev.dmp()
    r = dev.browser(pid).get("/portal/documents")
    assert "script-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"


# ----------------------------------------------------------------------------- other DMPs, denials

def test_another_patients_ids_in_urls_answer_404_and_change_nothing(dev):
    mine, _ = dev.dmp()
    theirs, (their_doc,) = dev.dmp()
    their_consent = active_consents(dev, theirs)[0]
    client = dev.browser(mine)
    token = page_token(client)
    assert client.get(f"/portal/documents/{their_doc}/download").status_code == 404
    assert client.get("/portal/documents/nope/download").status_code == 404
    for path in (f"/portal/documents/{their_doc}/mask", f"/portal/autorisations/{their_consent['id']}/revoke",
                 f"/portal/blocages/{their_consent['id']}/unblock", "/portal/documents/nope/mask"):
        r = client.post(path, data={"csrf_token": token})
        assert r.status_code == 404, path
        assert "Introuvable" in r.get_data(as_text=True)
    assert active_consents(dev, theirs) == [their_consent]
    doc = dev.ps().get(f"DocumentReference/{their_doc}").json
    assert "securityLabel" not in doc
    assert their_doc not in client.get("/portal/documents").get_data(as_text=True)


def test_the_portal_never_shows_what_the_api_denies(dev):
    pid, (doc,) = dev.dmp()
    hidden = dev.ps().create(builders.docref(pid, labels=("INVISIBLE_PATIENT",)))["id"]
    client = dev.browser(pid)
    html = client.get("/portal/documents").get_data(as_text=True)
    assert doc in html and hidden not in html
    assert client.get(f"/portal/documents/{hidden}/download").status_code == 404
    r = client.post(f"/portal/documents/{hidden}/mask", data={"csrf_token": page_token(client)})
    assert r.status_code == 404
    # what the page lists is exactly what the API gives the same patient
    api_ids = {e["resource"]["id"] for e in dev.as_("patient", patient=pid)
               .search(f"DocumentReference?patient={pid}").get("entry", [])}
    assert set(re.findall(r'data-testid="document" data-id="([^"]+)"', html)) == api_ids == {doc}


def test_portal_actions_are_journaled_like_api_calls(dev):
    pid, (doc,) = dev.dmp()
    client = dev.browser(pid)
    r = client.post(f"/portal/documents/{doc}/mask", data={"csrf_token": page_token(client, "/portal/documents")})
    assert r.status_code == 302
    events = dev.as_("patient", patient=pid).search(
        f"AuditEvent?patient=Patient/{pid}&agent=Patient/{pid}&subtype=update&_count=50").get("entry", [])
    updates = [e["resource"] for e in events
               if any(str((x.get("what") or {}).get("reference", "")).startswith(f"DocumentReference/{doc}")
                      for x in e["resource"].get("entity", []))]
    assert updates and updates[0]["outcome"] == "0"


def test_closing_and_reopening_from_the_portal_are_the_repository_operations(dev):
    """The portal's close/reopen are GuardedRepository.close_dmp/reopen_dmp: the same JSON Patch
    of ``active``, journaled as a patch by the patient (no portal copy of the operation)."""
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    me = dev.as_("patient", patient=pid)
    for path, active in (("/portal/dossier/close", False), ("/portal/dossier/reopen", True)):
        r = client.post(path, data={"csrf_token": page_token(client, "/portal/dossier")})
        assert r.status_code == 302 and r.headers["Location"].endswith("/portal/dossier")
        assert me.get(f"Patient/{pid}").json["active"] is active
    events = me.search(f"AuditEvent?patient=Patient/{pid}&agent=Patient/{pid}&subtype=patch&_count=50")
    patched = [e["resource"] for e in events.get("entry", [])
               if any(str((x.get("what") or {}).get("reference", "")).startswith(f"Patient/{pid}")
                      for x in e["resource"].get("entity", []))]
    assert len(patched) == 2 and all(e["outcome"] == "0" for e in patched)


def test_an_unknown_patient_id_at_dev_login_is_said_on_the_sign_in_page(dev):
    dev.dmp()
    client = dev.browser()
    token = csrf_token(client.get("/portal/login").get_data(as_text=True))
    r = client.post("/portal/login", data={"patient": "does-not-exist", "csrf_token": token})
    assert r.status_code == 404
    page = html.unescape(r.get_data(as_text=True))
    assert 'data-testid="flash-error"' in page and "Aucun dossier n'a l'identifiant « does-not-exist »" in page
    assert 'data-testid="dev-login"' in page                    # the form again, to try another id
    # no session: the portal still sends to the sign-in page, and shows nothing
    assert client.get("/portal/").headers["Location"].endswith("/portal/login")
    assert client.get("/portal/documents").status_code == 302


# ----------------------------------------------------------------------------- OIDC mode config

def test_with_an_issuer_and_no_portal_client_login_is_unavailable(make_app, idp):
    cfg, app = make_app(base="https://dmp.test/fhir", **idp.config_kwargs())
    client = app.test_client()
    assert client.get("/portal/").headers["Location"].endswith("/portal/login")
    r = client.get("/portal/login")
    assert r.status_code == 503 and "FHIR_DMP_PORTAL_CLIENT_ID" in r.get_data(as_text=True)
    assert 'data-testid="dev-login"' not in r.get_data(as_text=True)
    # no dev sign-in outside dev mode, whatever is posted
    assert client.post("/portal/login", data={"patient": "x"}).status_code in (403, 404)


def test_home_page_links_the_portal_and_the_metadata(dev):
    r = dev.http.test_client().get("/")
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and 'lang="fr"' in html
    assert 'href="/portal/"' in html and 'href="/fhir/metadata"' in html and 'href="/privacy/"' in html
