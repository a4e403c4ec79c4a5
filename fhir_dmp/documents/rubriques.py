"""The eight DMP sections ("rubriques") and their default by document type
(CONTRACT.md "Lifecycle of a DMP": Rubriques; CodeSystem ``ig/CodeSystem-dmp-rubrique.json``).

``DocumentReference.category`` carries one ``dmp-rubrique`` coding. When the
client gives none, the server fills it from the LOINC type code through the
data file ``fhir_dmp/data/rubriques.csv`` (a patient's own deposit goes to
``espace-personnel``).
"""
from __future__ import annotations

import csv
from functools import lru_cache

from ..runtime.config import PACKAGE_DATA
from ..http.errors import Unprocessable

RUBRIQUE_SYSTEM = "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-rubrique"
RUBRIQUES = {
    "synthese": "Synthèse",
    "traitements-soins": "Traitements et soins",
    "comptes-rendus": "Comptes rendus",
    "imagerie": "Imagerie médicale",
    "biologie": "Biologie",
    "prevention": "Prévention",
    "certificats": "Certificats, déclarations",
    "espace-personnel": "Espace personnel",
}
PERSONAL_SPACE = "espace-personnel"
DATA_FILE = PACKAGE_DATA / "rubriques.csv"


@lru_cache(maxsize=1)
def by_loinc() -> dict[str, str]:
    """LOINC code -> rubrique, from the data file (every rubrique must be one of the eight)."""
    with DATA_FILE.open(encoding="utf-8", newline="") as f:
        table = {row["loinc"].strip(): row["rubrique"].strip() for row in csv.DictReader(f)}
    unknown = set(table.values()) - set(RUBRIQUES)
    if unknown:
        raise ValueError(f"{DATA_FILE.name}: unknown rubrique(s) {sorted(unknown)}")
    return table


def given(doc: dict) -> list[str]:
    """The rubrique codes the document's category already holds."""
    return [c.get("code") for concept in doc.get("category") or []
            for c in (concept or {}).get("coding") or [] if c.get("system") == RUBRIQUE_SYSTEM]


def coding(code: str) -> dict:
    return {"coding": [{"system": RUBRIQUE_SYSTEM, "code": code, "display": RUBRIQUES[code]}]}


def fill_category(doc: dict, type_codes: set[str], *, personal: bool) -> None:
    """Check a given rubrique, or add the one the type (or the personal space) implies."""
    codes = given(doc)
    for code in codes:
        if code not in RUBRIQUES:
            raise Unprocessable(f"unknown rubrique {code!r}; expected one of {', '.join(RUBRIQUES)}",
                                expression="DocumentReference.category")
    if codes:
        return
    table = by_loinc()
    code = PERSONAL_SPACE if personal else next((table[c] for c in sorted(type_codes) if c in table), None)
    if code:
        doc["category"] = [*(doc.get("category") or []), coding(code)]
