"""Benchmark: the journal searches that privacy operations live on, as the journal grows (issue 22).

    python bench/journal_search.py [--quick] [--sizes 10000,100000,1000000] [--repeat 20]
                                   [--per-dmp 200] [--without-indexes]

A throw-away SecantusDB and the real application (``bench/_common.py``); the journal is seeded
fast into the collection (:func:`insert_entries`: the entries as the sealer stores them, with the
search index and sort keys ``search.extract`` gives them, batches of 1,000, no chain, sealer off) with events cloned from one event the server really wrote for a professional's read,
spread across many DMPs: ``--per-dmp`` events per DMP (10 documents each), one professional per
100 events, ``recorded`` spread over the last 360 days. Each stage (``--sizes``, cumulative)
gets fresh targets (a real DMP opened through the guarded repository, its documents, a
professional) seeded with the same shape as the filler, so that every stage measures the same
amount of matching data in a larger journal (the searches' own journal entries land in the
stage's target DMP, the same number at each stage).

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
ratio of the largest stage to the smallest (goal: <= 1.3x) and the query plan SecantusDB reports
for each search's filter (``explain``: the index used, keys and documents examined).
``--without-indexes`` drops the journal's search indexes first (the figures before them).
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
from fhir_dmp.storage.core import JOURNAL, or_branches

IDNATPS = "urn:oid:1.2.250.1.71.4.2.1"
DOCS_PER_DMP = 10
EVENTS_PER_PS = 100
DAYS = 360
BATCH = 1000


def insert_entries(env, docs: list[dict]) -> None:
    """Journal entries (``res`` a dict) inserted as the sealer inserts them (``Storage.seal_pages``)."""
    env.db[JOURNAL].insert_many([{**d, "res": pack(d["res"])} for d in docs], ordered=True)


class Seeder:
    """Events cloned from a real one, written as the sealer writes them (:func:`insert_entries`)."""

    def __init__(self, env, template: dict, per_dmp: int):
        self.env, self.template, self.per_dmp = env, template, per_dmp
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
            docs = []
            for res in events[i:i + BATCH]:
                s, o = search.extract("AuditEvent", res)
                docs.append({"_id": res["id"], "pid": event_patient(res), "vid": 1, "lu": self.now, "del": False,
                             "res": res, "s": s, "o": o})
            insert_entries(self.env, docs)

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
    """label -> {p50, p95 (first page), p50 next page, total, cpu} over ``repeat`` runs."""
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
        runs = repeat + 2
        out[label] = {**c.stats(first), "next": statistics.median(second) * 1e3 if second else None,
                      "total": total,
                      "cpu": 1e3 * (cpu_s(env.server.pid) - db0 + cpu_s(os.getpid()) - me0) / runs}
    return out


def plans(env, t: dict) -> list[str]:
    """Each search's main query straight on the collection (the filter the server sends, guard
    included, each branch of an ``$or`` as storage runs it): ms of the first page's find and of
    the count. ``explain`` is not asked: SecantusDB's explain reports a COLLSCAN for a
    multi-field filter that its find answers from one clause's index."""
    out = []
    coll = env.db[JOURNAL]
    for label, who, args in searches(t, datetime.now(timezone.utc)):
        req = search.parse_search("AuditEvent", args)
        guard = {} if who == "admin" else {"pid": t["pid"]}
        flt = merge_filters(guard, req.mongo_filter(), {"del": False})
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
        for d in env.db[JOURNAL].find({"pid": pid}):
            res = unpack(d["res"])
            if (res.get("subtype") or [{}])[0].get("code") == "read":
                res.pop("meta", None)
                return res
        time.sleep(0.1)
    raise RuntimeError("no read event")


SEARCH_INDEXES = ([("s.entity.r", 1)], [("s.agent.iv", 1)])


def append_cost(env, seeder: Seeder, rounds: int = 3, events: int = 2000, batch: int = 8) -> None:
    """Database CPU per journal entry (inserted as the sealer inserts them, batches of ``batch``) with the journal's two search indexes and without them,
    interleaved ``rounds`` times (CPU time of the database process: comparable on a busy machine)."""
    coll = env.db[JOURNAL]
    out: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for label in ("with", "without"):
            for keys in SEARCH_INDEXES:
                if label == "with":
                    coll.create_index(keys)
                else:
                    coll.drop_index(keys)
            batches = []
            for _ in range(events // batch):
                docs = []
                for res in seeder.dmp_events(new_id(), [new_id()], lambda k: "899999999999")[:batch]:
                    s, o = search.extract("AuditEvent", res)
                    docs.append({"_id": res["id"], "pid": event_patient(res), "vid": 1, "lu": seeder.now,
                                 "del": False, "res": res, "s": s, "o": o})
                batches.append(docs)
            db0 = cpu_s(env.server.pid)
            for docs in batches:
                insert_entries(env, docs)
            out[label].append(1e3 * (cpu_s(env.server.pid) - db0) / events)
    for keys in SEARCH_INDEXES:
        coll.create_index(keys)
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
    args = ap.parse_args()
    sizes = c.sizes_of(ap, args, "sizes", 10, "10000,100000")
    # db_wait: a seeding transaction of 1,000 entries outlasts the server's default 10 s on a busy machine
    with c.environment(audit_sealer=False, db_wait=300) as env:
        seeder = Seeder(env, template_event(env), args.per_dmp)
        if args.append_cost:
            print("entries inserted as the sealer does, 2,000 in batches of 8, interleaved, 3 rounds")
            append_cost(env, seeder)
            return 0
        if args.without_indexes:
            for idx in env.db[JOURNAL].list_indexes():
                if any(k.startswith("s.") for k in idx["key"]):
                    env.db[JOURNAL].drop_index(idx["name"])
        print("indexes of the journal:", [list(i["key"].items()) for i in env.db[JOURNAL].list_indexes()])
        rows = []
        for stage, size in enumerate(sizes):
            have = env.db[JOURNAL].estimated_document_count()
            t0 = time.perf_counter()
            seeder.filler(max(0, size - have - args.per_dmp - EVENTS_PER_PS))
            t = targets(env, seeder, stage)
            have = env.db[JOURNAL].estimated_document_count()
            seeded = time.perf_counter() - t0
            # the change streams read the seeding's oplog a batch at a time: not measured as the searches' CPU
            print(f"\n{have:,} events in the journal (seeded in {seeded:.0f} s, database idle again after "
                  f"{settle(env):.0f} s); target DMP {args.per_dmp} events, "
                  f"professional {EVENTS_PER_PS} reads; {args.repeat} runs each", flush=True)
            res = measure(env, t, args.repeat)
            print(f"  {'search':<18} {'p50 ms':>8} {'p95 ms':>8} {'next p50':>9} {'CPU ms':>7} {'total':>6}")
            for label, s in res.items():
                nxt = f"{s['next']:9.1f}" if s["next"] is not None else f"{'-':>9}"
                print(f"  {label:<18} {s['p50']:8.1f} {s['p95']:8.1f} {nxt} {s['cpu']:7.1f} {s['total']!s:>6}", flush=True)
            print("  straight on the collection:")
            for line in plans(env, t):
                print(line)
            rows.append((have, res))
        if len(rows) > 1:
            (n0, a), (n1, b) = rows[0], rows[-1]
            print(f"\nratio {n1:,} / {n0:,} events (goal <= 1.3x)")
            for label in a:
                print(f"  {label:<18} p50 {b[label]['p50'] / a[label]['p50']:.2f}x  "
                      f"p95 {b[label]['p95'] / a[label]['p95']:.2f}x  CPU {b[label]['cpu'] / a[label]['cpu']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
