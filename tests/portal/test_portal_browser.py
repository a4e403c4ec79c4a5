"""The patient portal in a real headless Chromium, signed in in dev mode (CONTRACT.md "The patient
portal").

Each test drives the pages as a person would (menu links, forms, buttons found by their
``data-testid``), then checks the effect through the FHIR API with professionals' tokens (a
revoked PS gets 404, a masked document disappears for the PS, an opt-out refuses break-glass) and
that the action shows in the patient's journal. One browser for the session, one live server
for the module, a fresh DMP per test.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests

from fhir_dmp.runtime.config import Config
from fhir_dmp.security.devkeys import mint_token
from tests import builders
from tests.api import Api
from tests.portal_kit import LiveServer, free_port, open_portal, unique_db

BTG_HEADERS = {
    "Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"',
    "X-Break-Glass-Reason": "patient inconscient aux urgences",
}


@pytest.fixture(scope="module")
def server(browser, mongo_server, mongo_client, tmp_path_factory):
    port = free_port()
    db = unique_db(mongo_client)
    cfg = Config(mongodb_uri=mongo_server.uri, db_name=db.name, data_dir=tmp_path_factory.mktemp("portal"),
                 base_url=f"http://127.0.0.1:{port}/fhir", notifications_worker=False, audit_sealer=False)
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    app = create_app(cfg, client=mongo_client, db=db)
    builders.load_directory(cfg, tmp_path_factory.mktemp("annuaire"))     # names, not numbers
    live = LiveServer(app, port)
    api = Api(app, None)

    def as_(kind, **kw):
        return api.as_token(mint_token(cfg, kind, **kw))

    yield SimpleNamespace(config=cfg, app=app, url=live.url, api=api, as_=as_,
                          ps=lambda ps=builders.PS_DR, profession="10", **kw:
                          as_("ps", id_nat_ps=ps, profession=profession, **kw))
    live.stop()
    stop_background(app)
    mongo_client.drop_database(db.name)


@pytest.fixture
def portal(browser, server):
    return open_portal(browser, server.url)


def new_dmp(server, *, docs=(builders.CONSULTATION,), **patient_kw) -> tuple[str, list[str]]:
    """A DMP opened by the médecin PS_DR (so authorized), with documents he deposits."""
    dr = server.ps()
    pid = dr.create(builders.patient(**patient_kw))["id"]
    ids = [dr.create(builders.docref(pid, code))["id"] for code in docs]
    return pid, ids


def journal_actions(portal) -> list[str]:
    portal.go("/portal/journal?qui=moi")
    return [e.text for e in portal.all("journal-entry")]


# ----------------------------------------------------------------------------- sign-in

def test_dev_sign_in_shows_the_banner_and_every_page_is_reachable_from_the_menu(portal, server):
    pid, _ = new_dmp(server)
    portal.go("/portal/")
    assert portal.path == "/portal/login"                         # not signed in: the login page
    assert "MODE DÉVELOPPEMENT" in portal.find("dev-banner").text
    assert portal.css("html").get_attribute("lang") == "fr"
    portal.dev_login(pid)
    assert "Claire Martin" in portal.css("h1").text
    pages = {"Mes documents": "/portal/documents", "Journal des accès": "/portal/journal",
             "Autorisations": "/portal/autorisations", "Urgences": "/portal/urgence",
             "Notifications": "/portal/notifications", "Coordonnées": "/portal/coordonnees",
             "Mon dossier": "/portal/dossier", "Représentants": "/portal/representants"}
    for label, path in pages.items():
        portal.nav(label)
        assert portal.path == path
        assert portal.css("html").get_attribute("lang") == "fr"
        assert "Introuvable" not in portal.css("h1").text
    # logout ends the session: the pages send back to the login form
    portal.press(portal.find("logout"))
    assert portal.path == "/portal/logged-out" and portal.find("logged-out")
    portal.go("/portal/documents")
    assert portal.path == "/portal/login"


def test_keyboard_only_sign_in_and_labelled_controls(portal, server):
    from selenium.webdriver.common.keys import Keys
    pid, _ = new_dmp(server)
    portal.go("/portal/login")
    # the first Tab reaches the skip link, then the form is used with the keyboard alone
    portal.css("body").send_keys(Keys.TAB)
    assert portal.d.switch_to.active_element.get_attribute("class") == "skip"
    field = portal.css("#patient")
    field.send_keys(pid, Keys.ENTER)
    portal.wait_path("/portal/")
    for path in ("/portal/journal", "/portal/autorisations", "/portal/urgence", "/portal/coordonnees",
                 "/portal/dossier"):
        portal.go(path)
        for control in portal.d.find_elements("css selector", "input:not([type=hidden]), select"):
            cid = control.get_attribute("id")
            assert cid and portal.d.find_elements("css selector", f"label[for='{cid}']"), \
                f"unlabelled control {control.get_attribute('name')} on {path}"


# ----------------------------------------------------------------------------- documents

def test_documents_download_mask_and_unmask(portal, server):
    pid, (consult, lab) = new_dmp(server, docs=(builders.CONSULTATION, builders.LAB))
    other = server.ps(builders.PS_OTHER)
    server.ps().create({**builders.docref(pid), "securityLabel": [{"coding": [{
        "system": builders.LABELS, "code": "INVISIBLE_PATIENT"}]}]})      # never shown to the patient
    portal.dev_login(pid)
    portal.nav("Mes documents")
    rows = {r.get_attribute("data-id"): r for r in portal.all("document")}
    assert set(rows) == {consult, lab}
    assert "Compte rendu de biologie" in rows[lab].text and "810000000001" in rows[lab].text
    # download: the decrypted PDF, with the session cookie
    href = portal.find("download", rows[consult]).get_attribute("href")
    got = requests.get(href, cookies=portal.cookies(), timeout=10)
    assert got.status_code == 200 and got.content.startswith(b"%PDF-")
    assert "attachment" in got.headers["Content-Disposition"]

    portal.press(portal.find("mask", rows[consult]))
    assert "masqué" in portal.flash()
    assert portal.row("document", id=consult).get_attribute("data-masked") == "true"
    # the PS who is not the author no longer finds it; the author still does
    dr = server.ps()
    assert dr.get(f"DocumentReference/{consult}").status_code == 200
    server.as_("patient", patient=pid).create(_permit(pid, builders.PS_OTHER))
    found = other.search(f"DocumentReference?patient={pid}")
    found = {e["resource"]["id"] for e in found.get("entry", [])}
    assert lab in found and consult not in found
    assert other.get(f"DocumentReference/{consult}").status_code == 404

    portal.press(portal.find("unmask", portal.row("document", id=consult)))
    assert portal.row("document", id=consult).get_attribute("data-masked") == "false"
    assert other.get(f"DocumentReference/{consult}").status_code == 200
    portal.screenshot("documents")
    assert any("Modification d'un document" in text and "Vous" in text for text in journal_actions(portal))


def _permit(pid, ps):
    return {"resourceType": "Consent", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTIN"}]},
            "provision": {"type": "permit", "actor": [{"role": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
                "reference": {"identifier": {"system": builders.IDNATPS, "value": ps}}}],
                "purpose": [{"system": builders.ACT_REASON, "code": "TREAT"}]}}


def test_documents_are_grouped_by_rubrique(portal, server):
    pid, _ = new_dmp(server, docs=(builders.LAB, builders.IMAGING))
    portal.dev_login(pid)
    portal.go("/portal/documents")
    headings = [h.text for h in portal.d.find_elements("css selector", "main h2")]
    assert headings == ["Imagerie", "Biologie"]
    assert {r.text for r in portal.all("rubrique")} == {"Imagerie", "Biologie"}


# ----------------------------------------------------------------------------- authorizations

def test_authorize_revoke_block_unblock(portal, server):
    pid, (doc,) = new_dmp(server)
    other = server.ps(builders.PS_OTHER)
    assert other.get(f"Patient/{pid}").status_code == 404
    portal.dev_login(pid)
    portal.nav("Autorisations")
    assert portal.row("authorization", idnatps=builders.PS_DR)        # the creator of the DMP
    # a malformed idNatPs: an error, nothing created
    form = portal.find("authorize-form")
    portal.fill(form, idnatps="12ab")
    portal.d.execute_script("arguments[0].noValidate = true", form)   # past the browser's own check
    portal.submit(form)
    assert "idNatPs" in portal.flash()
    assert len(portal.all("authorization")) == 1

    form = portal.find("authorize-form")
    portal.fill(form, idnatps=builders.PS_OTHER)
    portal.submit(form)
    assert builders.PS_OTHER in portal.flash()
    assert other.get(f"Patient/{pid}").status_code == 200
    assert other.get(f"DocumentReference/{doc}").status_code == 200
    portal.screenshot("autorisations")

    portal.press(portal.find("revoke", portal.row("authorization", idnatps=builders.PS_OTHER)))
    assert "retirée" in portal.flash()
    assert [r.get_attribute("data-idnatps") for r in portal.all("authorization")] == [builders.PS_DR]
    assert other.get(f"Patient/{pid}").status_code == 404              # revoked: as if missing

    form = portal.find("block-form")
    portal.fill(form, idnatps=builders.PS_OTHER)
    portal.submit(form)
    assert portal.row("block", idnatps=builders.PS_OTHER)
    btg = server.ps(builders.PS_OTHER, purpose="BTG", btg_reason="urgence vitale")
    assert btg.get(f"Patient/{pid}").status_code == 404                # blocked: even in break-glass
    portal.press(portal.find("unblock", portal.row("block", idnatps=builders.PS_OTHER)))
    assert portal.all("block") == []
    assert btg.get(f"Patient/{pid}").status_code == 200

    actions = journal_actions(portal)
    assert sum("Création d'une autorisation" in a and "Vous" in a for a in actions) == 2
    assert sum("Modification d'une autorisation" in a and "Vous" in a for a in actions) == 2


def _choose(portal, form_testid: str, idnatps: str, **search):
    """Find a professional by name (town, speciality) in a form, and press their "choose" button."""
    form = portal.find(form_testid)
    portal.fill(form, **search)
    portal.press(portal.find("ps-search", form))
    form = portal.find(form_testid)
    portal.press(portal.find("choose", portal.row("ps-match", idnatps=idnatps)))


def test_authorize_and_block_find_a_professional_by_name(portal, server):
    pid, _ = new_dmp(server)
    other = server.ps(builders.PS_OTHER)
    portal.dev_login(pid)
    portal.nav("Autorisations")
    dr = portal.row("authorization", idnatps=builders.PS_DR)
    assert "Jeanne Dupont" in dr.text and "Médecin" in dr.text and "Lyon" in dr.text   # not a number
    # by name: the directory's matches, each with its profession, speciality and town
    form = portal.find("authorize-form")
    portal.fill(form, name="dur")
    portal.press(portal.find("ps-search", form))
    matches = portal.all("ps-match", portal.find("authorize-form"))
    assert [m.get_attribute("data-idnatps") for m in matches] == [builders.PS_OTHER]
    assert "Paul Durand" in matches[0].text and "Cardiologie" in matches[0].text and "Paris" in matches[0].text
    portal.screenshot("autorisations-recherche")
    portal.press(portal.find("choose", matches[0]))
    assert "Paul Durand" in portal.flash()
    assert other.get(f"Patient/{pid}").status_code == 200
    row = portal.row("authorization", idnatps=builders.PS_OTHER)
    assert "Paul Durand" in row.text and builders.PS_OTHER in row.text        # the idNatPs as a detail
    # by town and speciality; nothing found says so
    form = portal.find("block-form")
    portal.fill(form, ville="lyon")
    portal.press(portal.find("ps-search", form))
    found = {m.get_attribute("data-idnatps") for m in portal.all("ps-match", portal.find("block-form"))}
    assert found == {builders.PS_DR, builders.PS_PHARMA}
    assert portal.all("ps-match", portal.find("authorize-form")) == []      # only the form that searched
    form = portal.find("block-form")
    portal.fill(form, ville="", specialite="cardio")
    portal.press(portal.find("ps-search", form))
    assert [m.get_attribute("data-idnatps") for m in portal.all("ps-match")] == [builders.PS_OTHER]
    form = portal.find("block-form")
    portal.fill(form, name="nobody", specialite="")
    portal.press(portal.find("ps-search", form))
    assert portal.all("ps-match") == [] and portal.find("ps-no-match")
    # block by name: the block row names them
    _choose(portal, "block-form", builders.PS_PHARMA, name="bernard")
    assert "Lucie Bernard" in portal.flash()
    assert "Lucie Bernard" in portal.row("block", idnatps=builders.PS_PHARMA).text
    assert server.ps(builders.PS_PHARMA, profession="21").get(f"Patient/{pid}").status_code == 404


def test_names_in_the_journal_and_the_notices(portal, server):
    """From the directory; else the token's family_name/given_name journaled with the access."""
    pid, _ = new_dmp(server, email="claire@example.org")
    btg = server.ps(builders.PS_OTHER, purpose="BTG", btg_reason="urgence vitale")
    assert btg.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    unknown = server.ps(builders.PS_KINE, profession="70",
                        extra={"family_name": "Moreau", "given_name": "Luc"})
    assert unknown.get(f"Patient/{pid}").status_code == 404          # not authorized: journaled
    portal.dev_login(pid)
    portal.nav("Journal des accès")
    glass = portal.row("journal-entry", mode="bris_de_glace", outcome="ok")
    assert "Paul Durand" in glass.text and "Cardiologie" in glass.text and "Paris" in glass.text
    refused = portal.row("journal-entry", outcome="refused")
    assert "Luc Moreau" in refused.text and "Masseur-kinésithérapeute" in refused.text
    assert builders.PS_KINE in refused.text                           # as a detail
    form = portal.find("journal-filter")                              # filtered by a name
    portal.fill(form, ps="durand")
    portal.submit(form)
    entries = portal.all("journal-entry")
    assert entries and all("Paul Durand" in e.text for e in entries)
    portal.nav("Notifications")
    notice = portal.all("notification")[0]
    assert "Paul Durand" in notice.text and "Paris" in notice.text
    portal.screenshot("notifications-noms")


def test_journal_groups_the_patients_own_views(portal, server):
    pid, (doc,) = new_dmp(server)
    assert server.ps().get(f"DocumentReference/{doc}").status_code == 200
    portal.dev_login(pid)
    for page in ("Mes documents", "Autorisations", "Mes documents", "Journal des accès"):
        portal.nav(page)
    portal.go("/portal/journal")
    entries = portal.all("journal-entry")
    assert not any(e.text.startswith("Vous") and "Consultation" in e.text for e in entries)
    groups = portal.all("own-views")
    hidden = sum(int(g.get_attribute("data-count")) for g in groups)
    assert groups and hidden >= 4 and "Vous avez consulté votre dossier" in groups[0].text
    assert any("Jeanne Dupont" in e.text for e in entries)            # the others' accesses stay in view
    portal.screenshot("journal-regroupe")
    portal.press(portal.find("show-own-views"))                      # one click shows them
    assert portal.all("own-views") == []
    mine = [e for e in portal.all("journal-entry") if e.text.startswith("Vous")]
    assert len(mine) >= hidden
    portal.press(portal.find("hide-own-views"))
    assert portal.all("own-views")


# ----------------------------------------------------------------------------- emergency and journal

def test_emergency_opt_outs_and_the_journal_shows_break_glass_and_centre_15(portal, server):
    pid, (doc,) = new_dmp(server)
    btg = server.ps(builders.PS_OTHER)
    samu = server.as_("regulation_centre", id_nat_ps=builders.PS_SAMU)
    portal.dev_login(pid)
    portal.nav("Urgences")
    for testid in ("optout-btg", "optout-c15"):
        form = portal.find(testid)
        box = form.find_element("name", "refuse")
        assert not box.is_selected()
        box.click()
        portal.submit(form)
        assert "Vous refusez" in portal.flash()
    assert portal.find("optout-btg").find_element("name", "refuse").is_selected()
    assert btg.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 404
    assert samu.get(f"Patient/{pid}").status_code == 404
    portal.screenshot("urgence")

    for testid in ("optout-btg", "optout-c15"):
        form = portal.find(testid)
        form.find_element("name", "refuse").click()
        portal.submit(form)
        assert "Vous acceptez" in portal.flash()
    assert btg.get(f"DocumentReference/{doc}", headers=BTG_HEADERS).status_code == 200
    assert samu.get(f"Patient/{pid}").status_code == 200

    portal.nav("Journal des accès")
    modes = {e.get_attribute("data-mode") for e in portal.all("journal-entry")}
    assert {"normal", "bris_de_glace", "centre_15"} <= modes
    glass = portal.row("journal-entry", mode="bris_de_glace", outcome="ok")
    assert "Bris de glace" in glass.text and builders.PS_OTHER in glass.text and "Médecin" in glass.text
    assert "alert-row" in glass.get_attribute("class")                 # stands out
    refused = [e.text for e in portal.all("journal-entry") if e.get_attribute("data-outcome") == "refused"
               and e.get_attribute("data-mode") == "bris_de_glace"]
    assert any("vous refusez le bris de glace" in text for text in refused)     # the opt-out's refusal
    assert any("refusé : bris de glace refusé" in text for text in refused)     # why, on every entry
    assert "accès en urgence (bris de glace)" in glass.text
    assert all(e.find_element("css selector", "[data-testid=why]").text for e in portal.all("journal-entry"))
    portal.screenshot("journal")
    # filters: by mode, by professional
    form = portal.find("journal-filter")
    from selenium.webdriver.support.select import Select
    Select(form.find_element("name", "mode")).select_by_value("centre_15")
    portal.submit(form)
    assert {e.get_attribute("data-mode") for e in portal.all("journal-entry")} == {"centre_15"}
    form = portal.find("journal-filter")
    Select(form.find_element("name", "mode")).select_by_value("")
    portal.fill(form, ps=builders.PS_OTHER)
    portal.submit(form)
    entries = portal.all("journal-entry")
    assert entries and all(builders.PS_OTHER in e.text for e in entries)


def test_journal_is_paged(portal, server):
    pid, (doc,) = new_dmp(server)
    dr = server.ps()
    for _ in range(25):
        assert dr.get(f"DocumentReference/{doc}").status_code == 200
    portal.dev_login(pid)
    portal.nav("Journal des accès")
    first = [e.text for e in portal.all("journal-entry")]
    grouped = sum(int(g.get_attribute("data-count")) for g in portal.all("own-views"))
    assert len(first) + grouped == 20          # a page of 20 entries, the patient's own views grouped
    portal.press(portal.find("journal-next"))
    second = portal.all("journal-entry")
    assert second and len(second) <= 20
    portal.press(portal.find("journal-first"))
    assert len(portal.all("journal-entry")) + sum(
        int(g.get_attribute("data-count")) for g in portal.all("own-views")) == 20


# ----------------------------------------------------------------------------- notifications, contact

def test_notifications_say_what_could_not_be_sent_and_contact_details_fix_it(portal, server):
    pid, _ = new_dmp(server)                                   # no email, no phone on file
    btg = server.ps(builders.PS_OTHER)
    assert btg.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200   # a notice is due
    portal.dev_login(pid)
    portal.nav("Notifications")
    row = portal.row("notification", status="not-done")
    assert "Aucun moyen de contact" in row.text
    portal.screenshot("notifications")

    portal.nav("Coordonnées")
    form = portal.find("contact-form")
    portal.fill(form, email="pas-un-email", phone="")
    portal.d.execute_script("arguments[0].noValidate = true", form)
    portal.submit(form)
    assert "invalide" in portal.flash()
    form = portal.find("contact-form")
    portal.fill(form, email="claire.martin@example.org", phone="+33 6 12 34 56 78")
    portal.submit(form)
    assert "enregistrées" in portal.flash()
    telecom = server.as_("admin").get(f"Patient/{pid}").json["telecom"]
    assert {"system": "email", "value": "claire.martin@example.org"} in telecom
    assert {"system": "phone", "value": "+33 6 12 34 56 78", "use": "mobile"} in telecom
    # the next notice goes to both
    server.ps("810000000077").get(f"Patient/{pid}", headers=BTG_HEADERS)
    portal.nav("Notifications")
    channels = {r.get_attribute("data-status") for r in portal.all("notification")}
    assert "in-progress" in channels
    assert "Email" in portal.d.page_source and "SMS" in portal.d.page_source


# ----------------------------------------------------------------------------- my DMP

def test_close_and_reopen_my_dmp(portal, server):
    pid, _ = new_dmp(server)
    dr = server.ps()
    portal.dev_login(pid)
    portal.nav("Mon dossier")
    assert portal.find("dmp-status").get_attribute("data-active") == "true"
    portal.screenshot("dossier")
    portal.submit(portal.find("close-form"))
    assert portal.find("dmp-status").get_attribute("data-active") == "false"
    assert dr.get(f"Patient/{pid}").status_code == 404                  # closed: PS see nothing
    portal.nav("Mes documents")                                         # the patient still reads it
    assert len(portal.all("document")) == 1
    portal.nav("Mon dossier")
    portal.submit(portal.find("reopen-form"))
    assert portal.find("dmp-status").get_attribute("data-active") == "true"
    assert dr.get(f"Patient/{pid}").status_code == 200
    actions = journal_actions(portal)
    assert sum("Modification du dossier" in a and "Vous" in a for a in actions) == 2


def destroy_with(portal, server, confirm=None) -> str:
    """Sign in to a new DMP and submit its destroy form with ``confirm`` (default: its INS)."""
    ins = builders.nir()
    pid, _ = new_dmp(server, ins=ins)
    portal.dev_login(pid)
    portal.nav("Mon dossier")
    form = portal.find("destroy-form")
    portal.fill(form, confirm=confirm or ins)
    portal.submit(form)
    return pid


def test_destroy_needs_the_typed_ins(portal, server):
    pid = destroy_with(portal, server, "123")
    assert "recopiez exactement votre INS" in portal.flash()
    assert server.ps().get(f"Patient/{pid}").status_code == 200         # nothing changed


def test_destroy_my_dmp(portal, server):
    pid = destroy_with(portal, server)
    assert portal.find("destroyed")
    assert server.ps().get(f"Patient/{pid}").status_code == 404
    assert server.as_("admin").get(f"Patient/{pid}").status_code == 404
    portal.go("/portal/")
    assert portal.path == "/portal/login"


# ----------------------------------------------------------------------------- representatives

def test_representatives_are_listed_and_a_representative_signs_in(portal, server):
    pid, (doc,) = new_dmp(server)
    hidden = server.ps().create(builders.docref(pid, labels=("INVISIBLE_REPRESENTANTS_LEGAUX",)))["id"]
    created = server.as_("admin").post("RelatedPerson", {
        "resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{pid}"},
        "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                      "code": "GUARD"}]}],
        "name": [{"family": "Martin", "given": ["Paul"]}]})
    assert created.status_code == 201, created.get_data(as_text=True)
    portal.dev_login(pid)
    portal.nav("Représentants")
    (row,) = portal.all("representative")
    assert "Paul Martin" in row.text and "Tuteur" in row.text
    portal.screenshot("representants")
    # the guardian signs in for the patient: the record, less what is hidden from representatives
    portal.press(portal.find("logout"))
    portal.go("/portal/login")
    form = portal.find("dev-login-representative")
    portal.fill(form, representative=created.json["id"])
    portal.submit(form)
    assert portal.path == "/portal/" and "Claire Martin" in portal.css("h1").text
    portal.nav("Mes documents")
    assert [r.get_attribute("data-id") for r in portal.all("document")] == [doc]
    assert hidden not in portal.d.page_source
    portal.go("/portal/journal?qui=moi")
    entries = portal.all("journal-entry")
    assert entries and all("Vous (représentant légal)" in e.text for e in entries)


# ----------------------------------------------------------------------------- small screens

@pytest.mark.parametrize("width", [320, 375])
def test_pages_fit_a_small_screen(portal, server, width):
    pid, _ = new_dmp(server, docs=(builders.CONSULTATION, builders.LAB))
    portal.dev_login(pid)
    portal.d.set_window_size(width, 800)
    inner = portal.d.execute_script("return window.innerWidth")
    for path in ("/portal/", "/portal/documents", "/portal/journal", "/portal/autorisations",
                 "/portal/urgence", "/portal/notifications", "/portal/coordonnees", "/portal/dossier"):
        portal.go(path)
        scroll = portal.d.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= inner, f"{path} overflows at {width} px ({scroll} > {inner})"
    portal.go("/portal/")
    portal.screenshot("accueil")
