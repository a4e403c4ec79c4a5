"""Benchmark: two ``fhir-dmp serve`` nodes behind HAProxy on one database (issue 22).

    python bench/two_nodes.py [--quick] [--workers 1] [--clients 8] [--duration 20] [--dmps 20]

One throw-away SecantusDB (``EmbeddedMongo``), two ``python -m fhir_dmp.runtime.cli serve``
processes on it (``tests/serve_kit.serve_env``: their own data dir, the shared audit and key
files, the RS256 test IdP of ``tests/idp.py``), and HAProxy (``/usr/sbin/haproxy``, Debian's)
in front of them: a ``haproxy.cfg`` written to the temporary directory, round robin, health
check on ``/fhir/metadata``, each answer tagged with the node that served it
(``X-Served-By``).

Seeding through HAProxy: ``--dmps`` DMPs opened by a médecin, 5 documents each. Then
``--clients`` Python threads (keep-alive sessions) read through HAProxy for ``--duration``
seconds: ``GET DocumentReference/{id}`` and ``DocumentReference?patient=`` alternately, on
DMPs picked at random. Half-way, the patient of one more DMP (not in the load) blocks the
médecin (a Consent ``provision.type: deny``) through node A; from its answer, that DMP's
document is read by the médecin on node A and on node B directly every 20 ms until both
refuse (404): the time until the block is in force on both (goal: within a second), and it
must hold (404) on every later read.

Prints req/s per node (from ``X-Served-By``), errors (non-2xx or socket errors of the load:
goal none), the block's time to force on each node, and the RSS of each node (master and
workers: its process group), of HAProxy and of the database at the end of the load.
The machine running it may be shared: the figures are of that run.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import _common as c
import requests
from _common import builders

from fhir_dmp.runtime.embedded_db import EmbeddedMongo, free_port
from tests.idp import TestIdP
from tests.serve_kit import serve_env

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
FHIR = "application/fhir+json"

CONFIG = """global
    maxconn 2048
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fhir
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /fhir/metadata
    http-response set-header X-Served-By %[srv_name]
    server a 127.0.0.1:{a} check inter 1s
    server b 127.0.0.1:{b} check inter 1s
"""


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def group(pgid: int) -> list[int]:
    """The processes of a process group (a node: its master and workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer\n{log.read_text(errors='replace')[-2000:]}")


def headers(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR, "Accept": FHIR}


def seed(lb: str, ps: str, n: int) -> list[tuple[str, list[str]]]:
    """``n`` DMPs of 5 documents each, through the load balancer: [(patient id, doc ids)]."""
    s = requests.Session()
    out = []
    for _ in range(n):
        r = s.post(f"{lb}/Patient", json=builders.patient(), headers=headers(ps))
        assert r.status_code == 201, r.text[:300]
        pid = r.json()["id"]
        docs = []
        for _ in range(5):
            r = s.post(f"{lb}/DocumentReference", json=builders.docref(pid), headers=headers(ps))
            assert r.status_code == 201, r.text[:300]
            docs.append(r.json()["id"])
        out.append((pid, docs))
    return out


class Load:
    """``clients`` threads reading through the load balancer until stopped."""

    def __init__(self, lb: str, ps: str, dmps: list, clients: int):
        self.lb, self.ps, self.dmps, self.clients = lb, ps, dmps, clients
        self.by_node: Counter = Counter()
        self.errors: Counter = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, i: int) -> None:
        s, rnd = requests.Session(), random.Random(i)
        h = headers(self.ps)
        n = 0
        while not self.stop.is_set():
            pid, docs = rnd.choice(self.dmps)
            path = f"DocumentReference/{rnd.choice(docs)}" if n % 2 else f"DocumentReference?patient={pid}"
            n += 1
            try:
                r = s.get(f"{self.lb}/{path}", headers=h, timeout=30)
                key = r.headers.get("X-Served-By", "?")
                with self.lock:
                    self.by_node[key] += 1
                    if r.status_code != 200:
                        self.errors[f"HTTP {r.status_code}"] += 1
            except requests.RequestException as exc:
                with self.lock:
                    self.errors[type(exc).__name__] += 1

    def __enter__(self):
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        self.elapsed = time.perf_counter() - self.t0


def block_in_force(nodes: dict[str, str], ps: str, patient: str, pid: str, doc: str, writer: str,
                   horizon: float = 5.0) -> dict:
    """The patient blocks the médecin through node ``writer``; seconds until each node refuses
    (404) the médecin's read, and whether every read after that refused too."""
    s = requests.Session()
    for name, url in nodes.items():     # each node has the DMP's context cached, and lets the médecin in
        for _ in range(4):
            code = s.get(f"{url}/DocumentReference/{doc}", headers=headers(ps), timeout=30).status_code
            assert code == 200, (name, code)
    r = s.post(f"{nodes[writer]}/Consent", json=builders.consent(pid, "deny", actor=builders.PS_DR),
               headers=headers(patient))
    t0 = time.monotonic()
    assert r.status_code == 201, r.text[:300]
    first: dict[str, float | None] = {name: None for name in nodes}
    relapsed: Counter = Counter()
    while time.monotonic() - t0 < horizon:
        for name, url in nodes.items():
            code = s.get(f"{url}/DocumentReference/{doc}", headers=headers(ps), timeout=30).status_code
            if code == 404 and first[name] is None:
                first[name] = time.monotonic() - t0
            elif code != 404 and first[name] is not None:
                relapsed[name] += 1
        time.sleep(0.02)
    return {"in_force_s": first, "relapsed": dict(relapsed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 s of load, 10 DMPs")
    ap.add_argument("--workers", type=int, default=1, help="workers per node (default 1: two nodes on 2 cores)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--dmps", type=int, default=20)
    args = ap.parse_args()
    if args.quick:
        args.duration, args.dmps = min(args.duration, 10.0), min(args.dmps, 10)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="fhir-dmp-two-nodes-") as tmp_s:
        tmp = Path(tmp_s)
        db = EmbeddedMongo(tmp / "secantus")
        db.start()
        try:
            idp = TestIdP(tmp / "idp", audience=c.BASE)
            ports = {"a": free_port(), "b": free_port()}
            nodes = {}
            for name, port in ports.items():
                env = serve_env(tmp, name, db.uri, "twonodes", idp, FHIR_DMP_BASE_URL=c.BASE)
                env.pop("FHIR_DMP_THREADS", None)        # the server's default threads, not the tests'
                log = tmp / f"{name}.log"
                with open(log, "wb") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "fhir_dmp.runtime.cli", "serve", "--port", str(port),
                         "--workers", str(args.workers)], cwd=c.ROOT, env=env, stdout=out,
                        stderr=subprocess.STDOUT, start_new_session=True))
                nodes[name] = f"http://127.0.0.1:{port}/fhir"
                wait_http(f"{nodes[name]}/metadata", procs[-1], log)
            lb_port = free_port()
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(CONFIG.format(port=lb_port, a=ports["a"], b=ports["b"]))
            hlog = tmp / "haproxy.log"
            with open(hlog, "wb") as out:
                procs.append(subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            lb = f"http://127.0.0.1:{lb_port}/fhir"
            wait_http(f"{lb}/metadata", procs[-1], hlog)
            print(f"two nodes ({args.workers} worker(s) each) behind HAProxy {lb}, one SecantusDB; "
                  f"{args.clients} client threads for {args.duration:.0f} s")
            ps = idp.ps(builders.PS_DR, profession="10", lifetime=3600)
            t0 = time.perf_counter()
            dmps = seed(lb, ps, args.dmps)
            (pid_x, docs_x), = seed(lb, ps, 1)
            print(f"seeded {args.dmps + 1} DMPs x 5 documents through HAProxy in {time.perf_counter() - t0:.1f} s")
            with Load(lb, ps, dmps, args.clients) as load:
                time.sleep(args.duration / 2)
                block = block_in_force(nodes, ps, idp.patient(pid_x, lifetime=3600), pid_x, docs_x[0], "a")
                time.sleep(max(0.0, args.duration / 2 - 5.0))
                rss = {name: rss_mib(group(p.pid)) for name, p in zip(("a", "b", "haproxy"), procs)}
                rss["database"] = rss_mib([db.pid])
            elapsed = load.elapsed
            total = sum(load.by_node.values())
            print(f"\nrequests: {total} in {elapsed:.0f} s = {total / elapsed:.1f} req/s through HAProxy")
            for name in ("a", "b"):
                print(f"  node {name}: {load.by_node.get(name, 0) / elapsed:7.1f} req/s  "
                      f"({load.by_node.get(name, 0)} answers), RSS {rss[name]:.0f} MiB (master + workers)")
            other = {k: v for k, v in load.by_node.items() if k not in ("a", "b")}
            if other:
                print(f"  answers without a node tag: {other}")
            print(f"  RSS HAProxy {rss['haproxy']:.0f} MiB, database {rss['database']:.0f} MiB")
            print(f"errors: {dict(load.errors) or 'none'}")
            for name, s in block["in_force_s"].items():
                state = f"{s * 1e3:.0f} ms" if s is not None else "NOT in force within 5 s"
                print(f"block written through node a: in force on node {name} after {state}")
            print(f"reads let through after the block was in force: {block['relapsed'] or 'none'}")
            ok = not load.errors and all(s is not None and s <= 1.0 for s in block["in_force_s"].values()) \
                and not block["relapsed"]
            print("goals (no error, block in force on both within 1 s):", "met" if ok else "NOT met")
            return 0 if ok else 1
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            db.stop()


if __name__ == "__main__":
    raise SystemExit(main())
