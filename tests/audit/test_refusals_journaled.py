"""Every refused write and every vread is in the patient's journal (issue 18, holes 2 and 6).

CONTRACT.md "REST behaviour": a write naming a resource the caller may not see answers exactly
like one naming a missing resource; the journal still has it, in the journal of the DMP it names,
which the patient reads with ``GET AuditEvent?patient=Patient/{id}``.

Real app, real tokens, real SecantusDB.
"""
from __future__ import annotations

import json

import pytest

from tests import builders as b
from tests.audit.test_journal import agent_ps, entries, find, journal

MISSING = "0123456789abcdef01234567"


@pytest.fixture
def world(api):
    """DMP A opened by PS_DR (two documents, one deleted), DMP B opened by PS_OTHER."""
    dr, other = api.as_ps(b.PS_DR), api.as_ps(b.PS_OTHER)
    a = dr.create(b.patient())["id"]
    doc = dr.create(b.docref(a))
    gone = dr.create(b.docref(a, b.LAB))
    assert dr.delete(f"DocumentReference/{gone['id']}").status_code == 204
    return {"a": a, "b": other.create(b.patient())["id"], "doc": doc, "gone": gone["id"],
            "binary": doc["content"][0]["attachment"]["url"].split("/")[1], "dr": dr, "other": other,
            "me": api.as_patient(a)}


def refusals(world, ps: str) -> int:
    """How many refusals of ``ps`` the patient of DMP A reads in their journal."""
    events = journal(world["me"], world["a"])
    return len(find(events, ps=ps, outcome="4")) + len(find(events, ps=ps, outcome="8"))


def same_answer(named, missing, hidden_id: str, missing_id: str) -> None:
    """The same status and OperationOutcome, no other id (CONTRACT.md "REST behaviour")."""
    assert named.status_code == missing.status_code, (named.json, missing.json)
    body = named.get_data(as_text=True).replace(hidden_id, missing_id)
    strip = lambda issue: {k: v for k, v in issue.items() if k != "diagnostics"} | {   # noqa: E731
        "diagnostics": issue.get("diagnostics", "").replace(hidden_id, missing_id)}
    assert [strip(i) for i in named.json["issue"]] == [strip(i) for i in missing.json["issue"]], body


def test_a_refused_deposit_is_in_the_journal_of_the_dmp_it_names(world):
    """Hole 2: X-Security-Context, relatesTo and attachment.url naming DMP A, by a PS who may not
    see it: answered as missing, journaled in A."""
    other, doc, bid = world["other"], world["doc"], world["binary"]

    def binary(target):
        return other.post("Binary", raw=b"%PDF-1.4 x", content_type="application/pdf",
                          headers={"X-Security-Context": f"DocumentReference/{target}"})

    def replacing(target):
        return other.post("DocumentReference", b.docref(world["b"]) | {"relatesTo": [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{target}"}}]})

    def attaching(target):
        return other.post("DocumentReference", b.docref(world["b"]) | {"content": [
            {"attachment": {"contentType": "application/pdf", "url": f"Binary/{target}"}}]})

    for write, hidden in ((binary, doc["id"]), (replacing, doc["id"]), (attaching, bid)):
        before = refusals(world, b.PS_OTHER)
        named = write(hidden)
        assert named.status_code == 422, write
        same_answer(named, write(MISSING), hidden, MISSING)
        assert refusals(world, b.PS_OTHER) == before + 1, write


def test_every_refused_write_and_every_vread_is_in_the_journal(world):
    """Hole 6: refusals raised before the unit of work starts (If-Match 400/412, a move to another
    record, a patch that does not apply, an If-Match on a deleted resource, a conditional write
    matching several) and the vread of a deletion are journaled in the DMP, with their outcome."""
    dr, a, doc, gone = world["dr"], world["a"], world["doc"], world["gone"]
    url = f"DocumentReference/{doc['id']}"
    steps = [
        (400, lambda: dr.put(url, doc, headers={"If-Match": "three"})),
        (412, lambda: dr.put(url, doc, headers={"If-Match": 'W/"9"'})),
        (412, lambda: dr.put(f"DocumentReference/{gone}", b.docref(a) | {"id": gone},
                             headers={"If-Match": 'W/"1"'})),
        (422, lambda: dr.put(url, doc | {"subject": {"reference": f"Patient/{world['b']}"}})),
        (422, lambda: dr.patch(url, [{"op": "remove", "path": "/nothing/here"}])),
        (412, lambda: dr.post("DocumentReference", b.docref(a), headers={"If-None-Exist": f"patient={a}"})),
        (412, lambda: dr.put(f"DocumentReference?patient={a}", b.docref(a))),
    ]
    dr.create(b.docref(a, b.IMAGING))      # two current documents: the conditional writes match both
    for status, call in steps:
        before = refusals(world, b.PS_DR)
        r = call()
        assert r.status_code == status, r.get_data(as_text=True)
        assert refusals(world, b.PS_DR) == before + 1, (status, r.json)
    # the vread of a version that is a deletion: 410 to who sees it, journaled
    before = len(find(journal(world["me"], a), ps=b.PS_DR, interaction="vread", outcome="4"))
    assert dr.get(f"DocumentReference/{gone}/_history/2").status_code == 410
    events = journal(world["me"], a)
    assert len(find(events, ps=b.PS_DR, interaction="vread", outcome="4")) == before + 1
    # ... and to a PS who may not see it, exactly a missing one; journaled too
    before = refusals(world, b.PS_OTHER)
    hidden = world["other"].get(f"DocumentReference/{gone}/_history/2")
    same_answer(hidden, world["other"].get(f"DocumentReference/{MISSING}/_history/2"), gone, MISSING)
    assert hidden.status_code == 404 and refusals(world, b.PS_OTHER) == before + 1


def test_a_refused_write_inside_a_transaction_is_journaled_in_its_dmp(world):
    """A 412 raised inside the write's transaction: in the DMP's journal, like one raised before."""
    dr, doc = world["dr"], world["doc"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": doc, "request": {"method": "PUT", "url": f"DocumentReference/{doc['id']}",
                                     "ifMatch": 'W/"7"'}}]}
    before = refusals(world, b.PS_DR)
    assert dr.post("", bundle).status_code == 412
    assert refusals(world, b.PS_DR) == before + 1


# ---------- a refused write looks like a missing target (review holes 9 and 11)
def test_put_on_deleted_resource_of_another_dmp_looks_like_a_fresh_id(api, dmp):
    pid = dmp["pid"]
    me = api.as_patient(pid)
    consent = me.create(b.consent(pid, "permit", actor=b.PS_OTHER))
    assert me.delete(f"Consent/{consent['id']}").status_code == 204
    other = api.as_ps(b.PS_OTHER).create(b.patient())
    body = b.consent(other["id"], "permit", actor=b.PS_OTHER, verified=True)
    fresh = api.as_ps(b.PS_OTHER).put("Consent/fresh-id-never-used", dict(body, id="fresh-id-never-used"))
    taken = api.as_ps(b.PS_OTHER).put(f"Consent/{consent['id']}", dict(body, id=consent["id"]))
    assert taken.status_code == fresh.status_code, (taken.json, fresh.json)


def _same_refusal(refused, missing):
    assert refused.status_code == missing.status_code, (refused.json, missing.json)
    assert refused.json["issue"][0]["code"] == missing.json["issue"][0]["code"]


def test_refused_writes_look_like_missing_targets(api, dmp):
    pid, doc = dmp["pid"], dmp["consult"]
    stranger = api.as_ps(b.PS_OTHER)
    ghost = "0000000000000000"
    # PUT / DELETE / PATCH on a document of a DMP the caller may not enter
    _same_refusal(stranger.put(f"DocumentReference/{doc['id']}", doc),
                  stranger.put(f"DocumentReference/{ghost}", dict(doc, id=ghost)))
    missing_delete = stranger.delete(f"DocumentReference/{ghost}")
    refused_delete = stranger.delete(f"DocumentReference/{doc['id']}")
    assert refused_delete.status_code == missing_delete.status_code
    assert api.as_ps(b.PS_DR).get(f"DocumentReference/{doc['id']}").status_code == 200   # still there
    ops = [{"op": "replace", "path": "/status", "value": "entered-in-error"}]
    _same_refusal(stranger.patch(f"DocumentReference/{doc['id']}", ops),
                  stranger.patch(f"DocumentReference/{ghost}", ops))
    # create naming the DMP
    _same_refusal(stranger.post("DocumentReference", b.docref(pid)),
                  stranger.post("DocumentReference", b.docref(ghost)))
    # relatesTo pointing at a document the caller may not see
    other_pid = stranger.create(b.patient())["id"]
    replaces = b.docref(other_pid)
    replaces["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{doc['id']}"}}]
    missing = b.docref(other_pid)
    missing["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{ghost}"}}]
    _same_refusal(stranger.post("DocumentReference", replaces), stranger.post("DocumentReference", missing))
    # attachment.url pointing at a Binary the caller may not see
    url = doc["content"][0]["attachment"]["url"]
    by_url = b.docref(other_pid)
    by_url["content"] = [{"attachment": {"contentType": "application/pdf", "url": url}}]
    by_ghost = b.docref(other_pid)
    by_ghost["content"] = [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{ghost}"}}]
    _same_refusal(stranger.post("DocumentReference", by_url), stranger.post("DocumentReference", by_ghost))
    # conditional update matching nothing visible vs nothing at all
    _same_refusal(stranger.put(f"DocumentReference?patient={pid}", b.docref(pid)),
                  stranger.put(f"DocumentReference?patient={ghost}", b.docref(ghost)))


# ---------- refusals raised by the REST layer, before the repository is called (issue 18)
def system_refusals(admin, ps: str) -> int:
    """How many refusals of ``ps`` the administrator reads in the system journal (no patient)."""
    events = entries(admin, "AuditEvent?outcome=4&_count=200")
    return len([e for e in events if agent_ps(e) == ps and "Patient/" not in json.dumps(e)])


def test_refusals_before_the_repository_are_in_the_journal_of_the_dmp_they_name(world):
    """400/415/422 answered by the REST layer (an id that does not match, a bad JSON Patch, a body
    that fails validation, ``$access-code`` in attestation mode): journaled once in the DMP that
    the URL or the body names, with outcome 4."""
    dr, a, doc = world["dr"], world["a"], world["doc"]
    url = f"DocumentReference/{doc['id']}"
    bad = {"status": "not-a-status"}
    steps = [
        (400, lambda: dr.put(url, doc | {"id": "another"})),
        (400, lambda: dr.put(f"DocumentReference?patient={a}", doc | {"id": "another"})),
        (415, lambda: dr.request("PATCH", url, raw="[]", content_type="application/json")),
        (400, lambda: dr.request("PATCH", url, raw="[{", content_type="application/json-patch+json")),
        (400, lambda: dr.patch(url, {"op": "remove", "path": "/status"})),
        (None, lambda: dr.put(url, doc | bad)),
        (None, lambda: dr.post("DocumentReference", b.docref(a) | bad)),
        (400, lambda: dr.post(f"Patient/{a}/$access-code")),
    ]
    for status, call in steps:
        before = refusals(world, b.PS_DR)
        r = call()
        assert r.status_code == status if status else r.status_code in (400, 422), r.get_data(as_text=True)
        assert refusals(world, b.PS_DR) == before + 1, (status, r.json)


def test_refusals_naming_no_dmp_are_in_the_system_journal(world, api):
    """A 405 on a read-only type, a Bundle that is not processed, a conditional delete without
    criteria: no DMP named, one refusal in the system journal."""
    dr, admin = world["dr"], api.as_admin()
    steps = [
        (405, lambda: dr.post("Practitioner", {"resourceType": "Practitioner"})),
        (400, lambda: dr.post("", {"resourceType": "Bundle", "type": "collection"})),
        (400, lambda: dr.delete("DocumentReference")),
        (None, lambda: dr.post("DocumentReference", b.docref(MISSING) | {"status": "not-a-status"})),
    ]
    for status, call in steps:
        before, mine = system_refusals(admin, b.PS_DR), refusals(world, b.PS_DR)
        r = call()
        assert r.status_code == status if status else r.status_code in (400, 422), r.get_data(as_text=True)
        assert system_refusals(admin, b.PS_DR) == before + 1, (status, r.json)
        assert refusals(world, b.PS_DR) == mine


def test_an_invalid_write_naming_a_hidden_dmp_answers_like_a_missing_one_and_is_journaled(world):
    """CONTRACT.md "REST behaviour": the answer does not tell the DMP exists; its journal has it."""
    other, bad = world["other"], {"status": "not-a-status"}
    before = refusals(world, b.PS_OTHER)
    named = other.post("DocumentReference", b.docref(world["a"]) | bad)
    same_answer(named, other.post("DocumentReference", b.docref(MISSING) | bad), world["a"], MISSING)
    assert refusals(world, b.PS_OTHER) == before + 1


def test_refused_bundle_entries_are_in_the_journal_of_the_dmp_they_name(world):
    """The same refusals in a transaction or a batch entry: in the DMP the entry names, once."""
    dr, a, doc = world["dr"], world["a"], world["doc"]

    def bundle(btype, resource, method, url):
        return {"resourceType": "Bundle", "type": btype,
                "entry": [{"resource": resource, "request": {"method": method, "url": url}}]}

    url = f"DocumentReference/{doc['id']}"
    steps = [
        (400, bundle("transaction", doc | {"id": "another"}, "PUT", url)),
        (None, bundle("transaction", b.docref(a) | {"status": "not-a-status"}, "POST", "DocumentReference")),
        (200, bundle("batch", doc | {"id": "another"}, "PUT", url)),
        (200, bundle("batch", b.docref(a) | {"status": "not-a-status"}, "POST", "DocumentReference")),
    ]
    for status, body in steps:
        before = refusals(world, b.PS_DR)
        r = dr.post("", body)
        assert r.status_code == status if status else r.status_code in (400, 422), r.get_data(as_text=True)
        if status == 200:
            assert r.json["entry"][0]["response"]["status"] in ("400", "422"), r.json
        assert refusals(world, b.PS_DR) == before + 1, (status, r.json)
