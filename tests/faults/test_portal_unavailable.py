"""CONTRACT.md "Faults, failover and backups", the portal: under a step-down longer than
``FHIR_DMP_DB_WAIT`` its pages and actions answer a French 503 page with ``Retry-After``, never a
500 nor an OperationOutcome, and serve again within 2 s of the database's return."""
from __future__ import annotations

import time

from fhir_dmp.runtime.services import services
from fhir_dmp.security.devkeys import mint_token
from tests import builders as b
from tests.api import Api
from tests.faults.database_kit import faulty_app, faulty_db, faulty_name  # noqa: F401 (fixtures)
from tests.portal_kit import csrf_token

STEP_DOWN_S = 10      # long enough for two answers past the wait on 2 loaded cores


def _unavailable_page(r) -> None:
    text = r.get_data(as_text=True)
    assert r.status_code == 503, (r.status_code, text[:300])
    assert r.mimetype == "text/html"
    assert "momentanément indisponible" in text
    assert int(r.headers["Retry-After"]) > 0


def test_the_portal_under_a_step_down_answers_a_french_503_page(faulty_app, faulty_db):
    app = faulty_app(dev=True)
    dr = Api(app, None).as_token(mint_token(services(app).config, "ps", id_nat_ps=b.PS_DR, profession="10"))
    pid = dr.create(b.patient(email=None))["id"]
    dr.create(b.docref(pid, b.CONSULTATION))
    client = app.test_client()
    token = csrf_token(client.get("/portal/login").get_data(as_text=True))
    assert client.post("/portal/login", data={"patient": pid, "csrf_token": token}).status_code == 302
    page = client.get("/portal/autorisations")
    assert page.status_code == 200
    token = csrf_token(page.get_data(as_text=True))
    consents = dr.search(f"Consent?patient={pid}").get("total")

    began = faulty_db.step_down(STEP_DOWN_S)
    # a page: its reads cannot be journaled, so they are withheld
    _unavailable_page(client.get("/portal/documents"))
    # an action: the Consent is not written
    _unavailable_page(client.post("/portal/blocages", data={"idnatps": b.PS_OTHER, "csrf_token": token}))
    assert time.monotonic() - began < STEP_DOWN_S, "the step-down ended before the checks"
    back = faulty_db.back(STEP_DOWN_S + 10)
    while (r := client.get("/portal/documents")).status_code != 200:
        _unavailable_page(r)
        assert time.monotonic() - back < 2, "the portal does not serve 2 s after the step-down's end"
        time.sleep(0.1)
    assert dr.search(f"Consent?patient={pid}").get("total") == consents
