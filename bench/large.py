"""Benchmark: ``DocumentReference?patient=`` on large records and large databases (issue 13).

    python bench/large.py [--quick] [--big 2000] [--filler 10000,1000000] [--repeat 50]

In-process (no HTTP), a throw-away SecantusDB (``bench/_common.py``), the guarded search as a
médecin authorized on the DMP (``GuardedRepository.search`` with a fresh repository per
request, context loading and journal flush included), first page, default ``_count`` (50),
no ``_total``. Wall time (p50/p95; on a shared machine mostly the journal's durable write) and
CPU per search (this process and the database process, ``/proc``: what does not depend on the
other load of the machine). Each case three ways:

* ``cached``: the DMP's documents already in the process's document cache (``fhir_dmp/search/doc_cache.py``),
  the steady state of a DMP read again and again;
* ``cold``: the cache entry dropped before every search (as after a change of that DMP): the
  search reads the DMP's documents from the database (the ``pid`` index) and caches them;
* ``no cache``: the document cache off, the search asks the database (two flat queries, one
  per branch of the access guard's ``$or``), as before the cache.

(a) a DMP of 20 documents against a DMP of ``--big`` documents, same collection; also with
    ``_count=20`` so that both pages hold as many entries;
(b) a DMP of 20 documents while the collection holds each ``--filler`` size of documents of
    other DMPs (1,000 per DMP), seeded straight through storage in bulk (the current documents
    ``Storage.create`` writes, ``insert_many`` of 1,000; no ``_history`` copies: no search
    reads them).

(c) through HTTP (issue 22; the WSGI app, real RS256 tokens), at each ``--filler`` size of (b):
    ``DocumentReference?patient=`` by the médecin and the patient's journal
    ``AuditEvent?patient=`` (``_sort=-date``, ``_count=20``) by the patient, on a DMP of 20
    documents opened for that stage (so that every stage reads a journal of the same length:
    the searches journal themselves), interleaved; p50/p95 and CPU per request (this process
    and the database), and the resident memory (RSS) of both processes.

Prints p50/p95 and the ratios (goals: 2,000 within 1.3x of 20; 1M within 1.3x of 10k). With the
default filler (up to 1,000,000 documents) the seeding takes 15-25 minutes and ~10 GB of disk
on a 2-core machine; ``--quick``: 15 runs, filler 10,000 and 100,000 (~3 minutes). ``--only-http``:
(c) alone (no in-process cases).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import _common as c
from _common import builders
from cost import cpu_s

from fhir_dmp.storage import new_id, now


def search_time(env, pid: str, repeat: int, mode: str, count: int | None = None) -> dict:
    """p50/p95 of the guarded search in ``mode``: cached, cold or "no cache"; a fresh token each
    time (seeding a large collection outlasts a token)."""
    token = env.idp.ps(builders.PS_DR, profession="10")
    args = [("patient", pid)] + ([("_count", str(count))] if count else [])
    storage = env.storage
    cache = storage.doc_cache

    def once():
        if mode == "cold":
            cache.invalidate(pid)
        repo = env.repo(token)
        page = repo.search("DocumentReference", args)
        repo.flush_audit()
        assert page.matches

    if mode == "no cache":
        storage.doc_cache = None
    try:
        once()
        once()
        app0, db0 = cpu_s(os.getpid()), cpu_s(env.server.pid)
        out = c.stats(c.timed(once, repeat, warmup=0))
        out["cpu"] = 1e3 * (cpu_s(os.getpid()) - app0 + cpu_s(env.server.pid) - db0) / repeat
        return out
    finally:
        storage.doc_cache = cache


def ratio(a: float, b: float) -> str:
    """a / b, or "n/a" when b is below the clock's resolution (too few runs)."""
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def fmt(s: dict) -> str:
    return f"{c.fmt_ms(s)}  CPU {s['cpu']:7.2f} ms/search (application + database)"


MODES = ("cached", "cold", "no cache")


def compare(env, label_pids: list[tuple[str, str]], repeat: int, count: int | None = None) -> None:
    """Each mode interleaved over the cases, then the ratio of the last case to the first."""
    for mode in MODES:
        rows = [(label, search_time(env, pid, repeat, mode, count)) for label, pid in label_pids]
        for label, s in rows:
            print(f"  {mode:<9} {label:<16} {fmt(s)}", flush=True)
        print(f"  {mode:<9} ratio {rows[-1][0]} / {rows[0][0]}: p50 {rows[-1][1]['p50'] / rows[0][1]['p50']:.2f}x, "
              f"CPU {ratio(rows[-1][1]['cpu'], rows[0][1]['cpu'])}  (goal <= 1.3x)", flush=True)


def add_filler(env, template: dict, n: int, per_dmp: int = 1000, batch_size: int = 1000) -> None:
    """``n`` documents of other (fake) DMPs, inserted in bulk through storage's own layout."""
    storage = env.storage
    coll = storage.db["DocumentReference"]
    batch = []
    pid = None
    for i in range(n):
        if i % per_dmp == 0:
            pid = new_id()
        res = copy.deepcopy(template)
        res["subject"] = {"reference": f"Patient/{pid}"}
        rid, lu = new_id(), now()
        res = storage.stamp(res, rid, 1, lu)
        cur = storage.current_doc("DocumentReference", rid, 1, pid, res, False, lu)
        batch.append(cur)
        if len(batch) == batch_size or i == n - 1:
            coll.insert_many(batch, ordered=False)
            batch = []


def settle(env, timeout: float = 1200.0) -> float:
    """Wait until the database is idle again (the change streams have read the seeding's oplog:
    each process's stream sees every insert); the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        before = cpu_s(env.server.pid)
        time.sleep(1.0)
        if cpu_s(env.server.pid) - before < 0.05:
            break
    return time.perf_counter() - t0


def rss_mib(pid: int) -> float:
    """Resident memory of a process (``/proc/<pid>/status`` VmRSS), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def http_searches(env, repeat: int) -> dict:
    """(c): a fresh DMP of 20 documents; its document search (médecin) and journal (patient)
    through the WSGI app, interleaved; label -> stats with ``cpu`` (ms per request)."""
    pid, _ = c.seed_dmp(env, 20)
    client = env.app.test_client()
    cases = [("DocumentReference?patient=", f"/fhir/DocumentReference?patient={pid}",
              env.idp.ps(builders.PS_DR, profession="10")),
             ("AuditEvent?patient=", f"/fhir/AuditEvent?patient={pid}&_sort=-date&_count=20",
              env.idp.patient(pid))]
    times: dict[str, list] = {label: [] for label, _, _ in cases}
    cpu: dict[str, float] = {label: 0.0 for label, _, _ in cases}
    for i in range(repeat + 3):
        for label, url, token in cases:
            app0, db0 = cpu_s(os.getpid()), cpu_s(env.server.pid)
            t0 = time.perf_counter()
            r = client.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200 and r.get_json().get("entry"), r.get_data(as_text=True)[:300]
            if i >= 3:     # warm-up: tokens, the decision context, the document cache
                times[label].append(elapsed)
                cpu[label] += cpu_s(os.getpid()) - app0 + cpu_s(env.server.pid) - db0
    return {label: {**c.stats(times[label]), "cpu": 1e3 * cpu[label] / repeat} for label in times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", type=int, default=2000)
    ap.add_argument("--filler", default="10000,1000000")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--only-http", action="store_true", help="(c) alone")
    args = ap.parse_args()
    fillers = c.sizes_of(ap, args, "filler", 15, "10000,100000")
    with c.environment(audit_sealer=False) as env:
        small, _ = c.seed_dmp(env, 20)
        big, _ = c.seed_dmp(env, args.big)
        deadline = time.monotonic() + 10
        while not env.storage.doc_cache.live and time.monotonic() < deadline:
            time.sleep(0.05)
        # the change stream reads the seeding's inserts a batch at a time (a pause between
        # batches, change_feed.POLL_PAUSE_S): each one drops the DMP's cache entry, so measuring
        # before it is through counts reloads as "cached" searches
        settle(env)
        if not args.only_http:
            print(f"(a) DMP of 20 vs DMP of {args.big} documents, first page, {args.repeat} runs each")
            compare(env, [("20 documents", small), (f"{args.big} documents", big)], args.repeat)
            print("    the same with _count=20 (pages of equal size)")
            compare(env, [("20 documents", small), (f"{args.big} documents", big)], args.repeat, count=20)

        template = copy.deepcopy(env.storage.read_many("DocumentReference",
                                                       [d["_id"] for d in env.db["DocumentReference"].find(
                                                           {"pid": small}, {"_id": 1}).limit(1)])[0].resource)
        template.pop("meta", None)
        print("(b) DMP of 20 documents, collection growing", flush=True)
        have = env.db["DocumentReference"].estimated_document_count()
        results: dict[str, list] = {mode: [] for mode in ([] if args.only_http else MODES)}
        http: list[tuple[int, dict]] = []
        for target in fillers:
            t0 = time.perf_counter()
            add_filler(env, template, max(0, target - have))
            have = env.db["DocumentReference"].estimated_document_count()
            seeded = time.perf_counter() - t0
            print(f"  {have:>8} documents in the collection (seeded in {seeded:.0f} s, database idle "
                  f"again after {settle(env):.0f} s)", flush=True)
            for mode in results:
                s = search_time(env, small, args.repeat, mode)
                results[mode].append((have, s))
                print(f"    {mode:<9} {fmt(s)}", flush=True)
            h = http_searches(env, args.repeat)
            http.append((have, h))
            for label, s in h.items():
                print(f"    HTTP {label:<27} {fmt(s)}", flush=True)
            print(f"    RSS: application {rss_mib(os.getpid()):.0f} MiB, database {rss_mib(env.server.pid):.0f} MiB",
                  flush=True)
        if len(fillers) > 1:
            for mode, rows in results.items():
                print(f"  {mode:<9} ratio {rows[-1][0]} vs {rows[0][0]}: p50 "
                      f"{rows[-1][1]['p50'] / rows[0][1]['p50']:.2f}x, CPU "
                      f"{ratio(rows[-1][1]['cpu'], rows[0][1]['cpu'])}  (goal <= 1.3x)")
            (n0, a), (n1, b) = http[0], http[-1]
            for label in a:
                print(f"  HTTP {label:<27} ratio {n1} vs {n0}: p50 {b[label]['p50'] / a[label]['p50']:.2f}x, "
                      f"p95 {b[label]['p95'] / a[label]['p95']:.2f}x, CPU {ratio(b[label]['cpu'], a[label]['cpu'])}"
                      "  (goal <= 1.3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
