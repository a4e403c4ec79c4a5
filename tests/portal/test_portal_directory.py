"""The portal names professionals and finds them by name, and groups the patient's own views, over
real HTTP through the WSGI app (no browser: these run where Chromium is missing too; the browser
tests in test_portal_browser.py drive the same pages in Chromium)."""
from __future__ import annotations

import re

from tests import builders as b
from tests.portal_kit import csrf_token
from tests.portal.test_portal_security import dev, make_app  # noqa: F401  (fixtures)

MATCH = re.compile(r'data-testid="ps-match" data-idnatps="([0-9]+)"')


def test_authorize_by_name_names_the_professional(dev, tmp_path):  # noqa: F811
    b.load_directory(dev.config, tmp_path)
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    page = client.get("/portal/autorisations?pour=authorize&name=dur").get_data(as_text=True)
    assert MATCH.findall(page) == [b.PS_OTHER]
    assert "Paul Durand" in page and "Cardiologie et maladies vasculaires" in page and "Paris" in page
    assert "Jeanne Dupont" in page                                  # the authorized creator, by name
    for odd in ("%5B(*", "a" * 500, "%00", ",,,"):                 # odd input: a page, never a 500
        r = client.get(f"/portal/autorisations?pour=block&name={odd}&ville={odd}&specialite={odd}")
        assert r.status_code == 200, odd
        assert not MATCH.findall(r.get_data(as_text=True)), odd
    page = client.get("/portal/autorisations?pour=authorize&name=Paul,+Durand").get_data(as_text=True)
    assert MATCH.findall(page) == [b.PS_OTHER]                     # words, each of them matching
    r = client.post("/portal/autorisations", data={"csrf_token": csrf_token(page), "idnatps": "",
                                                  "choose": b.PS_OTHER})
    assert r.status_code == 302
    assert dev.ps(b.PS_OTHER).get(f"Patient/{pid}").status_code == 200
    consents = dev.as_("patient", patient=pid).search(f"Consent?patient={pid}&actor:identifier={b.PS_OTHER}")
    actor = consents["entry"][0]["resource"]["provision"]["actor"][0]["reference"]
    assert actor == {"identifier": {"system": b.IDNATPS, "value": b.PS_OTHER}, "display": "Paul Durand"}


def test_a_professional_outside_the_directory_is_named_by_the_token(dev):  # noqa: F811
    pid, _ = dev.dmp()
    dev.ps(b.PS_KINE, profession="70", extra={"family_name": "Moreau", "given_name": "Luc"}).get(f"Patient/{pid}")
    page = dev.browser(pid).get("/portal/journal").get_data(as_text=True)
    assert "Luc Moreau" in page and "Masseur-kinésithérapeute" in page and f"idNatPs {b.PS_KINE}" in page


def test_own_views_are_grouped_never_dropped(dev):  # noqa: F811
    pid, _ = dev.dmp()
    client = dev.browser(pid)
    for path in ("/portal/", "/portal/documents", "/portal/autorisations", "/portal/documents"):
        assert client.get(path).status_code == 200
    page = client.get("/portal/journal").get_data(as_text=True)
    grouped = [int(n) for n in re.findall(r'data-testid="own-views" data-count="([0-9]+)"', page)]
    assert grouped and sum(grouped) >= 4
    assert 'data-testid="show-own-views"' in page
    entries = page.count('data-testid="journal-entry"')
    shown = client.get("/portal/journal?vues=1").get_data(as_text=True)
    assert 'data-testid="own-views"' not in shown and 'data-testid="hide-own-views"' in shown
    assert shown.count('data-testid="journal-entry"') >= entries + sum(grouped)
    # the journal itself keeps every view
    events = dev.as_("patient", patient=pid).search(f"AuditEvent?patient={pid}&agent=Patient/{pid}&_count=100")
    assert len([e for e in events["entry"] if e["resource"]["action"] in ("R", "E")]) >= sum(grouped)
