"""Random faults under mixed load for N minutes (issue 21, CONTRACT.md "Faults, failover and backups").

``python bench/chaos.py [--minutes 5] [--seed 1] [--gap 2-5]``: a SecantusDB of its own (with its test
commands), ``fhir-dmp serve`` (2 workers) on it with SMTP to an aiosmtpd relay that answers 0.2 s
after it has a message, and the mixed load of ``tests/faults/process_kit.py`` (4 clients: deposits,
reads, searches, centre 15 reads that notify the patient). Every few seconds (``--gap``) one fault
at random, one at a time:

- ``step_down``: ``replSetStepDown`` 2 or 4 s with ``force`` (writes refused "not primary", as a
  MongoDB primary would, ``failCommand`` 10107 on ``bulkWrite`` for the period);
- ``close_connection``: ``failCommand`` ``closeConnection`` on the next 3 inserts, bulk writes, finds
  or commits;
- ``write_concern_error``: ``failCommand`` ``writeConcernError`` (64, wtimeout) on the next 2 commits;
- ``kill_worker``: SIGKILL of one granian worker (the master respawns it);
- ``kill_serve``: SIGKILL of the whole ``serve``, then a new one (the clients follow it);
- ``kill_database``: SIGKILL of the database, restarted on the same path and port.

A ``serve`` that exits by itself is restarted, as a supervisor would, and reported: granian's
master exits (code 1, "crash loop") when a worker dies again less than 5.5 s after it was
respawned, so two worker kills in a row take the whole server down until it is restarted.

Per fault: its length (a restart included), the recovery time from its end (step-down over,
failpoint set, killed part restarted) to the first 200 read, and the outage from its start to it. At the end it prints, as markdown: the faults by kind with their recovery
median/max; the requests by status (500s must be 0; a request cut by a kill has no status); the
acknowledged deposits read back byte for byte; the answered requests found with their AuditEvent;
``fhir-dmp audit verify``; the notices (each email once at the relay).
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path

import pymongo  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402

from fhir_dmp.runtime.embedded_db import free_port  # noqa: E402
from tests import builders as b  # noqa: E402
from tests.builders import journal_entries  # noqa: E402
from tests.conftest import BASE  # noqa: E402
from tests.faults.process_kit import (CUT, MixedLoad, SlowSink, assert_notices_sent_once, call,  # noqa: E402
                                      kill_database, kill_worker, losses, open_dmps, own_database, request_ids,
                                      verified)
from tests.idp import TestIdP  # noqa: E402
from tests.serve_kit import ROOT, serve_env, start_serve  # noqa: E402

DB = "chaos"
KINDS = ["step_down", "close_connection", "write_concern_error", "kill_worker", "kill_serve", "kill_database"]


def fail_point(admin, mode, data: dict | None = None) -> None:
    admin.admin.command({"configureFailPoint": "failCommand", "mode": mode, **({"data": data} if data else {})})


def wait_writable(admin, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if admin.admin.command("hello").get("isWritablePrimary"):
                return
        except pymongo.errors.PyMongoError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the database stayed stepped down")
        time.sleep(0.1)


class Chaos:
    """The processes under test and the injection of one fault of each kind."""

    def __init__(self, tmp: Path, rng: random.Random):
        self.tmp, self.rng = tmp, rng
        self.idp = TestIdP(tmp / "idp", audience=BASE)
        self.database = own_database(tmp / "db", test_commands=True)
        self.admin = pymongo.MongoClient(self.database.uri, serverSelectionTimeoutMS=2000)
        self.sink = SlowSink(0.2)
        self.relay = Controller(self.sink, hostname="127.0.0.1", port=free_port())
        self.relay.start()
        self.env = {"FHIR_DMP_DB_WAIT": "2", "FHIR_DMP_SMTP_HOST": "127.0.0.1",
                    "FHIR_DMP_SMTP_PORT": str(self.relay.port)}
        self.exits: list[str] = []      # serve processes that exited by themselves
        self.servers = [self.start_serve()]

    def start_serve(self):
        return start_serve(self.tmp, f"serve{len(getattr(self, 'servers', []))}", self.database.uri, DB, self.idp,
                           **self.env)

    @property
    def url(self) -> str:
        return self.servers[-1].url

    def cli(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        """``fhir-dmp ARGS`` on the database, with the servers' keys."""
        return subprocess.run([sys.executable, "-m", "fhir_dmp.runtime.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120,
                              env=serve_env(self.tmp, "cli", self.database.uri, DB, self.idp, **extra))

    def inject(self, kind: str) -> None:
        """One fault; returns at its end (what was killed is back, the step-down is over)."""
        if kind == "step_down":
            seconds = self.rng.choice([2, 4])
            self.admin.admin.command({"replSetStepDown": seconds, "force": True})
            fail_point(self.admin, "alwaysOn", {"failCommands": ["bulkWrite"], "errorCode": 10107,
                                                "errorLabels": ["TransientTransactionError"]})
            time.sleep(seconds)
            wait_writable(self.admin)
            fail_point(self.admin, "off")
        elif kind == "close_connection":
            fail_point(self.admin, {"times": 3}, {"failCommands": ["insert", "bulkWrite", "find", "commitTransaction"],
                                                  "closeConnection": True})
        elif kind == "write_concern_error":
            fail_point(self.admin, {"times": 2}, {"failCommands": ["commitTransaction"], "writeConcernError": {
                "code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out",
                "errInfo": {"wtimeout": True}}})
        elif kind == "kill_worker":
            kill_worker(self.servers[-1].proc.pid)
        elif kind == "kill_serve":
            self.servers[-1].kill()
            self.servers.append(self.start_serve())
        elif kind == "kill_database":
            kill_database(self.database)
            time.sleep(0.5)
            self.database.start()
        else:
            raise ValueError(kind)

    def recover(self, token: str, path: str, timeout: float = 60) -> float:
        """Seconds until ``path`` answers 200; a ``serve`` that exited by itself is restarted, as
        a supervisor (systemd ``Restart=on-failure``) would, and counted in ``exits``."""
        t0 = time.monotonic()
        while True:
            server = self.servers[-1]
            if server.proc.poll() is not None:
                self.exits.append(f"{server.name} exited with code {server.proc.returncode}")
                self.servers.append(self.start_serve())
            try:
                if call("GET", f"{self.url}/{path}", token).status_code == 200:
                    return time.monotonic() - t0
            except CUT:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"not back within {timeout} s")
            time.sleep(0.1)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.relay.stop()
        self.admin.close()
        self.database.stop()


def run(args) -> None:
    rng = random.Random(args.seed)
    low, high = (float(x) for x in args.gap.split("-"))
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        chaos = Chaos(Path(tmp), rng)
        try:
            dr = chaos.idp.ps(b.PS_DR)
            pids = open_dmps(chaos.url, dr, 4)
            load = MixedLoad(lambda: chaos.url, chaos.idp, pids).start()
            recovery: dict[str, list[float]] = defaultdict(list)   # from the fault's end to a 200
            outage: dict[str, list[float]] = defaultdict(list)     # from the fault's start to a 200
            length: dict[str, list[float]] = defaultdict(list)     # of the fault (a restart included)
            errors: list[str] = []
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(low, high))
                kind = rng.choice(KINDS)
                try:
                    started = time.monotonic()
                    chaos.inject(kind)
                    ended = time.monotonic()
                    recovery[kind].append(chaos.recover(dr, f"Patient/{pids[0]}"))
                    outage[kind].append(time.monotonic() - started)
                    length[kind].append(ended - started)
                    print(f"{time.strftime('%H:%M:%S')} {kind:20} recovered in {recovery[kind][-1]:.2f} s", flush=True)
                except Exception as exc:   # noqa: BLE001 - reported in the table, the run goes on
                    errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
                    print(f"{time.strftime('%H:%M:%S')} {kind:20} {errors[-1]}", flush=True)
            time.sleep(2)
            load.stop()
            fail_point(chaos.admin, "off")
            with pymongo.MongoClient(chaos.database.uri, tz_aware=True) as client:
                # straight from the database: the journal of minutes of load is long to page through
                journaled = request_ids(e["res"] for e in journal_entries(client[DB]))
            found = losses(load, chaos.url, chaos.idp, journal=lambda pid: journaled)
            audit = verified(chaos.cli, {}, timeout=60)
            try:
                with pymongo.MongoClient(chaos.database.uri, tz_aware=True) as client:
                    notices = assert_notices_sent_once(client[DB], chaos.sink, timeout=60)
            except AssertionError as exc:
                notices = {"error": str(exc)[:300]}
            report(args, (recovery, outage, length), errors + chaos.exits, load, found, audit, notices)
        finally:
            chaos.close()


def _median_max(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} / {max(times):.2f}" if times else "-"


def report(args, timings, errors, load, found, audit, notices) -> None:
    recovery, outage, length = timings
    codes = load.statuses()
    print(f"\n### bench/chaos.py --minutes {args.minutes} --seed {args.seed} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print("| fault | injected | fault, restart included (s), median / max | recovery after its end (s), median / max "
          "| outage: start to first 200 (s), median / max |\n| --- | --- | --- | --- | --- |")
    for kind in KINDS:
        print(f"| {kind} | {len(recovery.get(kind, []))} | {_median_max(length.get(kind, []))} "
              f"| {_median_max(recovery.get(kind, []))} | {_median_max(outage.get(kind, []))} |")
    print("\n| checked | result |\n| --- | --- |")
    print(f"| requests by status | {', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))} |")
    print(f"| 500s (must be 0) | {sum(n for c, n in codes.items() if c >= 500 and c != 503)} |")
    print(f"| requests refused or cut while a killed part was down (no answer; clients retry every 50 ms) | {len(load.cut)} |")
    print(f"| acknowledged deposits read back byte for byte | {found['read_back']} / {found['acked']} |")
    print(f"| answered requests with their AuditEvent | {found['journaled']} / {found['answered']} |")
    verdict = "intact" if "audit chains intact" in audit else audit.strip().splitlines()[-1:]
    print(f"| `fhir-dmp audit verify` | {verdict} |")
    print(f"| notices (email) | {notices} |")
    if found["missing"]:
        print(f"| missing (first) | {found['missing']} |")
    for e in errors:
        print(f"| also seen | {e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gap", default="2-5", help="seconds between two faults, LOW-HIGH (default 2-5)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
