"""HTTP helpers shared by the handlers: negotiation, bodies, Prefer, headers, Bundles.

Thin on purpose: no policy and no storage here.
Spec: https://hl7.org/fhir/R4/http.html
"""
from __future__ import annotations

from urllib.parse import urlencode

from flask import Response, g, request

from ..http import formats
from ..http.errors import BadRequest, Issue, information_outcome, operation_outcome
from ..runtime.services import services
from ..storage import Stored, instant, new_id, now

MIME = {formats.JSON: "application/fhir+json; charset=utf-8; fhirVersion=4.0",
        formats.XML: "application/fhir+xml; charset=utf-8; fhirVersion=4.0"}


def out_format() -> str:
    """JSON or XML for the response (406 when nothing acceptable); cached per request."""
    fmt = getattr(g, "_fmt", None)
    if fmt is None:
        try:
            fmt = formats.negotiate(request.headers.get("Accept"), request.args.get("_format"))
        except Exception:
            g._fmt = formats.JSON      # the 406 itself is written in JSON
            raise
        g._fmt = fmt
    return fmt


def respond(resource: dict | None, status: int = 200, headers: dict | None = None, *,
            is_error: bool = False) -> Response:
    """Serialize in the negotiated format; an error body falls back to JSON when nothing fits."""
    try:
        fmt = out_format()
    except Exception:   # noqa: BLE001 — 406 for data; an error body must always go out
        if not is_error:
            raise
        fmt = formats.JSON
    pretty = request.args.get("_pretty") == "true"
    if resource is None:
        return empty_response(status, headers)
    body = formats.render(resource, fmt, pretty=pretty)
    response = Response(body, status=status, content_type=json_mime() if fmt == formats.JSON else MIME[fmt])
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def empty_response(status: int, headers: dict | None = None) -> Response:
    """A response without a body carries no Content-Type (204, 304, Prefer: return=minimal)."""
    response = Response(b"", status=status, headers=headers or {})
    response.headers.pop("Content-Type", None)
    return response


def json_mime() -> str:
    """``application/json`` for a client that asked for plain JSON and not for FHIR JSON, else
    ``application/fhir+json`` (https://hl7.org/fhir/R4/http.html#mime-type)."""
    if request.args.get("_format"):
        return MIME[formats.JSON]
    if formats.prefers_plain_json(request.headers.get("Accept")):
        return "application/json; charset=utf-8"
    return MIME[formats.JSON]


def read_body(expected_type: str | None = None) -> dict:
    """Parse and check the request body as a FHIR resource."""
    cfg = services().config
    body = request.get_data(cache=False)
    resource = formats.parse_body(request.headers.get("Content-Type"), body, max_bytes=cfg.max_body_bytes)
    if expected_type and resource.get("resourceType") != expected_type:
        raise BadRequest(f"resourceType {resource.get('resourceType')!r} does not match the URL ({expected_type})",
                         expression="resourceType")
    g.body = resource    # what a refused write names, for its journal entry (http/app.py)
    return resource


def prefer(name: str) -> str | None:
    """Value of one Prefer token (return=..., handling=...)."""
    for part in request.headers.get("Prefer", "").split(","):
        for item in part.split(";"):
            key, _, value = item.strip().partition("=")
            if key.strip() == name:
                return value.strip().strip('"')
    return None


def lenient() -> bool:
    """Unknown search parameters are ignored unless ``Prefer: handling=strict``
    (https://hl7.org/fhir/R4/search.html#errors)."""
    return prefer("handling") != "strict"


def ignored_entry(names: list[str]) -> dict:
    """The searchset entry (search mode ``outcome``) that reports ignored search parameters
    (https://hl7.org/fhir/R4/search.html#errors)."""
    return {"resource": operation_outcome([Issue(f"parameter {name[:60]!r} is not supported and was ignored",
                                                 "not-supported", "warning") for name in names]),
            "search": {"mode": "outcome"}}


def version_headers(stored: Stored, *, location: bool = False) -> dict:
    base = services().config.fhir_base
    headers = {"ETag": f'W/"{stored.vid}"', "Last-Modified": _http_date(stored.lu)}
    if location:
        headers["Location"] = f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.vid}"
    return headers


def not_modified(stored: Stored) -> bool:
    """Conditional read (https://hl7.org/fhir/R4/http.html#cread, RFC 9110 §13.1.2-3):
    ``If-None-Match`` (weak comparison) wins over ``If-Modified-Since``. Call it only after
    the read decision permitted."""
    etags = request.headers.get("If-None-Match")
    if etags is not None:
        wanted = {t.strip().removeprefix("W/").strip('"') for t in etags.split(",")}
        return "*" in wanted or str(stored.vid) in wanted
    since = request.if_modified_since
    if since is None:
        return False
    from datetime import timezone
    lu = stored.lu if stored.lu.tzinfo else stored.lu.replace(tzinfo=timezone.utc)
    return lu.replace(microsecond=0) <= since


def _http_date(t) -> str:
    from email.utils import format_datetime
    from datetime import timezone
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return format_datetime(t.astimezone(timezone.utc), usegmt=True)


def write_response(stored: Stored, status: int, *, location: bool = False) -> Response:
    """Answer a write honouring Prefer: return=minimal|representation|OperationOutcome."""
    headers = version_headers(stored, location=location)
    mode = prefer("return") or "representation"
    if mode == "minimal":
        return respond(None, status, headers)
    if mode == "OperationOutcome":
        return respond(information_outcome(f"{stored.resource_type}/{stored.id} version {stored.vid} stored"),
                       status, headers)
    return respond(stored.resource, status, headers)


def full_url(stored: Stored) -> str:
    return f"{services().config.fhir_base}/{stored.resource_type}/{stored.id}"


def link(rtype_path: str, params: list[tuple[str, str]]) -> str:
    base = services().config.fhir_base
    query = urlencode(params, safe="|:,/")
    return f"{base}/{rtype_path}" + (f"?{query}" if query else "")


def summarize(resource: dict, summary: str | None, elements: list[str] | None) -> dict:
    """Apply _summary / _elements (https://hl7.org/fhir/R4/search.html#summary)."""
    if not resource or (not elements and summary in (None, "false")):
        return resource
    keep = {"resourceType", "id", "meta"}
    if elements:
        keep |= set(elements)
    elif summary == "true":
        keep |= summary_elements(resource["resourceType"])
    elif summary == "text":
        keep |= {"text"}
    elif summary == "data":
        keep |= set(resource) - {"text"}
    out = {k: v for k, v in resource.items() if k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = list(meta.get("tag") or []) + [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}]
    out["meta"] = meta
    return out


_SUMMARY_CACHE: dict[str, set] = {}


def summary_elements(rtype: str) -> set[str]:
    """Elements flagged isSummary in the R4 definitions (from the fhir.resources R4B models)."""
    if rtype not in _SUMMARY_CACHE:
        from fhir.resources.R4B import get_fhir_model_class
        model = get_fhir_model_class(rtype)
        names = set()
        for name, f in model.model_fields.items():
            extra = f.json_schema_extra or {}
            if isinstance(extra, dict) and extra.get("summary_element_property"):
                names.add(f.alias or name)
        _SUMMARY_CACHE[rtype] = names
    return _SUMMARY_CACHE[rtype]


def bundle(bundle_type: str, entries: list[dict], *, total: int | None = None,
           links: list[tuple[str, str]] | None = None) -> dict:
    out = {"resourceType": "Bundle", "type": bundle_type, "id": new_id(),
           "meta": {"lastUpdated": instant(now())}}
    if total is not None:
        out["total"] = total
    if links:
        out["link"] = [{"relation": rel, "url": url} for rel, url in links]
    if entries:
        out["entry"] = entries
    return out
