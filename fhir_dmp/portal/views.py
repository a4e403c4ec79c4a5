"""The portal's pages and form actions (CONTRACT.md "The patient portal").

Each page reads through ``g.repo`` (the guarded repository of the signed-in
person) and each action is the FHIR operation the contract names, through
the same repository: Consent create/update, DocumentReference update of
``securityLabel``, Patient update, AuditEvent and Communication search,
``destroy_dmp``. Every POST carries a CSRF token (checked before anything
else: 403, nothing changes). Actions answer with a redirect (POST/redirect/
GET) and a flash message; an id that is not the signed-in person's answers
404 like the FHIR API.
"""
from __future__ import annotations

import re

from flask import (Blueprint, Response, abort, flash, g, redirect, render_template, request,
                   stream_with_context, url_for)

from . import directory
from ..http.errors import FhirError, NotFound, not_found
from ..profiles import dmp, validate
from ..runtime.services import services
from ..search import reference_id
from ..audit.events import SUBJECT_SYSTEM
from ..security.principal import BTG, ETREAT, PATIENT
from ..spaces import hooks
from ..spaces.signin import SignInRefused, sign_in, sign_out
from . import present, signin

bp = Blueprint("portal", __name__, url_prefix="/portal", template_folder="templates",
               static_folder="static")
hooks.install(bp, signin.PORTAL)

JOURNAL_PAGE = 20
LIST_LIMIT = "200"
ID_NAT_PS = re.compile(r"^[0-9]{9,12}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,}$")
PHONE = re.compile(r"^\+?[0-9][0-9 .]{5,19}$")
MODE_PURPOSE = {"normal": "TREAT", "bris_de_glace": BTG, "centre_15": ETREAT}
OPTOUTS = {"btg": BTG, "c15": ETREAT}


def config():
    return services().config


# ----------------------------------------------------------------------------- sign-in

@bp.post("/login")
def dev_login():
    """Dev mode only: sign in as the Patient whose id is given (a dev token, like dev-token)."""
    cfg = config()
    if not cfg.dev_mode:
        abort(404)
    patient_id = (request.form.get("patient") or "").strip()
    representative = (request.form.get("representative") or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", representative or patient_id):
        flash("Identifiant invalide.", "error")
        return redirect(url_for("portal.login"))
    try:
        sign_in(signin.dev_token(cfg, patient=patient_id, related_person=representative), signin.PORTAL)
    except (FhirError, SignInRefused):
        # said on the sign-in page itself, no session: the record does not exist (or this
        # representative is not, or no longer, in office)
        error = ("Ce représentant légal n'est pas (ou plus) en fonction." if representative else
                 f"Aucun dossier n'a l'identifiant « {patient_id} ».")
        return render_template("portal/login.html", error=error), 404
    return redirect(url_for("portal.home"))


# ----------------------------------------------------------------------------- helpers

def _pid() -> str:
    return g.principal.patient_id


def _patient() -> dict:
    return g.repo.read("Patient", _pid()).resource


def _own(rtype: str, rid: str):
    """A resource of the signed-in person's record, or 404 (another record's id is never shown)."""
    stored = g.repo.read(rtype, rid)
    if stored.pid != _pid():
        raise not_found(rtype, rid)
    return stored


def _search(rtype: str, args: list[tuple[str, str]]):
    return g.repo.search(rtype, args, query_string="&".join(f"{k}={v}" for k, v in args))


def _act(action, done: str, back: str):
    """Run a write; flash its outcome; redirect to ``back``. Another record's id: 404."""
    try:
        action()
    except NotFound:
        raise
    except FhirError as exc:
        flash(f"Action refusée : {exc.diagnostics}", "error")
    else:
        flash(done, "success")
    return redirect(back)


def _update(rtype: str, stored, resource: dict):
    g.repo.update(rtype, stored.id, validate(resource, resource_type=rtype), if_match=f'W/"{stored.vid}"')


# ----------------------------------------------------------------------------- pages

@bp.get("/")
def home():
    return render_template("portal/home.html", patient=present.patient_summary(_patient()))


@bp.get("/documents")
def documents():
    page = _search("DocumentReference", [("patient", _pid()), ("status", "current"), ("_sort", "-date"),
                                         ("_count", LIST_LIMIT)])
    groups = present.group_documents([s.resource for s in page.matches])
    return render_template("portal/documents.html", groups=groups)


@bp.get("/documents/<rid>/download")
def download(rid):
    doc = _own("DocumentReference", rid).resource
    attachment = next(((c.get("attachment") or {}) for c in doc.get("content") or ()), {})
    bid = reference_id(attachment.get("url"), "Binary")
    if not bid:
        raise not_found("DocumentReference", rid)
    binary = _own("Binary", bid)
    content = g.repo.binary_content(binary)
    ctype = binary.resource.get("contentType") or "application/octet-stream"
    ext = {"application/pdf": "pdf", "text/plain": "txt"}.get(ctype, "xml" if "xml" in ctype else "bin")
    return Response(stream_with_context(content), content_type=ctype, headers={
        "Content-Disposition": f'attachment; filename="document-{rid}.{ext}"',
        "X-Content-Type-Options": "nosniff"})


def _set_mask(rid: str, masked: bool):
    stored = _own("DocumentReference", rid)
    codes = dmp.labels(stored.resource)
    codes = codes | {dmp.MASQUE_PS} if masked else codes - {dmp.MASQUE_PS}
    _update("DocumentReference", stored, dmp.set_labels(stored.resource, codes))


@bp.post("/documents/<rid>/mask")
def mask(rid):
    return _act(lambda: _set_mask(rid, True), "Le document est masqué aux professionnels de santé.",
                url_for("portal.documents"))


@bp.post("/documents/<rid>/unmask")
def unmask(rid):
    return _act(lambda: _set_mask(rid, False), "Le document est de nouveau visible des professionnels.",
                url_for("portal.documents"))


@bp.get("/journal")
def journal():
    """The journal, newest first, paged by the search cursor; filters are search parameters, so
    they apply before paging (mode = purpose of use, professional = agent idNatPs)."""
    mode = request.args.get("mode") or ""
    who = request.args.get("qui") or ""
    ps = (request.args.get("ps") or "").strip()
    args = [("patient", f"Patient/{_pid()}"), ("_sort", "-date"), ("_count", str(JOURNAL_PAGE))]
    if mode in MODE_PURPOSE:
        args.append(("purpose", MODE_PURPOSE[mode]))
    else:
        mode = ""
    if who == "ps":
        args.append(("agent:identifier", f"{present.IDNATPS_SYSTEM}|"))
    elif who == "moi":
        args.append(_me_as_agent())
    else:
        who = ""
    if ps:
        # an idNatPs, or a name the directory knows (its professionals of that name)
        wanted = [ps] if ID_NAT_PS.match(ps) else [p.id_nat_ps for p in _find_professionals(ps[:80], "", "")]
        if wanted:
            args.append(("agent:identifier", ",".join(f"{present.IDNATPS_SYSTEM}|{v}" for v in wanted)))
        else:
            flash("Aucun professionnel de l'annuaire ne porte ce nom ; un identifiant (idNatPs) compte "
                  "9 à 12 chiffres.", "error")
            ps = ""
    if request.args.get("page"):
        args.append(("_cursor", request.args["page"]))
    # the signed-in person's own views are grouped unless asked for (or filtered on): "Moi" shows them
    views = "1" if who == "moi" or request.args.get("vues") == "1" else ""
    page = _search("AuditEvent", args)
    me = f"RelatedPerson/{g.principal.related_person_id}" if g.principal.related_person_id else None
    events = [s.resource for s in page.matches]
    people = _professionals(present.journal_professionals(events))
    reviews = _reviews(events)
    rows = [dict(present.journal_row(e, _pid(), me, people), review=reviews.get(e.get("id"))) for e in events]
    filters = {k: v for k, v in (("mode", mode), ("qui", who), ("ps", ps), ("vues", views)) if v}
    next_url = url_for("portal.journal", page=page.next_cursor, **filters) if page.next_cursor else None
    show_views = url_for("portal.journal", page=request.args.get("page"), **dict(filters, vues="1"))
    return render_template("portal/journal.html", rows=rows if views else present.group_own_views(rows),
                           mode=mode, who=who, ps=ps, modes=present.MODES, views=views, show_views=show_views,
                           hide_views=url_for("portal.journal", page=request.args.get("page"),
                                              **{k: v for k, v in filters.items() if k != "vues"}),
                           next_url=next_url, first_url=url_for("portal.journal", **filters)
                           if request.args.get("page") else None)


def _reviews(events: list[dict]) -> dict[str, dict]:
    """The privacy officer's verdicts on these accesses: the closed review cases whose focus is one
    of them (CONTRACT.md "Privacy operations": shown beside the access)."""
    if not events:
        return {}
    focus = ",".join(f"AuditEvent/{e['id']}" for e in events if e.get("id"))
    page = _search("Task", [("patient", f"Patient/{_pid()}"), ("status", "completed"), ("focus", focus),
                            ("_count", str(JOURNAL_PAGE))])
    return present.review_outcomes([s.resource for s in page.matches])


def _professionals(id_nat_ps: list[str]) -> dict[str, directory.Professional]:
    """What the directory says of these professionals (through the guarded repository, journaled
    in the system journal like every directory read); those it does not list are absent."""
    if not id_nat_ps:
        return {}
    page = _search("Practitioner", directory.search_args(id_nat_ps))
    return directory.index([s.resource for s in page.matches + page.included])


def _me_as_agent() -> tuple[str, str]:
    """The journal's agent criterion for the signed-in person (audit/events.py ``_user_agent``)."""
    if g.principal.kind == PATIENT:
        return "agent", f"Patient/{_pid()}"
    if g.principal.related_person_id:
        return "agent", f"RelatedPerson/{g.principal.related_person_id}"
    return "agent:identifier", f"{SUBJECT_SYSTEM}|{g.principal.subject}"


def _consents(people: bool = False):
    """The patient's active choices; ``people``: each authorization and block with what the
    directory says of its professional (``person``)."""
    page = _search("Consent", [("patient", _pid()), ("status", "active"), ("_count", LIST_LIMIT)])
    choices = present.classify_consents([s.resource for s in page.matches])
    if people:
        rows = choices["authorizations"] + choices["blocks"]
        found = _professionals([r["id_nat_ps"] for r in rows])
        for row in rows:
            row["person"] = found.get(row["id_nat_ps"])
    return choices


SEARCH_FORMS = ("authorize", "block")
SEARCH_WORD = re.compile(r"[^\s,$|\\]+")     # FHIR search separators and escapes are not words


@bp.get("/autorisations")
def authorizations():
    """The choices, and the directory's matches for the form that searched (``pour``) by name,
    town (``ville``) and speciality (``specialite``)."""
    target = request.args.get("pour") if request.args.get("pour") in SEARCH_FORMS else ""
    query = {k: (request.args.get(k) or "").strip()[:80] for k in ("name", "ville", "specialite")}
    matches = _find_professionals(**query) if target and any(query.values()) else None
    return render_template("portal/authorizations.html", choices=_consents(people=True), target=target,
                           query=query, matches=matches)


def _find_professionals(name: str, ville: str, specialite: str) -> list[directory.Professional]:
    """The directory's professionals matching a name, a town and a speciality (each optional):
    Practitioner ``name`` and ``address-city``; the speciality through the PractitionerRoles whose
    ``specialty`` text matches. What a person types is words, not FHIR search syntax: each word
    of the name must match (``Jeanne Dupont``), and ``, $ | \`` are only separators. No word at all:
    nothing (never the whole directory)."""
    if not any(_words(text) for text in (name, ville, specialite)):
        return []
    args = [("name", word) for word in _words(name)[:4]]
    if _words(ville):
        args.append(("address-city", " ".join(_words(ville))))
    if _words(specialite):
        roles = _search("PractitionerRole", [("specialty:text", " ".join(_words(specialite))), ("_count", "50")])
        ids = sorted({reference_id((r.resource.get("practitioner") or {}).get("reference"), "Practitioner")
                      for r in roles.matches} - {None})
        if not ids:
            return []
        args.append(("_id", ",".join(ids)))
    page = _search("Practitioner", args + [("_revinclude", "PractitionerRole:practitioner"), ("_count", "20")])
    found = directory.index([s.resource for s in page.matches + page.included])
    return sorted(found.values(), key=lambda p: (p.name, p.town, p.id_nat_ps))


def _words(text: str) -> list[str]:
    return SEARCH_WORD.findall(text)


def _id_nat_ps() -> str | None:
    value = (request.form.get("choose") or request.form.get("idnatps") or "").strip()
    if not ID_NAT_PS.match(value):
        flash("L'identifiant du professionnel (idNatPs) compte 9 à 12 chiffres, "
              "par exemple 810000000001.", "error")
        return None
    return value


def _new_choice(make, done: str):
    """Create the Consent ``make(patient id, idNatPs)`` for the idNatPs of the form."""
    ps = _id_nat_ps()
    back = url_for("portal.authorizations")
    if ps is None:
        return redirect(back)
    person = _professionals([ps]).get(ps)
    consent = validate(make(_pid(), ps, person), resource_type="Consent")
    who = f"{person.label} (idNatPs {ps})" if person else f"Le professionnel {ps}"
    return _act(lambda: g.repo.create("Consent", consent), done.format(who=who), back)


@bp.post("/autorisations")
def authorize():
    return _new_choice(present.authorization, "{who} est autorisé à accéder à votre dossier.")


@bp.post("/blocages")
def block():
    return _new_choice(present.block, "{who} est bloqué : il ne peut plus accéder à votre dossier.")


def _end_consent(cid: str):
    stored = _own("Consent", cid)
    _update("Consent", stored, {**stored.resource, "status": "inactive"})


@bp.post("/autorisations/<cid>/revoke")
def revoke(cid):
    return _act(lambda: _end_consent(cid), "L'autorisation est retirée.", url_for("portal.authorizations"))


@bp.post("/blocages/<cid>/unblock")
def unblock(cid):
    return _act(lambda: _end_consent(cid), "Le professionnel n'est plus bloqué.",
                url_for("portal.authorizations"))


@bp.get("/urgence")
def emergency():
    optout = _consents()["optout"]
    return render_template("portal/emergency.html", btg=optout[BTG] is not None, c15=optout[ETREAT] is not None)


def _set_optout(purpose: str, refuse: bool):
    current = _consents()["optout"][purpose]
    if refuse and current is None:
        g.repo.create("Consent", validate(present.emergency_optout(_pid(), purpose), resource_type="Consent"))
    elif not refuse and current is not None:
        _end_consent(current["id"])


@bp.post("/urgence/<kind>")
def set_emergency(kind):
    purpose = OPTOUTS.get(kind)
    if purpose is None:
        abort(404)
    refuse = request.form.get("refuse") in ("1", "on", "true")
    what = "l'accès en bris de glace" if purpose == BTG else "l'accès par le centre 15 (SAMU)"
    return _act(lambda: _set_optout(purpose, refuse),
                f"Vous refusez {what}." if refuse else f"Vous acceptez {what}.", url_for("portal.emergency"))


@bp.get("/notifications")
def notifications():
    page = _search("Communication", [("subject", f"Patient/{_pid()}"), ("_sort", "-_lastUpdated"),
                                     ("_count", LIST_LIMIT)])
    comms = [s.resource for s in page.matches]
    people = _professionals([ps for c in comms if (ps := present.notification_professional(c))])
    rows = [present.notification_row(c, people) for c in comms]
    return render_template("portal/notifications.html", rows=rows)


@bp.get("/coordonnees")
def contact():
    return render_template("portal/contact.html", contact=present.contacts(_patient()))


@bp.post("/coordonnees")
def set_contact():
    email = (request.form.get("email") or "").strip()
    phone = (request.form.get("phone") or "").strip()
    back = url_for("portal.contact")
    if email and not EMAIL.match(email):
        flash("Adresse email invalide.", "error")
        return redirect(back)
    if phone and not PHONE.match(phone):
        flash("Numéro de téléphone invalide (chiffres, espaces et + seulement).", "error")
        return redirect(back)

    def write():
        stored = g.repo.read("Patient", _pid())
        _update("Patient", stored, present.with_contacts(stored.resource, email, phone))
    return _act(write, "Vos coordonnées sont enregistrées.", back)


@bp.get("/dossier")
def record():
    return render_template("portal/record.html", patient=present.patient_summary(_patient()))


@bp.post("/dossier/close")
def close():
    return _act(lambda: g.repo.close_dmp(_pid()), "Votre dossier est fermé. Vous pouvez le rouvrir à tout moment.",
                url_for("portal.record"))


@bp.post("/dossier/reopen")
def reopen():
    return _act(lambda: g.repo.reopen_dmp(_pid()), "Votre dossier est rouvert.", url_for("portal.record"))


@bp.post("/dossier/destroy")
def destroy():
    ins = present.patient_summary(_patient())["ins"]
    if not ins or (request.form.get("confirm") or "").strip() != ins:
        flash("Pour détruire votre dossier, recopiez exactement votre INS.", "error")
        return redirect(url_for("portal.record"))
    try:
        g.repo.destroy_dmp(_pid())
    except NotFound:
        raise
    except FhirError as exc:
        flash(f"Action refusée : {exc.diagnostics}", "error")
        return redirect(url_for("portal.record"))
    sign_out()
    return render_template("portal/destroyed.html")


@bp.get("/representants")
def representatives():
    page = _search("RelatedPerson", [("patient", _pid()), ("_count", LIST_LIMIT)])
    rows = [present.representative_row(s.resource) for s in page.matches]
    return render_template("portal/representatives.html", rows=rows)
