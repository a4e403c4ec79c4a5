"""What the guard does to a DMP as a whole: destroy it, close and reopen it, its legal
representatives, one-time access codes, break-glass grants and the notices to the patient.

CONTRACT.md "Lifecycle of a DMP" and "The DMP in FHIR terms" (Notifications); the decisions are
``security/decision/``'s, the queries ``Storage``'s, the one system-journal entry a destroy
leaves is :func:`~fhir_dmp.guard.lifecycle.destroy_event`.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from ..http.errors import Forbidden, not_found
from ..notifications.outbox import Notice
from ..profiles import validate
from ..profiles.dmp import ROLE_CODE_SYSTEM
from ..security.decision import Decision
from ..security.principal import ADMIN
from ..storage import Stored, new_id, now
from . import access_codes, lifecycle

log = logging.getLogger(__name__)


class DmpOperations:
    """The DMP-wide operations of :class:`~fhir_dmp.guard.repository.GuardedRepository`.

    Uses what the repository holds (``p``, ``access``, ``storage``, ``config``, ``outbox``,
    ``crypto``, ``audit_log``, ``info``, ``journal``, ``work``, ``record``, ``transaction``) and
    its writes (``create``, ``patch``, ``deny_write``) and searches.
    """

    _grants_done: set     # patients whose obligations this request already met

    # ------------------------------------------------------- obligations of a permit
    def obligations(self, decision: Decision, pid: str | None) -> None:
        """Side effects a permit asks for: break-glass grants, centre 15 notices."""
        if not pid or pid in self._grants_done:
            return
        if decision.obligations.get("new_grant"):
            self._grants_done.add(pid)
            self._create_grant(pid)
        elif decision.obligations.get("notify") == "centre_15":
            self._grants_done.add(pid)

            def effect(session):
                self.notify("centre_15", pid, session=session)
                # one open case per regulation-centre professional and DMP until it is closed
                self.open_access_case("centre-15", pid, f"centre-15|{pid}|{self.p.id_nat_ps}", session=session,
                                      release=True)
            self.journal.add_effect(effect)

    def _create_grant(self, pid: str) -> None:
        """A time-boxed break-glass grant and its review case; the patient is told (at flush), once
        per grant even when concurrent requests of this PS all asked for one."""
        expires = now() + timedelta(seconds=self.config.break_glass_ttl)
        grant = {"_id": new_id(), "pid": pid, "ps": self.p.id_nat_ps, "profession": self.p.profession,
                 "reason": self.p.btg_reason, "created": now(), "expires": expires, "reviewed": False}
        self.access.states[pid].grant = grant

        def effect(session):
            in_force = self.storage.add_grant_once(grant, session=session)
            if in_force is None:
                self.notify("break_glass", pid, session=session)
                self.open_access_case("break-glass", pid, f"break-glass|{grant['_id']}", session=session)
            else:    # a concurrent request of this PS created it (and told the patient, opened its case)
                self.access.states[pid].grant = in_force
        self.journal.add_effect(effect)

    def notify(self, kind: str, pid: str, *, session=None, code: str | None = None,
               patient: dict | None = None, notice: Notice | None = None, defer: bool = False) -> list[dict]:
        """Queue a notice to the patient and store the matching Communication(s). ``patient``:
        the Patient resource this transaction just wrote (else the DMP's state is loaded);
        ``notice``: what to say (else this caller's access now, of ``kind``); ``defer``: the
        outbox messages and Communications wait in the transaction's pending inserts (nothing in
        it reads them; they go with its journal entries: ``GuardedRepository._after_write``)."""
        if self.outbox is None:
            return []
        if patient is None:
            patient = self.access.state(pid).patient
        if patient is None:
            return []
        notice = notice or Notice(kind=kind, patient_id=pid, actor_name=self.p.name,
                                  actor_profession=self.p.profession, actor_id=self.p.id_nat_ps,
                                  mode=self.p.mode or "normal", when=now(), reason=self.p.btg_reason, code=code)
        pending = self.work.pending_inserts if defer else None
        comms = self.outbox.enqueue(notice, patient, session=session, pending=pending)
        for comm in comms:
            stored = self.storage.create("Communication", comm, pid=pid, rid=comm.get("id"),
                                         session=session, pending=pending, defer=defer)
            status = comm.get("status")
            self.record("create", outcome="0" if status != "not-done" else "4", patient_id=pid,
                        resource=f"Communication/{stored.id}",
                        decision=Decision(status != "not-done", f"notify-{kind}",
                                          "patient notified" if status != "not-done" else
                                          "the patient could not be told: no contact on file"))
        return comms

    # ------------------------------------------------------------ lifecycle
    def destroy_dmp(self, pid: str, *, reason: str | None = None) -> None:
        """Destroy a DMP (CONTRACT.md "Lifecycle of a DMP"): afterwards it never existed.

        The patient or the administrator (``consent.can_destroy``). One transaction removes
        everything the database holds about it (``Storage.purge_dmp``: data key first, then
        content, resources, notices, access codes and its journal) and writes the one
        system-journal entry that stays, without personal data; if any part fails nothing
        changes (fail closed). The INS is free again.
        """
        self.access.start("Patient", "delete")
        st = self.access.state(pid)
        decision = self.access.dmp.can_destroy(st)
        if not decision.permit:
            if not st.known or not self.access.dmp_access(st).permit:
                # answered as missing, but a DMP that exists sees the attempt in its journal
                self.record("delete", outcome="4", patient_id=pid if st.known else None,
                            resource=f"Patient/{pid}", decision=decision, http_status=404)
                raise not_found("Patient", pid)
            raise self.deny_write("delete", "Patient", pid, pid, decision)
        actor = "admin" if self.p.kind == ADMIN else "patient"
        event = lifecycle.destroy_event(actor, now(), source_observer=self.config.fhir_base,
                                        reason=reason or f"asked by the {actor}")
        # nothing about this DMP may be journaled after its chain is gone
        self.journal.forget_patient(pid)

        def write(s):
            self.storage.purge_dmp(pid, session=s)
            self.audit_log.append([event], session=s)

        self.transaction(write, interaction="delete", rtype="Patient")
        # a write decided before the destroy but committed after its snapshot: swept here, or by
        # that writer itself if it commits after this sweep (UnitOfWork.sweep_destroyed)
        self.storage.run_transaction(lambda s: self.storage.purge_dmp(pid, session=s))
        # committed: a restored backup must not bring it back (guard/lifecycle.DestroyedRegister)
        try:
            lifecycle.DestroyedRegister(self.config.destroyed_register_path).record(pid, now())
        except OSError:
            log.critical("destroyed DMP %s not written to the register %s: add it by hand",
                         pid, self.config.destroyed_register_path)
        self.crypto.forget(pid)       # the key is gone from the database: drop this process's copy
        self.access.states.pop(pid, None)
        self.work.stale(pid)
        self.work.forget_contexts()

    def send_access_code(self, pid: str) -> list[dict]:
        """``Patient/$access-code``: a one-time code to the patient (email/SMS + Communication).

        Returns the Communications written (the caller says how the code went out, never it).
        """
        self.access.start("Patient", "read")
        st = self.access.state(pid)
        decision = self.access.dmp.can_ask_access_code(st)
        if not decision.permit:
            self.record("operation", outcome="4", patient_id=pid if st.exists else None,
                        resource=f"Patient/{pid}", decision=decision, http_status=404)
            raise not_found("Patient", pid)
        code = access_codes.issue(self.storage, pid, self.p.id_nat_ps)
        written: list[dict] = []

        def write(s):
            written.extend(self.notify("access_code", pid, session=s, code=code))
            self.record("operation", outcome="0", patient_id=pid, resource=f"Patient/{pid}",
                        decision=decision, http_status=200)
        self.transaction(write, interaction="operation", rtype="Patient")
        return written

    def use_access_code(self, pid: str) -> None:
        """The patient's one-time code must come with the PS's first authorization (403 else)."""
        refused = access_codes.consume(self.storage, pid, self.p.id_nat_ps, self.info.access_code)
        if refused:
            decision = Decision(False, "access-code", refused)
            self.record("create", outcome="4", patient_id=pid, resource="Consent", decision=decision,
                        http_status=403)
            raise Forbidden(f"not allowed: {refused}")

    def close_dmp(self, pid: str) -> Stored:
        """Close a DMP (``active: false``): the patient, a legal representative or the admin."""
        return self._set_active(pid, False)

    def reopen_dmp(self, pid: str) -> Stored:
        """Reopen a closed DMP within its retention."""
        return self._set_active(pid, True)

    def representatives(self, pid: str) -> list[Stored]:
        """The DMP's legal representatives the caller may see (RelatedPerson?patient=pid)."""
        return self.search("RelatedPerson", [("patient", pid), ("_count", str(self.config.max_page_size))]).matches

    def add_representative(self, pid: str, relationship: str, family: str, given: str | None = None, *,
                           start: str | None = None, end: str | None = None) -> Stored:
        """Register a parent (``PRN``) or guardian (``GUARD``) of the patient (same decision as POST)."""
        resource = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{pid}"},
                    "relationship": [{"coding": [{"system": ROLE_CODE_SYSTEM, "code": relationship}]}],
                    "name": [{"family": family, **({"given": [given]} if given else {})}]}
        if start or end:
            resource["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
        return self.create("RelatedPerson", validate(resource, resource_type="RelatedPerson"))

    def end_representative(self, rp_id: str) -> Stored:
        """End a legal representative (``active: false``): their token stops working at once."""
        return self.patch("RelatedPerson", rp_id, [{"op": "add", "path": "/active", "value": False}])

    def _set_active(self, pid: str, active: bool) -> Stored:
        return self.patch("Patient", pid, [{"op": "add", "path": "/active", "value": active}])

