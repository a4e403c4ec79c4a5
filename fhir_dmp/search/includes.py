"""Helpers to resolve ``_include`` / ``_revinclude`` against stored documents
(https://hl7.org/fhir/R4/search.html#include). Storage runs the queries; the
caller must still apply the access decision to every included resource.
"""
from __future__ import annotations

from .query import Include


def include_targets(inc: Include, doc: dict) -> list[tuple[str, str]]:
    """``(type, id)`` of the local resources that stored ``doc`` (a match of
    ``inc.source_type``) points to through ``inc.param``, restricted to
    ``inc.target_type`` when set. Absolute/foreign and identifier-only
    references are skipped (nothing local to include)."""
    out = []
    for e in (doc.get("s") or {}).get(inc.param, ()):
        r, t, i = e.get("r"), e.get("t"), e.get("i")
        if not (t and i) or r != f"{t}/{i}":
            continue
        if inc.target_type and t != inc.target_type:
            continue
        if (t, i) not in out:
            out.append((t, i))
    return out


def revinclude_filter(inc: Include, target_type: str, ids: list[str]) -> dict:
    """Filter on ``inc.source_type``'s collection for the resources whose
    ``inc.param`` points to one of ``target_type``/``ids``."""
    if inc.target_type and inc.target_type != target_type:
        return {"_id": {"$in": []}}
    return {f"s.{inc.param}.r": {"$in": [f"{target_type}/{i}" for i in ids]}}
