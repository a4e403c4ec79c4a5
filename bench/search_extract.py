"""Time fhir_dmp.search.extract per resource on the official R4 examples.

Usage: python bench/search_extract.py [iterations]
Prints microseconds per extract() call, per resource type and overall, and
the same for the FHIRPath evaluation (fhirpathpy) of the same expressions
as a reference point. Goal: well under 1 ms per typical resource.
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


def main() -> None:
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
