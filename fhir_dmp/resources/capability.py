"""``/metadata`` (CapabilityStatement) and ``/.well-known/smart-configuration``.

The CapabilityStatement is kept by hand in ``capability_statement.json`` at
the repository root (the source of truth); ``fhir_dmp/data/capability_statement.json``
links to it, so an installed package or a wheel carries a copy (package data)
and serves ``/metadata`` without the checkout. Only the base URL, software
version and date are filled in here. ``tests/resources/test_capability.py`` checks it against the routes and
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

from ..http.errors import NotFound
from ..runtime.services import services
from ..security.devkeys import dev_public_key
from .http import respond

bp = Blueprint("fhir_meta", __name__, url_prefix="/fhir")
STATEMENT_PATH = Path(__file__).resolve().parents[1] / "data" / "capability_statement.json"
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
    endpoints = authorization_endpoints(config)
    for rest in cs.get("rest", []):
        security = rest.get("security", {})
        kept = []
        for ext in security.get("extension", []):
            if ext.get("url", "").endswith("/oauth-uris"):
                # http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris: only the
                # endpoints the issuer really has; none in dev mode
                subs = [{"url": name, "valueUri": endpoints[key]}
                        for name, key in (("authorize", "authorization_endpoint"), ("token", "token_endpoint"))
                        if endpoints.get(key)]
                if not subs:
                    continue
                ext = {**ext, "extension": subs}
            kept.append(ext)
        if kept:
            security["extension"] = kept
        else:
            security.pop("extension", None)
    return _without_empties(cs)


def _without_empties(value):
    """R4 JSON has no empty arrays or objects (https://hl7.org/fhir/R4/json.html): drop any that the
    hand-kept statement holds (``"searchRevInclude": []``)."""
    if isinstance(value, dict):
        out = {k: _without_empties(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ([], {})}
    if isinstance(value, list):
        return [v for v in (_without_empties(v) for v in value) if v not in ([], {})]
    return value


# What a SMART configuration copies from the issuer's discovery document
# (https://hl7.org/fhir/smart-app-launch/conformance.html#metadata)
ISSUER_FIELDS = ("authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint",
                 "introspection_endpoint", "management_endpoint", "grant_types_supported",
                 "token_endpoint_auth_methods_supported", "token_endpoint_auth_signing_alg_values_supported",
                 "code_challenge_methods_supported", "response_types_supported")
PERMISSIONS = ["permission-patient", "permission-user", "permission-v1", "permission-v2"]


def _launch_capabilities(body: dict) -> list[str]:
    """Launch and client capabilities, only where the issuer's endpoints make them possible."""
    if not body.get("authorization_endpoint") or not body.get("token_endpoint"):
        return []
    methods = body.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    out = ["launch-standalone", "context-standalone-patient", "client-public"]
    if {"client_secret_basic", "client_secret_post"} & set(methods):
        out.append("client-confidential-symmetric")
    if "private_key_jwt" in methods:
        out.append("client-confidential-asymmetric")
    if body.get("jwks_uri"):
        out.append("sso-openid-connect")
    return out


def authorization_endpoints(config) -> dict:
    """The issuer's endpoints from its discovery document (cached); ``{}`` in dev mode, where
    tokens come from ``fhir-dmp dev-token`` and the server has no authorization endpoint."""
    if config.dev_mode:
        return {}
    return services().issuer_metadata.document()


@bp.get("/metadata")
def metadata():
    return respond(capability_statement(services().config))


@bp.get("/.well-known/smart-configuration")
def smart_configuration():
    """SMART App Launch discovery: what is true of this deployment, nothing more."""
    config = services().config
    body = {"issuer": config.expected_issuer}      # the iss of the tokens this server accepts
    if config.dev_mode:
        body["jwks_uri"] = f"{config.fhir_base}/.well-known/jwks.json"
        body["scopes_supported"] = SCOPES
        body["capabilities"] = PERMISSIONS
    else:
        doc = authorization_endpoints(config)
        body.update({k: doc[k] for k in ISSUER_FIELDS if doc.get(k)})
        jwks = config.jwks_url or doc.get("jwks_uri")
        if jwks:
            body["jwks_uri"] = jwks
        body["scopes_supported"] = SCOPES
        body["capabilities"] = _launch_capabilities(body) + PERMISSIONS
    return Response(json.dumps(body), status=200, content_type="application/json")


@bp.get("/.well-known/jwks.json")
def dev_jwks():
    """Dev mode only: the public key that signs ``fhir-dmp dev-token`` tokens (RFC 7517)."""
    config = services().config
    if not config.dev_mode:
        raise NotFound("no such endpoint: /fhir/.well-known/jwks.json")
    return Response(json.dumps({"keys": [dev_public_key(config).as_dict(private=False)]}), status=200,
                    content_type="application/jwk-set+json")
