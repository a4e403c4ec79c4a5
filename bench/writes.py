"""Benchmark: the cost of one create on the write path, as ``bench/peer.py`` seeds (issue 13).

    python bench/writes.py [--patients 4] [--docs 20] [--sealer] [--by-collection]

(with ``--by-collection``: per collection, the round trips, their wall ms, and the collection's
number of indexes; then the documents inserted per create, by collection)

In process (real app through its WSGI test client, real tokens, a real SecantusDB child): a
médecin POSTs ``Patient`` (with an INS), then ``--docs`` ``DocumentReference`` each with the small
PDF of ``bench/peer.py`` inline, for ``--patients`` patients, one after the other (cost does not
depend on concurrency). Prints per create of each kind:

* database round trips (pymongo command monitoring), by command and, with ``--by-collection``,
  by collection, and the documents inserted (``insert`` and ``bulkWrite`` inserts) by collection;
* CPU ms of the database process (``/proc/<pid>/stat`` utime + stime) and of this process (the
  server's work plus the test client's small share);

The journal sealer is off unless ``--sealer`` (its cost is then added, run to completion after
the creates, and shown per create). One untimed DMP warms up first.

``--serve``: the same seeding as ``bench/peer.py`` (4 clients, real HTTP) against ``fhir-dmp serve``
(its workers, sealer, change streams and notification worker on): creates/s and CPU ms per create
of the database process and of the server processes (``bench/cost.py``'s accounting). Needs the
peer kit's keys (``--kit``), not npm. ``--profile DIR`` (with ``--serve``): py-spy ``--gil`` of the
database and of each server process while seeding, collapsed stacks in DIR.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymongo import monitoring  # noqa: E402

from bench import _common  # noqa: E402
from tests import builders  # noqa: E402

JSON = "application/fhir+json"
PDF = builders.pdf_bytes("bench")


class Counter(monitoring.CommandListener):
    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.micros: collections.Counter = collections.Counter()
        self.documents: collections.Counter = collections.Counter()   # inserted, by collection
        self._keys: dict = {}

    def started(self, event):
        coll = event.command.get(event.command_name)
        if event.command_name == "bulkWrite":
            names = [ns["ns"].split(".", 1)[1] for ns in event.command["nsInfo"]]
            coll = "+".join(names)
            for op in event.command.get("ops", []):
                if "insert" in op:
                    self.documents[names[op["insert"]]] += 1
        elif event.command_name == "insert":
            self.documents[coll] += len(event.command.get("documents", []))
        key = (event.command_name, coll if isinstance(coll, str) else "")
        self.counts[key] += 1
        self._keys[event.request_id] = key

    def succeeded(self, event):
        key = self._keys.pop(event.request_id, None)
        if key:
            self.micros[key] += event.duration_micros

    failed = succeeded


def cpu(pid: int | None = None) -> float:
    """utime + stime seconds of ``pid`` (this process when None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--sealer", action="store_true", help="run the journal sealer (after the creates)")
    ap.add_argument("--by-collection", action="store_true")
    ap.add_argument("--serve", action="store_true", help="seed a `fhir-dmp serve` over HTTP, 4 clients")
    ap.add_argument("--kit", type=Path, default=None, help="the peer kit (--serve)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="--serve: py-spy (--gil, collapsed stacks) of every process into DIR while seeding")
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    counter = Counter()
    monitoring.register(counter)
    with _common.environment(audit_sealer=False) as env:
        client = env.app.test_client()
        token = env.idp.ps(builders.PS_DR, profession="10")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": JSON, "Accept": JSON}
        db_pid = env.server.pid

        def post(resource: dict) -> dict:
            r = client.post(f"/fhir/{resource['resourceType']}", data=json.dumps(resource), headers=headers)
            if r.status_code != 201:
                raise SystemExit(f"POST {resource['resourceType']} -> {r.status_code}: {r.get_data(True)[:300]}")
            return r.get_json()

        def one_dmp(i: int, stats: dict | None) -> None:
            def measured(kind: str, resource: dict) -> dict:
                counter.counts.clear()
                counter.micros.clear()
                counter.documents.clear()
                d0, w0, t0 = cpu(db_pid), cpu(), time.perf_counter()
                out = post(resource)
                if stats is not None:
                    s = stats[kind]
                    s["n"] += 1
                    s["db"] += cpu(db_pid) - d0
                    s["worker"] += cpu() - w0
                    s["wall"] += time.perf_counter() - t0
                    s["calls"].update(counter.counts)
                    s["micros"].update(counter.micros)
                    s["documents"].update(counter.documents)
                return out
            pid = measured("Patient", builders.patient(family=f"Bench{i:05d}"))["id"]
            for _ in range(args.docs):
                measured("DocumentReference", builders.docref(pid, content=PDF))

        one_dmp(0, None)   # warm-up
        stats = {k: {"n": 0, "db": 0.0, "worker": 0.0, "wall": 0.0, "calls": collections.Counter(),
                     "micros": collections.Counter(), "documents": collections.Counter()}
                 for k in ("Patient", "DocumentReference")}
        for i in range(1, args.patients + 1):
            one_dmp(i, stats)

        print(f"{args.patients} DMPs x (1 Patient + {args.docs} DocumentReference), PDF {len(PDF)} bytes "
              f"({len(base64.b64encode(PDF))} base64), sealer {'on' if args.sealer else 'off'}, "
              f"load average {os.getloadavg()[0]:.2f}")
        indexes = {c: len(list(env.db[c].list_indexes())) for c in env.db.list_collection_names()}
        for kind, s in stats.items():
            n = s["n"]
            trips = sum(s["calls"].values()) / n
            print(f"\n{kind}: {n} creates  db CPU {s['db'] / n * 1000:6.2f} ms  worker CPU "
                  f"{s['worker'] / n * 1000:6.2f} ms  wall {s['wall'] / n * 1000:6.2f} ms  "
                  f"round trips {trips:5.1f}")
            by_cmd = collections.Counter()
            for (cmd, coll), c in s["calls"].items():
                by_cmd[cmd] += c
            print("  " + ", ".join(f"{cmd} {c / n:.1f}" for cmd, c in by_cmd.most_common()))
            if args.by_collection:
                for (cmd, coll), c in sorted(s["calls"].items(), key=lambda kv: -kv[1]):
                    print(f"    {cmd:<18} {coll:<26} {c / n:5.2f}  {s['micros'][(cmd, coll)] / n / 1000:6.2f} ms"
                          f"  {indexes.get(coll, '')}")
                docs = s["documents"]
                print(f"  documents inserted {sum(docs.values()) / n:.2f}: "
                      + ", ".join(f"{coll} {c / n:.2f}" for coll, c in docs.most_common()))
        if args.sealer:
            from fhir_dmp.audit.sealer import Sealer
            total = sum(s["n"] for s in stats.values())
            d0, w0 = cpu(db_pid), cpu()
            Sealer(env.storage, env.config.audit_key_path).seal_all()
            print(f"\nsealer, all events of the run: db CPU {(cpu(db_pid) - d0) / total * 1000:6.2f} ms "
                  f"worker CPU {(cpu() - w0) / total * 1000:6.2f} ms per create")


def serve(args) -> None:
    import shutil
    import tempfile
    sys.path.insert(0, str(ROOT / "bench"))
    from cost import cpu_s, split_tree
    from peer import default_kit, free_port, mint_token, seed, start_ours, stop
    work = Path(tempfile.mkdtemp(prefix="fhir-dmp-writes-"))
    ours = None
    try:
        kit = work / "kit"
        shutil.copytree(args.kit or default_kit(), kit, ignore=shutil.ignore_patterns("node_modules", "results"))
        port = free_port()
        base = f"http://127.0.0.1:{port}/fhir"
        token = mint_token(kit, base)
        args.workers = args.threads = 0
        ours = start_ours(work, port, base, kit / "keys" / "jwks.json", args)
        server, database = split_tree(ours.pid)
        # warm-up until every worker has served creates: the first ones in a worker import and
        # build what a create needs (pypdf, the fhir.resources models: ~0.5 s), once per process
        workers = [p for p in server if p != ours.pid]
        start = {p: cpu_s(p) for p in workers}
        for _ in range(10):
            seed(base, token, 4, 3)
            if all(cpu_s(p) - start[p] > 1.0 for p in workers):
                break
        spies = []
        if args.profile:
            import signal
            import subprocess
            args.profile.mkdir(parents=True, exist_ok=True)
            spies = [subprocess.Popen(["py-spy", "record", "--gil", "--nonblocking", "-r", "400", "--format", "raw", "-o",
                                       str(args.profile / f"{'db' if p in database else 'server'}.{p}.txt"),
                                       "-p", str(p)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for p in database + server]
            time.sleep(1)
        before = (sum(map(cpu_s, server)), sum(map(cpu_s, database)))
        load = os.getloadavg()[0]
        rate, _ = seed(base, token, args.patients, args.docs)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait()
        n = args.patients * (1 + args.docs)
        server_ms = 1e3 * (sum(map(cpu_s, server)) - before[0]) / n
        db_ms = 1e3 * (sum(map(cpu_s, database)) - before[1]) / n
        print(f"fhir-dmp serve, {args.patients} x (1 Patient + {args.docs} DocumentReference), 4 clients: "
              f"{rate:.1f} creates/s; per create: database {db_ms:.2f} ms CPU, server processes "
              f"{server_ms:.2f} ms CPU; load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    finally:
        stop(ours)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
