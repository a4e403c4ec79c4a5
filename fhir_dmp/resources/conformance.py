"""Conformance resources of ``ig/`` served read-only, and ``$validate`` for the hosted types.

* ``GET /fhir/{type}/{id}`` and ``GET /fhir/{type}?url=...`` for the
  StructureDefinition, SearchParameter, OperationDefinition, CodeSystem and
  ValueSet files in ``ig/``, so that every canonical the CapabilityStatement
  names resolves on this server (CONTRACT.md "REST behaviour"). No token needed:
  they describe the server, like ``/metadata``. Writes answer 405.
* ``POST /fhir/{type}/$validate`` (https://hl7.org/fhir/R4/resource-operation-validate.html):
  the body is the resource, or a Parameters with a ``resource`` parameter; the
  answer is 200 with an OperationOutcome listing the problems the server's own
  validation (:func:`fhir_dmp.profiles.validate`) finds. Nothing is stored or read.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, request

from ..http.errors import BadRequest, FhirError, MethodNotAllowed, not_found
from ..profiles import validate
from .http import bundle, ignored_entry, link, prefer, read_body, respond
from .rest import hosted

bp = Blueprint("fhir_conformance", __name__, url_prefix="/fhir")
# package data: fhir_dmp/data/ig links to the root ig/ (the source of truth) and a wheel carries the files
IG_DIR = Path(__file__).resolve().parents[1] / "data" / "ig"
TYPES = ("StructureDefinition", "SearchParameter", "OperationDefinition", "CodeSystem", "ValueSet")
SEARCH_PARAMS = ("url", "_id", "version")
READ_ONLY_ALLOW = "GET, HEAD, OPTIONS"


@lru_cache(maxsize=1)
def ig_resources() -> dict[tuple[str, str], dict]:
    """(type, id) -> resource, from the ``ig/`` files (read once)."""
    out = {}
    for path in sorted(IG_DIR.glob("*.json")):
        res = json.loads(path.read_text(encoding="utf-8"))
        if res.get("resourceType") in TYPES and res.get("id"):
            out[(res["resourceType"], res["id"])] = res
    return out


def is_public(method: str, path: str) -> bool:
    """Reads of conformance resources need no token."""
    parts = path.strip("/").split("/")
    return method in ("GET", "HEAD") and len(parts) in (2, 3) and parts[0] == "fhir" and parts[1] in TYPES


def _read(ctype: str, rid: str):
    res = ig_resources().get((ctype, rid))
    if res is None:
        raise not_found(ctype, rid)
    return respond(res)


def _search(ctype: str):
    wanted = {k: request.args.getlist(k) for k in SEARCH_PARAMS if k in request.args}
    ignored = [k for k in request.args if k not in SEARCH_PARAMS and not k.startswith("_")]
    if ignored and prefer("handling") == "strict":
        raise BadRequest(f"Unknown search parameter {ignored[0][:60]!r} for {ctype}", expression=ignored[0][:60])
    field_of = {"url": "url", "_id": "id", "version": "version"}
    found = []
    for (rtype, _rid), res in ig_resources().items():
        if rtype != ctype:
            continue
        if all(str(res.get(field_of[k])) in {v for val in values for v in val.split(",")}
               for k, values in wanted.items()):
            found.append(res)
    base = link(ctype, [])
    entries = [{"fullUrl": f"{base}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in found]
    if ignored:
        entries.append(ignored_entry(ignored))
    params = [(k, v) for k, values in wanted.items() for v in values]
    return respond(bundle("searchset", entries, total=len(found), links=[("self", link(ctype, params))]))


def _read_only(*_args, **_kwargs):
    raise MethodNotAllowed(f"{request.path.split('/')[2]} is read-only on this server",
                           headers={"Allow": READ_ONLY_ALLOW})


for _ctype in TYPES:
    bp.add_url_rule(f"/{_ctype}/<rid>", f"read_{_ctype}", lambda rid, c=_ctype: _read(c, rid), methods=["GET"])
    bp.add_url_rule(f"/{_ctype}", f"search_{_ctype}", lambda c=_ctype: _search(c), methods=["GET"])
    bp.add_url_rule(f"/{_ctype}/<rid>", f"write_{_ctype}", _read_only, methods=["PUT", "PATCH", "DELETE", "POST"])
    bp.add_url_rule(f"/{_ctype}", f"create_{_ctype}", _read_only, methods=["POST", "PUT", "DELETE"])


@bp.post("/<rtype>/$validate")
def validate_operation(rtype):
    """``$validate``: an OperationOutcome, 200 whether the resource is valid or not."""
    hosted(rtype)
    body = read_body()
    if body.get("resourceType") == "Parameters" and rtype != "Parameters":
        inner = [p.get("resource") for p in body.get("parameter") or []
                 if isinstance(p, dict) and p.get("name") == "resource"]
        if len(inner) != 1 or not isinstance(inner[0], dict):
            raise BadRequest("$validate takes the resource, or a Parameters with one 'resource' parameter",
                             expression="Parameters.parameter")
        body = inner[0]
    try:
        validate(body, resource_type=rtype)
    except FhirError as exc:
        return respond(exc.outcome())
    return respond({"resourceType": "OperationOutcome", "issue": [{
        "severity": "information", "code": "informational",
        "diagnostics": f"the {rtype} is valid for this server"}]})

