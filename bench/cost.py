"""Benchmark: CPU cost per request of fhir-dmp under load, by process (issue 13).

    python bench/cost.py [--duration 8] [--conns 32] [--docs 20] [--kit ../shared/tools/peer]

Throughput on a shared 2-core machine moves with whatever else runs; the CPU time each process
spends per request does not. This script starts ``fhir-dmp serve`` (embedded SecantusDB, fresh
data dir, the peer kit's JWKS and token, no npm needed), seeds one DMP with ``--docs``
DocumentReferences through the API, then for ``GET Patient/{id}``, ``GET DocumentReference/{id}``
(issue 22) and ``GET DocumentReference?patient={id}`` runs ``wrk -t2 -c<conns>`` and prints: req/s, p50, and
CPU milliseconds per request of the database process and of the server processes (master and
workers, from ``/proc/<pid>/stat``), plus the load average, so that figures taken on a busy
machine can still be compared. The database's share is what bounds throughput: it is one
Python process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from peer import (RssSampler, _post, default_kit, free_port, serve_with_kit, start_ours, stop,  # noqa: E402
                  wrk)
from tests import builders  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def split_tree(root: int) -> tuple[list[int], list[int]]:
    """(server pids, database pids) under ``root`` (the database runs ``secantusd``)."""
    server, database = [], []
    for pid in RssSampler(root)._tree():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        (database if b"secantus" in cmd else server).append(pid)
    return server, database


def measure(kit: Path, url: str, token: str, conns: int, duration: float, root: int,
            profile: Path | None = None) -> dict:
    server, database = split_tree(root)
    spies = []
    if profile is not None:   # py-spy on the database and each worker, collapsed stacks
        spies = [subprocess.Popen(["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "-d",
                                   str(int(duration)), "-o", str(profile.with_suffix(f".{p}.txt")),
                                   "-p", str(p)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for p in database + server]
    before = [sum(map(cpu_s, server)), sum(map(cpu_s, database))]
    d = wrk(kit, url, token, conns, duration)
    for spy in spies:
        spy.wait()
    after = [sum(map(cpu_s, server)), sum(map(cpu_s, database))]
    n = max(1.0, d["rps"] * duration)
    d["server_ms"] = 1e3 * (after[0] - before[0]) / n
    d["db_ms"] = 1e3 * (after[1] - before[1]) / n
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", type=Path, default=default_kit())
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--unguarded", action="store_true",
                    help="also GET Patient/{id} on a second server with guard and journal off (bench/_unguarded.py)")
    ap.add_argument("--env", action="append", metavar="FHIR_DMP_X=V", help="extra server setting (repeat)")
    ap.add_argument("--profile", type=Path, help="py-spy every process into DIR (collapsed stacks)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fhir-dmp-cost-"))
    ours = bare = None
    try:
        kit, base, token, ours = serve_with_kit(work, args)
        pid = _post(base, token, builders.patient(family="Cost"))["id"]
        pdf = builders.pdf_bytes("bench")
        doc = [_post(base, token, builders.docref(pid, content=pdf))["id"] for _ in range(args.docs)][0]
        load = os.getloadavg()[0]
        print(f"host: {os.cpu_count()} cores, load average {load:.2f}; wrk -t2 -c{args.conns} "
              f"{args.duration:g}s; DMP of {args.docs} documents", flush=True)
        for label, url in (("GET Patient/{id}", f"{base}/Patient/{pid}"),
                           ("GET DocumentReference/{id}", f"{base}/DocumentReference/{doc}"),
                           ("DocumentReference?patient=", f"{base}/DocumentReference?patient={pid}")):
            wrk(kit, url, token, args.conns, 2.0)   # warm-up
            prof = None
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                prof = args.profile / label.split()[-1].replace("/", "-").strip("?=")
            d = measure(kit, url, token, args.conns, args.duration, ours.pid, prof)
            print(f"  {label:<28} {d['rps']:8.1f} req/s  p50 {d['p50_us'] / 1000:7.2f} ms  "
                  f"server {d['server_ms']:6.2f} ms CPU/req  database {d['db_ms']:6.2f} ms CPU/req  "
                  f"non2xx {d['non2xx3xx']:.0f} errors {d['errors']:.0f}", flush=True)
        if args.unguarded:   # the same read, guard and journal off, second server on the same database
            from fhir_dmp.runtime.embedded_db import EmbeddedMongo
            bare_port = free_port()
            bare = start_ours(work, bare_port, base, kit / "keys" / "jwks.json", args, name="unguarded",
                              unguarded_of=EmbeddedMongo.find_running(work / "data"))
            url = f"http://127.0.0.1:{bare_port}/fhir/Patient/{pid}"
            wrk(kit, url, token, args.conns, 2.0)
            d = measure(kit, url, token, args.conns, args.duration, bare.pid)
            print(f"  {'unguarded GET Patient/{id}':<28} {d['rps']:8.1f} req/s  p50 {d['p50_us'] / 1000:7.2f} ms  "
                  f"server {d['server_ms']:6.2f} ms CPU/req  database {d['db_ms']:6.2f} ms CPU/req", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        stop(bare)
        stop(ours)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
