"""Benchmark: does the misuse scan find misuse, how fast, in how much memory (issue 20,
CONTRACT.md "Privacy operations", "Looking for misuse").

    python bench/privacy.py [--quick] [--patients 240] [--ps 48] [--budget 20] [--seed 1] [--events 1000000]
                            [--legacy]

A throw-away SecantusDB and the real app (``bench/_common.py``), real RS256 tokens from the test
IdP, every step of the population through the FHIR API (the WSGI app, each request with its
client address): no resource and no AuditEvent of the population is written behind the API.

1. The population: professionals in establishments (FINESS) of six towns (six départements), in
   the directory (``fhir-dmp load``'s path) with name and work address; médecins (GPs, specialists,
   emergency doctors), pharmacists, nurses. Patients with surname, town and postal code, created
   by the administrator with their médecin traitant; the GP deposits a note and reads the record;
   the patient authorizes one or two other professionals, who read; some professionals see a new
   patient: they attest the patient's agreement, read, then deposit (a first access followed by
   care); emergency doctors break the glass now and then.
2. The misuse, each kind by professionals who also do all of the above (snoopers look ordinary):
   ``lookup`` (attest and read a stranger's record, no care after), ``relative`` (a record with the
   professional's surname), ``neighbour`` (a record of the professional's own postal code),
   ``bulk`` (one professional opens far more records in a day than their peers), ``shared`` (a
   professional's credential used from another address and client while they work: records they
   are authorized on), ``break-glass`` (one emergency doctor breaks the glass far more than peers).
   The sealer thread is off while the population is built; its events are then sealed by the real
   sealer (``_common.seal_pages``), as the running sealer would have: the scan reads runs.
3. The scan (``review/scan.py``) over the window with ``--budget`` cases: per kind the AUC of the
   score (``sklearn.metrics.roc_auc_score``, that kind's pairs against every legitimate pair) and
   how many of the cases opened within the budget are that kind's; the precision of the cases
   (injected pairs among them); the scan's time and peak memory for the journal's size.
4. ``--events N``: the journal grown to N AuditEvents through storage (copies of the population's
   own events, spread over 2,000 professionals and a week, stored in batches of 5,000 as the sealer
   stores them, ``_common.seal_entries``: per DMP, in runs; ``--legacy``: as ``AuditEvent``
   documents, the layout before the runs; it only times the scan), then the scan again over the
   whole journal: time, peak traced memory (tracemalloc), pairs.

Goal (issue 20): AUC >= 0.95 for every kind, precision >= 0.5 within the budget, a million
AuditEvents scanned in minutes.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path

import _common as c
from _common import builders as b

from sklearn.metrics import roc_auc_score

from fhir_dmp.review.scan import run_scan
from fhir_dmp.runtime.loader import load_files
from fhir_dmp.security.principal import IDNATPS_SYSTEM
from fhir_dmp.storage import now, pack, unpack
from fhir_dmp.storage.core import JOURNAL_LINKS

TOWNS = [("Lyon", "69003"), ("Paris", "75011"), ("Lille", "59000"), ("Nantes", "44000"), ("Tours", "37000"),
         ("Metz", "57000")]
SURNAMES = ["Martin", "Bernard", "Thomas", "Petit", "Robert", "Richard", "Durand", "Dubois", "Moreau", "Laurent",
            "Simon", "Michel", "Lefebvre", "Leroy", "Roux", "David", "Bertrand", "Morel", "Fournier", "Girard",
            "Bonnet", "Dupont", "Lambert", "Fontaine", "Rousseau", "Vincent", "Muller", "Lefevre", "Faure", "Andre",
            "Mercier", "Blanc", "Guerin", "Boyer", "Garnier", "Chevalier", "Francois", "Legrand", "Gauthier",
            "Garcia", "Perrin", "Robin", "Clement", "Morin", "Nicolas", "Henry", "Roussel", "Mathieu", "Gautier",
            "Masson"]
GIVEN = ["Alex", "Camille", "Claude", "Dominique", "Sacha", "Lou", "Noa", "Charlie"]
KINDS = ("lookup", "relative", "neighbour", "bulk", "shared", "break-glass")
FINESS = "urn:oid:1.2.250.1.71.4.2.2"
PROFESSION = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"


class Http:
    """The FHIR API through the WSGI app: one request, one token, one client address."""

    def __init__(self, env):
        self.env = env
        self.http = env.app.test_client()
        self.tokens: dict = {}
        self.requests = 0

    def token(self, who: dict | str, **claims) -> str:
        key = (json.dumps(who, sort_keys=True) if isinstance(who, dict) else who, json.dumps(claims, sort_keys=True))
        if key not in self.tokens:
            idp = self.env.idp
            if who == "admin":
                self.tokens[key] = idp.admin(lifetime=7200)
            elif isinstance(who, str):
                self.tokens[key] = idp.patient(who, lifetime=7200)
            else:
                self.tokens[key] = idp.ps(who["id"], profession=who["profession"], family_name=who["family"],
                                          given_name=who["given"], organization=f"{FINESS}|{who['finess']}",
                                          client_id=claims.pop("client_id", f"lgc-{who['finess']}"),
                                          lifetime=7200, **claims)
        return self.tokens[key]

    def call(self, method: str, path: str, token: str, body: dict | None = None, *, addr: str = "127.0.0.1",
             ok=(200, 201)) -> dict:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        if body is not None:
            headers["Content-Type"] = "application/fhir+json"
        r = self.http.open("/fhir/" + path, method=method, data=json.dumps(body) if body is not None else None,
                           headers=headers, environ_base={"REMOTE_ADDR": addr})
        self.requests += 1
        if r.status_code not in ok:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.get_data(as_text=True)[:300]}")
        return r.get_json(silent=True) or {}


class Population:
    """Builds the population and its misuse (module docstring) and remembers which pair is which."""

    def __init__(self, http: Http, rng: random.Random, n_ps: int, n_patients: int):
        self.http, self.rng = http, rng
        self.truth: dict[tuple[str, str], str] = {}        # injected pair -> kind
        self.related: set[tuple[str, str]] = set()          # pairs with a legitimate access
        self.ps = []
        for i in range(n_ps):
            town, postal = TOWNS[i % len(TOWNS)]
            role = ("gp", "10") if i % 8 < 4 else ("specialist", "10") if i % 8 < 6 else \
                ("emergency", "10") if i % 8 == 6 else (rng.choice(["pharmacist", "nurse"]), None)
            profession = role[1] or ("21" if role[0] == "pharmacist" else "60")
            self.ps.append({"id": f"8100{i:08d}", "profession": profession, "role": role[0], "town": town,
                            "postal": postal, "family": rng.choice(SURNAMES), "given": rng.choice(GIVEN),
                            "finess": f"0{(i % len(TOWNS)) + 1}0000{i % 3}", "addr": f"10.{i // 250}.{i % 250}.10"})
        self.n_patients = n_patients
        self.patients: list[dict] = []

    # -- the directory, then people
    def directory(self, tmp: Path) -> None:
        entries = [{"resource": {
            "resourceType": "Practitioner", "id": f"ps-{p['id']}", "active": True,
            "identifier": [{"system": IDNATPS_SYSTEM, "value": p["id"]}],
            "name": [{"family": p["family"], "given": [p["given"]]}],
            "address": [{"use": "work", "city": p["town"], "postalCode": p["postal"], "country": "FRA"}],
            "qualification": [{"code": {"coding": [{"system": PROFESSION, "code": p["profession"]}]}}]}}
            for p in self.ps]
        path = tmp / "directory.json"
        path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))

        class Quiet:
            def update(self, _n):
                pass
        load_files(self.http.env.config, [path], Quiet())

    def patient(self, family: str, town: str, postal: str, gp: dict | None) -> str:
        body = b.patient(family=family, given=self.rng.choice(GIVEN), gp=gp["id"] if gp else None)
        body["address"] = [{"city": town, "postalCode": postal, "country": "FRA"}]
        pid = self.http.call("POST", "Patient", self.http.token("admin"), body)["id"]
        self.patients.append({"id": pid, "family": family, "town": town, "postal": postal, "gp": gp})
        return pid

    def read(self, ps: dict, pid: str, *, times: int = 1, addr: str | None = None, **claims) -> None:
        token = self.http.token(ps, **claims)
        self.related.add((ps["id"], pid))
        for _ in range(times):
            self.http.call("GET", f"Patient/{pid}", token, addr=addr or ps["addr"])
            self.http.call("GET", f"DocumentReference?patient={pid}", token, addr=addr or ps["addr"])

    def deposit(self, ps: dict, pid: str) -> None:
        self.http.call("POST", "DocumentReference", self.http.token(ps), b.docref(pid, author=ps["id"]),
                       addr=ps["addr"])

    def authorize(self, pid: str, ps: dict) -> None:
        self.http.call("POST", "Consent", self.http.token(pid), b.consent(pid, actor=ps["id"]))

    def attest(self, ps: dict, pid: str) -> None:
        self.http.call("POST", "Consent", self.http.token(ps), b.consent(pid, actor=ps["id"], verified=True),
                       addr=ps["addr"])

    def of(self, role: str) -> list[dict]:
        return [p for p in self.ps if p["role"] == role]

    def legitimate(self) -> None:
        rng = self.rng
        gps, others = self.of("gp"), [p for p in self.ps if p["role"] != "gp"]
        for _ in range(self.n_patients):
            town, postal = rng.choice(TOWNS)
            local = [g for g in gps if g["town"] == town] or gps
            gp = rng.choice(local)
            pid = self.patient(rng.choice(SURNAMES), town, postal, gp)
            self.deposit(gp, pid)
            self.read(gp, pid, times=rng.randint(1, 3))
            for ps in rng.sample([p for p in others if p["role"] != "emergency"], rng.randint(1, 2)):
                self.authorize(pid, ps)
                self.read(ps, pid, times=rng.randint(1, 2))
            if rng.random() < 0.25:     # a new professional sees the patient: attests, reads, then cares
                ps = rng.choice([p for p in self.ps if p["role"] in ("specialist", "nurse")])
                self.attest(ps, pid)
                self.read(ps, pid)
                self.deposit(ps, pid)
            if rng.random() < 0.08:     # an emergency
                doc = rng.choice(self.of("emergency"))
                self.read(doc, pid, purpose="BTG", btg_reason="urgence vitale")

    # -- the misuse
    def inject(self, kind: str, ps: dict, pid: str) -> None:
        self.truth[(ps["id"], pid)] = kind

    def strangers(self, ps: dict, n: int) -> list[dict]:
        """``n`` patients ``ps`` never had anything to do with."""
        return self.rng.sample([p for p in self.patients if (ps["id"], p["id"]) not in self.related], n)

    def misuse(self) -> None:
        rng = self.rng
        pool = [p for p in self.ps if p["role"] in ("gp", "specialist", "nurse", "pharmacist")]
        snoopers = rng.sample(pool, 12)
        for ps in snoopers[:4]:                         # look-ups of strangers' records
            for p in self.strangers(ps, 2):
                self.attest(ps, p["id"])
                self.read(ps, p["id"])
                self.inject("lookup", ps, p["id"])
        for ps in snoopers[4:7]:                        # relatives: their surname, another town
            town, postal = rng.choice([t for t in TOWNS if t[0] != ps["town"]])
            for _ in range(2):
                pid = self.patient(ps["family"], town, postal, rng.choice(self.of("gp")))
                self.attest(ps, pid)
                self.read(ps, pid)
                self.inject("relative", ps, pid)
        for ps in snoopers[7:10]:                       # neighbours: their own postal code
            for _ in range(2):
                others = [s for s in SURNAMES if s != ps["family"]]
                pid = self.patient(rng.choice(others), ps["town"], ps["postal"],
                                   rng.choice([g for g in self.of("gp") if g is not ps]))
                self.attest(ps, pid)
                self.read(ps, pid)
                self.inject("neighbour", ps, pid)
        bulk = snoopers[10]                              # one opens far more records than peers
        for p in self.strangers(bulk, min(40, len(self.patients) // 3)):
            self.attest(bulk, p["id"])
            self.read(bulk, p["id"])
            self.inject("bulk", bulk, p["id"])
        owner = snoopers[11]                             # a credential used elsewhere while the owner works
        own, *mine = self.strangers(owner, 7)
        for p in (own, *mine):
            self.authorize(p["id"], owner)
        for p in mine:
            self.read(owner, own["id"])
            self.read(owner, p["id"], addr="192.168.77.7", client_id="web-elsewhere")
            self.inject("shared", owner, p["id"])
        self.read(owner, own["id"])
        doc = rng.choice(self.of("emergency"))           # break-glass far above peers
        for p in self.strangers(doc, 8):
            self.read(doc, p["id"], purpose="BTG", btg_reason="urgence")
            self.inject("break-glass", doc, p["id"])


def measure(storage, since, until, budget: int | None = None, *, memory: bool = True, **kw) -> tuple:
    """The scan's result, its wall and CPU time (this process: a busy machine stretches the wall
    time, not the CPU time), then its peak traced memory (a second run, under tracemalloc, opening
    nothing: tracemalloc slows Python down; None when ``memory`` is False)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = run_scan(storage, since=since, until=until, budget=budget, **kw)
    seconds = time.perf_counter() - t0
    result.cpu = time.process_time() - cpu0
    if not memory:
        return result, seconds, None
    tracemalloc.start()
    run_scan(storage, since=since, until=until)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def report(pop: Population, result, budget: int) -> dict:
    rows = {(r["actor"], r["patient"]): r for r in result.rows}
    legit = [r["score"] for k, r in rows.items() if k not in pop.truth]
    opened_pairs = []
    for task_id in result.opened:
        stored = pop.http.env.storage.read("Task", task_id).resource
        actor = next(i["valueIdentifier"]["value"] for i in stored["input"] if "valueIdentifier" in i)
        opened_pairs.append((actor, stored["for"]["reference"].split("/")[1]))
    out = {"pairs": len(rows), "legitimate pairs": len(legit), "opened": len(opened_pairs), "kinds": {}}
    print(f"{'kind':<12} {'pairs':>5} {'AUC':>6} {'cases':>6}  signals of its pairs")
    for kind in KINDS:
        pos = [rows[k]["score"] for k, v in pop.truth.items() if v == kind and k in rows]
        auc = roc_auc_score([1] * len(pos) + [0] * len(legit), pos + legit) if pos and legit else float("nan")
        cases = sum(1 for k in opened_pairs if pop.truth.get(k) == kind)
        sig = {}
        for k, v in pop.truth.items():
            if v == kind and k in rows:
                for s in rows[k]["signals"]:
                    sig[s] = sig.get(s, 0) + 1
        print(f"{kind:<12} {len(pos):>5} {auc:>6.3f} {cases:>6}  {sig}")
        out["kinds"][kind] = {"pairs": len(pos), "auc": round(auc, 4), "cases": cases}
    worst = sorted(((r["score"], r["signals"], r["accesses"]) for k, r in rows.items() if k not in pop.truth),
                   key=lambda x: -x[0])[:5]
    print(f"highest legitimate pairs: {worst}")
    hits = sum(1 for k in opened_pairs if k in pop.truth)
    precision = hits / len(opened_pairs) if opened_pairs else float("nan")
    print(f"cases opened within the budget ({budget}): {len(opened_pairs)}, of which misuse {hits}: "
          f"precision {precision:.2f}")
    out["precision"] = round(precision, 3)
    return out


def grow_journal(storage, total: int, rng: random.Random, since, span: timedelta, n_ps: int = 2000, *,
                 legacy: bool = False) -> int:
    """Copies of the population's events until the journal holds ``total``: each copy with a new id,
    one of ``n_ps`` professionals, one of the population's DMPs, a time in ``[since, since + span)``;
    stored 5,000 at a time (``_common.seal_entries``: in runs, ``legacy``: as ``AuditEvent``
    documents; each copy's JSON made from its template's by replacing three strings)."""
    db = storage.db
    have = c.journal_size(db)
    templates = []
    for d in c.journal_entries(db, {"res": 1, "pid": 1, "s": 1, "o": 1}):
        if d.get("pid") is None:
            continue
        res = unpack(d["res"])
        who = (res["agent"][0].get("who") or {}).get("identifier") or {}
        if who.get("system") != IDNATPS_SYSTEM:
            continue
        text = json.dumps(res).replace(res["id"], "@EID@").replace(who["value"], "@PS@").replace(d["pid"], "@PID@")
        templates.append((text, d.get("s") or {}, d.get("o") or {}))
    pids = list(db["Patient"].distinct("_id"))
    ps_ids = [f"8200{i:08d}" for i in range(n_ps)]
    added, batch = 0, []
    while have + added < total:
        text, s, o = rng.choice(templates)
        eid, pid = uuid.uuid4().hex, rng.choice(pids)
        raw = text.replace("@EID@", eid).replace("@PS@", rng.choice(ps_ids)).replace("@PID@", pid)
        lu = since + timedelta(seconds=rng.random() * span.total_seconds())
        batch.append({"_id": eid, "pid": pid, "vid": 1, "lu": lu, "del": False, "res": pack(raw.encode()),
                      "s": s, "o": o})
        added += 1
        if len(batch) == 5000:
            c.seal_entries(storage, batch, legacy=legacy)
            batch = []
            if added % 100_000 == 0:
                print(f"  ... {have + added} AuditEvents", flush=True)
    c.seal_entries(storage, batch, legacy=legacy)
    return have + added


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=240)
    ap.add_argument("--ps", type=int, default=48)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--events", type=int, default=0, help="then grow the journal to this many AuditEvents and "
                                                           "time the scan over it")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the large journal's scan")
    ap.add_argument("--trace-memory", action="store_true",
                    help="also trace the large journal's scan memory (a second run under tracemalloc)")
    ap.add_argument("--quick", action="store_true", help="a small population (60 patients, 24 professionals)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument("--legacy", action="store_true", help="--events: grow the journal as AuditEvent documents, "
                                                          "one per entry (the layout before the runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.patients, args.ps = 60, 24
    rng = random.Random(args.seed)
    figures: dict = {"args": vars(args) | {"json": str(args.json)}}
    with c.environment(audit_sealer=False, privacy_scan=False) as env:
        http = Http(env)
        pop = Population(http, rng, args.ps, args.patients)
        start = now() - timedelta(seconds=1)
        t0 = time.perf_counter()
        pop.directory(Path(env.config.data_dir))
        pop.legitimate()
        pop.misuse()
        built = time.perf_counter() - t0
        sealed = c.seal_pages(env)
        events = c.journal_size(env.db)
        print(f"population: {args.ps} professionals, {len(pop.patients)} patients, {http.requests} requests "
              f"through the API in {built:.0f} s; {events} AuditEvents ({sealed} sealed into "
              f"{env.db[JOURNAL_LINKS].estimated_document_count()} runs); {len(pop.truth)} injected pairs")
        until = now() + timedelta(seconds=1)
        result, seconds, peak = measure(env.storage, start, until, args.budget, keep_rows=True)
        print(f"scan: {result.events} accesses, {result.pairs} pairs in {seconds:.2f} s, CPU {result.cpu:.2f} s "
              f"(cases opened included), "
              f"peak traced memory {peak / 2**20:.1f} MiB")
        figures["population"] = {"requests": http.requests, "events": events, "seconds": round(built, 1)}
        figures["scan"] = {"seconds": round(seconds, 2), "cpu": round(result.cpu, 2), "pairs": result.pairs, "peak_mib": round(peak / 2**20, 1)}
        figures["quality"] = report(pop, result, args.budget)
        if args.events:
            c.services(env.app).stop()    # the change stream would read every copy inserted below
            t0 = time.perf_counter()
            total = grow_journal(env.storage, args.events, rng, start - timedelta(days=7), timedelta(days=7),
                                 legacy=args.legacy)
            print(f"journal grown to {total} AuditEvents ({'AuditEvent documents' if args.legacy else 'in runs'}: "
                  f"{env.db[JOURNAL_LINKS].estimated_document_count()} runs) in {time.perf_counter() - t0:.0f} s")
            if args.profile:
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                run_scan(env.storage, since=start - timedelta(days=8), until=until)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            large, timed, peak = measure(env.storage, start - timedelta(days=8), until, memory=args.trace_memory)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"scan of {total} AuditEvents: {large.events} accesses, {large.pairs} pairs in {timed:.0f} s, "
                  f"CPU {large.cpu:.0f} s ({large.events / large.cpu:.0f} accesses per CPU second); "
                  f"process peak RSS {rss / 1024:.0f} MiB"
                  + (f", peak traced memory {peak / 2**20:.0f} MiB" if peak is not None else ""))
            figures["large"] = {"events": total, "seconds": round(timed, 1), "cpu": round(large.cpu, 1),
                                "pairs": large.pairs, "rss_mib": round(rss / 1024),
                                "peak_mib": round(peak / 2**20) if peak is not None else None}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
