"""The misuse scan (CONTRACT.md "Privacy operations", "Looking for misuse").

:func:`run_scan` scores every (professional, DMP) pair with an access by that professional in a
window of the journal, from what the server holds, and opens ``anomaly`` review cases for the
highest pairs within the day's budget. In three passes, memory bounded by the pairs, not the
events:

1. the journal of the window, streamed (``Storage.journal_window``): per pair the accesses, the
   documents read, first and last, the bases, break-glass and off-hours counts, and from where
   (network address, client, user agent: first and last time per place); per professional the
   profession, journaled name and establishment, and the spans of activity per place;
2. the records of the DMPs and professionals named (``storage/privacy.py``): the Patients (surnames,
   addresses, médecin traitant), the authorization Consents (given by the patient or attested by a
   PS), the deposits (DocumentReference authors), the directory (names, addresses);
3. the signals of each pair (``signals.py`` codes) and its score (``model.py``), written as NDJSON
   (CONTRACT.md's line, most suspicious first) and handed to the review cases
   (``review/cases.py`` ``open_cases``).

Signals:

- ``no-relationship``: nothing in the records shows care: not the médecin traitant, no
  authorization the patient gave (to the PS or its establishment), no document deposited, no
  creator or establishment basis in the window;
- ``attestation-only``: the same, and the PS's access rests on an authorization they attested;
- ``same-surname`` / ``same-place``: without care, the PS shares a surname (directory or journaled
  name) or a city or postal code (directory address) with the patient;
- ``bulk``: the pair is new on a day when the PS opened far more DMPs than their peers of the same
  profession (and than on their own other days, when they have three or more);
- ``shared-credential``: the pair was read from a place (address, client, user agent) that is not
  the professional's usual one while another was active (spans of activity, uses closer than
  :data:`GAP` joined, that overlap): one card or account used by two at once;
- ``break-glass-rate``: the pair was opened by break-glass by a PS whose break-glass DMPs are far
  above their profession's;
- ``off-hours``: most of the pair's accesses are at night or on a week-end (Paris time) while most
  of the professional's are not.

Scoring pairs, not professionals, keeps a snooper's snooping visible when they also read records
they have a reason to read.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, TextIO

from ..security.principal import BTG, IDNATPS_SYSTEM
from ..storage import instant, now as storage_now
from . import model
from .cases import ANOMALY, ReviewCase, case_input, open_cases
from .signals import (ATTESTATION_ONLY, BREAK_GLASS_BASES, BREAK_GLASS_RATE, BULK, CARE_BASES, DOCUMENT_TYPES,
                      NO_RELATIONSHIP, OFF_HOURS, SAME_PLACE, SAME_SURNAME, SHARED_CREDENTIAL, SIGNAL_SYSTEM,
                      Access, PatientFacts, PractitionerFacts, Relationship, access_of, consent_actors,
                      consent_attested, document_authors, journaled_surname, patient_facts, practitioner_facts)

log = logging.getLogger(__name__)

#: two uses of one credential closer than this are one span of activity
GAP = timedelta(minutes=15)
#: a day's new DMPs below this are never bulk; break-glass DMPs below this never a rate
BULK_MIN, BREAK_GLASS_MIN = 8, 3
#: pairs scored at least this are review candidates
REVIEW_MIN = 0.5
REVIEW_SYSTEM_CODES = {"justified": False, "unjustified": True}


@dataclass(slots=True)
class Pair:
    """One (professional, DMP) pair of the window."""

    accesses: int = 0
    documents: int = 0
    first: datetime | None = None
    last: datetime | None = None
    first_event: str = ""
    first_basis: str | None = None
    bases: set = field(default_factory=set)
    btg: int = 0
    off: int = 0
    places: dict = field(default_factory=dict)     # credential key -> [first, last]


@dataclass(slots=True)
class Actor:
    """One professional of the window."""

    profession: str | None = None
    name: str | None = None
    organization: str | None = None
    accesses: int = 0
    off: int = 0
    places: Counter = field(default_factory=Counter)
    spans: dict = field(default_factory=lambda: defaultdict(list))   # credential key -> [[start, end], ...]


@dataclass
class ScanResult:
    since: datetime | None
    until: datetime
    events: int
    pairs: int
    opened: list[str]
    seconds: float
    learned: bool = False       # the officers' verdicts took part in the score
    rows: list[dict] = field(default_factory=list, repr=False)   # kept only when asked (tests, bench)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _extend(spans: list, t: datetime) -> None:
    """Add ``t`` to a place's spans of activity (events come nearly in time order)."""
    if spans and spans[-1][0] - GAP <= t <= spans[-1][1] + GAP:
        span = spans[-1]
        span[0], span[1] = min(span[0], t), max(span[1], t)
    else:
        spans.append([t, t])


def _collect(storage, since, until) -> tuple[dict, dict, int]:
    pairs: dict[tuple[str, str], Pair] = {}
    actors: dict[str, Actor] = {}
    events = 0
    for pid, lu, event in storage.journal_window(since, until):
        access = access_of(pid, _aware(lu), event)
        if access is None:
            continue
        events += 1
        _add(pairs, actors, access)
    return pairs, actors, events


def _add(pairs: dict, actors: dict, a: Access) -> None:
    pair = pairs.get((a.actor, a.pid))
    if pair is None:
        pair = pairs[(a.actor, a.pid)] = Pair(first=a.at, last=a.at, first_event=a.event_id, first_basis=a.basis)
    elif a.at < pair.first:
        pair.first, pair.first_event, pair.first_basis = a.at, a.event_id, a.basis
    pair.last = max(pair.last, a.at)
    pair.accesses += 1
    if a.granted and a.resource_type in DOCUMENT_TYPES and a.interaction in ("read", "vread"):
        pair.documents += 1
    if a.basis:
        pair.bases.add(a.basis)
    if a.granted and (a.purpose == BTG or a.basis in BREAK_GLASS_BASES):
        pair.btg += 1
    off = a.off_hours
    pair.off += off
    key = a.credential_key
    seen = pair.places.get(key)
    pair.places[key] = [min(seen[0], a.at), max(seen[1], a.at)] if seen else [a.at, a.at]
    actor = actors.get(a.actor)
    if actor is None:
        actor = actors[a.actor] = Actor(profession=a.profession, name=a.name, organization=a.organization)
    actor.name = actor.name or a.name
    actor.organization = actor.organization or a.organization
    actor.accesses += 1
    actor.off += off
    actor.places[key] += 1
    _extend(actor.spans[key], a.at)


# -- the records -------------------------------------------------------------------------------

@dataclass
class Records:
    patients: dict[str, PatientFacts]
    practitioners: dict[str, PractitionerFacts]
    relationships: dict[tuple[str, str], Relationship]


def _records(storage, pairs: dict, actors: dict) -> Records:
    pids = {pid for _, pid in pairs}
    patients = {d["_id"]: patient_facts(d.get("res") or {}) for d in storage.patients_facts(pids)}
    rel: dict[tuple[str, str], Relationship] = defaultdict(Relationship)
    orgs: dict[str, set[str]] = defaultdict(set)          # establishment value -> its PSs of the window
    for ps, actor in actors.items():
        if actor.organization:
            orgs[actor.organization.partition("|")[2] or actor.organization].add(ps)
    for doc in storage.consents_facts(pids):
        res, pid = doc.get("res") or {}, doc["pid"]
        attested = consent_attested(res)
        for value in consent_actors(res):
            for ps in ({value} if value in actors else set()) | orgs.get(value, set()):
                if (ps, pid) not in pairs:
                    continue
                if attested and ps == value:
                    rel[(ps, pid)].attested = True
                else:
                    rel[(ps, pid)].given = True
    for doc in storage.deposits_facts(pids):
        for author in document_authors(doc.get("res") or {}):
            if (author, doc["pid"]) in pairs:
                rel[(author, doc["pid"])].deposited = True
    for (ps, pid) in pairs:
        if ps in patients.get(pid, PatientFacts()).gps:
            rel[(ps, pid)].gp = True
    practitioners = {}
    for doc in storage.practitioners_facts(actors, IDNATPS_SYSTEM):
        res = doc.get("res") or {}
        for ident in res.get("identifier") or ():
            if ident.get("system") == IDNATPS_SYSTEM and ident.get("value") in actors:
                practitioners[ident["value"]] = practitioner_facts(res)
    return Records(patients, practitioners, rel)


# -- signals -------------------------------------------------------------------------------------

def _concurrent_spans(actor: Actor) -> dict[tuple, list[list[datetime]]]:
    """Per place other than the professional's usual one, its spans that overlap a span of
    another place (one credential active in two places at once)."""
    if len(actor.spans) < 2:
        return {}
    usual = actor.places.most_common(1)[0][0]
    out = {}
    for key, spans in actor.spans.items():
        if key == usual:
            continue
        others = [s for k, ss in actor.spans.items() if k != key for s in ss]
        hits = [s for s in spans if any(s[0] <= o[1] and o[0] <= s[1] for o in others)]
        if hits:
            out[key] = hits
    return out


def _outlier_groups(values: dict, group_of: Callable, minimum: float) -> set:
    """Keys of ``values`` that are outliers among the values of their group (model.outliers)."""
    groups: dict = defaultdict(list)
    for key, value in values.items():
        groups[group_of(key)].append(key)
    out = set()
    for keys in groups.values():
        flags = model.outliers([values[k] for k in keys], minimum=minimum)
        out.update(k for k, flag in zip(keys, flags) if flag)
    return out


def _bulk_days(pairs: dict, actors: dict) -> set[tuple[str, object]]:
    """(professional, day) when they opened far more DMPs than peers and their own habit."""
    per_day = Counter((ps, pair.first.date()) for (ps, _), pair in pairs.items())
    peers = _outlier_groups(per_day, lambda k: actors[k[0]].profession, BULK_MIN)
    own_days: dict = defaultdict(list)
    for key in per_day:
        own_days[key[0]].append(key)
    bulk = set()
    for ps in {d[0] for d in peers}:
        days = own_days[ps]
        if len(days) < 3:
            bulk.update(d for d in days if d in peers)
            continue
        own = model.outliers([per_day[d] for d in days], minimum=BULK_MIN)
        bulk.update(d for d, flag in zip(days, own) if flag and d in peers)
    return bulk


def _break_glass_actors(pairs: dict, actors: dict) -> set[str]:
    counts = Counter({ps: 0 for ps in actors})
    for (ps, _), pair in pairs.items():
        if pair.btg:
            counts[ps] += 1
    return _outlier_groups(dict(counts), lambda ps: actors[ps].profession, BREAK_GLASS_MIN)


def _signals(key, pair: Pair, actor: Actor, records: Records, ctx: dict) -> list[str]:
    ps, pid = key
    rel = records.relationships.get(key) or Relationship()
    care = rel.gp or rel.given or rel.deposited or bool(pair.bases & CARE_BASES)
    out = []
    if not care:
        out.append(NO_RELATIONSHIP)
        if rel.attested or pair.first_basis == "authorized":
            out.append(ATTESTATION_ONLY)
        patient = records.patients.get(pid) or PatientFacts()
        prac = records.practitioners.get(ps) or PractitionerFacts()
        if prac.surnames & patient.surnames or journaled_surname(actor.name, patient.surnames):
            out.append(SAME_SURNAME)
        if prac.places & patient.places:
            out.append(SAME_PLACE)
    if (ps, pair.first.date()) in ctx["bulk"]:
        out.append(BULK)
    concurrent = ctx["concurrent"].get(ps) or {}
    if any(place in concurrent and any(s[0] <= span[1] and span[0] <= s[1] for s in concurrent[place])
           for place, span in pair.places.items()):
        out.append(SHARED_CREDENTIAL)
    if pair.btg and ps in ctx["break_glass"]:
        out.append(BREAK_GLASS_RATE)
    if pair.off * 2 > pair.accesses and actor.off * 2 <= actor.accesses:
        out.append(OFF_HOURS)
    return out


def _numbers(pair: Pair) -> list[float]:
    return [math.log1p(pair.accesses), math.log1p(pair.documents), pair.off / pair.accesses,
            pair.btg / pair.accesses, float(len(pair.places))]


# -- the verdicts --------------------------------------------------------------------------------

def _verdicts(storage, current: dict[tuple[str, str], list[float]]) -> list[tuple[list[float], bool]]:
    """(features, unjustified?) of every pair an officer judged: features kept when its case was
    opened, else this window's."""
    judged: dict[tuple[str, str], bool] = {}
    for doc in storage.completed_reviews():
        res = doc.get("res") or {}
        status = next((c.get("code") for c in (res.get("businessStatus") or {}).get("coding") or ()), None)
        if status not in REVIEW_SYSTEM_CODES:
            continue
        actor = next(((i.get("valueIdentifier") or {}).get("value") for i in res.get("input") or ()
                      if any(c.get("code") == "actor" for c in (i.get("type") or {}).get("coding") or ())), None)
        pid = ((res.get("for") or {}).get("reference") or "").rpartition("/")[2]
        if actor and pid:
            judged[(actor, pid)] = REVIEW_SYSTEM_CODES[status]
    if not judged:
        return []
    kept = storage.pair_features(judged)
    return [(current.get(k) or kept[k], bad) for k, bad in judged.items() if k in current or k in kept]


# -- the scan ------------------------------------------------------------------------------------

def anomaly_key(actor: str, pid: str) -> str:
    """The case key of a pair: one anomaly case per (professional, DMP), ever."""
    return f"anomaly|{actor}|{pid}"


def _case(row: dict) -> ReviewCase:
    inputs = [case_input("score", valueDecimal=row["score"])]
    inputs += [case_input("signal", valueCoding={"system": SIGNAL_SYSTEM, "code": s}) for s in row["signals"]]
    return ReviewCase(code=ANOMALY, patient_id=row["patient"], actor=row["actor"], focus=row["_focus"],
                      inputs=inputs, key=anomaly_key(row["actor"], row["patient"]))


def run_scan(storage, *, since: datetime | None = None, until: datetime | None = None, out: TextIO | None = None,
             budget: int | None = None, opener: Callable = open_cases, audit_log=None, keep_rows: bool = False,
             now: datetime | None = None) -> ScanResult:
    """Scan the journal of ``[since, until)`` (defaults: since the last scan's end, until now),
    write one NDJSON line per pair to ``out`` (most suspicious first), open anomaly cases through
    ``opener`` (``open_cases``'s signature) for the highest pairs scored at least
    :data:`REVIEW_MIN` within ``budget`` a day (None: no case opened), never twice for a pair, and
    remember where the scan ended."""
    started = time.monotonic()
    until = until or now or storage_now()
    if since is None:
        since = storage.last_scan_until()
    pairs, actors, events = _collect(storage, since, until)
    records = _records(storage, pairs, actors)
    ctx = {"bulk": _bulk_days(pairs, actors), "break_glass": _break_glass_actors(pairs, actors),
           "concurrent": {ps: c for ps, a in actors.items() if (c := _concurrent_spans(a))}}
    keys = list(pairs)
    signals = [_signals(k, pairs[k], actors[k[0]], records, ctx) for k in keys]
    feats = [model.features(s, _numbers(pairs[k])) for k, s in zip(keys, signals)]
    learned = model.learned(_verdicts(storage, dict(zip(keys, feats))))
    scores = model.score(feats, [model.rule_score(s) for s in signals], model=learned)
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], keys[i]))
    rows = []
    for i in order:
        (ps, pid), pair = keys[i], pairs[keys[i]]
        row = {"actor": ps, "patient": pid, "score": scores[i], "signals": signals[i], "accesses": pair.accesses,
               "first": instant(pair.first), "last": instant(pair.last)}
        if out is not None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        if keep_rows or (budget and scores[i] >= REVIEW_MIN and signals[i] and len(rows) < 10 * budget + 100):
            rows.append({**row, "_focus": pair.first_event, "_features": feats[i]})
    opened = _open(storage, rows, budget, opener, audit_log, now) if budget else []
    storage.record_scan(until)
    result = ScanResult(since, until, events, len(pairs), opened, time.monotonic() - started, learned is not None,
                        rows=[{k: v for k, v in r.items() if not k.startswith("_")} for r in rows] if keep_rows else [])
    log.info("privacy scan %s..%s: %d accesses, %d pairs, %d case(s) opened in %.1f s",
             since, until, events, len(pairs), len(opened), result.seconds)
    return result


def _open(storage, rows: list[dict], budget: int, opener: Callable, audit_log, now) -> list[str]:
    """The cases of the highest candidates not reviewed yet, at most ``budget`` (the opener also
    counts the day's cases already opened)."""
    candidates = [r for r in rows if r["score"] >= REVIEW_MIN and r["signals"]]
    taken = storage.taken_review_keys([anomaly_key(r["actor"], r["patient"]) for r in candidates])
    fresh = [r for r in candidates if anomaly_key(r["actor"], r["patient"]) not in taken][:budget]
    opened = opener(storage, [_case(r) for r in fresh], budget=budget, now=now, audit_log=audit_log)
    storage.keep_pair_features([{"actor": r["actor"], "pid": r["patient"], "features": r["_features"]}
                                for r in fresh], now or storage_now())
    return opened
