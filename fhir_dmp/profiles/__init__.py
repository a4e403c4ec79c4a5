"""FHIR R4 validation and the DMP profiles (Patient, DocumentReference).

Public API, re-exported here:

* :func:`validate` — strict R4 + DMP profile validation, raises 400/422;
* :mod:`.ins` — INS systems and the NIR/NIA key rule;
* :mod:`.dmp` — read helpers (INS, identity status, médecin traitant, labels,
  document type, authors) and label editing.
"""
from .dmp import (
    DMP_LABELS,
    IDENTITY_RELIABILITY_URL,
    IDENTITY_STATUS_SYSTEM,
    IDNATPS_SYSTEM,
    INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX,
    LABEL_SYSTEM,
    LOINC,
    MASQUE_PS,
    author_ids,
    doc_type_codes,
    general_practitioner_ids,
    identity_status,
    is_ins_qualified,
    labels,
    patient_ins,
    set_labels,
)
from .ins import INS_SYSTEMS, NIA, NIR, NIR_DEMO, NIR_TEST, ins_key, is_valid_ins
from .validation import PROFILES, REQUIRED_BINDINGS, SUPPORTED_TYPES, validate

__all__ = [
    "validate", "SUPPORTED_TYPES", "PROFILES", "REQUIRED_BINDINGS",
    "NIR", "NIA", "NIR_TEST", "NIR_DEMO", "INS_SYSTEMS", "ins_key", "is_valid_ins",
    "LABEL_SYSTEM", "MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX",
    "DMP_LABELS", "IDNATPS_SYSTEM", "LOINC", "IDENTITY_RELIABILITY_URL",
    "IDENTITY_STATUS_SYSTEM",
    "patient_ins", "identity_status", "is_ins_qualified", "general_practitioner_ids",
    "labels", "set_labels", "doc_type_codes", "author_ids",
]
