"""The review Task profile: ig/ (CodeSystems, StructureDefinition invariants) says what
fhir_dmp/profiles/review_task.py enforces."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models as fhirpath_models

from fhir_dmp.http.errors import Unprocessable
from fhir_dmp.profiles import validate
from fhir_dmp.profiles.review_task import (CASE_CODES, INPUT_CODES, REVIEW_SYSTEM, SIGNALS, VERDICTS, check_task)
from fhir_dmp.review.cases import ReviewCase, build_task
from fhir_dmp.storage import now

IG = Path(__file__).resolve().parents[2] / "ig"


def _ig(name: str) -> dict:
    return json.loads((IG / name).read_text(encoding="utf-8"))


def test_codesystems_hold_the_codes_the_server_uses():
    review = {c["code"] for c in _ig("CodeSystem-dmp-privacy-review.json")["concept"]}
    assert review == set(CASE_CODES) | set(VERDICTS) | set(INPUT_CODES)
    assert {c["code"] for c in _ig("CodeSystem-dmp-privacy-signal.json")["concept"]} == set(SIGNALS)


def _task(**changes) -> dict:
    task = build_task(ReviewCase(code="break-glass", patient_id="p1", actor="810000000001", focus="e1", key="k"), now())
    task.update(changes)
    return {k: v for k, v in task.items() if v is not None}


VERDICT = {"coding": [{"system": REVIEW_SYSTEM, "code": "justified"}]}
SAMPLES = [
    _task(),
    _task(status="in-progress"),
    _task(status="completed", businessStatus=VERDICT, note=[{"text": "ok"}]),
    _task(status="completed", businessStatus=VERDICT),
    _task(status="completed"),
    _task(status="cancelled"),
    _task(code={"coding": [{"system": REVIEW_SYSTEM, "code": "justified"}]}),
    _task(**{"for": {"reference": "Group/1"}}),
    _task(input=[{"type": {"text": "x"}, "valueString": "y"}]),
]


@pytest.mark.parametrize("task", SAMPLES)
def test_invariants_agree_with_python(task):
    sd = _ig("StructureDefinition-dmp-review-task.json")
    invariants = [c["expression"] for e in sd["differential"]["element"] for c in e.get("constraint", [])]
    holds = all(fhirpath(task, expr, {}, fhirpath_models["r4"]) == [True] for expr in invariants)
    assert holds is (check_task(task) == [])
    if not holds:
        with pytest.raises(Unprocessable):
            validate(task)
