"""Fixtures of the decision's property tests (``test_access_property.py``, ``test_explain_property.py``)."""
from __future__ import annotations

import uuid

import pytest

from fhir_dmp.runtime.config import Config
from fhir_dmp.runtime.services import build_services

@pytest.fixture(scope="module")
def backend(mongo_server, mongo_client, tmp_path_factory):
    """The services of a process on a database of this module's own (the worlds accumulate)."""
    name = f"t_prop_{uuid.uuid4().hex[:8]}"
    cfg = Config(mongodb_uri=mongo_server.uri, db_name=name, data_dir=tmp_path_factory.mktemp("prop"),
                 base_url="https://dmp.test/fhir", notifications_worker=False, issuer="https://idp.test",
                 jwks_file=tmp_path_factory.mktemp("jwks") / "jwks.json")
    yield build_services(cfg, mongo_client, mongo_client[name])
    mongo_client.drop_database(name)
