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
* :func:`stats` / :func:`fmt_ms` — median, p95, mean of a list of seconds.
* :func:`sizes_of` — a ``--sizes``-like option, shortened by ``--quick``.
"""
from __future__ import annotations

import contextlib
import copy
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

from fhir_dmp.runtime.config import Config  # noqa: E402
from fhir_dmp.runtime.embedded_db import EmbeddedMongo  # noqa: E402
from fhir_dmp.guard.journal import RequestInfo  # noqa: E402
from fhir_dmp.guard.repository import GuardedRepository  # noqa: E402
from fhir_dmp.runtime.services import services  # noqa: E402
from fhir_dmp.storage import new_id, now  # noqa: E402
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
