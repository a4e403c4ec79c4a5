"""Benchmark: what the access journal costs (DESIGN.md "Audit").

    python bench/audit.py [--quick] [--repeat N]

In-process, no network: a throw-away SecantusDB (``--sync-on-commit``) and
the real app through Flask's WSGI test client (``bench/_common.py``).

1. ``GET DocumentReference/{id}`` by an authorized médecin, ``--repeat``
   times, interleaved: the normal app (one AuditEvent, hash-chained,
   ``w: majority, j: true``, flushed in ``after_request``) against the same
   read with ``GuardedRepository.flush_audit`` replaced by a no-op
   (baseline). Prints p50/p95 and the difference in ms and %.
2. ``AuditLog.append`` throughput in events/s for batches of 1 and 10 events
   (the shape a read and a 10-patient search produce), on one patient's chain
   and spread over 10 patients' chains.
"""
from __future__ import annotations

import argparse
import itertools
import time
import uuid

import _common as c
from _common import builders

from fhir_dmp.guard.repository import GuardedRepository


def bench_read(env, repeat: int) -> dict:
    pid, ids = c.seed_dmp(env, 20)
    http = env.app.test_client()
    headers = {"Authorization": f"Bearer {env.idp.ps(builders.PS_DR, profession='10')}",
               "Accept": "application/fhir+json"}
    url = f"/fhir/DocumentReference/{ids[0]}"
    real_flush = GuardedRepository.flush_audit

    def no_audit(self):
        self.records = []

    def get():
        r = http.get(url, headers=headers)
        assert r.status_code == 200, r.status_code

    before = len(builders.journal_entries(env.db))     # sealed and still in a page
    times = {"with audit": [], "audit disabled": []}
    for _ in range(3):
        get()
    try:
        for _ in range(repeat):
            GuardedRepository.flush_audit = real_flush
            t = time.perf_counter()
            get()
            times["with audit"].append(time.perf_counter() - t)
            GuardedRepository.flush_audit = no_audit
            t = time.perf_counter()
            get()
            times["audit disabled"].append(time.perf_counter() - t)
    finally:
        GuardedRepository.flush_audit = real_flush
    written = len(builders.journal_entries(env.db)) - before
    assert written >= repeat + 3, f"expected one AuditEvent per audited read, got {written}"
    return {k: c.stats(v) for k, v in times.items()}


_seq = itertools.count()


def sample_events(env, n: int, pids: list[str]) -> list[dict]:
    """``n`` AuditEvents as a read produces them (build_event on an AccessRecord)."""
    from fhir_dmp.audit.events import AccessRecord, build_event
    from fhir_dmp.security.decision import Decision
    p = c.principal(env, env.idp.ps(builders.PS_DR, profession="10"))
    decision = env.backend.policy.for_request(p).complete(Decision(True, "authorized", "bench"))
    out = []
    for i in range(n):
        pid = pids[next(_seq) % len(pids)]   # round robin over the chains, across calls
        rec = AccessRecord(interaction="read", action="R", outcome="0", principal=p, patient_id=pid,
                           resource=f"DocumentReference/{uuid.uuid4().hex}/_history/1", query=None,
                           decision=decision, http_status=200,
                           client_ip="127.0.0.1", request_id=uuid.uuid4().hex)
        out.append(build_event(rec, source_observer=env.config.fhir_base))
    return out


def bench_append(env, seconds: float) -> list[tuple[str, int, float, float]]:
    log = env.backend.audit_log
    rows = []
    for label, n_pids in (("1 chain", 1), ("10 chains", 10)):
        pids = [uuid.uuid4().hex for _ in range(n_pids)]
        for batch in (1, 10):
            log.append(sample_events(env, batch, pids))  # warm (first head read)
            n, calls, t0 = 0, 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                log.append(sample_events(env, batch, pids))
                n += batch
                calls += 1
            dt = time.perf_counter() - t0
            rows.append((label, batch, n / dt, dt / calls * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--repeat", type=int, default=None, help="reads per variant (default 200)")
    args = ap.parse_args()
    repeat = args.repeat or (40 if args.quick else 200)
    with c.environment() as env:
        r = bench_read(env, repeat)
        print(f"GET DocumentReference/{{id}} through the WSGI test client, {repeat} interleaved runs each")
        for k, s in r.items():
            print(f"  {k:<15} {c.fmt_ms(s)}")
        d50 = r["with audit"]["p50"] - r["audit disabled"]["p50"]
        d95 = r["with audit"]["p95"] - r["audit disabled"]["p95"]
        print(f"  audit cost      p50 {d50:+.2f} ms ({d50 / r['audit disabled']['p50'] * 100:+.0f}%)   "
              f"p95 {d95:+.2f} ms ({d95 / r['audit disabled']['p95'] * 100:+.0f}%)")
        print("\nAuditLog.append (events built with build_event inside the timed loop)")
        for label, batch, rate, per_call in bench_append(env, 1.0 if args.quick else 4.0):
            print(f"  {label:<10} batch {batch:>2}: {rate:8.0f} events/s   {per_call:7.2f} ms per append")


if __name__ == "__main__":
    main()
