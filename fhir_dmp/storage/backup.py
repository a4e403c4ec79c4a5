"""Backup and restore of the whole database (CONTRACT.md "Faults, failover and backups").

Contract: :meth:`BackupStore.backup_to` copies every collection of the database (resources,
history, the journal and its checkpoints, wrapped data keys, outbox, grants, leases: whatever is
there) into a directory, one file of raw BSON per collection (``<name>.bson``: the documents
as ``bson.encode`` wrote them, back to back, as ``mongodump`` does), and writes
``manifest.json`` last: the collections, their document counts, the SHA-256 of each file, the
time and the server version. The copy is consistent: every collection is read in ONE transaction
at read concern ``snapshot`` (SecantusDB and MongoDB serve it; a snapshot *session*,
``start_session(snapshot=True)``, is accepted by SecantusDB but does not hold its reads to one
point in time), so it is the database as one instant saw it while the server goes on serving.
A collection created after the listing (none is: the server creates its collections at start)
would be missing. The key-encryption key never is in the database, so never in a backup.

:func:`check_backup` reads a backup's manifest and checks every file against its checksum and
count before anything is written; :meth:`BackupStore.restore_from` loads a checked backup into an
empty database (it refuses one that holds any document) byte for byte. Refusals raise
:class:`BackupRefused`, whose message is one line.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.read_concern import ReadConcern

from .core import StoreCore
from .errors import translate_methods

MANIFEST = "manifest.json"
FORMAT = "fhir-dmp-backup/1"
RAW = CodecOptions(document_class=RawBSONDocument)
BATCH = 1000


class BackupRefused(Exception):
    """A backup that cannot be taken or restored here (one line: what and why)."""


def _collections(db) -> list[str]:
    return sorted(n for n in db.list_collection_names() if not n.startswith("system."))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_backup(directory: Path) -> dict:
    """The manifest of the backup in ``directory``, once every file it names has its SHA-256
    and document count; raises :class:`BackupRefused` on a missing or damaged file."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupRefused(f"no backup in {directory}: {MANIFEST} is missing") from None
    except ValueError:
        raise BackupRefused(f"damaged backup: {directory / MANIFEST} is not JSON") from None
    if manifest.get("format") != FORMAT:
        raise BackupRefused(f"not a fhir-dmp backup: {directory / MANIFEST} has format {manifest.get('format')!r}")
    for name, entry in manifest["collections"].items():
        path = directory / entry["file"]
        if not path.is_file():
            raise BackupRefused(f"damaged backup: {path} is missing")
        if _sha256(path) != entry["sha256"]:
            raise BackupRefused(f"damaged backup: {path} does not match its SHA-256 in the manifest")
        with open(path, "rb") as f:
            count = sum(1 for _ in bson.decode_file_iter(f, codec_options=RAW))
        if count != entry["count"]:
            raise BackupRefused(f"damaged backup: {path} holds {count} documents, the manifest says {entry['count']}")
    return manifest


@translate_methods
class BackupStore(StoreCore):
    """The database copied to and from files (module docstring)."""

    def backup_to(self, directory: Path, *, server_version: str) -> dict:
        """Copy every collection into ``directory`` (new or empty) from one snapshot; returns the manifest."""
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise BackupRefused(f"{directory} is not empty: a backup goes into a new or empty directory")
        names = _collections(self.db)
        started = datetime.now(timezone.utc)
        collections = {}
        with self.client.start_session(causal_consistency=False) as session:
            with session.start_transaction(read_concern=ReadConcern("snapshot")):
                for name in names:
                    path = directory / f"{name}.bson"
                    digest, count = hashlib.sha256(), 0
                    with open(path, "wb") as out:
                        for doc in self.db.get_collection(name, codec_options=RAW).find({}, session=session):
                            out.write(doc.raw)
                            digest.update(doc.raw)
                            count += 1
                    collections[name] = {"file": path.name, "count": count, "sha256": digest.hexdigest()}
        manifest = {"format": FORMAT, "database": self.db.name,
                    "time": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "server_version": server_version, "collections": collections}
        # written last: a directory without a manifest is no backup
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest

    def is_empty(self) -> str | None:
        """None when no collection holds a document, else the name of one that does."""
        return next((n for n in _collections(self.db) if self.db[n].find_one({}, {"_id": 1}) is not None), None)

    def restore_from(self, directory: Path) -> dict:
        """Load the backup in ``directory`` into this database, which must be empty, after
        :func:`check_backup`; returns its manifest. The caller recreates the indexes."""
        manifest = check_backup(directory)
        holder = self.is_empty()
        if holder is not None:
            raise BackupRefused(f"database {self.db.name} is not empty ({holder} holds documents): "
                                "restore loads into an empty database only")
        for name, entry in manifest["collections"].items():
            coll = self.db.get_collection(name, codec_options=RAW)
            if name not in self.db.list_collection_names(filter={"name": name}):
                self.db.create_collection(name)
            batch = []
            with open(directory / entry["file"], "rb") as f:
                for doc in bson.decode_file_iter(f, codec_options=RAW):
                    batch.append(doc)
                    if len(batch) >= BATCH:
                        coll.insert_many(batch, ordered=True)
                        batch = []
            if batch:
                coll.insert_many(batch, ordered=True)
        return manifest
