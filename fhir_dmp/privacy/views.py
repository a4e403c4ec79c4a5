"""The officer's pages and actions (CONTRACT.md "Privacy operations", "The officer's pages").

Each page reads through ``g.repo`` (the guarded repository of the signed-in officer, so every read
is journaled) and each action is the FHIR operation the contract names, through the same
repository: a JSON Patch of the review ``Task`` (take: ``in-progress``, the server makes the
officer its ``owner``; decide: ``completed``, ``businessStatus``, ``note``), conditional on the version the officer saw, so two
officers never decide one case twice (the second is told). Every POST carries a CSRF token
(``spaces.hooks``). A case the officer may not see answers 404 like the FHIR API.
"""
from __future__ import annotations

import re
from datetime import datetime

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for

from ..audit.events import PROFESSION_LABELS
from ..http.errors import FhirError, NotFound
from ..portal import directory
from ..portal.present import patient_summary
from ..profiles import validate
from ..profiles.review_task import VERDICTS
from ..runtime.services import services
from ..security.principal import IDNATPS_SYSTEM
from ..spaces import hooks
from ..spaces.signin import sign_in
from ..storage import now
from . import activity, present, signin

bp = Blueprint("privacy", __name__, url_prefix="/privacy", template_folder="templates", static_folder="static")
hooks.install(bp, signin.OFFICER)

OFFICER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@\-]{0,63}$")
QUEUE_LIMIT = "200"
CLOSED_LIMIT = "50"
EVIDENCE_LIMIT = "100"
EVENTS_PAGE = 1000
MAX_EVENTS = 5000          # the journal entries the peers' line is drawn from, at most
NOTE_MAX = 2000


def _search(rtype: str, args: list[tuple[str, str]]):
    return g.repo.search(rtype, args, query_string="&".join(f"{k}={v}" for k, v in args))


# ----------------------------------------------------------------------------- sign-in

@bp.post("/login")
def dev_login():
    """Dev mode only: sign in as the privacy officer whose identifier is given (a dev token)."""
    cfg = services().config
    if not cfg.dev_mode:
        abort(404)
    officer = (request.form.get("officer") or "").strip()
    if not OFFICER_ID.match(officer):
        return render_template("privacy/login.html", error="Identifiant invalide (lettres, chiffres, . _ @ -)."), 400
    sign_in(signin.dev_token(cfg, officer), signin.OFFICER)
    return redirect(url_for("privacy.home"))


# ----------------------------------------------------------------------------- lookups

def _patients(ids: set[str]) -> dict[str, str]:
    """Patient id -> name, for the DMPs the cases are about (one search, journaled)."""
    ids = {i for i in ids if i}
    if not ids:
        return {}
    page = _search("Patient", [("_id", ",".join(sorted(ids))), ("_count", str(len(ids)))])
    return {s.id: patient_summary(s.resource)["name"] for s in page.matches}


def _professionals(ids: set[str]) -> dict[str, directory.Professional]:
    """What the directory says of these professionals; those it does not list are absent."""
    ids = {i for i in ids if i}
    if not ids:
        return {}
    page = _search("Practitioner", directory.search_args(sorted(ids)))
    return directory.index([s.resource for s in page.matches + page.included])


def _events(args: list[tuple[str, str]], limit: int) -> list[dict]:
    """Journal entries matching ``args``, following the pages up to ``limit`` entries."""
    out: list[dict] = []
    cursor = None
    while len(out) < limit:
        page = _search("AuditEvent", args + [("_count", str(min(EVENTS_PAGE, limit - len(out))))]
                       + ([("_cursor", cursor)] if cursor else []))
        out.extend(s.resource for s in page.matches)
        cursor = page.next_cursor
        if not cursor:
            break
    return out


# ----------------------------------------------------------------------------- pages

def _cases(args: list[tuple[str, str]]) -> tuple[list[dict], bool]:
    """The review cases of a Task search as rows (patients and professionals named), and whether
    more match than the page holds."""
    page = _search("Task", args)
    tasks = [s.resource for s in page.matches]
    patients = _patients({present.case_patient(t) for t in tasks})
    people = _professionals({present.case_actor(t) for t in tasks})
    return [present.case_row(t, patients, people) for t in tasks], bool(page.next_cursor)


@bp.get("/")
def home():
    """The queue: open cases (``requested``, ``in-progress``), most urgent first (present.urgency)."""
    rows, more = _cases([("status", "requested,in-progress"), ("_sort", "-authored-on"), ("_count", QUEUE_LIMIT)])
    return render_template("privacy/queue.html", rows=sorted(rows, key=present.urgency), more=more, closed=False)


@bp.get("/clos")
def closed():
    """The cases closed last, newest first (read-only: each opens on its decision)."""
    rows, more = _cases([("status", "completed"), ("_sort", "-_lastUpdated"), ("_count", CLOSED_LIMIT)])
    return render_template("privacy/queue.html", rows=rows, more=more, closed=True)


@bp.get("/cas/<tid>")
def case(tid):
    """A case: the Task's inputs, the professional's accesses to this DMP, the activity chart."""
    stored = g.repo.read("Task", tid)
    task = stored.resource
    pid, actor = present.case_patient(task), present.case_actor(task)
    people = _professionals({actor})
    row = present.case_row(task, _patients({pid}), people)
    evidence = []
    if pid and actor:
        evidence = _events([("patient", f"Patient/{pid}"), ("agent:identifier", f"{IDNATPS_SYSTEM}|{actor}"),
                            ("_sort", "-date")], int(EVIDENCE_LIMIT))
    rows = [present.evidence_row(e, people) for e in evidence]
    chart = _activity(task, actor, evidence) if actor else None
    return render_template("privacy/case.html", case=row, version=stored.vid, evidence=rows, chart=chart,
                           verdicts=VERDICTS,
                           verdict_label=present.verdict_label)


def _activity(task: dict, actor: str, evidence: list[dict]) -> dict:
    """The chart of the professional's accesses per day against peers of the same profession,
    over the days up to the case's (activity module)."""
    try:
        until = datetime.fromisoformat(str(task.get("authoredOn")).replace("Z", "+00:00"))
    except ValueError:
        until = now()
    days = activity.window(until)
    start, end = activity.bounds(days)
    span = [("date", f"ge{start}"), ("date", f"lt{end}")]
    mine = _events([("agent:identifier", f"{IDNATPS_SYSTEM}|{actor}")] + span, MAX_EVENTS)
    professions = present.professions(mine or evidence)
    everyone = _events([("agent:identifier", f"{IDNATPS_SYSTEM}|")] + span, MAX_EVENTS)
    series = activity.per_day(everyone, days, professions or None)
    own = activity.per_day(mine, days).get(actor, [0] * len(days))
    peers, count = activity.peers_median(series, actor, len(days))
    return {**activity.chart(days, own, peers), "peers": count, "truncated": len(everyone) >= MAX_EVENTS,
            "profession": ", ".join(sorted(PROFESSION_LABELS.get(c, c) for c in professions)) or "toutes",
            "first": days[0].strftime("%d/%m/%Y"), "last": days[-1].strftime("%d/%m/%Y")}


# ----------------------------------------------------------------------------- actions

def _patch(tid: str, make, done: str):
    """Patch the Task as the version the officer's form was drawn from (``version``); flash the
    outcome; back to the case. A case already changed meanwhile: said, nothing written."""
    stored = g.repo.read("Task", tid)
    version = request.form.get("version") or str(stored.vid)
    try:
        g.repo.patch("Task", tid, make(stored.resource), if_match=f'W/"{version}"',
                     validate=lambda r: validate(r, resource_type="Task"))
    except NotFound:
        raise
    except FhirError as exc:
        if exc.status in (409, 412):
            flash("Ce cas a changé entre-temps (un autre délégué l'a peut-être pris ou clos) : "
                  "relisez-le avant d'agir.", "error")
        else:
            flash(f"Action refusée : {exc.diagnostics}", "error")
    else:
        flash(done, "success")
    return redirect(url_for("privacy.case", tid=tid))


@bp.post("/cas/<tid>/prendre")
def take(tid):
    return _patch(tid, lambda task: present.take(), "Vous avez pris ce cas.")


@bp.post("/cas/<tid>/decision")
def decide(tid):
    outcome = request.form.get("businessStatus") or ""
    note = (request.form.get("note") or "").strip()
    if outcome not in VERDICTS or not note or len(note) > NOTE_MAX:
        flash("Choisissez « justifié » ou « injustifié » et expliquez votre décision "
              f"(une note de {NOTE_MAX} caractères au plus).", "error")
        return redirect(url_for("privacy.case", tid=tid))
    return _patch(tid, lambda task: present.decide(task, outcome, note, g.principal.name or g.principal.subject, now()),
                  f"Cas clos : accès {present.verdict_label(outcome).lower()}.")
