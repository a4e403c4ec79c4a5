"""What the directory of professionals says about a professional (CONTRACT.md "The directory of
professionals"): name, profession, speciality and town, from a Practitioner and its
PractitionerRoles as the ANS « Annuaire Santé » publishes them in FHIR.

Nothing here reads storage or decides access: callers fetch the resources through the guarded
repository (:func:`search_args` is the search they run) and hand them to :func:`index`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..search import reference_id
from ..audit.events import PROFESSION_LABELS
from ..security.principal import IDNATPS_SYSTEM

#: TRE_G15 (profession); the ANS FHIR export writes ``.../TRE_G15-ProfessionSante/FHIR/TRE-G15-...``,
#: the journal ``.../TRE_G15-ProfessionSante``: both start so
PROFESSION_PREFIX = "https://mos.esante.gouv.fr/NOS/TRE_G15"


@dataclass(frozen=True)
class Professional:
    """A professional as a person sees them; ``id_nat_ps`` is only a detail."""

    id_nat_ps: str
    name: str
    profession: str = ""
    specialty: str = ""
    town: str = ""

    @property
    def label(self) -> str:
        """``Jeanne Dupont — Médecin, Médecine générale, Lyon``."""
        details = ", ".join(filter(None, (self.profession, self.specialty, self.town)))
        return f"{self.name} — {details}" if details else self.name


def search_args(id_nat_ps: list[str]) -> list[tuple[str, str]]:
    """The Practitioner search that finds these idNatPs with their roles."""
    values = ",".join(f"{IDNATPS_SYSTEM}|{v}" for v in sorted(set(id_nat_ps)))
    return [("identifier", values), ("_revinclude", "PractitionerRole:practitioner"),
            ("_count", str(max(len(id_nat_ps), 1)))]


def _coding_label(concept: dict, labels: dict | None = None, prefix: str | None = None) -> str:
    for coding in (concept or {}).get("coding") or ():
        if prefix and not str(coding.get("system") or "").startswith(prefix):
            continue
        label = (labels or {}).get(coding.get("code")) or coding.get("display")
        if label:
            return label
    return (concept or {}).get("text") or ""


def _name(practitioner: dict) -> str:
    for name in practitioner.get("name") or ():
        if name.get("text"):
            return name["text"]
        parts = [" ".join(name.get("given") or ()), name.get("family") or ""]
        full = " ".join(p for p in parts if p)
        if full:
            return full
    return ""


def id_nat_ps_of(practitioner: dict) -> str | None:
    return next((i.get("value") for i in practitioner.get("identifier") or ()
                 if i.get("system") == IDNATPS_SYSTEM and i.get("value")), None)


def describe(practitioner: dict, roles: list[dict]) -> Professional | None:
    """The professional a Practitioner (and its roles) describes; None without an idNatPs."""
    ps = id_nat_ps_of(practitioner)
    if not ps:
        return None
    concepts = [c for r in roles for c in r.get("code") or ()]
    concepts += [q.get("code") or {} for q in practitioner.get("qualification") or ()]
    profession = next((label for c in concepts
                       if (label := _coding_label(c, PROFESSION_LABELS, PROFESSION_PREFIX))), "")
    specialty = next((label for r in roles for c in r.get("specialty") or () if (label := _coding_label(c))), "")
    town = next((a["city"] for a in practitioner.get("address") or () if a.get("city")), "")
    return Professional(ps, _name(practitioner) or ps, profession, specialty, town)


def index(resources: list[dict]) -> dict[str, Professional]:
    """idNatPs -> Professional, from Practitioners and PractitionerRoles mixed (a search page with
    its ``_revinclude``)."""
    roles: dict[str, list[dict]] = {}
    for res in resources:
        if res.get("resourceType") == "PractitionerRole":
            ref = reference_id((res.get("practitioner") or {}).get("reference"), "Practitioner")
            roles.setdefault(ref, []).append(res)
    out = {}
    for res in resources:
        if res.get("resourceType") == "Practitioner":
            found = describe(res, roles.get(res.get("id"), []))
            if found:
                out[found.id_nat_ps] = found
    return out
