"""Benchmark: ``DocumentReference?patient=`` on large records and large databases (issue 13).

    python bench/large.py [--quick] [--big 2000] [--filler 10000,100000] [--repeat 15]

In-process (no HTTP), a throw-away SecantusDB (``bench/_common.py``), the guarded search as a
médecin authorized on the DMP (``GuardedRepository.search`` with a fresh repository per
request, context loading and journal flush included), first page, default ``_count``, no
``_total`` (so no count pass unless the page holds everything):

(a) a DMP of 20 documents against a DMP of ``--big`` documents, same collection;
(b) a DMP of 20 documents while the collection holds each ``--filler`` size of other DMPs'
    documents (seeded straight through storage, the documents ``Storage.create`` writes).

Prints p50/p95 and the ratios (goal: <= 1.3x). ``--quick``: 10 runs, filler 10,000 and 30,000.
"""
from __future__ import annotations

import argparse
import copy
import time

import _common as c
from _common import builders

from fhir_dmp.storage import new_id, now


def search_time(env, token: str, pid: str, repeat: int) -> dict:
    args = [("patient", pid)]

    def once():
        repo = env.repo(token)
        page = repo.search("DocumentReference", args)
        repo.flush_audit()
        assert page.matches
    return c.stats(c.timed(once, repeat))


def add_filler(env, template: dict, n: int, per_dmp: int = 1000) -> None:
    """``n`` documents of other (fake) DMPs, inserted in bulk through storage's own layout."""
    storage = env.storage
    batch, hist = [], []
    pid = None
    for i in range(n):
        if i % per_dmp == 0:
            pid = new_id()
        res = copy.deepcopy(template)
        res["subject"] = {"reference": f"Patient/{pid}"}
        rid, lu = new_id(), now()
        res = storage.stamp(res, rid, 1, lu)
        cur, h = storage._docs("DocumentReference", rid, 1, pid, res, False, lu)
        batch.append(cur)
        hist.append(h)
        if len(batch) == 1000 or i == n - 1:
            storage.db["DocumentReference"].insert_many(batch, ordered=False)
            storage.db["DocumentReference_history"].insert_many(hist, ordered=False)
            batch, hist = [], []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", type=int, default=2000)
    ap.add_argument("--filler", default="10000,100000")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.filler = 10, "10000,30000"
    fillers = [int(x) for x in args.filler.split(",")]
    with c.environment() as env:
        token = env.idp.ps(builders.PS_DR, profession="10")
        small, _ = c.seed_dmp(env, 20)
        big, _ = c.seed_dmp(env, args.big)
        print(f"(a) DMP of 20 vs DMP of {args.big} documents, first page, {args.repeat} runs each")
        s_small = search_time(env, token, small, args.repeat)
        s_big = search_time(env, token, big, args.repeat)
        print(f"  20 documents     {c.fmt_ms(s_small)}")
        print(f"  {args.big} documents {c.fmt_ms(s_big)}")
        print(f"  ratio p50 {s_big['p50'] / s_small['p50']:.2f}x  (goal <= 1.3x)")

        template = copy.deepcopy(env.storage.read_many("DocumentReference",
                                                       [d["_id"] for d in env.db["DocumentReference"].find(
                                                           {"pid": small}, {"_id": 1}).limit(1)])[0].resource)
        template.pop("meta", None)
        print("(b) DMP of 20 documents, collection growing")
        have = env.db["DocumentReference"].count_documents({})
        results = []
        for target in fillers:
            t0 = time.perf_counter()
            add_filler(env, template, max(0, target - have))
            have = env.db["DocumentReference"].count_documents({})
            seeded = time.perf_counter() - t0
            s = search_time(env, token, small, args.repeat)
            results.append((have, s))
            print(f"  {have:>8} documents in the collection (seeded in {seeded:.0f} s)  {c.fmt_ms(s)}")
        if len(results) > 1:
            print(f"  ratio p50 {results[-1][0]} vs {results[0][0]}: "
                  f"{results[-1][1]['p50'] / results[0][1]['p50']:.2f}x  (goal <= 1.3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
