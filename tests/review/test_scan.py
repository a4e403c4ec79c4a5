"""The misuse scan (fhir_dmp/review/scan.py, CONTRACT.md "Privacy operations", "Looking for misuse"):
a small world built over HTTP with real tokens, one injected case per signal, the NDJSON of
``fhir-dmp privacy scan``, the review budget, one case per pair, the hourly run's lease."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from fhir_dmp.review.scan import run_scan
from fhir_dmp.review.schedule import ScanScheduler
from fhir_dmp.runtime import cli
from tests import builders as b

PS_BULK, PS_BTG, PS_RELATIVE = "810000000020", "810000000021", "810000000002"   # the last: Durand (Paris)
PEERS = [f"8100000001{i:02d}" for i in range(6)]
USUAL, ELSEWHERE = "10.0.0.1", "10.9.9.9"
#: the world's journal is moved to this weekday morning (Paris) so that off-hours do not depend on
#: when the tests run
MORNING = datetime(2026, 12, 2, 8, 30, tzinfo=timezone.utc)


def _person(api, family, city, postal, *, gp=None):
    body = b.patient(family=family, given="Alex", gp=gp)
    body["address"] = [{"city": city, "postalCode": postal, "country": "FRA"}]
    return api.as_admin().create(body)["id"]


def _attest_and_read(api, ps, pid, *, times=1, **kw):
    caller = api.as_ps(ps)
    caller.create(b.consent(pid, actor=ps, verified=True))
    for _ in range(times):
        assert caller.get(f"Patient/{pid}", **kw).status_code == 200


@pytest.fixture
def world(api, config, db, tmp_path):
    """Who did what; every pair the tests look at is named here."""
    b.load_directory(config, tmp_path)                     # Dupont (Lyon), Durand (Paris), Bernard (Lyon), ...
    w = {}
    # a plain legitimate pair: the médecin traitant reads their patient (Paris; the GP is in Lyon)
    w["plain"] = _person(api, "Moreau", "Paris", "75011", gp=b.PS_DR)
    dr = api.as_ps(b.PS_DR)
    dr.create(b.docref(w["plain"], author=b.PS_DR))
    for _ in range(3):
        assert dr.get(f"Patient/{w['plain']}", environ_base={"REMOTE_ADDR": USUAL}).status_code == 200
    # a look-up with no care relationship: attested, read, never followed by care
    w["lookup"] = _person(api, "Lefebvre", "Nantes", "44000")
    _attest_and_read(api, b.PS_OTHER, w["lookup"])
    # a relative: same surname as the professional (Durand)
    w["relative"] = _person(api, "Durand", "Brest", "29200")
    _attest_and_read(api, PS_RELATIVE, w["relative"])
    # a neighbour: the pharmacist of Lyon reads someone of Lyon
    w["neighbour"] = _person(api, "Garnier", "Lyon", "69003")
    _attest_and_read(api, b.PS_PHARMA, w["neighbour"], )
    # someone else with PS_DR's card: another address and client, while PS_DR works at the usual one
    w["borrowed"] = _person(api, "Roux", "Lille", "59000")
    api.as_patient(w["borrowed"]).create(b.consent(w["borrowed"], actor=b.PS_DR))
    other = api.as_token(api.idp.ps(b.PS_DR, client_id="other-app"))
    for _ in range(2):
        assert other.get(f"Patient/{w['borrowed']}", environ_base={"REMOTE_ADDR": ELSEWHERE}).status_code == 200
        assert dr.get(f"Patient/{w['plain']}", environ_base={"REMOTE_ADDR": USUAL}).status_code == 200
    # peers of the same profession, each with one or two patients of their own
    for i, ps in enumerate(PEERS):
        for j in range(1 + i % 2):
            pid = _person(api, f"Peer{i}x{j}", "Dijon", "21000")
            api.as_patient(pid).create(b.consent(pid, actor=ps))
            assert api.as_ps(ps).get(f"Patient/{pid}").status_code == 200
    # bulk: one médecin opens ten DMPs in a day
    w["bulk"] = [_person(api, f"Bulk{i}", "Tours", "37000") for i in range(10)]
    for pid in w["bulk"]:
        _attest_and_read(api, PS_BULK, pid)
    # break-glass far above peers: four DMPs; one peer's single emergency is ordinary
    w["btg"] = [_person(api, f"Urgence{i}", "Metz", "57000") for i in range(4)]
    for pid in w["btg"]:
        r = api.as_ps(PS_BTG, purpose="BTG", btg_reason="urgence vitale").get(f"Patient/{pid}")
        assert r.status_code == 200
    w["one_btg"] = _person(api, "Urgence9", "Metz", "57000")
    assert api.as_ps(PEERS[0], purpose="BTG", btg_reason="malaise").get(f"Patient/{w['one_btg']}").status_code == 200
    # off-hours: a physiotherapist who works by day reads one record at night
    w["day"] = _person(api, "Jour", "Caen", "14000")
    api.as_patient(w["day"]).create(b.consent(w["day"], actor=b.PS_KINE))
    kine = api.as_ps(b.PS_KINE, profession="70")
    for _ in range(3):
        assert kine.get(f"Patient/{w['day']}").status_code == 200
    w["night"] = _person(api, "Nuit", "Caen", "14000")
    api.as_patient(w["night"]).create(b.consent(w["night"], actor=b.PS_KINE))
    assert kine.get(f"Patient/{w['night']}").status_code == 200
    # the journal moved to a weekday morning, keeping its order and spacing; the night read at 2 a.m.
    b.seal_journal(db, config.audit_key_path)
    first = min(d["lu"] for d in b.journal_entries(db))

    def when(d):
        if d.get("pid") == w["night"]:
            return datetime(2026, 12, 2, 1, 0, tzinfo=timezone.utc)
        return MORNING + (d["lu"] - first)
    b.retime_journal(db, when)
    return w


def _by_pair(rows):
    return {(r["actor"], r["patient"]): r for r in rows}


WINDOW = dict(since=MORNING - timedelta(hours=8), until=MORNING + timedelta(hours=2))


def test_each_signal_fires_on_its_case_and_not_on_a_plain_pair(world, db_storage):
    """Also: by default the window starts where the last scan ended."""
    rows = _by_pair(run_scan(db_storage, keep_rows=True, **WINDOW).rows)
    plain = rows[(b.PS_DR, world["plain"])]
    assert plain["signals"] == [] and plain["accesses"] == 6   # a deposit and five reads
    assert {"no-relationship", "attestation-only"} <= set(rows[(b.PS_OTHER, world["lookup"])]["signals"])
    assert "same-surname" in rows[(PS_RELATIVE, world["relative"])]["signals"]
    assert "same-place" in rows[(b.PS_PHARMA, world["neighbour"])]["signals"]
    assert "shared-credential" in rows[(b.PS_DR, world["borrowed"])]["signals"]
    assert all("bulk" in rows[(PS_BULK, pid)]["signals"] for pid in world["bulk"])
    assert all("break-glass-rate" in rows[(PS_BTG, pid)]["signals"] for pid in world["btg"])
    assert "break-glass-rate" not in rows[(PEERS[0], world["one_btg"])]["signals"]
    assert "off-hours" in rows[(b.PS_KINE, world["night"])]["signals"]
    assert rows[(b.PS_KINE, world["day"])]["signals"] == []
    # every injected pair scores above the plain one
    for key, row in rows.items():
        if row["signals"]:
            assert row["score"] > plain["score"], key
    for sig in ("same-surname", "same-place", "shared-credential", "off-hours"):
        assert not any(sig in r["signals"] for k, r in rows.items() if k[0] in PEERS), sig
    assert run_scan(db_storage, **WINDOW).pairs > 20
    # nothing was journaled after the window's end: the next scan by default sees nothing
    again = run_scan(db_storage, until=WINDOW["until"] + timedelta(hours=1))
    assert again.since == WINDOW["until"] and again.pairs == 0


def test_cli_writes_the_contract_ndjson_and_opens_cases_within_the_budget(world, config, db, db_storage, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("FHIR_DMP_MONGODB_URI", config.mongodb_uri)
    monkeypatch.setenv("FHIR_DMP_DB", db.name)
    monkeypatch.setenv("FHIR_DMP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FHIR_DMP_REVIEW_BUDGET", "3")
    out = tmp_path / "scan.ndjson"
    assert cli.main(["privacy", "scan", "--since", "2026-12-02T00:30:00Z", "--until", "2026-12-02T10:30:00Z",
                     "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines and all(set(r) == {"actor", "patient", "score", "signals", "accesses", "first", "last"} for r in lines)
    assert [r["score"] for r in lines] == sorted((r["score"] for r in lines), reverse=True)
    assert all(0 <= r["score"] <= 1 and r["accesses"] >= 1 and r["first"] <= r["last"] for r in lines)
    assert {r["actor"] for r in lines} >= {b.PS_DR, b.PS_OTHER, PS_BULK, PS_BTG}
    # the three highest became anomaly Tasks with their score, signals and first AuditEvent
    tasks = [d["res"] for d in db["Task"].find({"res.code.coding.code": "anomaly"})]   # break-glass reads have theirs
    assert len(tasks) == 3
    top = {(r["actor"], r["patient"]) for r in lines[:3]}
    for task in tasks:
        inputs = {i["type"]["coding"][0]["code"]: i for i in task["input"]}
        pair = (inputs["actor"]["valueIdentifier"]["value"], task["for"]["reference"].split("/")[1])
        assert pair in top
        assert float(inputs["score"]["valueDecimal"]) >= 0.5
        signals = [i["valueCoding"] for i in task["input"] if i["type"]["coding"][0]["code"] == "signal"]
        assert signals and all(s["system"].endswith("dmp-privacy-signal") for s in signals)
        [focus] = b.journal_entries(db, {"_id": task["focus"]["reference"].split("/")[1]})
        assert focus["pid"] == pair[1]
    # the budget is per day and a pair never gets two cases
    day = datetime(2026, 12, 3, 9, tzinfo=timezone.utc)
    first = run_scan(db_storage, budget=4, now=day, **WINDOW)
    assert len(first.opened) == 4
    assert run_scan(db_storage, budget=4, now=day.replace(hour=15), **WINDOW).opened == []   # the day's budget is spent
    later = run_scan(db_storage, budget=4, now=day + timedelta(days=1), **WINDOW)
    assert len(later.opened) == 4
    pairs = [(next(i["valueIdentifier"]["value"] for i in t.resource["input"] if "valueIdentifier" in i),
              t.resource["for"]["reference"]) for t in db_storage.find("Task", {"res.code.coding.code": "anomaly"}, [], 100)]
    assert len(pairs) == 3 + 8 and len(set(pairs)) == 3 + 8


def test_the_hourly_run_is_one_process_at_a_time(db_storage):
    runs = []
    one = ScanScheduler(db_storage, lambda: runs.append("one"), owner="one")
    two = ScanScheduler(db_storage, lambda: runs.append("two"), owner="two")
    assert [one.tick(), two.tick(), one.tick()] == [True, False, False]
    assert runs == ["one"]
