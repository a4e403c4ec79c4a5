"""The patient sees the officer's verdict beside the reviewed access in the portal's journal, and
``fhir-dmp dev-token officer`` mints the privacy officer's token (dev mode)."""
from __future__ import annotations

import base64
import html
import json
import re

from fhir_dmp.profiles.review_task import REVIEW_SYSTEM
from tests import builders
from tests.portal.test_portal_security import dev, make_app  # noqa: F401  (fixtures)
from tests.runtime.test_cli import _cli

BTG = {"X-Break-Glass-Reason": "patient inconscient",
       "Category": 'http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; '
                   'scheme="http://hl7.org/fhir/tag/security"; label="break the glass"'}


def _journal_rows(client) -> list[str]:
    page = client.get("/portal/journal?vues=1").get_data(as_text=True)
    return re.findall(r'<li data-testid="journal-entry".*?</li>', page, flags=re.S)


def test_the_verdict_is_shown_beside_the_access(dev):
    pid, _ = dev.dmp()
    er = dev.ps(builders.PS_OTHER)
    assert er.get(f"Patient/{pid}", headers=BTG).status_code == 200
    officer = dev.as_("officer")            # the dev key's privacy officer (fhir-dmp dev-token officer)
    task = officer.search(f"Task?code={REVIEW_SYSTEM}|break-glass&status=requested&patient=Patient/{pid}"
                          "&_sort=-authored-on")["entry"][0]["resource"]
    client = dev.browser(pid)
    assert not any('data-testid="review"' in row for row in _journal_rows(client))   # not reviewed yet
    closed = {**task, "status": "completed", "note": [{"text": "Aucune urgence ce jour-là."}],
              "businessStatus": {"coding": [{"system": REVIEW_SYSTEM, "code": "unjustified"}]}}
    assert officer.put(f"Task/{task['id']}", closed).status_code == 200
    reviewed = [row for row in _journal_rows(client) if 'data-testid="review"' in row]
    assert len(reviewed) == 1
    assert 'data-mode="bris_de_glace"' in reviewed[0]
    assert "examiné : injustifié — Aucune urgence ce jour-là." in html.unescape(reviewed[0])


def test_dev_token_officer(tmp_path):
    proc = _cli("dev-token", "officer", "--port", "9123", data_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = proc.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["dmp_role"] == "privacy_officer" and "SubjectNameID" not in claims
