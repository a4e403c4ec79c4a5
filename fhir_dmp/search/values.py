"""Value helpers shared by indexing and querying: string normalisation,
FHIR date ranges, escaping, sentinels.

Everything here is pure and knows nothing of MongoDB queries.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from datetime import datetime, timedelta, timezone

UTC = timezone.utc

# BSON dates hold milliseconds; every bound is truncated to the millisecond.
MS = timedelta(milliseconds=1)
DATE_MIN = datetime(1, 1, 1, tzinfo=UTC)
DATE_MAX = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)

# Sort-key sentinels: a missing element sorts last in both directions
# (ascending keys use HIGH, descending keys use LOW), with the same BSON type
# as real values so that keyset comparisons ($gt/$lt) keep working.
STR_HIGH = "\U0010ffff"
STR_LOW = ""

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

# https://hl7.org/fhir/R4/datatypes.html#dateTime (and date, instant), plus
# minute precision and a missing zone, which search values may use.
_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


#: strings up to this length are memoized (:func:`normalize`, ``extract._parse_reference``): a
#: bounded cache of short codes, displays and references, never of a long text
MEMO_MAX_LEN = 256


def normalize(text: str) -> str:
    """Case- and accent-insensitive form: NFD, combining marks removed, casefolded,
    whitespace collapsed (https://hl7.org/fhir/R4/search.html#string). Memoized for short
    strings: the same displays (codings of every AuditEvent) come back on every write
    (bench/README.md, issue 22)."""
    return _normalize_short(text) if len(text) <= MEMO_MAX_LEN else _normalize(text)


def _normalize(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())


_normalize_short = functools.lru_cache(maxsize=8192)(_normalize)


def date_range(value: str) -> tuple[datetime, datetime] | None:
    """:func:`_date_range`, memoized (an AuditEvent's ``recorded`` is its ``meta.lastUpdated``:
    two parameters read one instant)."""
    if not isinstance(value, str):
        return None
    return _date_range_short(value) if len(value) <= MEMO_MAX_LEN else _date_range(value)


def _date_range(value: str) -> tuple[datetime, datetime] | None:
    """The half-open UTC range [low, high) that a FHIR date/dateTime/instant
    covers given its precision, or None when it is not a valid date.

    ``2020`` -> the whole year; ``2020-03-04T10:00`` -> that minute;
    ``...:00.123`` -> that millisecond. A time without zone is taken as UTC
    (so is a plain date). https://hl7.org/fhir/R4/search.html#date
    """
    if not isinstance(value, str):
        return None
    m = _DATE_RE.match(value)
    if not m:
        return None
    year, month, day, hh, mi, ss, frac, tz = m.groups()
    try:
        y = int(year)
        if y < 1:
            return None
        if month is None:
            lo = datetime(y, 1, 1, tzinfo=UTC)
            return lo, _add_years(lo, 1)
        mo = int(month)
        if day is None:
            lo = datetime(y, mo, 1, tzinfo=UTC)
            if mo < 12:
                return lo, datetime(y, mo + 1, 1, tzinfo=UTC)
            return lo, _add_years(lo.replace(month=1), 1)
        d = int(day)
        if hh is None:
            lo = datetime(y, mo, d, tzinfo=UTC)
            return lo, _add(lo, timedelta(days=1))
        zone = UTC
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
            if offset >= timedelta(hours=24):
                return None
            zone = timezone(sign * offset)
        local = datetime(y, mo, d, int(hh), int(mi), int(ss or 0), tzinfo=zone)
        if ss is None:
            step = timedelta(minutes=1)
        elif frac is None:
            step = timedelta(seconds=1)
        else:
            ms = int((frac + "000")[:3])
            local = local.replace(microsecond=ms * 1000)
            step = MS
        try:
            lo = local.astimezone(UTC)
        except OverflowError:
            return None
        return lo, _add(lo, step)
    except ValueError:
        return None


_date_range_short = functools.lru_cache(maxsize=1024)(_date_range)


def _add(dt: datetime, delta: timedelta) -> datetime:
    try:
        return min(dt + delta, DATE_MAX)
    except OverflowError:
        return DATE_MAX


def _add_years(dt: datetime, n: int) -> datetime:
    try:
        return dt.replace(year=dt.year + n)
    except ValueError:
        return DATE_MAX


def shift(dt: datetime, delta: timedelta) -> datetime:
    """``dt + delta`` clamped into [DATE_MIN, DATE_MAX]."""
    try:
        out = dt + delta
    except OverflowError:
        return DATE_MAX if delta > timedelta(0) else DATE_MIN
    return max(DATE_MIN, min(out, DATE_MAX))


def split_unescaped(value: str, sep: str) -> list[str]:
    """Split on ``sep`` not preceded by a backslash, then unescape ``\\,``
    ``\\|`` ``\\$`` ``\\\\`` (https://hl7.org/fhir/R4/search.html#escaping).
    A lone trailing backslash or an unknown escape is kept literally."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(ch + value[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(value: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", value)


def escape(value: str) -> str:
    """Inverse of :func:`unescape`, for rebuilding query strings."""
    return re.sub(r"([,|$\\])", r"\\\1", value)
