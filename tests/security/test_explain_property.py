"""``$explain-access`` agrees with what the actor is then actually served (issue 20), on random worlds.

The worlds of ``test_access_property.py`` (DMPs open or closed, médecins traitants, Consents:
permits, blocks, opt-outs of every period and status, documents of any types, labels and
authors). For every professional caller of that test (professions, break-glass, centre 15, AIR
mode through an establishment), the administrator's ``explain_access`` for that actor answers
permit exactly when the actor's own read of the Patient succeeds, and a document count equal to
the total of the actor's own ``DocumentReference?patient=&_total=accurate`` search — both through
the real guarded repository, each with its own Principal.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_dmp.guard.journal import RequestInfo
from fhir_dmp.guard.repository import GuardedRepository
from fhir_dmp.http.errors import NotFound
from fhir_dmp.security.principal import ADMIN, Principal
from fhir_dmp.security.scopes import Scopes
from tests.security.test_access_property import backend  # noqa: F401  (the same module-scoped backend)
from tests.security.test_access_property import callers, dmps, store_world

IDNATPS = "urn:oid:1.2.250.1.71.4.2.1"


def actor_of(p: Principal) -> str:
    """The ``actor`` parameter naming this professional (its establishment in AIR mode)."""
    return p.organization if p.organization else f"{IDNATPS}|{p.id_nat_ps}"


def served(backend, p: Principal, pid: str) -> tuple[bool, int]:
    """What ``p`` is really served: may it read the Patient, how many documents its search totals."""
    repo = GuardedRepository(backend, p, RequestInfo())
    try:
        repo.read("Patient", pid)
        entered = True
    except NotFound:
        entered = False
    page = GuardedRepository(backend, p, RequestInfo()).search(
        "DocumentReference", [("patient", pid), ("_total", "accurate")])
    return entered, page.total


#: mostly open DMPs (a closed one denies every professional: one answer, little to learn)
WORLDS = st.lists(st.one_of(dmps.map(lambda d: {**d, "active": True}), dmps), min_size=1, max_size=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(world=WORLDS)
def test_explain_access_agrees_with_what_is_served(backend, world):
    pids, _ = store_world(backend.storage, world)
    pid = pids[0]
    admin = Principal(kind=ADMIN, subject="a", scopes=Scopes.parse("user/*.cruds"))
    for p in callers(pids):
        if not p.is_professional:
            continue
        repo = GuardedRepository(backend, admin, RequestInfo())
        answer, count = repo.explain_access(pid, actor_of(p), profession=p.professions[0], purpose=p.purpose)
        entered, total = served(backend, p, pid)
        assert answer.decision.permit is entered, (p.subject, answer.decision)
        assert count == total, (p.subject, answer.basis, count, total)
