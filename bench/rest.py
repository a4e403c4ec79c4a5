"""Benchmark: the REST API over real HTTP, with concurrent clients (CONTRACT.md "Install and run").

    python bench/rest.py [--quick] [--workers 1,2,4] [--clients 8] [--duration 5]
    python bench/rest.py --url http://127.0.0.1:8080/fhir --token PS_TOKEN

By default, for each worker count it starts ``fhir-dmp serve`` as a child
process (``python -m fhir_dmp.runtime.cli serve --port P --workers N``) in dev mode
with a fresh ``FHIR_DMP_DATA_DIR`` (so a fresh embedded SecantusDB), mints a
médecin's token with ``python -m fhir_dmp.runtime.cli dev-token ps --ps 810000000001
--profession 10 --port P``, and stops it with SIGTERM (graceful drain) at
the end. With ``--url`` it drives an existing server (``--token`` is then a
PS token that server accepts).

``--clients`` threads, each with its own ``requests.Session`` (keep-alive),
run each phase for ``--duration`` seconds:

1. create Patient (the PS opens DMPs, so it is authorized on them);
2. create DocumentReference with a small PDF inline (encrypted to a Binary);
3. read ``DocumentReference/{id}``;
4. search ``DocumentReference?patient=<id>``.

Prints, per worker count and phase, requests/s, p50/p95 latency and errors.
Every request is audited by the server (one AuditEvent each).
"""
from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import builders  # noqa: E402

PS = "810000000001"
JSON = "application/fhir+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fhir-dmp serve`` as a child process in its own data dir."""

    def __init__(self, workers: int, data_dir: Path):
        self.workers = workers
        self.port = free_port()
        self.env = {**os.environ, "FHIR_DMP_DATA_DIR": str(data_dir)}
        for k in [k for k in self.env if k.startswith("FHIR_DMP_") and k != "FHIR_DMP_DATA_DIR"]:
            del self.env[k]  # dev mode, embedded database
        self.log_path = data_dir.parent / f"serve-{workers}.log"
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_dmp.runtime.cli", "serve", "--port", str(self.port),
             "--workers", str(self.workers)],
            env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if requests.get(f"{self.url}/metadata", timeout=2).status_code == 200:
                    # every worker boots on its own; give them a moment to all be ready
                    time.sleep(0.5 * self.workers)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s: {self.tail()}")

    def token(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "fhir_dmp.runtime.cli", "dev-token", "ps", "--ps", PS, "--profession", "10",
             "--port", str(self.port)], env=self.env, cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def stop(self, timeout: float = 40) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class Load:
    """Runs one phase: ``clients`` threads calling ``op(session, rnd)`` for ``duration`` s."""

    def __init__(self, url: str, token: str, clients: int, duration: float):
        self.url, self.clients, self.duration = url, clients, duration
        self.headers = {"Authorization": f"Bearer {token}", "Accept": JSON}
        self.sessions = []
        for _ in range(clients):
            s = requests.Session()
            s.headers.update(self.headers)
            self.sessions.append(s)

    def run(self, op) -> dict:
        lat: list[list[float]] = [[] for _ in range(self.clients)]
        errors = [0] * self.clients
        samples: list[str] = []
        stop_at = [0.0]
        start = threading.Barrier(self.clients + 1)

        def worker(i):
            s, rnd = self.sessions[i], random.Random(i)
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    ok, info = op(s, rnd)
                except requests.RequestException as exc:
                    ok, info = False, type(exc).__name__
                lat[i].append(time.perf_counter() - t)
                if not ok:
                    errors[i] += 1
                    if len(samples) < 3:
                        samples.append(info)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.clients)]
        for th in threads:
            th.start()
        stop_at[0] = time.perf_counter() + self.duration
        t0 = time.perf_counter()
        start.wait()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        all_lat = sorted(x for xs in lat for x in xs)
        n = len(all_lat)
        return {"n": n, "rps": n / wall, "errors": sum(errors), "samples": samples,
                "p50": statistics.median(all_lat) * 1e3 if n else float("nan"),
                "p95": all_lat[min(n - 1, int(0.95 * (n - 1) + 0.5))] * 1e3 if n else float("nan")}


def run_phases(url: str, token: str, clients: int, duration: float) -> dict:
    load = Load(url, token, clients, duration)
    patients: list[str] = []
    docs: list[tuple[str, str]] = []
    lock = threading.Lock()
    pdf_b64 = base64.b64encode(builders.pdf_bytes("bench")).decode()

    def create_patient(s, rnd):
        r = s.post(f"{url}/Patient", json=builders.patient(), headers={"Content-Type": JSON})
        if r.status_code != 201:
            return False, f"{r.status_code} {r.text[:200]}"
        with lock:
            patients.append(r.json()["id"])
        return True, ""

    def create_doc(s, rnd):
        pid = rnd.choice(patients)
        body = builders.docref(pid, content=b"")
        body["content"][0]["attachment"]["data"] = pdf_b64
        r = s.post(f"{url}/DocumentReference", json=body, headers={"Content-Type": JSON})
        if r.status_code != 201:
            return False, f"{r.status_code} {r.text[:200]}"
        with lock:
            docs.append((pid, r.json()["id"]))
        return True, ""

    def read_doc(s, rnd):
        _, did = rnd.choice(docs)
        r = s.get(f"{url}/DocumentReference/{did}")
        return r.status_code == 200, f"{r.status_code} {r.text[:200]}"

    def search_docs(s, rnd):
        pid, _ = rnd.choice(docs)
        r = s.get(f"{url}/DocumentReference", params={"patient": pid})
        ok = r.status_code == 200 and r.json().get("total", 0) >= 1
        return ok, f"{r.status_code} {r.text[:200]}"

    out = {}
    for name, op in (("create Patient", create_patient), ("create DocumentReference+PDF", create_doc),
                     ("read DocumentReference", read_doc), ("search DocumentReference?patient", search_docs)):
        out[name] = load.run(op)
        if name == "create Patient" and not patients:
            raise RuntimeError(f"no Patient could be created: {out[name]['samples']}")
        if name.startswith("create Doc") and not docs:
            raise RuntimeError(f"no DocumentReference could be created: {out[name]['samples']}")
    out["_sizes"] = {"patients": len(patients), "documents": len(docs)}
    return out


def print_table(label: str, res: dict) -> None:
    sizes = res.pop("_sizes")
    print(f"\n{label}  ({sizes['patients']} patients, {sizes['documents']} documents created)")
    print(f"  {'operation':<34} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'n':>6} {'errors':>6}")
    for name, r in res.items():
        print(f"  {name:<34} {r['rps']:8.1f} {r['p50']:8.1f} {r['p95']:8.1f} {r['n']:6d} {r['errors']:6d}")
        for s in r["samples"]:
            print(f"      error sample: {s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="workers 1,2; 2 s per phase")
    ap.add_argument("--workers", default=None, help="worker counts to compare (default 1,2,4)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (default 8)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per phase (default 5)")
    ap.add_argument("--url", help="drive an existing server (FHIR base URL) instead of starting one")
    ap.add_argument("--token", help="with --url: a PS access token for that server")
    args = ap.parse_args()
    duration = args.duration or (2.0 if args.quick else 5.0)
    print(f"{args.clients} concurrent clients (threads, requests.Session keep-alive), "
          f"{duration:g} s per phase; machine: {os.cpu_count()} CPU cores")
    if args.url:
        if not args.token:
            ap.error("--url needs --token")
        print_table(f"server at {args.url}", run_phases(args.url.rstrip("/"), args.token, args.clients,
                                                        duration))
        return
    workers = [int(w) for w in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    with tempfile.TemporaryDirectory(prefix="fhir-dmp-rest-bench-") as tmp:
        for n in workers:
            server = Server(n, Path(tmp) / f"data-{n}")
            t0 = time.perf_counter()
            server.start()
            started = time.perf_counter() - t0
            try:
                res = run_phases(server.url, server.token(), args.clients, duration)
            finally:
                t0 = time.perf_counter()
                code = server.stop()
                stopped = time.perf_counter() - t0
            print_table(f"fhir-dmp serve --workers {n} (gthread, 4 threads each; ready in {started:.1f} s, "
                        f"SIGTERM -> exit {code} in {stopped:.1f} s)", res)


if __name__ == "__main__":
    main()
