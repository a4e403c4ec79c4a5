"""Transaction and batch Bundles at the base (https://hl7.org/fhir/R4/http.html#transaction).

* transaction: all entries in one database transaction, ``urn:uuid``
  references rewritten to the ids the server assigns, processed in the
  order DELETE, POST, PUT/PATCH, GET; any failure rolls everything back.
* batch: entries independent, each with its own outcome.
* IHE MHD ITI-65 (Provide Document Bundle): a Binary referenced by a
  DocumentReference of the same Bundle is folded into that document's
  attachment, so content and metadata are stored atomically and the
  content is checked against the document (INS, type) before anything
  is written. A List (submission set) is acknowledged, not stored.

Every entry goes through the request's guarded repository.
"""
from __future__ import annotations

import copy
from urllib.parse import parse_qsl, urlsplit

from flask import Blueprint, g

from ..http.errors import (
    BadRequest,
    FhirError,
    MethodNotAllowed,
    NotFound,
)
from ..guard.journal import METHOD_INTERACTION
from ..storage import new_id
from .http import bundle, full_url, ignored_entry, lenient, read_body, respond, version_headers
from .rest import HOSTED, READ_ONLY, checked, updatable, writable

bp = Blueprint("fhir_bundles", __name__, url_prefix="/fhir")
ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
ACKNOWLEDGED = ("List",)   # MHD submission set


@bp.post("")
@bp.post("/")
def process_bundle():
    bundle = read_body("Bundle")
    btype = bundle.get("type")
    if btype not in ("transaction", "batch"):
        raise BadRequest("only transaction and batch Bundles are processed at the base",
                         expression="Bundle.type")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise BadRequest("every entry needs a request", expression=f"Bundle.entry[{i}].request")
        method = entry["request"].get("method")
        if method not in ORDER:
            raise BadRequest(f"unsupported method {method!r}", expression=f"Bundle.entry[{i}].request.method")
        if not entry["request"].get("url"):
            raise BadRequest("entry.request.url is required", expression=f"Bundle.entry[{i}].request.url")
    if btype == "transaction":
        return _transaction(entries)
    return _batch(entries)


def _transaction(entries: list[dict]):
    ids = _assign_ids(entries)
    originals = [e.get("fullUrl") for e in entries]
    entries = [_rewrite(copy.deepcopy(e), ids) for e in entries]
    for full, e in zip(originals, entries):
        if full in ids:
            e["resource"]["_assigned"] = ids[full]
    entries, folded = _fold_binaries(entries)
    order = sorted((i for i in range(len(entries)) if entries[i] is not None),
                   key=lambda i: ORDER[entries[i]["request"]["method"]])
    responses: dict[int, dict] = {}
    repo = g.repo

    def run(session):
        for i in order:
            try:
                responses[i] = _entry(entries[i], session, i)
            except FhirError as exc:
                exc.issues[0].diagnostics = f"entry {i}: {exc.issues[0].diagnostics}"
                raise
        return responses

    repo.transaction(run)
    out = []
    for i in range(len(entries)):
        if entries[i] is None:
            bid = folded[i]
            out.append({"response": {"status": "201 Created", "location": f"Binary/{bid}/_history/1"}})
        else:
            out.append(responses[i])
    return respond(bundle("transaction-response", out))


def _batch(entries: list[dict]):
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(g.repo.transaction(lambda s, e=entry, n=i: _entry(e, s, n)))
        except FhirError as exc:
            out.append({"response": {"status": f"{exc.status}", "outcome": exc.outcome()}})
    return respond(bundle("batch-response", out))


def _assign_ids(entries: list[dict]) -> dict[str, str]:
    """fullUrl (urn:uuid / urn:oid) of each POST entry -> the Type/id the server gives it."""
    ids = {}
    for entry in entries:
        res = entry.get("resource") or {}
        full = entry.get("fullUrl") or ""
        if entry["request"]["method"] == "POST" and full.startswith("urn:") and res.get("resourceType"):
            ids[full] = f"{res['resourceType']}/{new_id()}"
    return ids


def _rewrite(value, ids: dict[str, str]):
    """Replace every string equal to a bundle-local fullUrl by its Type/id (references, attachment urls)."""
    if isinstance(value, dict):
        return {k: _rewrite(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    if isinstance(value, str) and value in ids:
        return ids[value]
    return value


def _fold_binaries(entries: list[dict]) -> tuple[list, dict]:
    """ITI-65: move each Binary POSTed for a DocumentReference of the bundle into its attachment."""
    binaries = {}
    for i, e in enumerate(entries):
        res = e.get("resource") or {}
        if e["request"]["method"] == "POST" and res.get("resourceType") == "Binary":
            key = _target_of(e)
            if key:
                binaries[key] = i
    folded = {}
    for e in entries:
        if e is None:   # a Binary already folded into an earlier document
            continue
        res = e.get("resource") or {}
        if e["request"]["method"] != "POST" or res.get("resourceType") != "DocumentReference":
            continue
        for content in res.get("content") or []:
            att = content.get("attachment") or {}
            i = binaries.get(att.get("url"))
            if i is None or entries[i] is None:
                continue
            binary = entries[i]["resource"]
            att["data"] = binary.get("data", "")
            att.setdefault("contentType", binary.get("contentType"))
            folded[i] = att["url"].split("/")[-1]
            entries[i] = None
    return entries, folded


def _target_of(entry: dict) -> str | None:
    """The Type/id a POST entry will get (after the rewrite its fullUrl is still the urn)."""
    res = entry.get("resource") or {}
    return res.get("_assigned")


def _entry(entry: dict, session, index: int) -> dict:
    """One entry; a refusal of it is journaled in the DMP it names (issue 18)."""
    method, parts = entry["request"]["method"], urlsplit(entry["request"]["url"])
    path = [p for p in parts.path.split("/") if p]
    if path and path[0] == "fhir":
        path = path[1:]
    rtype, rid = (path + [None, None])[:2]
    with g.repo.refusals_named(METHOD_INTERACTION[method], rtype, rid, entry.get("resource")):
        return _process(entry, session, index, method, parts, path)


def _process(entry: dict, session, index: int, method: str, parts, path: list[str]) -> dict:
    req = entry["request"]
    if not path:
        raise BadRequest("entry.request.url must name a resource type", expression=f"Bundle.entry[{index}].request.url")
    rtype = path[0]
    if rtype in ACKNOWLEDGED and method == "POST":
        return {"response": {"status": "200 OK", "outcome": {
            "resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
                                                           "diagnostics": f"{rtype} acknowledged, not stored"}]}}}
    if rtype not in HOSTED:
        raise NotFound(f"resource type {rtype!r} is not supported", code="not-supported")
    repo = g.repo
    if method in ("GET", "HEAD"):
        if len(path) == 1:
            page = repo.search(rtype, parse_qsl(parts.query), lenient=lenient())
            found = [{"fullUrl": full_url(s), "resource": s.resource, "search": {"mode": "match"}}
                     for s in page.matches]
            if page.request.ignored:
                found.append(ignored_entry(page.request.ignored))
            return {"resource": bundle("searchset", found, total=page.total), "response": {"status": "200 OK"}}
        stored = repo.read(rtype, path[1])
        return _ok(stored, "200 OK")
    if rtype in READ_ONLY:
        raise MethodNotAllowed(f"{rtype} is read-only")
    if method in ("POST", "DELETE"):
        writable(rtype, instance=len(path) > 1)      # 405 for the update-only types too
    if method == "DELETE":
        if len(path) < 2:
            raise BadRequest("conditional delete is not supported in Bundles")
        repo.delete(rtype, path[1], session=session)
        return {"response": {"status": "204 No Content"}}
    resource = entry.get("resource")
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
        raise BadRequest("entry.resource must be a resource of the type in request.url",
                         expression=f"Bundle.entry[{index}].resource")
    resource = dict(resource)
    assigned = resource.pop("_assigned", None)
    resource = checked(rtype, resource)
    if method == "POST":
        if req.get("ifNoneExist"):
            matches = repo.find_matches(rtype, parse_qsl(req["ifNoneExist"].split("?", 1)[-1]), "create")
            if matches:
                return _ok(matches[0], "200 OK")
        resource.pop("id", None)
        rid = assigned.split("/")[-1] if assigned else None
        stored = repo.create(rtype, resource, session=session, rid=rid)
        return _ok(stored, "201 Created", location=True)
    if method == "PUT":
        if len(path) < 2:
            raise BadRequest("conditional update is not supported in Bundles")
        updatable(rtype)
        if resource.get("id") != path[1]:
            raise BadRequest("resource.id must match the request url", expression=f"Bundle.entry[{index}].resource.id")
        stored, created = repo.update(rtype, path[1], resource, if_match=req.get("ifMatch"), session=session)
        return _ok(stored, "201 Created" if created else "200 OK", location=created)
    raise MethodNotAllowed("PATCH in Bundles is not supported; use PUT")


def _ok(stored, status: str, location: bool = False) -> dict:
    headers = version_headers(stored, location=True)
    response = {"status": status, "etag": headers["ETag"],
                "lastModified": stored.resource["meta"]["lastUpdated"] if stored.resource else None}
    if location:
        response["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.vid}"
    return {"fullUrl": full_url(stored), "resource": stored.resource,
            "response": {k: v for k, v in response.items() if v is not None}}
