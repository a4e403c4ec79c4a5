"""FHIR wire formats: JSON and XML, content negotiation. Pure functions, no Flask.

Contract
--------
- :func:`negotiate` picks the response format (``JSON`` or ``XML``) from
  ``_format`` (wins) or ``Accept`` (q-values); nothing acceptable -> 406.
- :func:`parse_body` turns a request body (JSON or XML, charset honoured) into
  a FHIR JSON dict; 415 / 413 / 400 with a line/column diagnostic that never
  echoes body content.
- :func:`render` writes a FHIR JSON dict as JSON or XML bytes (UTF-8).
- :func:`to_xml` / :func:`from_xml` convert between the two representations;
  ``from_xml(to_xml(r)) == r`` for every valid resource, of any R4 type, and
  ``to_xml(from_xml(x)) == x`` for XML this module wrote. ``to_xml`` raises
  :class:`Unprocessable` (422, with the element's path) on input that is not
  a FHIR structure, ``from_xml`` raises :class:`BadRequest`.
- :func:`loads_json` / :func:`dumps_json`: the strict JSON reader and the
  Decimal-exact writer underneath (resource bodies; JSON Patch documents are
  parsed by the PATCH handler).

Decisions
---------
- Decimals: JSON is parsed with ``parse_float=decimal.Decimal`` so that the
  precision of a FHIR ``decimal`` survives (``1.50`` stays ``1.50``,
  https://hl7.org/fhir/R4/json.html#primitive). Numbers without a fraction
  or exponent stay ``int``, from JSON and from XML alike. Dicts handed out by this module may therefore hold
  ``decimal.Decimal``; :func:`render` writes them back digit for digit
  (storage needs a Decimal <-> Decimal128 codec).
- Type information (cardinality, primitive types, element order, choice
  types) comes from the fhir.resources R4B model classes' field metadata,
  read once per class and cached: no hand-kept table. The models themselves
  are not used to (de)serialize: their ``model_dump_xml`` does not round-trip.
- XHTML narrative (``Narrative.div``) is re-serialized in the HL7 tools' form
  (text escapes ``& < > "``, empty elements ``<br/>``, ``xmlns`` on the root
  ``div`` only) so HL7 examples round-trip byte for byte; comments and
  processing instructions in the narrative are dropped.
- XML reading is lenient on element *order* (FHIR XML prescribes one; we write
  it and accept any), strict on everything else: unknown elements, unexpected
  attributes, text outside ``value``, repeated singletons -> 400.
- Safety: lxml with ``resolve_entities=False, no_network=True,
  load_dtd=False, huge_tree=False``; any DOCTYPE is refused (no XXE, no
  billion laughs). JSON with duplicate keys, NaN/Infinity or characters that
  FHIR (and XML 1.0) cannot carry is refused.

Specs: https://hl7.org/fhir/R4/xml.html, https://hl7.org/fhir/R4/json.html,
https://hl7.org/fhir/R4/http.html#mime-type
"""
from __future__ import annotations

import codecs
import decimal
import functools
import json
import re
import secrets
import threading
import typing

import orjson
from lxml import etree
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header, parse_options_header

from fhir_dmp.http.errors import (BadRequest, NotAcceptable, PayloadTooLarge, Unprocessable,
                             UnsupportedMediaType)

__all__ = ["JSON", "XML", "FHIR_NS", "XHTML_NS", "negotiate", "parse_body", "render",
           "to_xml", "from_xml", "loads_json", "dumps_json", "media_format"]

JSON, XML = "application/fhir+json", "application/fhir+xml"
FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
_XML_NS = "http://www.w3.org/XML/1998/namespace"

# https://hl7.org/fhir/R4/http.html#mime-type : both the FHIR and the generic
# media types are accepted, as are the `_format` short forms.
_JSON_TYPES = ("application/fhir+json", "application/json")
_XML_TYPES = ("application/fhir+xml", "application/xml", "text/xml")
_FORMAT_ALIASES = {"json": JSON, "xml": XML,
                   **{t: JSON for t in _JSON_TYPES}, **{t: XML for t in _XML_TYPES}}
# Offered in this order: on equal quality and specificity the first wins, so
# the FHIR types before the generic ones, JSON before XML.
_OFFERED = ("application/fhir+json", "application/fhir+xml", "application/json",
            "application/xml", "text/xml")
# https://hl7.org/fhir/R4/http.html#version-parameter
_FHIR_VERSIONS = ("4.0", "4.0.1")


# --------------------------------------------------------------------------
# Content negotiation
# --------------------------------------------------------------------------

def media_format(media_type: str | None) -> str | None:
    """``JSON`` / ``XML`` for a media type or ``_format`` value (parameters
    allowed, ``fhirVersion`` must be 4.0), ``None`` when not a FHIR format."""
    if not media_type:
        return None
    mime, params = parse_options_header(media_type)
    version = params.get("fhirversion")
    if version is not None and version not in _FHIR_VERSIONS:
        return None
    return _FORMAT_ALIASES.get(mime.strip().lower())


def negotiate(accept: str | None, format_param: str | None) -> str:
    """Response format, ``JSON`` or ``XML``: :func:`_negotiate`, memoized for short headers (a
    client sends the same ``Accept`` on every request; a 406 is not memoized)."""
    if (accept is None or len(accept) <= _MEMO_MAX_LEN) and (format_param is None or len(format_param) <= _MEMO_MAX_LEN):
        return _negotiate_short(accept, format_param)
    return _negotiate(accept, format_param)


def _negotiate(accept: str | None, format_param: str | None) -> str:
    """Response format, ``JSON`` or ``XML``.

    ``_format`` wins over ``Accept`` (https://hl7.org/fhir/R4/http.html#parameters);
    an unsupported ``_format`` -> :class:`NotAcceptable`. ``Accept`` is read with
    q-values and wildcards (``*/*``, ``application/*``); ranges with a
    ``fhirVersion`` other than 4.0 do not match. Nothing acceptable -> 406.
    No ``Accept`` (or one that cannot be parsed at all) -> JSON. On equal
    quality and specificity: FHIR types before generic ones, JSON before XML.
    """
    if format_param is not None and format_param.strip():
        # In a query string '+' decodes to ' ': "application/fhir json".
        fmt = media_format(format_param.strip().replace(" ", "+"))
        if fmt is None:
            raise NotAcceptable("Unsupported _format: use json, xml, application/fhir+json "
                                "or application/fhir+xml (FHIR 4.0)")
        return fmt
    if accept is None or not accept.strip():
        return JSON
    parsed = parse_accept_header(accept, MIMEAccept)
    if not list(parsed):
        return JSON
    ranges = []
    for value, quality in parsed:
        mime, params = parse_options_header(value)
        version = params.get("fhirversion")
        if version is not None and version not in _FHIR_VERSIONS:
            continue
        ranges.append((mime.lower(), quality))
    best = MIMEAccept(ranges).best_match(_OFFERED)
    if best is None:
        raise NotAcceptable("None of the media types in Accept can be produced: use "
                            "application/fhir+json or application/fhir+xml (FHIR 4.0)")
    return _FORMAT_ALIASES[best]


def prefers_plain_json(accept: str | None) -> bool:
    """Does ``Accept`` rank ``application/json`` above ``application/fhir+json``, naming it
    (https://hl7.org/fhir/R4/http.html#mime-type)? Memoized for short headers, like
    :func:`negotiate`."""
    if accept is None or len(accept) <= _MEMO_MAX_LEN:
        return _prefers_plain_json_short(accept)
    return _prefers_plain_json(accept)


def _prefers_plain_json(accept: str | None) -> bool:
    ranges = parse_accept_header(accept, MIMEAccept)
    return ranges.quality("application/json") > ranges.quality("application/fhir+json") \
        and "application/json" in {value for value, _q in ranges}


_MEMO_MAX_LEN = 256
_negotiate_short = functools.lru_cache(maxsize=256)(_negotiate)
_prefers_plain_json_short = functools.lru_cache(maxsize=256)(_prefers_plain_json)


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------

# Characters no FHIR string may hold (https://hl7.org/fhir/R4/datatypes.html#string)
# and XML 1.0 cannot carry; lone surrogates cannot even be encoded as UTF-8.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,63}")


def _safe_name(name: str) -> str:
    """A key or element name, fit for a diagnostic (never arbitrary content)."""
    return name if _NAME_RE.fullmatch(name or "") else "(unprintable name)"


class _JsonContentError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _pairs_hook(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _JsonContentError(f"duplicate key '{_safe_name(key)}' in a JSON object")
        out[key] = value
        if value.__class__ is str:
            if _BAD_CHARS.search(value):
                raise _JsonContentError(f"property '{_safe_name(key)}' holds a control "
                                        "character or lone surrogate not allowed in FHIR")
        elif value.__class__ is list:
            for item in value:
                if item.__class__ is str and _BAD_CHARS.search(item):
                    raise _JsonContentError(f"property '{_safe_name(key)}' holds a control "
                                            "character or lone surrogate not allowed in FHIR")
    return out


def _reject_constant(name: str):
    raise _JsonContentError(f"{name} is not a valid JSON number")


def loads_json(body: bytes | str, charset: str | None = None) -> typing.Any:
    """Strict JSON decoding shared by the resource body parsers.

    Decimals as :class:`decimal.Decimal`; duplicate keys, NaN/Infinity,
    control characters and malformed input -> :class:`BadRequest` with
    line/column, never the content.
    """
    if isinstance(body, bytes):
        enc = (charset or "utf-8").lower()
        if codecs.lookup(enc).name == "utf-8":
            enc = "utf-8-sig"  # tolerate a BOM
        try:
            text = body.decode(enc)
        except UnicodeDecodeError as e:
            raise BadRequest(f"Body is not valid {charset or 'UTF-8'}: bad byte at offset "
                             f"{e.start}") from None
    else:
        text = body
    try:
        return json.loads(text, parse_float=decimal.Decimal, parse_constant=_reject_constant,
                          object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise BadRequest(f"Malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _JsonContentError as e:
        raise BadRequest(f"Invalid JSON: {e.message}") from None
    except RecursionError:
        raise BadRequest("Malformed JSON: nested too deeply") from None


def _decimal_fragment(o):
    """orjson's ``default``: a Decimal as its own digits (a JSON number, never a float)."""
    if isinstance(o, decimal.Decimal):
        if not o.is_finite():
            raise ValueError("NaN/Infinity cannot be written as a FHIR decimal")
        return orjson.Fragment(str(o))
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def dumps_json(obj: typing.Any, *, pretty: bool = False) -> bytes:
    """UTF-8 JSON; :class:`decimal.Decimal` written digit for digit.

    orjson does the work (about ten times the standard library's C encoder: bench/README.md,
    "JSON out"); a Decimal goes in as an
    ``orjson.Fragment`` of its digits. What orjson refuses (an integer beyond 64 bits, which
    ``json`` parses from a body) goes through :func:`_dumps_json_stdlib`, same output.
    """
    try:
        return orjson.dumps(obj, default=_decimal_fragment, option=orjson.OPT_INDENT_2 if pretty else 0)
    except orjson.JSONEncodeError as exc:
        if isinstance(exc.__cause__, ValueError):   # a NaN/Infinity Decimal: same error as before
            raise exc.__cause__ from None
        return _dumps_json_stdlib(obj, pretty=pretty)


def _dumps_json_stdlib(obj: typing.Any, *, pretty: bool) -> bytes:
    """:func:`dumps_json` with the standard library: each Decimal goes through a per-call random
    placeholder that is swapped for its digits afterwards (no content can forge a placeholder
    it cannot know in advance)."""
    decimals: list[str] = []
    token = None

    def default(o):
        nonlocal token
        if isinstance(o, decimal.Decimal):
            if not o.is_finite():
                raise ValueError("NaN/Infinity cannot be written as a FHIR decimal")
            if token is None:
                token = "\ue000" + secrets.token_hex(16) + ":"
            decimals.append(str(o))
            return f"{token}{len(decimals) - 1}"
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    if pretty:
        text = json.dumps(obj, ensure_ascii=False, indent=2, default=default)
    else:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=default)
    if token is not None:
        text = re.sub('"' + re.escape(token) + '([0-9]+)"',
                      lambda m: decimals[int(m.group(1))], text)
    return text.encode("utf-8")


# --------------------------------------------------------------------------
# Type information from the fhir.resources R4B models
# --------------------------------------------------------------------------

_PRIM, _COMPLEX, _RESOURCE, _XHTML = 0, 1, 2, 3
_INT_TYPES = frozenset({"integer", "unsignedInt", "positiveInt", "integer64"})


class _Elem(typing.NamedTuple):
    name: str
    is_list: bool
    kind: int
    prim: str | None  # FHIR primitive type code when kind == _PRIM
    cls: type | None  # model class when kind == _COMPLEX


class _TypeInfo:
    __slots__ = ("name", "is_resource", "is_extension", "elems", "index")

    def __init__(self, cls):
        from fhir_core.types import FhirBase
        from fhir_core.utils import (determine_version_prefix_from_class, get_fhir_type_name,
                                     is_list_type, is_primitive_type)
        prefix = determine_version_prefix_from_class(cls)
        self.name = cls.get_resource_type()
        self.is_resource = cls.has_resource_base()
        self.is_extension = self.name == "Extension"
        self.elems: dict[str, _Elem] = {}
        for field in cls.model_fields.values():
            if not (field.json_schema_extra or {}).get("element_property"):
                continue
            name, is_list = field.alias, is_list_type(field)
            if is_primitive_type(field):
                prim = get_fhir_type_name(field, prefix)
                kind = _XHTML if prim == "xhtml" else _PRIM
                self.elems[name] = _Elem(name, is_list, kind, prim, None)
                continue
            inner = _inner_type(field.annotation)
            if not (isinstance(inner, type) and issubclass(inner, FhirBase)):
                raise TypeError(f"{self.name}.{name}: unsupported model annotation")
            klass = inner.get_model_klass()
            if klass.has_resource_base():
                self.elems[name] = _Elem(name, is_list, _RESOURCE, None, None)
            else:
                self.elems[name] = _Elem(name, is_list, _COMPLEX, None, klass)
        order = [n for n in cls.elements_sequence() if n in self.elems]
        order += [n for n in self.elems if n not in order]
        self.index = {n: i for i, n in enumerate(order)}


def _inner_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation
    for arg in typing.get_args(annotation):
        if arg is not type(None):
            return _inner_type(arg)
    return None


_infos: dict[type, _TypeInfo] = {}
_resource_classes: dict[str, type | None] = {}
_info_lock = threading.Lock()


def _info(cls) -> _TypeInfo:
    info = _infos.get(cls)
    if info is None:
        with _info_lock:
            info = _infos.get(cls) or _TypeInfo(cls)
            _infos[cls] = info
    return info


def _resource_class(name: str):
    """Model class of a concrete resource type, or None."""
    try:
        return _resource_classes[name]
    except KeyError:
        pass
    cls = None
    if isinstance(name, str) and _NAME_RE.fullmatch(name) and name not in (
            "Resource", "DomainResource"):
        from fhir.resources.R4B import get_fhir_model_class
        try:
            candidate = get_fhir_model_class(name)
        except (ValueError, KeyError, ImportError):
            candidate = None
        if candidate is not None and candidate.has_resource_base():
            cls = candidate
    if len(_resource_classes) < 4096:  # bounded: names come from clients
        _resource_classes[name] = cls
    return cls


# --------------------------------------------------------------------------
# XML parsing (safe)
# --------------------------------------------------------------------------

_tls = threading.local()


def _parser(encoding: str | None = None) -> etree.XMLParser:
    """One safe parser per thread and encoding (lxml parsers are not thread-safe)."""
    cache = getattr(_tls, "parsers", None)
    if cache is None:
        cache = _tls.parsers = {}
    parser = cache.get(encoding)
    if parser is None:
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                 huge_tree=False, dtd_validation=False, remove_comments=True,
                                 remove_pis=True, encoding=encoding)
        cache[encoding] = parser
    return parser


def _syntax_message(err: etree.XMLSyntaxError) -> str:
    """Line/column and the libxml2 error *kind*; libxml2's text quotes names
    from the document, so it is not used."""
    kind = "not well-formed"
    entry = err.error_log.last_error if err.error_log else None
    if entry is not None and entry.type_name:
        kind = entry.type_name.removeprefix("ERR_").replace("_", " ").lower()
    line, column = err.position if err.position else (getattr(err, "lineno", 0), 0)
    return f"Malformed XML ({kind}) at line {line}, column {column}"


# https://hl7.org/fhir/R4/xml.html : FHIR XML has no DTD; a DOCTYPE is where XXE
# and entity-expansion attacks live, so none is accepted.
_DOCTYPE_REFUSED = "XML with a DOCTYPE declaration is not accepted"
_DOCTYPE_MARKS = tuple("<!DOCTYPE".encode(c) for c in ("utf-8", "utf-16-le", "utf-16-be"))


def _parse_xml(data: bytes, encoding: str | None = None) -> etree._Element:
    if not data or not data.strip():
        raise BadRequest("Malformed XML: empty document")
    try:
        root = etree.fromstring(data, _parser(encoding))
    except etree.XMLSyntaxError as e:
        if any(mark in data for mark in _DOCTYPE_MARKS):  # say why, not how it broke
            raise BadRequest(_DOCTYPE_REFUSED) from None
        raise BadRequest(_syntax_message(e)) from None
    except (ValueError, LookupError):
        raise BadRequest("Malformed XML: cannot be decoded") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise BadRequest(_DOCTYPE_REFUSED)
    return root


# --------------------------------------------------------------------------
# XML -> JSON
# --------------------------------------------------------------------------

_FHIR_PREFIX = "{" + FHIR_NS + "}"
_FP_LEN = len(_FHIR_PREFIX)
_XHTML_PREFIX = "{" + XHTML_NS + "}"
_XHTML_DIV = _XHTML_PREFIX + "div"
_DECIMAL_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INT_RE = re.compile(r"[-+]?[0-9]+")


def _el_path(el) -> str:
    """FHIRPath-like location of an element (``Bundle.entry[1].resource.name``),
    from its ancestors; nested resource type names are left out, as in FHIRPath."""
    parts: list[str] = []
    node = el
    while node is not None:
        tag = node.tag if isinstance(node.tag, str) else "?"
        local = _safe_name(tag.rsplit("}", 1)[-1])
        parent = node.getparent()
        if parent is None:
            parts.append(local)
            break
        if not local[:1].isupper():  # resource types are the only capitalized names
            same = [c for c in parent if c.tag == node.tag]
            parts.append(f"{local}[{same.index(node)}]" if len(same) > 1 else local)
        node = parent
    return ".".join(reversed(parts))


def _bad(msg: str, el) -> BadRequest:
    path = _el_path(el)
    line = getattr(el, "sourceline", None)
    where = f" at line {line}" if line else ""
    return BadRequest(f"{msg}{where} ({path})", expression=path)


def from_xml(data: bytes, *, encoding: str | None = None) -> dict:
    """FHIR XML bytes -> FHIR JSON dict (https://hl7.org/fhir/R4/xml.html).

    Raises :class:`BadRequest` (line and FHIRPath-like location, never
    values) for malformed XML, a DOCTYPE, a root that is not a FHIR resource
    in namespace ``http://hl7.org/fhir``, unknown elements or attributes, bad
    primitive values, or repeated singletons. ``encoding`` overrides the
    document's own declaration (the HTTP charset parameter).
    """
    root = _parse_xml(data, encoding)
    tag = root.tag if isinstance(root.tag, str) else ""
    if not tag.startswith(_FHIR_PREFIX):
        raise BadRequest("The root element is not in the FHIR namespace "
                         f"{FHIR_NS} (https://hl7.org/fhir/R4/xml.html)")
    return _read_resource(root)


def _check_attrs(el, allowed: tuple) -> None:
    for attr in el.keys():
        if attr not in allowed and attr[0] != "{":  # namespaced (xsi:*, xml:*) ignored
            raise _bad(f"Unexpected attribute '{_safe_name(attr)}'", el)


def _read_resource(el) -> dict:
    tag = el.tag
    local = tag[_FP_LEN:] if isinstance(tag, str) and tag.startswith(_FHIR_PREFIX) else ""
    cls = _resource_class(local) if local else None
    if cls is None:
        raise _bad("Element is not a FHIR resource", el)
    _check_attrs(el, ())
    out = {"resourceType": local}
    _read_children(el, _info(cls), out)
    return out


def _read_children(el, info: _TypeInfo, out: dict) -> None:
    text = el.text
    if text and not text.isspace():
        raise _bad("Text content is not allowed here: FHIR XML carries values in "
                   "'value' attributes", el)
    elems = info.elems
    no_id, no_url = not info.is_resource, info.is_extension  # those are attributes
    prim_lists = None
    for child in el:
        tag = child.tag
        tail = child.tail
        if tail and not tail.isspace():
            raise _bad("Text content is not allowed here", el)
        if tag.__class__ is not str:  # an entity reference left unresolved
            raise _bad("Entity references are not allowed", el)
        if tag.startswith(_FHIR_PREFIX):
            name = tag[_FP_LEN:]
        elif tag == _XHTML_DIV:
            name = "div"
        else:
            raise _bad("Element outside the FHIR namespace", child)
        elem = elems.get(name)
        if elem is None or (name == "id" and no_id) or (name == "url" and no_url):
            raise _bad(f"Unknown element '{_safe_name(name)}'", child)
        kind = elem.kind
        if kind == _PRIM:
            value, ext = _read_primitive(child, elem.prim)
            if elem.is_list:
                # https://hl7.org/fhir/R4/json.html#primitive : aligned arrays, null-padded
                if prim_lists is None:
                    prim_lists = {}
                pair = prim_lists.get(name)
                if pair is None:
                    pair = prim_lists[name] = ([], [])
                    out[name], out["_" + name] = pair
                pair[0].append(value)
                pair[1].append(ext)
            else:
                if name in out or "_" + name in out:
                    raise _bad("Element repeated but allows at most one", child)
                if value is not None:
                    out[name] = value
                if ext is not None:
                    out["_" + name] = ext
            continue
        if kind == _COMPLEX:
            value = _read_complex(child, _info(elem.cls))
        elif kind == _RESOURCE:
            value = _read_contained(child)
        else:
            if tag != _XHTML_DIV:
                raise _bad("Narrative div must be an XHTML div element", child)
            value = _xhtml_string(child, _bad)
        if elem.is_list:
            items = out.get(name)
            if items is None:
                out[name] = [value]
            else:
                items.append(value)
        elif name in out:
            raise _bad("Element repeated but allows at most one", child)
        else:
            out[name] = value
    if prim_lists:
        for name, (vals, exts) in prim_lists.items():
            if all(v is None for v in vals):
                del out[name]
            if all(e is None for e in exts):
                del out["_" + name]


def _read_primitive(el, prim: str):
    _check_attrs(el, ("value", "id"))
    raw = el.get("value")
    value = None if raw is None else _typed(raw, prim, el)
    eid = el.get("id")
    ext = None if eid is None else {"id": eid}
    text = el.text
    if len(el) or (text and not text.isspace()):
        holder: dict = {}
        _read_children(el, _primitive_holder_info(), holder)
        if holder:
            ext = ext or {}
            ext["extension"] = holder["extension"]
    if value is None and ext is None:
        raise _bad("Primitive element without a value or an extension", el)
    return value, ext


def _typed(raw: str, prim: str, el):
    # https://hl7.org/fhir/R4/json.html#primitive : boolean, integer and
    # decimal are JSON booleans / numbers, everything else a string.
    if prim == "boolean":
        if raw == "true":
            return True
        if raw == "false":
            return False
        raise _bad("Invalid boolean value", el)
    if prim in _INT_TYPES:
        if not _INT_RE.fullmatch(raw):
            raise _bad(f"Invalid {prim} value", el)
        return int(raw)
    if prim == "decimal":
        if not _DECIMAL_RE.fullmatch(raw):
            raise _bad("Invalid decimal value", el)
        if "." in raw or "e" in raw or "E" in raw:
            return decimal.Decimal(raw)
        return int(raw)  # as JSON parsing gives it: json.loads("100") is an int
    return raw


def _read_complex(el, info: _TypeInfo) -> dict:
    out: dict = {}
    eid = el.get("id")
    if eid is not None:
        out["id"] = eid
    if info.is_extension:
        _check_attrs(el, ("id", "url"))
        url = el.get("url")
        if url is not None:
            out["url"] = url
    else:
        _check_attrs(el, ("id",))
    _read_children(el, info, out)
    return out


def _read_contained(el) -> dict:
    # https://hl7.org/fhir/R4/xml.html : <contained><Patient>...</Patient></contained>
    _check_attrs(el, ())
    if el.text and not el.text.isspace():
        raise _bad("Text content is not allowed here", el)
    children = list(el)
    if len(children) != 1 or not isinstance(children[0].tag, str):
        raise _bad("Expected exactly one resource element", el)
    if children[0].tail and not children[0].tail.isspace():
        raise _bad("Text content is not allowed here", el)
    return _read_resource(children[0])


_holder: _TypeInfo | None = None


def _primitive_holder_info() -> _TypeInfo:
    """Type info of the ``_name`` object of a primitive: only ``extension`` children."""
    global _holder
    if _holder is None:
        info = _TypeInfo.__new__(_TypeInfo)
        info.name, info.is_resource, info.is_extension = "PrimitiveExtension", False, False
        info.elems = {"extension": _Elem("extension", True, _COMPLEX, None, _extension_model())}
        info.index = {"extension": 0}
        _holder = info
    return _holder


def _extension_model():
    from fhir.resources.R4B.extension import Extension
    return Extension


# --------------------------------------------------------------------------
# XHTML narrative (https://hl7.org/fhir/R4/narrative.html#xhtml)
# --------------------------------------------------------------------------

_TEXT_ESC = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})
_ATTR_ESC = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                           "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def _xhtml_string(el, error) -> str:
    """Serialize an XHTML ``div`` the way the HL7 tools write it in JSON.

    ``error(message, element)`` builds the exception for non-XHTML content.
    """
    parts: list[str] = []
    _xhtml_write(el, parts, True, error)
    return "".join(parts)


def _xhtml_write(el, parts: list, root: bool, error) -> None:
    tag = el.tag
    if not isinstance(tag, str) or not tag.startswith(_XHTML_PREFIX):
        raise error("Narrative may only contain XHTML elements", el)
    name = tag[len(_XHTML_PREFIX):]
    parts.append("<" + name)
    if root:
        parts.append(f' xmlns="{XHTML_NS}"')
    for attr, value in el.items():
        if attr[0] == "{":
            if not attr.startswith("{" + _XML_NS + "}"):
                raise error("Narrative attributes may not be namespaced", el)
            attr = "xml:" + attr[len(_XML_NS) + 2:]
        parts.append(f' {attr}="{value.translate(_ATTR_ESC)}"')
    text = el.text
    if not text and not len(el):
        parts.append("/>")
        return
    parts.append(">")
    if text:
        parts.append(text.translate(_TEXT_ESC))
    for child in el:
        if not isinstance(child.tag, str):
            raise error("Entity references are not allowed in the narrative", el)
        _xhtml_write(child, parts, False, error)
        if child.tail:
            parts.append(child.tail.translate(_TEXT_ESC))
    parts.append(f"</{name}>")


def _xhtml_from_json(div: str) -> str:
    """A JSON ``div`` string, checked (well-formed XHTML, no DOCTYPE) and
    re-serialized: never copied into the XML output as is."""
    if _BAD_CHARS.search(div):
        raise _Invalid("Narrative holds a character not allowed in XML")
    try:
        el = _parse_xml(div.encode("utf-8"))
    except BadRequest:
        raise _Invalid("Narrative div is not well-formed XHTML") from None
    if el.tag == "div":
        # No xmlns in the JSON string: read the no-namespace tree as XHTML.
        for node in el.iter():
            if isinstance(node.tag, str) and not node.tag.startswith("{"):
                node.tag = _XHTML_PREFIX + node.tag
    if el.tag != _XHTML_DIV:
        raise _Invalid("Narrative must be an XHTML div element")
    return _xhtml_string(el, lambda msg, _el: _Invalid(msg))


# --------------------------------------------------------------------------
# JSON -> XML
# --------------------------------------------------------------------------

class _Invalid(Exception):
    """Bad input met while writing XML; the location is collected on the way
    up (segments, innermost first) so the happy path builds no path strings."""

    def __init__(self, msg: str, segment: str | None = None):
        super().__init__(msg)
        self.msg = msg
        self.segments = [segment] if segment else []


_SKIP_RESOURCE, _SKIP_ID, _SKIP_EXT = ("resourceType",), ("id",), ("id", "url")


def to_xml(resource: dict, *, pretty: bool = False) -> bytes:
    """FHIR JSON dict -> FHIR XML bytes, UTF-8, namespace ``http://hl7.org/fhir``.

    Elements are written in the order the specification fixes, primitives as
    ``value`` attributes with ``_name`` extensions merged in, ``id`` and
    ``Extension.url`` as attributes, contained resources nested, the
    narrative as XHTML (https://hl7.org/fhir/R4/xml.html). Input that is not
    a valid FHIR structure (unknown element, wrong cardinality or shape, bad
    narrative) -> :class:`Unprocessable` naming the element.
    """
    out: list[str] = ['<?xml version="1.0" encoding="UTF-8"?>']
    try:
        _write_resource(resource, out, "\n" if pretty else "", True)
    except _Invalid as e:
        path = "".join(reversed(e.segments)).lstrip(".")
        if path:
            raise Unprocessable(f"{e.msg} ({path})", expression=path) from None
        raise Unprocessable(e.msg) from None
    if pretty:
        out.append("\n")
    return "".join(out).encode("utf-8")


def _write_resource(res, out: list, ind: str, root: bool = False) -> None:
    if not isinstance(res, dict):
        raise _Invalid("A resource must be a JSON object")
    rtype = res.get("resourceType")
    cls = _resource_class(rtype) if rtype.__class__ is str else None
    if cls is None:
        raise _Invalid("Missing or unknown resourceType", ".resourceType")
    out.append(f'{ind}<{rtype} xmlns="{FHIR_NS}">' if root else f"{ind}<{rtype}>")
    try:
        _write_children(res, _info(cls), out, ind + "  " if ind else "", _SKIP_RESOURCE)
    except _Invalid as e:
        if root:
            e.segments.append(rtype)
        raise
    out.append(f"{ind}</{rtype}>")


def _write_children(obj: dict, info: _TypeInfo, out: list, ind: str, skip: tuple) -> None:
    elems, index = info.elems, info.index
    keyed = []
    for key in obj:
        if key in skip:
            continue
        if key[:1] == "_":
            base = key[1:]
            elem = elems.get(base)
            if elem is None or elem.kind != _PRIM:
                raise _Invalid(f"Unknown element '{_safe_name(key)}'", "." + _safe_name(key))
            if base in obj:
                continue
        elif key in elems:
            base = key
        else:
            raise _Invalid(f"Unknown element '{_safe_name(key)}'", "." + _safe_name(key))
        keyed.append((index[base], base))
    keyed.sort()
    for _, name in keyed:
        elem = elems[name]
        try:
            kind = elem.kind
            if kind == _PRIM:
                value = obj.get(name)
                ext = obj.get("_" + name)
                if ext is None and value.__class__ is str and not elem.is_list:  # fast path
                    out.append(f'{ind}<{name} value="{_attr(value)}"/>')
                else:
                    _write_primitive(name, value, ext, elem.is_list, out, ind)
                continue
            value = obj[name]
            if elem.is_list:
                if not isinstance(value, list):
                    raise _Invalid("Element must be a JSON array")
                items = value
            else:
                if isinstance(value, list):
                    raise _Invalid("Element must not be an array")
                items = (value,)
            for i, item in enumerate(items):
                try:
                    if kind == _COMPLEX:
                        _write_complex(name, item, _info(elem.cls), out, ind)
                    elif kind == _RESOURCE:
                        out.append(f"{ind}<{name}>")
                        _write_resource(item, out, ind + "  " if ind else "")
                        out.append(f"{ind}</{name}>")
                    else:  # _XHTML
                        if not isinstance(item, str):
                            raise _Invalid("Narrative div must be a string")
                        out.append(ind + _xhtml_from_json(item))
                except _Invalid as e:
                    if elem.is_list:
                        e.segments.append(f"[{i}]")
                    raise
        except _Invalid as e:
            e.segments.append("." + name)
            raise


def _write_complex(name: str, item, info: _TypeInfo, out: list, ind: str) -> None:
    if not isinstance(item, dict):
        raise _Invalid("Element must be a JSON object")
    head = ind + "<" + name
    n_attrs = 0
    eid = item.get("id")
    if eid is not None:
        head += f' id="{_attr(eid, ".id")}"'
        n_attrs += 1
    skip = _SKIP_ID
    if info.is_extension:
        skip = _SKIP_EXT
        url = item.get("url")
        if url is not None:
            head += f' url="{_attr(url, ".url")}"'
            n_attrs += 1
    if len(item) == n_attrs:
        out.append(head + "/>")
        return
    out.append(head + ">")
    _write_children(item, info, out, ind + "  " if ind else "", skip)
    out.append(f"{ind}</{name}>")


def _attr(value, segment: str | None = None) -> str:
    """A primitive value as an escaped XML attribute value."""
    if value.__class__ is str:
        text = value
    elif value is True:
        text = "true"
    elif value is False:
        text = "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _Invalid("Invalid decimal value", segment)
        text = str(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _Invalid("Invalid decimal value", segment)
        text = repr(value)
    elif isinstance(value, str):
        text = str(value)
    else:
        raise _Invalid("A primitive value must be a JSON string, number or boolean", segment)
    if _BAD_CHARS.search(text):
        raise _Invalid("Value holds a character not allowed in FHIR", segment)
    return text.translate(_ATTR_ESC)


def _write_primitive(name: str, value, ext, is_list: bool, out: list, ind: str) -> None:
    if not is_list:
        if isinstance(value, list) or isinstance(ext, list):
            raise _Invalid("Element must not be an array")
        _write_one_primitive(name, value, ext, out, ind)
        return
    values = [] if value is None else value
    exts = [] if ext is None else ext
    if not isinstance(values, list) or not isinstance(exts, list):
        raise _Invalid("Element must be a JSON array")
    if value is not None and ext is not None and len(values) != len(exts):
        raise _Invalid(f"'{name}' and '_{name}' must have the same length")
    for i in range(max(len(values), len(exts))):
        try:
            _write_one_primitive(name, values[i] if i < len(values) else None,
                                 exts[i] if i < len(exts) else None, out, ind)
        except _Invalid as e:
            e.segments.append(f"[{i}]")
            raise


def _write_one_primitive(name: str, value, ext, out: list, ind: str) -> None:
    head = ind + "<" + name
    extensions = None
    if ext is not None:
        if not isinstance(ext, dict) or any(k != "id" and k != "extension" for k in ext):
            raise _Invalid(f"'_{name}' may hold only 'id' and 'extension'")
        eid = ext.get("id")
        if eid is not None:
            head += f' id="{_attr(eid, ".id")}"'
        extensions = ext.get("extension")
        if extensions is not None and not isinstance(extensions, list):
            raise _Invalid("Element must be a JSON array", ".extension")
    else:
        eid = None
    if value is not None:
        if isinstance(value, (dict, list)):
            raise _Invalid("A primitive value must be a JSON string, number or boolean")
        head += f' value="{_attr(value)}"'
    if not extensions:
        if value is None and eid is None:
            raise _Invalid("Primitive element without a value or an extension")
        out.append(head + "/>")
        return
    out.append(head + ">")
    einfo = _info(_extension_model())
    child = ind + "  " if ind else ""
    for i, item in enumerate(extensions):
        try:
            _write_complex("extension", item, einfo, out, child)
        except _Invalid as e:
            e.segments.append(f".extension[{i}]")
            raise
    out.append(f"{ind}</{name}>")


# --------------------------------------------------------------------------
# Bodies and rendering
# --------------------------------------------------------------------------

def _charset(content_type: str) -> str | None:
    """The Content-Type charset as a Python codec name; not a text encoding
    (or unknown to libxml2, for XML) -> 415. FHIR bodies should be UTF-8
    (https://hl7.org/fhir/R4/http.html#mime-type); other text charsets are honoured."""
    charset = parse_options_header(content_type)[1].get("charset")
    if not charset:
        return None
    try:
        name = codecs.lookup(charset).name
        "x".encode(name)  # LookupError for bytes-to-bytes codecs (hex, base64, rot13)
        if media_format(content_type) == XML:
            _parser(name)
    except LookupError:
        raise UnsupportedMediaType("Unsupported charset in Content-Type") from None
    return name


def parse_body(content_type: str | None, body: bytes, *, max_bytes: int) -> dict:
    """Decode a request body to a FHIR JSON dict (with a string ``resourceType``).

    - no / unknown content type, unknown charset, ``fhirVersion`` other than
      4.0 -> :class:`UnsupportedMediaType` (415)
    - ``len(body) > max_bytes`` -> :class:`PayloadTooLarge` (413)
    - malformed / truncated JSON or XML, non-object JSON, duplicate keys,
      NaN/Infinity, XML that is not a FHIR resource -> :class:`BadRequest`
      (400) with line/column, never quoting the body.
    """
    fmt = media_format(content_type)
    if fmt is None:
        raise UnsupportedMediaType("Content-Type must be application/fhir+json or "
                                   "application/fhir+xml (FHIR 4.0)")
    charset = _charset(content_type)
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"Body larger than {max_bytes} bytes")
    if not body or not body.strip():
        raise BadRequest("Empty body: a FHIR resource is expected")
    if fmt == XML:
        return from_xml(body, encoding=charset)
    data = loads_json(body, charset)
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object (a FHIR resource)")
    if not isinstance(data.get("resourceType"), str):
        raise BadRequest("JSON body has no resourceType", expression="resourceType")
    return data


def render(resource: dict, fmt: str, *, pretty: bool = False) -> bytes:
    """Serialize a FHIR JSON dict as ``fmt`` (``JSON`` or ``XML``), UTF-8 bytes."""
    if fmt == JSON:
        return dumps_json(resource, pretty=pretty)
    if fmt == XML:
        return to_xml(resource, pretty=pretty)
    raise ValueError(f"unknown format {fmt!r}")
