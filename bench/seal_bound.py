"""Benchmark: does the journal's sealer keep its bound under sustained saturation (issue 22)?

    python bench/seal_bound.py [--hold 180] [--conns 32] [--checkout /work/main] [--kit ../shared/tools/peer]

Starts ``fhir-dmp serve`` of ``--checkout`` (default: this one; embedded SecantusDB, fresh data
dir, the peer kit's JWKS and token), creates one DMP, then holds ``wrk -t2 -c<conns>`` on
``GET Patient/{id}`` for ``--hold`` seconds while sampling, every second, the age of the oldest
unsealed page (``AuditEvent_page``, by its ``(t, _id)`` index) and the events waiting in pages.
Prints the samples every 10 s, then: req/s, max and final age, the backlog when the load stops and
how long it takes to drain. ``audit verify`` reports events left unsealed longer than 60 s: the
max age must stay well under it (the group committers throttle past 10 s: audit/log.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pymongo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from peer import _post, default_kit, serve_with_kit, stop, wrk  # noqa: E402
from tests import builders  # noqa: E402

PAGES = "AuditEvent_page"


def backlog(db) -> tuple[float, int]:
    """(age in s of the oldest unsealed page, events in pages)."""
    oldest = db[PAGES].find_one({}, {"t": 1}, sort=[("t", 1), ("_id", 1)])
    if oldest is None:
        return 0.0, 0
    waiting = next(db[PAGES].aggregate([{"$group": {"_id": None, "n": {"$sum": {"$size": "$events"}}}}]),
                   {"n": 0})["n"]
    return (datetime.now(timezone.utc) - oldest["t"]).total_seconds(), waiting


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", type=Path, default=default_kit())
    ap.add_argument("--hold", type=float, default=180.0, help="seconds of saturation")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the fhir_dmp checkout to serve (before/after)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--env", action="append", metavar="FHIR_DMP_X=V", help="extra server setting (repeat)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found", file=sys.stderr)
        return 2
    from fhir_dmp.runtime.embedded_db import EmbeddedMongo
    work = Path(tempfile.mkdtemp(prefix="fhir-dmp-seal-"))
    ours = None
    try:
        kit, base, token, ours = serve_with_kit(work, args, checkout=args.checkout.resolve())
        pid = _post(base, token, builders.patient(family="Seal"))["id"]
        client = pymongo.MongoClient(EmbeddedMongo.find_running(work / "data"), tz_aware=True)
        db = client["fhir_dmp"]
        print(f"host: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; checkout {args.checkout}; "
              f"wrk -t2 -c{args.conns} {args.hold:g}s on GET Patient/{{id}}", flush=True)
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            wrk(kit, f"{base}/Patient/{pid}", token, args.conns, args.hold)))
        start = time.monotonic()
        load.start()
        samples = []
        while load.is_alive():
            age, waiting = backlog(db)
            samples.append((time.monotonic() - start, age, waiting))
            if len(samples) % 10 == 0:
                print(f"  t={samples[-1][0]:5.0f}s  oldest page {age:5.1f} s  events in pages {waiting:6d}",
                      flush=True)
            time.sleep(1.0)
        load.join()
        stopped = time.monotonic()
        age, left = backlog(db)
        while backlog(db)[1] and time.monotonic() - stopped < 300:
            time.sleep(0.1)
        drain = time.monotonic() - stopped
        ages = sorted(a for _, a, _ in samples)
        print(f"req/s {result['rps']:.1f}  p50 {result['p50_us'] / 1000:.1f} ms  non2xx {result['non2xx3xx']:.0f} "
              f"errors {result['errors']:.0f}", flush=True)
        print(f"oldest page age: max {ages[-1]:.1f} s, median {ages[len(ages) // 2]:.1f} s, at the end {age:.1f} s; "
              f"max events in pages {max(w for _, _, w in samples)}; {left} left when the load stopped, "
              f"drained in {drain:.1f} s; load average at the end {os.getloadavg()[0]:.2f}", flush=True)
        client.close()
    finally:
        stop(ours)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
