"""Storage: every collection, and every query, of the server (issue 19's ``fhir_dmp/storage/``).

:class:`Storage` is the one object callers hold; it is made of one class per family of
collections, each in its own module, whose docstring names the collections it owns and its
contract:

==================  ==================================================================
``core.py``         client, sessions, transactions, SecantusDB options, codecs, the
                    collection names, pack/unpack, filter helpers (:class:`StoreCore`)
``resources.py``    the versioned resources and their history (:class:`ResourceStore`)
``journal.py``      the audit journal: pages, entries, links, heads, checkpoints, sealer lease
``pages.py``        the journal's unsealed pages, and the reads of the journal through them
``content.py``      encrypted blobs and chunks (:class:`BlobStore`), data keys
``outbox.py``       the notification outbox
``grants.py``       the decision's inputs, break-the-glass grants, access codes, key sets
``lifecycle.py``    closed/reopened stamps, the purge of a DMP, daily job leases
``review.py``       the keys of the privacy review cases (one case per key)
``privacy.py``      what the misuse scan reads (journal window, records' facts), its collection
``backup.py``       every collection copied to files from one snapshot, and restored
``filters.py``      the storage filter language evaluated in memory
``errors.py``       what storage raises (pymongo's errors wrapped)
==================  ==================================================================

A new collection: a module here (or the family it belongs to), its class added to
:class:`Storage`, its name in ``core.py`` and, if a DMP's data lives in it, a step in
:meth:`LifecycleStore.purge_dmp`.
"""
from __future__ import annotations

from .backup import BackupRefused, BackupStore, check_backup
from .content import ContentStore
from .core import (RESOURCE_TYPES, Stored, instant, merge_filters, new_id, now, or_branches, pack, sort_docs,
                   unpack)
from .errors import (DuplicateKey, DuplicateValue, StorageClosed, StorageError, StorageUnavailable,
                     VersionConflict, WriteConflict, is_write_conflict)
from .grants import GrantStore
from .journal import JournalStore
from .lifecycle import LifecycleStore
from .outbox import OutboxStore
from .privacy import PrivacyStore
from .resources import UNIQUE_INDEXES, ResourceStore
from .review import ReviewStore

__all__ = ["RESOURCE_TYPES", "UNIQUE_INDEXES", "BackupRefused", "check_backup", "DuplicateKey", "DuplicateValue", "Storage", "StorageClosed",
           "StorageError", "StorageUnavailable", "Stored", "VersionConflict", "WriteConflict", "instant",
           "is_write_conflict", "merge_filters", "new_id", "now", "or_branches", "pack", "sort_docs", "unpack"]


class Storage(ResourceStore, JournalStore, ContentStore, OutboxStore, GrantStore, LifecycleStore, BackupStore,
              ReviewStore, PrivacyStore):
    """The database, as the server uses it: every family's queries on one client and database
    (``StoreCore.__init__``: ``Storage(client, db, annotate=...)``)."""

    def ensure_indexes(self) -> None:
        """The indexes of the resources (``ResourceStore.ensure_resource_indexes``) and of the
        grants. The journal's, the outbox's and the content's are made by their users
        (``ensure_journal_indexes``, ``ensure_outbox_indexes``, ``ensure_blob_indexes``)."""
        self.ensure_resource_indexes()
        self.ensure_grant_indexes()
        self.ensure_review_indexes()

    def ensure_all_indexes(self) -> None:
        """Every index of every family (a restored database: ``fhir-dmp restore``)."""
        self.ensure_indexes()
        self.ensure_journal_indexes()
        self.ensure_outbox_indexes()
        self.ensure_blob_indexes()
