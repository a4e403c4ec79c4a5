"""Resource -> search index (``s``) and sort keys (``o``) of the stored document.

Shape of ``s`` (only non-empty entries are stored, so ``:missing`` is
``$exists``); ``_id`` is not indexed here, queries use the document ``_id``:

* token      ``s[p] = [{"s": system?, "c": code?}, ...]`` and
             ``s[p + ":text"] = [normalised display/text, ...]``
  (Identifier -> system/value, Coding -> system/code, CodeableConcept -> each
  coding, code/string -> code, boolean -> "true"/"false")
* string     ``s[p] = [{"n": normalised, "v": as written}, ...]`` (HumanName
  and Address give one entry per part, https://hl7.org/fhir/R4/search.html#string)
* date       ``s[p] = [{"lo": datetime, "hi": datetime}, ...]`` half-open UTC
  range from the value's precision; Period start/end (open end = DATE_MAX)
* reference  ``s[p] = [{"r": "Type/id" | absolute url | urn, "t": Type, "i": id,
  "is": identifier.system, "iv": identifier.value}, ...]``

Shape of ``o``: for every parameter but ``_id``, ``o[p]`` is the ascending key
(the minimum value) and ``o[p + "~d"]`` the descending key (the maximum);
a missing element gets a sentinel of the same BSON type that sorts last in
that direction (``values.STR_HIGH``/``DATE_MAX`` ascending,
``STR_LOW``/``DATE_MIN`` descending). Date keys use the range low bound
ascending and the high bound descending; HumanName sorts on "family given".
"""
from __future__ import annotations

import functools

from .registry import PATIENT_COMPARTMENT, SUPPORTED, Path, SearchParam
from .values import (DATE_MAX, DATE_MIN, ID_RE, MEMO_MAX_LEN, STR_HIGH, STR_LOW, TYPE_RE, date_range,
                     normalize)

DESC = "~d"
TEXT = ":text"


def sort_key_name(param: str, direction: int) -> str:
    """Field of ``o`` holding the sort key of ``param`` for ``direction``."""
    return param if direction > 0 else param + DESC


# --------------------------------------------------------------------------- walking

def _walk(resource: dict, path: Path) -> list:
    return _resolved(_walk_steps(resource, path.steps), path.resolve_is)


def _resolved(nodes: list, resolve_is: str | None) -> list:
    """``nodes`` less the references that do not point to a ``resolve_is`` (FHIRPath
    ``where(resolve() is X)``); all of them without one."""
    if not resolve_is:
        return nodes
    return [n for n in nodes if isinstance(n, dict) and reference_type(n) == resolve_is]


def _walk_steps(resource: dict, steps: tuple[str, ...]) -> list:
    if len(steps) == 1 and isinstance(resource, dict):   # most parameters: one element
        v = resource.get(steps[0])
        if v is None:
            return []
        return [x for x in v if x is not None] if isinstance(v, list) else [v]
    nodes = [resource]
    for step in steps:
        nxt = []
        for node in nodes:
            if isinstance(node, dict):
                v = node.get(step)
                if v is None:
                    continue
                if isinstance(v, list):
                    nxt.extend([x for x in v if x is not None])
                else:
                    nxt.append(v)
        nodes = nxt
        if not nodes:
            break
    return nodes


def values_of(param: SearchParam, resource: dict, resource_type: str) -> list:
    """The raw FHIR values selected by the parameter's expression."""
    if param.evaluator is not None:  # pragma: no cover - fallback, see registry
        return list(param.evaluator(resource))
    if len(param.paths) == 1:
        return _walk(resource, param.paths[0])
    out = []
    for path in param.paths:
        out.extend(_walk(resource, path))
    return out


# --------------------------------------------------------------------------- references

def parse_reference(ref: str, base_url: str | None = None) -> dict | None:
    """Index form of a literal reference string: ``{"r", "t", "i"}`` (a new dict: the caller's).

    ``Type/id[/_history/v]`` -> relative; an absolute URL under ``base_url``
    -> relative; another absolute URL ending in ``Type/id`` keeps the URL in
    ``r`` with ``t``/``i`` set; ``urn:`` -> ``r`` only; ``#local`` -> None.
    """
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None
    if len(ref) > MEMO_MAX_LEN:
        return dict(_parse_reference.__wrapped__(ref, base_url))
    return dict(_parse_reference(ref, base_url))


@functools.lru_cache(maxsize=4096)
def _parse_reference(ref: str, base_url: str | None) -> dict:
    """:func:`parse_reference` of a non-empty string, memoized (an AuditEvent's references are
    parsed by several parameters, and the same patients come back): never handed out as is."""
    if base_url and ref.startswith(base_url.rstrip("/") + "/"):
        ref = ref[len(base_url.rstrip("/")) + 1:]
    if ref.startswith("urn:"):
        return {"r": ref}
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and TYPE_RE.match(parts[-2]) and ID_RE.match(parts[-1]):
        rtype, rid = parts[-2], parts[-1]
        if len(parts) == 2:
            return {"r": f"{rtype}/{rid}", "t": rtype, "i": rid}
        if "://" in ref:
            return {"r": "/".join(parts), "t": rtype, "i": rid}
    return {"r": ref}


def reference_id(reference: str | None, rtype: str) -> str | None:
    """The id of a literal reference to ``rtype`` (``Type/id``, versioned or absolute), else None."""
    parsed = parse_reference(reference) if reference else None
    return parsed["i"] if parsed and parsed.get("t") == rtype else None


def reference_type(reference: dict) -> str | None:
    """Target type of a Reference without resolving it (literal, then ``type``)."""
    lit = reference.get("reference")
    if isinstance(lit, str):
        parsed = parse_reference(lit)
        if parsed and parsed.get("t"):
            return parsed["t"]
    t = reference.get("type")
    return t if isinstance(t, str) else None


def _reference_entries(values: list, base_url: str | None) -> list[dict]:
    out = []
    for ref in values:
        if not isinstance(ref, dict):
            continue
        entry = parse_reference(ref.get("reference"), base_url) or {}
        if "t" not in entry and isinstance(ref.get("type"), str):
            entry["t"] = ref["type"]
        ident = ref.get("identifier")
        if isinstance(ident, dict):
            if isinstance(ident.get("system"), str):
                entry["is"] = ident["system"]
            if isinstance(ident.get("value"), str):
                entry["iv"] = ident["value"]
        if entry.get("r") or entry.get("iv") or entry.get("is"):
            out.append(entry)
    return out


def _ref_sort(e: dict) -> str:
    return e.get("r") or f"{e.get('is', '')}|{e.get('iv', '')}"


# --------------------------------------------------------------------------- tokens

def _token_entries(values: list) -> tuple[list[dict], list[str]]:
    entries, texts = [], []

    def coding(c: dict):
        e = {}
        if isinstance(c.get("system"), str):
            e["s"] = c["system"]
        if isinstance(c.get("code"), str):
            e["c"] = c["code"]
        if e:
            entries.append(e)
        if isinstance(c.get("display"), str):
            texts.append(c["display"])

    for v in values:
        if isinstance(v, bool):
            entries.append({"c": "true" if v else "false"})
        elif isinstance(v, (str, int, float)):
            entries.append({"c": str(v)})
        elif isinstance(v, dict):
            if "coding" in v or ("text" in v and "value" not in v and "code" not in v):
                for c in v.get("coding") or ():
                    if isinstance(c, dict):
                        coding(c)
                if isinstance(v.get("text"), str):
                    texts.append(v["text"])
            elif "code" in v:
                coding(v)
            elif "value" in v or "system" in v:  # Identifier (or ContactPoint)
                e = {}
                if isinstance(v.get("system"), str):
                    e["s"] = v["system"]
                if isinstance(v.get("value"), str):
                    e["c"] = v["value"]
                if e:
                    entries.append(e)
                typ = v.get("type")
                if isinstance(typ, dict) and isinstance(typ.get("text"), str):
                    texts.append(typ["text"])
    return _dedupe(entries), _dedupe([normalize(t) for t in texts if t.strip()])


# --------------------------------------------------------------------------- strings

_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _string_parts(v) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        out = []
        keys = _NAME_PARTS if ("family" in v or "given" in v or "prefix" in v) else (
            _ADDRESS_PARTS if ("line" in v or "city" in v or "postalCode" in v) else ("text",))
        for k in keys:
            x = v.get(k)
            if isinstance(x, str):
                out.append(x)
            elif isinstance(x, list):
                out.extend(s for s in x if isinstance(s, str))
        return out
    return []


def _string_sort_values(values: list) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, dict) and ("family" in v or "given" in v):
            parts = [v.get("family")] + list(v.get("given") or [])
            s = normalize(" ".join(p for p in parts if isinstance(p, str)))
        else:
            s = " ".join(normalize(p) for p in _string_parts(v))
        if s:
            out.append(s)
    return out


# --------------------------------------------------------------------------- dates

def _date_entries(values: list) -> list[dict]:
    out = []
    for v in values:
        if isinstance(v, str):
            rng = date_range(v)
            if rng:
                out.append({"lo": rng[0], "hi": rng[1]})
        elif isinstance(v, dict) and ("start" in v or "end" in v):  # Period
            start = date_range(v["start"]) if v.get("start") else None
            end = date_range(v["end"]) if v.get("end") else None
            if (v.get("start") and not start) or (v.get("end") and not end):
                continue
            out.append({"lo": start[0] if start else DATE_MIN, "hi": end[1] if end else DATE_MAX})
    return out


# --------------------------------------------------------------------------- public

def _dedupe(items: list) -> list:
    if len(items) < 2:          # most parameters have one value
        return list(items)
    seen, out = set(), []
    for x in items:
        key = tuple(sorted(x.items())) if isinstance(x, dict) else x
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out


def extract(resource_type: str, resource: dict, *, base_url: str | None = None) -> tuple[dict, dict]:
    """(index, sort_keys) to store as ``s`` and ``o`` in the stored document.

    Never raises on odd content: values that cannot be indexed are skipped
    (validation is the profiles' job). ``base_url``, when given, turns absolute
    references under it into relative ones. ``_lastUpdated`` is read from
    ``meta.lastUpdated``, so storage sets it before calling this.

    An AuditEvent (one per access: the journal sealer indexes every one) takes
    :func:`_extract_memoized`, which gives exactly what :func:`extract_reference` gives
    (tests/search/test_extract_events.py) for less: the parameters that do not depend on the
    event's instant, id or request (type, subtype, action, outcome, purpose, agent) come back
    on every event of a principal and are memoized, and walks shared by several parameters are
    walked once (bench/README.md, issue 22).
    """
    if resource_type in _MEMOIZED and base_url is None and _plan(resource_type) is not None:
        return _extract_memoized(resource_type, resource)
    return extract_reference(resource_type, resource, base_url=base_url)


def extract_reference(resource_type: str, resource: dict, *, base_url: str | None = None) -> tuple[dict, dict]:
    """:func:`extract` parameter by parameter, nothing memoized: the reference that the memoized
    path of the AuditEvents is held to."""
    params = SUPPORTED.get(resource_type)
    if params is None:
        raise KeyError(f"unsupported resource type {resource_type}")
    s: dict = {}
    o: dict = {}
    for name, param in params.items():
        if name == "_id":
            continue
        _index(name, param.type, values_of(param, resource, resource_type), base_url, s, o)
    return s, o


def _index(name: str, ptype: str, values: list, base_url: str | None, s: dict, o: dict) -> None:
    """Put parameter ``name``'s index entries into ``s`` and its sort keys into ``o``."""
    if ptype == "token":
        entries, texts = _token_entries(values)
        if entries:
            s[name] = entries
        if texts:
            s[name + TEXT] = texts
        keys = [e.get("c") or e.get("s") for e in entries]
    elif ptype == "string":
        entries = _dedupe([{"n": normalize(p), "v": p}
                           for v in values for p in _string_parts(v) if p.strip()])
        if entries:
            s[name] = entries
        keys = _string_sort_values(values)
    elif ptype == "date":
        entries = _date_entries(values)
        if entries:
            s[name] = entries
        o[name] = min((e["lo"] for e in entries), default=DATE_MAX)
        o[name + DESC] = max((e["hi"] for e in entries), default=DATE_MIN)
        return
    elif ptype == "reference":
        entries = _dedupe(_reference_entries(values, base_url))
        if entries:
            s[name] = entries
        keys = [_ref_sort(e) for e in entries]
    else:  # pragma: no cover - registry only ships the four types above
        return
    keys = [k for k in keys if k]
    o[name] = min(keys) if keys else STR_HIGH
    o[name + DESC] = max(keys) if keys else STR_LOW


# --------------------------------------------------------------------------- memoized (AuditEvent)

#: bound of the memo of :func:`_extract_memoized` (keys: one parameter's values as their index reads
#: them); emptied when full
MEMO_ENTRIES = 4096
_memo: dict = {}


def _text(d: dict, k: str) -> str | None:
    v = d.get(k)
    return v if type(v) is str else None


def _coding_key(c: dict) -> tuple:
    """What :func:`_token_entries` reads of a Coding (or of a CodeableConcept's coding)."""
    return _text(c, "system"), _text(c, "code"), _text(c, "display")


def _token_key(values: list) -> tuple | None:
    """Everything :func:`_token_entries` reads of ``values`` when each is a string, a Coding or a
    CodeableConcept (a list of codings); None for another shape (then not memoized)."""
    key = []
    for v in values:
        t = type(v)
        if t is str:
            key.append(v)
        elif t is not dict:
            return None
        elif "coding" in v or ("text" in v and "value" not in v and "code" not in v):
            codings = v.get("coding") or []
            if type(codings) is not list:
                return None
            key.append((tuple(_coding_key(c) for c in codings if isinstance(c, dict)), _text(v, "text")))
        elif "code" in v:
            key.append(_coding_key(v))
        else:
            return None
    return ("token",) + tuple(key)


def _reference_key(values: list) -> tuple:
    """Everything :func:`_reference_entries` reads of ``values`` (references only when
    ``base_url`` is None)."""
    key = []
    for ref in values:
        if isinstance(ref, dict):
            ident = ref.get("identifier")
            ident = (_text(ident, "system"), _text(ident, "value")) if isinstance(ident, dict) else None
            key.append((_text(ref, "reference"), _text(ref, "type"), ident))
    return ("reference",) + tuple(key)


#: per type, the parameters looked up in the memo by what their index reads of the values
#: (:func:`_token_key`, :func:`_reference_key`): those whose values do not depend on the
#: resource's instant, id or request
_MEMOIZED = {"AuditEvent": {"type": _token_key, "subtype": _token_key, "action": _token_key,
                            "outcome": _token_key, "purpose": _token_key, "agent": _reference_key}}


@functools.lru_cache(maxsize=None)
def _plan(resource_type: str) -> tuple | None:
    """Per parameter of ``resource_type`` (``_id`` aside): name, type, paths as (steps,
    resolve_is), memo key function or None. None when a parameter is not a plain path (then
    :func:`extract_reference` serves)."""
    params = [(name, p) for name, p in SUPPORTED[resource_type].items() if name != "_id"]
    if any(p.evaluator is not None for _, p in params):  # pragma: no cover - see registry
        return None
    memoized = _MEMOIZED[resource_type]
    return tuple((name, p.type, tuple((path.steps, path.resolve_is) for path in p.paths), memoized.get(name))
                 for name, p in params)


def _extract_memoized(resource_type: str, resource: dict) -> tuple[dict, dict]:
    """:func:`extract_reference` (no ``base_url``) with the parameters of ``_MEMOIZED`` looked up
    by the key of their values, and each path walked once (``patient`` filters the walks of
    ``agent`` and ``entity``)."""
    walked: dict = {}
    s: dict = {}
    o: dict = {}
    for name, ptype, paths, keyer in _plan(resource_type):
        values = []
        for steps, resolve_is in paths:
            nodes = walked.get(steps)
            if nodes is None:
                nodes = walked[steps] = _walk_steps(resource, steps)
            values.extend(_resolved(nodes, resolve_is))
        key = keyer(values) if keyer is not None else None
        if key is None:
            _index(name, ptype, values, None, s, o)
            continue
        key = (name,) + key
        hit = _memo.get(key)
        if hit is None:
            one_s: dict = {}
            one_o: dict = {}
            _index(name, ptype, values, None, one_s, one_o)
            if len(_memo) >= MEMO_ENTRIES:
                _memo.clear()
            hit = _memo[key] = (tuple(one_s.items()), tuple(one_o.items()))
        for field, entries in hit[0]:    # copies: the caller's to keep or change
            s[field] = [dict(e) if type(e) is dict else e for e in entries]
        o.update(hit[1])
    return s, o


def patient_id_of(resource_type: str, resource: dict, *, base_url: str | None = None) -> str | None:
    """Owning patient id (https://hl7.org/fhir/R4/compartmentdefinition-patient.html).

    Patient -> its id; DocumentReference/Communication -> ``subject`` when it is
    a Patient; Consent, RelatedPerson -> ``patient``; Task -> ``for``; AuditEvent -> the first Patient in
    ``entity.what`` then ``agent.who``; Binary and others -> None (storage sets
    it). Only relative references (or absolute ones under ``base_url``) count:
    a Patient on another server is not ours.
    """
    if resource_type == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    if resource_type not in PATIENT_COMPARTMENT:
        return None
    if resource_type in ("DocumentReference", "Communication"):
        candidates = [resource.get("subject")]
    elif resource_type in ("Consent", "RelatedPerson"):
        candidates = [resource.get("patient")]
    elif resource_type == "Task":
        candidates = [resource.get("for")]
    else:  # AuditEvent
        candidates = [e.get("what") for e in resource.get("entity") or () if isinstance(e, dict)]
        candidates += [a.get("who") for a in resource.get("agent") or () if isinstance(a, dict)]
    for ref in candidates:
        if isinstance(ref, dict):
            parsed = parse_reference(ref.get("reference"), base_url)
            if parsed and parsed.get("t") == "Patient" and parsed["r"] == f"Patient/{parsed['i']}":
                return parsed["i"]
    return None
