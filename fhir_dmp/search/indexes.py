"""Index key lists that storage creates for each collection.

Every index of a patient-compartment type starts with ``pid`` (shard key
prefix, https://hl7.org/fhir/R4/compartmentdefinition-patient.html), then:

* paging/sort indexes ``(o.<key>, _id)`` for ``_lastUpdated`` and the date
  parameters, in both directions' keys (a B-tree serves its reverse order
  too, so ``o.date~d: -1, _id: 1`` serves ``-date`` and its reverse);
* one index per selective token/reference parameter on the value
  (``s.<p>.c`` / ``s.<p>.r``). Skipped: ``patient``/``subject`` (the same as
  ``pid`` inside a compartment) and small code sets (status, gender, ...),
  for which the ``pid`` prefix already narrows enough; fewer indexes keep
  writes cheap.

Exception, documented: a Patient's ``pid`` is its own ``_id``, so a ``pid``
prefix would make its indexes useless; Patient searches run across patients
(the INS lookup ``Patient?identifier=system|NIR`` comes before any pid is
known, CONTRACT.md "The DMP in FHIR terms"), so Patient indexes have no
prefix; nor have those of the directory of professionals (Practitioner, PractitionerRole: no
patient's data, their ``pid`` is always empty). DocumentReference identifiers also get a global index
(masterIdentifier uniqueness across the store), which also serves a search inside one DMP
(an identifier is selective on its own): no ``pid``-first copy of it (one index less
on every deposit).

References given by identifier only (the médecin traitant, Consent actors,
AuditEvent agents: idNatPs) are indexed on ``s.<p>.iv``.

Exception: the journal takes an insert on every request, reads included, and the embedded
database pays each index of a journal entry on its one core (bench/README.md, "The journal").
AuditEvent keeps the patient's journal newest first (``pid`` + ``date`` descending, which also
serves ascending; the patient's searches, ``date`` ranges and ``entity`` inside a DMP included,
read that DMP's events), and the two searches privacy operations run across DMPs, whose cost
must not grow with the journal (bench/journal_search.py): who read this document
(``entity``: ``s.entity.r``) and what did this professional read (``agent`` by idNatPs:
``s.agent.iv``). Those two have no ``pid`` prefix: they are asked before any DMP is known,
across every DMP (sharded by ``pid``, they are answered by every shard, each from its index).
Its other parameters are answered by scanning the patient's events.

These are the indexes a MongoDB planner uses. On the embedded SecantusDB, whose planner uses one
clause of a filter and never the second field of a ``pid``-first index, storage keeps one
``pid``-first index per current collection (``storage._one_pid_first``).
"""
from __future__ import annotations

from .extract import sort_key_name
from .registry import SUPPORTED

_UNSELECTIVE = frozenset({"patient", "subject", "status", "gender", "active", "action", "outcome",
                          "contenttype", "format", "security-label", "purpose", "scope"})
_BY_IDENTIFIER = frozenset({"general-practitioner", "actor", "agent"})
#: types written on every request: only these sort indexes (see the module docstring)
_WRITE_HEAVY = {"AuditEvent": ("date",)}
#: searched across patients, never inside one DMP: no ``pid`` prefix (the module docstring)
_ACROSS_PATIENTS = frozenset({"Patient", "Practitioner", "PractitionerRole"})
_GLOBAL = {
    "DocumentReference": [[("s.identifier.c", 1), ("s.identifier.s", 1)]],
    "AuditEvent": [[("s.entity.r", 1)], [("s.agent.iv", 1)]],
}


def index_specs(resource_type: str) -> list[list[tuple[str, int]]]:
    """Index key lists for ``resource_type`` (see module docstring)."""
    params = SUPPORTED[resource_type]
    prefix = [] if resource_type in _ACROSS_PATIENTS else [("pid", 1)]
    if resource_type in _WRITE_HEAVY:
        return [prefix + [("o." + sort_key_name(name, -1), -1), ("_id", 1)] for name in _WRITE_HEAVY[resource_type]] \
            + _GLOBAL.get(resource_type, [])
    specs: list[list[tuple[str, int]]] = []
    for name, param in params.items():
        if param.type == "date":
            specs.append(prefix + [("o." + sort_key_name(name, -1), -1), ("_id", 1)])
            specs.append(prefix + [("o." + sort_key_name(name, 1), 1), ("_id", 1)])
    for name, param in params.items():
        if name == "_id" or name in _UNSELECTIVE:
            continue
        if param.type == "token":
            if [(f"s.{name}.c", 1), (f"s.{name}.s", 1)] in _GLOBAL.get(resource_type, []):
                continue     # the global index serves it (module docstring)
            specs.append(prefix + [(f"s.{name}.c", 1), (f"s.{name}.s", 1)])
        elif param.type == "reference":
            specs.append(prefix + [(f"s.{name}.r", 1)])
            if name in _BY_IDENTIFIER:
                specs.append(prefix + [(f"s.{name}.iv", 1)])
    specs += _GLOBAL.get(resource_type, [])
    return specs
