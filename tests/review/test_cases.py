"""Opening review cases (fhir_dmp/review/cases.py): one Task per key, journaled as the server,
at most the budget of anomaly cases per UTC day (CONTRACT.md "Privacy operations")."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fhir_dmp.review import ReviewCase, case_input, open_cases
from fhir_dmp.profiles.review_task import REVIEW_SYSTEM, SIGNAL_SYSTEM
from tests import builders as b


def _anomaly(pid: str, ps: str) -> ReviewCase:
    return ReviewCase(code="anomaly", patient_id=pid, actor=ps, focus=None, key=f"anomaly|{ps}|{pid}",
                      inputs=[case_input("score", valueDecimal=0.97),
                              case_input("signal", valueCoding={"system": SIGNAL_SYSTEM, "code": "same-surname"})])


@pytest.fixture
def dmps(db_storage):
    """DMPs p0..p9 (a case is opened only on a DMP that exists)."""
    for i in range(10):
        db_storage.create("Patient", b.patient(), pid=None, rid=f"p{i}", session=None)


def test_one_case_per_key_journaled_as_the_server(db_storage, db, dmps):
    assert open_cases(db_storage, [_anomaly("nobody", b.PS_DR)]) == []      # no such DMP
    opened = open_cases(db_storage, [_anomaly("p1", b.PS_DR), _anomaly("p1", b.PS_DR), _anomaly("p2", b.PS_DR)])
    assert len(opened) == 2
    assert open_cases(db_storage, [_anomaly("p1", b.PS_DR)]) == []
    task = db_storage.read("Task", opened[0]).resource
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["code"]["coding"][0] == {"system": REVIEW_SYSTEM, "code": "anomaly", "display": "accès inhabituel"}
    assert task["for"] == {"reference": "Patient/p1"}
    codes = [i["type"]["coding"][0]["code"] for i in task["input"]]
    assert codes == ["actor", "score", "signal"]
    assert task["input"][0]["valueIdentifier"]["value"] == b.PS_DR
    events = b.journal_entries(db, {"pid": "p1"})
    assert len(events) == 1
    agent = events[0]["res"]["agent"][0]
    assert agent["who"]["identifier"]["value"] == "fhir-dmp"
    assert any(e.get("what", {}).get("reference") == f"Task/{opened[0]}" for e in events[0]["res"]["entity"])


def test_budget_counts_the_stored_tasks_of_the_utc_day(db_storage, dmps):
    day = datetime(2026, 3, 2, 10, tzinfo=timezone.utc)
    first = open_cases(db_storage, [_anomaly(f"p{i}", b.PS_DR) for i in range(3)], budget=2, now=day)
    assert len(first) == 2
    # later that day: the budget is spent, whatever the call
    assert open_cases(db_storage, [_anomaly("p9", b.PS_DR)], budget=2, now=day.replace(hour=23)) == []
    # a break-glass case is never held back by the anomaly budget
    bg = ReviewCase(code="break-glass", patient_id="p9", actor=b.PS_DR, focus=None, key="break-glass|g1")
    assert len(open_cases(db_storage, [bg], budget=0, now=day)) == 1
    # the next UTC day has its own budget
    assert len(open_cases(db_storage, [_anomaly("p9", b.PS_DR)], budget=2, now=day.replace(day=3, hour=0))) == 1
