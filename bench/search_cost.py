"""Benchmark: what one guarded ``DocumentReference?patient=`` search costs (issue 13).

    python bench/search_cost.py [--quick] [--n 200] [--sizes 20,2000] [--no-audit]

Throughput figures mean nothing on a machine shared with other sessions; CPU time per request
does not depend on what else runs. In-process, a throw-away SecantusDB (``bench/_common.py``),
the whole HTTP request through the WSGI app (``app.test_client()``: token check, decision,
storage, journal, JSON rendering), as a médecin (profession 10) authorized on the DMP, first
page, default ``_count``:

* database CPU ms per search: ``utime + stime`` of the SecantusDB child (``/proc/<pid>/stat``)
  before and after ``--n`` sequential searches, divided by ``--n``;
* application CPU ms per search: the same for this process (request handling plus its
  background threads: the journal's group committer, the change stream);
* database round trips per search, by command (a pymongo ``CommandListener``).

The background sealer is off (its work would land in the database's figure); ``--no-audit``
also turns the journal write off (``flush_audit`` no-op) to show the search alone;
``--no-cache`` turns the DMP document cache off (``fhir_dmp/search/doc_cache.py``: the search asks the database).
"""
from __future__ import annotations

import argparse
import collections
import os
import threading
import time

import _common as c
from _common import builders
from pymongo import monitoring

from cost import cpu_s as cpu_seconds


class Commands(monitoring.CommandListener):
    """Counts the commands sent to the database (thread-safe enough for counting)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.on = False

    def started(self, event):
        if not self.on:
            return
        name = event.command_name
        if name in ("insert", "find", "getMore", "aggregate", "count"):
            coll = event.command.get(name) if name != "getMore" else event.command.get("collection")
            name = f"{name} {coll}"
        with self.lock:
            self.counts[name] += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def measure(env, listener: Commands, token: str, pid: str, n: int) -> dict:
    client = env.app.test_client()
    url = f"/fhir/DocumentReference?patient={pid}"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    for _ in range(5):                                    # warm: token, context cache, code paths
        r = client.get(url, headers=headers)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
    entries = len(r.get_json().get("entry") or [])
    time.sleep(0.3)
    listener.counts.clear()
    listener.on = True
    db0, me0, t0 = cpu_seconds(env.server.pid), cpu_seconds(os.getpid()), time.perf_counter()
    for _ in range(n):
        client.get(url, headers=headers)
    wall = time.perf_counter() - t0
    time.sleep(0.2)   # let the committer's last batch land
    db1, me1 = cpu_seconds(env.server.pid), cpu_seconds(os.getpid())
    listener.on = False
    trips = {k: v / n for k, v in sorted(listener.counts.items()) if v}
    return {"db_ms": (db1 - db0) * 1e3 / n, "app_ms": (me1 - me0) * 1e3 / n, "wall_ms": wall * 1e3 / n,
            "entries": entries, "trips": trips}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--sizes", default="20,2000")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="without the DMP document cache (fhir_dmp/search/doc_cache.py)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the application side, top 25")
    args = ap.parse_args()
    if args.quick:
        args.n = 60
    sizes = [int(x) for x in args.sizes.split(",")]
    listener = Commands()
    monitoring.register(listener)
    with c.environment(audit_sealer=False, document_cache_docs=0 if args.no_cache else 10_000) as env:
        if args.no_audit:
            from fhir_dmp.guard.repository import GuardedRepository
            GuardedRepository.flush_audit = lambda self: None
        token = env.idp.ps(builders.PS_DR, profession="10")
        pids = {n: c.seed_dmp(env, n)[0] for n in sizes}
        print(f"{args.n} sequential searches each, sealer off, audit {'off' if args.no_audit else 'on'}, "
              f"document cache {'off' if args.no_cache else 'on'}")
        for n, pid in pids.items():
            m = measure(env, listener, token, pid, args.n)
            trips = ", ".join(f"{k} {v:.2f}" for k, v in m["trips"].items())
            print(f"  DMP of {n:>5}: {m['entries']} entries  database {m['db_ms']:6.2f} ms CPU  "
                  f"application {m['app_ms']:6.2f} ms CPU  wall {m['wall_ms']:6.2f} ms  "
                  f"round trips/search: {trips}", flush=True)
            if args.profile:
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                measure(env, listener, token, pid, args.n)
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
