"""A SecantusDB of a test module's own, with fault injection (CONTRACT.md "Faults, failover and backups").

Fault injection (``replSetStepDown``, ``configureFailPoint failCommand``) needs SecantusDB started
with ``--enable-test-commands``: the session's server (tests/conftest.py) is shared by every test
and stays without them, so fault tests start one of their own (fixture ``faulty_db``, module
scope; import it into the test module) and a database per test on it.

:class:`FaultyDb` drives the faults the way the MongoDB drivers' own tests do
(https://github.com/mongodb/specifications/blob/master/source/transactions/tests/README.md,
``failCommand``): ``step_down(seconds)``, ``fail(commands, mode, **data)``, ``off()``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pymongo
import pytest

from fhir_dmp.http.app import create_app
from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.embedded_db import EXECUTABLE, EmbeddedDbError, EmbeddedMongo
from fhir_dmp.runtime.services import stop_background
from tests.builders import journal_entries
from tests.conftest import BASE

#: FHIR_DMP_DB_WAIT of the apps built on a faulty server (``faulty_app``)
DB_WAIT_S = 2
#: SecantusDB, stepped down, still takes a client bulkWrite (a transaction's inserts in one round
#: trip) and its commit, where MongoDB refuses them: :meth:`FaultyDb.step_down` makes it refuse
#: them as MongoDB would (NotWritablePrimary, transient in a transaction)
NOT_PRIMARY = 10107


@dataclass
class FaultyDb:
    """A running SecantusDB with test commands: its ``uri``, an ``admin`` client, its process."""

    uri: str
    admin: pymongo.MongoClient
    server: EmbeddedMongo

    def fail(self, commands: list[str], mode="alwaysOn", **data) -> None:
        """``configureFailPoint failCommand`` on ``commands``: ``mode`` is ``"alwaysOn"`` or
        ``{"times": n}``; ``data`` e.g. ``errorCode=11602``, ``closeConnection=True``,
        ``writeConcernError={"code": 64, "errmsg": ...}``, ``errorLabels=[...]``."""
        self.admin.admin.command({"configureFailPoint": "failCommand", "mode": mode,
                                  "data": {"failCommands": list(commands), **data}})

    def off(self) -> None:
        self.admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    def step_down(self, seconds: int) -> float:
        """Step the primary down for ``seconds`` (writes refused "not primary", reads served), as
        MongoDB would (see :data:`NOT_PRIMARY`); returns when it began (``time.monotonic``).
        :meth:`back` ends what this began."""
        self.admin.admin.command({"replSetStepDown": seconds, "force": True})
        began = time.monotonic()
        self.fail(["bulkWrite"], errorCode=NOT_PRIMARY, errorLabels=["TransientTransactionError"])
        return began

    def writable(self) -> bool:
        return bool(self.admin.admin.command("hello").get("isWritablePrimary"))

    def back(self, timeout: float) -> float:
        """Wait until the primary takes writes again, then lift every failpoint; returns when."""
        deadline = time.monotonic() + timeout
        while not self.writable():
            assert time.monotonic() < deadline, "the faulty server stayed stepped down"
            time.sleep(0.05)
        self.off()
        return time.monotonic()

    def counts(self, name: str) -> dict:
        """Documents per collection of database ``name`` (nothing half-written: compare before/after)."""
        db = self.admin[name]
        return {c: db[c].count_documents({}) for c in sorted(db.list_collection_names())}

    def log(self, n: int = 2000) -> str:
        return self.server.log_file.read_text(errors="replace")[-n:]


def start_faulty_db(home: Path) -> FaultyDb:
    """Start SecantusDB in ``home`` with test commands on (the process's own
    :class:`~fhir_dmp.runtime.embedded_db.EmbeddedMongo`) and wait until it answers."""
    server = EmbeddedMongo(home, test_commands=True)
    try:
        server.start()
    except EmbeddedDbError as exc:
        if "not found" in str(exc):
            pytest.skip(f"{EXECUTABLE} is not installed")
        raise
    return FaultyDb(server.uri, pymongo.MongoClient(server.uri, tz_aware=True, serverSelectionTimeoutMS=250),
                    server)


def stop_faulty_db(db: FaultyDb) -> None:
    db.admin.close()
    db.server.stop()


@pytest.fixture(scope="module")
def faulty_db(tmp_path_factory):
    """This module's own SecantusDB with test commands (:class:`FaultyDb`)."""
    server = start_faulty_db(tmp_path_factory.mktemp("faulty"))
    yield server
    stop_faulty_db(server)


@pytest.fixture
def faulty_name(faulty_db):
    """A fresh database name on ``faulty_db``; at teardown the server is writable again and every
    failpoint off. The database is not dropped: the server goes with the module, and a drop can
    wait for ever on a transaction a fault left open (SecantusDB ends it after 60 s idle)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    faulty_db.back(30)


@pytest.fixture
def faulty_app(faulty_db, faulty_name, tmp_path, idp):
    """``faulty_app(dev=False, **config)``: an app on ``faulty_db`` (``FHIR_DMP_DB_WAIT``
    :data:`DB_WAIT_S`, no sealer or outbox worker unless asked; trusting the test IdP, or in dev
    mode), opened as production opens it (``open_database``); at
    teardown the server is made writable again, then every app built is stopped, before the
    database is dropped (``stop_background``)."""
    apps = []

    def make(dev: bool = False, **options):
        settings = dict(notifications_worker=False, audit_sealer=False, db_wait=DB_WAIT_S,
                        **({} if dev else idp.config_kwargs()))
        settings.update(options)
        apps.append(create_app(Config(mongodb_uri=faulty_db.uri, db_name=faulty_name, data_dir=tmp_path,
                                      base_url=BASE, **settings)))
        return apps[-1]
    yield make
    faulty_db.back(60)
    for app in apps:
        stop_background(app)


def assert_transient(r, started: float, wait: float) -> None:
    """``r`` (a Flask test or ``requests`` response) is the 503 OperationOutcome ``transient``
    with ``Retry-After``, answered within ``wait`` (FHIR_DMP_DB_WAIT) and some slack of ``started``."""
    elapsed = time.monotonic() - started
    text = r.get_data(as_text=True) if hasattr(r, "get_data") else r.text
    assert r.status_code == 503, (r.status_code, text[:300])
    body = r.get_json() if hasattr(r, "get_json") else r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "transient"
    assert int(r.headers["Retry-After"]) > 0
    assert elapsed < wait + 2.5, f"answered after {elapsed:.1f}s, FHIR_DMP_DB_WAIT is {wait}s"


# -- the journal as stored, to find each answered request's AuditEvent ------------------------------

def journal(db) -> list[dict]:
    """Every AuditEvent of database ``db`` (a pymongo Database), unpacked, sealed or not."""
    return [e["res"] for e in journal_entries(db)]


def request_id(event: dict) -> str | None:
    """The X-Request-Id an event records (its BALP ``XrequestId`` entity), or None."""
    for ent in event.get("entity") or ():
        if (ent.get("type") or {}).get("code") == "XrequestId":
            return ent["what"]["identifier"]["value"]
    return None


def refs(event: dict) -> set[str]:
    """The references an event names (its patient, its resource)."""
    return {ent["what"]["reference"] for ent in event.get("entity") or () if "reference" in (ent.get("what") or {})}


def successes(events: list[dict], action: str, ref: str) -> list[dict]:
    """The successful (outcome 0) events of ``action`` (C, R, U, D, E) naming ``ref`` (or a
    version of it, ``ref/_history/n``)."""
    return [e for e in events if e.get("action") == action and e.get("outcome") == "0"
            and any(r == ref or r.startswith(f"{ref}/") for r in refs(e))]
