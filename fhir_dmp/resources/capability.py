"""``/metadata`` (CapabilityStatement) and ``/.well-known/smart-configuration``.

The CapabilityStatement is kept by hand in ``capability_statement.json`` at
the repository root; only the base URL, software version and date are filled
in here. ``tests/test_capability.py`` checks it against the routes and
search parameters the server really has.
Specs: https://hl7.org/fhir/R4/capabilitystatement.html,
https://hl7.org/fhir/smart-app-launch/conformance.html
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from flask import Blueprint, Response

from .http import backend, respond

bp = Blueprint("fhir_meta", __name__, url_prefix="/fhir")
STATEMENT_PATH = Path(__file__).resolve().parents[2] / "capability_statement.json"
SCOPES = ["openid", "fhirUser", "launch/patient", "patient/*.rs", "patient/*.cruds", "user/*.rs",
          "user/*.cruds", "user/*.read", "patient/*.read"]


@lru_cache(maxsize=1)
def _template() -> dict:
    return json.loads(STATEMENT_PATH.read_text(encoding="utf-8"))


def software_version() -> str:
    try:
        return version("fhir-dmp")
    except PackageNotFoundError:
        return "0+unknown"


def capability_statement(config) -> dict:
    cs = copy.deepcopy(_template())
    cs["implementation"] = {"description": "fhir_dmp — DMP FHIR server", "url": config.fhir_base}
    cs["software"]["version"] = software_version()
    for rest in cs.get("rest", []):
        for ext in rest.get("security", {}).get("extension", []):
            for sub in ext.get("extension", []):
                if sub.get("url") == "token":
                    sub["valueUri"] = f"{_issuer(config)}/token"
                if sub.get("url") == "authorize":
                    sub["valueUri"] = f"{_issuer(config)}/authorize"
    return cs


def _issuer(config) -> str:
    return (config.issuer or config.fhir_base).rstrip("/")


@bp.get("/metadata")
def metadata():
    return respond(capability_statement(backend().config))


@bp.get("/.well-known/smart-configuration")
def smart_configuration():
    config = backend().config
    issuer = _issuer(config)
    body = {
        "issuer": issuer,
        "jwks_uri": config.jwks_url or f"{issuer}/.well-known/jwks.json",
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "scopes_supported": SCOPES,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-standalone", "client-public", "client-confidential-asymmetric",
                         "sso-openid-connect", "context-standalone-patient", "permission-patient",
                         "permission-user", "permission-v1", "permission-v2"],
    }
    return Response(json.dumps(body), status=200, content_type="application/json")
