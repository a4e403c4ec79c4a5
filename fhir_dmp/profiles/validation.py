"""Validation of incoming FHIR R4 (4.0.1) JSON resources.

Contract: :func:`validate` takes a resource as parsed JSON (a dict), checks it
and returns the very same dict (never a re-dump). Every problem becomes one
:class:`~fhir_dmp.http.errors.Issue` with a FHIRPath-like ``expression``
(``Patient.identifier[0].value``) and a diagnostic that names the rule but
never repeats the offending value (it may be personal data). All problems
are raised together as :class:`~fhir_dmp.http.errors.Unprocessable` (422); a
missing or unexpected ``resourceType`` is :class:`~fhir_dmp.http.errors.BadRequest`
(400) on ``resourceType``.

Three layers:

1. A strict walk of the raw JSON, driven by the ``fhir.resources.R4B`` model
   field metadata (element names, cardinality, primitive types). It enforces
   what pydantic lets through: the R4 JSON rules
   (https://hl7.org/fhir/R4/json.html: no null, no empty string/object/array,
   JSON booleans/numbers for boolean/integer/decimal, unknown elements refused),
   the primitive regexes of https://hl7.org/fhir/R4/datatypes.html (id of at
   most 64 characters, real calendar dates, ...), the codes of REQUIRED
   bindings, the narrative rules (https://hl7.org/fhir/R4/narrative.html) and
   a few core invariants (ext-1, ref-1, dom-2, dom-3, dom-4).
2. ``fhir.resources.R4B`` pydantic models, for whatever structure rule the
   walk does not restate; their errors are translated to FHIRPath.
3. The DMP profiles (:mod:`fhir_dmp.profiles.dmp`) for Patient and
   DocumentReference.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import decimal
import functools
import logging
import math
import re
import types as _types
import typing
from dataclasses import dataclass

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.types import FhirBase
from lxml import etree

from fhir_dmp.http.errors import BadRequest, Issue, Unprocessable
from fhir_dmp.storage import RESOURCE_TYPES

from . import dmp, review_task

log = logging.getLogger(__name__)

SUPPORTED_TYPES = RESOURCE_TYPES    # the hosted types (storage/core.py holds the list)

#: Canonical URLs of our profiles (StructureDefinitions in ``ig/``).
PROFILES: dict[str, str] = {
    "Patient": dmp.PROFILE_PATIENT,
    "DocumentReference": dmp.PROFILE_DOCUMENTREFERENCE,
    "RelatedPerson": dmp.PROFILE_RELATEDPERSON,
    "Task": review_task.PROFILE_TASK,
    "AuditEvent": dmp.PROFILE_AUDITEVENT,
}

# --- R4 primitive rules (https://hl7.org/fhir/R4/datatypes.html#primitive) ----------------

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_TZ = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_RE = {
    "date": re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?"),
    "dateTime": re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_TZ})?)?)?"),
    "instant": re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_TZ}"),
    "time": re.compile(_TIME),
    "code": re.compile(r"[^\s]+( [^\s]+)*"),
    "id": re.compile(r"[A-Za-z0-9\-\.]{1,64}"),
    "uri": re.compile(r"\S+"),
    "url": re.compile(r"\S+"),
    "canonical": re.compile(r"\S+"),
    "oid": re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+"),
    "uuid": re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
}
_PRIM_HINT = {
    "date": "YYYY, YYYY-MM or YYYY-MM-DD",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss(.sss)+zz:zz with a time zone",
    "instant": "YYYY-MM-DDThh:mm:ss(.sss)+zz:zz with a time zone",
    "time": "hh:mm:ss(.sss)",
    "code": "no leading, trailing or repeated whitespace",
    "id": "1 to 64 characters among A-Z a-z 0-9 - .",
    "uri": "no whitespace",
    "url": "no whitespace",
    "canonical": "no whitespace",
    "oid": "urn:oid:<dotted number>",
    "uuid": "urn:uuid:<lowercase uuid>",
}
_INT32 = (-2147483648, 2147483647)
_MAX_STRING = 1024 * 1024
# Characters below U+0020 other than tab, CR, LF (R4 string rule; they cannot be written in XML).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# RFC 6838 media type, optional parameters (BCP 13, the R4 MimeTypes required binding).
_MIME = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(\"[^\"]*\"|[^;\s]+))*")
_CURRENCY = re.compile(r"[A-Z]{3}")
# Relative literal reference Type/id(/_history/vid) (https://hl7.org/fhir/R4/references.html).
_RELATIVE_REF = re.compile(
    r"([A-Z][A-Za-z]+)/[A-Za-z0-9\-\.]{1,64}(/_history/[A-Za-z0-9\-\.]{1,64})?")

# --- REQUIRED bindings (R4 4.0.1) of the six types and the data types they use -------------
# Keyed by model class name and JSON element name. Hand-listed from the R4 spec pages
# (https://hl7.org/fhir/R4/<type>.html "Terminology Bindings"), small value sets only.
_UNITS_OF_TIME = ("s", "min", "h", "d", "wk", "mo", "a")
_COMPARATOR = ("<", "<=", ">=", ">")
_EVENT_TIMING = ("MORN", "MORN.early", "MORN.late", "NOON", "AFT", "AFT.early", "AFT.late",
                 "EVE", "EVE.early", "EVE.late", "NIGHT", "PHS", "HS", "WAKE", "C", "CM", "CD",
                 "CV", "AC", "ACM", "ACD", "ACV", "PC", "PCM", "PCD", "PCV")
REQUIRED_BINDINGS: dict[tuple[str, str], tuple[str, ...]] = {
    # data types (https://hl7.org/fhir/R4/datatypes.html)
    ("Identifier", "use"): ("usual", "official", "temp", "secondary", "old"),
    ("HumanName", "use"): ("usual", "official", "temp", "nickname", "anonymous", "old", "maiden"),
    ("ContactPoint", "system"): ("phone", "fax", "email", "pager", "url", "sms", "other"),
    ("ContactPoint", "use"): ("home", "work", "temp", "old", "mobile"),
    ("Address", "use"): ("home", "work", "temp", "old", "billing"),
    ("Address", "type"): ("postal", "physical", "both"),
    ("Narrative", "status"): ("generated", "extensions", "additional", "empty"),
    ("Quantity", "comparator"): _COMPARATOR,
    ("Age", "comparator"): _COMPARATOR,
    ("Count", "comparator"): _COMPARATOR,
    ("Distance", "comparator"): _COMPARATOR,
    ("Duration", "comparator"): _COMPARATOR,
    ("TimingRepeat", "durationUnit"): _UNITS_OF_TIME,
    ("TimingRepeat", "periodUnit"): _UNITS_OF_TIME,
    ("TimingRepeat", "dayOfWeek"): ("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
    ("TimingRepeat", "when"): _EVENT_TIMING,
    ("Contributor", "type"): ("author", "editor", "reviewer", "endorser"),
    ("RelatedArtifact", "type"): ("documentation", "justification", "citation", "predecessor",
                                  "successor", "derived-from", "depends-on", "composed-of"),
    ("TriggerDefinition", "type"): ("named-event", "periodic", "data-changed", "data-added",
                                    "data-modified", "data-removed", "data-accessed",
                                    "data-access-ended"),
    ("ParameterDefinition", "use"): ("in", "out"),
    ("DataRequirementSort", "direction"): ("ascending", "descending"),
    # Patient (https://hl7.org/fhir/R4/patient.html)
    ("Patient", "gender"): ("male", "female", "other", "unknown"),
    ("PatientContact", "gender"): ("male", "female", "other", "unknown"),
    ("PatientLink", "type"): ("replaced-by", "replaces", "refer", "seealso"),
    # DocumentReference (https://hl7.org/fhir/R4/documentreference.html)
    ("DocumentReference", "status"): ("current", "superseded", "entered-in-error"),
    ("DocumentReference", "docStatus"): ("preliminary", "final", "amended", "entered-in-error"),
    ("DocumentReferenceRelatesTo", "code"): ("replaces", "transforms", "signs", "appends"),
    # Consent (https://hl7.org/fhir/R4/consent.html)
    ("Consent", "status"): ("draft", "proposed", "active", "rejected", "inactive",
                            "entered-in-error"),
    ("ConsentProvision", "type"): ("deny", "permit"),
    ("ConsentProvisionData", "meaning"): ("instance", "related", "dependents", "authoredby"),
    # AuditEvent (https://hl7.org/fhir/R4/auditevent.html)
    ("AuditEvent", "action"): ("C", "R", "U", "D", "E"),
    ("AuditEvent", "outcome"): ("0", "4", "8", "12"),
    ("AuditEventAgentNetwork", "type"): ("1", "2", "3", "4", "5"),
    # Communication (https://hl7.org/fhir/R4/communication.html)
    ("Communication", "status"): ("preparation", "in-progress", "not-done", "on-hold", "stopped",
                                  "completed", "entered-in-error", "unknown"),
    ("Communication", "priority"): ("routine", "urgent", "asap", "stat"),
    # Task (https://hl7.org/fhir/R4/task.html); its status: the review Task profile (review_task.py)
    ("Task", "intent"): ("unknown", "proposal", "plan", "order", "original-order", "reflex-order",
                         "filler-order", "instance-order", "option"),
    ("Task", "priority"): ("routine", "urgent", "asap", "stat"),
}
# Elements bound (required) to BCP 13 MimeTypes: checked as RFC 6838 media types.
_MIME_ELEMENTS = frozenset({("Attachment", "contentType"), ("Binary", "contentType"),
                            ("Signature", "targetFormat"), ("Signature", "sigFormat")})

# R4B data types that do not exist in R4 4.0.1 (fhir.resources only ships R4B models).
_NOT_R4_TYPES = frozenset({"CodeableReference", "RatioRange"})

# Narrative (https://hl7.org/fhir/R4/narrative.html, txt-1 / txt-2): the element set the
# FHIR reference validator accepts; no scripts, forms, frames, objects, head/body.
_XHTML_NS = "http://www.w3.org/1999/xhtml"
_XHTML_ELEMENTS = frozenset(
    "p br div h1 h2 h3 h4 h5 h6 a span b em i strong small big tt dfn q var abbr acronym cite "
    "blockquote hr address bdo kbd sub sup ul ol li dl dt dd pre table caption colgroup col "
    "thead tr tfoot tbody th td code samp img map area".split())
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                              huge_tree=False)


# Deepest element nesting accepted (R4 resources need far less); deeper input is refused
# before any recursive parsing so a crafted body cannot exhaust the stack.
MAX_DEPTH = 64


class _TooDeep(Exception):
    pass


# --- model metadata ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str                 # JSON element name
    prim: str | None          # FHIR primitive type name, or None for a complex type
    model: type | None        # model class for complex types
    is_list: bool
    required: bool
    choice: str | None        # choice group prefix (value[x] -> "value")
    ref_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Schema:
    name: str
    fields: dict[str, _Field]
    choices: dict[str, tuple[bool, tuple[str, ...]]]   # prefix -> (required, names)
    is_resource: bool


def _unwrap(annotation) -> tuple[object, bool]:
    """Strip Optional/List from a field annotation; return (inner, is_list)."""
    is_list = False
    tp = annotation
    for _ in range(6):
        origin = typing.get_origin(tp)
        if origin in (typing.Union, _types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0]
        elif origin in (list, typing.List):
            is_list = True
            tp = typing.get_args(tp)[0]
        else:
            break
    return tp, is_list


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> _Schema:
    fields: dict[str, _Field] = {}
    choices: dict[str, list] = {}
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra or {}
        if not isinstance(extra, dict) or not extra.get("element_property"):
            continue    # fhir_comments, <name>__ext: not R4 JSON element names
        alias = info.alias or name
        inner, is_list = _unwrap(info.annotation)
        prim = model = None
        if inner is bool:
            prim = "boolean"
        elif typing.get_origin(inner) is typing.Annotated:
            for meta in typing.get_args(inner)[1:]:
                visit = getattr(type(meta), "__visit_name__", None)
                if visit:
                    prim = visit
            prim = prim or "string"
        elif isinstance(inner, type) and issubclass(inner, FhirBase):
            model = inner.get_model_klass()
        else:   # pragma: no cover - defensive, unknown annotation
            prim = "string"
        choice = extra.get("one_of_many")
        if choice:
            entry = choices.setdefault(choice, [bool(extra.get("one_of_many_required")), []])
            entry[1].append(alias)
        fields[alias] = _Field(
            name=alias, prim=prim, model=model, is_list=is_list,
            required=bool(info.is_required() or extra.get("element_required")) and not choice,
            choice=choice, ref_types=tuple(extra.get("enum_reference_types") or ()))
    return _Schema(cls.__name__, fields,
                   {k: (v[0], tuple(v[1])) for k, v in choices.items()},
                   bool(getattr(cls, "has_resource_base", lambda: False)()))


@functools.lru_cache(maxsize=None)
def _model_for(resource_type: str):
    try:
        cls = get_fhir_model_class(resource_type)
    except Exception:   # KeyError / ValueError for unknown names
        return None
    if not cls.has_resource_base() or resource_type in ("Resource", "DomainResource"):
        return None
    return cls


# --- the strict walk --------------------------------------------------------------------


class _Walker:
    """Collects issues while walking one resource's JSON against the R4B models."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self._ref_types: tuple[str, ...] = ()   # allowed targets of the Reference being walked
        self._refs: set[str] = set()
        self._local_refs: list[tuple[str, str]] = []
        self._depth = 0

    def add(self, expression: str, diagnostics: str, code: str = "value") -> None:
        self.issues.append(Issue(diagnostics, code, expression=[expression]))

    # resources ------------------------------------------------------------------------
    def run(self, obj: dict, cls: type, path: str) -> None:
        """Walk one resource, then check its contained resources and local references:
        dom-2 (no nested contained), dom-3 (contained resources are referenced),
        dom-4 (no meta.versionId/lastUpdated in contained), ref-1 ("#id" resolves)."""
        self.element(obj, cls, path, root=True)
        contained = obj.get("contained")
        contained_ids: dict[str, str] = {}
        for i, item in enumerate(contained if isinstance(contained, list) else []):
            if not isinstance(item, dict):
                continue
            cpath = f"{path}.contained[{i}]"
            if "contained" in item:
                self.add(f"{cpath}.contained", "a contained resource cannot contain resources "
                         "(dom-2)", "invariant")
            meta = item.get("meta")
            if isinstance(meta, dict) and ("versionId" in meta or "lastUpdated" in meta):
                self.add(f"{cpath}.meta", "a contained resource cannot have meta.versionId or "
                         "meta.lastUpdated (dom-4)", "invariant")
            cid = item.get("id")
            if not isinstance(cid, str):
                self.add(f"{cpath}.id", "a contained resource needs an id (dom-3)", "required")
            else:
                contained_ids[cid] = cpath
        for cid, cpath in contained_ids.items():
            if "#" + cid not in self._refs and "#" not in self._refs:
                self.add(cpath, "a contained resource must be referenced from its container "
                         "(dom-3)", "invariant")
        for ref, rpath in self._local_refs:
            if ref != "#" and ref[1:] not in contained_ids:
                self.add(rpath, "a local reference must point at a contained resource (ref-1)",
                         "invariant")

    # complex elements -----------------------------------------------------------------
    def element(self, obj, cls: type, path: str, root: bool = False) -> None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                self.add(path, f"elements nested deeper than {MAX_DEPTH} levels", "too-costly")
                raise _TooDeep
            self._element(obj, cls, path, root)
        finally:
            self._depth -= 1

    def _element(self, obj, cls: type, path: str, root: bool) -> None:
        if not isinstance(obj, dict):
            self.add(path, f"expected a JSON object ({_schema(cls).name})", "structure")
            return
        schema = _schema(cls)
        if schema.name in _NOT_R4_TYPES:
            self.add(path, f"{schema.name} is not an R4 (4.0.1) data type", "structure")
            return
        if not obj:
            self.add(path, "an element must have a value or children (R4 JSON: no empty "
                     "objects)", "structure")
            return
        fields = schema.fields
        for key, value in obj.items():
            if key == "resourceType" and root:
                continue
            if not isinstance(key, str):    # not from JSON; refuse rather than crash
                self.add(path, f"element names must be strings in {schema.name}", "structure")
                continue
            if key.startswith("_"):
                f = fields.get(key[1:])
                if f is None or f.prim is None:
                    self.add(f"{path}.{key}", f"unknown element '{key}' in {schema.name}",
                             "structure")
                else:
                    self.primitive_extension(obj, f, value, path)
                continue
            f = fields.get(key)
            if f is None:
                self.add(f"{path}.{key}", f"unknown element '{key}' in {schema.name}",
                         "structure")
                continue
            self.value(obj, f, value, f"{path}.{key}", schema)
        for f in fields.values():
            if f.required and f.name not in obj and "_" + f.name not in obj:
                self.add(f"{path}.{f.name}", f"{schema.name}.{f.name} is required (minimum "
                         "cardinality 1)", "required")
        for prefix, (required, names) in schema.choices.items():
            present = [n for n in names if n in obj or "_" + n in obj]
            if len(present) > 1:
                self.add(f"{path}.{present[1]}", f"only one of {prefix}[x] may be given",
                         "structure")
            elif required and not present:
                self.add(f"{path}.{prefix}[x]", f"{schema.name}.{prefix}[x] is required",
                         "required")
        if schema.name == "Extension":     # ext-1
            has_value = any(isinstance(k, str) and k.startswith("value") for k in obj)
            if obj.get("extension") and has_value:
                self.add(path, "an extension has either extensions or a value[x], not both "
                         "(ext-1)", "invariant")
        elif schema.name == "Reference":   # ref-1 (checked once the whole resource is read)
            ref = obj.get("reference")
            if isinstance(ref, str):
                self.reference(ref, f"{path}.reference", self._ref_types)

    def reference(self, ref: str, path: str, types: tuple[str, ...]) -> None:
        self._refs.add(ref)
        if ref.startswith("#"):
            self._local_refs.append((ref, path))
            return
        m = _RELATIVE_REF.fullmatch(ref)
        if m and types and "Resource" not in types and m.group(1) not in types:
            self.add(path, f"a reference here must point at one of {', '.join(types)}",
                     "value")

    def value(self, parent: dict, f: _Field, value, path: str, schema: _Schema) -> None:
        if f.is_list:
            if not isinstance(value, list):
                self.add(path, "expected a JSON array (this element repeats)", "structure")
                return
            if not value:
                self.add(path, "empty arrays are not allowed (R4 JSON)", "structure")
                return
            ext = parent.get("_" + f.name)
            for i, item in enumerate(value):
                ipath = f"{path}[{i}]"
                if item is None:
                    has_ext = (f.prim is not None and isinstance(ext, list) and i < len(ext)
                               and ext[i] is not None)
                    if not has_ext:
                        self.add(ipath, "null is only allowed in a primitive array aligned "
                                 "with an extension (R4 JSON)", "structure")
                    continue
                self.single(f, item, ipath, schema)
        else:
            if isinstance(value, list):
                self.add(path, "expected a single value, not an array (maximum cardinality 1)",
                         "structure")
                return
            if value is None:
                self.add(path, "null is not allowed (R4 JSON)", "structure")
                return
            self.single(f, value, path, schema)

    def single(self, f: _Field, value, path: str, schema: _Schema) -> None:
        if f.prim is not None:
            self.primitive(f.prim, value, path, (schema.name, f.name))
            return
        model = f.model
        if model is not None and model.has_resource_base() and model.__name__ in (
                "Resource", "DomainResource"):
            rtype = value.get("resourceType") if isinstance(value, dict) else None
            cls = _model_for(rtype) if isinstance(rtype, str) else None
            if cls is None:
                self.add(f"{path}.resourceType" if isinstance(value, dict) else path,
                         "a known FHIR resourceType is required here", "structure")
                return
            self.element(value, cls, path, root=True)
            return
        saved = self._ref_types
        self._ref_types = f.ref_types
        try:
            self.element(value, model, path)
        finally:
            self._ref_types = saved

    def primitive_extension(self, parent: dict, f: _Field, value, path: str) -> None:
        """``_name``: the id/extension of a primitive (R4 JSON, "Representing primitives")."""
        element = get_fhir_model_class("Element")
        epath = f"{path}.{f.name}"
        if f.is_list:
            base = parent.get(f.name)
            if not isinstance(value, list) or not value:
                self.add(epath, "expected a non-empty JSON array", "structure")
                return
            if base is not None and (not isinstance(base, list) or len(base) != len(value)):
                self.add(epath, f"'{f.name}' and '_{f.name}' must have the same length",
                         "structure")
            for i, item in enumerate(value):
                if item is None:
                    if not (isinstance(base, list) and i < len(base) and base[i] is not None):
                        self.add(f"{epath}[{i}]", "a value or an extension is required",
                                 "structure")
                    continue
                self.element(item, element, f"{epath}[{i}]")
        elif value is None:
            self.add(epath, "null is not allowed (R4 JSON)", "structure")
        else:
            self.element(value, element, epath)

    # primitives -----------------------------------------------------------------------
    def primitive(self, prim: str, value, path: str, where: tuple[str, str]) -> None:
        if prim == "boolean":
            if not isinstance(value, bool):
                self.add(path, "expected a JSON boolean (true or false)")
            return
        if prim in ("integer", "unsignedInt", "positiveInt", "integer64"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.add(path, f"expected a JSON integer ({prim})")
            elif not _INT32[0] <= value <= _INT32[1]:
                self.add(path, "integer out of the 32-bit range")
            elif prim == "unsignedInt" and value < 0:
                self.add(path, "expected an integer >= 0 (unsignedInt)")
            elif prim == "positiveInt" and value < 1:
                self.add(path, "expected an integer >= 1 (positiveInt)")
            return
        if prim == "decimal":
            if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
                self.add(path, "expected a JSON number (decimal)")
            elif not (value.is_finite() if isinstance(value, decimal.Decimal)
                      else math.isfinite(value)):
                self.add(path, "expected a finite number (decimal)")
            return
        # string-based primitives
        if not isinstance(value, str):
            self.add(path, f"expected a JSON string ({prim})")
            return
        if value == "":
            self.add(path, "empty strings are not allowed (R4 JSON)")
            return
        if len(value) > _MAX_STRING and prim != "base64Binary":
            # attachments are bounded by max_body_bytes and FHIR_DMP_MAX_ATTACHMENT_BYTES instead
            self.add(path, "string longer than 1 MiB characters", "too-long")
            return
        if prim == "xhtml":
            problem = _xhtml_problem(value)
            if problem:
                self.add(path, problem)
            return
        if _CONTROL.search(value):
            self.add(path, "control characters (below U+0020, except tab, CR, LF) are not "
                     "allowed")
            return
        if prim == "base64Binary":
            if not _is_base64(value):
                self.add(path, "invalid base64 (RFC 4648) content")
            return
        rx = _RE.get(prim)
        if rx is not None and not rx.fullmatch(value):
            self.add(path, f"invalid {prim}: expected {_PRIM_HINT[prim]}")
            return
        if prim in ("date", "dateTime", "instant") and not _real_datetime(value):
            self.add(path, f"invalid {prim}: not a real calendar date/time")
            return
        if prim == "time" and not _real_time(value):
            self.add(path, "invalid time")
            return
        allowed = REQUIRED_BINDINGS.get(where)
        if allowed is not None and value not in allowed:
            self.add(path, f"code not in the required value set: expected one of "
                     f"{', '.join(allowed)}", "code-invalid")
        elif where in _MIME_ELEMENTS and not _MIME.fullmatch(value):
            self.add(path, "invalid media type: expected type/subtype (BCP 13)", "code-invalid")
        elif where == ("Money", "currency") and not _CURRENCY.fullmatch(value):
            self.add(path, "invalid currency: expected an ISO 4217 code", "code-invalid")


def _is_base64(value: str) -> bool:
    compact = re.sub(r"\s+", "", value)
    if not compact or len(compact) % 4:
        return False
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _real_datetime(value: str) -> bool:
    """Check day-of-month and time ranges the regexes cannot (2023-02-30, 24:00...)."""
    try:
        if len(value) >= 10:
            _dt.date.fromisoformat(value[:10])
        if len(value) > 10:
            return _real_time(value[11:19])
    except ValueError:
        return False
    return True


def _real_time(value: str) -> bool:
    hh, mm, ss = value[:8].split(":")
    # a leap second (ss == 60) is allowed by the R4 regex; the rest must be a real time
    try:
        _dt.time(int(hh), int(mm), min(int(ss), 59))
    except ValueError:
        return False
    return True


def _xhtml_problem(div: str) -> str | None:
    try:
        root = etree.fromstring(div.encode("utf-8"), _XML_PARSER)
    except etree.XMLSyntaxError as exc:
        line, col = getattr(exc, "position", (0, 0))
        return f"text.div is not well-formed XHTML (line {line}, column {col}); only the XML " \
               "entities &lt; &gt; &amp; &quot; &apos; and character references are allowed"
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        return "text.div must not have a DOCTYPE"
    if root.tag != f"{{{_XHTML_NS}}}div":
        return "text.div must be a <div> in the XHTML namespace (http://www.w3.org/1999/xhtml)"
    has_image = False
    for el in root.iter():
        if not isinstance(el.tag, str):
            if isinstance(el, etree._Entity):
                return "text.div must not use entities"
            continue    # comments, processing instructions
        ns, _, local = el.tag.rpartition("}")
        if ns[1:] != _XHTML_NS or local not in _XHTML_ELEMENTS:
            return f"element <{local}> is not allowed in a narrative (txt-1)"
        has_image |= local == "img"
        for attr, val in el.attrib.items():
            name = attr.rpartition("}")[2].lower()
            if name.startswith("on") or attr.startswith("{http://www.w3.org/1999/xlink}"):
                return f"attribute '{name}' is not allowed in a narrative (txt-1)"
            if name in ("href", "src") and val.strip().lower().startswith(
                    ("javascript:", "vbscript:", "data:text/html")):
                return f"active content in '{name}' is not allowed in a narrative (txt-1)"
    if not has_image and not "".join(root.itertext()).strip():
        return "a narrative must have some non-whitespace content (txt-2)"
    return None


# --- pydantic layer -----------------------------------------------------------------------


def _loc_to_path(resource_type: str, loc: tuple) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str):
            if part == "root" or not re.fullmatch(r"_?[A-Za-z][A-Za-z0-9_]*", part):
                continue
            name = part[1:] if part.startswith("_") else part
            if name.endswith("__ext"):
                name = name[: -len("__ext")]
            path += f".{name}"
    return path


def _pydantic_issues(resource: dict, cls: type, resource_type: str) -> list[Issue]:
    try:
        cls.model_validate(resource)
    except pydantic.ValidationError as exc:
        out = []
        for err in exc.errors(include_input=False, include_url=False):
            code = "required" if err.get("type") == "missing" else "value"
            msg = str(err.get("msg", "invalid value"))
            out.append(Issue(msg, code, expression=[_loc_to_path(resource_type, err["loc"])]))
        return out
    except Exception as exc:    # the models may choke on input the walk already refused
        log.debug("model validation failed: %s", type(exc).__name__)
        return [Issue(f"{resource_type} could not be read as FHIR R4", "structure",
                      expression=[resource_type])]
    return []


def _covers(a: str, b: str) -> bool:
    """True when expression ``a`` and ``b`` are the same element or one contains the other."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return long_.startswith(short) and long_[len(short)] in ".["


# --- entry point --------------------------------------------------------------------------


def validate(resource: dict, *, resource_type: str | None = None) -> dict:
    """Validate a FHIR R4 resource dict and return it (unchanged JSON, not a re-dump).

    Raises ``Unprocessable`` (422) with one Issue per problem (``expression``
    FHIRPath-like, e.g. ``Patient.identifier[0].value``). A missing
    ``resourceType``, one that differs from ``resource_type`` or one outside
    :data:`SUPPORTED_TYPES` -> ``BadRequest`` (400) on ``resourceType``.
    Patient and DocumentReference are also checked against the DMP profiles
    (:data:`PROFILES`).
    """
    if not isinstance(resource, dict):
        raise BadRequest("the body must be a JSON object holding a FHIR resource",
                         expression="resourceType")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise BadRequest("resourceType is missing", expression="resourceType")
    if resource_type is not None and rtype != resource_type:
        raise BadRequest(f"resourceType must be {resource_type}", expression="resourceType")
    if rtype not in SUPPORTED_TYPES:
        raise BadRequest(f"resourceType must be one of {', '.join(SUPPORTED_TYPES)}",
                         expression="resourceType")
    cls = get_fhir_model_class(rtype)

    walker = _Walker()
    try:
        walker.run(resource, cls, rtype)
    except _TooDeep:
        raise Unprocessable(issues=walker.issues[-1:]) from None
    issues = list(walker.issues)
    for issue in _pydantic_issues(resource, cls, rtype):
        if not any(_covers(issue.expression[0], seen.expression[0]) for seen in issues):
            issues.append(issue)
    if rtype == "Patient":
        issues.extend(dmp.check_patient(resource))
    elif rtype == "DocumentReference":
        issues.extend(dmp.check_documentreference(resource))
    elif rtype == "RelatedPerson":
        issues.extend(dmp.check_relatedperson(resource))
    elif rtype == "Task":
        issues.extend(review_task.check_task(resource))
    if issues:
        raise Unprocessable(issues=issues)
    return resource
