"""Benchmark: the cost of the access decision (DESIGN.md "The access rules", guard/reads.py).

    python bench/access.py [--quick] [--repeat N] [--sizes 20,2000] [--profile]

In-process, no HTTP; a throw-away SecantusDB is started (``bench/_common.py``), with the
DMP document cache off (``document_cache_docs=0``): the raw search below cannot be answered from
it (its filter names no ``pid``), so both sides ask the database and the difference is the
guard's; the cache is measured by ``bench/large.py``.

(a) decisions per second for one request's context: a ``RequestAccess`` for a
    médecin (profession 10, authorized by Consent) with the patient's
    ``PatientState`` loaded, ``can_see("DocumentReference", doc, pid)`` over
    every document of the DMP; the same for the patient themself.
(b) a guarded ``DocumentReference?patient=<pid>&_count=50`` search
    (``GuardedRepository.search``: a fresh repository per request, so the
    per-request context loading is included; audit not flushed, see
    ``bench/audit.py``) against the same parsed ``SearchRequest.mongo_filter()``
    run straight on the collection the way ``Storage`` runs it
    (``{"$and": [filter, {"del": false}]}``: ``find`` with the same sort and
    ``limit(count + 1)``, and a ``count_documents`` only where the repository
    counts: the first page that holds everything is its own total, a full page
    is not counted unless ``_total`` asks, see :func:`first_page`), for a
    patient with 20 and one with 2,000 documents (both in the same collection).
    Every document is visible to the reader, so both sides return the same
    page and total; the total of a full page is checked once with
    ``_total=accurate`` on both sides. Goal: guarded overhead under 10%.

The overhead is then broken down (guard filter alone, context loading,
``can_see`` on the page) and the query plans (``explain``) are printed.
``--profile`` adds a cProfile of the guarded search on the large DMP.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import _common as c
from _common import builders

from fhir_dmp import search
from fhir_dmp.guard.reads import named_patient_ids


def bench_decisions(env, pid: str, docs: list[dict], seconds: float) -> dict:
    """can_see() calls per second for a PS and for the patient (state preloaded)."""
    out = {}
    for who, token in (("PS médecin (consent)", env.idp.ps(builders.PS_DR, profession="10")),
                       ("patient self", env.idp.patient(pid))):
        access = env.backend.policy.for_request(c.principal(env, token))
        access.load([pid])
        assert all(access.can_see("DocumentReference", d, pid).permit for d in docs[:10]), who
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for d in docs:
                access.can_see("DocumentReference", d, pid)
            n += len(docs)
        out[who] = n / (time.perf_counter() - t0)
    return out


def first_page(find, count, req) -> tuple[int | None, list]:
    """(total, page) by the repository's rule (``guard/reads.py`` ``search``): ``find(limit)``
    for ``count + 1`` documents; a first page that holds everything is its own total, a full
    one is counted (``count()``) only when ``_total`` asks, otherwise its total is None."""
    docs = find(req.count + 1)
    if req.total == "none":
        total = None
    elif len(docs) <= req.count:
        total = len(docs)
    else:
        total = count() if req.explicit_total else None
    return total, docs[:req.count]


def raw_search(storage, req) -> tuple[int | None, list]:
    """The search straight on storage, no guard: same filter, sort, limit and total rule."""
    flt = req.mongo_filter()
    return first_page(lambda n: storage.find_docs("DocumentReference", flt, req.mongo_sort(), n),
                      lambda: storage.count("DocumentReference", flt), req)


def lean_guard(pid: str, me: str, env) -> dict:
    """A proposal, not what the server runs: the same PS guard as
    ``RequestAccess.narrow`` for a search naming one reachable DMP
    whose médecin traitant is not the caller: ``pid`` equality instead of
    ``$in`` over every reachable DMP, one ``$elemMatch`` with ``c: {$in}``
    instead of an ``$or`` of one ``$elemMatch`` per allowed type, no dead
    ``{pid: {$in: []}}`` branch."""
    from fhir_dmp.profiles import dmp
    allowed = sorted(env.backend.policy.habilitations.allowed_types("10"))
    return {"pid": pid, "$or": [
        {"s.type": {"$elemMatch": {"s": "http://loinc.org", "c": {"$in": allowed}}},
         "s.security-label": {"$not": {"$elemMatch": {"s": dmp.LABEL_SYSTEM, "c": dmp.MASQUE_PS}}}},
        {"s.author": {"$elemMatch": {"is": builders.IDNATPS, "iv": me}}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 20 and 500 documents")
    ap.add_argument("--repeat", type=int, default=None, help="timed searches per variant (default 20)")
    ap.add_argument("--sizes", default=None, help="documents per DMP (default 20,2000)")
    ap.add_argument("--profile", action="store_true", help="cProfile the guarded search (largest DMP)")
    args = ap.parse_args()
    repeat = args.repeat or (8 if args.quick else 20)
    sizes = [int(x) for x in (args.sizes or ("20,500" if args.quick else "20,2000")).split(",")]
    args_for = lambda pid: [("patient", pid), ("_count", "50")]  # noqa: E731

    with c.environment(document_cache_docs=0) as env:
        t0 = time.perf_counter()
        dmps = {n: c.seed_dmp(env, n)[0] for n in sizes}
        print(f"seeded {sum(sizes)} DocumentReferences in {len(sizes)} DMPs "
              f"({time.perf_counter() - t0:.1f} s); collection holds "
              f"{env.db['DocumentReference'].count_documents({})} documents")
        ps_token = env.idp.ps(builders.PS_DR, profession="10")

        # (a) decisions per second
        big = max(sizes)
        docs = [d["res"] for d in env.db["DocumentReference"].find({"pid": dmps[big]}, {"res": 1})]
        print(f"\n(a) can_see('DocumentReference', doc, pid) on {len(docs)} documents, context loaded")
        for who, rate in bench_decisions(env, dmps[big], docs, 0.5 if args.quick else 2.0).items():
            print(f"    {who:<22} {rate:10,.0f} decisions/s   ({1e6 / rate:6.1f} us each)")

        # (b) guarded search vs the same search straight on storage
        print(f"\n(b) DocumentReference?patient=<pid>&_count=50, {repeat} runs each "
              "(interleaved), p50/p95 wall time")
        storage = env.storage
        results = {}
        for n, pid in dmps.items():
            req = search.parse_search("DocumentReference", args_for(pid))
            times = {"raw": [], "guarded": [], "raw+guard filter": [], "raw+lean guard": [], "context": [],
                     "can_see x page": []}
            lean = {"$and": [{"$and": [req.mongo_filter(), lean_guard(pid, builders.PS_DR, env)]},
                             {"del": False}]}

            def guarded():
                repo = env.repo(ps_token)
                return repo.search("DocumentReference", args_for(pid))

            page = guarded()
            total, raw_docs = raw_search(storage, req)
            assert page.total == total and [s.id for s in page.matches] == [d["_id"] for d in raw_docs], \
                "guarded and raw searches differ"
            counted = args_for(pid) + [("_total", "accurate")]
            matches = raw_search(storage, search.parse_search("DocumentReference", counted))[0]
            assert env.repo(ps_token).search("DocumentReference", counted).total == matches == n, \
                "guarded and raw totals differ (_total=accurate)"
            for _ in range(2):  # warm-up
                guarded(), raw_search(storage, req)
            for _ in range(repeat):
                t = time.perf_counter()
                raw_search(storage, req)
                times["raw"].append(time.perf_counter() - t)
                t = time.perf_counter()
                guarded()
                times["guarded"].append(time.perf_counter() - t)
                # breakdown: context loading (principal -> reachable pids -> guard filter)
                t = time.perf_counter()
                repo = env.repo(ps_token)
                guard = repo.access.narrow("DocumentReference", named_patient_ids(
                    "DocumentReference", args_for(pid)))
                times["context"].append(time.perf_counter() - t)
                # the raw search with the guard filter and'ed in (what the database evaluates)
                flt = {"$and": [{"$and": [req.mongo_filter(), guard]}, {"del": False}]}
                t = time.perf_counter()
                coll = storage.db["DocumentReference"]
                _, docs_page = first_page(lambda k: list(coll.find(flt).sort(req.mongo_sort()).limit(k)),
                                          lambda: coll.count_documents(flt), req)
                times["raw+guard filter"].append(time.perf_counter() - t)
                t = time.perf_counter()
                lean_total, lean_page = first_page(
                    lambda k: list(coll.find(lean).sort(req.mongo_sort()).limit(k)),
                    lambda: coll.count_documents(lean), req)
                times["raw+lean guard"].append(time.perf_counter() - t)
                assert lean_total == total and [d["_id"] for d in lean_page] == [d["_id"] for d in docs_page]
                t = time.perf_counter()
                for d in docs_page[:req.count]:
                    repo.access.can_see("DocumentReference", d["res"], d["pid"])
                times["can_see x page"].append(time.perf_counter() - t)
            results[n] = {k: c.stats(v) for k, v in times.items()}
            r = results[n]
            over = (r["guarded"]["p50"] / r["raw"]["p50"] - 1) * 100
            print(f"  DMP with {n} documents (total={total}, {matches} with _total=accurate, "
                  f"page={len(raw_docs)})")
            for k in ("raw", "guarded", "raw+guard filter", "raw+lean guard", "context", "can_see x page"):
                print(f"    {k:<18} {c.fmt_ms(r[k])}")
            print(f"    overhead (p50)     {over:+.1f}%   "
                  f"({r['guarded']['p50'] - r['raw']['p50']:+.2f} ms)  "
                  f"{'OK (< 10%)' if over < 10 else 'ABOVE the 10% goal'}")

        # the plans the database chose
        pid = dmps[big]
        req = search.parse_search("DocumentReference", args_for(pid))
        guard = env.repo(ps_token).access.narrow("DocumentReference", {pid})
        print("\nquery plans (SecantusDB explain):")
        for name, flt in (("raw  {$and:[filter,{del:false}]}", {"$and": [req.mongo_filter(), {"del": False}]}),
                          ("guarded", {"$and": [{"$and": [req.mongo_filter(), guard]}, {"del": False}]}),
                          ("flat {pid, del, s.patient.r}", {"pid": pid, "del": False, **req.mongo_filter()}),
                          ("{pid} alone", {"pid": pid})):
            plan = env.db.command("explain", {"find": "DocumentReference", "filter": flt})
            wp = plan["queryPlanner"]["winningPlan"]
            stage = wp.get("inputStage", wp)
            print(f"    {name:<34} {wp['stage']}{'/' + stage['stage'] if stage is not wp else ''}"
                  f"{' ' + stage.get('indexName', '') if stage is not wp else ''}")
        # the index-friendly shape, for comparison (not what the server runs): no top-level
        # operator, so SecantusDB can look the ``pid`` clause up in the (pid, lu) index
        coll = storage.db["DocumentReference"]
        print("  a flat filter {pid, del, s.patient.r} (count + page), no guard, for comparison:")
        for n, pid_n in dmps.items():
            r = search.parse_search("DocumentReference", args_for(pid_n))
            flat = {"pid": pid_n, "del": False, **r.mongo_filter()}
            ft = c.timed(lambda: (coll.count_documents(flat),
                                  list(coll.find(flat).sort(r.mongo_sort()).limit(r.count + 1))), repeat)
            print(f"    {n:>5}-document DMP: {c.fmt_ms(c.stats(ft))}   "
                  f"(raw $and form: p50 {results[n]['raw']['p50']:.2f} ms)")

        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(max(3, repeat // 3)):
                env.repo(ps_token).search("DocumentReference", args_for(pid))
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
            print("\ncProfile of the guarded search (client side; the database runs in its own process):")
            print(buf.getvalue())


if __name__ == "__main__":
    main()
