"""Reading Consent resources as DMP choices (CONTRACT.md "The DMP in FHIR terms").

Pure functions over a Consent: its kind (authorization, block, opposition to feeding, opt-outs),
its actors (``system|value`` identifier keys), purposes and actions, whether it is in force at an
instant (FHIR dates of any precision), and the keys that name a caller. The decision
(:mod:`.state`'s ``PatientState.matching`` and :mod:`.dmp_access`) reads Consents only through them.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from ..principal import BTG, ETREAT, IDNATPS_SYSTEM, Principal

COLLECT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction|collect"


def now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# -- reading Consent resources as DMP choices (CONTRACT.md "The DMP in FHIR terms") ------------------
def identifier_key(system, value) -> str | None:
    """``system|value`` of an identifier; None without a system or a value (it never matches)."""
    if isinstance(system, str) and system.strip() and isinstance(value, str) and value.strip():
        return f"{system.strip()}|{value.strip()}"
    return None


def consent_actor_ids(consent: dict) -> set[str]:
    """``system|value`` of each provision.actor identifier (PS idNatPs or establishment).

    CONTRACT.md "Who the caller is": identifiers match on system and value; one without a
    system never matches anyone.
    """
    out = set()
    for actor in (consent.get("provision") or {}).get("actor") or []:
        ident = ((actor or {}).get("reference") or {}).get("identifier") or {}
        key = identifier_key(ident.get("system"), ident.get("value"))
        if key:
            out.add(key)
    return out


def consent_has_actor(consent: dict) -> bool:
    """True when provision.actor names anyone (even with an identifier that never matches)."""
    return bool((consent.get("provision") or {}).get("actor"))


def consent_purposes(consent: dict) -> set[str]:
    return {p.get("code") for p in (consent.get("provision") or {}).get("purpose") or [] if p.get("code")}


def consent_actions(consent: dict) -> set[str]:
    """``system|code`` of provision.action codings."""
    out = set()
    for concept in (consent.get("provision") or {}).get("action") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("code"):
                out.add(f"{coding.get('system')}|{coding['code']}")
    return out


def consent_kind(consent: dict) -> str:
    """'permit', 'block', 'oppose_feeding', 'optout_btg', 'optout_c15', 'deny_other' or 'unknown'."""
    prov = consent.get("provision") or {}
    ptype = prov.get("type")
    actors = consent_has_actor(consent)
    if ptype == "deny" and COLLECT_ACTION in consent_actions(consent):
        # opposition to feeding (CONTRACT.md "Lifecycle"): no actor = every PS, else that PS
        return "oppose_feeding"
    if ptype == "permit" and actors:
        return "permit"
    if ptype == "deny" and actors:
        return "block"
    if ptype == "deny" and not actors:
        purposes = consent_purposes(consent)
        if BTG in purposes:
            return "optout_btg"
        if ETREAT in purposes:
            return "optout_c15"
        return "deny_other"
    return "unknown"


def consent_in_force(consent: dict, at: datetime) -> bool:
    """Active and within ``provision.period`` at ``at``.

    Period bounds are FHIR dateTimes of any precision (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` or a
    full dateTime, https://hl7.org/fhir/R4/datatypes.html#dateTime): a start holds from the first
    instant it names, an end until the last. A deny Consent whose period cannot be read is in
    force (fail closed: a block or an opt-out is never switched off by a format); a permit whose
    period cannot be read is not.
    """
    if consent.get("status") != "active":
        return False
    period = (consent.get("provision") or {}).get("period") or {}
    try:
        start = fhir_instant(period["start"]) if period.get("start") else None
        end = fhir_instant(period["end"], end=True) if period.get("end") else None
    except (ValueError, TypeError, AttributeError):
        return (consent.get("provision") or {}).get("type") == "deny"
    if start is not None and start > at:
        return False
    if end is not None and end <= at:
        return False
    return True


_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def fhir_instant(value: str, end: bool = False) -> datetime:
    """The first instant a FHIR date/dateTime names, or with ``end`` the instant just after its
    last one (``2020-06`` ends at 2020-07-01T00:00Z). Dates without a zone are read as UTC.
    Raises ValueError for anything else."""
    m = _FHIR_DATE.match(value.strip())
    if m:
        year, month, day = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
        start = datetime(year, month, day, tzinfo=timezone.utc)
        if not end:
            return start
        if m.group(3):
            return start + timedelta(days=1)
        if m.group(2):
            return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=timezone.utc)
        return datetime(year + 1, 1, 1, tzinfo=timezone.utc)
    if "T" not in value:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    t = _aware(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    return t + timedelta(microseconds=1) if end else t


def principal_keys(p: Principal) -> set[str]:
    """Identifier keys of a caller (see :func:`consent_actor_ids`)."""
    if not p.is_professional:
        return set()
    ids = set()
    key = identifier_key(IDNATPS_SYSTEM, p.id_nat_ps)
    if key:
        ids.add(key)
    system, sep, value = (p.organization or "").partition("|")
    if sep and identifier_key(system, value):
        ids.add(identifier_key(system, value))
    return ids
