"""INS (Identifiant National de Santé): identifier systems and the NIR/NIA key rule.

The INS matricule is the person's NIR (or NIA while the NIR is pending):
15 characters, a 13-character body then a 2-digit control key.

Body layout (INSEE, NIR): sex(1) year(2) month(2) department(2) commune(3)
order(3). Corsica departments are written ``2A`` / ``2B``.

Key rule (INSEE / ameli.fr, ANS "Référentiel INS"):
``key = 97 - (body mod 97)``, the body read as a 13-digit number after the
Corsica departments are replaced: ``2A`` -> ``19``, ``2B`` -> ``18``.
The NIA follows the same key rule.

Identifier systems (ANS, "Référentiel INS" / FR Core):
https://interop.esante.gouv.fr/ig/fhir/core (fr-core-patient-ins slice).
"""
from __future__ import annotations

import re

#: NIR as INS (production).
NIR = "urn:oid:1.2.250.1.213.1.4.8"
#: NIA (identification number awaiting a NIR).
NIA = "urn:oid:1.2.250.1.213.1.4.9"
#: NIR of test identities.
NIR_TEST = "urn:oid:1.2.250.1.213.1.4.10"
#: NIR of demonstration identities.
NIR_DEMO = "urn:oid:1.2.250.1.213.1.4.11"

INS_SYSTEMS: frozenset[str] = frozenset({NIR, NIA, NIR_TEST, NIR_DEMO})

# 13-char body: 5 digits, department (2 digits or 2A/2B), 6 digits; then a 2-digit key.
_INS_RE = re.compile(r"[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{6}[0-9]{2}")
_BODY_RE = re.compile(r"[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{6}")
_CORSICA = {"2A": "19", "2B": "18"}


def _numeric_body(body13: str) -> int:
    dept = body13[5:7]
    if dept in _CORSICA:
        body13 = body13[:5] + _CORSICA[dept] + body13[7:]
    return int(body13)


def ins_key(body13: str) -> int:
    """Return the control key (1..97) of a 13-character NIR/NIA body.

    Raises ValueError when ``body13`` is not 13 digits (with ``2A``/``2B``
    allowed as the department, characters 6-7).
    """
    if not isinstance(body13, str) or not _BODY_RE.fullmatch(body13):
        raise ValueError("an INS body is 13 digits (department 2A/2B allowed)")
    return 97 - (_numeric_body(body13) % 97)


def is_valid_ins(value: str) -> bool:
    """True iff ``value`` is a well-formed 15-character NIR/NIA with the right key."""
    if not isinstance(value, str) or not _INS_RE.fullmatch(value):
        return False
    return ins_key(value[:13]) == int(value[13:])


def ins_problem(value: object) -> str | None:
    """Explain why ``value`` is not a valid INS, or None when it is.

    The message never repeats the value (it is personal data).
    """
    if not isinstance(value, str):
        return "the INS must be a string"
    if len(value) != 15:
        return f"an INS has 15 characters (13-character body and 2-digit key), got {len(value)}"
    if not _INS_RE.fullmatch(value):
        return ("an INS is made of digits only, except a Corsica department 2A or 2B "
                "at characters 6-7, and ends with a 2-digit key")
    if ins_key(value[:13]) != int(value[13:]):
        return "the INS control key does not match (key = 97 - (body mod 97), 2A->19, 2B->18)"
    return None
