"""What the officer's pages' tests share: review cases made the way the server makes them, and
an officer signed in through the dev form.

A break-glass case comes from a real break-glass read through the FHIR API (the guard opens its
Task); an anomaly case from ``review.open_cases``, what the misuse scan calls.
"""
from __future__ import annotations

import re

from fhir_dmp.profiles.review_task import SIGNAL_SYSTEM
from fhir_dmp.review import ReviewCase, case_input, open_cases
from fhir_dmp.runtime.services import services
from tests import builders
from tests.portal.test_portal_browser import BTG_HEADERS
from tests.portal_kit import csrf_token

OFFICER = "dpo-lyon"
CASE_IDS = re.compile(r'data-testid="case" data-id="([^"]+)" data-code="([^"]+)"')


def break_glass_case(ps, other, pid: str, doc: str) -> None:
    """``other`` (a médecin with no right on ``pid``) breaks the glass: reads the DMP and a document."""
    assert other.get(f"Patient/{pid}", headers=BTG_HEADERS).status_code == 200
    assert other.get(f"DocumentReference/{doc}", headers=BTG_HEADERS).status_code == 200


def anomaly_case(app, pid: str, actor: str, score: float, signals=("same-surname",)) -> str:
    """An ``anomaly`` case as the misuse scan opens it (score and signals as inputs)."""
    inputs = [case_input("score", valueDecimal=score)]
    inputs += [case_input("signal", valueCoding={"system": SIGNAL_SYSTEM, "code": s}) for s in signals]
    case = ReviewCase(code="anomaly", patient_id=pid, actor=actor, focus=None, inputs=inputs,
                      key=f"anomaly|{actor}|{pid}")
    (tid,) = open_cases(services(app).storage, [case])
    return tid


def sign_in_officer(client, officer: str = OFFICER):
    """Sign ``client`` (a test client: a cookie jar) in through the dev form; the response."""
    token = csrf_token(client.get("/privacy/login").get_data(as_text=True))
    return client.post("/privacy/login", data={"officer": officer, "csrf_token": token})


def queue(client) -> list[tuple[str, str]]:
    """The queue's cases, in order: (Task id, code)."""
    r = client.get("/privacy/")
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return CASE_IDS.findall(r.get_data(as_text=True))


def new_dmp(ps) -> tuple[str, str]:
    """A DMP opened by ``ps`` with one consultation note."""
    pid = ps.create(builders.patient())["id"]
    return pid, ps.create(builders.docref(pid, builders.CONSULTATION))["id"]
