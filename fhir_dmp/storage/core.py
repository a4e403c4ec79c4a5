"""Storage's core: the client and its sessions, SecantusDB's options, codecs, the names of every
collection, pack/unpack of journal entries, the filter helpers, and transactions.

Every module of ``fhir_dmp/storage/`` holds one family of collections (its docstring names them)
as a class derived from :class:`StoreCore`; :class:`fhir_dmp.storage.Storage` is all of them, the
one object callers hold. Only this package names collections and runs queries; it knows nothing
of HTTP, tokens or consent. What it raises: ``errors.py``.

Contract of this module: :meth:`StoreCore.run_transaction` runs a unit in a transaction retried
by pymongo on lost races (a WriteConflict is labelled transient here); :meth:`StoreCore.insert_docs`
sends a transaction's inserts in one round trip where the server takes a client ``bulkWrite``;
on SecantusDB (:meth:`StoreCore.is_secantus`) a transaction names no read concern and its
session is not causal, so that the bulk may be its first command.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import decimal

import bson
import orjson
import pymongo
from bson.codec_options import CodecOptions, TypeCodec, TypeRegistry
from bson.decimal128 import Decimal128
from bson.raw_bson import RawBSONDocument
from pymongo import InsertOne
from pymongo.client_session import TransactionOptions
from pymongo.read_concern import ReadConcern
from pymongo.errors import (ClientBulkWriteException, ConnectionFailure, DuplicateKeyError, OperationFailure,
                            PyMongoError)

from .errors import label_transient, translate_methods

log = logging.getLogger(__name__)
#: the label of a commit whose outcome the driver does not know (it retries such a commit)
UNKNOWN_COMMIT = "UnknownTransactionCommitResult"

# the collections beside the resources (only this package names collections and runs queries)
BLOBS, CHUNKS = "content_blobs", "content_chunks"  # encrypted content (content.py)
DATAKEYS = "datakeys"                         # wrapped per-DMP data keys (security/crypto.py)
OUTBOX = "notification_outbox"                # notices to send (notifications/)
ACCESS_CODES = "access_codes"                 # first-access codes (guard/access_codes.py)
JOBS = "scheduled_jobs"                       # daily jobs' leases (guard/lifecycle.py)
GRANTS = "btg_grants"                         # break-the-glass grants (security/decision/)
GRANT_LOCKS = "btg_grant_locks"               # one per (DMP, PS): concurrent new grants conflict on it
JOURNAL = "AuditEvent"                        # the audit journal (audit/log.py)
JOURNAL_HEADS = "AuditEvent_chain"            # one head per chain (audit/sealer.py)
JOURNAL_PAGES = "AuditEvent_page"             # appended, not yet sealed: one page per append (storage/pages.py)
JOURNAL_QUEUE = "AuditEvent_queue"            # the previous version's queue: sealed first (audit/sealer.py)
JOURNAL_LINKS = "AuditEvent_link"             # the chain links of each sealing pass (audit/sealer.py)
JOURNAL_RUN_META = "AuditEvent_run_meta"      # each run's keys, bounds and memo key (storage/runs.py)
CHECKPOINTS = "AuditEvent_checkpoint"         # signed checkpoints of the heads (audit/sealer.py)
SEALER_LEASE = "audit_sealer_lease"           # the one sealer's lease (audit/sealer.py)
PRIVACY_SCANS = "privacy_scans"               # the misuse scan's window and reviewed pairs (review/scan.py)
KEY_SETS = "issuer_key_sets"                  # the issuer's key set as last seen by any process (security/auth.py)
REVIEW_KEYS = "review_case_keys"              # one per review case key: never two cases for one key (review/)
#: what the access decision reads: the decision context cache watches them (security/context_cache.py)
DECISION_INPUTS = ("Patient", "Consent", "RelatedPerson", GRANTS)
#: a range from EPOCH on the pages' ``t`` (always a date) reads the pages through their index
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SEALER_ID = "sealer"
DB_WAIT_S = 10.0       # StoreCore.deadline's default (Config.db_wait, FHIR_DMP_DB_WAIT)
LEASE_WAIT_S = 2.0     # the longest a lease write waits on a locked lease document
END_WAIT_S = 1.0       # the longest a request past its deadline waits to end a transaction of unknown outcome
#: resource types of the patient compartment stored with ``pid`` (Patient itself apart)
COMPARTMENT_TYPES = ("DocumentReference", "Binary", "Consent", "Communication", "RelatedPerson", "Task")
#: the resource types this server hosts, the one list (repository.HOSTED, the REST routes, validation)
RESOURCE_TYPES = ("Patient", "DocumentReference", "Consent", "AuditEvent", "Binary", "Communication",
                  "RelatedPerson", "Practitioner", "PractitionerRole", "Task")
# Written once and never changed (the journal): each entry is its own only version, so its history
# is the collection itself (version 1 of every entry) and there is no ``*_history`` copy.
APPEND_ONLY = ("AuditEvent",)


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
    #: read from the process's document cache, not the database (``ResourceStore.read``)
    from_memory: bool = False

    @classmethod
    def from_doc(cls, resource_type: str, doc: dict) -> "Stored":
        return cls(resource_type, doc.get("rid", doc["_id"]), doc["vid"], doc["lu"], doc.get("pid"),
                   bool(doc.get("del")), unpack(doc.get("res")))

    @property
    def ref(self) -> str:
        return f"{self.resource_type}/{self.id}"


def pack(resource: dict | bytes) -> bytes:
    """A journal entry's resource as stored: JSON, zlib level 1. ``resource`` may be
    given already serialized (UTF-8 JSON bytes: the journal passes the canonical bytes it has
    just hashed, so an entry is serialized once on the request path).

    The database never looks inside a journal entry (its searches use ``s``/``o``), and
    SecantusDB pays for every BSON element of every insert and of every change-stream read of
    its oplog: one binary value instead of ~150 nested ones (bench/README.md, "The journal"). Read back by :func:`unpack`."""
    if not isinstance(resource, bytes):
        resource = json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return zlib.compress(resource, 1)


def unpack(res):
    """The resource of a stored document: packed (:func:`pack`) or plain. Parsed by orjson
    (2-3x the standard library on an event: the sealer unpacks every event it indexes), by the
    standard library where they could differ: a run of 19 digits (orjson reads an integer beyond
    64 bits as a float) or what orjson refuses (a lone surrogate, an infinite number)."""
    if isinstance(res, bytes):
        raw = zlib.decompress(res)
        if _LONG_DIGITS.search(raw) is None:
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
        return json.loads(raw)
    return res


#: digits enough for an integer orjson would not read exactly (beyond 64 bits: 20 digits, or 19)
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


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
    expanded the same way (at most :data:`MAX_BRANCHES`). Two conditions on one key are one
    condition holding both operators (:func:`_both`: a paging cursor's bound and its ``$or``
    on the sort key). None when there is no top-level operator, another operator, a branch that
    is not flat, or two conditions on one key that do not combine (the same operator twice).
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
                if any(k.startswith("$") for k in alt):
                    return None
                merged = dict(branch)
                for key, cond in alt.items():
                    merged[key] = _both(branch[key], cond) if key in branch else cond
                    if merged[key] is None:
                        return None
                grown.append(merged)
        branches = grown
        if len(branches) > MAX_BRANCHES:
            return None
    return branches


def _both(a, b) -> dict | None:
    """One condition on a field that holds both ``a`` and ``b`` (a value is ``$eq``); None when
    they use the same operator (or an operator object cannot be told from a value)."""
    def ops(cond):
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            return cond
        if isinstance(cond, dict):
            return None   # an embedded document as a value: left to the database
        return {"$eq": cond}
    a, b = ops(a), ops(b)
    if a is None or b is None or set(a) & set(b):
        return None
    return {**a, **b}


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


@translate_methods
class StoreCore:
    """The client, the database handle with storage's codecs, and transactions."""

    def __init__(self, client: pymongo.MongoClient, db, *, annotate=None, wait: float = DB_WAIT_S):
        """``annotate(rtype, resource) -> dict`` adds flat fields stored as ``a`` (the access
        decision's facets); storage does not interpret them. ``wait``: the seconds of
        :meth:`deadline` (``FHIR_DMP_DB_WAIT``)."""
        self.client = client
        self.wait = wait
        self.annotate = annotate
        #: the process's DMP document cache (search/doc_cache.DocumentCache), or None: every search asks
        #: the database. Set by the application; consulted outside transactions only.
        self.doc_cache = None
        self._client_bulk: bool | None = None     # does the server take a client bulkWrite?
        self._secantus: bool | None = None        # is the server SecantusDB (buildInfo)?
        self.db = client.get_database(db.name, codec_options=CODECS, write_concern=db.write_concern,
                                      read_concern=db.read_concern, read_preference=db.read_preference)

    def deadline(self):
        """The one bound on a request's database work (CONTRACT.md "Faults, failover and
        backups"): a context manager in which every operation, with the driver's retries
        (retryable reads and writes, server selection during an election, ``with_transaction``'s
        retries of a transient error or an unknown commit result), ends within ``wait`` seconds
        of entering it. pymongo's client-side operation timeout
        (https://pymongo.readthedocs.io/en/stable/api/pymongo/index.html#pymongo.timeout): past
        it an operation raises a timeout, a :class:`~fhir_dmp.storage.errors.StorageUnavailable`
        here, and a transaction is aborted, never half-written. Nested deadlines keep the
        nearer."""
        return pymongo.timeout(self.wait)

    def bounded(self, operation, *args, **kwargs):
        """``operation(*args, **kwargs)`` within :meth:`deadline` (a background thread's one
        database call)."""
        with self.deadline():
            return operation(*args, **kwargs)

    def run_transaction(self, callback):
        """``callback(session)`` in a transaction through pymongo's ``with_transaction``: retried
        on lost races (TransientTransactionError) and unknown commit results; returns its result.
        Inside ``callback`` storage raises pymongo's errors as they are (so that pymongo retries);
        what is left when it gives up comes out as a StorageError (``WriteConflict`` for a race
        lost every time), ``callback``'s own exceptions unchanged (``errors.py``). Given up with
        its outcome unknown (past the deadline, a connection lost at commit), the transaction is
        ended on the server (:meth:`_end_orphan`): it is then committed or it never will be."""
        def labelled(session):
            try:
                return callback(session)
            except OperationFailure as exc:
                label_transient(exc)
                raise

        with self.client.start_session(**self._transaction_session()) as session:
            try:
                return session.with_transaction(labelled)
            except PyMongoError as exc:
                if exc.timeout or isinstance(exc, ConnectionFailure) or exc.has_error_label(UNKNOWN_COMMIT):
                    self._end_orphan(session)
                raise

    def _end_orphan(self, session) -> None:
        """End on the server a transaction given up with its outcome unknown (the deadline ran
        out, a connection was lost: maybe during its commit), so that it cannot hold its locks
        until the server's transaction lifetime (60 s) runs out, blocking every write of the
        same DMP, and a client's retry is safe: committed, it stays; not committed, it is
        aborted now (``killSessions``). Run outside the request's spent deadline, bounded by
        :data:`END_WAIT_S`; best effort (a database still away aborts it itself)."""
        def kill():
            with pymongo.timeout(END_WAIT_S):
                self.client.admin.command("killSessions", [session.session_id])
        try:
            contextvars.Context().run(kill)   # a fresh context: no deadline but this one
        except PyMongoError as exc:
            log.warning("could not end a transaction of unknown outcome: %s", type(exc).__name__)

    def run_in_session(self, session, callback):
        """``session.with_transaction(callback)`` in a session the caller keeps (the sealer's, named
        in its lease); pymongo's errors are translated once its retries are over (``errors.py``)."""
        return session.with_transaction(callback)

    def _transaction_session(self) -> dict:
        """Session options of :meth:`run_transaction`. On SecantusDB, one node whose every commit
        is durable before it answers (``--sync-on-commit``), a read at level ``majority`` or
        ``local`` and after the session's last operation or not see the same data: the
        transaction names no read concern and the session is not causal, so that its first
        command may be the client ``bulkWrite`` of its inserts (SecantusDB refuses a
        ``readConcern`` there, :meth:`insert_docs`): one round trip less per write.
        Elsewhere (MongoDB) the client's defaults (``majority``, causal)."""
        if not self.is_secantus():
            return {}
        return {"causal_consistency": False,
                "default_transaction_options": TransactionOptions(read_concern=ReadConcern())}

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


def _utc(t: datetime | None) -> datetime | None:
    """A datetime Python can compare with the stored ones (naive is taken as UTC, as pymongo does)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


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


def _by_pid(pid: str | None) -> dict:
    return {} if pid is None else {"pid": pid}
