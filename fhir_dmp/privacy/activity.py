"""A professional's accesses per day against peers of the same profession, and the chart of it.

What counts as an access: a journal entry of a professional (user agent identified by an idNatPs)
reading or searching a DMP (action R or E, a patient entity), granted or refused, on its day in
Paris; deposits and the notices the server writes on the professional's behalf do not count. Peers: the other
professionals whose entries in the window were made under one of the professional's professions
(TRE_G15 codes of the user agent's role). Each day, the peers' median count (a peer without an
access that day counts 0), so one very busy peer does not move the line.

Nothing here reads storage: the caller hands the journal entries the officer's guarded repository
returned (``views._activity``: the professional's own entries in the window, and at most
``views.MAX_EVENTS`` entries of every professional for the peers; each DMP those touch has the
officer's search in its journal). The chart is inline SVG drawn by a template (``privacy/chart.html``) from
:func:`chart`'s coordinates: no script, no library in the browser.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from statistics import median

from ..audit.events import PROFESSION_SYSTEM, event_patient
from ..portal.present import PARIS
from ..security.principal import IDNATPS_SYSTEM

CHART_DAYS = 28
READS = ("R", "E")      # AuditEvent.action: read, execute (a search)
# the chart's box (SVG user units; the picture scales to the page's width)
WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 14, 34


def window(until: datetime, days: int = CHART_DAYS) -> list[date]:
    """The ``days`` days in Paris ending with ``until``'s day."""
    last = until.astimezone(PARIS).date()
    return [last - timedelta(days=days - 1 - i) for i in range(days)]


def bounds(days: list[date]) -> tuple[str, str]:
    """The window as instants (start of the first day, start of the day after the last, Paris)."""
    start = datetime.combine(days[0], datetime.min.time(), PARIS)
    end = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), PARIS)
    return start.isoformat(), end.isoformat()


def _actor(event: dict) -> str | None:
    ident = (((event.get("agent") or [{}])[0] or {}).get("who") or {}).get("identifier") or {}
    return ident.get("value") if ident.get("system") == IDNATPS_SYSTEM else None


def _professions(event: dict) -> set[str]:
    return {c.get("code") for r in ((event.get("agent") or [{}])[0] or {}).get("role") or ()
            for c in r.get("coding") or () if c.get("system") == PROFESSION_SYSTEM}


def _day(event: dict) -> date | None:
    try:
        return datetime.fromisoformat(str(event.get("recorded")).replace("Z", "+00:00")).astimezone(PARIS).date()
    except ValueError:
        return None


def per_day(events: list[dict], days: list[date], professions: set[str] | None = None) -> dict[str, list[int]]:
    """idNatPs -> accesses on each of ``days``; ``professions``: only entries made under one of
    these professions."""
    index = {d: i for i, d in enumerate(days)}
    counts: dict[str, Counter] = {}
    for event in events:
        actor, day = _actor(event), _day(event)
        if not actor or day not in index or event.get("action") not in READS or not event_patient(event):
            continue
        if professions is not None and not (_professions(event) & professions):
            continue
        counts.setdefault(actor, Counter())[index[day]] += 1
    return {actor: [c[i] for i in range(len(days))] for actor, c in counts.items()}


def peers_median(series: dict[str, list[int]], actor: str, n_days: int) -> tuple[list[float], int]:
    """Each day's median over the peers (everyone in ``series`` but ``actor``), and how many."""
    peers = [s for a, s in series.items() if a != actor]
    if not peers:
        return [0.0] * n_days, 0
    return [float(median(s[i] for s in peers)) for i in range(n_days)], len(peers)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: str
    count: int


def _ceiling(value: float) -> int:
    """A round top for the axis: the first of 1, 2, 5, 10, 20, 50... at least ``value``."""
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * 10 ** exponent >= value:
                return mantissa * 10 ** exponent
        exponent += 1


def chart(days: list[date], mine: list[int], peers: list[float]) -> dict:
    """What ``privacy/chart.html`` draws: one bar per day for the professional, the peers' line,
    the y axis' ticks and a few day labels."""
    top = _ceiling(max(mine + [int(p + 0.999) for p in peers] + [1]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(days)

    def y(v: float) -> float:
        return round(TOP + plot_h - v / top * plot_h, 1)

    bars = [Bar(round(LEFT + i * step + step * 0.15, 1), y(n), round(step * 0.7, 1), round(plot_h * n / top, 1),
                d.strftime("%d/%m"), n) for i, (d, n) in enumerate(zip(days, mine))]
    line = " ".join(f"{round(LEFT + i * step + step / 2, 1)},{y(v)}" for i, v in enumerate(peers))
    ticks = [{"y": y(v), "label": str(v)} for v in sorted({0, top // 2, top})]
    labels = [{"x": round(LEFT + i * step + step / 2, 1), "label": d.strftime("%d/%m")}
              for i, d in enumerate(days) if i % 7 == 0 or i == len(days) - 1]
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "bottom": TOP + plot_h,
            "label_y": HEIGHT - 10, "bars": bars, "line": line, "ticks": ticks, "labels": labels,
            "total": sum(mine), "peak": max(mine), "peers_peak": max(peers)}
