"""The review case ``Task`` profile (``ig/StructureDefinition-dmp-review-task.json``) and its
CodeSystems (CONTRACT.md "Privacy operations").

A review case is a ``Task`` with ``intent`` ``order``, a ``code`` from
:data:`REVIEW_SYSTEM` (``break-glass``, ``centre-15``, ``anomaly``), ``for`` the Patient of the
DMP, a ``status`` among ``requested``, ``in-progress``, ``completed``, ``input`` entries typed by
codes of the same CodeSystem, and once completed a ``businessStatus`` ``justified`` or
``unjustified`` (same CodeSystem) and a ``note``. Who may change what is the decision's
(``security/decision/``) and the review's (``fhir_dmp/review/``); this module only says what a
well-formed case is.
"""
from __future__ import annotations

from ..http.errors import Issue
from .dmp import ACCESS_BASIS_SYSTEM  # noqa: F401  (the inputs' prior-basis system)

PROFILE_TASK = "https://fhir-dmp.example.org/fhir/StructureDefinition/dmp-review-task"
REVIEW_SYSTEM = "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-privacy-review"
SIGNAL_SYSTEM = "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-privacy-signal"

CASE_CODES = ("break-glass", "centre-15", "anomaly")
VERDICTS = ("justified", "unjustified")
INPUT_CODES = ("actor", "reason", "documents-read", "prior-basis", "score", "signal")
SIGNALS = ("no-relationship", "attestation-only", "same-surname", "same-place", "bulk", "shared-credential",
           "break-glass-rate", "off-hours")
STATUSES = ("requested", "in-progress", "completed")


def _issue(expression: str, diagnostics: str) -> Issue:
    return Issue(diagnostics, "business-rule", expression=[expression])


def coded(concept: dict | None, system: str) -> str | None:
    """The code of ``system`` in a CodeableConcept, or None."""
    for coding in (concept or {}).get("coding") or ():
        if isinstance(coding, dict) and coding.get("system") == system:
            return coding.get("code")
    return None


def case_code(task: dict) -> str | None:
    """The case's kind (``break-glass``, ``centre-15``, ``anomaly``), or None."""
    return coded(task.get("code"), REVIEW_SYSTEM)


def verdict(task: dict) -> str | None:
    """``justified`` or ``unjustified`` once decided, else None."""
    return coded(task.get("businessStatus"), REVIEW_SYSTEM)


def note_text(task: dict) -> str:
    """The officer's note(s), one text."""
    return " ".join(n.get("text", "") for n in task.get("note") or () if isinstance(n, dict)).strip()


def check_task(task: dict) -> list[Issue]:
    """Issues of the ``dmp-review-task`` profile (empty when it conforms)."""
    issues = []
    if case_code(task) not in CASE_CODES:
        issues.append(_issue("Task.code", f"a review case has a code of {REVIEW_SYSTEM}: "
                                          + ", ".join(CASE_CODES)))
    if task.get("intent") != "order":
        issues.append(_issue("Task.intent", "a review case has intent order"))
    if task.get("status") not in STATUSES:
        issues.append(_issue("Task.status", "a review case is " + ", ".join(STATUSES)))
    ref = (task.get("for") or {}).get("reference") or ""
    if not ref.startswith("Patient/"):
        issues.append(_issue("Task.for", "a review case is for the Patient of the DMP (Patient/{id})"))
    if task.get("businessStatus") is not None and verdict(task) not in VERDICTS:
        issues.append(_issue("Task.businessStatus", f"the verdict is justified or unjustified of {REVIEW_SYSTEM}"))
    if task.get("status") == "completed" and (verdict(task) is None or not task.get("note")):
        issues.append(_issue("Task.businessStatus", "a completed review case has a verdict (businessStatus) "
                                                    "and a note"))
    for i, entry in enumerate(task.get("input") or ()):
        if coded(entry.get("type"), REVIEW_SYSTEM) not in INPUT_CODES:
            issues.append(_issue(f"Task.input[{i}].type", "an input is typed by " + ", ".join(INPUT_CODES)
                                 + f" of {REVIEW_SYSTEM}"))
    return issues
