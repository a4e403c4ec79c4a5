"""The memoized index of the journal's events (``fhir_dmp/search/extract.py`` ``_extract_memoized``,
issue 22) gives exactly what the reference extraction gives.

* Every event that a run of the real app journals (reads, searches, a denied read, break-glass
  and centre 15 reads, creates, updates, patches, deletes, refused writes, a refused token in the
  system journal, the patient's journal read by the patient) has the same ``s`` and ``o`` from
  :func:`fhir_dmp.search.extract` as from :func:`~fhir_dmp.search.extract.extract_reference`,
  with the memo cold and warm; so has its entry as the sealer derives it.
* Those events changed at random where the memo keys look (codings, CodeableConcepts, strings,
  booleans and numbers where codes are, references by literal, type or identifier, lists, odd
  types) still give the same index: what the memo keys leave out cannot change an answer.
"""
from __future__ import annotations

import copy
import functools
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_dmp import search
from fhir_dmp.search.extract import extract_reference
from tests import builders as b

BTG = {"Category": "http://terminology.hl7.org/CodeSystem/v3-ActReason#BTG; "
                   "scheme=\"http://hl7.org/fhir/tag/security\"; label=\"break the glass\"",
       "X-Break-Glass-Reason": "patient inconscient aux urgences"}


def _memo():
    return sys.modules["fhir_dmp.search.extract"]._memo


def _run_accesses(api, dmp) -> None:
    pid, doc = dmp["pid"], dmp["consult"]["id"]
    dr, other = api.as_ps(b.PS_DR), api.as_ps(b.PS_OTHER)
    assert dr.get(f"Patient/{pid}").status_code == 200
    assert dr.get(f"DocumentReference/{doc}").status_code == 200
    assert dr.search(f"DocumentReference?patient={pid}&_count=1")["resourceType"] == "Bundle"
    assert api.as_ps(b.PS_KINE, profession="70").get(f"DocumentReference/{doc}").status_code == 404
    assert other.get(f"DocumentReference/{doc}", headers=BTG).status_code == 200
    assert api.as_ps(b.PS_OTHER, purpose="BTG", btg_reason="arrêt cardiaque").get(
        f"DocumentReference/{doc}").status_code == 200
    api.as_regulation().get(f"Patient/{pid}")
    me = api.as_patient(pid)
    assert me.get(f"Patient/{pid}").status_code == 200
    assert me.search(f"AuditEvent?patient=Patient/{pid}&_count=5")["resourceType"] == "Bundle"
    assert dr.put(f"Patient/{pid}", dmp["patient"] | {"gender": "other"}).status_code == 200
    assert dr.patch(f"DocumentReference/{doc}",
                    [{"op": "add", "path": "/description", "value": "revu"}]).status_code < 500
    assert dr.post("DocumentReference", {"resourceType": "DocumentReference"}).status_code >= 400
    assert dr.delete(f"DocumentReference/{dmp['lab']['id']}").status_code in (200, 204)
    assert dr.get(f"DocumentReference/{dmp['lab']['id']}").status_code in (404, 410)
    assert api.as_token("not-a-token").get(f"Patient/{pid}").status_code == 401
    assert api.as_admin().get(f"Patient/{pid}").status_code in (200, 403, 404)


def _outcome(fn, res: dict):
    try:
        return fn("AuditEvent", res)
    except Exception as exc:    # noqa: BLE001 — odd content may fail both ways (the sealer logs it)
        return type(exc)


def _same(res: dict) -> None:
    """The same index, or the same error."""
    assert _outcome(search.extract, res) == _outcome(extract_reference, res), res


def test_every_event_of_a_run_is_indexed_as_the_reference_does(api, dmp, db):
    _run_accesses(api, dmp)
    entries = b.journal_entries(db)
    subtypes = {e["res"]["subtype"][0]["code"] for e in entries}
    outcomes = {e["res"]["outcome"] for e in entries}
    purposes = {c["code"] for e in entries for p in e["res"].get("purposeOfEvent") or () for c in p["coding"]}
    assert {"read", "search", "create", "update", "patch", "delete"} <= subtypes, subtypes
    assert {"0", "4"} <= outcomes and {"TREAT", "BTG"} <= purposes, (outcomes, purposes)
    assert any(not e.get("pid") for e in entries)          # the system journal's refused token
    for warm in (False, True):
        if not warm:
            _memo().clear()
        for e in entries:
            _same(e["res"])
            s, o = extract_reference("AuditEvent", e["res"])
            assert (e["s"], e["o"]) == (s, o), e["_id"]     # the entry as sealed (or to be)
    EVENTS.extend(e["res"] for e in entries)


#: the events of the run above, for the property below (the same module: it runs first)
EVENTS: list[dict] = []


@functools.lru_cache(maxsize=1)
def _built_events() -> list[dict]:
    """Events of reads, denials and break-glass as ``build_event`` writes them (the property's
    corpus when the run above did not run first)."""
    from fhir_dmp.audit.events import AccessRecord, build_event
    from fhir_dmp.security.principal import BTG, PS, TREAT, Principal
    from fhir_dmp.security.scopes import Scopes
    out = []
    for purpose, outcome, interaction in ((TREAT, "0", "read"), (TREAT, "4", "read"), (BTG, "0", "search")):
        principal = Principal(kind=PS, subject="ps", scopes=Scopes.parse("user/*.cruds"), id_nat_ps=b.PS_DR,
                              professions=("10",), acr="eidas1", purpose=purpose)
        out.append(build_event(AccessRecord(
            interaction=interaction, action="R", outcome=outcome, principal=principal, patient_id="p1",
            resource="DocumentReference/d1/_history/1", query=None, decision={"result": "permit", "rule": "consent"},
            http_status=200, client_ip="10.0.0.7", request_id="r"), source_observer="fhir-dmp test"))
    return out

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(0, 1), st.text(max_size=3),
                    st.sampled_from(["http://loinc.org", "Patient/p1", "read", "1", "Patient/#x", "urn:x"]))
_small = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(
                                                           ["system", "code", "display", "text", "coding",
                                                            "value", "reference", "type", "identifier"]),
                                                           inner, max_size=4)),
                      max_leaves=8)
_coding = st.fixed_dictionaries({}, optional={"system": _scalar, "code": _scalar, "display": _scalar})
_concept = st.fixed_dictionaries({}, optional={"coding": st.one_of(st.lists(_coding, max_size=2), _scalar),
                                               "text": _scalar})
_reference = st.fixed_dictionaries({}, optional={
    "reference": _scalar, "type": _scalar, "display": _scalar,
    "identifier": st.one_of(_scalar, st.fixed_dictionaries({}, optional={"system": _scalar, "value": _scalar}))})
#: what is put where the memo keys look: well-formed or not, one value or a list
_value = st.one_of(_scalar, _coding, _concept, _reference, st.lists(st.one_of(_coding, _concept, _reference),
                                                                     max_size=2), _small)
#: where the memoized parameters (and the walks they share) read an event
_PATHS = [("type",), ("subtype",), ("subtype", 0), ("action",), ("outcome",), ("agent",), ("agent", 0),
          ("agent", 0, "who"), ("agent", 0, "who", "identifier"), ("agent", 0, "who", "reference"),
          ("agent", 0, "who", "type"), ("agent", 0, "who", "identifier", "system"),
          ("agent", 0, "who", "identifier", "value"), ("agent", 1, "who"),
          ("agent", 0, "purposeOfUse"), ("agent", 0, "purposeOfUse", 0), ("agent", 0, "purposeOfUse", 0, "coding"),
          ("agent", 0, "purposeOfUse", 0, "coding", 0), ("agent", 0, "purposeOfUse", 0, "coding", 0, "code"),
          ("type", "display"), ("type", "system"), ("entity", 0, "what"), ("entity", 0, "what", "reference"),
          ("purposeOfEvent",), ("recorded",), ("meta", "lastUpdated"),
          # one field of a real value (the rest as the memo holds it)
          ("type", "code"), ("type", "text"), ("type", "coding"), ("subtype", 0, "code"), ("subtype", 0, "display"),
          ("subtype", 0, "text"), ("agent", 0, "purposeOfUse", 0, "text"),
          ("agent", 0, "purposeOfUse", 0, "coding", 0, "display"), ("agent", 0, "purposeOfUse", 0, "coding", 0, "system"),
          ("agent", 0, "who", "display"), ("entity", 0, "what", "type"), ("entity", 1, "what", "identifier")]


def _put(res: dict, path: tuple, value) -> None:
    node = res
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict) and isinstance(path[-1], str):
        node[path[-1]] = value
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = value


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_events_changed_where_the_memo_looks_are_indexed_as_the_reference_does(data):
    events = EVENTS or _built_events()       # run alone: events built as the journal builds them
    res = copy.deepcopy(data.draw(st.sampled_from(events)))
    for _ in range(data.draw(st.integers(1, 3))):
        _put(res, data.draw(st.sampled_from(_PATHS)), data.draw(_value))
    _same(res)
    _same(res)      # the memo now holds what the first call put there
