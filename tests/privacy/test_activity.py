"""Accesses per day against peers, and the chart's geometry (fhir_dmp/privacy/activity.py):
plain journal entries in, numbers and coordinates out."""
from __future__ import annotations

from datetime import datetime, timezone

from fhir_dmp.audit.events import PROFESSION_SYSTEM
from fhir_dmp.privacy import activity
from fhir_dmp.security.principal import IDNATPS_SYSTEM

CASE_DAY = datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)
DAYS = activity.window(CASE_DAY)


def entry(ps: str, when: str, *, profession: str = "10", action: str = "R", patient: str | None = "p1") -> dict:
    event = {"resourceType": "AuditEvent", "recorded": when, "action": action,
             "agent": [{"who": {"identifier": {"system": IDNATPS_SYSTEM, "value": ps}},
                        "role": [{"coding": [{"system": PROFESSION_SYSTEM, "code": profession}]}]}],
             "entity": []}
    if patient:
        event["entity"].append({"what": {"reference": f"Patient/{patient}"},
                                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}})
    return event


def test_the_window_ends_on_the_case_day_in_paris():
    assert len(DAYS) == 28 and DAYS[-1].isoformat() == "2026-11-28" and DAYS[0].isoformat() == "2026-11-01"
    start, end = activity.bounds(DAYS)
    assert start == "2026-11-01T00:00:00+01:00" and end == "2026-11-29T00:00:00+01:00"
    # 23:30 UTC is already the next day in Paris
    assert activity.window(datetime(2026, 11, 27, 23, 30, tzinfo=timezone.utc))[-1].isoformat() == "2026-11-28"


def test_reads_are_counted_per_professional_and_day_under_the_profession():
    events = [entry("a", "2026-11-28T08:00:00Z"), entry("a", "2026-11-28T09:00:00Z"),
              entry("a", "2026-11-27T22:59:00Z"),                      # 27 Nov in Paris... 23:59
              entry("a", "2026-11-28T10:00:00Z", action="C"),          # a deposit: not a read
              entry("a", "2026-11-28T10:00:00Z", patient=None),        # no DMP
              entry("b", "2026-11-28T10:00:00Z", profession="21"),     # a pharmacist
              entry("c", "2026-10-01T10:00:00Z")]                      # before the window
    every = activity.per_day(events, DAYS)
    assert every["a"][-1] == 2 and every["a"][-2] == 1 and sum(every["a"]) == 3
    assert set(every) == {"a", "b"}
    assert set(activity.per_day(events, DAYS, {"10"})) == {"a"}


def test_the_peers_line_is_the_median_with_zeros_for_idle_days():
    series = {"me": [9, 0, 0], "p1": [1, 0, 4], "p2": [3, 0, 0], "p3": [2, 1, 0]}
    assert activity.peers_median(series, "me", 3) == ([2.0, 0.0, 0.0], 3)
    assert activity.peers_median({"me": [1]}, "me", 1) == ([0.0], 0)


def test_the_chart_scales_to_a_round_top():
    mine = [0] * 27 + [7]
    peers = [1.0] * 28
    chart = activity.chart(DAYS, mine, peers)
    assert [t["label"] for t in chart["ticks"]] == ["0", "5", "10"]
    assert len(chart["bars"]) == 28 and chart["bars"][-1].count == 7 and chart["bars"][0].height == 0
    tallest = chart["bars"][-1]
    assert abs(tallest.height - (chart["bottom"] - activity.TOP) * 0.7) < 0.2
    assert abs(tallest.y + tallest.height - chart["bottom"]) < 0.2
    assert len(chart["line"].split()) == 28 and chart["total"] == 7 and chart["peak"] == 7
    assert [label["label"] for label in chart["labels"]] == ["01/11", "08/11", "15/11", "22/11", "28/11"]
