"""Shared helpers for the in-process benchmarks (``bench/access.py``, ``bench/audit.py``).

Nothing is mocked: a real SecantusDB child process (``EmbeddedMongo``), the
real application (``create_app``), real signed tokens from ``tests/idp.py``
and resources from ``tests/builders.py``. Benchmarks are run by hand
(``python bench/<name>.py``), never by the test suite.

Contract:

* :func:`environment` — context manager yielding an :class:`Env` (database
  server, app, backend, IdP, config) in a throw-away directory; stops the
  database on exit.
* :func:`principal` — a verified Principal for a token (through the app's
  real ``TokenVerifier``).
* :func:`seed_dmp` — one DMP opened by a PS through the guarded repository
  (so its Consent, audit and shapes are the real ones), then ``n``
  DocumentReferences cloned from one really deposited document and inserted
  in bulk with the exact documents ``Storage.create`` writes
  (``Storage.stamp`` + ``Storage.current_doc``, i.e. ``search.extract``).
* :func:`seal_entries` — journal entries stored as the sealer stores them: per DMP (chain), in
  runs of at most :data:`RUN_ENTRIES` with their metadata (``Storage.seal_pages``, heads moved), or, with
  ``legacy``, one ``AuditEvent`` document each as the versions before the runs did;
  :func:`journal_entries` / :func:`journal_size` — the journal's entries and their number, in
  every layout (pages, runs, ``AuditEvent`` documents); :func:`seal_pages` — the real sealer's
  passes over the unsealed pages.
* :func:`stats` / :func:`fmt_ms` — median, p95, mean of a list of seconds.
* :func:`sizes_of` — a ``--sizes``-like option, shortened by ``--quick``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout: `python bench/x.py`

import pymongo  # noqa: E402

from fhir_dmp.audit.chain import GENESIS, SYSTEM_CHAIN, link_hash  # noqa: E402
from fhir_dmp.audit.sealer import Sealer  # noqa: E402
from fhir_dmp.runtime.config import Config  # noqa: E402
from fhir_dmp.runtime.embedded_db import EmbeddedMongo  # noqa: E402
from fhir_dmp.guard.journal import RequestInfo  # noqa: E402
from fhir_dmp.guard.repository import GuardedRepository  # noqa: E402
from fhir_dmp.runtime.services import services  # noqa: E402
from fhir_dmp.storage import new_id, now  # noqa: E402
from fhir_dmp.storage.core import JOURNAL, JOURNAL_HEADS, JOURNAL_LINKS, JOURNAL_PAGES  # noqa: E402
from fhir_dmp.storage.runs import unpacked_entry  # noqa: E402
from tests import builders  # noqa: E402
from tests.idp import TestIdP  # noqa: E402

BASE = "https://dmp.bench/fhir"
DOC_TYPES = (builders.CONSULTATION, builders.DISCHARGE, builders.LAB, builders.IMAGING,
             builders.PRESCRIPTION)


@dataclass
class Env:
    server: EmbeddedMongo
    client: pymongo.MongoClient
    db: object
    config: Config
    idp: TestIdP
    app: object

    @property
    def backend(self):
        return services(self.app)

    @property
    def storage(self):
        return self.backend.storage

    @functools.cached_property
    def sealer(self) -> Sealer:
        """The real sealer, run by hand (:func:`seal_pages`): one per environment, holding the lease."""
        return Sealer(self.storage, self.config.audit_key_path)

    def repo(self, token: str) -> GuardedRepository:
        """A GuardedRepository for one request of the token's principal."""
        return GuardedRepository(self.backend, principal(self, token), RequestInfo(request_id=uuid.uuid4().hex))


@contextlib.contextmanager
def environment(tmp: Path | None = None, **settings):
    """Start SecantusDB + the app in ``tmp`` (a fresh temp dir by default); ``settings`` override
    the :class:`Config` defaults."""
    with contextlib.ExitStack() as stack:
        if tmp is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fhir-dmp-bench-")))
        server = EmbeddedMongo(tmp / "secantus")
        server.start()
        stack.callback(server.stop)
        client = pymongo.MongoClient(server.uri, tz_aware=True)
        stack.callback(client.close)
        db = client["bench"]
        idp = TestIdP(tmp / "idp", audience=BASE)
        config = Config(mongodb_uri=server.uri, db_name=db.name, data_dir=tmp / "data", base_url=BASE,
                        **{"notifications_worker": False, **idp.config_kwargs(), **settings})
        from fhir_dmp.http.app import create_app
        from fhir_dmp.runtime.services import stop_background
        app = create_app(config, client=client, db=db)
        stack.callback(stop_background, app)
        yield Env(server, client, db, config, idp, app)


def principal(env: Env, token: str):
    verifier = services(env.app).verifier
    return verifier.authenticate(f"Bearer {token}", {})


def seed_dmp(env: Env, n_docs: int, *, ps: str = builders.PS_DR, author: str = builders.PS_OTHER,
             gp: str | None = None) -> tuple[str, list[str]]:
    """Open a DMP as PS ``ps`` (authorized as its creator) and give it ``n_docs`` documents.

    The first document is deposited through the guarded repository (author
    forced to ``ps`` by the server); the clones carry ``author`` (another
    médecin, so the reader's visibility comes from the consent and the
    habilitation matrix, not from authorship) and cycle through
    :data:`DOC_TYPES`. Returns (patient id, document ids).
    """
    repo = env.repo(env.idp.ps(ps, profession="10"))
    pat = repo.create("Patient", builders.patient())
    repo.flush_audit()
    pid = pat.id
    if gp:   # the patient names the médecin traitant (a PS never sets it)
        repo = env.repo(env.idp.patient(pid))
        repo.update("Patient", pid, builders.patient(gp=gp, ins=pat.resource["identifier"][0]["value"]) | {"id": pid})
        repo.flush_audit()
    repo = env.repo(env.idp.ps(ps, profession="10"))
    first = repo.create("DocumentReference", builders.docref(pid, content=builders.pdf_bytes("bench")))
    repo.flush_audit()
    template = copy.deepcopy(first.resource)
    template.pop("meta", None)
    template["author"] = [{"identifier": {"system": builders.IDNATPS, "value": author}}]
    storage = env.storage
    ids, current = [], []
    for i in range(n_docs - 1):
        res = copy.deepcopy(template)
        res["type"] = {"coding": [{"system": builders.LOINC, "code": DOC_TYPES[i % len(DOC_TYPES)]}]}
        rid, lu = new_id(), now()
        res = storage.stamp(res, rid, 1, lu)
        current.append(storage.current_doc("DocumentReference", rid, 1, pid, res, False, lu))
        ids.append(rid)
    for i in range(0, len(current), 500):
        storage.db["DocumentReference"].insert_many(current[i:i + 500], ordered=False)
    return pid, [first.id] + ids


#: entries per run written by :func:`seal_entries` (the sealer's default batch)
RUN_ENTRIES = 500


def seal_entries(storage, entries: list[dict], *, legacy: bool = False, per_run: int = RUN_ENTRIES) -> None:
    """Store journal ``entries`` (the common layout ``_id, pid, vid, lu, del, res (packed), s, o``)
    as the sealer stores them (audit/sealer.py, storage/runs.py): grouped per chain (the DMP,
    ``_system`` for no patient), in append order, runs of at most ``per_run`` entries, each run
    stored by ``Storage.seal_pages`` (with its metadata document, no page deleted, no transaction) from
    ``({pid, first, prev, links}, entries)`` with ``first`` counting on from the
    chain's head and the head moved past it (so that a real sealing pass afterwards continues the
    chain). The links' hashes chain SHA-256 digests of the packed entries, not of the canonical
    JSON: plausible, not verifiable (no bench runs ``audit verify``).

    ``legacy``: one ``AuditEvent`` document per entry, as the versions before the runs wrote
    them (no link, no head), to compare both layouts."""
    if not entries:
        return
    if legacy:
        storage.db[JOURNAL].insert_many(entries, ordered=True)
        return
    chains: dict[str, list[dict]] = {}
    for e in entries:
        chains.setdefault(e["pid"] or SYSTEM_CHAIN, []).append(e)
    heads = storage.heads_of(list(chains))
    runs = []
    for pid, mine in chains.items():
        seq, prev = heads.get(pid, (0, GENESIS))
        for i in range(0, len(mine), per_run):
            run = {"pid": pid, "first": seq + 1, "prev": prev, "links": []}
            for e in mine[i:i + per_run]:
                prev = link_hash(prev, hashlib.sha256(e["res"]).hexdigest())
                run["links"].append([e["_id"], prev])
            runs.append((run, mine[i:i + per_run]))
            seq += len(run["links"])
        heads[pid] = (seq, prev)
    storage.seal_pages(runs, [], session=None)
    storage.move_heads(heads, now(), session=None)


def journal_entries(db, projection: dict | None = None):
    """Every entry of the journal, whatever its layout: the unsealed pages' events (``_id, pid, lu,
    res``: no search index, not derived yet), the runs' entries, the ``AuditEvent`` documents."""
    for page in db[JOURNAL_PAGES].find({}, {"events": 1}):
        yield from page["events"]
    for run in db[JOURNAL_LINKS].find({"e": {"$exists": True}}, {"e": 1}):
        yield from map(unpacked_entry, run["e"])
    yield from db[JOURNAL].find({}, projection)


def journal_size(db) -> int:
    """The number of entries in the journal, in every layout (:func:`journal_entries`): the pages'
    events, the sealed ones (the chains' heads: every entry of a run is linked, and counting the
    runs' own ``ids`` would have the database read every run whole) and the ``AuditEvent``
    documents (not linked by :func:`seal_entries`; a database of no earlier version)."""
    pages = sum(len(p["events"]) for p in db[JOURNAL_PAGES].find({}, {"events._id": 1}))
    sealed = sum(h["seq"] for h in db[JOURNAL_HEADS].find({}, {"seq": 1}))
    return pages + sealed + db[JOURNAL].estimated_document_count()


def seal_pages(env) -> int:
    """Seal every unsealed page with the real sealer (a bench runs with the sealer thread off); the
    events sealed. The lease is given back at once: while a sealer holds it, the group committers
    throttle the journal's writes when a page waits (``storage.sealing_lag``), and none is running."""
    try:
        return env.sealer.seal_all()
    finally:
        env.sealer.release()


def sizes_of(ap, args, name: str, repeat_cap: int, quick_sizes: str) -> list[int]:
    """The comma-separated sizes of option ``name``; with ``--quick``: at most ``repeat_cap``
    runs, and ``quick_sizes`` unless sizes were given."""
    if args.quick:
        args.repeat = min(args.repeat, repeat_cap)
        if getattr(args, name) == ap.get_default(name):
            setattr(args, name, quick_sizes)
    return [int(x) for x in getattr(args, name).split(",")]


def timed(fn, repeat: int, warmup: int = 2) -> list[float]:
    """Wall times (s) of ``repeat`` calls of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def stats(values: list[float]) -> dict:
    """median / p95 / mean in milliseconds."""
    return {"p50": statistics.median(values) * 1e3, "p95": percentile(values, 95) * 1e3,
            "mean": statistics.fmean(values) * 1e3, "n": len(values)}


def fmt_ms(s: dict) -> str:
    return f"p50 {s['p50']:8.2f} ms  p95 {s['p95']:8.2f} ms  (n={s['n']})"
