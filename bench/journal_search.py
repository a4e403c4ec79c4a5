"""Benchmark: the journal searches that privacy operations live on, as the journal grows (issue 22).

    python bench/journal_search.py [--quick] [--sizes 10000,100000,1000000] [--repeat 20]
                                   [--per-dmp 200] [--without-indexes] [--legacy]

A throw-away SecantusDB and the real application (``bench/_common.py``); the journal is seeded
fast through storage (``_common.seal_entries``: the entries as the sealer stores them, with the
search index and sort keys ``search.extract`` gives them, in batches of 1,000: per DMP, runs of at
most 500 entries in ``AuditEvent_link``, their metadata in ``AuditEvent_run_meta``, the chains'
heads moved; ``--legacy``: one ``AuditEvent`` document per entry, the layout before the runs) with events cloned from one event the server really wrote for a professional's read,
spread across many DMPs: ``--per-dmp`` events per DMP (10 documents each), one professional per
100 events, ``recorded`` spread over the last 360 days. Each stage (``--sizes``, cumulative)
gets fresh targets (a real DMP opened through the guarded repository, its documents, a
professional) seeded with the same shape as the filler, so that every stage measures the same
amount of matching data in a larger journal (the searches' own journal entries land in the
stage's target DMP, the same number at each stage). The sealer thread is off (seeding is not
sealing); before each stage's measurement the real sealer seals the pages left (the targets'
real events, the previous stage's searches' events), as the running sealer would have.

Then each search through HTTP (the WSGI app, real RS256 tokens), ``_sort=-date``,
``_count=20``, ``_total=accurate``, the first page and the page its ``next`` link gives:

* ``entity (admin)``: ``AuditEvent?entity=DocumentReference/{id}``, who read this document,
  across the whole journal (the administrator; the privacy officer reads the same);
* ``entity (patient)``: the same asked by the patient (pinned to their DMP by the guard);
* ``agent (admin)``: ``AuditEvent?agent:identifier=urn:oid:1.2.250.1.71.4.2.1|{idNatPs}``,
  what did this professional read;
* ``month (patient)``: ``AuditEvent?patient={id}&date=ge{month}&date=lt{next month}``, this
  DMP's accesses this month, asked by the patient;
* ``journal (patient)``: ``AuditEvent?patient={id}``, the DMP's whole journal, newest first.

Prints, per stage, median and p95 (ms) of each search and the ``total`` it answered; then the
ratio of the largest stage to the smallest (goal: <= 1.3x) and, per search, what storage reads
for its filter (the server's, guard included): in runs, the runs the indexed lookup names
(``runs.run_queries``), those the date bounds admit (``runs.admits``), the entries they hold (all
decoded by a count; a sorted page may stop earlier), those matching, and the ms of the lookup and
of reading and matching them; ``--legacy``: the first page's ``find`` and the
``count_documents`` straight on ``AuditEvent``.
``--without-indexes`` drops the journal's search indexes first (the figures before them: the
runs' metadata's ``ke``, ``ka``; ``--legacy``: ``AuditEvent``'s ``s.entity.r``, ``s.agent.iv``).
``--append-cost``: only what the two search indexes cost each journal entry (database CPU per
entry with and without them, interleaved).
"""
from __future__ import annotations

import argparse
import os
import copy
import statistics
import time
from datetime import datetime, timedelta, timezone

import _common as c
from _common import builders
from cost import cpu_s
from large import settle

from fhir_dmp import search
from fhir_dmp.audit.events import event_patient
from fhir_dmp.storage import merge_filters, new_id, pack, unpack
from fhir_dmp.storage.core import JOURNAL, JOURNAL_LINKS, JOURNAL_RUN_META, or_branches
from fhir_dmp.storage.filters import compile_query
from fhir_dmp.storage.runs import admits, run_queries, unpacked_entry

IDNATPS = "urn:oid:1.2.250.1.71.4.2.1"
DOCS_PER_DMP = 10
EVENTS_PER_PS = 100
DAYS = 360
BATCH = 1000


def entries_of(events: list[dict], lu: datetime) -> list[dict]:
    """The journal entries of ``events`` as the sealer derives them (``storage.pages.entries``)."""
    out = []
    for res in events:
        s, o = search.extract("AuditEvent", res)
        out.append({"_id": res["id"], "pid": event_patient(res), "vid": 1, "lu": lu, "del": False,
                    "res": pack(res), "s": s, "o": o})
    return out


class Seeder:
    """Events cloned from a real one, stored as the sealer stores them (``_common.seal_entries``;
    ``legacy``: as ``AuditEvent`` documents)."""

    def __init__(self, env, template: dict, per_dmp: int, legacy: bool = False):
        self.env, self.template, self.per_dmp, self.legacy = env, template, per_dmp, legacy
        self.now = datetime.now(timezone.utc)
        self.seq = 0

    def event(self, pid: str, doc: str, ps: str) -> dict:
        res = copy.deepcopy(self.template)
        self.seq += 1
        res["id"] = new_id()
        when = self.now - timedelta(days=DAYS) * ((self.seq * 7919) % 10007 / 10007)
        res["recorded"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        res["agent"][0]["who"] = {"identifier": {"system": IDNATPS, "value": ps}}
        for ent in res["entity"]:
            ref = (ent.get("what") or {}).get("reference", "")
            if ref.startswith("Patient/"):
                ent["what"] = {"reference": f"Patient/{pid}"}
            elif ref.startswith("DocumentReference/"):
                ent["what"] = {"reference": f"DocumentReference/{doc}/_history/1"}
            elif "identifier" in (ent.get("what") or {}):
                ent["what"] = {"identifier": {"value": new_id()}}
        return res

    def dmp_events(self, pid: str, docs: list[str], ps_of) -> list[dict]:
        """``per_dmp`` reads of ``pid``'s documents, by the professionals ``ps_of(k)`` gives."""
        return [self.event(pid, docs[k % len(docs)], ps_of(k)) for k in range(self.per_dmp)]

    def write(self, events: list[dict]) -> None:
        for i in range(0, len(events), BATCH):
            c.seal_entries(self.env.storage, entries_of(events[i:i + BATCH], self.now), legacy=self.legacy)

    def patients(self, pids: list[str]) -> None:
        """The DMPs' Patient documents as ``Storage.create`` writes them (a journal entry of a
        DMP that does not exist is not shown, even to the administrator)."""
        storage, lu = self.env.storage, self.now
        docs = [storage.current_doc("Patient", pid, 1, pid, storage.stamp(builders.patient(), pid, 1, lu), False, lu)
                for pid in pids]
        if docs:
            storage.db["Patient"].insert_many(docs, ordered=False)

    def filler(self, n: int) -> None:
        """``n`` events of other DMPs (``per_dmp`` each), one professional per 100 events."""
        pending: list[dict] = []
        pids: list[str] = []
        start = self.seq
        while self.seq - start < n:
            pid = new_id()
            pids.append(pid)
            docs = [new_id() for _ in range(DOCS_PER_DMP)]
            base = self.seq
            pending += self.dmp_events(pid, docs, lambda k: f"8{(base + k) // EVENTS_PER_PS:011d}")
            if len(pending) >= BATCH:
                self.patients(pids)
                self.write(pending)
                pending, pids = [], []
        self.patients(pids)
        self.write(pending)


def targets(env, seeder: Seeder, stage: int) -> dict:
    """A real DMP with ``DOCS_PER_DMP`` documents and a professional, seeded like the filler: the
    DMP's ``per_dmp`` events, and the professional's ``EVENTS_PER_PS`` reads (in other DMPs too)."""
    pid, docs = c.seed_dmp(env, DOCS_PER_DMP)
    ps = f"7{stage:011d}"
    events = seeder.dmp_events(pid, docs, lambda k: ps if k % 4 == 0 else f"6{k:011d}")
    mine = sum(1 for e in events if e["agent"][0]["who"]["identifier"]["value"] == ps)
    others = [new_id() for _ in range(EVENTS_PER_PS - mine)]
    seeder.patients(others)
    events += [seeder.event(other, new_id(), ps) for other in others]
    seeder.write(events)
    return {"pid": pid, "doc": docs[0], "ps": ps}


def month_bounds(now: datetime) -> tuple[str, str]:
    first = now.replace(day=1)
    nxt = (first + timedelta(days=32)).replace(day=1)
    return first.strftime("%Y-%m-%d"), nxt.strftime("%Y-%m-%d")


def searches(t: dict, now: datetime) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(label, who asks, query args) of each search measured."""
    lo, hi = month_bounds(now)
    common = [("_sort", "-date"), ("_count", "20"), ("_total", "accurate")]
    return [
        ("entity (admin)", "admin", [("entity", f"DocumentReference/{t['doc']}")] + common),
        ("entity (patient)", "patient", [("entity", f"DocumentReference/{t['doc']}")] + common),
        ("agent (admin)", "admin", [("agent:identifier", f"{IDNATPS}|{t['ps']}")] + common),
        ("month (patient)", "patient", [("patient", t["pid"]), ("date", f"ge{lo}"), ("date", f"lt{hi}")] + common),
        ("journal (patient)", "patient", [("patient", t["pid"])] + common),
    ]


def query_string(args: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode
    return urlencode(args)


def measure(env, t: dict, repeat: int) -> dict:
    """label -> {p50, p95 (first page), p50 next page, total, cpu, db} over ``repeat`` runs (``cpu``:
    ms of CPU per run, this process and the database's; ``db``: the database's share)."""
    client = env.app.test_client()
    out = {}
    for label, who, args in searches(t, datetime.now(timezone.utc)):
        token = env.idp.admin() if who == "admin" else env.idp.patient(t["pid"])
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        url = f"/fhir/AuditEvent?{query_string(args)}"
        first, second, total = [], [], None
        db0, me0 = cpu_s(env.server.pid), cpu_s(os.getpid())
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            r = client.get(url, headers=headers)
            t1 = time.perf_counter()
            assert r.status_code == 200, r.get_data(as_text=True)[:300]
            body = r.get_json()
            total = body.get("total")
            nxt = next((link["url"] for link in body.get("link", []) if link["relation"] == "next"), None)
            t2 = t3 = None
            if nxt:
                path = "/fhir/" + nxt.split("/fhir/", 1)[1]
                t2 = time.perf_counter()
                r2 = client.get(path, headers=headers)
                t3 = time.perf_counter()
                assert r2.status_code == 200, r2.get_data(as_text=True)[:300]
            if i >= 2:      # warm-up: token, context cache, code paths
                first.append(t1 - t0)
                if t2 is not None:
                    second.append(t3 - t2)
        runs, db = repeat + 2, cpu_s(env.server.pid) - db0
        out[label] = {**c.stats(first), "next": statistics.median(second) * 1e3 if second else None,
                      "total": total, "cpu": 1e3 * (db + cpu_s(os.getpid()) - me0) / runs, "db": 1e3 * db / runs}
    return out


def filters(t: dict):
    """(label, storage filter the server sends for the search (guard included), its request)."""
    for label, who, args in searches(t, datetime.now(timezone.utc)):
        req = search.parse_search("AuditEvent", args)
        guard = {} if who == "admin" else {"pid": t["pid"]}
        yield label, merge_filters(guard, req.mongo_filter(), {"del": False}), req


def run_plans(env, t: dict) -> list[str]:
    """What storage reads in the runs for each search's filter (module docstring): runs named by
    the index, admitted by their bounds, entries in them, entries matching; ms of the lookup, and
    of reading and matching the entries (no memo: the database's read and the decoding), and the
    database's CPU ms for both."""
    out = []
    coll, meta = env.db[JOURNAL_LINKS], env.db[JOURNAL_RUN_META]
    for label, flt, _ in filters(t):
        test = compile_query(flt)
        db0 = cpu_s(env.server.pid)
        t0 = time.perf_counter()
        named = {m["_id"]: m for q in run_queries(flt) for m in meta.find(q, {"b": 1, "u": 1})}
        admitted = [m["_id"] for m in named.values() if admits(m.get("b") or {}, flt)]
        t1 = time.perf_counter()
        held = matched = 0
        for run in coll.find({"_id": {"$in": admitted}}, {"e": 1}):
            held += len(run["e"])
            matched += sum(1 for e in run["e"] if test(unpacked_entry(e)))
        t2 = time.perf_counter()
        out.append(f"  {label:<18} runs named {len(named):>4}, admitted {len(admitted):>4} ({1e3 * (t1 - t0):6.1f} ms); "
                   f"entries {held:>6}, matching {matched:>4} ({1e3 * (t2 - t1):7.1f} ms); "
                   f"database CPU {1e3 * (cpu_s(env.server.pid) - db0):6.1f} ms")
    return out


def plans(env, t: dict) -> list[str]:
    """``--legacy``: each search's main query straight on the collection (the filter the server sends, guard
    included, each branch of an ``$or`` as storage runs it): ms of the first page's find and of
    the count. ``explain`` is not asked: SecantusDB's explain reports a COLLSCAN for a
    multi-field filter that its find answers from one clause's index."""
    out = []
    coll = env.db[JOURNAL]
    for label, flt, req in filters(t):
        branches = or_branches(flt) or [flt]
        t0 = time.perf_counter()
        found = sum(len(list(coll.find(b).sort(req.mongo_sort()).limit(req.count + 1))) for b in branches)
        t1 = time.perf_counter()
        counted = sum(coll.count_documents(b) for b in branches)
        t2 = time.perf_counter()
        out.append(f"  {label:<18} {len(branches)} branch(es): find {1e3 * (t1 - t0):7.1f} ms ({found} docs), "
                   f"count_documents {1e3 * (t2 - t1):7.1f} ms ({counted})")
    return out


def template_event(env) -> dict:
    """The event the server writes for a professional's read of a document."""
    pid, docs = c.seed_dmp(env, 2)
    token = env.idp.ps(builders.PS_DR, profession="10")
    r = env.app.test_client().get(f"/fhir/DocumentReference/{docs[1]}",
                                  headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for d in c.journal_entries(env.db):      # in a page: the sealer is off
            res = unpack(d["res"]) if d.get("pid") == pid else {}
            if (res.get("subtype") or [{}])[0].get("code") == "read":
                res.pop("meta", None)
                return res
        time.sleep(0.1)
    raise RuntimeError("no read event")


def search_indexes(env, legacy: bool) -> tuple:
    """The journal's collection and its two search indexes (who read this document, what did this
    professional read) as ``[(name, keys)]``, named as the server created them: the runs'
    metadata's ``ke``, ``ka``; ``legacy``: ``AuditEvent``'s ``s.entity.r``, ``s.agent.iv``."""
    coll = env.db[JOURNAL if legacy else JOURNAL_RUN_META]
    fields = ("s.entity.r", "s.agent.iv") if legacy else ("ke", "ka")
    return coll, [(i["name"], list(i["key"].items())) for i in coll.list_indexes() if list(i["key"]) in ([f] for f in fields)]


def append_cost(env, seeder: Seeder, rounds: int = 3, events: int = 2000, batch: int = 8) -> None:
    """Database CPU per journal entry (stored as the sealer stores them, passes of ``batch`` events
    of one DMP: one run each; ``--legacy``: ``batch`` documents) with the journal's two search
    indexes and without them, interleaved ``rounds`` times (CPU time of the database process:
    comparable on a busy machine)."""
    coll, indexes = search_indexes(env, seeder.legacy)
    out: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for label in ("with", "without"):
            for name, keys in indexes:
                if label == "with":
                    coll.create_index(keys, name=name)
                else:
                    coll.drop_index(name)
            batches = [entries_of(seeder.dmp_events(new_id(), [new_id()], lambda k: "899999999999")[:batch],
                                  seeder.now) for _ in range(events // batch)]
            db0 = cpu_s(env.server.pid)
            for docs in batches:
                c.seal_entries(env.storage, docs, legacy=seeder.legacy)
            out[label].append(1e3 * (cpu_s(env.server.pid) - db0) / events)
    for name, keys in indexes:
        coll.create_index(keys, name=name)
    for label, v in out.items():
        print(f"  {label:<7} the entity and agent indexes: database CPU {statistics.median(v):.3f} ms per entry "
              f"(rounds {', '.join(f'{x:.3f}' for x in v)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes 10,000 and 100,000, 10 runs")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--per-dmp", type=int, default=200)
    ap.add_argument("--without-indexes", action="store_true",
                    help="drop the journal's search indexes (entity, agent) first: the figures before them")
    ap.add_argument("--append-cost", action="store_true",
                    help="only the database CPU per journal entry with and without the two search indexes")
    ap.add_argument("--legacy", action="store_true",
                    help="seed the journal as AuditEvent documents, one per entry (the layout before the runs)")
    args = ap.parse_args()
    sizes = c.sizes_of(ap, args, "sizes", 10, "10000,100000")
    # db_wait: a seeding transaction of 1,000 entries outlasts the server's default 10 s on a busy machine
    with c.environment(audit_sealer=False, db_wait=300) as env:
        seeder = Seeder(env, template_event(env), args.per_dmp, args.legacy)
        if args.append_cost:
            print("entries inserted as the sealer does, 2,000 in batches of 8, interleaved, 3 rounds")
            append_cost(env, seeder)
            return 0
        coll, indexes = search_indexes(env, args.legacy)
        if args.without_indexes:
            for name, _ in indexes:
                coll.drop_index(name)
        print(f"the journal's layout: {'AuditEvent documents (--legacy)' if args.legacy else 'runs'}; indexes of "
              f"{coll.name}:", [list(i["key"].items()) for i in coll.list_indexes()])
        rows = []
        for stage, size in enumerate(sizes):
            have = c.journal_size(env.db)
            t0 = time.perf_counter()
            seeder.filler(max(0, size - have - args.per_dmp - EVENTS_PER_PS))
            t = targets(env, seeder, stage)
            seeded = time.perf_counter() - t0
            sealed = c.seal_pages(env)
            have = c.journal_size(env.db)
            runs = env.db[JOURNAL_LINKS].estimated_document_count()
            # the change streams read the seeding's oplog a batch at a time: not measured as the searches' CPU
            print(f"\n{have:,} events in the journal, {runs:,} runs (seeded in {seeded:.0f} s, {sealed} events of "
                  f"pages sealed, database idle again after {settle(env):.0f} s); target DMP {args.per_dmp} events, "
                  f"professional {EVENTS_PER_PS} reads; {args.repeat} runs each", flush=True)
            res = measure(env, t, args.repeat)
            print(f"  {'search':<18} {'p50 ms':>8} {'p95 ms':>8} {'next p50':>9} {'CPU ms':>7} {'of DB':>6} {'total':>6}")
            for label, s in res.items():
                nxt = f"{s['next']:9.1f}" if s["next"] is not None else f"{'-':>9}"
                print(f"  {label:<18} {s['p50']:8.1f} {s['p95']:8.1f} {nxt} {s['cpu']:7.1f} {s['db']:6.1f} "
                      f"{s['total']!s:>6}", flush=True)
            print("  straight on the collection:" if args.legacy else "  what storage reads in the runs:")
            for line in (plans if args.legacy else run_plans)(env, t):
                print(line)
            rows.append((have, res))
        if len(rows) > 1:
            (n0, a), (n1, b) = rows[0], rows[-1]
            print(f"\nratio {n1:,} / {n0:,} events (goal <= 1.3x)")
            for label in a:
                print(f"  {label:<18} p50 {b[label]['p50'] / a[label]['p50']:.2f}x  "
                      f"p95 {b[label]['p95'] / a[label]['p95']:.2f}x  CPU {b[label]['cpu'] / a[label]['cpu']:.2f}x  "
                      f"(database {b[label]['db'] / a[label]['db']:.2f}x, application "
                      f"{(b[label]['cpu'] - b[label]['db']) / (a[label]['cpu'] - a[label]['db']):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
