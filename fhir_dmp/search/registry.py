"""The supported search parameters, read from the R4 SearchParameter
definitions shipped in ``fhir_dmp/data/searchparameters.json``.

Each parameter's FHIRPath ``expression`` is split on ``|`` and the parts for
the resource type are kept (multi-type definitions such as
``clinical-patient``). Every part we use has the simple shape
``Type.a.b.c`` optionally followed by ``.where(resolve() is T)`` (or wrapped
in ``( ... as type)``); those are compiled into a :class:`Path` walked by
plain dict/list traversal, which is much faster than evaluating FHIRPath on
every write (see bench/search_extract.py). Any other shape falls back to
``fhirpathpy`` (compiled once) so a richer definition still works.

``resolve() is T`` is decided without resolving: a reference whose literal
``Type/id`` (relative or absolute URL) or ``Reference.type`` names ``T``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Callable

DATA_FILE = FsPath(__file__).resolve().parent.parent / "data" / "searchparameters.json"

#: The resource types this server hosts, and the parameters it supports on each
#: (https://hl7.org/fhir/R4/search.html, brief of fhir_dmp.search).
WANTED: dict[str, tuple[str, ...]] = {
    "Patient": ("identifier", "name", "family", "given", "birthdate", "gender", "active",
                "general-practitioner"),
    "DocumentReference": ("patient", "subject", "identifier", "type", "category", "date", "status",
                          "author", "security-label", "relatesto", "format", "contenttype"),
    "Consent": ("patient", "status", "category", "actor", "purpose", "action", "date", "scope"),
    "AuditEvent": ("patient", "entity", "agent", "date", "type", "subtype", "action", "outcome",
                   "purpose"),   # purpose: this server's SearchParameter (break-glass review)
    "Communication": ("subject", "patient", "status", "sent", "category"),
    "Binary": (),
    "RelatedPerson": ("patient", "active", "relationship"),   # legal representatives
    # the directory of professionals (CONTRACT.md "The directory of professionals")
    "Practitioner": ("identifier", "name", "family", "given", "address-city"),
    "PractitionerRole": ("practitioner", "specialty", "role"),
    # the privacy review cases (CONTRACT.md "Privacy operations")
    "Task": ("code", "status", "patient", "authored-on", "owner", "focus", "business-status"),
}
COMMON = ("_id", "_lastUpdated")

#: Types in the patient compartment
#: (https://hl7.org/fhir/R4/compartmentdefinition-patient.html); Binary is
#: attached to its patient by storage.
PATIENT_COMPARTMENT = frozenset({"Patient", "DocumentReference", "Consent", "AuditEvent",
                                 "Communication", "RelatedPerson", "Task"})


@dataclass(frozen=True)
class Path:
    """``steps`` walked from the resource; keep references whose target type is
    ``resolve_is`` when set."""

    steps: tuple[str, ...]
    resolve_is: str | None = None


@dataclass(frozen=True)
class SearchParam:
    """One supported search parameter for one resource type."""

    name: str
    type: str                      # token | string | date | reference
    expression: str                # the FHIRPath parts for this type, joined by " | "
    paths: tuple[Path, ...] = ()   # compiled simple paths (empty when ``evaluator`` is used)
    targets: tuple[str, ...] = ()  # reference target types
    url: str = ""
    evaluator: Callable | None = field(default=None, compare=False, repr=False)


_PART_RE = re.compile(
    r"^\(?(?P<root>[A-Z][A-Za-z]+)\.(?P<steps>[a-zA-Z]+(?:\.[a-zA-Z]+)*)"
    r"(?: as [a-zA-Z]+)?\)?"
    r"(?:\.where\(resolve\(\) is (?P<is>[A-Z][A-Za-z]+)\))?$")


def _split_expression(expression: str) -> list[str]:
    """Top-level ``|`` split (parentheses respected)."""
    parts, depth, cur = [], 0, []
    for ch in expression:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _compile(resource_type: str, sp: dict) -> SearchParam:
    parts = [p for p in _split_expression(sp.get("expression") or "")
             if p.lstrip("(").startswith((resource_type + ".", "Resource."))]
    if not parts:
        raise ValueError(f"SearchParameter {sp.get('url')} has no expression for {resource_type}")
    paths, simple = [], True
    for part in parts:
        m = _PART_RE.match(part)
        if not m:
            simple = False
            break
        paths.append(Path(tuple(m.group("steps").split(".")), m.group("is")))
    expression = " | ".join(parts)
    evaluator = None
    if not simple:  # pragma: no cover - none of the shipped definitions needs it
        from fhirpathpy import compile as fp_compile
        evaluator = fp_compile(expression.replace("Resource.", resource_type + "."))
        paths = []
    return SearchParam(name=sp["code"], type=sp["type"], expression=expression,
                       paths=tuple(paths), targets=tuple(sp.get("target") or ()),
                       url=sp.get("url", ""), evaluator=evaluator)


def _load() -> dict[str, dict[str, SearchParam]]:
    bundle = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    by_code: dict[tuple[str, str], dict] = {}
    for entry in bundle.get("entry", []):
        sp = entry["resource"]
        for base in sp.get("base", []):
            by_code[(base, sp["code"])] = sp
    out: dict[str, dict[str, SearchParam]] = {}
    for rtype, names in WANTED.items():
        params = {}
        for name in COMMON + names:
            sp = by_code.get((rtype, name)) or by_code.get(("Resource", name))
            if sp is None:
                raise ValueError(f"no SearchParameter {rtype}.{name} in {DATA_FILE.name}")
            params[name] = _compile(rtype, sp)
        out[rtype] = params
    return out


SUPPORTED: dict[str, dict[str, SearchParam]] = _load()
