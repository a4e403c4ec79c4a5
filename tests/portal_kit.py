"""Fixtures for the patient portal's tests: a live server, one headless Chromium per session,
and the OpenID Connect provider kit (``../shared/tools/oidc``) started from a fixture.

Nothing is mocked: the browser is Debian's ``chromium`` driven by ``chromium-driver`` through
selenium, the server is the real WSGI app on a real socket, the provider is the real node
``oidc-provider``. Without Chromium (or without node for the OIDC tests) the tests skip with the
reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

CHROMIUM = os.environ.get("FHIR_DMP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FHIR_DMP_CHROMEDRIVER", "/usr/bin/chromedriver")
OIDC_KIT = Path(os.environ.get("FHIR_DMP_OIDC_KIT")
                or Path(__file__).resolve().parents[2] / "shared" / "tools" / "oidc")
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


# ----------------------------------------------------------------------------- the OIDC provider

def _kit_dir(tmp_root: Path) -> Path:
    """A writable copy of the (read-only) kit with its node_modules, cached by package-lock hash."""
    lock = (OIDC_KIT / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fhir-dmp-oidc-kit" / \
        hashlib.sha256(lock).hexdigest()[:16]
    if not (cache / "node_modules" / "oidc-provider").is_dir():
        work = Path(tempfile.mkdtemp(prefix="oidc-kit-", dir=tmp_root))
        shutil.copytree(OIDC_KIT, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("node_modules", ".venv"))
        run = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            pytest.skip(f"npm ci failed for the OIDC provider kit: {run.stderr.strip()[-300:]}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copytree(work, cache)
        if not (cache / "node_modules").is_dir():
            return work
    return cache


class OidcProvider:
    """The kit's ``op.mjs`` on a free port, with a clients file written by the test."""

    def __init__(self, kit: Path, workdir: Path, *, clients: dict, audience: str):
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.clients_file = workdir / "clients.json"
        self.clients_file.write_text(json.dumps(clients), encoding="utf-8")
        self.log = open(workdir / "op.log", "w+", encoding="utf-8")
        env = {**os.environ, "OP_PORT": str(self.port), "OP_AUDIENCE": audience,
               "OP_CLIENTS_FILE": str(self.clients_file), "OP_QUIET": "1",
               "OP_KEY_FILE": str(workdir / "op-key.json")}
        self.proc = subprocess.Popen(["node", str(kit / "op.mjs")], cwd=kit, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the OIDC provider exited: {self.log.read()[-1000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.issuer + "/.well-known/openid-configuration", timeout=1).ok:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the OIDC provider did not start within 30 s")

    def client_token(self, client_id: str, scope: str, resource: str) -> str:
        r = requests.post(self.issuer + "/token", auth=(client_id, f"{client_id}-secret"), timeout=10,
                          data={"grant_type": "client_credentials", "scope": scope, "resource": resource})
        r.raise_for_status()
        return r.json()["access_token"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def oidc_kit(tmp_path_factory):
    """The kit's directory with node_modules installed (skips without node/npm or the kit)."""
    if not OIDC_KIT.is_dir():
        pytest.skip(f"the OIDC provider kit is not at {OIDC_KIT} (set FHIR_DMP_OIDC_KIT)")
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node/npm not installed: the OIDC provider kit cannot run")
    return _kit_dir(tmp_path_factory.mktemp("oidc"))


def unique_db(mongo_client):
    return mongo_client[f"t_{uuid.uuid4().hex[:12]}"]
