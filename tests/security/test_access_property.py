"""The search filter and the per-resource check are one rule (issue 9), proved on random worlds.

Hypothesis builds worlds of DMPs (open or closed, with or without a médecin traitant), Consents
(permits, blocks, opt-outs; active or not; periods at every FHIR date precision, some unreadable)
and documents (one or two type codes, any labels, any author), stored in the real SecantusDB
through :class:`fhir_dmp.storage.Storage`. For every caller (patient, representative, admin,
professionals of several professions, in normal, break-glass and centre 15 modes, in AIR mode
through an establishment), for every resource type and for a search naming no DMP or one DMP:
(emergency modes: a search naming one DMP, as they reach no other)
the resources the storage search returns under :meth:`RequestAccess.narrow` are exactly
those :meth:`RequestAccess.can_see` permits, and the count is their number.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_dmp.security.principal import (ADMIN, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS, REGULATION_CENTRE,
                                         Principal)
from fhir_dmp.review.cases import ReviewCase, build_task
from fhir_dmp.security.scopes import Scopes
from fhir_dmp.storage import merge_filters, now
from tests import builders as b

FINESS = "urn:oid:1.2.250.1.71.4.2.2"
PS_IDS = [b.PS_DR, b.PS_OTHER, b.PS_PHARMA, b.PS_KINE]
TYPES = [b.CONSULTATION, b.LAB, b.IMAGING, b.PRESCRIPTION, "00000-0"]
LABELS = ["MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX"]
YEAR = datetime.now(timezone.utc).year


@st.composite
def fhir_dates(draw):
    """A FHIR date or dateTime at any precision, years away from now (or unreadable)."""
    year = YEAR + draw(st.sampled_from([-3, -1, 1, 3]))
    month, day = draw(st.integers(1, 12)), draw(st.integers(1, 28))
    return draw(st.sampled_from([
        f"{year}", f"{year}-{month:02d}", f"{year}-{month:02d}-{day:02d}",
        f"{year}-{month:02d}-{day:02d}T10:30:00+01:00", f"{year}-{month:02d}-{day:02d}T08:00:00Z",
        "bientôt"]))


@st.composite
def consents(draw):
    kind = draw(st.sampled_from(["permit", "block", "optout_btg", "optout_c15"]))
    if kind in ("permit", "block"):
        if draw(st.booleans()):
            actor = {"system": b.IDNATPS, "value": draw(st.sampled_from(PS_IDS))}
        else:
            actor = draw(st.sampled_from([{"system": FINESS, "value": "750000001"}, {"value": "750000001"},
                                          {"system": "urn:oid:9.9", "value": "750000001"}]))
        res = b.consent("x", "permit" if kind == "permit" else "deny")
        res["provision"]["actor"] = [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"identifier": actor}}]
    else:
        res = b.consent("x", "deny", purpose="BTG" if kind == "optout_btg" else "ETREAT")
    res["status"] = draw(st.sampled_from(["active", "active", "inactive"]))
    period = {}
    if draw(st.booleans()):
        period["start"] = draw(fhir_dates())
    if draw(st.booleans()):
        period["end"] = draw(fhir_dates())
    if period:
        res["provision"]["period"] = period
    return res


@st.composite
def documents(draw):
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=2, unique=True))
    doc = b.docref("x", types[0], labels=draw(st.lists(st.sampled_from(LABELS), max_size=2, unique=True)),
                   author=draw(st.sampled_from(PS_IDS)))
    doc["type"]["coding"] = [{"system": b.LOINC, "code": t} for t in types]
    doc["content"] = [{"attachment": {"contentType": "application/pdf", "url": "Binary/none"}}]
    return doc


dmps = st.fixed_dictionaries({
    "active": st.booleans(),
    "gp": st.one_of(st.none(), st.sampled_from(PS_IDS)),
    "consents": st.lists(consents(), max_size=4),
    "documents": st.lists(documents(), max_size=4),
})


def callers(pids):
    user = Scopes.parse("user/*.cruds")
    mine = Scopes.parse("patient/*.cruds")
    out = [Principal(kind=PATIENT, subject="p", scopes=mine, patient_id=pids[0], compartment=pids[0]),
           Principal(kind=LEGAL_REPRESENTATIVE, subject="r", scopes=mine, patient_id=pids[0], compartment=pids[0]),
           Principal(kind=ADMIN, subject="a", scopes=user),
           Principal(kind=PRIVACY_OFFICER, subject="o", scopes=user)]
    for ps, profession in ((b.PS_DR, "10"), (b.PS_OTHER, "10"), (b.PS_PHARMA, "21"), (b.PS_KINE, "70")):
        out.append(Principal(kind=PS, subject=ps, scopes=user, id_nat_ps=ps, professions=(profession,), acr="eidas1"))
    out.append(Principal(kind=PS, subject="btg", scopes=user, id_nat_ps=b.PS_OTHER, professions=("10",),
                         acr="eidas1", purpose="BTG", btg_reason="urgence"))
    out.append(Principal(kind=PS, subject="air", scopes=user, id_nat_ps="810000000077", professions=("60",),
                         acr="eidas1", organization=f"{FINESS}|750000001"))
    out.append(Principal(kind=REGULATION_CENTRE, subject="c15", scopes=user, id_nat_ps=b.PS_SAMU,
                         professions=("10",), acr="eidas1", purpose="ETREAT"))
    return out


def store_world(storage, world) -> tuple[list[str], dict]:
    """Store a world of :data:`dmps` (fresh ids): (the DMPs' ids, ``{type: [(id, pid)]}``)."""
    run = uuid.uuid4().hex[:8]
    pids, stored = [], {"Patient": [], "Consent": [], "DocumentReference": [], "Task": []}
    for n, spec in enumerate(world):
        pat = b.patient(gp=spec["gp"], active=spec["active"])
        pid = storage.create("Patient", pat, pid=None, rid=f"{run}-p{n}", session=None).id
        pids.append(pid)
        stored["Patient"].append((pid, pid))
        for res in spec["consents"]:
            res = dict(res, patient={"reference": f"Patient/{pid}"})
            stored["Consent"].append((storage.create("Consent", res, pid=pid, session=None).id, pid))
        for res in spec["documents"]:
            res = dict(res, subject={"reference": f"Patient/{pid}"})
            stored["DocumentReference"].append((storage.create("DocumentReference", res, pid=pid, session=None).id, pid))
        # a review case (CONTRACT.md "Privacy operations")
        case = build_task(ReviewCase(code="break-glass", patient_id=pid, actor=b.PS_OTHER, focus=None), now())
        stored["Task"].append((storage.create("Task", case, pid=pid, session=None).id, pid))
    return pids, stored


@pytest.fixture(scope="module")
def backend(mongo_server, mongo_client, tmp_path_factory):
    from fhir_dmp.runtime.services import build_services
    from fhir_dmp.runtime.config import Config
    name = f"t_prop_{uuid.uuid4().hex[:8]}"
    cfg = Config(mongodb_uri=mongo_server.uri, db_name=name, data_dir=tmp_path_factory.mktemp("prop"),
                 base_url="https://dmp.test/fhir", notifications_worker=False, issuer="https://idp.test",
                 jwks_file=tmp_path_factory.mktemp("jwks") / "jwks.json")
    yield build_services(cfg, mongo_client, mongo_client[name])
    mongo_client.drop_database(name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(world=st.lists(dmps, min_size=1, max_size=3))
def test_narrow_and_can_see_agree(backend, world):
    storage = backend.storage
    pids, stored = store_world(storage, world)
    in_world = {"pid": {"$in": pids}}
    for principal in callers(pids):
        check = backend.policy.for_request(principal)
        for rtype, items in stored.items():
            # emergency modes reach only the DMP a request names (DESIGN.md rules 7-8)
            emergency = principal.purpose in ("BTG", "ETREAT")
            for named in ([] if emergency else [set()]) + [{pids[-1]}]:
                access = backend.policy.for_request(principal)
                guard = access.narrow(rtype, named)
                scope = in_world if rtype != "Patient" else {"_id": {"$in": pids}}
                if named:
                    scope = {"pid": next(iter(named))} if rtype != "Patient" else {"_id": next(iter(named))}
                if guard is None:
                    found, total = set(), 0
                else:
                    flt = merge_filters(guard, scope)
                    found = {d["_id"] for d in storage.find_docs(rtype, flt, [("_id", 1)], 0)}
                    total = storage.count(rtype, flt)
                allowed = set()
                for rid, pid in items:
                    if named and pid not in named:
                        continue
                    current = storage.read(rtype, rid)
                    if check.can_see(rtype, current.resource, pid).permit:
                        allowed.add(rid)
                assert found == allowed, (principal.subject, principal.kind, rtype, named)
                assert total == len(allowed)
