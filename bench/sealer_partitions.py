"""Simulation: the journal's sealing partitioned by patient id, one sealer per key range (issue 22).

    python bench/sealer_partitions.py [--rate 2000] [--dmps 40000000] [--seconds 120]
                                      [--partitions 1,2,4,8,16] [--system-rate 0]
                                      [--pass-ms 10] [--chain-ms 0.5] [--event-ms 0.02]

No database: a discrete-event model of ``fhir_dmp/audit/sealer.py`` on a cluster sharded by
``pid`` (bench/README.md, "Capacity model"). Accesses arrive as a Poisson process at ``--rate``
per second, each an event of a DMP drawn uniformly among ``--dmps`` (pids are random UUIDs, so
the key space is uniform); ``--system-rate`` more events per second have no patient (refused
tokens: the system chain, whose key range is one partition's). The key space is cut into
``--partitions`` equal ranges (the shard key's chunks), each sealed by its own sealer with its
own lease, queue and checkpoints. A sealer pass (at most one every ``--interval-ms``) takes every
queued event of its range (at most ``--batch``), and costs ``--pass-ms`` (the transaction's commit and lease renewal, the signed
checkpoint) + ``--chain-ms`` per chain it moves (one link run inserted, one head written) +
``--event-ms`` per event (hashing). The default costs are assumptions for MongoDB (stated in bench/README.md), not measures.

Prints, per number of partitions: events per sealer per second, the busiest sealer's
utilisation, the unsealed age (append to seal: p50, p99, max, against the bound of 60 s,
``FHIR_DMP_AUDIT_SEAL_BOUND``) and the queue left at the end (a sealer that cannot keep up).
"""
from __future__ import annotations

import argparse
import bisect
import random
import statistics


def simulate(rate: float, system_rate: float, dmps: int, seconds: float, partitions: int, batch: int,
             pass_ms: float, chain_ms: float, event_ms: float, interval_ms: float, seed: int = 1) -> dict:
    rnd = random.Random(seed)
    # arrivals: (time, partition, chain); the system chain lives in partition 0's range
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(partitions)]
    t = 0.0
    total = rate + system_rate
    while True:
        t += rnd.expovariate(total)
        if t >= seconds:
            break
        if rnd.random() < system_rate / total:
            arrivals[0].append((t, -1))
        else:
            pid = rnd.randrange(dmps)
            arrivals[pid * partitions // dmps].append((t, pid))
    ages: list[float] = []
    busiest, left = 0.0, 0
    for queue in arrivals:
        clock, busy, i, next_start = 0.0, 0.0, 0, 0.0
        times = [a[0] for a in queue]
        while i < len(queue):
            clock = max(clock, queue[i][0], next_start)
            next_start = clock + interval_ms / 1e3
            j = min(bisect.bisect_right(times, clock, lo=i), i + batch)
            events = queue[i:j]
            chains = len({pid for _, pid in events})
            cost = (pass_ms + chain_ms * chains + event_ms * len(events)) / 1e3
            if clock + cost > seconds:
                left += len(queue) - i
                break
            clock += cost
            busy += cost
            ages.extend(clock - at for at, _ in events)
            i = j
        busiest = max(busiest, busy / seconds)
    ages.sort()
    q = lambda p: ages[min(len(ages) - 1, int(p * len(ages)))] if ages else float("nan")  # noqa: E731
    return {"per_sealer": (rate + system_rate) / partitions, "busiest": busiest, "p50": q(0.5), "p99": q(0.99),
            "max": ages[-1] if ages else float("nan"), "left": left}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=2000.0, help="accesses (events with a patient) per second")
    ap.add_argument("--system-rate", type=float, default=0.0, help="events without a patient per second")
    ap.add_argument("--dmps", type=int, default=40_000_000)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--partitions", default="1,2,4,8,16")
    ap.add_argument("--batch", type=int, default=5000, help="most events one pass seals")
    ap.add_argument("--pass-ms", type=float, default=10.0)
    ap.add_argument("--chain-ms", type=float, default=0.5)
    ap.add_argument("--event-ms", type=float, default=0.02)
    ap.add_argument("--interval-ms", type=float, default=200.0, help="a pass starts at most this often")
    args = ap.parse_args()
    print(f"{args.rate:.0f} accesses/s over {args.dmps:,} DMPs + {args.system_rate:.0f} system events/s, "
          f"{args.seconds:.0f} s; pass {args.pass_ms} ms + {args.chain_ms} ms/chain + {args.event_ms} ms/event")
    print(f"  {'sealers':>7} {'events/s each':>13} {'busiest':>8} {'age p50':>8} {'p99':>8} {'max':>8} {'queue left':>10}")
    for p in (int(x) for x in args.partitions.split(",")):
        r = simulate(args.rate, args.system_rate, args.dmps, args.seconds, p, args.batch, args.pass_ms,
                     args.chain_ms, args.event_ms, args.interval_ms)
        print(f"  {p:>7} {r['per_sealer']:>13.0f} {100 * r['busiest']:>7.0f}% {r['p50']:>7.2f}s {r['p99']:>7.2f}s "
              f"{r['max']:>7.2f}s {r['left']:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
