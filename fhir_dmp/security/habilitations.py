"""The habilitation matrix: which profession (TRE_G15) may read which document type (LOINC).

Policy data, not code (DESIGN.md rule 9): the CSV shipped in
``fhir_dmp/data/habilitations.csv`` (path configurable with
``FHIR_DMP_HABILITATIONS_FILE``) is validated at start-up; a profession or
document type it does not list is denied.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..runtime.config import ConfigError

REQUIRED_COLUMNS = ("profession_code", "type_code", "read")


class HabilitationError(ConfigError):
    """The matrix file is unusable (one-line message naming the line)."""


@dataclass(frozen=True)
class Habilitations:
    """Immutable matrix: ``profession -> frozenset(type codes readable)``."""

    readable: dict
    professions: frozenset
    type_codes: frozenset

    def allowed_types(self, profession: str | None) -> frozenset:
        return self.readable.get(profession or "", frozenset())

    def may_read(self, profession: str | None, type_codes: set[str] | frozenset) -> bool:
        """True when the document has type codes and the profession may read every one of them
        (CONTRACT.md "Habilitation")."""
        allowed = self.allowed_types(profession)
        return bool(type_codes) and all(code in allowed for code in type_codes)

    def knows(self, profession: str | None) -> bool:
        return profession in self.professions

    @classmethod
    def load(cls, path: Path) -> "Habilitations":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise HabilitationError(f"cannot read habilitation matrix {path}: {exc.strerror}") from None
        rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        reader = csv.DictReader(rows)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise HabilitationError(f"habilitation matrix {path}: missing column(s) {', '.join(missing)}")
        readable: dict[str, set] = {}
        professions, types = set(), set()
        seen = set()
        for lineno, row in enumerate(reader, start=2):
            prof, code, read = (row["profession_code"] or "").strip(), (row["type_code"] or "").strip(), \
                (row["read"] or "").strip().lower()
            if not prof.isdigit() or not code:
                raise HabilitationError(f"habilitation matrix {path}: bad profession or type on row {lineno}")
            if read not in ("yes", "no"):
                raise HabilitationError(f"habilitation matrix {path}: read must be yes or no on row {lineno}")
            if (prof, code) in seen:
                raise HabilitationError(f"habilitation matrix {path}: duplicate {prof}/{code} on row {lineno}")
            seen.add((prof, code))
            professions.add(prof)
            types.add(code)
            if read == "yes":
                readable.setdefault(prof, set()).add(code)
        if not professions:
            raise HabilitationError(f"habilitation matrix {path} is empty")
        return cls({p: frozenset(v) for p, v in readable.items()}, frozenset(professions), frozenset(types))
