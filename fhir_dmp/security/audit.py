"""The audit journal: IHE BALP shaped AuditEvents, appended durably and
hash-chained per patient.

DESIGN.md "Audit (IHE BALP shape)". One AuditEvent per access and per patient
touched, denials and errors included. The guarded repository builds an
:class:`AccessRecord` in a ``finally``, turns it into a resource with
:func:`build_event` and hands it to :meth:`AuditLog.append`; when the append
fails it raises :class:`AuditUnavailable` and the request fails closed.

Shape: IHE Basic Audit Log Patterns (BALP), "RESTful activities"
https://profiles.ihe.net/ITI/BALP/content.html#3573-restful-activities
(type ``rest``, subtype the restful interaction, user agent + client agent,
patient entity, domain-resource entity, query entity in base64) on the FHIR R4
AuditEvent https://hl7.org/fhir/R4/auditevent.html.

Storage: collection ``AuditEvent`` with the common layout (``_id``, ``pid``,
``vid`` = 1, ``lu``, ``del`` = False, ``res``, ``s``, ``o``) plus::

    chain: {"pid": <patient id or "_system">, "seq": n, "prev": <hex>, "hash": <hex>}
    hash  = SHA-256( prev_hex_ascii + canonical_json(res) )   # sorted keys, no whitespace, UTF-8
    prev  = hash of seq n-1, or 64 zeros for seq 1
    retain_until: datetime   # set by mark_retention when the DMP closes

``retain_until`` and ``s``/``o`` live beside ``res`` and are not hashed.
A unique index on ``(chain.pid, chain.seq)`` is what forbids a fork: two
writers that computed the same position cannot both insert it; the loser
re-reads the head and retries. The collection ``AuditEvent_chain`` holds one
head per chain (``{_id: pid, seq, hash, lu}``) so that deleting the newest
events is detected too ("head points past last event").

Limit (stated, not solved here): the hash is unkeyed, so the chain detects
edits, deletions and reordering by anyone who does not also recompute every
later hash and the head. Someone with full write access to the database can
rewrite a whole chain; anchoring the heads outside the database (or an HMAC
key held elsewhere) is the way to close that, and would sit on top of this.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone

from pymongo import InsertOne, UpdateOne, WriteConcern
from pymongo.errors import BulkWriteError, ClientBulkWriteException, PyMongoError

from fhir_dmp.errors import ServiceUnavailable
from fhir_dmp.security.principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE,
                                         PATIENT, PS, PURPOSE_SYSTEM, REGULATION_CENTRE, TREAT,
                                         Principal)

log = logging.getLogger(__name__)

COLLECTION = "AuditEvent"
HEADS = "AuditEvent_chain"
SYSTEM_CHAIN = "_system"
GENESIS = "0" * 64
RETENTION_YEARS = 10

# --- code systems -----------------------------------------------------------
EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP_ENTITY_SYSTEM = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
PROFESSION_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante"
ACCESS_MODE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R248"
ROLE_CLASS_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
CLIENT_ID_SYSTEM = "urn:ietf:params:oauth:client-id"
SUBJECT_SYSTEM = "urn:fhir-dmp:subject"
# local code system for what no published code system says
DMP_AUDIT_SYSTEM = "urn:fhir-dmp:audit"

INTERACTIONS = {
    "read", "vread", "update", "patch", "delete", "history", "history-instance",
    "history-type", "history-system", "create", "search", "search-type", "search-system",
    "capabilities", "transaction", "batch", "operation",
}
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}

_PURPOSE_DISPLAY = {TREAT: "treatment", BTG: "break the glass", ETREAT: "emergency treatment"}
_ROLE_DISPLAY = {
    PATIENT: "Patient", LEGAL_REPRESENTATIVE: "Représentant légal", PS: "Professionnel de santé",
    REGULATION_CENTRE: "Centre de régulation (SAMU-Centre 15)", ADMIN: "Administrateur",
}
PROFESSION_LABELS = {
    "10": "Médecin", "21": "Pharmacien", "40": "Chirurgien-dentiste", "50": "Sage-femme",
    "60": "Infirmier", "70": "Masseur-kinésithérapeute",
}


class AuditUnavailable(ServiceUnavailable):
    """The journal could not be written; the request must fail closed (503)."""

    def default_message(self) -> str:
        return "Le journal d'audit est indisponible"


@dataclass
class AccessRecord:
    """What the guard knows about one interaction and one patient touched.

    ``interaction``: a http://hl7.org/fhir/restful-interaction code; ``action``
    C R U D E; ``outcome`` "0" success, "4" minor failure (denied, not found,
    bad request), "8" serious failure (server error). ``resource`` is a
    relative reference (``DocumentReference/123/_history/2``); ``query`` the
    raw query string of a search (stored base64). ``decision`` is
    ``{"result": "permit"|"deny", "rule": str, "reason": str,
    "consents": [["Consent/1", "2"], ...]}``.
    """

    interaction: str
    action: str
    outcome: str
    principal: Principal | None
    patient_id: str | None
    resource: str | None
    query: str | None
    decision: dict | None
    http_status: int | None
    client_ip: str | None
    request_id: str | None
    recorded: datetime | None = None


# --- the event ----------------------------------------------------------------

def _coding(system: str, code: str, display: str | None = None) -> dict:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _instant(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _user_agent(p: Principal | None, client_ip: str | None) -> dict:
    """agent[0]: the human user (BALP "user" agent, type IRCP, requestor)."""
    agent: dict = {
        "type": {"coding": [_coding(PARTICIPATION_SYSTEM, "IRCP", "information recipient")]},
        "requestor": True,
    }
    if p is None:
        agent["who"] = {"display": "anonymous"}
    else:
        if p.id_nat_ps:
            who = {"identifier": {"system": IDNATPS_SYSTEM, "value": p.id_nat_ps}}
        elif p.kind == PATIENT and p.patient_id:
            who = {"reference": f"Patient/{p.patient_id}"}
        elif p.kind == LEGAL_REPRESENTATIVE and p.related_person_id:
            who = {"reference": f"RelatedPerson/{p.related_person_id}"}
        else:  # admin, unknown: the token subject
            who = {"identifier": {"system": SUBJECT_SYSTEM, "value": p.subject}}
        if p.name:
            who["display"] = p.name
        agent["who"] = who
        agent["altId"] = p.subject
        if p.name:
            agent["name"] = p.name
        roles = [{"coding": [_coding(DMP_AUDIT_SYSTEM, p.kind, _ROLE_DISPLAY.get(p.kind))]}]
        if p.kind == PATIENT:
            roles[0]["coding"].append(_coding(ROLE_CLASS_SYSTEM, "PAT", "patient"))
        for code in p.professions:
            code = code.split("^", 1)[0]
            roles.append({"coding": [_coding(PROFESSION_SYSTEM, code, PROFESSION_LABELS.get(code))]})
        agent["role"] = roles
        if p.is_professional:
            agent["purposeOfUse"] = [{"coding": [_coding(PURPOSE_SYSTEM, p.purpose,
                                                         _PURPOSE_DISPLAY.get(p.purpose))]}]
            agent["policy"] = [f"{ACCESS_MODE_SYSTEM}#{p.mode}"]
    if client_ip:
        agent["network"] = {"address": client_ip, "type": "2"}  # 2 = IP address
    return agent


def _organization_agent(organization: str) -> dict:
    """The establishment the professional acts through (AIR mode, token claim ``organization``
    ``system|value``, FINESS): the journal names both the PS and the establishment."""
    system, sep, value = organization.partition("|")
    ident = {"system": system, "value": value} if sep and system and value else {"value": organization}
    return {
        "type": {"coding": [_coding(DICOM_SYSTEM, "110150", "Application")]},
        "role": [{"coding": [_coding(DMP_AUDIT_SYSTEM, "organization", "établissement")]}],
        "who": {"identifier": ident},
        "requestor": False,
    }


def _client_agent(p: Principal) -> dict:
    """agent[1]: the client application (BALP "client" agent, Source Role ID)."""
    return {
        "type": {"coding": [_coding(DICOM_SYSTEM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": p.client_id}},
        "requestor": False,
    }


def _decision_entity(rec: AccessRecord) -> dict | None:
    d = rec.decision or {}
    p = rec.principal
    details = []
    for key in ("result", "rule", "reason"):
        if d.get(key):
            details.append({"type": key, "valueString": str(d[key])})
    for consent in d.get("consents") or ():
        ref, version = (consent[0], consent[1]) if len(consent) > 1 else (consent[0], None)
        value = f"{ref}/_history/{version}" if version else str(ref)
        details.append({"type": "consent", "valueString": value})
    if rec.http_status is not None:
        details.append({"type": "http_status", "valueString": str(rec.http_status)})
    if p is not None and p.purpose == BTG and p.btg_reason:
        details.append({"type": "btg_reason", "valueString": p.btg_reason})
    if not details:
        return None
    return {
        "type": _coding(DMP_AUDIT_SYSTEM, "decision", "access decision"),
        "description": "décision d'accès",
        "detail": details,
    }


def build_event(rec: AccessRecord, *, source_observer: str) -> dict:
    """The R4 AuditEvent (IHE BALP RESTful shape) for one access and one patient.

    - type ``rest``, subtype the interaction, action, recorded, outcome, and
      ``outcomeDesc`` = the decision reason (never medical content);
    - agent[0] the user: who (idNatPs identifier, ``Patient/x`` for the
      patient, the token subject otherwise), type IRCP, role (principal kind
      in ``urn:fhir-dmp:audit`` + TRE_G15 professions), requestor true,
      purposeOfUse TREAT/BTG/ETREAT and policy ``TRE_R248#<mode>`` for
      professionals, network address; ``who.display`` "anonymous" when
      unauthenticated;
    - agent[1] the client app (client_id), requestor false, when known;
    - source.observer the server;
    - entity: patient (role 1), resource (role 4), query (role 24, base64),
      the request id (BALP XrequestId) and the decision (type ``decision``,
      detail result/rule/reason/consent/http_status/btg_reason).

    No ``id``/``meta``: :meth:`AuditLog.append` assigns them.
    """
    if rec.interaction not in INTERACTIONS:
        raise ValueError(f"unknown interaction {rec.interaction!r}")
    if rec.action not in ACTIONS:
        raise ValueError(f"unknown action {rec.action!r}")
    if rec.outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {rec.outcome!r}")
    recorded = rec.recorded or datetime.now(timezone.utc)
    p = rec.principal
    event: dict = {
        "resourceType": "AuditEvent",
        "type": _coding(EVENT_TYPE_SYSTEM, "rest", "Restful Operation"),
        "subtype": [_coding(INTERACTION_SYSTEM, rec.interaction, rec.interaction)],
        "action": rec.action,
        "recorded": _instant(recorded),
        "outcome": rec.outcome,
    }
    reason = (rec.decision or {}).get("reason")
    if reason:
        event["outcomeDesc"] = str(reason)
    if p is not None and p.is_professional:
        event["purposeOfEvent"] = [{"coding": [_coding(PURPOSE_SYSTEM, p.purpose,
                                                       _PURPOSE_DISPLAY.get(p.purpose))]}]
    agents = [_user_agent(p, rec.client_ip)]
    if p is not None and p.organization:
        agents.append(_organization_agent(p.organization))
    if p is not None and p.client_id:
        agents.append(_client_agent(p))
    event["agent"] = agents
    event["source"] = {
        "observer": {"display": source_observer},
        "type": [_coding(SOURCE_TYPE_SYSTEM, "4", "Application Server")],
    }
    entities = []
    if rec.patient_id:
        entities.append({
            "what": {"reference": f"Patient/{rec.patient_id}"},
            "type": _coding(ENTITY_TYPE_SYSTEM, "1", "Person"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "1", "Patient"),
        })
    if rec.resource:
        entities.append({
            "what": {"reference": rec.resource},
            "type": _coding(ENTITY_TYPE_SYSTEM, "2", "System Object"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "4", "Domain Resource"),
        })
    if rec.query is not None:
        entities.append({
            "type": _coding(ENTITY_TYPE_SYSTEM, "2", "System Object"),
            "role": _coding(OBJECT_ROLE_SYSTEM, "24", "Query"),
            "query": base64.b64encode(rec.query.encode("utf-8")).decode("ascii"),
        })
    if rec.request_id:
        entities.append({
            "what": {"identifier": {"value": rec.request_id}},
            "type": _coding(BALP_ENTITY_SYSTEM, "XrequestId", "X-Request-Id"),
        })
    decision = _decision_entity(rec)
    if decision:
        entities.append(decision)
    if entities:
        event["entity"] = entities
    return event


def event_patient(event: dict) -> str | None:
    """The patient id of an event's patient entity (role 1), or None."""
    for ent in event.get("entity") or ():
        role = ent.get("role") or {}
        ref = (ent.get("what") or {}).get("reference") or ""
        if role.get("system") == OBJECT_ROLE_SYSTEM and role.get("code") == "1" \
                and ref.startswith("Patient/"):
            return ref.split("/", 2)[1]
    return None


# --- the chain ----------------------------------------------------------------

def canonical_json(res: dict) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (the bytes the chain hashes)."""
    return json.dumps(res, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev: str, res: dict) -> str:
    return hashlib.sha256(prev.encode("ascii") + canonical_json(res)).hexdigest()


def _search_index(res: dict) -> tuple[dict, dict]:
    """``s``/``o`` from fhir_dmp.search.extract, imported lazily ({} if absent)."""
    try:  # fhir_dmp/search/extract.py: extract(resource_type, resource) -> (s, o)
        from fhir_dmp.search.extract import extract
    except ImportError:
        try:
            from fhir_dmp.search import extract
        except ImportError:
            return {}, {}
    if not callable(extract):  # the package exposes the submodule
        extract = getattr(extract, "extract", None)
        if extract is None:
            return {}, {}
    try:
        out = extract("AuditEvent", res)
    except Exception:  # an indexing bug must not lose the journal entry
        log.exception("search index extraction failed for AuditEvent/%s", res.get("id"))
        return {}, {}
    if isinstance(out, dict):
        return out.get("s", {}) or {}, out.get("o", {}) or {}
    s, o = out
    return s or {}, o or {}


def _is_transient(exc: PyMongoError) -> bool:
    return exc.has_error_label("TransientTransactionError")


class AuditLog:
    """Append-only journal store over the ``AuditEvent`` collection.

    Thread-safe; one instance per process. It caches the last known head of
    each chain (bounded LRU) so that a typical request costs ONE round trip:
    a client-level ``bulkWrite`` (MongoDB 8 wire protocol, SecantusDB has it)
    carrying the event inserts and the head updates, ordered, with
    ``w: majority, j: true``. Servers without client bulkWrite get
    ``insert_many`` then the head updates (two round trips). A stale cache
    (another worker appended meanwhile) shows up as a duplicate key on
    ``(chain.pid, chain.seq)``: the heads are re-read and the rest retried.
    """

    MAX_RETRIES = 50
    CACHE_SIZE = 10_000

    def __init__(self, db):
        self.db = db
        self._wc = WriteConcern(w="majority", j=True)
        self.events = db.get_collection(COLLECTION, write_concern=self._wc)
        self.heads = db.get_collection(HEADS, write_concern=self._wc)
        self._cache: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._indexed = False
        self._client_bulk: bool | None = None

    # -- setup
    def ensure_indexes(self) -> None:
        """Unique chain position (the anti-fork guard) and the patient index."""
        if self._indexed:
            return
        try:
            self.events.create_index([("chain.pid", 1), ("chain.seq", 1)], unique=True,
                                     name="chain_position")
            # (pid, lu) is created by storage.ensure_indexes like for every type
        except PyMongoError as exc:
            raise AuditUnavailable() from exc
        self._indexed = True

    def _supports_client_bulk(self) -> bool:
        if self._client_bulk is None:
            try:
                hello = self.db.client.admin.command("hello")
                self._client_bulk = int(hello.get("maxWireVersion", 0)) >= 25  # MongoDB 8.0
            except PyMongoError:
                return False
        return self._client_bulk

    # -- cache
    def _cached(self, pid: str) -> tuple[int, str] | None:
        with self._lock:
            head = self._cache.get(pid)
            if head is not None:
                self._cache.move_to_end(pid)
            return head

    def _remember(self, pid: str, seq: int, hsh: str) -> None:
        with self._lock:
            old = self._cache.get(pid)
            if old is None or old[0] < seq:
                self._cache[pid] = (seq, hsh)
                self._cache.move_to_end(pid)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)

    def _forget(self, pids) -> None:
        with self._lock:
            for pid in pids:
                self._cache.pop(pid, None)

    def _read_heads(self, pids: list[str], session=None) -> dict[str, tuple[int, str]]:
        """Authoritative heads: the newest stored event of each chain."""
        out = {}
        for pid in pids:
            doc = self.events.find_one({"chain.pid": pid}, {"chain": 1},
                                       sort=[("chain.seq", -1)], session=session)
            out[pid] = (doc["chain"]["seq"], doc["chain"]["hash"]) if doc else (0, GENESIS)
        return out

    def _read_head_docs(self, pids: list[str]) -> dict[str, tuple[int, str]]:
        """Cheap first guess for a cold cache: the head documents (one query)."""
        out = {pid: (0, GENESIS) for pid in pids}
        for doc in self.heads.find({"_id": {"$in": pids}}):
            out[doc["_id"]] = (doc["seq"], doc["hash"])
        return out

    # -- append
    def _prepare(self, events: list[dict]) -> list[dict]:
        """Give each event id, meta and the storage fields (chain added later)."""
        docs = []
        now = datetime.now(timezone.utc)
        for event in events:
            res = dict(event)
            res.setdefault("id", uuid.uuid4().hex)
            res["meta"] = {**(res.get("meta") or {}), "versionId": "1", "lastUpdated": _instant(now)}
            pid = event_patient(res)
            s, o = _search_index(res)
            docs.append({"_id": res["id"], "pid": pid, "vid": 1, "lu": now, "del": False,
                         "res": res, "s": s, "o": o,
                         "chain": {"pid": pid or SYSTEM_CHAIN}})
        return docs

    @staticmethod
    def _link(docs: list[dict], heads: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
        """Set seq/prev/hash on docs from ``heads``; return the new heads."""
        heads = dict(heads)
        for doc in docs:
            pid = doc["chain"]["pid"]
            seq, prev = heads[pid]
            hsh = chain_hash(prev, doc["res"])
            doc["chain"] = {"pid": pid, "seq": seq + 1, "prev": prev, "hash": hsh}
            heads[pid] = (seq + 1, hsh)
        return heads

    @staticmethod
    def _head_ops(new_heads: dict[str, tuple[int, str]], now: datetime) -> list[tuple[dict, list]]:
        """(filter, pipeline update) per chain head: move it forward only.

        A pipeline update instead of a ``seq < n`` filter + upsert, so that a
        concurrent writer that already moved the head further is a no-op, not
        a duplicate key on ``_id``.
        """
        ops = []
        for pid, (seq, hsh) in new_heads.items():
            ahead = {"$lt": ["$seq", seq]}  # a missing seq (new head) is less than any number
            ops.append(({"_id": pid}, [{"$set": {
                "seq": {"$cond": [ahead, seq, "$seq"]},
                "hash": {"$cond": [ahead, hsh, "$hash"]},
                "lu": {"$cond": [ahead, now, "$lu"]},
            }}]))
        return ops

    def append(self, events: list[dict], *, session=None) -> None:
        """Store ``events`` (built by :func:`build_event`) durably, chained per patient.

        Returns once the events are acknowledged with ``w: majority, j: true``
        (SecantusDB ``--sync-on-commit``). Each event gets ``id`` (unless it
        has one), ``meta`` (versionId 1, lastUpdated) and its chain position.
        Events without a patient entity chain under ``"_system"``.

        With ``session`` inside a transaction, the heads are read in the
        transaction and nothing is retried here: a conflicting append makes
        the transaction fail with a ``TransientTransactionError`` that is
        raised unchanged so ``with_transaction`` retries the whole unit.
        Raises :class:`AuditUnavailable` when the journal cannot be written.
        """
        if not events:
            return
        self.ensure_indexes()
        docs = self._prepare(events)
        if session is not None and session.in_transaction:
            self._append_in_transaction(docs, session)
            return
        try:
            self._append_with_retry(docs, session)
        except AuditUnavailable:
            raise
        except PyMongoError as exc:
            log.error("audit append failed: %s", type(exc).__name__)
            raise AuditUnavailable() from exc

    def _append_in_transaction(self, docs: list[dict], session) -> None:
        pids = list(dict.fromkeys(d["chain"]["pid"] for d in docs))
        try:
            heads = self._read_heads(pids, session=session)
            new_heads = self._link(docs, heads)
            events = self.db.get_collection(COLLECTION)  # the transaction sets the write concern
            events.insert_many(docs, ordered=True, session=session)
            heads_coll = self.db.get_collection(HEADS)
            for flt, update in self._head_ops(new_heads, docs[0]["lu"]):
                heads_coll.update_one(flt, update, upsert=True, session=session)
        except PyMongoError as exc:
            if _is_transient(exc):
                raise
            log.error("audit append in transaction failed: %s", type(exc).__name__)
            raise AuditUnavailable() from exc
        self._forget(pids)  # committed or not, the caller decides: re-read next time

    def _append_with_retry(self, docs: list[dict], session) -> None:
        pending = docs
        touched: dict[str, tuple[int, str]] = {}
        cold = [pid for pid in dict.fromkeys(d["chain"]["pid"] for d in docs) if self._cached(pid) is None]
        guesses = self._read_head_docs(cold) if cold else {}
        for attempt in range(self.MAX_RETRIES):
            pids = list(dict.fromkeys(d["chain"]["pid"] for d in pending))
            heads = {}
            for pid in pids:
                heads[pid] = self._cached(pid) or guesses.get(pid) or (0, GENESIS)
            new_heads = self._link(pending, heads)
            touched.update(new_heads)
            inserted, conflict = self._write(pending, touched, session)
            for doc in pending[:inserted]:
                c = doc["chain"]
                self._remember(c["pid"], c["seq"], c["hash"])
            if not conflict:
                return
            pending = pending[inserted:]
            stale = list(dict.fromkeys(d["chain"]["pid"] for d in pending))
            self._forget(stale)
            guesses = self._read_heads(stale, session=session)
            for pid, head in guesses.items():
                self._remember(pid, *head)
            time.sleep(min(0.001 * (2 ** attempt), 0.05) * (0.5 + random.random()))
        log.error("audit append: chain contention did not settle after %d tries", self.MAX_RETRIES)
        raise AuditUnavailable()

    def _write(self, docs: list[dict], heads: dict, session) -> tuple[int, bool]:
        """One ordered write of the events then the heads.

        Returns (number of events inserted, True if stopped by a chain
        position conflict). Other failures raise.
        """
        n = len(docs)
        head_ops = self._head_ops(heads, docs[0]["lu"])
        if self._supports_client_bulk():
            ns_e = f"{self.db.name}.{COLLECTION}"
            ns_h = f"{self.db.name}.{HEADS}"
            ops = [InsertOne(d, namespace=ns_e) for d in docs]
            ops += [UpdateOne(flt, upd, upsert=True, namespace=ns_h) for flt, upd in head_ops]
            try:
                self.db.client.bulk_write(ops, ordered=True, write_concern=self._wc, session=session)
                return n, False
            except ClientBulkWriteException as exc:
                errors = exc.write_errors or []
                if exc.write_concern_errors or not errors or exc.error is not None:
                    raise
                return self._conflict_at(errors[0].get("idx"), errors[0].get("code"), n)
        try:
            self.events.insert_many(docs, ordered=True, session=session)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            if exc.details.get("writeConcernErrors") or not errors:
                raise
            return self._conflict_at(errors[0].get("index"), errors[0].get("code"), n)
        for flt, upd in head_ops:
            self.heads.update_one(flt, upd, upsert=True, session=session)
        return n, False

    @staticmethod
    def _conflict_at(index, code, n: int) -> tuple[int, bool]:
        """A write error at ``index``: a chain position taken is a conflict to retry."""
        if code == 11000 and index is not None and index < n:
            return index, True
        log.error("audit append: write error code %s at op %s", code, index)
        raise AuditUnavailable()


# --- verification -------------------------------------------------------------

def verify_chains(db, patient_id: str | None = None) -> list[str]:
    """Check every chain (or one patient's): the problems found, [] when intact.

    Per chain, in seq order, first broken link first: ``patient X: missing
    seq 7``, ``patient X: event seq 12 (AuditEvent/abc) hash mismatch``,
    ``... prev does not match seq 11``, ``... pid field does not match its
    chain``, ``patient X: head points past last event``, ``... head hash
    does not match event seq n``. A head behind the newest event is not a
    problem (a crash between the event write and the head write).
    """
    events = db[COLLECTION]
    query = {} if patient_id is None else {"chain.pid": patient_id}
    problems: list[str] = []
    last: dict[str, tuple[int, str]] = {}

    unchained = events.count_documents({"chain.seq": {"$exists": False}, **(
        {} if patient_id is None else {"pid": patient_id})})
    if unchained:
        problems.append(f"{unchained} AuditEvent(s) without a chain position")

    pid = None
    expected, prev_hash = 1, GENESIS
    for doc in events.find(query, {"res": 1, "chain": 1, "pid": 1},
                           sort=[("chain.pid", 1), ("chain.seq", 1)]):
        chain = doc.get("chain") or {}
        if "seq" not in chain:
            continue
        if chain["pid"] != pid:
            pid, expected, prev_hash = chain["pid"], 1, GENESIS
        where = f"patient {pid}"
        seq = chain["seq"]
        ref = f"AuditEvent/{doc['_id']}"
        gap = seq != expected
        if gap:
            missing = f"{expected}" if seq == expected + 1 else f"{expected}-{seq - 1}"
            problems.append(f"{where}: missing seq {missing}")
        elif chain.get("prev") != prev_hash:
            problems.append(f"{where}: event seq {seq} ({ref}) prev does not match seq {seq - 1}")
        if chain_hash(chain.get("prev") or "", doc.get("res") or {}) != chain.get("hash"):
            problems.append(f"{where}: event seq {seq} ({ref}) hash mismatch")
        expected_pid = None if pid == SYSTEM_CHAIN else pid
        if doc.get("pid") != expected_pid or (doc.get("res") or {}).get("id") != doc["_id"]:
            problems.append(f"{where}: event seq {seq} ({ref}) pid or id field does not match its chain")
        expected, prev_hash = seq + 1, chain.get("hash")
        last[pid] = (seq, chain.get("hash"))

    head_query = {} if patient_id is None else {"_id": patient_id}
    for head in db[HEADS].find(head_query):
        hpid = head["_id"]
        seq, hsh = last.get(hpid, (0, GENESIS))
        if head["seq"] > seq:
            problems.append(f"patient {hpid}: head points past last event "
                            f"(head seq {head['seq']}, last event seq {seq})")
        elif head["seq"] == seq and head.get("hash") != hsh:
            problems.append(f"patient {hpid}: head hash does not match event seq {seq}")
    return problems


def add_years(t: datetime, years: int) -> datetime:
    """``t`` moved by whole years (29 February -> 28 February)."""
    try:
        return t.replace(year=t.year + years)
    except ValueError:
        return t.replace(year=t.year + years, day=28)


def mark_retention(db, patient_id: str, closed_at: datetime, years: int = RETENTION_YEARS) -> int:
    """Keep this patient's journal ``years`` (FHIR_DMP_RETENTION_YEARS) after the DMP closed.

    Sets ``retain_until = closed_at + years`` beside ``res`` (not hashed)
    on every event of the patient's chain or of its compartment (``pid``, e.g. the patient's own
    searches that touched no record); returns the number updated. A
    purge job may delete events only once ``retain_until`` has passed.
    """
    until = add_years(closed_at, years)
    result = db.get_collection(COLLECTION, write_concern=WriteConcern(w="majority", j=True)) \
        .update_many({"$or": [{"chain.pid": patient_id}, {"pid": patient_id}]},
                     {"$set": {"retain_until": until}})
    return result.modified_count
