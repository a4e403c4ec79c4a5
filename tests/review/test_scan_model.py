"""The misuse scan's statistics and its learning from the officers' verdicts (fhir_dmp/review/model.py,
CONTRACT.md "Privacy operations": start rule-weighted, learn once there are verdicts)."""
from __future__ import annotations

from datetime import datetime, timezone

from fhir_dmp.profiles.review_task import REVIEW_SYSTEM
from fhir_dmp.review import model
from fhir_dmp.review.scan import _case, run_scan
from fhir_dmp.review.cases import open_cases
from tests import builders as b

UNUSUAL = model.features(["no-relationship", "same-place"], [1.0, 0.0, 1.0, 0.0, 1.0])
ORDINARY = model.features(["no-relationship"], [1.0, 1.0, 0.0, 0.0, 1.0])


def test_outliers_stand_far_above_their_peers_and_above_a_minimum():
    assert model.outliers([1, 1, 2, 2, 2, 3, 12], minimum=8) == [False] * 6 + [True]
    assert model.outliers([0, 0, 0, 0, 4], minimum=3) == [False] * 4 + [True]     # no spread: one unit
    assert model.outliers([0, 0, 0, 0, 2], minimum=3) == [False] * 5                # far, but below the minimum
    assert model.outliers([], minimum=1) == []


def test_rule_score_grows_with_each_signal():
    assert model.rule_score([]) == 0
    one = model.rule_score(["no-relationship"])
    assert 0 < one < model.rule_score(["no-relationship", "same-surname"]) < 1


def _judge(db_storage, db, verdicts: list[tuple[list[float], str]], first: int = 0) -> None:
    """Anomaly cases opened for fake pairs, their features kept, then closed by an officer."""
    rows = [{"actor": f"8100000009{i:02d}", "patient": f"p{i}", "score": 0.9, "signals": ["no-relationship"],
             "_focus": None} for i in range(first, first + len(verdicts))]
    for r in rows:    # cases are opened on DMPs that exist
        db_storage.run_transaction(lambda s, pid=r["patient"]: db_storage.create("Patient", b.patient(), pid=pid,
                                                                                 rid=pid, session=s))
    opened = open_cases(db_storage, [_case(r) for r in rows])
    assert len(opened) == len(rows)
    db_storage.keep_pair_features([{"actor": r["actor"], "pid": r["patient"], "features": f}
                                   for r, (f, _) in zip(rows, verdicts)], datetime.now(timezone.utc))
    for tid, (_, status) in zip(opened, verdicts):
        db["Task"].update_one({"_id": tid}, {"$set": {
            "res.status": "completed", "res.businessStatus": {"coding": [{"system": REVIEW_SYSTEM, "code": status}]}}})


def test_the_score_learns_from_the_officers_verdicts(db_storage, db):
    window = dict(since=datetime(2026, 1, 1, tzinfo=timezone.utc), until=datetime(2026, 1, 2, tzinfo=timezone.utc))
    _judge(db_storage, db, [(UNUSUAL, "unjustified")] * 4 + [(ORDINARY, "justified")] * 5)
    assert run_scan(db_storage, **window).learned is False          # not enough of each outcome yet
    _judge(db_storage, db, [(UNUSUAL, "unjustified")], first=9)
    assert run_scan(db_storage, **window).learned is True
    verdicts = [(UNUSUAL, True)] * 5 + [(ORDINARY, False)] * 5
    learned = model.learned(verdicts)
    rules = [model.rule_score(["no-relationship"])] * 2
    with_verdicts = model.score([UNUSUAL, ORDINARY], rules, model=learned)
    assert with_verdicts[0] > with_verdicts[1]
    assert model.score([UNUSUAL, ORDINARY], rules)[0] != with_verdicts[0]
