"""Shared fixtures: one real SecantusDB per session, a database per test, a real IdP.

Nothing is mocked: the server under test talks MongoDB wire protocol to the
embedded SecantusDB child process and checks RS256/ES256 tokens against the
JWKS file written by ``tests/idp.py``.
"""
from __future__ import annotations

import uuid

import pymongo
import pytest

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.embedded_db import EmbeddedMongo
from tests import builders as b
from tests.api import Api
from tests.idp import TestIdP

BASE = "https://dmp.test/fhir"

# the SMTP sink and SMS webhook fixtures (smtp, sms) for notification tests; the portal's browser,
# live server and OIDC provider fixtures; real `fhir-dmp serve` processes and the CLI (serve_kit)
pytest_plugins = ["tests.transports", "tests.portal_kit", "tests.serve_kit"]


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    server = EmbeddedMongo(tmp_path_factory.mktemp("secantus"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_client(mongo_server):
    client = pymongo.MongoClient(mongo_server.uri, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client):
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@pytest.fixture
def db_storage(db):
    """The test database behind a Storage: the stores that take one (outbox, blobs, data keys)."""
    from fhir_dmp.storage import Storage
    return Storage(db.client, db)


@pytest.fixture(scope="session")
def idp(tmp_path_factory):
    return TestIdP(tmp_path_factory.mktemp("idp"), audience=BASE)


@pytest.fixture
def config(tmp_path, mongo_server, db, idp):
    return Config(mongodb_uri=mongo_server.uri, db_name=db.name, data_dir=tmp_path, base_url=BASE,
                  notifications_worker=False, audit_sealer=False, **idp.config_kwargs())


@pytest.fixture
def build_app(mongo_client, db):
    """``build_app(config)``: an app on this test's database; every app built is stopped at
    teardown (its change stream, sealer and worker threads must not outlive the database)."""
    from fhir_dmp.http.app import create_app
    from fhir_dmp.runtime.services import stop_background
    built = []

    def build(config):
        built.append(create_app(config, client=mongo_client, db=db))
        return built[-1]
    yield build
    for app in built:
        stop_background(app)


@pytest.fixture
def app(config, build_app):
    return build_app(config)


@pytest.fixture
def api(app, idp):
    return Api(app, idp)


@pytest.fixture
def dmp(api):
    """A DMP opened by PS_DR (authorized as creator) with one consultation note and one lab report.
    (tests/guard/test_lifecycle.py and tests/documents/test_documents_http.py have their own.)"""
    dr = api.as_ps(b.PS_DR)
    pat = dr.create(b.patient(email="claire@example.org"))
    pid = pat["id"]
    consult = dr.create(b.docref(pid, b.CONSULTATION))
    lab = dr.create(b.docref(pid, b.LAB))
    return {"pid": pid, "patient": pat, "consult": consult, "lab": lab}


@pytest.fixture
def live(config, mongo_client, db):
    """The app behind a real HTTP listener; its base URL is the listener's (links must point at it)."""
    import threading

    from werkzeug.serving import make_server

    from fhir_dmp.http.app import create_app
    holder = {}
    server = make_server("127.0.0.1", 0, lambda env, start: holder["app"](env, start), threaded=True)
    base = f"http://127.0.0.1:{server.server_port}/fhir"
    holder["app"] = create_app(config.with_(base_url=base), client=mongo_client, db=db)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()
