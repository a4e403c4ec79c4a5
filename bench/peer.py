"""Benchmark: fhir-dmp against the in-memory Medplum peer, same load, interleaved (issue 13).

    python bench/peer.py [--quick] [--kit ../shared/tools/peer] [--rounds 3] [--duration 8]
                         [--patients 100] [--docs 20] [--workers N] [--threads T]

One run, everything real (needs node >= 20, npm, wrk):

1. copies the peer kit (read-only) to a temp dir and ``npm ci`` there; one RS256 key pair and
   one token (``make_token.py``) accepted by both servers: a médecin (idNatPs, profession 10,
   ``acr`` eidas1) for fhir-dmp, which the peer checks the same way (signature, iss, aud, exp);
2. starts ``fhir-dmp serve`` (embedded SecantusDB, fresh data dir, trusting the kit's JWKS)
   and ``node medplum-server.mjs``;
3. seeds both the same way, in turn (N Patients with an INS, M DocumentReferences each with a
   small PDF, 4 parallel clients, POST): creates/s and the ratio;
4. ``GET Patient/{id}``, ``GET DocumentReference/{id}`` and ``GET DocumentReference?patient=Patient/{id}``:
   ``wrk -t2 -c32`` rounds interleaved A,B,A,B (kit's ``wrk_report.lua``), medians and ratios;
   with ``--before DIR`` a second fhir-dmp, from the checkout DIR (say a worktree of the commit
   before a change: ``git worktree add /tmp/before <commit>``), started, seeded and measured the
   same way in the same rounds (A, before, B), so that "x times today's median" is measured, not
   remembered;
5. fhir-dmp alone at 4, 32 and 128 connections (``GET Patient/{id}``): ratios to 4;
6. decision + journal cost: the same read against a second server process on the same
   database with the guard and the journal switched off (``bench/_unguarded.py``, bench only),
   interleaved; cost = 1 - guarded / unguarded;
7. RSS of the fhir-dmp processes (master, workers, embedded database) sampled under load.

Prints every round, then a summary with the goals of issue 22. Takes ~5 minutes by default,
~1.5 with ``--quick``. Run it on a quiet machine: the load generator shares the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import builders  # noqa: E402

PS = "810000000001"
ISSUER = "https://issuer.bench.test"
JSON = "application/fhir+json"


def default_kit() -> Path:
    for cand in (ROOT.parent / "shared" / "tools" / "peer", Path("/work/shared/tools/peer")):
        if (cand / "medplum-server.mjs").exists():
            return cand
    return ROOT.parent / "shared" / "tools" / "peer"


def free_port() -> int:
    from fhir_dmp.runtime.embedded_db import free_port as fp
    return fp()


def run(cmd, **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def prepare_kit(src: Path, work: Path) -> Path:
    kit = work / "kit"
    shutil.copytree(src, kit, ignore=shutil.ignore_patterns("node_modules", "results"))
    for p in kit.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    kit.chmod(kit.stat().st_mode | 0o200)
    print("npm ci in", kit, flush=True)
    run(["npm", "ci", "--no-audit", "--no-fund"], cwd=kit, timeout=600)
    return kit


def mint_token(kit: Path, audience: str) -> str:
    return run([sys.executable, str(kit / "make_token.py"), str(kit / "keys"), "--iss", ISSUER,
                "--aud", audience, "--sub", PS, "--scope", "openid user/*.cruds", "--ttl", "7200",
                "--claim", "acr=eidas1", "--claim", f"SubjectNameID=\"{PS}\"",
                "--claim", 'SubjectRole=["10"]'], cwd=kit).strip()


def wait_http(url: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def start_ours(work: Path, port: int, audience: str, jwks: Path, args, *, unguarded_of: str | None = None,
               name: str = "ours", checkout: Path = ROOT) -> subprocess.Popen:
    """``fhir-dmp serve`` of ``checkout`` (its own code first on the path, its own data dir)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_DMP_")}
    data = "data" if name == "ours" else f"data-{name}"
    if checkout != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [env.get("PYTHONPATH")])])
    env.update(FHIR_DMP_DATA_DIR=str(work / data), FHIR_DMP_ISSUER=ISSUER, FHIR_DMP_JWKS_FILE=str(jwks),
               FHIR_DMP_AUDIENCE=audience, FHIR_DMP_BASE_URL=audience)
    if args.threads:
        env["FHIR_DMP_THREADS"] = str(args.threads)
    env.update(item.split("=", 1) for item in getattr(args, "env", None) or ())
    cmd = [sys.executable, "-m", "fhir_dmp.runtime.cli", "serve", "--port", str(port)]
    if unguarded_of:
        env["FHIR_DMP_MONGODB_URI"] = unguarded_of
        env["FHIR_DMP_DATA_DIR"] = str(work / "data-unguarded")
        cmd = [sys.executable, str(ROOT / "bench" / "_unguarded.py"), "--port", str(port)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    log = open(work / f"{name}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=checkout,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/fhir/metadata")
    return proc


def serve_with_kit(work: Path, args, *, checkout: Path = ROOT) -> tuple[Path, str, str, subprocess.Popen]:
    """``(kit, base url, token, process)``: the kit ``args.kit`` copied into ``work``, a token it
    mints, and ``fhir-dmp serve`` of ``checkout`` on a free port trusting the kit's JWKS."""
    kit = work / "kit"
    shutil.copytree(args.kit, kit, ignore=shutil.ignore_patterns("node_modules", "results"))
    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    token = mint_token(kit, base)
    return kit, base, token, start_ours(work, port, base, kit / "keys" / "jwks.json", args, checkout=checkout)


def start_peer(kit: Path, port: int, audience: str, work: Path) -> subprocess.Popen:
    env = dict(os.environ, PEER_JWKS_FILE=str(kit / "keys" / "jwks.json"), PEER_PORT=str(port),
               PEER_JWT_ISSUER=ISSUER, PEER_JWT_AUDIENCE=audience)
    proc = subprocess.Popen(["node", "medplum-server.mjs"], cwd=kit, env=env,
                            stdout=open(work / "peer.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/fhir/R4/metadata")
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- seeding -----------------------------------------------------------------------------------

_local = threading.local()


def _post(base: str, token: str, resource: dict) -> dict:
    s = getattr(_local, "s", None)
    if s is None:
        s = _local.s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {token}", "Content-Type": JSON, "Accept": JSON})
    r = s.post(f"{base}/{resource['resourceType']}", data=json.dumps(resource), timeout=120)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"POST {resource['resourceType']} -> {r.status_code}: {r.text[:300]}")
    return r.json()


PDF = builders.pdf_bytes("bench")


def seed(base: str, token: str, patients: int, docs: int, workers: int = 4) -> tuple[float, list[str], list[str]]:
    """Creates/s, the Patient ids and each one's first DocumentReference id (same resources for
    every server)."""
    def one(i: int) -> tuple[str, str]:
        pid = _post(base, token, builders.patient(family=f"Bench{i:05d}"))["id"]
        made = [_post(base, token, builders.docref(pid, content=PDF))["id"] for _ in range(docs)]
        return pid, made[0] if made else ""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pairs = list(ex.map(one, range(patients)))
    return patients * (1 + docs) / (time.perf_counter() - t0), [p for p, _ in pairs], [d for _, d in pairs]


# -- load --------------------------------------------------------------------------------------

def wrk(kit: Path, url: str, token: str, conns: int, duration: float) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "--latency",
                          "-s", str(kit / "wrk_report.lua"), "-H", f"Authorization: Bearer {token}",
                          "-H", f"Accept: {JSON}", url], capture_output=True, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("WRKJSON ")]
    if not line:
        raise RuntimeError(f"wrk gave no result for {url}:\n{out}")
    d = json.loads(line[-1][8:])
    d["errors"] = d["connect_err"] + d["read_err"] + d["write_err"] + d["timeout_err"]
    return d


def show(label: str, d: dict) -> None:
    warn = "  <-- non-2xx or socket errors" if d["non2xx3xx"] or d["errors"] else ""
    print(f"  {label:<28} {d['rps']:9.1f} req/s  p50 {d['p50_us'] / 1000:8.2f} ms  "
          f"p99 {d['p99_us'] / 1000:8.2f} ms  non2xx {d['non2xx3xx']:.0f}{warn}", flush=True)


def median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in ("rps", "p50_us", "p99_us")} | \
        {"non2xx3xx": sum(r["non2xx3xx"] for r in rows), "errors": sum(r["errors"] for r in rows)}


def interleaved(kit, urls: dict[str, str], token: str, conns: int, rounds: int, duration: float,
                sampler=None) -> dict[str, dict]:
    for url in urls.values():   # untimed warm-up
        wrk(kit, url, token, conns, min(2.0, duration))
    rows = {k: [] for k in urls}
    for r in range(rounds):
        for label, url in urls.items():
            sample = sampler is not None and label == "fhir-dmp"
            if sample:
                sampler.start(label)
            d = wrk(kit, url, token, conns, duration)
            if sample:
                sampler.stop()
            rows[label].append(d)
            show(f"round {r + 1} {label}", d)
    return {k: median(v) for k, v in rows.items()}


class RssSampler:
    """Peak summed RSS of a process tree (the server master, its workers, the database)."""

    def __init__(self, root_pid: int):
        self.root = root_pid
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()

    def _tree(self) -> list[int]:
        kids: dict[int, list[int]] = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                kids.setdefault(ppid, []).append(int(p.name))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += kids.get(pid, [])
        return out

    def rss_kib(self) -> int:
        total = 0
        for pid in self._tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def start(self, label: str) -> None:
        self._stop.clear()
        self._label = label

        def loop():
            while not self._stop.is_set():
                self.peak[self._label] = max(self.peak.get(self._label, 0), self.rss_kib())
                self._stop.wait(0.5)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s, 20 x 10 seed")
    ap.add_argument("--kit", type=Path, default=default_kit())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--docs", type=int, default=20, help="DocumentReferences per Patient")
    ap.add_argument("--workers", type=int, default=0, help="fhir-dmp worker processes (default: serve's)")
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (default: serve's)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--before", type=Path, help="a checkout of fhir-dmp before the change, measured in the same rounds")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.patients, args.docs = 1, 4.0, 20, 10
    for tool in ("wrk", "node", "npm"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="fhir-dmp-peer-"))
    ours = peer = bare = before = None
    try:
        load = os.getloadavg()
        print(f"host: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"wrk -t2, {args.rounds} round(s) of {args.duration:g}s, seed {args.patients} x {args.docs}",
              flush=True)
        kit = prepare_kit(args.kit, work)
        our_port, peer_port, bare_port, before_port = free_port(), free_port(), free_port(), free_port()
        audience = f"http://127.0.0.1:{our_port}/fhir"
        token = mint_token(kit, audience)
        ours = start_ours(work, our_port, audience, kit / "keys" / "jwks.json", args)
        peer = start_peer(kit, peer_port, audience, work)
        servers = {"fhir-dmp": f"http://127.0.0.1:{our_port}/fhir"}
        if args.before:
            # same audience: the "before" server is reached on its own port but checks the one token
            before = start_ours(work, before_port, audience, kit / "keys" / "jwks.json", args, name="before",
                                checkout=args.before.resolve())
            servers["before"] = f"http://127.0.0.1:{before_port}/fhir"
        servers["peer"] = f"http://127.0.0.1:{peer_port}/fhir/R4"
        A = servers["fhir-dmp"]

        print("seeding (POST, 4 clients)", flush=True)
        seeded = {}
        for label, base_url in servers.items():
            rate, ids, docs = seed(base_url, token, args.patients, args.docs)
            seeded[label] = (rate, ids[len(ids) // 2], docs[len(docs) // 2])
        print("  " + "   ".join(f"{k} {v[0]:.1f} creates/s" for k, v in seeded.items()), flush=True)
        seed_a, pa, da = seeded["fhir-dmp"]
        seed_b = seeded["peer"][0]

        sampler = RssSampler(ours.pid)
        results = {}
        for name, path in (("GET Patient/{id}", "Patient/{p}"), ("GET DocumentReference/{id}", "DocumentReference/{d}"),
                           ("GET DocumentReference?patient=", "DocumentReference?patient=Patient/{p}")):
            print(f"{name}: wrk -c32, interleaved", flush=True)
            urls = {k: f"{u}/" + path.format(p=seeded[k][1], d=seeded[k][2]) for k, u in servers.items()}
            results[name] = interleaved(kit, urls, token, 32, args.rounds, args.duration, sampler)

        print("fhir-dmp GET Patient/{id} at 4, 32, 128 connections", flush=True)
        sweep = {}
        for c in (4, 32, 128):
            sampler.start(f"c{c}")
            sweep[c] = wrk(kit, f"{A}/Patient/{pa}", token, c, args.duration)
            sampler.stop()
            show(f"c{c}", sweep[c])

        from fhir_dmp.runtime.embedded_db import EmbeddedMongo
        uri = EmbeddedMongo.find_running(work / "data")
        bare = start_ours(work, bare_port, audience, kit / "keys" / "jwks.json", args, unguarded_of=uri,
                          name="unguarded")
        print("decision + journal cost: GET Patient/{id} guarded vs guard and journal off, -c32", flush=True)
        guard = interleaved(kit, {"guarded": f"{A}/Patient/{pa}",
                                  "unguarded": f"http://127.0.0.1:{bare_port}/fhir/Patient/{pa}"},
                            token, 32, args.rounds, args.duration)

        r_read = results["GET Patient/{id}"]
        r_doc = results["GET DocumentReference/{id}"]
        r_search = results["GET DocumentReference?patient="]
        load = os.getloadavg()
        print()
        print(f"SUMMARY (load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        rows = [
            ("GET Patient/{id} req/s", r_read["fhir-dmp"]["rps"], r_read["peer"]["rps"], ">= 0.14x peer"),
            ("GET DocumentReference/{id} req/s", r_doc["fhir-dmp"]["rps"], r_doc["peer"]["rps"], ">= 0.14x peer"),
            ("DocumentReference?patient= req/s", r_search["fhir-dmp"]["rps"], r_search["peer"]["rps"],
             ">= 5x peer"),
            ("seeding creates/s", seed_a, seed_b, ">= 0.3x peer"),
        ]
        for label, a, b, goal in rows:
            print(f"  {label:<36} fhir-dmp {a:9.1f}  peer {b:9.1f}  ratio {ratio(a, b):6.3f}  goal {goal}")
        if args.before:   # issue 22: >= 2x the median before the change, same rounds
            for label, r in (("GET Patient/{id}", r_read), ("GET DocumentReference/{id}", r_doc),
                             ("DocumentReference?patient=", r_search)):
                a, b = r["fhir-dmp"]["rps"], r["before"]["rps"]
                print(f"  {label:<36} fhir-dmp {a:9.1f}  before {b:9.1f}  ratio {ratio(a, b):6.2f}x  goal >= 2x (reads)")
            print(f"  {'seeding creates/s':<36} fhir-dmp {seed_a:9.1f}  before {seeded['before'][0]:9.1f}  "
                  f"ratio {ratio(seed_a, seeded['before'][0]):6.2f}x")
        for label, r in (("GET Patient/{id}", r_read), ("DocumentReference?patient=", r_search)):
            print(f"  {label:<36} p50 {r['fhir-dmp']['p50_us'] / 1000:.2f} ms vs {r['peer']['p50_us'] / 1000:.2f} ms"
                  f"  p99 {r['fhir-dmp']['p99_us'] / 1000:.2f} ms vs {r['peer']['p99_us'] / 1000:.2f} ms")
        base = sweep[4]["rps"]
        print(f"  concurrency: c4 {base:.1f}  c32 {sweep[32]['rps']:.1f} ({ratio(sweep[32]['rps'], base):.2f}x)"
              f"  c128 {sweep[128]['rps']:.1f} ({ratio(sweep[128]['rps'], base):.2f}x)  goal >= 0.9x")
        cost = 1 - ratio(guard["guarded"]["rps"], guard["unguarded"]["rps"])
        print(f"  decision + journal cost: guarded {guard['guarded']['rps']:.1f} vs unguarded "
              f"{guard['unguarded']['rps']:.1f} req/s -> {cost * 100:.1f}% of request time  goal <= 10%")
        bad = sum(r["non2xx3xx"] + r["errors"]
                  for r in (r_read["fhir-dmp"], r_doc["fhir-dmp"], r_search["fhir-dmp"], *sweep.values()))
        print(f"  fhir-dmp non-2xx + socket errors under load: {bad:.0f}")
        print("  fhir-dmp RSS peak (master + workers + database, MiB): " +
              ", ".join(f"{k} {v / 1024:.0f}" for k, v in sampler.peak.items()))
        return 0
    finally:
        for proc in (bare, before, peer, ours):
            stop(proc)
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
