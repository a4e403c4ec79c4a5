"""The application-wide services a guarded repository uses (built once by create_app)."""
from __future__ import annotations


class Backend:
    """Application-wide services the repository uses (built once by create_app)."""

    def __init__(self, config, storage, policy, audit_log, outbox=None, blobs=None, crypto=None):
        self.config = config
        self.storage = storage
        self.policy = policy
        self.audit_log = audit_log
        self.outbox = outbox
        self.blobs = blobs
        self.crypto = crypto
