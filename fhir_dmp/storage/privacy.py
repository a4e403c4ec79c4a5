"""What the misuse scan reads and remembers (review/scan.py): the journal of a window, the facts
of the DMPs and professionals it names, the officers' verdicts; and its own small collection.

``privacy_scans``
    ``{_id: "last", until}``: where the last scan ended (the next one starts there);
    ``{_id: "pair:<idNatPs>:<Patient id>", pid, actor, features, at}``: the features of each pair
    a review case was opened for, so that the officers' verdicts on those cases can train the model
    later (a DMP's entries go with it: :meth:`LifecycleStore.purge_dmp`).

Every read is a ``find`` with a projection, in batches (SecantusDB answers an aggregation over
an array path with nothing), streamed: nothing here holds a whole collection. The journal of a
window is read on ``lu`` (time of append) in natural order; the records by ``pid`` (each
compartment collection's ``pid``-first index) or ``_id``, in chunks of :data:`CHUNK` ids.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable, Iterator

from .core import JOURNAL, PRIVACY_SCANS, REVIEW_KEYS, _utc, unpack
from .errors import translate_methods
from .pages import PageReads

#: ids per ``$in`` query
CHUNK = 500
#: journal entries per batch of the cursor
BATCH = 2000


def _chunks(ids: Iterable[str]) -> Iterator[list[str]]:
    ids = sorted(set(ids))
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


@translate_methods
class PrivacyStore(PageReads):
    """The scan's reads and its collection (module docstring)."""

    def journal_window(self, since: datetime | None, until: datetime) -> Iterator[tuple[str, datetime, dict]]:
        """``(pid, lu, event)`` of every journal entry of a DMP appended in ``[since, until)``
        (``since`` None: from the start), streamed in batches: the unsealed ones (``pages.py``) first,
        then the runs' (``runs.py``), then the previous versions' ``AuditEvent`` documents; an entry
        sealed between two reads comes once."""
        since, until = _utc(since), _utc(until)
        window = {"$lt": until} if since is None else {"$gte": since, "$lt": until}
        unsealed = [d for d in self.unsealed_entries()
                    if d["pid"] is not None and (since is None or d["lu"] >= since) and d["lu"] < until]
        for doc in unsealed:
            yield doc["pid"], doc["lu"], unpack(doc["res"])
        seen = {d["_id"] for d in unsealed}
        for doc in self.sealed_in_window(since, until):
            if doc["_id"] not in seen:
                seen.add(doc["_id"])
                yield doc["pid"], doc["lu"], unpack(doc["res"])
        cursor = self.db[JOURNAL].find({"lu": window, "pid": {"$ne": None}}, {"pid": 1, "lu": 1, "res": 1},
                                       batch_size=BATCH)
        for doc in cursor:
            if doc["_id"] not in seen:
                yield doc["pid"], doc["lu"], unpack(doc["res"])

    def _by_pids(self, rtype: str, pids: Iterable[str], fields: tuple[str, ...]) -> Iterator[dict]:
        projection = {"pid": 1, **{f"res.{f}": 1 for f in fields}}
        for chunk in _chunks(pids):
            yield from self.db[rtype].find({"pid": {"$in": chunk}, "del": False}, projection)

    def patients_facts(self, pids: Iterable[str]) -> Iterator[dict]:
        """The Patients (name, birth date, address, médecin traitant) of ``pids``."""
        projection = {"res.name": 1, "res.birthDate": 1, "res.address": 1, "res.generalPractitioner": 1}
        for chunk in _chunks(pids):
            yield from self.db["Patient"].find({"_id": {"$in": chunk}, "del": False}, projection)

    def consents_facts(self, pids: Iterable[str]) -> Iterator[dict]:
        """The Consents of ``pids`` (status, provision, verification)."""
        return self._by_pids("Consent", pids, ("status", "provision", "verification"))

    def deposits_facts(self, pids: Iterable[str]) -> Iterator[dict]:
        """The DocumentReferences of ``pids`` (their authors)."""
        return self._by_pids("DocumentReference", pids, ("author",))

    def practitioners_facts(self, id_nat_ps: Iterable[str], system: str) -> Iterator[dict]:
        """The directory's Practitioners (names, addresses) of these idNatPs."""
        for chunk in _chunks(id_nat_ps):
            yield from self.db["Practitioner"].find(
                {"res.identifier": {"$elemMatch": {"system": system, "value": {"$in": chunk}}}, "del": False},
                {"res.identifier": 1, "res.name": 1, "res.address": 1})

    def completed_reviews(self) -> Iterator[dict]:
        """The review Tasks closed by an officer (code, businessStatus, inputs, for)."""
        return self.db["Task"].find({"res.status": "completed", "del": False},
                                    {"res.code": 1, "res.businessStatus": 1, "res.input": 1, "res.for": 1})

    def taken_review_keys(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that already have a review case (``review_case_keys``)."""
        return {d["_id"] for chunk in _chunks(keys) for d in self.db[REVIEW_KEYS].find({"_id": {"$in": chunk}}, {"_id": 1})}

    # -- the scan's own collection
    def last_scan_until(self) -> datetime | None:
        doc = self.db[PRIVACY_SCANS].find_one({"_id": "last"})
        return doc["until"] if doc else None

    def record_scan(self, until: datetime) -> None:
        """The last scan ended at ``until`` (never moved back)."""
        self.db[PRIVACY_SCANS].update_one({"_id": "last"}, {"$max": {"until": until}}, upsert=True)

    def keep_pair_features(self, rows: list[dict], at: datetime) -> None:
        """Remember the features of pairs sent to review (``{actor, pid, features}`` each)."""
        for row in rows:
            self.db[PRIVACY_SCANS].update_one(
                {"_id": f"pair:{row['actor']}:{row['pid']}"},
                {"$set": {"pid": row["pid"], "actor": row["actor"], "features": row["features"], "at": at}},
                upsert=True)

    def pair_features(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[float]]:
        """The remembered features of these ``(actor, pid)`` pairs."""
        ids = [f"pair:{a}:{p}" for a, p in keys]
        out = {}
        for chunk in _chunks(ids):
            for doc in self.db[PRIVACY_SCANS].find({"_id": {"$in": chunk}}, {"actor": 1, "pid": 1, "features": 1}):
                out[(doc["actor"], doc["pid"])] = doc["features"]
        return out
