"""Keyset paging: stable next links whose cost does not grow with the page number.

The cursor is url-safe base64 (no padding) of the JSON
``{"v": [sort key values...], "id": "<_id of the last entry>"}``; dates are
written ``{"d": "<ISO instant>"}``. It carries no query: the next link
repeats the query parameters (``SearchRequest.self_params``) and adds
``_cursor``. Decoding is strict (alphabet, size, JSON shape, one value per
sort key of the right type): anything else is :class:`BadRequest`.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime

from ..http.errors import BadRequest
from .query import SearchRequest
from .registry import SUPPORTED
from .values import DATE_MAX, DATE_MIN, ID_RE, UTC

MAX_CURSOR = 4096
HISTORY_KEY_RE = re.compile(r"^(?:[A-Za-z]{1,64}/)?[A-Za-z0-9\-.]{1,64}/[0-9]{1,12}$")   # [Type/]id/vid
_B64_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _bad() -> BadRequest:
    return BadRequest("Invalid _cursor (it must be copied from a next link unchanged)",
                      expression="_cursor")


def _enc(v):
    if isinstance(v, datetime):
        if v.tzinfo is None:  # pymongo returns naive UTC datetimes
            v = v.replace(tzinfo=UTC)
        return {"d": v.astimezone(UTC).isoformat(timespec="milliseconds")}
    if isinstance(v, str):
        return v
    raise TypeError(f"cannot put {type(v).__name__} in a cursor")


def encode_cursor(sort_values: list, last_id: str) -> str:
    """Cursor for the position after the entry with ``sort_values`` (the
    ``o`` values of :meth:`SearchRequest.mongo_sort`, ``_id`` excluded) and
    ``last_id``."""
    raw = json.dumps({"v": [_enc(v) for v in sort_values], "id": last_id},
                     separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(raw.encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, *, id_re: re.Pattern = ID_RE) -> tuple[list, str]:
    """(values, last_id) of a cursor, types not yet checked against a sort; ``last_id`` must
    match ``id_re`` (a resource id unless told)."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR \
            or not _B64_RE.match(cursor):
        raise _bad()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw.decode("ascii"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _bad() from None
    if not isinstance(data, dict) or set(data) != {"v", "id"}:
        raise _bad()
    values, last_id = data["v"], data["id"]
    if not isinstance(values, list) or not isinstance(last_id, str) or not id_re.match(last_id):
        raise _bad()
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict) and set(v) == {"d"} and isinstance(v["d"], str):
            try:
                d = datetime.fromisoformat(v["d"])
            except ValueError:
                raise _bad() from None
            if d.tzinfo is None:
                raise _bad()
            d = d.astimezone(UTC)
            if not DATE_MIN <= d <= DATE_MAX:
                raise _bad()
            out.append(d)
        else:
            raise _bad()
    return out, last_id


def encode_history_cursor(position: tuple[datetime, str]) -> str:
    """Cursor of a history page (https://hl7.org/fhir/R4/http.html#history): the position
    ``(lastUpdated, key)`` of its last version, ``key`` being ``"Type/id/vid"`` or ``"id/vid"``
    (GuardedRepository.history, system_history); the same encoding as a search's."""
    lu, key = position
    return encode_cursor([lu], key)


def decode_history_cursor(cursor: str) -> tuple[datetime, str]:
    """``(lastUpdated, key)`` of :func:`encode_history_cursor`'s cursor; :class:`BadRequest` otherwise."""
    values, key = decode_cursor(cursor, id_re=HISTORY_KEY_RE)
    if len(values) != 1 or not isinstance(values[0], datetime):
        raise _bad()
    return values[0], key


def sort_values(req: SearchRequest, doc: dict) -> list:
    """The sort key values of a stored document for ``req``'s sort (no ``_id``)."""
    o = doc.get("o") or {}
    return [o[field[2:]] for field, _ in req.mongo_sort() if field != "_id"]


def cursor_after(req: SearchRequest, doc: dict) -> str:
    """Cursor for the next page after ``doc`` (the last entry of this page)."""
    return encode_cursor(sort_values(req, doc), doc["_id"])


def keyset_filter(req: SearchRequest) -> dict:
    """Extra filter selecting entries strictly after ``req.cursor`` in
    ``req.mongo_sort()`` order: ``$or`` of prefix-equal conditions, each
    comparison in its key's direction. ``{}`` when there is no cursor."""
    if not req.cursor:
        return {}
    values, last_id = decode_cursor(req.cursor)
    keys = req.mongo_sort()
    params = SUPPORTED[req.resource_type]
    sort_fields = [k for k in keys if k[0] != "_id"]
    if len(values) != len(sort_fields):
        raise _bad()
    for (fld, _), v in zip(sort_fields, values):
        pname = fld[2:].removesuffix("~d")
        if isinstance(v, datetime) != (params[pname].type == "date"):
            raise _bad()
    full = values + [last_id]  # mongo_sort() always ends with _id
    ors = []
    for i, (fld, direction) in enumerate(keys):
        cond = {keys[j][0]: full[j] for j in range(i)}
        cond[fld] = {"$gt" if direction > 0 else "$lt": full[i]}
        ors.append(cond)
    if len(ors) == 1:
        return ors[0]
    # redundant bound on the first key: gives a real MongoDB planner tight index bounds
    first, direction = keys[0]
    return {"$and": [{first: {"$gte" if direction > 0 else "$lte": full[0]}}, {"$or": ors}]}
