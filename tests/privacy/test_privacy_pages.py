"""The privacy officer's pages over real HTTP through the WSGI app (CONTRACT.md "Privacy
operations", "The officer's pages"): only privacy officers enter, the queue most urgent first, a
case with its evidence and chart, taking and deciding a case through the guarded repository
(journaled, frozen once completed), CSRF on every form, the session's own cookie. Dev mode (the
dev signing key), a fresh database per test, real tokens, the directory loaded.
"""
from __future__ import annotations

import html
import re

import pytest

from fhir_dmp.profiles.review_task import REVIEW_SYSTEM
from fhir_dmp.security.devkeys import mint_token
from tests import builders
from tests.portal.test_portal_security import dev, make_app  # noqa: F401  (fixtures)
from tests.portal_kit import csrf_token
from tests.privacy.kit import OFFICER, anomaly_case, break_glass_case, new_dmp, queue, sign_in_officer


@pytest.fixture
def world(dev, tmp_path):  # noqa: F811
    """A DMP of PS_DR's, broken into by PS_OTHER (one break-glass case), the directory loaded, and
    an officer's signed-in client."""
    builders.load_directory(dev.config, tmp_path)
    pid, doc = new_dmp(dev.ps())
    break_glass_case(dev.ps(), dev.ps(builders.PS_OTHER), pid, doc)
    client = dev.http.test_client()
    assert sign_in_officer(client).status_code == 302
    officer = dev.as_("privacy_officer", name=OFFICER, extra={"sub": OFFICER})
    (task,) = [e["resource"] for e in officer.search(f"Task?patient=Patient/{pid}").get("entry", [])]

    class World:
        pass
    w = World()
    w.pid, w.doc, w.client, w.officer, w.task = pid, doc, client, officer, task
    return w


def page(client, path: str) -> str:
    r = client.get(path)
    assert r.status_code == 200, r.get_data(as_text=True)[:800]
    return html.unescape(r.get_data(as_text=True))


def task_of(world) -> dict:
    return world.officer.get(f"Task/{world.task['id']}").json


# ----------------------------------------------------------------------------- who may enter

def test_the_login_page_has_the_dev_form_and_signing_in_opens_the_queue(dev):  # noqa: F811
    client = dev.http.test_client()
    r = client.get("/privacy/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/privacy/login")
    login = client.get("/privacy/login").get_data(as_text=True)
    assert 'data-testid="dev-login-officer"' in login and 'name="officer"' in login and 'lang="fr"' in login
    r = sign_in_officer(client)
    assert r.status_code == 302 and r.headers["Location"].endswith("/privacy/")
    assert 'data-testid="queue-empty"' in page(client, "/privacy/")


@pytest.mark.parametrize("kind, kw", [
    ("patient", {"patient": "p1"}),
    ("ps", {"id_nat_ps": builders.PS_DR, "profession": "10"}),
    ("admin", {}),
    ("regulation_centre", {"id_nat_ps": builders.PS_SAMU}),
])
def test_anyone_but_a_privacy_officer_gets_a_refusal_page(dev, kind, kw):  # noqa: F811
    pid, _ = dev.dmp()
    if kind == "patient":
        kw = {"patient": pid}
    client = dev.http.test_client()
    for path in ("/privacy/", "/privacy/cas/anything"):
        with client.session_transaction("/privacy/") as sess:
            sess["token"] = mint_token(dev.config, kind, **kw)
        r = client.get(path)
        assert r.status_code == 403, (kind, path)
        body = html.unescape(r.get_data(as_text=True))
        assert "Accès refusé" in body and "délégué à la protection des données" in body
        assert 'data-testid="case"' not in body
        assert client.get(path).status_code == 302          # the session ended with the refusal


def test_a_patient_signed_in_to_the_portal_is_not_signed_in_here(dev):  # noqa: F811
    pid, _ = dev.dmp()
    client = dev.browser(pid)                         # the portal's session
    assert client.get("/portal/").status_code == 200
    r = client.get("/privacy/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/privacy/login")


def test_session_cookie_flags_and_path(dev):  # noqa: F811
    client = dev.http.test_client()
    r = sign_in_officer(client)
    (cookie,) = [v for k, v in r.headers.items() if k == "Set-Cookie" and v.startswith("fhir_dmp_privacy=")]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/privacy" in cookie
    assert "Secure" not in cookie
    r = client.get("/privacy/")
    assert "script-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Cache-Control"] == "no-store"


def test_dev_login_needs_the_csrf_token_and_a_plain_identifier(dev):  # noqa: F811
    client = dev.http.test_client()
    assert client.post("/privacy/login", data={"officer": OFFICER}).status_code == 403
    token = csrf_token(client.get("/privacy/login").get_data(as_text=True))
    r = client.post("/privacy/login", data={"officer": "<script>", "csrf_token": token})
    assert r.status_code == 400 and 'data-testid="flash-error"' in r.get_data(as_text=True)
    assert client.get("/privacy/").status_code == 302


def test_logout_ends_the_session(world):
    r = world.client.post("/privacy/logout", data={"csrf_token": csrf_token(page(world.client, "/privacy/"))})
    assert r.status_code == 302 and r.headers["Location"].endswith("/privacy/logged-out")
    assert 'data-testid="logged-out"' in page(world.client, "/privacy/logged-out")
    assert world.client.get("/privacy/").status_code == 302


# ----------------------------------------------------------------------------- the queue

def test_the_queue_shows_open_cases_most_urgent_first(world, dev):  # noqa: F811
    low = anomaly_case(dev.http, world.pid, builders.PS_PHARMA, 0.41, ("off-hours",))
    high = anomaly_case(dev.http, world.pid, builders.PS_SAMU, 0.93, ("same-surname", "bulk"))
    assert queue(world.client) == [(world.task["id"], "break-glass"), (high, "anomaly"), (low, "anomaly")]
    body = page(world.client, "/privacy/")
    assert "Paul Durand" in body and "Claire Martin" in body            # the directory's name, the patient's
    assert "0.93" in body and "même nom de famille que le patient · lecture en masse" in body
    assert "patient inconscient aux urgences" in body
    # a completed case leaves the queue
    world.officer.patch(f"Task/{low}", [{"op": "replace", "path": "/status", "value": "completed"},
                                        {"op": "add", "path": "/businessStatus", "value": {"coding": [
                                            {"system": REVIEW_SYSTEM, "code": "justified"}]}},
                                        {"op": "add", "path": "/note", "value": [{"text": "garde de nuit"}]}])
    assert [c for c, _ in queue(world.client)] == [world.task["id"], high]
    closed = page(world.client, "/privacy/clos")
    assert f'data-id="{low}"' in closed and f'data-id="{high}"' not in closed and "Justifié" in closed


# ----------------------------------------------------------------------------- a case

def test_the_case_shows_its_evidence_and_never_document_content(world):
    body = page(world.client, f"/privacy/cas/{world.task['id']}")
    assert 'data-testid="case-decision"' in body and 'name="businessStatus"' in body and 'name="note"' in body
    assert "Paul Durand" in body and "patient inconscient aux urgences" in body
    evidence = re.findall(r'data-testid="evidence" data-mode="([^"]+)" data-outcome="([^"]+)"', body)
    assert len(evidence) >= 2 and all(mode == "bris_de_glace" for mode, _ in evidence)
    assert f"DocumentReference/{world.doc}" in body                     # which document was read
    # the officer's reads are journaled in the DMP's journal, and none of them is of a document
    events = world.officer.search(f"AuditEvent?patient=Patient/{world.pid}&agent:identifier="
                                  f"urn:fhir-dmp:subject|{OFFICER}&_count=100").get("entry", [])
    targets = {x["what"]["reference"].split("/")[0] for e in events for x in e["resource"].get("entity", [])
               if x.get("role", {}).get("code") == "4" and "reference" in x.get("what", {})}
    assert events and not targets & {"DocumentReference", "Binary"}


def test_the_chart_counts_the_professionals_accesses_per_day(world, dev):  # noqa: F811
    # a peer (another médecin) reads his own patient's DMP three times today
    own, _ = new_dmp(dev.ps())
    for _ in range(3):
        dev.ps().get(f"Patient/{own}")
    body = page(world.client, f"/privacy/cas/{world.task['id']}")
    assert 'data-testid="activity-chart"' in body and "<svg" in body and "<script" not in body
    days = re.findall(r'data-testid="chart-day" data-day="([^"]+)" data-count="(\d+)"', body)
    assert len(days) == 28
    journal = world.officer.search(f"AuditEvent?agent:identifier={builders.IDNATPS}|{builders.PS_OTHER}"
                                   f"&_count=100").get("entry", [])
    reads = [e for e in journal if e["resource"]["action"] in ("R", "E")]     # not the notices written
    assert int(days[-1][1]) == len(reads) > 0 and all(int(n) == 0 for _, n in days[:-1])
    assert re.search(r'data-testid="chart-peers" points="[0-9., ]+"', body)
    assert "son seul pair (Médecin)" in body


def test_an_unknown_case_answers_404(world):
    r = world.client.get("/privacy/cas/nope")
    assert r.status_code == 404 and "Introuvable" in r.get_data(as_text=True)


# ----------------------------------------------------------------------------- take and decide

def test_take_then_decide_closes_the_case_and_freezes_it(world):
    tid = world.task["id"]
    body = page(world.client, f"/privacy/cas/{tid}")
    r = world.client.post(f"/privacy/cas/{tid}/prendre", data={"csrf_token": csrf_token(body)})
    assert r.status_code == 302 and r.headers["Location"].endswith(f"/privacy/cas/{tid}")
    task = task_of(world)
    assert task["status"] == "in-progress" and task["owner"]["identifier"]["value"] == OFFICER
    body = page(world.client, f"/privacy/cas/{tid}")
    assert "Vous avez pris ce cas." in body and 'data-testid="case-take"' not in body
    r = world.client.post(f"/privacy/cas/{tid}/decision", data={
        "csrf_token": csrf_token(body), "businessStatus": "unjustified", "note": "aucune urgence ce jour-là",
        "version": re.search(r'name="version" value="(\d+)"', body).group(1)})
    assert r.status_code == 302
    task = task_of(world)
    assert task["status"] == "completed"
    assert task["businessStatus"]["coding"][0] == {"system": REVIEW_SYSTEM, "code": "unjustified",
                                                   "display": "injustifié"}
    assert task["note"][-1]["text"] == "aucune urgence ce jour-là"
    body = page(world.client, f"/privacy/cas/{tid}")
    assert 'data-testid="case-decision"' not in body and 'data-status="completed"' in body
    assert "Injustifié" in body and "aucune urgence ce jour-là" in body
    # a decision posted again (an old page) is refused and changes nothing
    r = world.client.post(f"/privacy/cas/{tid}/decision", data={
        "csrf_token": csrf_token(body), "businessStatus": "justified", "note": "non"})
    assert r.status_code == 302 and task_of(world) == task
    assert "a changé entre-temps" in page(world.client, f"/privacy/cas/{tid}")
    # both writes are in the DMP's journal, by the officer
    events = world.officer.search(f"AuditEvent?patient=Patient/{world.pid}&subtype=patch&_count=50").get("entry", [])
    mine = [e["resource"] for e in events
            if any(x.get("what", {}).get("reference", "").startswith(f"Task/{tid}") for x in e["resource"]["entity"])]
    assert len([e for e in mine if e["outcome"] == "0"]) == 2


def test_two_officers_on_one_case_the_second_is_told(world, dev):  # noqa: F811
    tid = world.task["id"]
    stale = page(world.client, f"/privacy/cas/{tid}")
    other = dev.http.test_client()
    sign_in_officer(other, "dpo-paris")
    other.post(f"/privacy/cas/{tid}/prendre", data={"csrf_token": csrf_token(page(other, f"/privacy/cas/{tid}"))})
    assert task_of(world)["owner"]["identifier"]["value"] == "dpo-paris"
    r = world.client.post(f"/privacy/cas/{tid}/prendre", data={
        "csrf_token": csrf_token(stale), "version": re.search(r'name="version" value="(\d+)"', stale).group(1)})
    assert r.status_code == 302
    assert task_of(world)["owner"]["identifier"]["value"] == "dpo-paris"
    assert "a changé entre-temps" in page(world.client, f"/privacy/cas/{tid}")


@pytest.mark.parametrize("data", [
    {"businessStatus": "maybe", "note": "x"},
    {"businessStatus": "justified", "note": "   "},
    {"businessStatus": "justified", "note": "x" * 2001},
])
def test_a_decision_needs_a_verdict_and_a_note(world, data):
    tid = world.task["id"]
    before = task_of(world)
    r = world.client.post(f"/privacy/cas/{tid}/decision",
                          data={**data, "csrf_token": csrf_token(page(world.client, f"/privacy/cas/{tid}"))})
    assert r.status_code == 302 and task_of(world) == before
    assert "Choisissez « justifié » ou « injustifié »" in page(world.client, f"/privacy/cas/{tid}")


@pytest.mark.parametrize("action, data", [
    ("prendre", {}),
    ("decision", {"businessStatus": "justified", "note": "ok"}),
])
def test_a_post_without_csrf_token_is_refused_and_changes_nothing(world, action, data):
    tid = world.task["id"]
    before = task_of(world)
    for extra in ({}, {"csrf_token": "forged"}):
        r = world.client.post(f"/privacy/cas/{tid}/{action}", data={**data, **extra})
        assert r.status_code == 403 and "Requête refusée" in r.get_data(as_text=True)
    assert task_of(world) == before
