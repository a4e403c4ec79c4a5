"""The privacy officer's pages in a real headless Chromium, signed in in dev mode (CONTRACT.md
"Privacy operations", "The officer's pages"): the queue, a case with its evidence and chart, taking
and closing it; the effect checked through the FHIR API. One browser for the session, the portal's
live server for the module (tests/portal/test_portal_browser.py, directory loaded).
"""
from __future__ import annotations

from fhir_dmp.profiles.review_task import REVIEW_SYSTEM
from tests import builders
from tests.portal.test_portal_browser import server  # noqa: F401  (the live server fixture)
from tests.portal_kit import open_portal
from tests.privacy.kit import OFFICER, anomaly_case, break_glass_case, new_dmp


def test_queue_case_take_and_decide(browser, server):  # noqa: F811
    from selenium.webdriver.support.ui import Select
    pid, doc = new_dmp(server.ps())
    break_glass_case(server.ps(), server.ps(builders.PS_OTHER), pid, doc)
    anomaly = anomaly_case(server.app, pid, builders.PS_PHARMA, 0.87, ("same-surname", "off-hours"))
    officer = server.as_("privacy_officer", name=OFFICER, extra={"sub": OFFICER})
    (task,) = [e["resource"] for e in officer.search(f"Task?patient=Patient/{pid}&code={REVIEW_SYSTEM}|break-glass")
               .get("entry", [])]

    page = open_portal(browser, server.url)
    page.go("/privacy/")
    assert page.path == "/privacy/login"
    assert page.css("html").get_attribute("lang") == "fr" and page.find("dev-banner")
    form = page.find("dev-login-officer")
    page.fill(form, officer=OFFICER)
    page.submit(form)
    assert page.path == "/privacy/"

    # the queue: the emergency access before the anomaly, names from the directory
    ours = [c for c in page.all("case") if c.get_attribute("data-id") in (task["id"], anomaly)]
    assert [c.get_attribute("data-code") for c in ours] == ["break-glass", "anomaly"]
    assert "Paul Durand" in ours[0].text and "patient inconscient aux urgences" in ours[0].text
    assert "0.87" in ours[1].text and "même nom de famille" in ours[1].text
    page.screenshot("confidentialite-file")

    page.press(page.find("open-case", ours[0]))
    assert page.path == f"/privacy/cas/{task['id']}"
    chart = page.find("activity-chart")
    assert chart.size["width"] > 200 and chart.size["height"] > 50
    assert len(page.all("chart-day")) == 28 and page.find("chart-peers")
    assert page.all("evidence") and all(e.get_attribute("data-mode") == "bris_de_glace" for e in page.all("evidence"))
    for control in page.d.find_elements("css selector", "main input:not([type=hidden]), main select, main textarea"):
        cid = control.get_attribute("id")
        assert cid and page.d.find_elements("css selector", f"label[for='{cid}']"), control.get_attribute("name")
    page.screenshot("confidentialite-cas", max_height=2400)

    page.submit(page.find("case-take"))
    assert "Vous avez pris ce cas." in page.flash()
    assert page.find("case-summary").get_attribute("data-status") == "in-progress"
    assert OFFICER in page.find("case-status").text
    form = page.find("case-decision")
    Select(form.find_element("name", "businessStatus")).select_by_value("justified")
    page.fill(form, note="Patient inconscient admis aux urgences : accès vérifié avec le service.")
    page.submit(form)
    assert "Cas clos" in page.flash()
    assert page.find("case-summary").get_attribute("data-status") == "completed"
    assert page.find("case-verdict").text == "Justifié"
    assert not page.all("case-decision") and not page.all("case-take")
    assert "accès vérifié avec le service" in page.find("case-note").text
    page.screenshot("confidentialite-cas-clos", max_height=2400)

    done = officer.get(f"Task/{task['id']}").json
    assert done["status"] == "completed" and done["businessStatus"]["coding"][0]["code"] == "justified"
    # the case left the queue for the closed ones; the anomaly is still there
    page.nav("Cas à traiter")
    assert [c.get_attribute("data-id") for c in page.all("case") if c.get_attribute("data-id")
            in (task["id"], anomaly)] == [anomaly]
    page.nav("Cas clos")
    row = page.row("case", id=task["id"])
    assert page.find("verdict", row).text == "Justifié"
    page.press(page.find("open-case", row))
    assert page.path == f"/privacy/cas/{task['id']}" and not page.all("case-decision")
