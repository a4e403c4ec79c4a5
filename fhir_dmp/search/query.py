"""Query parameters -> :class:`SearchRequest` -> MongoDB filter and sort.

Follows https://hl7.org/fhir/R4/search.html: comma = OR inside one
parameter, a repeated parameter = AND; modifiers per parameter type; date
prefixes (#prefix); result parameters (#return). Filters address the index
built by :mod:`fhir_dmp.search.extract` (see its docstring for the shape).

Injection: parameter names are looked up in a fixed table (never used as
field names), values only ever appear as BSON *values* (strings, datetimes)
or inside ``re.escape``-d regular expressions, so ``$where``, ``[$ne]`` or
regex metacharacters are plain data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..http.errors import BadRequest
from .extract import TEXT, parse_reference, sort_key_name
from .registry import SUPPORTED, WANTED, SearchParam
from .values import (ID_RE, TYPE_RE, UTC, date_range, normalize, shift, split_unescaped,
                     unescape)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_MOD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_ELEMENT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_COUNT_RE = re.compile(r"^[0-9]{1,9}$")

DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
SUMMARY_VALUES = ("count", "true", "data", "text", "false")
TOTAL_VALUES = ("none", "estimate", "accurate")
PASS_THROUGH = ("_format", "_pretty")
SINGLE_CONTROL = ("_sort", "_count", "_total", "_summary", "_elements", "_cursor") + PASS_THROUGH
MODIFIERS = {
    "token": ("not", "missing", "text"),
    "string": ("exact", "contains", "missing"),
    "date": ("missing",),
    "reference": ("identifier", "missing"),  # plus a target type
}
BOOLEAN_TOKENS = {("Patient", "active")}
MAX_VALUES = 1000  # OR-ed values in one parameter (revinclude passes a page of ids)


def _bad(msg: str, name: str) -> BadRequest:
    return BadRequest(msg, expression=_safe(name))


def _safe(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


@dataclass(frozen=True)
class Include:
    """One ``_include``/``_revinclude``: resources of ``source_type`` and their
    reference parameter ``param`` (optionally restricted to ``target_type``)."""

    source_type: str
    param: str
    target_type: str | None = None
    iterate: bool = False

    def __str__(self) -> str:
        return ":".join(x for x in (self.source_type, self.param, self.target_type) if x)


@dataclass
class Criterion:
    """One query parameter occurrence: OR of ``values``; criteria are AND-ed."""

    name: str
    param: SearchParam
    modifier: str | None
    raw: str
    values: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.modifier}" if self.modifier else self.name


def effective_targets(param: SearchParam) -> tuple[str, ...]:
    """Targets after ``.where(resolve() is T)`` restrictions; R4's ``Any`` (``Task.focus``): every
    type this server hosts."""
    restricted = {p.resolve_is for p in param.paths}
    if param.paths and None not in restricted:
        return tuple(sorted(restricted))
    if "Any" in param.targets:
        return tuple(sorted(WANTED))
    return param.targets


# --------------------------------------------------------------------------- value parsing

def _token_value(v: str, name: str) -> tuple:
    parts = split_unescaped(v, "|")
    if len(parts) == 1:
        code = unescape(parts[0])
        if not code:
            raise _bad(f"Empty value for search parameter {name}", name)
        return ("any", None, code)
    if len(parts) != 2:
        raise _bad(f"Too many '|' in the value of search parameter {name}", name)
    system, code = unescape(parts[0]), unescape(parts[1])
    if not system and not code:
        raise _bad(f"Empty value for search parameter {name}", name)
    if not system:
        return ("nosys", None, code)
    if not code:
        return ("sys", system, None)
    return ("both", system, code)


def _date_value(v: str, name: str) -> tuple:
    prefix, rest = "eq", v
    if v[:2] in DATE_PREFIXES and not v[:2].isdigit():
        prefix, rest = v[:2], v[2:]
    rng = date_range(rest)
    if rng is None:
        raise _bad(f"Invalid date value for search parameter {name}", name)
    return (prefix, rng[0], rng[1])


def _reference_value(v: str, crit: Criterion, base_url: str | None) -> dict:
    name, mod, param = crit.name, crit.modifier, crit.param
    f = "s." + name
    if mod == "identifier":
        kind, system, code = _token_value(v, name)
        if kind == "any":
            return {f + ".iv": code}
        if kind == "sys":
            return {f + ".is": system}
        # the value alone as well (implied by the $elemMatch): an index on ``.iv`` can serve it
        # (search/indexes.py: the journal's agent), one on the array itself cannot
        return {f: {"$elemMatch": {"is": system, "iv": code}}, f + ".iv": code}
    v = unescape(v)
    targets = effective_targets(param)
    if "://" in v or v.startswith("urn:"):
        parsed = parse_reference(v, base_url)
        if parsed is None:
            raise _bad(f"Invalid reference for search parameter {name}", name)
        r = parsed["r"]
        if mod and parsed.get("t") != mod:
            raise _bad(f"Reference type does not match modifier :{mod} of {name}", name)
        if "://" in r and parsed.get("t") and base_url is None:
            # base unknown here: the URL may be ours (stored relative) or foreign (stored as is)
            return {"$or": [{f + ".r": r}, {f + ".r": f"{parsed['t']}/{parsed['i']}"}]}
        return {f + ".r": r}
    if "/" in v:
        parsed = parse_reference(v)
        if not parsed or parsed.get("r") != f"{parsed.get('t')}/{parsed.get('i')}":
            raise _bad(f"Invalid reference for search parameter {name}", name)
        if mod and parsed["t"] != mod:
            raise _bad(f"Reference type does not match modifier :{mod} of {name}", name)
        if parsed["t"] not in targets:
            raise _bad(f"Search parameter {name} cannot refer to {parsed['t']}", name)
        return {f + ".r": parsed["r"]}
    if not ID_RE.match(v):
        raise _bad(f"Invalid id for search parameter {name}", name)
    if mod:
        return {f + ".r": f"{mod}/{v}"}
    if len(targets) == 1:
        return {f + ".r": f"{targets[0]}/{v}"}
    return {f + ".i": v}


# --------------------------------------------------------------------------- filters

def _token_filter(crit: Criterion) -> dict:
    name = crit.name
    if name == "_id":
        op = "$nin" if crit.modifier == "not" else "$in"
        return {"_id": {op: [c for _, _, c in crit.values]}}
    f = "s." + name
    if crit.modifier == "text":
        ors = [{f + TEXT: {"$regex": r"(?:^|\s)" + re.escape(normalize(v))}} for v in crit.values]
        return ors[0] if len(ors) == 1 else {"$or": ors}
    plain = [c for kind, _, c in crit.values if kind == "any"]
    ors = []
    if plain:
        ors.append({f + ".c": plain[0] if len(plain) == 1 else {"$in": plain}})
    for kind, system, code in crit.values:
        if kind == "both":
            ors.append({f: {"$elemMatch": {"s": system, "c": code}}})
        elif kind == "nosys":
            ors.append({f: {"$elemMatch": {"s": None, "c": code}}})
        elif kind == "sys":
            ors.append({f + ".s": system})
    if crit.modifier == "not":
        # resources with no matching value, those missing the element included
        return {"$nor": ors}
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _string_filter(crit: Criterion) -> dict:
    f = "s." + crit.name
    ors = []
    for v in crit.values:
        if crit.modifier == "exact":
            ors.append({f + ".v": v})
        elif crit.modifier == "contains":
            ors.append({f + ".n": {"$regex": re.escape(normalize(v))}})
        else:
            ors.append({f + ".n": {"$regex": "^" + re.escape(normalize(v))}})
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _date_one(f: str, prefix: str, qlo: datetime, qhi: datetime, now: datetime) -> dict:
    """One prefixed date value against half-open ranges [lo, hi)
    (https://hl7.org/fhir/R4/search.html#prefix)."""
    contained = {f: {"$elemMatch": {"lo": {"$gte": qlo}, "hi": {"$lte": qhi}}}}
    if prefix == "eq":    # the search range fully contains the target range
        return contained
    if prefix == "ne":    # ... does not fully contain it
        return {"$or": [{f + ".lo": {"$lt": qlo}}, {f + ".hi": {"$gt": qhi}}]}
    if prefix == "gt":    # the range above the search value overlaps the target
        return {f + ".hi": {"$gt": qhi}}
    if prefix == "lt":    # the range below the search value overlaps the target
        return {f + ".lo": {"$lt": qlo}}
    if prefix == "ge":
        return {"$or": [{f + ".hi": {"$gt": qhi}}, contained]}
    if prefix == "le":
        return {"$or": [{f + ".lo": {"$lt": qlo}}, contained]}
    if prefix == "sa":    # starts after the end of the search range
        return {f + ".lo": {"$gte": qhi}}
    if prefix == "eb":    # ends before the start of the search range
        return {f + ".hi": {"$lte": qlo}}
    # ap: overlap with the search range widened by 10% of its distance from now, at least a day
    gap = max(abs(now - qlo) / 10, abs(now - qhi) / 10, timedelta(days=1))
    return {f: {"$elemMatch": {"lo": {"$lt": shift(qhi, gap)}, "hi": {"$gt": shift(qlo, -gap)}}}}


def _date_filter(crit: Criterion, now: datetime) -> dict:
    f = "s." + crit.name
    ors = [_date_one(f, p, lo, hi, now) for p, lo, hi in crit.values]
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _criterion_filter(crit: Criterion, now: datetime) -> dict:
    if crit.modifier == "missing":
        missing = crit.values[0]
        f = "s." + crit.name
        if crit.param.type == "token":
            absent = [{f: {"$exists": False}}, {f + TEXT: {"$exists": False}}]
            return {"$and": absent} if missing else {"$nor": [{"$and": absent}]}
        return {f: {"$exists": not missing}}
    t = crit.param.type
    if t == "token":
        return _token_filter(crit)
    if t == "string":
        return _string_filter(crit)
    if t == "date":
        return _date_filter(crit, now)
    ors = crit.values
    return ors[0] if len(ors) == 1 else {"$or": ors}


# --------------------------------------------------------------------------- request

@dataclass
class SearchRequest:
    """A parsed, validated search. Build it with :func:`parse_search`."""

    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, int]] = field(default_factory=lambda: [("_lastUpdated", -1)])
    count: int = 50
    total: str = "accurate"
    summary: str | None = None
    elements: list[str] | None = None
    include: list[Include] = field(default_factory=list)
    revinclude: list[Include] = field(default_factory=list)
    cursor: str | None = None
    ignored: list[str] = field(default_factory=list)
    explicit_sort: bool = False
    explicit_total: bool = False
    passthrough: list[tuple[str, str]] = field(default_factory=list)
    now: datetime | None = None  # reference instant for ``ap`` (None: at filter time)

    def mongo_filter(self) -> dict:
        """Filter on the stored document fields (``s.*``, ``_id``); the caller adds
        ``del``/``pid`` conditions and :func:`keyset_filter`."""
        now = self.now or datetime.now(UTC)
        parts = [_criterion_filter(c, now) for c in self.criteria]
        if not parts:
            return {}
        return parts[0] if len(parts) == 1 else {"$and": parts}

    def mongo_sort(self) -> list[tuple[str, int]]:
        """Sort on ``o.*`` keys, ties broken on ``_id`` ascending (or on ``_id``
        itself when it is a sort key; later keys are then useless and dropped)."""
        out = []
        for name, direction in self.sort:
            if name == "_id":
                out.append(("_id", direction))
                return out
            out.append(("o." + sort_key_name(name, direction), direction))
        out.append(("_id", 1))
        return out

    def self_params(self) -> list[tuple[str, str]]:
        """Normalised parameters to rebuild the self/next links (no ``_cursor``)."""
        out = [(c.key, c.raw) for c in self.criteria]
        out += [("_include:iterate" if i.iterate else "_include", str(i)) for i in self.include]
        out += [("_revinclude:iterate" if i.iterate else "_revinclude", str(i))
                for i in self.revinclude]
        if self.explicit_sort:
            out.append(("_sort", ",".join(("-" if d < 0 else "") + n for n, d in self.sort)))
        out.append(("_count", str(self.count)))
        if self.explicit_total:
            out.append(("_total", self.total))
        if self.summary is not None:
            out.append(("_summary", self.summary))
        if self.elements is not None:
            out.append(("_elements", ",".join(self.elements)))
        out += self.passthrough
        return out


def _parse_include(value: str, name: str, resource_type: str, rev: bool, iterate: bool) -> Include:
    parts = value.split(":")
    if value.strip() == "*" or len(parts) not in (2, 3) or "*" in parts:
        raise _bad(f"Unsupported value for {name} (expected Type:parameter[:targetType])", name)
    source, pname = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    params = SUPPORTED.get(source)
    param = params.get(pname) if params else None
    if param is None or param.type != "reference":
        raise _bad(f"Unknown reference parameter in {name}", name)
    targets = effective_targets(param)
    if target is not None and (not TYPE_RE.match(target) or target not in targets):
        raise _bad(f"Invalid target type in {name}", name)
    if not iterate:
        if not rev and source != resource_type:
            raise _bad(f"{name} must name a parameter of {resource_type}", name)
        if rev and resource_type not in ((target,) if target else targets):
            raise _bad(f"{name} parameter does not refer to {resource_type}", name)
    return Include(source, pname, target, iterate)


def parse_search(resource_type: str, params: list[tuple[str, str]], *, lenient: bool = False,
                 max_count: int = 1000, default_count: int = 50,
                 base_url: str | None = None) -> SearchRequest:
    """Parse query parameters (repeated names allowed; values may contain commas = OR).

    Raises :class:`BadRequest` (``expression`` = the parameter name) for unknown
    parameters or modifiers and malformed values, unless ``lenient`` (then
    unknown parameters / unsupported modifiers are dropped and listed in
    ``ignored``; malformed values are still rejected). ``base_url`` (optional)
    recognises absolute references to this server.
    """
    supported = SUPPORTED.get(resource_type)
    if supported is None:
        raise BadRequest(f"Search is not supported on {resource_type!r}")
    req = SearchRequest(resource_type=resource_type, count=min(default_count, max_count))
    seen_control: set[str] = set()

    def unknown(key: str, msg: str):
        if lenient:
            req.ignored.append(_safe(key))
            return
        raise _bad(msg, key)

    for key, value in params:
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("Search parameters must be strings")
        name, _, modifier = key.partition(":")
        if not _NAME_RE.match(name) or (modifier and not _MOD_RE.match(modifier)):
            unknown(key, f"Unknown search parameter {_safe(key)!r}")
            continue
        # ----------------------------------------------------------- result parameters
        if name in ("_include", "_revinclude"):
            if modifier not in ("", "iterate"):
                unknown(key, f"Unknown modifier on {name}")
                continue
            inc = _parse_include(value, name, resource_type, name == "_revinclude",
                                 modifier == "iterate")
            (req.revinclude if name == "_revinclude" else req.include).append(inc)
            continue
        if name in SINGLE_CONTROL:
            if modifier:
                unknown(key, f"Unknown modifier on {name}")
                continue
            if name in seen_control:
                raise _bad(f"Parameter {name} given more than once", name)
            seen_control.add(name)
            _parse_control(req, name, value, supported, max_count)
            continue
        # ----------------------------------------------------------- criteria
        param = supported.get(name)
        if param is None:
            unknown(key, f"Unknown search parameter {_safe(name)!r} for {resource_type}")
            continue
        if modifier and not _modifier_ok(param, modifier):
            unknown(key, f"Unsupported modifier :{_safe(modifier)} on search parameter {name}")
            continue
        crit = Criterion(name, param, modifier or None, value)
        _parse_values(crit, resource_type, base_url)
        req.criteria.append(crit)
    return req


def _modifier_ok(param: SearchParam, modifier: str) -> bool:
    if param.name == "_id":
        return modifier == "not"
    if modifier in MODIFIERS.get(param.type, ()):
        return True
    return param.type == "reference" and modifier in effective_targets(param)


def _parse_values(crit: Criterion, resource_type: str, base_url: str | None) -> None:
    name, value = crit.name, crit.raw
    if crit.modifier == "missing":
        if value not in ("true", "false"):
            raise _bad(f":missing on {name} takes true or false", name)
        crit.values = [value == "true"]
        return
    raw_values = split_unescaped(value, ",")
    if len(raw_values) > MAX_VALUES:
        raise _bad(f"Too many values for search parameter {name}", name)
    t = crit.param.type
    for v in raw_values:
        if v == "":
            raise _bad(f"Empty value for search parameter {name}", name)
        if t == "token":
            if crit.modifier == "text":
                text = unescape(v)
                if not normalize(text):
                    raise _bad(f"Empty value for search parameter {name}", name)
                crit.values.append(text)
                continue
            tok = _token_value(v, name)
            if name == "_id" and (tok[0] != "any" or not ID_RE.match(tok[2])):
                raise _bad("Invalid resource id in _id", name)
            if (resource_type, name) in BOOLEAN_TOKENS and tok[2] not in ("true", "false"):
                raise _bad(f"Search parameter {name} takes true or false", name)
            crit.values.append(tok)
        elif t == "string":
            text = unescape(v)
            if crit.modifier != "exact" and not normalize(text):
                raise _bad(f"Empty value for search parameter {name}", name)
            crit.values.append(text)
        elif t == "date":
            crit.values.append(_date_value(v, name))
        elif t == "reference":
            crit.values.append(_reference_value(v, crit, base_url))


def _parse_control(req: SearchRequest, name: str, value: str, supported: dict, max_count: int):
    if name == "_count":
        if not _COUNT_RE.match(value):
            raise _bad("_count must be a non-negative integer", name)
        req.count = min(int(value), max_count)
    elif name == "_sort":
        sort, seen = [], set()
        for item in value.split(","):
            direction = -1 if item.startswith("-") else 1
            pname = item[1:] if direction < 0 else item
            if pname not in supported:
                raise _bad(f"Cannot sort on {_safe(pname)!r}", name)
            if pname in seen:
                raise _bad(f"Sort key {pname} given twice", name)
            seen.add(pname)
            sort.append((pname, direction))
        req.sort, req.explicit_sort = sort, True
    elif name == "_total":
        if value not in TOTAL_VALUES:
            raise _bad("_total must be none, estimate or accurate", name)
        req.total, req.explicit_total = value, True
    elif name == "_summary":
        if value not in SUMMARY_VALUES:
            raise _bad("_summary must be one of " + ", ".join(SUMMARY_VALUES), name)
        req.summary = value
    elif name == "_elements":
        elements = []
        for item in value.split(","):
            item = item.strip()
            if item.startswith(req.resource_type + "."):
                item = item[len(req.resource_type) + 1:]
            if not _ELEMENT_RE.match(item):
                raise _bad("Invalid element name in _elements", name)
            if item not in elements:
                elements.append(item)
        req.elements = elements
    elif name == "_cursor":
        if not value:
            raise _bad("Empty _cursor", name)
        req.cursor = value
    else:  # _format, _pretty: not criteria, kept for links
        req.passthrough.append((name, value))
