"""Time fhir_dmp.search.extract per resource on the official R4 examples.

Usage: python bench/search_extract.py [iterations]
       python bench/search_extract.py --events [N]
Prints microseconds per extract() call, per resource type and overall, and
the same for the FHIRPath evaluation (fhirpathpy) of the same expressions
as a reference point. Goal: well under 1 ms per typical resource.

``--events``: events per second of the journal sealer's extraction (issue 22): N AuditEvents as
``build_event`` makes them (reads, searches, creates and denials of a few professionals, a
break-glass, patients; each its own instant, id and request id, 200 patients) through
``extract`` (memoized for AuditEvents) and through ``extract_reference``, best of 7.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fhir_dmp.search import SUPPORTED, extract  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "r4"


def load() -> list[dict]:
    out = []
    for f in sorted(FIXTURES.glob("*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        if r.get("resourceType") in SUPPORTED:
            r.setdefault("meta", {}).setdefault("lastUpdated", "2024-05-01T10:00:00.123Z")
            out.append(r)
    return out


def bench(resources: list[dict], n: int) -> dict[str, list[float]]:
    per_type: dict[str, list[float]] = {}
    for r in resources:
        t = r["resourceType"]
        extract(t, r)  # warm
        t0 = time.perf_counter()
        for _ in range(n):
            extract(t, r)
        per_type.setdefault(t, []).append((time.perf_counter() - t0) / n * 1e6)
    return per_type


def bench_fhirpath(resources: list[dict], n: int) -> float:
    from fhirpathpy import compile as fp_compile
    compiled = {t: [fp_compile(p.expression.replace("Resource.", t + "."))
                    for name, p in params.items()]
                for t, params in SUPPORTED.items()}
    times = []
    for r in resources:
        fns = compiled[r["resourceType"]]
        t0 = time.perf_counter()
        for _ in range(n):
            for fn in fns:
                try:
                    fn(r)
                except Exception:  # resolve() is not available without a resolver
                    pass
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.mean(times)


def journal_events(n: int) -> list[dict]:
    """``n`` AuditEvents as the guard journals them (the canonical JSON the sealer unpacks)."""
    import random
    from datetime import datetime, timedelta, timezone

    from fhir_dmp.audit.events import AccessRecord, build_event
    from fhir_dmp.security.principal import BTG, PATIENT, PS, Principal
    from fhir_dmp.security.scopes import Scopes
    rnd = random.Random(22)
    pros = [Principal(kind=PS, subject=f"ps-{i}", scopes=Scopes.parse("user/*.cruds"), id_nat_ps=f"8100000000{i:02d}",
                      professions=("10",), acr="eidas1", client_id="lgc") for i in range(5)]
    pros.append(Principal(kind=PS, subject="ps-btg", scopes=Scopes.parse("user/*.cruds"), id_nat_ps="810000000099",
                          professions=("60",), acr="eidas1", purpose=BTG, btg_reason="urgence"))
    kinds = [("read", "R", "0", "permit"), ("read", "R", "4", "deny"), ("search-type", "E", "0", "permit"),
             ("create", "C", "0", "permit")]
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        pid = f"p{rnd.randrange(200):04d}"
        p = rnd.choice(pros + [Principal(kind=PATIENT, subject=f"Patient/{pid}", scopes=Scopes.parse("patient/*.rs"),
                                         patient_id=pid)])
        interaction, action, outcome, result = rnd.choice(kinds)
        rec = AccessRecord(interaction=interaction, action=action, outcome=outcome, principal=p, patient_id=pid,
                           resource=f"DocumentReference/d{i}" if interaction != "search-type" else None,
                           query="patient=" + pid if interaction == "search-type" else None,
                           decision={"result": result, "rule": "consent", "reason": "x"},
                           http_status=200, client_ip="10.0.0.7", request_id=f"req-{i}",
                           recorded=t0 + timedelta(milliseconds=37 * i))
        ev = build_event(rec, source_observer="https://dmp.bench/fhir")
        ev["id"] = f"ev{i}"
        ev["meta"] = {"versionId": "1", "lastUpdated": ev["recorded"]}
        out.append(json.loads(json.dumps(ev)))
    return out


def bench_events(n: int) -> None:
    from fhir_dmp.search.extract import extract_reference
    events = journal_events(n)
    for name, fn in (("extract_reference", extract_reference), ("extract (memoized)", extract)):
        best = []
        for _ in range(7):
            t0 = time.perf_counter()
            for ev in events:
                fn("AuditEvent", ev)
            best.append(time.perf_counter() - t0)
        print(f"{name:<20} {n / min(best):8.0f} events/s  {min(best) / n * 1e6:6.1f} us/event")


def main() -> None:
    if sys.argv[1:2] == ["--events"]:
        bench_events(int(sys.argv[2]) if len(sys.argv) > 2 else 5000)
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    resources = load()
    per_type = bench(resources, n)
    allv = [v for vs in per_type.values() for v in vs]
    print(f"extract() over {len(resources)} R4 examples, {n} iterations each")
    for t, vs in sorted(per_type.items()):
        print(f"  {t:<18} {len(vs):3d} resources  mean {statistics.mean(vs):7.1f} us  max {max(vs):7.1f} us")
    print(f"  {'all':<18} {len(allv):3d} resources  mean {statistics.mean(allv):7.1f} us  "
          f"p95 {sorted(allv)[int(len(allv) * 0.95)]:7.1f} us")
    print(f"fhirpathpy on the same expressions: mean {bench_fhirpath(resources, max(1, n // 20)):7.1f} us"
          " per resource (reference point, not used)")


if __name__ == "__main__":
    main()
