"""Versioned resource storage on MongoDB (pymongo only).

Knows nothing of HTTP, tokens or consent: the guarded repository
(``repository.py``) is its only caller for resource data.

Layout (one collection per type, history in ``<Type>_history``)::

    {"_id": id, "pid": owning patient id, "vid": int, "lu": datetime,
     "del": bool, "res": resource JSON, "s": search index, "o": sort keys}

The ``<Type>_history`` collection holds the superseded versions; the current version is read
from the current collection (its document carries ``nh: true``: "no history copy yet") and is
copied into the history by the update that supersedes it, from the document the update returns:
a create writes one document, not two (issue 13). Documents written before that have their copy
already (no ``nh``); the history and vread read both.

``pid`` starts every index so a patient's record can live on one shard.
Optimistic concurrency is enforced by the database: an update matches
``{"_id": id, "vid": expected}`` and the history insert has a unique
``_id`` ``"id/vid"``, so of two racing writers with the same ``If-Match``
exactly one wins. Multi-document writes run in a transaction.
"""
from __future__ import annotations

import json
import logging
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import decimal

import bson
import pymongo
from bson.codec_options import CodecOptions, TypeCodec, TypeRegistry
from bson.decimal128 import Decimal128
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, InsertOne, ReturnDocument, UpdateOne, WriteConcern
from pymongo.client_session import TransactionOptions
from pymongo.read_concern import ReadConcern
from pymongo.errors import ClientBulkWriteException, DuplicateKeyError, OperationFailure, PyMongoError

from . import search

log = logging.getLogger(__name__)

# the collections beside the resources (only this module names collections and runs queries)
BLOBS, CHUNKS = "content_blobs", "content_chunks"  # encrypted content (blobs.py)
DATAKEYS = "datakeys"                         # wrapped per-DMP data keys (security/crypto.py)
OUTBOX = "notification_outbox"                # notices to send (notifications.py)
ACCESS_CODES = "access_codes"                 # first-access codes (access_codes.py)
JOBS = "scheduled_jobs"                       # daily jobs' leases (lifecycle.py)
GRANTS = "btg_grants"                         # break-the-glass grants (security/decision/)
GRANT_LOCKS = "btg_grant_locks"               # one per (DMP, PS): concurrent new grants conflict on it
JOURNAL = "AuditEvent"                        # the audit journal (security/audit.py)
JOURNAL_HEADS = "AuditEvent_chain"            # one head per chain (security/audit.py)
JOURNAL_QUEUE = "AuditEvent_queue"            # appended, not yet sealed (security/audit.py)
JOURNAL_LINKS = "AuditEvent_link"             # the chain links of each sealing pass (security/sealer.py)
CHECKPOINTS = "AuditEvent_checkpoint"         # signed checkpoints of the heads (security/sealer.py)
SEALER_LEASE = "audit_sealer_lease"           # the one sealer's lease (security/sealer.py)
KEY_SETS = "issuer_key_sets"                  # the issuer's key set as last seen by any process (security/auth.py)
#: what the access decision reads: the decision context cache watches them (security/context_cache.py)
DECISION_INPUTS = ("Patient", "Consent", "RelatedPerson", GRANTS)
#: a range from EPOCH on the queue's ``t`` (always a date) reads the queue through its index
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SEALER_ID = "sealer"
LEASE_WAIT_S = 2.0     # the longest a lease write waits on a locked lease document
#: resource types of the patient compartment stored with ``pid`` (Patient itself apart)
COMPARTMENT_TYPES = ("DocumentReference", "Binary", "Consent", "Communication", "RelatedPerson")
#: the resource types this server hosts, the one list (repository.HOSTED, the REST routes, validation)
RESOURCE_TYPES = ("Patient", "DocumentReference", "Consent", "AuditEvent", "Binary", "Communication",
                  "RelatedPerson", "Practitioner", "PractitionerRole")
# Written once and never changed (the journal): each entry is its own only version, so its history
# is the collection itself (version 1 of every entry) and there is no ``*_history`` copy.
APPEND_ONLY = ("AuditEvent",)


class DuplicateValue(Exception):
    """A unique index other than the id refused the write (e.g. one DMP per INS)."""

    def __init__(self, key_pattern: dict):
        super().__init__(f"duplicate value for {sorted(key_pattern)}")
        self.key_pattern = key_pattern


def _duplicate(exc: DuplicateKeyError) -> Exception:
    """VersionConflict for an id collision, DuplicateValue for another unique index."""
    pattern = (exc.details or {}).get("keyPattern") or {}
    if pattern and set(pattern) != {"_id"}:
        return DuplicateValue(pattern)
    return VersionConflict(None)


class VersionConflict(Exception):
    """The stored version is not the one the writer expected."""

    def __init__(self, current_vid: int | None):
        super().__init__(f"current version is {current_vid}")
        self.current_vid = current_vid


@dataclass
class Stored:
    """One stored version of a resource."""

    resource_type: str
    id: str
    vid: int
    lu: datetime
    pid: str | None
    deleted: bool
    resource: dict | None

    @classmethod
    def from_doc(cls, resource_type: str, doc: dict) -> "Stored":
        return cls(resource_type, doc.get("rid", doc["_id"]), doc["vid"], doc["lu"], doc.get("pid"),
                   bool(doc.get("del")), unpack(doc.get("res")))

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"


def pack(resource: dict | bytes) -> bytes:
    """A journal entry's resource as stored: JSON, zlib level 1 (issue 13). ``resource`` may be
    given already serialized (UTF-8 JSON bytes: the journal passes the canonical bytes it has
    just hashed, so an entry is serialized once on the request path).

    The database never looks inside a journal entry (its searches use ``s``/``o``), and
    SecantusDB pays for every BSON element of every insert and of every change-stream read of
    its oplog: one binary value instead of ~150 nested ones made an entry's insert cost ~0.55
    instead of ~0.4 ms of the database's CPU (bench, batches of 8). Read back by :func:`unpack`."""
    if not isinstance(resource, bytes):
        resource = json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return zlib.compress(resource, 1)


def unpack(res):
    """The resource of a stored document: packed (:func:`pack`) or plain."""
    if isinstance(res, bytes):
        return json.loads(zlib.decompress(res))
    return res


def merge_filters(*filters: dict) -> dict:
    """AND of MongoDB filters, flat where their keys do not collide.

    A flat filter (``{"pid": x, "del": False, ...}``) lets every MongoDB-wire server pick an
    index (SecantusDB looks at none when the top level holds an operator such as ``$and``);
    colliding keys and nested operators fall back to ``$and``.
    """
    out: dict = {}
    rest: list[dict] = []
    for flt in filters:
        if not flt:
            continue
        for key, value in flt.items():
            if key == "$and":
                rest.extend(value)
            elif key in out:
                rest.append({key: value})
            else:
                out[key] = value
    if rest:
        return {**out, "$and": rest} if "$and" not in out else {"$and": [out, *rest]}
    return out


MAX_BRANCHES = 16


def or_branches(flt: dict) -> list[dict] | None:
    """``flt`` as a union of flat filters (no top-level operator), or None to run it as is.

    ``{a, $or: [b, c]}`` -> ``[{a, b}, {a, c}]``; ``$and`` of flat filters and ``$or``s is
    expanded the same way (at most :data:`MAX_BRANCHES`). None when there is no top-level
    operator, another operator, a branch that is not flat, or two conditions on one key.
    """
    flat = {k: v for k, v in flt.items() if not k.startswith("$")}
    groups: list[list[dict]] = []
    for key, value in flt.items():
        if key == "$or":
            groups.append(value)
        elif key == "$and":
            for sub in value:
                groups.append(sub["$or"] if set(sub) == {"$or"} else [sub])
        elif key.startswith("$"):
            return None
    if not groups:
        return None
    branches = [flat]
    for alternatives in groups:
        grown = []
        for branch in branches:
            for alt in alternatives:
                if any(k.startswith("$") for k in alt) or set(alt) & set(branch):
                    return None
                grown.append({**branch, **alt})
        branches = grown
        if len(branches) > MAX_BRANCHES:
            return None
    return branches


def sort_value(doc: dict, path: str, direction: int):
    """The value a MongoDB sort on ``path`` orders ``doc`` by: arrays by their smallest element
    ascending, largest descending; None when missing."""
    v = doc
    for part in path.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if isinstance(v, list):
        v = (min(v) if direction > 0 else max(v)) if v else None
    return v


def sort_docs(docs, sort: list) -> list:
    """Raw documents in the order of a MongoDB ``sort`` (missing first ascending, last descending),
    one stable pass per key, the last key first. Raises TypeError on values of mixed types (the
    caller lets the database order them)."""
    out = list(docs)
    for path, direction in reversed(sort):
        keyed = [((v is not None, v), d) for d in out for v in (sort_value(d, path, direction),)]
        keyed.sort(key=lambda kd: kd[0], reverse=direction < 0)
        out = [d for _, d in keyed]
    return out


def now() -> datetime:
    """UTC now at millisecond precision (what MongoDB keeps)."""
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def instant(t: datetime) -> str:
    """FHIR instant for a stored datetime."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex


class DecimalCodec(TypeCodec):
    """FHIR decimals keep their precision: Decimal <-> BSON Decimal128 (https://hl7.org/fhir/R4/json.html)."""

    python_type = decimal.Decimal
    bson_type = Decimal128

    def transform_python(self, value):
        return Decimal128(value)

    def transform_bson(self, value):
        return value.to_decimal()


CODECS = CodecOptions(tz_aware=True, type_registry=TypeRegistry([DecimalCodec()]))


class Storage:
    """CRUD, history and search on the versioned collections."""

    def __init__(self, client: pymongo.MongoClient, db, *, annotate=None):
        """``annotate(rtype, resource) -> dict`` adds flat fields stored as ``a`` (the access
        decision's facets); storage does not interpret them."""
        self.client = client
        self.annotate = annotate
        #: the process's DMP document cache (doc_cache.DocumentCache), or None: every search asks
        #: the database. Set by the application; consulted outside transactions only.
        self.doc_cache = None
        self._client_bulk: bool | None = None     # does the server take a client bulkWrite?
        self._secantus: bool | None = None        # is the server SecantusDB (buildInfo)?
        self.db = client.get_database(db.name, codec_options=CODECS, write_concern=db.write_concern,
                                      read_concern=db.read_concern, read_preference=db.read_preference)

    # -- setup -------------------------------------------------------------
    def ensure_indexes(self) -> None:
        """The indexes each collection's queries use, and no other: every insert pays for each one
        (issue 13). ``(pid, lu)`` serves the history, so it is kept on the ``*_history``
        collections and on append-only types (their own history) only; on a current collection
        nothing sorts on ``lu`` and the other ``pid``-first indexes serve ``pid`` alone (older
        databases have it: it is dropped).

        On SecantusDB a current collection keeps one ``pid``-first index (see
        :func:`_one_pid_first`); the others are dropped."""
        lean = self.is_secantus()
        for rtype in RESOURCE_TYPES:
            coll = self.db[rtype]
            if rtype not in APPEND_ONLY:
                _drop_index(coll, [("pid", 1), ("lu", -1)])
            for keys in RETIRED_INDEXES.get(rtype, []):
                _drop_index(coll, keys)
            wanted = _wanted_indexes(rtype)
            if lean and rtype not in APPEND_ONLY:
                wanted = _one_pid_first(wanted)
                _drop_indexes(coll, lambda keys, wanted=wanted: keys[0] == ("pid", 1) and keys not in wanted)
            for keys in wanted:
                _index(coll, keys)
            for key in UNIQUE_INDEXES.get(rtype, []):
                _index(coll, [key], unique=True, partialFilterExpression={key[0]: {"$exists": True}})
            hist = self.db[f"{rtype}_history"]
            for keys in ([("rid", 1), ("vid", -1)], [("lu", -1), ("_id", 1)], [("pid", 1), ("lu", -1)]):
                _index(hist, keys)
        _index(self.db[GRANTS], [("pid", 1), ("ps", 1), ("expires", -1)])
        _index(self.db[GRANTS], [("reviewed", 1), ("created", -1)])
        _index(self.db[GRANT_LOCKS], [("pid", 1)])

    def run_transaction(self, callback):
        """``callback(session)`` in a transaction through pymongo's ``with_transaction``: retried
        on lost races (TransientTransactionError) and unknown commit results; returns its result."""
        def labelled(session):
            try:
                return callback(session)
            except OperationFailure as exc:
                _label_transient(exc)
                raise

        with self.client.start_session(**self._transaction_session()) as session:
            return session.with_transaction(labelled)

    def _transaction_session(self) -> dict:
        """Session options of :meth:`run_transaction`. On SecantusDB, one node whose every commit
        is durable before it answers (``--sync-on-commit``), a read at level ``majority`` or
        ``local`` and after the session's last operation or not see the same data: the
        transaction names no read concern and the session is not causal, so that its first
        command may be the client ``bulkWrite`` of its inserts (SecantusDB refuses a
        ``readConcern`` there, :meth:`insert_docs`): one round trip less per write (issue 13).
        Elsewhere (MongoDB) the client's defaults (``majority``, causal)."""
        if not self.is_secantus():
            return {}
        return {"causal_consistency": False,
                "default_transaction_options": TransactionOptions(read_concern=ReadConcern())}

    # -- reads -------------------------------------------------------------
    def read(self, rtype: str, rid: str, *, session=None) -> Stored | None:
        doc = self.db[rtype].find_one({"_id": rid}, session=session)
        return Stored.from_doc(rtype, doc) if doc else None

    def read_many(self, rtype: str, ids: list[str], *, session=None) -> list[Stored]:
        if not ids:
            return []
        docs = self.db[rtype].find({"_id": {"$in": list(ids)}, "del": False}, session=session)
        return [Stored.from_doc(rtype, d) for d in docs]

    def vread(self, rtype: str, rid: str, vid: int, *, session=None) -> Stored | None:
        if rtype in APPEND_ONLY:
            doc = self.db[rtype].find_one({"_id": rid}, session=session) if vid == 1 else None
        else:
            doc = self.db[f"{rtype}_history"].find_one({"_id": f"{rid}/{vid}"}, session=session) \
                or self.db[rtype].find_one({"_id": rid, "vid": vid, NO_COPY: True}, VERSION_FIELDS, session=session)
        return Stored.from_doc(rtype, doc) if doc else None

    def _history_of(self, rtype: str, rid: str | None) -> tuple:
        """(collection, filter) of the versions of one resource (``rid``) or of a whole type."""
        if rtype in APPEND_ONLY:
            return self.db[rtype], ({} if rid is None else {"_id": rid})
        return self.db[f"{rtype}_history"], ({} if rid is None else {"rid": rid})

    def history(self, rtype: str, rid: str | None, *, pid_filter: dict | None = None,
                since: datetime | None = None, before: datetime | None = None,
                after_key: tuple | None = None, limit: int = 50, session=None) -> list[Stored]:
        """Versions newest first; keyset paging on (lu desc, _id asc)."""
        coll, flt = self._history_of(rtype, rid)
        if pid_filter:
            flt.update(pid_filter)
        if since or before:
            flt["lu"] = {}
            if since:
                flt["lu"]["$gte"] = since
            if before:
                flt["lu"]["$lt"] = before
        if after_key:
            lu, key = after_key
            if rtype in APPEND_ONLY:      # the key is "id/vid"; there the _id is the id alone
                key = key.rsplit("/", 1)[0]
            flt = {"$and": [flt, {"$or": [{"lu": {"$lt": lu}}, {"lu": lu, "_id": {"$gt": key}}]}]}
        docs = list(coll.find(flt, session=session).sort([("lu", -1), ("_id", 1)]).limit(limit))
        if rtype not in APPEND_ONLY:
            docs += self._current_versions(rtype, rid, pid_filter, since, before, after_key, limit, session)
            docs.sort(key=lambda d: d["_id"])
            docs.sort(key=lambda d: d["lu"], reverse=True)      # stable: (lu desc, _id asc)
            docs = docs[:limit]
        return [Stored.from_doc(rtype, d) for d in docs]

    def _current_versions(self, rtype, rid, pid_filter, since, before, after_key, limit, session) -> list[dict]:
        """The current versions that have no history copy yet and belong in :meth:`history`'s page,
        shaped as history documents (``_id`` "id/vid"): those before the cursor's instant, then
        those at that instant whose key is after the cursor's (compared like the history's)."""
        flt = {NO_COPY: True, **({} if rid is None else {"_id": rid}), **(pid_filter or {})}
        since, before = _utc(since), _utc(before)
        lu = {**({"$gte": since} if since else {}), **({"$lt": before} if before else {})}
        at = None
        if after_key:
            at, key = _utc(after_key[0]), after_key[1]
            lu["$lt"] = min(at, lu["$lt"]) if "$lt" in lu else at
        if lu:
            flt["lu"] = lu
        cur = self.db[rtype].find(flt, VERSION_FIELDS, session=session).sort([("lu", -1), ("_id", 1)]).limit(limit)
        out = [_as_version(d) for d in cur]
        if at is not None and (since is None or at >= since) and (before is None or at < before):
            tied = self.db[rtype].find({**{k: v for k, v in flt.items() if k != "lu"}, "lu": at}, VERSION_FIELDS,
                                       session=session)
            out += [v for v in map(_as_version, tied) if v["_id"] > key]
        return out

    def count_history(self, rtype: str, rid: str | None, pid_filter: dict | None = None, *, session=None) -> int:
        coll, flt = self._history_of(rtype, rid)
        if pid_filter:
            flt.update(pid_filter)
        n = coll.count_documents(flt, session=session)
        if rtype not in APPEND_ONLY:     # the current versions without a copy (module docstring)
            n += self.db[rtype].count_documents({NO_COPY: True, **({} if rid is None else {"_id": rid}),
                                                 **(pid_filter or {})}, session=session)
        return n

    def find(self, rtype: str, flt: dict, sort: list, limit: int, *, session=None) -> list[Stored]:
        return [Stored.from_doc(rtype, d) for d in self.find_docs(rtype, flt, sort, limit, session=session)]

    def find_docs(self, rtype: str, flt: dict, sort: list, limit: int, *, session=None) -> list[dict]:
        """Raw current documents (not deleted) matching ``flt``.

        A filter with top-level ``$or`` is run as one flat query per branch, merged here (see
        :func:`or_branches`): SecantusDB uses no index at all when the top level holds an
        operator, so the access guard's ``$or`` would scan the whole collection (issue 13).
        Outside a transaction, a query pinned to one DMP is answered from the process's DMP
        document cache when it can be (``doc_cache.py``; the same documents, order and limit).
        """
        flt = merge_filters(flt, {"del": False})
        if session is None and self.doc_cache is not None:
            cached = self.doc_cache.find(rtype, flt, sort, limit)
            if cached is not None:
                return cached
        branches = or_branches(flt)
        if branches is not None:
            docs: dict = {}
            for branch in branches:
                for d in self._find(rtype, branch, sort, limit, session):
                    docs.setdefault(d["_id"], d)
            try:
                out = sort_docs(docs.values(), sort or [("_id", 1)])
            except TypeError:   # values of mixed types: let the database order them
                out = None
            if out is not None:
                return out[:limit] if limit else out
        return self._find(rtype, flt, sort, limit, session)

    def _find(self, rtype: str, flt: dict, sort: list, limit: int, session) -> list[dict]:
        cursor = self.db[rtype].find(flt, session=session)
        if sort:
            cursor = cursor.sort(sort)
        if limit:
            cursor = cursor.limit(limit)
        return list(cursor)

    def count(self, rtype: str, flt: dict, *, session=None) -> int:
        flt = merge_filters(flt, {"del": False})
        if session is None and self.doc_cache is not None:
            cached = self.doc_cache.count(rtype, flt)
            if cached is not None:
                return cached
        branches = or_branches(flt)
        if branches is None:
            return self.db[rtype].count_documents(flt, session=session)
        ids: set = set()
        for branch in branches:
            ids.update(d["_id"] for d in self.db[rtype].find(branch, {"_id": 1}, session=session))
        return len(ids)

    def compartment_docs(self, rtype: str, pids: list[str]) -> list[dict]:
        """Every current (not deleted) document of ``rtype`` in these DMPs, whole (``pid`` index)."""
        pids = sorted(pids)
        flt = {"pid": pids[0] if len(pids) == 1 else {"$in": pids}, "del": False}
        return list(self.db[rtype].find(flt))

    def ids_with_raw(self, rtype: str, flt: dict, projection: dict) -> list[dict]:
        """Raw projected documents (for the decision's context loading)."""
        return list(self.db[rtype].find(flt, projection))

    # -- what the access decision reads (security/decision/) ----------------
    def patient_docs(self, pids: list[str], *, session=None) -> dict[str, dict]:
        """Raw Patient documents (deleted and destroyed included) by id, without search indexes."""
        return {d["_id"]: d for d in self.db["Patient"].find(
            {"_id": {"$in": list(pids)}}, {"s": 0, "o": 0, "a": 0}, session=session)}

    def watch_decision_inputs(self, also: tuple = ()):
        """A change stream on the collections the access decision reads (:data:`DECISION_INPUTS`)
        and those named in ``also``, each change reduced to ``ns``, ``documentKey``,
        ``fullDocument.pid`` and ``operationType`` (the invalidation of the decision context
        cache, security/context_cache.py, and of the DMP document cache, doc_cache.py)."""
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

    # -- Binary bookkeeping (documents/pipeline.py) ---------------------------
    def blob_info(self, bid: str, *, session=None) -> dict:
        """``{size, sha1}`` of a Binary's stored content ({} when unknown)."""
        doc = self.db["Binary"].find_one({"_id": bid}, {"blob": 1}, session=session) or {}
        return doc.get("blob") or {}

    def attach_binary(self, bid: str, pid: str, reference: str, *, session=None) -> None:
        """Point a Binary's current securityContext at its document (same DMP only)."""
        self.db["Binary"].update_one({"_id": bid, "pid": pid},
                                     {"$set": {"res.securityContext": {"reference": reference}}}, session=session)

    # -- a DMP's lifecycle (lifecycle.py) --------------------------------------
    def mark_closed(self, pid: str, at: datetime, *, session=None) -> None:
        """``closed_at`` beside the stored Patient (not part of the resource): retention counts from it."""
        self.db["Patient"].update_one({"_id": pid}, {"$set": {"closed_at": at}}, session=session)

    def mark_reopened(self, pid: str, *, session=None) -> None:
        """A reopened DMP: no ``closed_at`` (no retention runs for it)."""
        self.db["Patient"].update_one({"_id": pid}, {"$unset": {"closed_at": ""}}, session=session)

    def closed_before(self, limit: datetime) -> list[str]:
        """Ids of the DMPs closed at or before ``limit``."""
        return [d["_id"] for d in self.db["Patient"].find(
            {"closed_at": {"$lte": limit}, "res.active": False}, {"_id": 1})]

    def purge_dmp(self, pid: str, *, session) -> dict:
        """Remove every trace of DMP ``pid`` inside ``session``'s transaction; counts by collection
        (lifecycle.purge_dmp states what goes and in which order)."""
        from .audit.chain import GENESIS
        counts = {}

        def gone(name: str, flt: dict) -> None:
            counts[name] = counts.get(name, 0) + self.db[name].delete_many(flt, session=session).deleted_count

        gone(DATAKEYS, {"_id": pid})
        gone(BLOBS, {"p": pid})
        gone(CHUNKS, {"p": pid})
        for rtype in COMPARTMENT_TYPES:
            gone(rtype, {"pid": pid})
            gone(f"{rtype}_history", {"pid": pid})
        gone("Patient", {"_id": pid})
        gone("Patient_history", {"rid": pid})
        gone(GRANTS, {"pid": pid})
        gone(GRANT_LOCKS, {"pid": pid})
        gone(OUTBOX, {"patient_id": pid})
        gone(ACCESS_CODES, {"pid": pid})
        # sealed and not yet sealed events alike (the sealer links them after the fact)
        gone(JOURNAL, {"pid": pid})
        gone(JOURNAL_LINKS, {"pid": pid})
        self.db[JOURNAL_QUEUE].update_many({"items.p": pid}, {"$pull": {"items": {"p": pid}}}, session=session)
        self.db[JOURNAL_QUEUE].delete_many({"items": {"$size": 0}}, session=session)   # nothing left to seal
        gone(JOURNAL_HEADS, {"_id": pid})
        # the signed checkpoints still name the chain's last head: say it was destroyed (an id and
        # a date, nothing personal) so that `audit verify` does not take it for a deleted chain
        self.db[JOURNAL_HEADS].insert_one({"_id": pid, "seq": 0, "hash": GENESIS, "destroyed": True},
                                          session=session)
        return counts

    def was_destroyed(self, pid: str) -> bool:
        """The DMP is gone and its journal head says it was destroyed (not merely never existed)."""
        if self.db["Patient"].find_one({"_id": pid}, {"_id": 1}) is not None:
            return False
        return self.db[JOURNAL_HEADS].find_one({"_id": pid, "destroyed": True}, {"_id": 1}) is not None

    # -- the shared view of the issuer's published keys (security/auth.py) -------
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

    def claim_daily_run(self, job: str, owner: str, at: datetime, period) -> bool:
        """True for exactly one caller per ``period`` across processes (compare-and-set on ``next_run``)."""
        self.db[JOBS].update_one({"_id": job}, {"$setOnInsert": {"next_run": at}}, upsert=True)
        doc = self.db[JOBS].find_one_and_update(
            {"_id": job, "next_run": {"$lte": at}},
            {"$set": {"next_run": at + period, "owner": owner, "started": at}},
            return_document=ReturnDocument.AFTER)
        return doc is not None

    # -- encrypted content chunks (blobs.py: it encrypts, this stores) ------------
    def ensure_blob_indexes(self) -> None:
        """Patient-first indexes (also usable as shard keys): one blob per (p, r, v)."""
        self.db[BLOBS].create_index([("p", ASCENDING), ("r", ASCENDING), ("v", ASCENDING)], unique=True)
        self.db[CHUNKS].create_index([("p", ASCENDING), ("b", ASCENDING), ("n", ASCENDING)], unique=True)
        self.db[CHUNKS].create_index([("p", ASCENDING), ("r", ASCENDING), ("v", ASCENDING)])

    def add_blob_chunk(self, doc: dict, *, session=None) -> None:
        self.db[CHUNKS].insert_one(doc, session=session)

    def add_blob(self, doc: dict, *, session=None) -> None:
        """The blob's header, written after its chunks (DuplicateKeyError: that version has one)."""
        self.db[BLOBS].insert_one(doc, session=session)

    def blob_meta(self, pid: str, rid: str, ver: int, *, session=None, data: bool = True) -> dict | None:
        """A blob's header; ``data=False`` leaves out the ciphertext a one-chunk blob keeps there."""
        return self.db[BLOBS].find_one({"p": pid, "r": rid, "v": ver}, None if data else {"d": 0},
                                       session=session)

    def blob_exists(self, pid: str, rid: str, ver: int, *, session=None) -> bool:
        return self.db[BLOBS].count_documents({"p": pid, "r": rid, "v": ver}, limit=1, session=session) > 0

    def blob_chunks(self, pid: str, blob_id: str, *, session=None):
        """A cursor over the chunks of one blob in order (``n``, ``d``); close it when done."""
        return (self.db[CHUNKS].find({"p": pid, "b": blob_id}, {"n": 1, "d": 1}, session=session)
                .sort("n", ASCENDING).batch_size(4))

    def discard_blob_chunks(self, pid: str, blob_id: str, *, session=None) -> None:
        self.db[CHUNKS].delete_many({"p": pid, "b": blob_id}, session=session)

    def delete_blobs(self, flt: dict, *, session=None) -> None:
        """Remove blobs and chunks matching ``flt`` (over ``p``, ``r``, ``v``)."""
        self.db[BLOBS].delete_many(flt, session=session)
        self.db[CHUNKS].delete_many(flt, session=session)

    # -- wrapped data keys (security/crypto.py: it wraps, this stores) -----------
    def data_key(self, pid: str) -> dict | None:
        return self.db[DATAKEYS].find_one({"_id": pid})

    def add_data_key(self, doc: dict) -> None:
        """Store a new wrapped data key (DuplicateKeyError: another request created it first)."""
        self.db[DATAKEYS].insert_one(doc)

    def data_keys_not_wrapped_by(self, kek_id: str) -> list[dict]:
        return list(self.db[DATAKEYS].find({"kek_id": {"$ne": kek_id}}))

    def count_data_keys_not_wrapped_by(self, kek_id: str) -> int:
        return self.db[DATAKEYS].count_documents({"kek_id": {"$ne": kek_id}})

    def rewrap_data_key(self, doc: dict, wrapped: bytes, kek_id: str, at: datetime) -> int:
        """Compare-and-set on the old wrapped value (a key shredded meanwhile stays deleted)."""
        return self.db[DATAKEYS].update_one(
            {"_id": doc["_id"], "wrapped": doc["wrapped"], "kek_id": doc["kek_id"]},
            {"$set": {"wrapped": wrapped, "kek_id": kek_id, "rewrapped": at}}).modified_count

    def kek_ids_in_use(self) -> set[str]:
        return set(self.db[DATAKEYS].distinct("kek_id"))

    # -- the journal (security/audit.py, security/sealer.py) -----------------------
    # Three insert-mostly collections, because SecantusDB updates are dear (~1 ms of the database's
    # CPU for a journal entry, ~5 ms with its old 14 indexes, against ~0.1 ms for a small insert):
    #   AuditEvent          the events (``res`` packed: :func:`pack`), written once, never updated
    #                       by the sealer;
    #   AuditEvent_queue    one small document per append {t, items: [{e, p, d}]} (event id, chain,
    #                       content digest), written in the same transaction as its events: the
    #                       sealer's to-do list, removed in the transaction that seals it;
    #   AuditEvent_link     per sealing pass and chain, one run of consecutive links
    #                       {_id: "<pid>:<first>", pid, first, last, prev, links: [[event id, hash], ...]}
    #                       (seq = first + position; prev of a link = the hash before it, ``prev``
    #                       for the first): one insert per pass, not one per event.
    def _journal(self):
        return self.db.get_collection(JOURNAL, write_concern=WriteConcern(w="majority", j=True))

    def ensure_journal_indexes(self) -> None:
        """Links: in chain order (their unique ``_id``, chain and first position, is the anti-fork
        guard). Queue: oldest first.
        Journal indexes that this version no longer keeps (the lean set of ``search.indexes``) and
        the old in-event chain and queue indexes are dropped: each one was paid on every read."""
        keep = [[("_id", 1)], *_wanted_indexes(JOURNAL), *([k] for k in UNIQUE_INDEXES.get(JOURNAL, []))]
        _drop_indexes(self.db[JOURNAL], lambda keys: keys not in keep)
        self.db[JOURNAL_LINKS].create_index([("pid", 1), ("first", 1)], name="chain_order")
        self.db[JOURNAL_QUEUE].create_index([("t", 1), ("_id", 1)], name="oldest_first")

    def journal_insert(self, docs: list[dict], items: list[dict], *, session=None,
                       pending: list | None = None) -> None:
        """Append journal entries and their one queue document (``items``: ``{e, p, d}`` per event),
        atomically: inside ``session``'s transaction, or else in a transaction of their own that
        commits durably (``w: majority, j: true``: one fsync for a whole group commit).

        ``pending`` (in a transaction): the transaction's inserts not sent yet (``(collection,
        document)``, as :meth:`create` defers them); they go first, with the journal's documents, in
        one round trip (:meth:`insert_docs`), and the list is emptied (issue 13: two round trips
        less per write)."""
        docs = [{**d, "res": pack(d["res"])} for d in docs]
        queue = {"_id": uuid.uuid4().hex, "t": now(), "items": items}

        def write(s) -> None:
            self.db[JOURNAL].insert_many(docs, ordered=True, session=s)
            self.db[JOURNAL_QUEUE].insert_one(queue, session=s)
        if session is not None:
            if not pending:
                write(session)
                return
            try:
                self.insert_docs([*_taken(pending), *((JOURNAL, d) for d in docs), (JOURNAL_QUEUE, queue)],
                                 session=session)
            except OperationFailure as exc:
                _label_transient(exc)   # a lost race of the data is retried, not the journal's failure
                raise
            return
        with self.client.start_session() as s:
            s.with_transaction(write, write_concern=WriteConcern(w="majority", j=True))

    def _queued(self, pid: str | None = None):
        """``(t, item)`` for every queued (unsealed) event, ``pid``'s only when given."""
        for q in self.db[JOURNAL_QUEUE].find({} if pid is None else {"items.p": pid}):
            for item in q["items"]:
                if pid is None or item.get("p") == pid:
                    yield q["t"], item

    def count_unsealed_before(self, cutoff: datetime, pid: str | None = None) -> int:
        return sum(1 for t, _ in self._queued(pid) if t < cutoff)

    def count_unchained(self, pid: str | None = None) -> int:
        """Events neither sealed nor waiting for the sealer (a queue entry lost, or deleted)."""
        queued = {item["e"] for _, item in self._queued(pid)}
        linked = {eid for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), {"links": 1})
                  for eid, _ in run["links"]}
        return sum(1 for d in self.db[JOURNAL].find(_by_pid(pid), {"_id": 1})
                   if d["_id"] not in linked and d["_id"] not in queued)

    def sealed_events(self, pid: str | None = None):
        """Sealed events in chain order (``pid``, ``seq``), each with ``chain`` = ``{pid, seq,
        prev, hash}`` (``pid`` the chain: ``_system`` for events of no patient). A link whose event
        is gone is skipped (the verifier then sees a gap in the chain)."""
        for run in self.db[JOURNAL_LINKS].find(_by_pid(pid), sort=[("pid", 1), ("first", 1)]):
            events = {d["_id"]: d for d in self.db[JOURNAL].find(
                {"_id": {"$in": [eid for eid, _ in run["links"]]}})}
            prev = run["prev"]
            for i, (eid, hsh) in enumerate(run["links"]):
                event = events.get(eid)
                if event is not None:
                    yield {**event, "res": unpack(event.get("res")),
                           "chain": {"pid": run["pid"], "seq": run["first"] + i, "prev": prev, "hash": hsh}}
                prev = hsh

    def chain_heads(self, pid: str | None = None):
        """The chain heads (``{_id: pid, seq, hash, lu}``), all or ``pid``'s."""
        return self.db[JOURNAL_HEADS].find({} if pid is None else {"_id": pid})

    def destroyed_chains(self) -> set[str]:
        return {h["_id"] for h in self.db[JOURNAL_HEADS].find({"destroyed": True}, {"_id": 1})}

    # -- the journal sealer (security/sealer.py) --------------------------------
    def take_sealer_lease(self, owner: str, now: datetime, until: datetime, lsid: dict | None = None) -> bool:
        """Take or renew the one sealer lease for ``owner``, whose sealing transactions run in
        session ``lsid``; False when another live owner holds it.

        A holder killed inside a sealing transaction leaves that transaction open, and its write
        keeps the lease document locked until SecantusDB aborts it (60 s idle AND another
        transaction command: possibly never on a read-only load). So whoever takes an EXPIRED
        lease first kills the holder's session (``killSessions``, which aborts its transaction;
        a live holder that merely overran its lease just loses its current pass, as the fencing
        write would make it anyway). Lease writes wait at most :data:`LEASE_WAIT_S` on a lock."""
        stale = self.db[SEALER_LEASE].find_one(   # a snapshot read: not blocked by the lock
            {"_id": SEALER_ID, "owner": {"$ne": owner}, "until": {"$lt": now}, "lsid": {"$exists": True}})
        if stale is not None:
            try:
                self.client.admin.command("killSessions", [stale["lsid"]])
            except PyMongoError as exc:
                log.warning("could not end the expired sealer's session: %s", type(exc).__name__)
        try:
            with pymongo.timeout(LEASE_WAIT_S):
                doc = self.db[SEALER_LEASE].find_one_and_update(
                    {"_id": SEALER_ID, "$or": [{"owner": owner}, {"until": {"$lt": now}}]},
                    {"$set": {"owner": owner, "until": until, **({"lsid": lsid} if lsid else {})}},
                    upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            return False
        except PyMongoError as exc:
            if exc.timeout:
                return False
            raise
        return bool(doc) and doc.get("owner") == owner

    def renew_sealer_lease(self, owner: str, now: datetime, until: datetime, *, session) -> bool:
        """Extend a lease ``owner`` still holds (the fencing write of each sealing transaction)."""
        return self.db[SEALER_LEASE].update_one(
            {"_id": SEALER_ID, "owner": owner, "until": {"$gt": now}},
            {"$set": {"until": until}}, session=session).matched_count > 0

    def release_sealer_lease(self, owner: str) -> None:
        with pymongo.timeout(LEASE_WAIT_S):
            self.db[SEALER_LEASE].delete_one({"_id": SEALER_ID, "owner": owner})

    def unsealed_batches(self, limit: int, *, session=None) -> list[dict]:
        """The oldest queue documents (append time, then ``_id``) holding about ``limit`` events
        (whole documents: at least one, then while the total stays within ``limit``). Each holds
        at least one event (a destroy deletes those it empties), so ``limit`` documents suffice:
        the database is not asked for the whole backlog."""
        out, total = [], 0
        for q in self.db[JOURNAL_QUEUE].find({"t": {"$gte": EPOCH}}, sort=[("t", 1), ("_id", 1)],
                                             limit=limit, session=session):
            if out and total + len(q["items"]) > limit:
                break
            out.append(q)
            total += len(q["items"])
        return out

    def heads_of(self, pids: list[str], *, session=None) -> dict[str, tuple[int, str]]:
        """``pid -> (seq, hash)`` of the chains that have a head."""
        return {h["_id"]: (h["seq"], h["hash"])
                for h in self.db[JOURNAL_HEADS].find({"_id": {"$in": pids}}, session=session)}

    def seal_events(self, runs: list[dict], queue_ids: list[str], *, session) -> None:
        """Store the chain ``runs`` (``{pid, first, prev, links: [[event id, hash], ...]}``, one
        per chain) and remove the queue documents they came from, in ``session``'s transaction.
        A run is keyed by its chain and first position: two runs from the same head (a fork) are
        refused by the unique ``_id``, and the whole transaction aborts."""
        if runs:
            self.db[JOURNAL_LINKS].insert_many(
                [{"_id": f"{r['pid']}:{r['first']}", "last": r["first"] + len(r["links"]) - 1, **r}
                 for r in runs], ordered=True, session=session)
        self.db[JOURNAL_QUEUE].delete_many({"_id": {"$in": queue_ids}}, session=session)

    def move_heads(self, heads: dict[str, tuple[int, str]], at: datetime, *, session) -> None:
        """Set each chain's head to ``(seq, hash)`` (created when new)."""
        ops = [UpdateOne({"_id": pid}, {"$set": {"seq": seq, "hash": hsh, "lu": at}}, upsert=True)
               for pid, (seq, hsh) in heads.items()]
        self.db[JOURNAL_HEADS].bulk_write(ops, ordered=True, session=session)

    def last_checkpoint(self, *, session=None) -> dict | None:
        return self.db[CHECKPOINTS].find_one({}, {"_id": 1, "digest": 1}, sort=[("_id", -1)], session=session)

    def add_checkpoint(self, doc: dict, *, session=None) -> None:
        self.db[CHECKPOINTS].insert_one(doc, session=session)

    def checkpoints(self):
        """Every checkpoint, in order (``_id`` = n)."""
        return self.db[CHECKPOINTS].find({}, sort=[("_id", 1)])

    def has_checkpoints(self) -> bool:
        return bool(self.db[CHECKPOINTS].estimated_document_count())

    # -- the notification outbox (notifications.py) ----------------------------
    def _outbox(self):
        return self.db.get_collection(OUTBOX, write_concern=WriteConcern(w="majority", j=True))

    def ensure_outbox_indexes(self) -> None:
        coll = self.db[OUTBOX]
        coll.create_index([("status", 1), ("next_attempt_at", 1)], name="due")
        coll.create_index([("status", 1), ("lease_until", 1)], name="lease")
        coll.create_index([("communication_id", 1)], name="communication")

    def queue_notices(self, docs: list[dict], *, session=None) -> None:
        self._outbox().insert_many(docs, session=session)

    def claim_notice(self, channels: list[str], worker_id: str, now: datetime, lease) -> dict | None:
        """Atomically take one due message of ``channels`` (or one whose lease expired)."""
        return self._outbox().find_one_and_update(
            {"channel": {"$in": channels},
             "$or": [{"status": "pending", "next_attempt_at": {"$lte": now}},
                     {"status": "sending", "lease_until": {"$lte": now}}]},
            {"$set": {"status": "sending", "claimed_by": worker_id, "lease_until": now + lease},
             "$inc": {"attempts": 1}},
            sort=[("next_attempt_at", 1)],
            return_document=ReturnDocument.AFTER,
        )

    def notice_state(self, mid: str) -> dict | None:
        return self._outbox().find_one({"_id": mid}, {"status": 1, "sent_at": 1})

    def mark_notice_sent(self, mid: str, now: datetime, *, forget_body: bool) -> dict | None:
        """The message as sent (None when another worker completed it first)."""
        return self._outbox().find_one_and_update(
            {"_id": mid, "status": {"$ne": "sent"}},
            {"$set": {"status": "sent", "sent_at": now, "lease_until": None, "last_error": None,
                      **({"body": None} if forget_body else {})}},
            return_document=ReturnDocument.AFTER)

    def update_claimed_notice(self, mid: str, worker_id: str, changes: dict) -> dict | None:
        """Set ``changes`` on a message this worker still holds; the message after, or None."""
        return self._outbox().find_one_and_update(
            {"_id": mid, "claimed_by": worker_id, "status": "sending"}, {"$set": changes},
            return_document=ReturnDocument.AFTER)

    # -- first-access codes (access_codes.py: only their salted hash is stored) ----
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

    # -- writes ------------------------------------------------------------
    def current_doc(self, rtype: str, rid: str, vid: int, pid: str | None, resource: dict | None,
                    deleted: bool, lu: datetime, extra: dict | None = None) -> dict:
        """The current document of a version, as :meth:`create` and :meth:`update` write it: the
        resource, its search index, sort keys and access facets, ``extra`` beside them, and no
        history copy yet (``nh``: the update that supersedes it writes one, :func:`_as_version`)."""
        if resource is not None:
            index, order = search.extract(rtype, resource)
            facets = self.annotate(rtype, resource) if self.annotate else {}
        else:
            index, order, facets = {}, {}, {}
        return {"_id": rid, "pid": pid, "vid": vid, "lu": lu, "del": deleted,
                "res": resource, "s": index, "o": order, "a": facets, **(extra or {}), NO_COPY: True}

    @staticmethod
    def stamp(resource: dict, rid: str, vid: int, lu: datetime) -> dict:
        resource = dict(resource)
        resource["id"] = rid
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(vid)
        meta["lastUpdated"] = instant(lu)
        resource["meta"] = meta
        return resource

    def create(self, rtype: str, resource: dict, *, pid: str | None, rid: str | None = None,
               session, extra: dict | None = None, pending: list | None = None,
               defer: bool = False) -> Stored:
        """Insert version 1. Raises VersionConflict if the id exists. ``extra``: fields stored
        beside the resource in the current document only (a Binary's ``blob`` size and hash).

        ``pending``: ``(collection, document)`` inserts of this transaction not sent yet; they go
        first, with this version, in one round trip (:meth:`insert_docs`), and the list is emptied.
        ``defer``: append this version's documents to ``pending`` instead (for a server id only:
        no duplicate can be reported then)."""
        rid = rid or new_id()
        lu = now()
        resource = self.stamp(resource, rid, 1, lu)
        if rtype == "Patient":
            pid = rid
        current = self.current_doc(rtype, rid, 1, pid, resource, False, lu, extra)
        if defer:
            pending.append((rtype, current))
        else:
            try:
                self.insert_docs([*_taken(pending), (rtype, current)], session=session)
            except DuplicateKeyError as exc:
                raise _duplicate(exc) from None
        return Stored(rtype, rid, 1, lu, pid, False, resource)

    def insert_docs(self, docs: list[tuple[str, dict]], *, session) -> None:
        """Insert ``(collection, document)`` pairs in order: inside a transaction in one round trip
        (a client ``bulkWrite``, MongoDB 8.0+ and SecantusDB), else one insert each. A refused
        insert raises what ``insert_one`` would (DuplicateKeyError, OperationFailure)."""
        bulk = len(docs) > 1 and session is not None and session.in_transaction and self._takes_client_bulk()
        if bulk and session._starting_transaction and not _bare_start(session):
            # the first command of a transaction may carry its readConcern (majority, or
            # afterClusterTime when retried), which SecantusDB refuses on a bulkWrite: it goes alone
            self.db[docs[0][0]].insert_one(docs[0][1], session=session)
            docs = docs[1:]
            bulk = len(docs) > 1
        if not bulk:
            for coll, doc in docs:
                self.db[coll].insert_one(doc, session=session)
            return
        # encoded here with this database's codecs (FHIR decimals): the client's would not know them
        ops = [InsertOne(RawBSONDocument(bson.encode(doc, codec_options=CODECS)), namespace=f"{self.db.name}.{coll}")
               for coll, doc in docs]
        try:
            self.client.bulk_write(ops, session=session, ordered=True)
        except ClientBulkWriteException as exc:
            raise _bulk_error(exc) from None

    def is_secantus(self) -> bool:
        """The server is SecantusDB (its ``buildInfo`` names its version): one pid-first index
        serves (:func:`_one_pid_first`), a transaction may open with a bulkWrite (:meth:`run_transaction`)."""
        if self._secantus is None:
            try:
                self._secantus = "secantusVersion" in self.client.admin.command("buildInfo")
            except OperationFailure:      # buildInfo refused (a locked-down MongoDB): not SecantusDB
                self._secantus = False
        return self._secantus

    def _takes_client_bulk(self) -> bool:
        if self._client_bulk is None:
            self._client_bulk = self.client.admin.command("hello").get("maxWireVersion", 0) >= 25
        return self._client_bulk

    def update(self, rtype: str, rid: str, resource: dict | None, *, pid: str | None,
               expected_vid: int, session, deleted: bool = False, extra: dict | None = None,
               pending: list | None = None) -> Stored:
        """Write version expected_vid+1 (or a delete marker when ``deleted``); the superseded
        version goes to the history (from the document the update returns, no extra read) unless
        it has its copy already (written before issue 13). ``extra`` and ``pending`` as in
        :meth:`create` (``pending`` goes with the history insert)."""
        vid = expected_vid + 1
        lu = now()
        if resource is not None:
            resource = self.stamp(resource, rid, vid, lu)
        current = self.current_doc(rtype, rid, vid, pid, resource, deleted, lu, extra)
        if deleted:
            # keep the last content searchable by nobody; the history keeps the versions
            current["res"], current["s"], current["o"], current["a"] = None, {}, {}, {}
        try:
            old = self.db[rtype].find_one_and_update(
                {"_id": rid, "vid": expected_vid}, {"$set": {k: v for k, v in current.items() if k != "_id"}},
                session=session, return_document=ReturnDocument.BEFORE, projection={**VERSION_FIELDS, NO_COPY: 1})
        except DuplicateKeyError as exc:
            raise _duplicate(exc) from None
        if old is None:
            cur = self.db[rtype].find_one({"_id": rid}, {"vid": 1}, session=session)
            raise VersionConflict(cur["vid"] if cur else None)
        docs = _taken(pending)
        if old.get(NO_COPY):
            docs.append((f"{rtype}_history", _as_version(old)))
        try:
            self.insert_docs(docs, session=session)
        except DuplicateKeyError:
            raise VersionConflict(vid) from None
        return Stored(rtype, rid, vid, lu, pid, deleted, resource)


# fields the access decision queries directly (CONTRACT.md: actor identifier, médecin traitant)
EXTRA_INDEXES = {
    "Consent": [[("a.actors", 1), ("res.status", 1)],
                [("pid", 1), ("res.status", 1)]],
    # closed_at: the retention run (lifecycle.retention_due) finds closed DMPs past retention
    "Patient": [[("a.gp", 1)], [("closed_at", 1)]],
}

#: indexes older databases have and no query needs (issue 13: each costs every insert): dropped
#: by ensure_indexes. ``(pid, lu)`` on a current collection: nothing sorts on ``lu`` there.
#: DocumentReference ``(pid, a.types)``: the search guard's ``a.types`` conditions (a ``$not``
#: ``$elemMatch``, ``a.types.0`` exists) cannot ride it, its ``pid`` equality rides any ``pid``-first
#: index; ``(pid, s.identifier…)``: the global identifier index serves those searches.
RETIRED_INDEXES = {"DocumentReference": [[("pid", 1), ("a.types", 1)],
                                         [("pid", 1), ("s.identifier.c", 1), ("s.identifier.s", 1)]]}


# unique facets (security/decision/ access_facets): one DMP per INS, enforced by the database
UNIQUE_INDEXES = {"Patient": [("a.ins", 1)]}


#: on a current document: its version has no copy in the history yet (module docstring)
NO_COPY = "nh"
#: what a version is, in a current document (projection)
VERSION_FIELDS = {"pid": 1, "vid": 1, "lu": 1, "del": 1, "res": 1}


def _utc(t: datetime | None) -> datetime | None:
    """A datetime Python can compare with the stored ones (naive is taken as UTC, as pymongo does)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _as_version(doc: dict) -> dict:
    """A current document shaped as its history copy (``Storage._docs``)."""
    return {"_id": f"{doc['_id']}/{doc['vid']}", "rid": doc["_id"], "pid": doc.get("pid"), "vid": doc["vid"],
            "lu": doc["lu"], "del": bool(doc.get("del")), "res": doc.get("res")}


def _wanted_indexes(rtype: str) -> list[list[tuple[str, int]]]:
    """The non-unique indexes of ``rtype``'s current collection: its search indexes, the extras,
    and for an append-only type (its own history) ``(pid, lu)`` and the keyset ``(lu, _id)``."""
    wanted = [list(k) for k in search.index_specs(rtype)] + EXTRA_INDEXES.get(rtype, [])
    if rtype in APPEND_ONLY:
        wanted += [[("pid", 1), ("lu", -1)], [("lu", -1), ("_id", 1)]]
    return wanted


def _one_pid_first(wanted: list[list[tuple[str, int]]]) -> list[list[tuple[str, int]]]:
    """``wanted`` with only its first ``pid``-first index (a DMP's default sort, ``-_lastUpdated``).

    What SecantusDB's planner does with a query (``secantus.storage._try_index_id_keys``, measured
    for issue 13): every search filter holds ``del``, which no index has, so no compound index
    covers it; the database then looks the filter up by ONE clause whose field leads an index
    (``pid`` inside a DMP, ``s.identifier.c`` for an identifier) and checks the rest document by
    document, and it walks an index in sort order only for an empty filter. So the second field of
    a ``pid``-first index is never used there, and one ``pid``-first index serves them all; each
    one more cost every insert ~0.08 ms of its one core (a deposit: 10 indexes, 0.85 ms more than
    with 2). On MongoDB the planner uses them all (``search/indexes.py``): they stay there."""
    firsts = [keys for keys in wanted if keys[0] == ("pid", 1)]
    return [keys for keys in wanted if keys[0] != ("pid", 1) or keys is firsts[0]]


def _drop_indexes(coll, unwanted) -> None:
    """Drop every index whose key list ``unwanted(keys)`` says; one that another process (a
    worker starting beside this one) dropped first is no error."""
    for ix in coll.list_indexes():
        if unwanted([(k, int(v)) for k, v in ix["key"].items()]):
            try:
                coll.drop_index(ix["name"])
            except OperationFailure as exc:
                if exc.code != 27:    # IndexNotFound: already gone
                    raise


def _drop_index(coll, keys) -> None:
    """Drop the index on exactly ``keys`` if there is one (whatever its name)."""
    _drop_indexes(coll, lambda found: found == list(keys))


def _index(coll, keys, **options) -> None:
    """Create an index unless the same keys already exist (under another module's name)."""
    try:
        coll.create_index(keys, **options)
    except OperationFailure as exc:
        if exc.code not in (85, 86):   # IndexOptionsConflict / IndexKeySpecsConflict: already there
            raise


def _bulk_error(exc: ClientBulkWriteException) -> Exception:
    """The error ``insert_one`` would have raised for the first refused insert of a bulk."""
    err = (exc.write_errors or [None])[0]
    if err is None:
        return exc.error if isinstance(exc.error, Exception) else OperationFailure(str(exc))
    if err.get("code") == 11000:
        return DuplicateKeyError(err.get("errmsg", "duplicate key"), 11000, err)
    return OperationFailure(err.get("errmsg", "write error"), err.get("code"), err)


def _taken(pending: list | None) -> list:
    """The inserts a transaction deferred (``pending``), taken: the list is emptied, so that
    they are sent once, first, with the write that takes them."""
    out = list(pending or ())
    if pending:
        pending.clear()
    return out


def _bare_start(session) -> bool:
    """``session``'s transactions start with no read concern, not after a cluster time
    (:meth:`Storage._transaction_session`)."""
    opts = session.options
    txn = opts.default_transaction_options
    return opts.causal_consistency is False and txn is not None and txn.read_concern is not None \
        and not txn.read_concern.document


def _label_transient(exc: OperationFailure) -> None:
    """A WriteConflict (112) is transient: label it so that the transaction is retried."""
    if exc.code == 112 and not exc.has_error_label("TransientTransactionError"):
        exc._add_error_label("TransientTransactionError")


def _by_pid(pid: str | None) -> dict:
    return {} if pid is None else {"pid": pid}


def is_write_conflict(exc: PyMongoError) -> bool:
    """A transaction lost a race (TransientTransactionError / WriteConflict)."""
    if isinstance(exc, OperationFailure):
        labels = getattr(exc, "_error_labels", None) or set()
        return exc.code == 112 or "TransientTransactionError" in labels
    return False
