"""Does a denied read take the time of a missing one? (DESIGN.md "No leaks")

A professional who is not authorized on a DMP reads one of its documents
(denied: 404) and a document id that does not exist (missing: 404), 300
interleaved times each through the WSGI app with a real token; prints p50/p95
of both and their difference. Run by hand: ``python bench/leak_timing.py``.
"""
from __future__ import annotations

import argparse
import time

import _common as c
from tests import builders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100 reads of each")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    repeat = args.repeat or (100 if args.quick else 300)
    with c.environment() as env:
        _, ids = c.seed_dmp(env, 20)
        client = env.app.test_client()
        headers = {"Authorization": f"Bearer {env.idp.ps(builders.PS_OTHER, profession='10')}",
                   "Accept": "application/fhir+json"}
        times = {"denied": [], "missing": []}
        bodies = {}
        for i in range(repeat + 5):
            for kind, rid in (("denied", ids[i % len(ids)]), ("missing", f"{i:032x}")):
                t = time.perf_counter()
                r = client.get(f"/fhir/DocumentReference/{rid}", headers=headers)
                elapsed = time.perf_counter() - t
                assert r.status_code == 404, (kind, r.status_code)
                bodies[kind] = r.json["issue"][0]["code"]
                if i >= 5:
                    times[kind].append(elapsed)
        print(f"GET DocumentReference/{{id}} by an unauthorized PS, {repeat} interleaved reads each")
        for kind, values in times.items():
            print(f"  {kind:8} {c.fmt_ms(c.stats(values))}   issue code {bodies[kind]}")
        d, m = c.stats(times["denied"]), c.stats(times["missing"])
        print(f"  difference p50 {d['p50'] - m['p50']:+.2f} ms")


if __name__ == "__main__":
    main()
