"""``Patient/$explain-access`` through the guard (CONTRACT.md "Privacy operations").

The caller must be one who explains (:func:`~fhir_dmp.security.decision.explain.may_explain`) and
may read the Patient; anybody else gets the 404 of a missing Patient. The hypothetical actor is
decided by the access decision (:func:`~fhir_dmp.security.decision.explain.explain`), and its
documents are counted with the filter a search of theirs (``DocumentReference?patient=``) runs.
The request is journaled like a read of the Patient.
"""
from __future__ import annotations

from .. import search
from ..http.errors import not_found
from ..security.decision import deny
from ..security.decision.explain import Explanation, explain, hypothetical_actor, may_explain
from ..storage import merge_filters


class Explanations:
    """The ``$explain-access`` side of :class:`~fhir_dmp.guard.repository.GuardedRepository`."""

    def explain_access(self, pid: str, actor: str | None, *, profession: str | None = None,
                       purpose: str | None = None, query: str | None = None) -> tuple[Explanation, int]:
        """(what ``actor`` would be allowed on DMP ``pid`` now, how many of its documents it
        would see)."""
        self.access.start("Patient", "read")
        st = self.access.state(pid)
        mine = self.access.dmp_access(st)
        if not mine.permit or not may_explain(self.p):
            refusal = mine if not mine.permit else deny("explain-access", "not among those who explain access")
            self.record("operation", outcome="4", patient_id=pid if st.exists else None,
                        resource=f"Patient/{pid}", decision=refusal, http_status=404, query=query)
            raise not_found("Patient", pid)
        hypothetical = hypothetical_actor(actor, profession, purpose)
        answer = explain(self.access.policy, hypothetical, pid)
        count = 0
        if answer.documents is not None:
            req = search.parse_search("DocumentReference", [("patient", pid)])
            count = self.storage.count("DocumentReference", merge_filters(answer.documents, req.mongo_filter()),
                                       session=self.session)
        self.record("operation", outcome="0", patient_id=pid, resource=f"Patient/{pid}", decision=mine,
                    http_status=200, query=query)
        return answer, count
