"""What the access decision reads, break-the-glass grants, first-access codes, issuer key sets.

Collections: ``btg_grants`` and ``btg_grant_locks`` (one per (DMP, PS): concurrent new grants
conflict on it, security/decision/), ``access_codes`` (only a code's salted hash is stored,
guard/access_codes.py), ``issuer_key_sets`` (the issuer's key set as last seen by any process,
security/auth.py); and reads of ``Patient``, ``Consent`` (and the change stream over
:data:`~fhir_dmp.storage.core.DECISION_INPUTS`) for the decision context.

Contract: a PS holds at most one live grant per DMP (:meth:`GrantStore.add_grant_once`); a
first-access code is used at most once (:meth:`GrantStore.use_access_code` is a compare-and-set);
a key set is only replaced by a later one (:meth:`GrantStore.record_key_set`).
"""
from __future__ import annotations

from datetime import datetime

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from .core import ACCESS_CODES, DECISION_INPUTS, GRANT_LOCKS, GRANTS, KEY_SETS, StoreCore, _index
from .errors import translate_methods


@translate_methods
class GrantStore(StoreCore):
    """The decision's inputs, grants, access codes and key sets (module docstring)."""

    def ensure_grant_indexes(self) -> None:
        """A PS's live grants on a DMP; the grants to review, newest first; the locks by DMP."""
        _index(self.db[GRANTS], [("pid", 1), ("ps", 1), ("expires", -1)])
        _index(self.db[GRANTS], [("reviewed", 1), ("created", -1)])
        _index(self.db[GRANT_LOCKS], [("pid", 1)])

    def patient_docs(self, pids: list[str], *, session=None) -> dict[str, dict]:
        """Raw Patient documents (deleted and destroyed included) by id, without search indexes."""
        return {d["_id"]: d for d in self.db["Patient"].find(
            {"_id": {"$in": list(pids)}}, {"s": 0, "o": 0, "a": 0}, session=session)}

    def watch_decision_inputs(self, also: tuple = ()):
        """A change stream on the collections the access decision reads (:data:`DECISION_INPUTS`)
        and those named in ``also``, each change reduced to ``ns``, ``documentKey``,
        ``fullDocument.pid`` and ``operationType`` (the invalidation of the decision context
        cache, security/context_cache.py, and of the DMP document cache, search/doc_cache.py)."""
        pipeline = [{"$match": {"ns.coll": {"$in": [*DECISION_INPUTS, *also]}}},
                    {"$project": {"ns": 1, "documentKey": 1, "fullDocument.pid": 1, "operationType": 1}}]
        return self.db.watch(pipeline, full_document="updateLookup", max_await_time_ms=200)

    def active_consents(self, pids: list[str], *, session=None) -> list[dict]:
        """Current active Consents of these DMPs (``_id``, ``vid``, ``pid``, ``res``)."""
        return list(self.db["Consent"].find({"pid": {"$in": list(pids)}, "del": False, "res.status": "active"},
                                            {"res": 1, "vid": 1, "pid": 1}, session=session))

    def consents_naming(self, actor_keys: list[str]) -> list[dict]:
        """Current active Consents whose actors include one of these ``system|value`` keys."""
        return list(self.db["Consent"].find({"del": False, "res.status": "active", "a.actors": {"$in": actor_keys}},
                                            {"pid": 1, "res": 1}))

    def patients_with_gp(self, id_nat_ps: str) -> set[str]:
        """DMPs (not deleted) naming this idNatPs médecin traitant."""
        return {d["_id"] for d in self.db["Patient"].find({"del": False, "a.gp": id_nat_ps}, {"_id": 1})}

    def live_grants(self, pids: list[str], id_nat_ps: str, at: datetime, *, session=None) -> dict[str, dict]:
        """Break-glass grants of one PS still valid at ``at``, by DMP."""
        return {g["pid"]: g for g in self.db[GRANTS].find(
            {"pid": {"$in": list(pids)}, "ps": id_nat_ps, "expires": {"$gt": at}}, session=session)}

    def add_grant_once(self, grant: dict, *, session) -> dict | None:
        """Insert ``grant`` in ``session``'s transaction unless its PS already holds a live grant
        on its DMP: then that grant, and nothing is written. None when ``grant`` was inserted.

        Concurrent requests of one PS (on any server process) may all decide that a new grant is
        needed: the write to the (DMP, PS) lock document makes their transactions conflict, so
        one commits and the others retry (``run_transaction``), see its grant and reuse it. One
        grant, one notice to the patient.
        """
        pid, ps = grant["pid"], grant["ps"]
        self.db[GRANT_LOCKS].update_one({"_id": f"{pid}|{ps}"}, {"$setOnInsert": {"pid": pid}, "$inc": {"n": 1}},
                                        upsert=True, session=session)
        live = self.live_grants([pid], ps, grant["created"], session=session).get(pid)
        if live is None:
            self.db[GRANTS].insert_one(grant, session=session)
        return live

    def replace_access_code(self, doc: dict) -> None:
        """Void the unused codes of (``doc.pid``, ``doc.ps``), then store ``doc``."""
        coll = self.db[ACCESS_CODES]
        coll.update_many({"pid": doc["pid"], "ps": doc["ps"], "used": False},
                         {"$set": {"used": True, "voided": doc["created"]}})
        coll.insert_one(doc)

    def live_access_code(self, pid: str, ps: str, at: datetime, max_tries: int) -> dict | None:
        """The newest unused code of (DMP, PS) valid at ``at`` with fewer than ``max_tries`` wrong tries."""
        return self.db[ACCESS_CODES].find_one({"pid": pid, "ps": ps, "used": False, "expires": {"$gt": at},
                                               "tries": {"$lt": max_tries}}, sort=[("created", -1)])

    def count_access_code_try(self, code_id: str) -> None:
        self.db[ACCESS_CODES].update_one({"_id": code_id}, {"$inc": {"tries": 1}})

    def use_access_code(self, code_id: str, at: datetime) -> bool:
        """Mark the code used; False when another request used it first."""
        return self.db[ACCESS_CODES].find_one_and_update(
            {"_id": code_id, "used": False}, {"$set": {"used": True, "used_at": at}},
            return_document=ReturnDocument.AFTER) is not None

    def record_key_set(self, name: str, doc: dict) -> bool:
        """Keep ``doc`` (a number ``at`` and what was seen then) as key set ``name``, unless one
        with a later ``at`` is already there. True when stored."""
        for _ in range(2):    # the first upsert may race another one inserting the document
            try:
                self.db[KEY_SETS].replace_one({"_id": name, "at": {"$lt": doc["at"]}}, doc, upsert=True)
                return True
            except DuplicateKeyError:
                continue      # the document is there, and not older (or was just inserted)
        return False

    def key_set(self, name: str) -> dict | None:
        """The key set ``name`` last recorded (:meth:`record_key_set`), or None."""
        return self.db[KEY_SETS].find_one({"_id": name}, {"_id": 0})
