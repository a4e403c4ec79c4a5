"""The versioned resources: one collection per type, history in ``<Type>_history``.

Layout::

    {"_id": id, "pid": owning patient id, "vid": int, "lu": datetime,
     "del": bool, "res": resource JSON, "s": search index, "o": sort keys, "a": access facets}

The ``<Type>_history`` collection holds the superseded versions; the current version is read
from the current collection (its document carries ``nh: true``: "no history copy yet") and is
copied into the history by the update that supersedes it, from the document the update returns:
a create writes one document, not two. Documents written before that have their copy
already (no ``nh``); the history and vread read both.

``pid`` starts every index so a patient's record can live on one shard.
Optimistic concurrency is enforced by the database: an update matches
``{"_id": id, "vid": expected}`` and the history insert has a unique
``_id`` ``"id/vid"``, so of two racing writers with the same ``If-Match``
exactly one wins (:class:`~fhir_dmp.storage.errors.VersionConflict`). Multi-document writes run
in a transaction. Also here: a Binary's bookkeeping (its content's size and hash, its link to its
document). The guarded repository is the only caller for resource data.
"""
from __future__ import annotations

from datetime import datetime

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from .. import search
from .core import (APPEND_ONLY, RESOURCE_TYPES, StoreCore, Stored, _drop_index, _drop_indexes, _index, _taken,
                   _utc, instant, merge_filters, new_id, now, or_branches, sort_docs)
from .errors import DuplicateKey, DuplicateValue, VersionConflict, translate_methods
from .pages import PageReads


@translate_methods
class ResourceStore(PageReads):
    """CRUD, history and search on the versioned collections. The journal (the one append-only
    type) is read through its unsealed pages too (``pages.py``)."""

    def ensure_resource_indexes(self) -> None:
        """The indexes each collection's queries use, and no other: every insert pays for each one
        (bench/README.md). ``(pid, lu)`` serves the history, so it is kept on the ``*_history``
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

    def read(self, rtype: str, rid: str, *, session=None, memory: bool = True) -> Stored | None:
        """The current version of ``rid``: outside a transaction (and with ``memory``) from the DMP
        document cache when its DMP is cached (``search/doc_cache.py``, which a hot record's reads
        load: the result's ``from_memory`` is then True), a journal entry from its page or run."""
        cache = self.doc_cache if session is None and memory else None
        cached = cache.read(rtype, rid) if cache is not None else None
        if cached:
            stored = Stored.from_doc(rtype, cached)
            stored.from_memory = True
            return stored
        doc = rtype in APPEND_ONLY and self.journal_entry(rid)
        if not doc:
            doc = self.db[rtype].find_one({"_id": rid}, _without_content(rtype), session=session)
            if doc and cache is not None:
                cache.missed(rtype, doc.get("pid"))
        return Stored.from_doc(rtype, doc) if doc else None

    def read_many(self, rtype: str, ids: list[str], *, session=None) -> list[Stored]:
        if not ids:
            return []
        flt = {"_id": {"$in": list(ids)}, "del": False}
        if rtype in APPEND_ONLY:
            docs = self.journal_through(flt, [], 0, lambda: list(self.db[rtype].find(flt, session=session)))
        else:
            docs = self.db[rtype].find(flt, _without_content(rtype), session=session)
        return [Stored.from_doc(rtype, d) for d in docs]

    def vread(self, rtype: str, rid: str, vid: int, *, session=None) -> Stored | None:
        if rtype in APPEND_ONLY:
            return self.read(rtype, rid, session=session) if vid == 1 else None
        else:
            doc = self.db[f"{rtype}_history"].find_one({"_id": f"{rid}/{vid}"}, _without_content(rtype),
                                                        session=session) \
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
        since, before = _utc(since), _utc(before)     # aware: the journal's unsealed pages compare them
        if pid_filter:
            flt.update(pid_filter)
        if since or before:
            flt["lu"] = {}
            if since:
                flt["lu"]["$gte"] = since
            if before:
                flt["lu"]["$lt"] = before
        if after_key:
            lu, key = _utc(after_key[0]), after_key[1]
            if rtype in APPEND_ONLY:      # the key is "id/vid"; there the _id is the id alone
                key = key.rsplit("/", 1)[0]
            flt = {"$and": [flt, {"$or": [{"lu": {"$lt": lu}}, {"lu": lu, "_id": {"$gt": key}}]}]}
        order = [("lu", -1), ("_id", 1)]
        if rtype in APPEND_ONLY:
            docs = self.journal_through(flt, order, limit,
                                        lambda: list(coll.find(flt, session=session).sort(order).limit(limit)))
        else:
            docs = list(coll.find(flt, _without_content(rtype), session=session).sort(order).limit(limit))
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
        if rtype in APPEND_ONLY:
            return self.journal_count(flt, lambda: coll.count_documents(flt, session=session))
        # and the current versions without a copy (module docstring)
        return coll.count_documents(flt, session=session) + self.db[rtype].count_documents(
            {NO_COPY: True, **({} if rid is None else {"_id": rid}), **(pid_filter or {})}, session=session)

    def find(self, rtype: str, flt: dict, sort: list, limit: int, *, session=None) -> list[Stored]:
        return [Stored.from_doc(rtype, d) for d in self.find_docs(rtype, flt, sort, limit, session=session)]

    def find_docs(self, rtype: str, flt: dict, sort: list, limit: int, *, session=None) -> list[dict]:
        """Raw current documents (not deleted) matching ``flt``.

        A filter with top-level ``$or`` is run as one flat query per branch, merged here (see
        :func:`or_branches`): SecantusDB uses no index at all when the top level holds an
        operator, so the access guard's ``$or`` would scan the whole collection.
        Outside a transaction, a query pinned to one DMP is answered from the process's DMP
        document cache when it can be (``search/doc_cache.py``; the same documents, order and limit).
        """
        flt = merge_filters(flt, {"del": False})
        if session is None and self.doc_cache is not None:
            cached = self.doc_cache.find(rtype, flt, sort, limit)
            if cached is not None:
                return cached
        if rtype in APPEND_ONLY:
            return self.journal_through(flt, sort, limit, lambda: self._find_current(rtype, flt, sort, limit, session))
        return self._find_current(rtype, flt, sort, limit, session)

    def _find_current(self, rtype: str, flt: dict, sort: list, limit: int, session) -> list[dict]:
        """The collection's part of :meth:`find_docs` (``$or`` branches merged)."""
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
        cursor = self.db[rtype].find(flt, _without_content(rtype), session=session)
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
        if rtype in APPEND_ONLY:
            return self.journal_count(flt, lambda: self._count_current(rtype, flt, session))
        return self._count_current(rtype, flt, session)

    def _count_current(self, rtype: str, flt: dict, session) -> int:
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
        return list(self.db[rtype].find(flt, _without_content(rtype)))

    def ids_with_raw(self, rtype: str, flt: dict, projection: dict) -> list[dict]:
        """Raw projected documents (for the decision's context loading)."""
        return list(self.db[rtype].find(flt, projection))

    def blob_info(self, bid: str, *, session=None) -> dict:
        """``{size, sha1}`` of a Binary's stored content ({} when unknown)."""
        doc = self.db["Binary"].find_one({"_id": bid}, {"blob.size": 1, "blob.sha1": 1}, session=session) or {}
        return doc.get("blob") or {}

    def attach_binary(self, bid: str, pid: str, reference: str, *, session=None) -> None:
        """Point a Binary's current securityContext at its document (same DMP only)."""
        self.db["Binary"].update_one({"_id": bid, "pid": pid},
                                     {"$set": {"res.securityContext": {"reference": reference}}}, session=session)

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
            except (DuplicateKeyError, DuplicateKey) as exc:
                raise _duplicate(exc) from None
        return Stored(rtype, rid, 1, lu, pid, False, resource)

    def update(self, rtype: str, rid: str, resource: dict | None, *, pid: str | None,
               expected_vid: int, session, deleted: bool = False, extra: dict | None = None,
               pending: list | None = None) -> Stored:
        """Write version expected_vid+1 (or a delete marker when ``deleted``); the superseded
        version goes to the history (from the document the update returns, no extra read) unless
        it has its copy already (written before ``nh``). ``extra`` and ``pending`` as in
        :meth:`create` (``pending`` goes with the history insert)."""
        vid = expected_vid + 1
        lu = now()
        if resource is not None:
            resource = self.stamp(resource, rid, vid, lu)
        current = self.current_doc(rtype, rid, vid, pid, resource, deleted, lu, extra)
        if deleted:
            # keep the last content searchable by nobody; the history keeps the versions
            current["res"], current["s"], current["o"], current["a"] = None, {}, {}, {}
        change = {"$set": {k: v for k, v in current.items() if k != "_id"}}
        if rtype in CONTENT_HOLDERS and CONTENT_HOLDERS[rtype] not in current:
            change["$unset"] = _without_content(rtype)   # the superseded version's: kept in its copy
        try:
            old = self.db[rtype].find_one_and_update(
                {"_id": rid, "vid": expected_vid}, change, session=session, return_document=ReturnDocument.BEFORE,
                projection={**VERSION_FIELDS, NO_COPY: 1, **_content_of(rtype)})
        except (DuplicateKeyError, DuplicateKey) as exc:
            raise _duplicate(exc) from None
        if old is None:
            cur = self.db[rtype].find_one({"_id": rid}, {"vid": 1}, session=session)
            raise VersionConflict(cur["vid"] if cur else None)
        docs = _taken(pending)
        if old.get(NO_COPY):
            docs.append((f"{rtype}_history", _as_version(old)))
        try:
            self.insert_docs(docs, session=session)
        except (DuplicateKeyError, DuplicateKey):
            raise VersionConflict(vid) from None
        return Stored(rtype, rid, vid, lu, pid, deleted, resource)


# fields the access decision queries directly (CONTRACT.md: actor identifier, médecin traitant)
EXTRA_INDEXES = {
    "Consent": [[("a.actors", 1), ("res.status", 1)],
                [("pid", 1), ("res.status", 1)]],
    # closed_at: the retention run (lifecycle.retention_due) finds closed DMPs past retention
    "Patient": [[("a.gp", 1)], [("closed_at", 1)]],
}

#: indexes older databases have and no query needs (each costs every insert): dropped
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
#: the field beside a type's resource that may hold its encrypted content (``d`` in it; storage/
#: content.py): ``d`` is read only by ``ContentStore.inline_content``, left out of every other read
#: of the type; the field goes with its version into the history copy
CONTENT_HOLDERS = {"Binary": "blob"}


def _without_content(rtype: str) -> dict | None:
    """The projection of a read that does not want a version's content (None: the whole document)."""
    return {f"{CONTENT_HOLDERS[rtype]}.d": 0} if rtype in CONTENT_HOLDERS else None


def _content_of(rtype: str) -> dict:
    """The projection of what a version keeps beside its resource, copied to its history."""
    return {CONTENT_HOLDERS[rtype]: 1} if rtype in CONTENT_HOLDERS else {}


def _duplicate(exc: DuplicateKeyError | DuplicateKey) -> Exception:
    """VersionConflict for an id collision, DuplicateValue for another unique index."""
    pattern = (exc.details or {}).get("keyPattern") or {}
    if pattern and set(pattern) != {"_id"}:
        return DuplicateValue(pattern)
    return VersionConflict(None)


def _as_version(doc: dict) -> dict:
    """A current document shaped as its history copy (what the history and vread read)."""
    version = {"_id": f"{doc['_id']}/{doc['vid']}", "rid": doc["_id"], "pid": doc.get("pid"), "vid": doc["vid"],
               "lu": doc["lu"], "del": bool(doc.get("del")), "res": doc.get("res")}
    for holder in CONTENT_HOLDERS.values():     # the content beside its resource goes with its version
        if holder in doc:
            version[holder] = doc[holder]
    return version


def _wanted_indexes(rtype: str) -> list[list[tuple[str, int]]]:
    """The non-unique indexes of ``rtype``'s current collection: its search indexes, the extras,
    and for an append-only type (its own history) ``(pid, lu)`` and the keyset ``(lu, _id)``."""
    wanted = [list(k) for k in search.index_specs(rtype)] + EXTRA_INDEXES.get(rtype, [])
    if rtype in APPEND_ONLY:
        wanted += [[("pid", 1), ("lu", -1)], [("lu", -1), ("_id", 1)]]
    return wanted


def _one_pid_first(wanted: list[list[tuple[str, int]]]) -> list[list[tuple[str, int]]]:
    """``wanted`` with only its first ``pid``-first index (a DMP's default sort, ``-_lastUpdated``).

    What SecantusDB's planner does with a query (``secantus.storage._try_index_id_keys``): every search filter holds ``del``, which no index has, so no compound index
    covers it; the database then looks the filter up by ONE clause whose field leads an index
    (``pid`` inside a DMP, ``s.identifier.c`` for an identifier) and checks the rest document by
    document, and it walks an index in sort order only for an empty filter. So the second field of
    a ``pid``-first index is never used there, and one ``pid``-first index serves them all; each
    one more costs every insert (bench/README.md, "Indexes on the embedded database"). On MongoDB the planner uses them all (``search/indexes.py``): they stay there."""
    firsts = [keys for keys in wanted if keys[0] == ("pid", 1)]
    return [keys for keys in wanted if keys[0] != ("pid", 1) or keys is firsts[0]]
