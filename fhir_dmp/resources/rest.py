"""FHIR REST interactions for the hosted types (https://hl7.org/fhir/R4/http.html).

Each handler parses, validates, calls the request's guarded repository
(``g.repo``) and serializes. No policy, no storage access here.
"""
from __future__ import annotations

import base64
import json
from datetime import datetime

from flask import Blueprint, Response, g, request, stream_with_context

from ..http.errors import (BadRequest, Issue, MethodNotAllowed, NotFound, PayloadTooLarge,
                           UnsupportedMediaType, operation_outcome)
from ..profiles import validate
from ..guard.reads import HOSTED
from ..search import decode_history_cursor, encode_history_cursor
from ..runtime.services import services
from ..security.decision import DIRECTORY, SERVER_WRITTEN
from ..security.decision.basis import basis_coding, basis_french
from .http import (bundle, empty_response, full_url, ignored_entry, lenient, link, not_modified,
                   read_body, respond, summarize, version_headers, write_response)

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

#: written by the server only, or imported by ``fhir-dmp load`` (the directory): 405 with ``Allow``
READ_ONLY = SERVER_WRITTEN + DIRECTORY
PATCHABLE = ("DocumentReference", "Patient", "Consent", "RelatedPerson", "Task")
NOT_CONDITIONAL = ("Binary",)   # not searchable by its readers: conditional writes could not match
NOT_UPDATABLE = ("Binary",)     # content never changes in place: a new document replaces the old one
#: review cases (CONTRACT.md "Privacy operations"): the server opens them, the privacy officer takes and
#: closes them (PUT or PATCH of the instance), nobody creates or deletes one: 405 with ``Allow``
UPDATE_ONLY = ("Task",)
CONTROL = {"_format", "_pretty", "_cursor"}


def hosted(rtype: str) -> str:
    if rtype not in HOSTED:
        raise NotFound(f"resource type {rtype!r} is not supported by this server", code="not-supported")
    return rtype


def allowed_methods(rtype: str, instance: bool) -> str:
    """The ``Allow`` header of a 405 (RFC 9110 §15.5.6) for a type or an instance URL."""
    if rtype in READ_ONLY or rtype in UPDATE_ONLY and not instance:
        return "GET, HEAD, OPTIONS"
    if rtype in UPDATE_ONLY:
        return "GET, HEAD, PUT, PATCH, OPTIONS"
    put = "" if rtype in NOT_UPDATABLE else ", PUT"
    if instance:
        return f"GET, HEAD{put}, DELETE, OPTIONS" + (", PATCH" if rtype in PATCHABLE else "")
    return f"GET, HEAD, POST{put}, DELETE, OPTIONS"


def writable(rtype: str, instance: bool = False, *, change: bool = False) -> str:
    """405 unless ``rtype`` takes this write: none for the read-only types; for the update-only ones
    only a ``change`` (PUT or PATCH) of an ``instance``."""
    hosted(rtype)
    if rtype in READ_ONLY:
        raise MethodNotAllowed(f"{rtype} is read-only: the server writes it", code="not-supported",
                               headers={"Allow": allowed_methods(rtype, instance)})
    if rtype in UPDATE_ONLY and not (change and instance):
        raise MethodNotAllowed(f"{rtype} is opened by the server and never deleted: PUT or PATCH it",
                               code="not-supported", headers={"Allow": allowed_methods(rtype, instance)})
    return rtype


def updatable(rtype: str, instance: bool = True) -> str:
    """CONTRACT.md "REST behaviour": Binary content never changes in place; ``PUT Binary`` is a 405."""
    writable(rtype, instance, change=True)
    if rtype in NOT_UPDATABLE:
        raise MethodNotAllowed(f"{rtype} content never changes in place: deposit a new DocumentReference "
                               "whose relatesTo replaces the old one", code="not-supported",
                               headers={"Allow": allowed_methods(rtype, instance)})
    return rtype


def query_args() -> list[tuple[str, str]]:
    """Query (GET) or form (POST _search) parameters, in order, repeats kept."""
    args = list(request.args.items(multi=True))
    if request.method == "POST":
        ctype = (request.content_type or "").split(";")[0].strip()
        if ctype != "application/x-www-form-urlencoded" and request.get_data(cache=True):
            raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
        args += list(request.form.items(multi=True))
    return args


def checked(rtype: str, resource: dict) -> dict:
    return validate(resource, resource_type=rtype)


# -------------------------------------------------------------------- instance
@bp.get("/<rtype>/<rid>")
def read(rtype, rid):
    hosted(rtype)
    stored = g.repo.read(rtype, rid)      # the decision first: a denied or missing id is a 404
    if not_modified(stored):
        return empty_response(304, version_headers(stored))
    if rtype == "Binary" and _wants_raw(stored.resource):
        return _raw_binary(stored)
    if rtype == "Binary":
        stored.resource = _binary_with_data(stored)
    return respond(summarize(stored.resource, request.args.get("_summary"), _elements()), 200,
                   version_headers(stored))


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype, rid, vid):
    hosted(rtype)
    stored = g.repo.vread(rtype, rid, vid)
    if rtype == "Binary" and _wants_raw(stored.resource):
        return _raw_binary(stored)
    if rtype == "Binary":
        stored.resource = _binary_with_data(stored)
    return respond(stored.resource, 200, version_headers(stored))


@bp.put("/<rtype>/<rid>")
def update(rtype, rid):
    updatable(rtype)
    resource = read_body(rtype)
    if resource.get("id") != rid:
        raise BadRequest(f"the body's id {resource.get('id')!r} does not match the URL id {rid!r}",
                         expression=f"{rtype}.id")
    resource = checked(rtype, resource)
    stored, created = g.repo.update(rtype, rid, resource, if_match=request.headers.get("If-Match"))
    return write_response(stored, 201 if created else 200, location=created)


@bp.patch("/<rtype>/<rid>")
def patch(rtype, rid):
    writable(rtype, instance=True, change=True)
    if rtype not in PATCHABLE:
        raise MethodNotAllowed(f"PATCH is not supported on {rtype}",
                               headers={"Allow": allowed_methods(rtype, True)})
    ctype = (request.content_type or "").split(";")[0].strip()
    if ctype != "application/json-patch+json":
        raise UnsupportedMediaType("PATCH takes application/json-patch+json (RFC 6902)")
    try:
        ops = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the JSON Patch document is not valid JSON") from None
    if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
        raise BadRequest("a JSON Patch document is an array of operations")
    stored = g.repo.patch(rtype, rid, ops, if_match=request.headers.get("If-Match"),
                          validate=lambda r: checked(rtype, r))
    return write_response(stored, 200)


@bp.delete("/<rtype>/<rid>")
def delete(rtype, rid):
    writable(rtype, instance=True)
    g.repo.delete(rtype, rid)
    return respond(None, 204)


@bp.post("/Patient/<rid>/$destroy")
def destroy(rid):
    """Destroy a DMP (the patient or the administrator): all or nothing, then it never existed."""
    g.repo.destroy_dmp(rid)
    return respond(None, 204)


@bp.post("/Patient/<rid>/$access-code")
def access_code(rid):
    """A one-time code to the patient, for a PS's first access (FHIR_DMP_FIRST_ACCESS=patient-code)."""
    if services().config.first_access != "patient-code":
        raise BadRequest("first access is attested by the professional here (FHIR_DMP_FIRST_ACCESS="
                         "attestation): no access code is needed", code="not-supported")
    comms = g.repo.send_access_code(rid)
    sent = sorted({c["medium"][0]["coding"][-1]["code"] for c in comms if c.get("medium")})
    text = (f"a one-time code was sent to the patient ({', '.join(sent)})" if sent else
            "the patient has no email or phone on file: no code could be sent")
    return respond(operation_outcome([Issue(text, "informational", "information")]), 200)


@bp.get("/Patient/<rid>/$explain-access")
def explain_access(rid):
    """What a professional or an establishment would be allowed on this DMP now (CONTRACT.md
    "Privacy operations"): the patient, a representative, the administrator, the privacy officer."""
    answer, count = g.repo.explain_access(rid, request.args.get("actor"), profession=request.args.get("profession"),
                                          purpose=request.args.get("purpose"),
                                          query=request.query_string.decode("utf-8", "replace"))
    permitted = answer.decision.permit
    params = [{"name": "decision", "valueCode": "permit" if permitted else "deny"},
              {"name": "basis", "valueCoding": basis_coding(answer.basis)}]
    params += [{"name": "consent", "valueReference": {"reference": f"{ref}/_history/{vid}"}}
               for ref, vid in (answer.deciding.consents if answer.deciding else [])]
    documents = f"{count} document{'s' if count > 1 else ''} visible{'s' if count > 1 else ''}"
    params += [{"name": "documents", "valueInteger": count},
               {"name": "text", "valueString": f"{'Accès autorisé' if permitted else 'Accès refusé'} "
                                              f"({basis_french(answer.basis)}) : {documents}."}]
    return respond({"resourceType": "Parameters", "parameter": params}, 200)


@bp.get("/<rtype>/<rid>/_history")
def instance_history(rtype, rid):
    hosted(rtype)
    return _history(rtype, rid)


# ------------------------------------------------------------------------ type
@bp.get("/<rtype>/_history")
def type_history(rtype):
    hosted(rtype)
    return _history(rtype, None)


@bp.route("/<rtype>", methods=["GET"])
@bp.route("/<rtype>/_search", methods=["POST"])
def search_type(rtype):
    hosted(rtype)
    return _search(rtype, query_args())


@bp.post("/<rtype>")
def create(rtype):
    writable(rtype)
    if request.headers.get("If-None-Exist"):
        _conditional_supported(rtype, "create")
    if rtype == "Binary" and not _is_fhir_body():
        resource = {"resourceType": "Binary", "contentType": request.content_type or "application/octet-stream",
                    **_security_context()}
        stored = g.repo.create(rtype, resource, content=_raw_stream())
        return write_response(stored, 201, location=True)
    resource = checked(rtype, read_body(rtype))
    condition = request.headers.get("If-None-Exist")
    if condition:
        matches = g.repo.find_matches(rtype, _criteria(condition), "create")
        if matches:
            return write_response(matches[0], 200)
    resource.pop("id", None)
    stored = g.repo.create(rtype, resource)
    return write_response(stored, 201, location=True)


@bp.put("/<rtype>")
def conditional_update(rtype):
    updatable(rtype, instance=False)
    resource = checked(rtype, read_body(rtype))
    matches = _conditional_matches(rtype, "update")
    if not matches:
        resource.pop("id", None)
        return write_response(g.repo.create(rtype, resource), 201, location=True)
    target = matches[0]
    if resource.get("id") not in (None, target.id):
        raise BadRequest("the body's id does not match the resource found", expression=f"{rtype}.id")
    resource["id"] = target.id
    stored, _ = g.repo.update(rtype, target.id, resource, if_match=request.headers.get("If-Match"))
    return write_response(stored, 200)


@bp.delete("/<rtype>")
def conditional_delete(rtype):
    writable(rtype)
    for m in _conditional_matches(rtype, "delete"):
        g.repo.delete(rtype, m.id)
    return respond(None, 204)


# ------------------------------------------------------------------- internals
def _conditional_matches(rtype: str, what: str) -> list:
    """At most one visible match of the URL's criteria (https://hl7.org/fhir/R4/http.html#cond-update)."""
    _conditional_supported(rtype, what)
    criteria = [(k, v) for k, v in request.args.items(multi=True) if k not in CONTROL]
    if not criteria:
        raise BadRequest(f"conditional {what} needs search criteria")
    return g.repo.find_matches(rtype, criteria, what)


def _conditional_supported(rtype: str, what: str) -> None:
    if rtype in NOT_CONDITIONAL:
        raise BadRequest(f"conditional {what} is not supported on {rtype} (see the CapabilityStatement)",
                         code="not-supported")


def _criteria(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl
    query = query.split("?", 1)[-1]
    try:
        return parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BadRequest("If-None-Exist is not a valid query string") from None


def _elements() -> list[str] | None:
    raw = request.args.get("_elements")
    return [e.strip() for e in raw.split(",") if e.strip()] if raw else None


def _search(rtype: str, args: list[tuple[str, str]]):
    page = g.repo.search(rtype, args, lenient=lenient(), query_string=request.query_string.decode("latin-1"))
    req = page.request
    params = req.self_params()
    links = [("self", link(rtype, params))]
    if page.next_cursor:
        links.append(("next", link(rtype, params + [("_cursor", page.next_cursor)])))
    entries = []
    for stored in page.matches:
        entries.append({"fullUrl": full_url(stored),
                        "resource": summarize(stored.resource, req.summary, req.elements),
                        "search": {"mode": "match"}})
    for stored in page.included:
        entries.append({"fullUrl": full_url(stored), "resource": stored.resource, "search": {"mode": "include"}})
    result = bundle("searchset", entries, total=page.total, links=links)
    if req.ignored:
        result.setdefault("entry", []).append(ignored_entry(req.ignored))
    return respond(result)


@bp.get("/_history")
def system_history():
    return _history(None, None)


def _history(rtype: str | None, rid: str | None):
    """History at instance, type or system level (https://hl7.org/fhir/R4/http.html#history)."""
    cfg = services().config
    if "_at" in request.args:
        raise BadRequest("_at is not supported on history; use _since", expression="_at",
                         code="not-supported")
    count = _int_param("_count", cfg.default_page_size, cfg.max_page_size)
    since = _date_param("_since")
    raw_cursor = request.args.get("_cursor")
    cursor = decode_history_cursor(raw_cursor) if raw_cursor else None
    if rtype is None:
        page, nxt = g.repo.system_history(since=since, count=count, cursor=cursor)
        total = None
    else:
        page, nxt, total = g.repo.history(rtype, rid, since=since, count=count, cursor=cursor)
    params = [(k, v) for k, v in request.args.items(multi=True) if k != "_cursor"]
    path = f"{rtype}/{rid}/_history" if rid else f"{rtype}/_history" if rtype else "_history"
    links = [("self", link(path, params))]
    if nxt:
        links.append(("next", link(path, params + [("_cursor", encode_history_cursor(nxt))])))
    entries = []
    for v in page:
        entry = {"fullUrl": full_url(v)}
        if v.deleted:
            entry["request"] = {"method": "DELETE", "url": f"{v.resource_type}/{v.id}"}
            entry["response"] = {"status": "410 Gone"}
        else:
            if v.resource_type == "Binary":
                v.resource = _binary_with_data(v)
            entry["resource"] = v.resource
            entry["request"] = {"method": "POST" if v.vid == 1 else "PUT",
                                "url": v.resource_type if v.vid == 1 else f"{v.resource_type}/{v.id}"}
            entry["response"] = {"status": "201 Created" if v.vid == 1 else "200 OK",
                                 "etag": f'W/"{v.vid}"'}
        entries.append(entry)
    return respond(bundle("history", entries, total=total, links=links))


def _int_param(name: str, default: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer", expression=name)
    return min(int(raw), maximum)


def _date_param(name: str) -> datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an instant", expression=name) from None
    if value.tzinfo is None:
        raise BadRequest(f"{name} needs a time zone", expression=name)
    return value


# ---------------------------------------------------------------------- Binary
def _is_fhir_body() -> bool:
    """A Binary body is a FHIR resource only in a FHIR (or plain JSON) format; anything else is content."""
    ctype = (request.content_type or "").split(";")[0].strip().lower()
    return ctype.startswith("application/fhir+") or ctype == "application/json"


def _security_context() -> dict:
    ctx = request.headers.get("X-Security-Context")
    return {"securityContext": {"reference": ctx}} if ctx else {}


def _raw_stream():
    cfg = services().config
    if request.content_length and request.content_length > cfg.max_attachment_bytes:
        raise PayloadTooLarge(f"content larger than {cfg.max_attachment_bytes} bytes")
    return request.stream


def _wants_raw(binary: dict) -> bool:
    """Binary read: the raw bytes unless the client asks for a FHIR format (R4 Binary, 'Serving')."""
    if request.args.get("_format"):
        return False
    accept = request.headers.get("Accept", "")
    if "fhir" in accept or accept.strip() in ("application/json", "application/xml"):
        return False
    return True


def _raw_binary(stored) -> Response:
    content = g.repo.binary_content(stored)
    headers = version_headers(stored)
    headers["X-Content-Type-Options"] = "nosniff"
    return Response(stream_with_context(content), status=200,
                    content_type=stored.resource.get("contentType") or "application/octet-stream",
                    headers=headers)


def _binary_with_data(stored) -> dict:
    data = b"".join(g.repo.binary_content(stored))
    return {**stored.resource, "data": base64.b64encode(data).decode("ascii")}
