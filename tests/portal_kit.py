"""Fixtures for the patient portal's tests: a live server and one headless Chromium per session
(the OpenID Connect provider the sign-in tests use is ``tests/oidc_provider.py``).

Nothing is mocked: the browser is Debian's ``chromium`` driven by ``chromium-driver`` through
selenium, the server is the real WSGI app on a real socket. Without Chromium the browser tests
skip with the reason.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import uuid
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FHIR_DMP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FHIR_DMP_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = os.environ.get("FHIR_DMP_SCREENSHOTS")   # a folder: the browser tests save the pages there
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The WSGI app on a real loopback socket, served from a thread (threaded: the browser opens
    several connections)."""

    def __init__(self, app, port: int):
        from werkzeug.serving import make_server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


def csrf_token(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


# ----------------------------------------------------------------------------- the browser

def _chromium_missing() -> str | None:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        return (f"Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver to run the portal's browser tests")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole test session (cookies cleared by ``portal_browser``)."""
    missing = _chromium_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--lang=fr-FR", "--disable-extensions",
                "--no-first-run", "--disable-background-networking", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Browser:
    """The portal as a person uses it: pages, forms and buttons found by their ``data-testid``."""

    def __init__(self, driver, base_url: str):
        self.d = driver
        self.base = base_url

    # navigation ---------------------------------------------------------------
    def go(self, path: str) -> None:
        self.d.get(self.base + path)

    @property
    def path(self) -> str:
        return self.d.current_url.removeprefix(self.base).split("?", 1)[0]

    def find(self, testid: str, within=None):
        from selenium.webdriver.common.by import By
        return (within or self.d).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, testid: str, within=None) -> list:
        from selenium.webdriver.common.by import By
        return (within or self.d).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def css(self, selector: str, within=None):
        from selenium.webdriver.common.by import By
        return (within or self.d).find_element(By.CSS_SELECTOR, selector)

    def press(self, element) -> None:
        """Click a link or button that loads a page, and wait for the new page (the old window
        object, marked before the click, is gone and the new document is loaded)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait
        self.d.execute_script("window.__portalOld = true")
        element.click()

        def loaded(d):
            try:
                return d.execute_script("return !window.__portalOld && document.readyState === 'complete'")
            except WebDriverException:      # between two documents
                return False
        WebDriverWait(self.d, 15).until(loaded)

    def wait_path(self, path: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(self.d, 15).until(lambda _d: self.path == path)

    def nav(self, label: str) -> None:
        """Follow a link of the main menu, by its visible text."""
        from selenium.webdriver.common.by import By
        self.press(self.d.find_element(By.CSS_SELECTOR, "nav[aria-label='Menu principal']")
                   .find_element(By.LINK_TEXT, label))

    def flash(self) -> str:
        from selenium.webdriver.common.by import By
        return " ".join(e.text for e in self.d.find_elements(By.CSS_SELECTOR, ".flash"))

    def fill(self, form, **values) -> None:
        from selenium.webdriver.common.by import By
        for name, value in values.items():
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)

    def submit(self, form) -> None:
        from selenium.webdriver.common.by import By
        self.press(form.find_element(By.CSS_SELECTOR, "button[type=submit]"))

    def row(self, testid: str, **attrs):
        """The first ``testid`` row whose data-* attributes hold ``attrs``."""
        for el in self.all(testid):
            if all(el.get_attribute(f"data-{k}") == v for k, v in attrs.items()):
                return el
        raise AssertionError(f"no {testid} row with {attrs} on {self.path}")

    # sign-in ------------------------------------------------------------------
    def dev_login(self, patient_id: str) -> None:
        self.go("/portal/login")
        form = self.find("dev-login")
        self.fill(form, patient=patient_id)
        self.submit(form)
        assert self.path == "/portal/", self.d.page_source[:2000]

    def cookies(self) -> dict:
        return {c["name"]: c["value"] for c in self.d.get_cookies()}

    # screenshots --------------------------------------------------------------
    def screenshot(self, name: str, widths=(1280, 375), max_height: int = 1200) -> None:
        """With FHIR_DMP_SCREENSHOTS set, save the page at each width (PNG)."""
        if not SCREENSHOTS:
            return
        out = Path(SCREENSHOTS)
        out.mkdir(parents=True, exist_ok=True)
        for width in widths:
            self.d.set_window_size(width, 900)
            height = self.d.execute_script("return document.documentElement.scrollHeight")
            chrome = 900 - self.d.execute_script("return window.innerHeight")   # the window's own bars
            self.d.set_window_size(width, min(max(height, 400), max_height) + chrome)
            self.d.save_screenshot(str(out / f"{name}-{width}.png"))
        self.d.set_window_size(1280, 900)


def open_portal(driver, base_url: str) -> Browser:
    driver.delete_all_cookies()
    driver.set_window_size(1280, 900)
    return Browser(driver, base_url)


def unique_db(mongo_client):
    return mongo_client[f"t_{uuid.uuid4().hex[:12]}"]
