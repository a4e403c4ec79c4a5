"""The audit journal: IHE BALP shaped AuditEvents, appended durably and
hash-chained per patient.

DESIGN.md "Audit (IHE BALP shape)". One AuditEvent per access and per patient
touched, denials and errors included. The guarded repository records an
:class:`AccessRecord` for each access as it decides, turns them into
resources with :func:`build_event` and hands them to :meth:`AuditLog.append`:
inside the write's transaction for writes, before the response leaves for
reads (``app.py`` ``after_request``); when the append fails the request fails
closed (503).

Shape: IHE Basic Audit Log Patterns (BALP), "RESTful activities"
https://profiles.ihe.net/ITI/BALP/content.html#3573-restful-activities
(type ``rest``, subtype the restful interaction, user agent + client agent,
patient entity, domain-resource entity, query entity in base64) on the FHIR R4
AuditEvent https://hl7.org/fhir/R4/auditevent.html.

Storage (issue 13: every collection is insert-mostly, SecantusDB updates being dear):

- ``AuditEvent``: the events, common layout (``_id``, ``pid``, ``vid`` = 1, ``lu``,
  ``del`` = False, ``res``, ``s``, ``o``), written once; ``s``/``o`` live beside ``res`` and are
  not hashed. A DMP's journal is kept as long as the DMP and destroyed with it (retention counts
  from the Patient's ``closed_at``: lifecycle.py).
- ``AuditEvent_queue``: per append, ``{t, items: [{e: event id, p: patient or None,
  d: content digest}]}``, in the same transaction as the events: the sealer's to-do list.
- ``AuditEvent_link``: per sealing pass and chain, a run of consecutive links::

      {_id: "<pid>:<first>", pid: <patient id or "_system">, first, last, prev: <hex>,
       links: [[event id, hash], ...]}       # event seq = first + position in ``links``
      digest = SHA-256( canonical_json(res) )          # sorted keys, no whitespace, UTF-8
      hash   = SHA-256( prev_hex_ascii + digest_hex_ascii )
      prev   = hash of seq n-1, or 64 zeros for seq 1

Append and seal are split: a request's events are written durably (group commit, or inside
the write's transaction) without touching any chain, and the single sealer of ``sealer.py``
links them in append order, removes their queue entry and moves the heads, in one
transaction. A run's ``_id`` (chain and first position) is unique: no fork. The collection
``AuditEvent_chain`` holds one head per chain (``{_id: pid, seq, hash, lu}``) so that
deleting the newest events is detected too ("head points past last event"), and the
sealer signs checkpoints of the heads with a key kept outside the database, so that
someone with write access to the database alone cannot rebuild a chain unnoticed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import orjson
from pymongo.errors import PyMongoError

from fhir_dmp.http.errors import ServiceUnavailable
from fhir_dmp.search import extract
from fhir_dmp.storage import instant
from fhir_dmp.security.principal import (ADMIN, BTG, ETREAT, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE,
                                         PATIENT, PS, PURPOSE_SYSTEM, REGULATION_CENTRE, TREAT,
                                         Principal)

log = logging.getLogger(__name__)

SYSTEM_CHAIN = "_system"
GENESIS = "0" * 64

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
        "recorded": instant(recorded),
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
    """Sorted keys, no whitespace, UTF-8 (the bytes the chain hashes): orjson, ~3 µs instead of
    ~25 µs an event (issue 13); the standard library's same bytes for what orjson refuses (an
    integer beyond 64 bits, a key that is not a string)."""
    try:
        return orjson.dumps(res, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(res, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_digest(res: dict | bytes) -> str:
    """SHA-256 of the event's canonical JSON (``res``, or those bytes already serialized):
    computed once at append time and queued with the event, so the sealer links events without
    reading them back."""
    return hashlib.sha256(res if isinstance(res, bytes) else canonical_json(res)).hexdigest()


def link_hash(prev: str, digest: str) -> str:
    """A chain link: SHA-256 of the previous link's hash and the event's content digest."""
    return hashlib.sha256(prev.encode("ascii") + digest.encode("ascii")).hexdigest()


def chain_hash(prev: str, res: dict) -> str:
    """The link of event ``res`` after ``prev`` (what the verifier recomputes)."""
    return link_hash(prev, content_digest(res))


def _search_index(res: dict) -> tuple[dict, dict]:
    """``s``/``o`` of the event (:func:`fhir_dmp.search.extract`); ``{}`` if extraction fails."""
    try:
        return extract("AuditEvent", res)
    except Exception:  # an indexing bug must not lose the journal entry
        log.exception("search index extraction failed for AuditEvent/%s", res.get("id"))
        return {}, {}


def _is_transient(exc: PyMongoError) -> bool:
    return exc.has_error_label("TransientTransactionError")


class AuditLog:
    """Append-only journal store over the ``AuditEvent`` collection (thread-safe, one per process).

    Appends are durable before they return (``w: majority, j: true``: the request fails
    closed otherwise) but they do not touch the per-patient hash chain: an event is
    stored with a queue entry and the :class:`~fhir_dmp.audit.sealer.Sealer` links it into
    its patient's chain afterwards, in append order. So reads never take a write conflict.

    - Outside a transaction (reads, denials, 401s) the events of concurrent requests are
      written together by one committer thread per process (group commit): one durable
      transaction for everything queued while the previous write was in flight; each
      caller waits for the write that carries its events (bounded by ``timeout``).
    - Inside a transaction (writes) the events are inserted with the data, in the same
      transaction: a write is never committed without its journal entry.
    """

    TIMEOUT_S = 30.0
    MAX_BATCH = 1000

    def __init__(self, storage, *, timeout: float = TIMEOUT_S):
        self.storage = storage
        self.timeout = timeout
        self._indexed = False
        self._committer: GroupCommitter | None = None
        self._lock = threading.Lock()

    # -- setup
    def ensure_indexes(self) -> None:
        """The journal's lean indexes, the unique chain position (anti-fork) and the queue."""
        if self._indexed:
            return
        try:
            self.storage.ensure_journal_indexes()
        except PyMongoError as exc:
            raise AuditUnavailable() from exc
        self._indexed = True

    # -- append
    def _prepare(self, events: list[dict]) -> tuple[list[dict], list[dict]]:
        """Each event with id, meta and the storage fields (``res`` as its canonical JSON bytes),
        and its queue item for the sealer (``e`` event id, ``p`` its patient or None, ``d`` its
        content digest)."""
        docs, items = [], []
        now = datetime.now(timezone.utc)
        for event in events:
            res = dict(event)
            res.setdefault("id", uuid.uuid4().hex)
            res["meta"] = {**(res.get("meta") or {}), "versionId": "1", "lastUpdated": instant(now)}
            s, o = _search_index(res)
            pid = event_patient(res)
            raw = canonical_json(res)   # serialized once: hashed here, stored as is (storage.pack)
            docs.append({"_id": res["id"], "pid": pid, "vid": 1, "lu": now, "del": False,
                         "res": raw, "s": s, "o": o})
            items.append({"e": res["id"], "p": pid, "d": content_digest(raw)})
        return docs, items

    def append(self, events: list[dict], *, session=None, pending: list | None = None) -> None:
        """Store ``events`` (built by :func:`build_event`) durably; the sealer chains them later.

        Returns once the events are acknowledged with ``w: majority, j: true`` (SecantusDB
        ``--sync-on-commit``). Each event gets ``id`` (unless it has one) and ``meta``
        (versionId 1, lastUpdated). With ``session`` inside a transaction the events are part
        of it (a ``TransientTransactionError`` is raised unchanged so the caller retries the
        whole unit). Raises :class:`AuditUnavailable` when the journal cannot be written.
        ``pending`` (with ``session``): the transaction's inserts not sent yet, sent with the events
        in one round trip (``Storage.journal_insert``); only inserts that cannot be refused (server
        ids, no unique index) are deferred, so a refusal there is the journal's.
        """
        if not events:
            return
        self.ensure_indexes()
        docs, items = self._prepare(events)
        if session is not None and session.in_transaction:
            try:
                self.storage.journal_insert(docs, items, session=session, pending=pending)
            except PyMongoError as exc:
                if _is_transient(exc):
                    raise
                log.error("audit append in transaction failed: %s", type(exc).__name__)
                raise AuditUnavailable() from exc
            return
        try:
            self._group().submit(docs, items).result(timeout=self.timeout)
        except AuditUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — a write error or a timeout: fail closed
            log.error("audit append failed: %s", type(exc).__name__)
            raise AuditUnavailable() from exc

    def _group(self) -> "GroupCommitter":
        with self._lock:
            if self._committer is None or not self._committer.alive:
                self._committer = GroupCommitter(self.storage.journal_insert, max_batch=self.MAX_BATCH)
            return self._committer

    def close(self) -> None:
        with self._lock:
            if self._committer is not None:
                self._committer.stop()
                self._committer = None


class GroupCommitter:
    """One thread that writes the queued documents of many callers in one durable insert.

    Started lazily (after the server's fork). Batching is natural: while one ``insert_many``
    is in flight the next callers queue up, and they are all written by the next one, so a
    lone request pays one round trip and N concurrent requests share about one.
    """

    def __init__(self, insert, *, max_batch: int = 1000):
        """``insert(docs, items)`` writes one batch and its queue items durably, atomically
        (``Storage.journal_insert``)."""
        self.insert = insert
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, docs: list[dict], items: list[dict]) -> Future:
        fut: Future = Future()
        self._queue.put(((docs, items), fut))
        return fut

    def stop(self) -> None:
        self._stop = True
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, size = [item], len(item[0][0])
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop = True
                    break
                batch.append(nxt)
                size += len(nxt[0][0])
            self._write(batch)
            if self._stop:
                return

    def _write(self, batch: list) -> None:
        docs = [d for (part, _items), _ in batch for d in part]
        items = [i for (_docs, part), _ in batch for i in part]
        try:
            self.insert(docs, items)
        except Exception as exc:  # noqa: BLE001 — every waiter of this batch fails closed
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for _, fut in batch:
            fut.set_result(None)


# --- verification -------------------------------------------------------------

def verify_chains(storage, patient_id: str | None = None, *, unsealed_bound_s: float = 60.0,
                  check_signatures: bool = False, public_key=None) -> list[str]:
    """Check every sealed chain (or one patient's): the problems found, [] when intact.

    Per chain, in seq order, first broken link first: ``patient X: missing
    seq 7``, ``patient X: event seq 12 (AuditEvent/abc) hash mismatch``,
    ``... prev does not match seq 11``, ``... pid field does not match its
    chain``, ``patient X: head points past last event``, ``... head hash
    does not match event seq n``. A head behind the newest event is not a
    problem (a crash between the event write and the head write).

    Events still unsealed are fine while young; ``N AuditEvent(s) left unsealed for more than
    S s`` once older than ``unsealed_bound_s`` (the sealer is not running or is stuck).
    With ``check_signatures`` the signed checkpoints (``sealer.py``) are checked with
    ``public_key`` (an Ed25519 public key, None = not configured): signatures, their chain,
    every chain's newest signed head against the stored event (a rebuilt chain), and sealed
    events that no checkpoint covers (deleted checkpoints).
    """
    problems: list[str] = []
    last: dict[str, tuple[int, str]] = {}
    signed: dict[str, tuple[int, str]] = {}
    if check_signatures:
        from .sealer import verify_checkpoints
        problems, signed = verify_checkpoints(storage, public_key, patient_id)

    cutoff = datetime.now(timezone.utc) - timedelta(seconds=unsealed_bound_s)
    stale = storage.count_unsealed_before(cutoff, patient_id)
    if stale:
        problems.append(f"{stale} AuditEvent(s) left unsealed for more than {unsealed_bound_s:g} s")
    orphans = storage.count_unchained(patient_id)
    if orphans:
        problems.append(f"{orphans} AuditEvent(s) without a chain position")

    pid = None
    expected, prev_hash = 1, GENESIS
    for doc in storage.sealed_events(patient_id):
        chain = doc["chain"]
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
        if check_signatures and pid in signed and signed[pid][0] == seq and signed[pid][1] != chain.get("hash"):
            problems.append(f"{where}: event seq {seq} ({ref}) does not match the signed checkpoint "
                            "(the chain was rebuilt)")
        expected, prev_hash = seq + 1, chain.get("hash")
        last[pid] = (seq, chain.get("hash"))

    if check_signatures:
        for cpid, (seq, _h) in sorted(last.items()):
            signed_seq = signed.get(cpid, (0, ""))[0]
            if seq > signed_seq:
                problems.append(f"patient {cpid}: seq {signed_seq + 1}-{seq} not covered by a signed checkpoint")
            elif signed_seq > seq:
                problems.append(f"patient {cpid}: a signed checkpoint has seq {signed_seq} "
                                f"but the chain ends at {seq}")
        destroyed = storage.destroyed_chains()
        for cpid, (signed_seq, _h) in sorted(signed.items()):
            if cpid not in last and cpid not in destroyed:
                problems.append(f"patient {cpid}: a signed checkpoint has seq {signed_seq} "
                                "but the chain has no event")

    for head in storage.chain_heads(patient_id):
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
