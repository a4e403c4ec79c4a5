"""``GET /``: what this server is, for a person in a browser; ``GET /fhir``: where to go next.

Its own small module and template (``templates/home.html``) so that other
parts (the patient portal) add their link to :data:`LINKS` without touching
the FHIR handlers. No third-party assets, no script.
"""
from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from ..resources.capability import software_version
from ..runtime.services import services

bp = Blueprint("home", __name__)

# (href relative to the site root, label, description) shown on the home page, in order
LINKS = [
    ("portal/", "Mon espace santé — portail patient",
     "Vos documents, votre journal d'accès, vos autorisations et vos choix."),
    ("privacy/", "Protection des données — délégué",
     "Les accès d'urgence et les accès inhabituels à examiner, pour le délégué à la protection des données."),
    ("fhir/metadata", "API FHIR R4 — CapabilityStatement",
     "Ce que le serveur sait faire : ressources, interactions, paramètres de recherche."),
    ("fhir/.well-known/smart-configuration", "Configuration SMART App Launch",
     "Émetteur des jetons, portées (scopes) et capacités pour les applications."),
]


@bp.get("/")
def home():
    config = services().config
    return render_template("home.html", links=LINKS, fhir_base=config.fhir_base,
                           version=software_version(), dev_mode=config.dev_mode)


@bp.get("/fhir")
@bp.get("/fhir/")
def fhir_base():
    """The FHIR base has nothing to GET: a browser goes to the home page, a client to the
    CapabilityStatement (https://hl7.org/fhir/R4/http.html#capabilities) — never a 401 in XML."""
    if "text/html" in {value for value, _q in request.accept_mimetypes}:     # a browser
        return redirect(url_for("home.home"), code=303)
    query = request.query_string.decode("latin-1")
    return redirect(url_for("fhir_meta.metadata") + (f"?{query}" if query else ""), code=303)
