"""Access facets: what the decision reads of a resource, stored flat beside it.

Storage keeps :func:`access_facets` as ``a`` next to each resource; the decision's queries
(:mod:`.documents`, the Consent query of :mod:`.access`) filter on them in the database, and
:meth:`~.access.RequestAccess.can_see` evaluates the same queries on the same facets in memory.
"""
from __future__ import annotations

from ...profiles import dmp
from ...profiles.ins import INS_SYSTEMS
from .consents import consent_actor_ids, identifier_key


def access_facets(resource_type: str, resource: dict) -> dict:
    """Flat fields the search guard filters on (stored as ``a`` by storage).

    DocumentReference: ``types`` (its LOINC type codes: rule 9 needs every one allowed),
    ``masked`` (MASQUE_PS), ``authors`` (idNatPs), ``labels`` (the DMP label codes).
    Consent: ``actors`` (``system|value`` of each provision actor identifier, see
    :func:`consent_actor_ids`). Patient: ``ins`` (``system|value`` of its INS identifiers, unique:
    one DMP per INS, CONTRACT.md "The DMP in FHIR terms"). The same functions read the resource in :meth:`RequestAccess.can_see`,
    so the filter and the per-resource check read the same facts.
    """
    if resource_type == "DocumentReference":
        labels = dmp.labels(resource)
        return {"types": sorted(dmp.doc_type_codes(resource)), "masked": dmp.MASQUE_PS in labels,
                "authors": sorted(dmp.author_ids(resource)), "labels": sorted(labels)}
    if resource_type == "Consent":
        return {"actors": sorted(consent_actor_ids(resource))}
    if resource_type == "Patient":
        ins = sorted({identifier_key(i.get("system"), i.get("value")) for i in resource.get("identifier") or []
                      if isinstance(i, dict) and i.get("system") in INS_SYSTEMS} - {None})
        out = {"gp": sorted(dmp.general_practitioner_ids(resource))}
        if ins:
            out["ins"] = ins        # absent, not empty: the unique index skips it
        return out
    return {}


def pid_filter(pids) -> dict:
    pids = sorted(pids)
    return {"pid": pids[0]} if len(pids) == 1 else {"pid": {"$in": pids}}
