"""DMP profiles of Patient and DocumentReference: rules and read helpers.

Rules (CONTRACT.md "The DMP in FHIR terms", DESIGN.md "French codes"):

Patient (``dmp-patient``)
  * every identifier of an INS system (NIR, NIA, test NIR, demo NIR) holds a
    valid INS (15 characters, key rule of :mod:`fhir_dmp.profiles.ins`);
  * at most one INS per Patient;
  * the FR Core identity reliability extension, when present, is well formed
    with an ``identityStatus`` of PROV, RECUP, VALI or QUAL
    (https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability);
  * ``generalPractitioner`` (médecin traitant) is a Reference carrying the
    idNatPs identifier ``urn:oid:1.2.250.1.71.4.2.1|<idNatPs>``.

DocumentReference (``dmp-documentreference``)
  * ``subject`` is ``Patient/<id>``;
  * ``type`` has a LOINC coding;
  * each ``content.attachment.contentType`` is PDF, XML or CDA
    (``application/pdf``, ``text/xml``, ``application/hl7-v3+xml``, ``text/plain``),
    ``content.format`` (a Coding) has a code;
  * ``securityLabel`` codings are DMP labels (TRE_A07, system
    ``urn:oid:1.2.250.1.213.1.1.4.13``: MASQUE_PS, INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX) or v3 Confidentiality N, R, V.

The checks are written for any JSON (they never assume the structure is
valid; the structural walk reports that) and return
:class:`~fhir_dmp.http.errors.Issue` lists. Diagnostics never repeat values.
"""
from __future__ import annotations

import copy
import re

from fhir_dmp.http.errors import Issue
from fhir_dmp.security.principal import IDNATPS_SYSTEM, PURPOSE_SYSTEM

from .ins import INS_SYSTEMS, NIA, NIR, NIR_DEMO, NIR_TEST, ins_problem, is_valid_ins

__all__ = [
    "LABEL_SYSTEM", "MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX",
    "DMP_LABELS", "IDNATPS_SYSTEM", "LOINC", "CONFIDENTIALITY_SYSTEM",
    "IDENTITY_RELIABILITY_URL", "IDENTITY_STATUS_SYSTEM", "IDENTITY_STATUSES",
    "DOCUMENT_CONTENT_TYPES", "PROFILE_PATIENT", "PROFILE_DOCUMENTREFERENCE",
    "patient_ins", "identity_status", "is_ins_qualified", "general_practitioner_ids",
    "labels", "set_labels", "doc_type_codes", "author_ids",
    "check_patient", "check_documentreference", "check_relatedperson",
    "PROFILE_RELATEDPERSON", "PROFILE_AUDITEVENT", "PROFILES_CONSENT", "patient_consent",
]

PROFILE_BASE = "https://fhir-dmp.example.org/fhir/StructureDefinition/"
PROFILE_PATIENT = PROFILE_BASE + "dmp-patient"
PROFILE_DOCUMENTREFERENCE = PROFILE_BASE + "dmp-documentreference"
PROFILE_RELATEDPERSON = PROFILE_BASE + "dmp-relatedperson"
#: the journal's entries (written by the server only; CONTRACT.md "Privacy operations")
PROFILE_AUDITEVENT = PROFILE_BASE + "dmp-auditevent"
#: why an access was granted or refused (CONTRACT.md "Privacy operations"; codes: security/decision/basis.py)
ACCESS_BASIS_SYSTEM = "https://fhir-dmp.example.org/fhir/CodeSystem/dmp-access-basis"
ACCESS_BASIS_EXTENSION = PROFILE_BASE + "dmp-access-basis"
#: the Consent shapes of CONTRACT.md ("The DMP in FHIR terms", "Lifecycle"), one profile each
PROFILES_CONSENT = tuple(PROFILE_BASE + name for name in (
    "dmp-consent-authorization", "dmp-consent-block", "dmp-consent-optout", "dmp-consent-feeding-opposition"))
ROLE_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
REPRESENTATIVE_ROLES = ("PRN", "GUARD")

# TRE_A07 confidentiality codes of the DMP.
LABEL_SYSTEM = "urn:oid:1.2.250.1.213.1.1.4.13"
MASQUE_PS = "MASQUE_PS"
INVISIBLE_PATIENT = "INVISIBLE_PATIENT"
INVISIBLE_REPRESENTANTS_LEGAUX = "INVISIBLE_REPRESENTANTS_LEGAUX"
DMP_LABELS = frozenset({MASQUE_PS, INVISIBLE_PATIENT, INVISIBLE_REPRESENTANTS_LEGAUX})
LABEL_DISPLAY = {
    MASQUE_PS: "Masqué aux professionnels de santé",
    INVISIBLE_PATIENT: "Non visible par le patient",
    INVISIBLE_REPRESENTANTS_LEGAUX: "Non visible par les représentants légaux du patient",
}
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONFIDENTIALITY_CODES = frozenset({"N", "R", "V"})

LOINC = "http://loinc.org"

IDENTITY_RELIABILITY_URL = \
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
IDENTITY_STATUS_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-identity-status"
IDENTITY_STATUSES = frozenset({"PROV", "RECUP", "VALI", "QUAL"})
QUALIFIED_STATUSES = frozenset({"VALI", "QUAL"})

DOCUMENT_CONTENT_TYPES = frozenset({"application/pdf", "text/xml", "application/hl7-v3+xml", "text/plain"})

# Preference when reading the INS of a Patient (one is allowed, but be deterministic).
_INS_ORDER = (NIR, NIR_TEST, NIR_DEMO, NIA)
_PATIENT_REF = re.compile(r"Patient/[A-Za-z0-9\-\.]{1,64}")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _str(value) -> str | None:
    """The value if it is a string, else None (safe for set membership)."""
    return value if isinstance(value, str) else None


# --- Patient helpers ----------------------------------------------------------------------


def patient_ins(patient: dict) -> tuple[str, str] | None:
    """The Patient's INS as (system, value), or None when it has none.

    Only identifiers of an INS system (NIR, test NIR, demo NIR, NIA, preferred
    in that order) with a string value count; the value is not key-checked
    here (:func:`validate` refuses invalid ones on write).
    """
    found: dict[str, str] = {}
    for ident in _list(_dict(patient).get("identifier")):
        ident = _dict(ident)
        system, value = _str(ident.get("system")), ident.get("value")
        if system in INS_SYSTEMS and isinstance(value, str) and value and system not in found:
            found[system] = value
    for system in _INS_ORDER:
        if system in found:
            return system, found[system]
    return None


def _reliability_extensions(patient: dict) -> list[tuple[int, dict]]:
    return [(i, ext) for i, ext in enumerate(_list(_dict(patient).get("extension")))
            if isinstance(ext, dict) and ext.get("url") == IDENTITY_RELIABILITY_URL]


def identity_status(patient: dict) -> str | None:
    """The FR Core identity status (PROV, RECUP, VALI, QUAL), or None if absent/unknown."""
    for _, ext in _reliability_extensions(patient):
        for sub in _list(ext.get("extension")):
            sub = _dict(sub)
            if sub.get("url") != "identityStatus":
                continue
            coding = _dict(sub.get("valueCoding"))
            code = _str(coding.get("code"))
            if coding.get("system") == IDENTITY_STATUS_SYSTEM and code in IDENTITY_STATUSES:
                return code
    return None


def is_ins_qualified(patient: dict) -> bool:
    """True iff the Patient has a valid INS and its identity status is VALI or QUAL."""
    ins = patient_ins(patient)
    return (ins is not None and is_valid_ins(ins[1])
            and identity_status(patient) in QUALIFIED_STATUSES)


def _idnatps_ids(refs) -> set[str]:
    """idNatPs in the ``identifier`` of each of these References."""
    out = set()
    for ref in _list(refs):
        ident = _dict(_dict(ref).get("identifier"))
        if ident.get("system") == IDNATPS_SYSTEM and isinstance(ident.get("value"), str):
            out.add(ident["value"])
    return out


def general_practitioner_ids(patient: dict) -> set[str]:
    """idNatPs of the médecin traitant (``generalPractitioner[].identifier``)."""
    return _idnatps_ids(_dict(patient).get("generalPractitioner"))


# --- DocumentReference helpers -----------------------------------------------------------


def labels(docref: dict) -> set[str]:
    """DMP label codes (TRE_A07) present in ``securityLabel``."""
    out = set()
    for concept in _list(_dict(docref).get("securityLabel")):
        for coding in _list(_dict(concept).get("coding")):
            coding = _dict(coding)
            if coding.get("system") == LABEL_SYSTEM and _str(coding.get("code")) in DMP_LABELS:
                out.add(coding["code"])
    return out


def set_labels(docref: dict, codes: set[str]) -> dict:
    """Return a copy of ``docref`` whose DMP labels are exactly ``codes``.

    Codings of other systems (v3 Confidentiality, ...) are kept in place;
    concepts left without coding are dropped; each DMP label is one concept.
    ValueError if a code is not a DMP label. The input is not modified.
    """
    codes = set(codes)
    unknown = codes - DMP_LABELS
    if unknown:
        raise ValueError(f"not DMP labels: {', '.join(sorted(unknown))}")
    out = copy.deepcopy(docref)
    kept = []
    for concept in _list(out.get("securityLabel")):
        if not isinstance(concept, dict):
            continue
        coding = [c for c in _list(concept.get("coding"))
                  if not (isinstance(c, dict) and c.get("system") == LABEL_SYSTEM)]
        if coding:
            concept["coding"] = coding
            kept.append(concept)
        elif "coding" not in concept and concept.get("text"):
            kept.append(concept)
    for code in sorted(codes):
        kept.append({"coding": [{"system": LABEL_SYSTEM, "code": code,
                                 "display": LABEL_DISPLAY[code]}]})
    if kept:
        out["securityLabel"] = kept
    else:
        out.pop("securityLabel", None)
    return out


def doc_type_codes(docref: dict) -> set[str]:
    """LOINC codes of ``DocumentReference.type``."""
    return {c["code"] for c in _list(_dict(_dict(docref).get("type")).get("coding"))
            if isinstance(c, dict) and c.get("system") == LOINC and isinstance(c.get("code"), str)}


def author_ids(docref: dict) -> set[str]:
    """idNatPs found in ``author[].identifier``."""
    return _idnatps_ids(_dict(docref).get("author"))


# --- Consent builder -----------------------------------------------------------------------
CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def patient_consent(patient_id: str, kind: str, *, purpose: str, at: str, actor: dict | None = None,
                    verified_with: dict | None = None) -> dict:
    """A patient's choice as CONTRACT.md "The DMP in FHIR terms" writes it: a Consent that
    permits (``OPTIN``) or denies (``OPTOUT``) ``purpose`` (v3-ActReason) to ``actor`` (a
    Reference, the primary recipient ``PRCP``) or to everyone, dated ``at`` (a FHIR instant);
    ``verified_with`` (a Reference) records who verified it."""
    provision: dict = {"type": kind}
    if actor is not None:
        provision["actor"] = [{"role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": "PRCP"}]},
                               "reference": actor}]
    provision["purpose"] = [{"system": PURPOSE_SYSTEM, "code": purpose}]
    consent = {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": at,
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "OPTIN" if kind == "permit" else "OPTOUT"}]},
    }
    if verified_with is not None:
        consent["verification"] = [{"verified": True, "verifiedWith": verified_with}]
    consent["provision"] = provision
    return consent


# --- rules -------------------------------------------------------------------------------


def _issue(expression: str, diagnostics: str, code: str = "business-rule") -> Issue:
    return Issue(diagnostics, code, expression=[expression])


def check_patient(patient: dict) -> list[Issue]:
    """Issues of the ``dmp-patient`` profile (empty when it conforms)."""
    issues: list[Issue] = []
    seen_ins: set[tuple[str, str]] = set()
    for i, ident in enumerate(_list(patient.get("identifier"))):
        if not isinstance(ident, dict) or _str(ident.get("system")) not in INS_SYSTEMS:
            continue
        path = f"Patient.identifier[{i}].value"
        value = ident.get("value")
        if value is None:
            issues.append(_issue(path, "an INS identifier needs a value", "required"))
            continue
        problem = ins_problem(value)
        if problem:
            issues.append(_issue(path, f"invalid INS: {problem}", "value"))
            continue
        seen_ins.add((ident["system"], value))
        if len(seen_ins) > 1:
            issues.append(_issue(f"Patient.identifier[{i}]",
                                 "a Patient carries at most one INS (NIR or NIA)"))
    issues.extend(_check_reliability(patient))
    # A generalPractitioner given as a plain reference (Practitioner/..., Organization/...) is kept as
    # given (CONTRACT.md: no referential integrity on types we do not host); only one carrying an
    # idNatPs identifier counts as médecin traitant, and that identifier must then be well formed.
    for i, ref in enumerate(_list(patient.get("generalPractitioner"))):
        ident = _dict(_dict(ref).get("identifier"))
        if ident.get("system") == IDNATPS_SYSTEM and not (isinstance(ident.get("value"), str)
                                                         and ident["value"].strip()):
            issues.append(_issue(
                f"Patient.generalPractitioner[{i}].identifier.value",
                "the médecin traitant's idNatPs value is missing", "required"))
    return issues


def check_relatedperson(rp: dict) -> list[Issue]:
    """Issues of the ``dmp-relatedperson`` profile: a legal representative of one Patient."""
    issues: list[Issue] = []
    ref = _dict(rp.get("patient")).get("reference")
    if not (isinstance(ref, str) and re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", ref)):
        issues.append(_issue("RelatedPerson.patient", "patient must be a reference Patient/<id>", "required"))
    roles = {c.get("code") for concept in _list(rp.get("relationship")) for c in _list(_dict(concept).get("coding"))
             if isinstance(c, dict) and c.get("system") == ROLE_CODE_SYSTEM}
    if not roles & set(REPRESENTATIVE_ROLES):
        issues.append(_issue("RelatedPerson.relationship", "relationship must hold v3-RoleCode PRN (parent) "
                             "or GUARD (guardian)", "required"))
    if not isinstance(rp.get("active"), bool):
        issues.append(_issue("RelatedPerson.active", "active is required", "required"))
    if not _list(rp.get("name")):
        issues.append(_issue("RelatedPerson.name", "a legal representative has a name", "required"))
    return issues


def _check_reliability(patient: dict) -> list[Issue]:
    found = _reliability_extensions(patient)
    issues: list[Issue] = []
    if len(found) > 1:
        issues.append(_issue(f"Patient.extension[{found[1][0]}]",
                             "at most one identity reliability extension"))
    for i, ext in found[:1]:
        path = f"Patient.extension[{i}]"
        subs = [(j, _dict(s)) for j, s in enumerate(_list(ext.get("extension")))
                if _dict(s).get("url") == "identityStatus"]
        if len(subs) != 1:
            issues.append(_issue(f"{path}.extension",
                                 "the identity reliability extension needs exactly one "
                                 "'identityStatus' sub-extension", "required"))
            continue
        j, sub = subs[0]
        coding = sub.get("valueCoding")
        cpath = f"{path}.extension[{j}].valueCoding"
        if not isinstance(coding, dict):
            issues.append(_issue(cpath, "identityStatus needs a valueCoding", "required"))
        elif coding.get("system") != IDENTITY_STATUS_SYSTEM:
            issues.append(_issue(f"{cpath}.system",
                                 f"identityStatus system must be {IDENTITY_STATUS_SYSTEM}",
                                 "code-invalid"))
        elif _str(coding.get("code")) not in IDENTITY_STATUSES:
            issues.append(_issue(f"{cpath}.code", "identityStatus code must be one of "
                                 "PROV, RECUP, VALI, QUAL", "code-invalid"))
    return issues


def check_documentreference(docref: dict) -> list[Issue]:
    """Issues of the ``dmp-documentreference`` profile (empty when it conforms)."""
    issues: list[Issue] = []
    subject = docref.get("subject")
    if subject is None:
        issues.append(_issue("DocumentReference.subject",
                             "subject is required: the Patient (DMP) the document belongs to",
                             "required"))
    elif not (isinstance(subject, dict) and isinstance(subject.get("reference"), str)
              and _PATIENT_REF.fullmatch(subject["reference"])):
        issues.append(_issue("DocumentReference.subject.reference",
                             "subject must be a reference Patient/<id>"))
    if not doc_type_codes(docref):
        issues.append(_issue("DocumentReference.type",
                             f"type needs a LOINC coding (system {LOINC}) with a code",
                             "required"))
    for i, content in enumerate(_list(docref.get("content"))):
        path = f"DocumentReference.content[{i}]"
        attachment = _dict(_dict(content).get("attachment"))
        ctype = attachment.get("contentType")
        if not isinstance(ctype, str):
            issues.append(_issue(f"{path}.attachment.contentType",
                                 "attachment.contentType is required", "required"))
        elif ctype.split(";")[0].strip().lower() not in DOCUMENT_CONTENT_TYPES:
            issues.append(_issue(f"{path}.attachment.contentType",
                                 "contentType must be one of "
                                 + ", ".join(sorted(DOCUMENT_CONTENT_TYPES)), "code-invalid"))
        fmt = _dict(content).get("format")
        if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("code"), str)):
            issues.append(_issue(f"{path}.format", "format must be a Coding with a code"))
    for i, concept in enumerate(_list(docref.get("securityLabel"))):
        for j, coding in enumerate(_list(_dict(concept).get("coding"))):
            coding = _dict(coding)
            path = f"DocumentReference.securityLabel[{i}].coding[{j}]"
            system, code = coding.get("system"), _str(coding.get("code"))
            if system == LABEL_SYSTEM:
                if code not in DMP_LABELS:
                    issues.append(_issue(f"{path}.code", "DMP label must be one of "
                                         + ", ".join(sorted(DMP_LABELS)), "code-invalid"))
            elif system == CONFIDENTIALITY_SYSTEM:
                if code not in CONFIDENTIALITY_CODES:
                    issues.append(_issue(f"{path}.code",
                                         "v3 Confidentiality code must be N, R or V",
                                         "code-invalid"))
            else:
                issues.append(_issue(f"{path}.system",
                                     f"securityLabel system must be {LABEL_SYSTEM} (DMP labels) "
                                     f"or {CONFIDENTIALITY_SYSTEM}", "code-invalid"))
    return issues
