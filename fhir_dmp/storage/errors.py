"""What storage raises: its own exceptions, wrapping pymongo's, so that no module outside
``fhir_dmp/storage/`` names a pymongo error (issue 19).

Contract:

* Every public method of :class:`~fhir_dmp.storage.Storage` (and every cursor, change stream or
  generator it returns) raises a :class:`StorageError` where pymongo raised a ``PyMongoError``;
  the pymongo error is its ``__cause__`` (:func:`translate` picks the subclass).
* EXCEPT inside a transaction: a call given a ``session`` that is in a transaction raises
  pymongo's error unchanged, because pymongo's ``with_transaction`` retries the whole unit only
  when it sees its own exception with the ``TransientTransactionError`` label (and
  ``Storage.run_transaction`` labels a WriteConflict so). Such errors are translated where storage
  returns to its caller: when ``Storage.run_transaction`` (or ``run_in_session``) gives up.
  ``Storage.journal_insert`` is the one exception: in a transaction it translates what is not
  transient (the journal's caller tells "retry the unit" from "the journal failed").
* :class:`VersionConflict` and :class:`DuplicateValue` are not database failures but answers
  about the data (a lost optimistic-concurrency race, a unique value taken): storage raises them
  in and out of transactions.
"""
from __future__ import annotations

import functools
import inspect
import logging

from pymongo.change_stream import ChangeStream
from pymongo.command_cursor import CommandCursor
from pymongo.cursor import Cursor
from pymongo.errors import (AutoReconnect, ConnectionFailure, DuplicateKeyError, InvalidOperation,
                            OperationFailure, PyMongoError)

TRANSIENT = "TransientTransactionError"


class DuplicateValue(Exception):
    """A unique index other than the id refused the write (e.g. one DMP per INS)."""

    def __init__(self, key_pattern: dict):
        super().__init__(f"duplicate value for {sorted(key_pattern)}")
        self.key_pattern = key_pattern


class VersionConflict(Exception):
    """The stored version is not the one the writer expected."""

    def __init__(self, current_vid: int | None):
        super().__init__(f"current version is {current_vid}")
        self.current_vid = current_vid


class StorageError(Exception):
    """The database could not run an operation, or refused it (wraps a ``PyMongoError``, its
    ``__cause__``). ``code``: the server's error code or None; ``transient``: it carried the
    ``TransientTransactionError`` label; ``timeout``: a client-side or server time limit ran out."""

    def __init__(self, cause: PyMongoError):
        super().__init__(type(cause).__name__)
        self.code = getattr(cause, "code", None)
        self.details = getattr(cause, "details", None)
        self.transient = cause.has_error_label(TRANSIENT)
        self.timeout = bool(getattr(cause, "timeout", False))


class StorageUnavailable(StorageError):
    """The database could not be reached or did not answer in time (connection lost, no server
    selected, a time limit)."""


class StorageClosed(StorageError):
    """The client was closed (pymongo ``InvalidOperation``): this process is going away."""


class DuplicateKey(StorageError):
    """A unique index refused an insert or update (pymongo ``DuplicateKeyError``); ``key_pattern``
    the index's keys when the server says."""

    def __init__(self, cause: PyMongoError):
        super().__init__(cause)
        self.key_pattern = (self.details or {}).get("keyPattern") or {}


class WriteConflict(StorageError):
    """A transaction lost a race (WriteConflict, TransientTransactionError) and its retries ran
    out: the caller may try again."""


class Outage:
    """How a background loop (the journal sealer, the outbox worker, the retention scheduler, the
    decision-context change stream) lives through a database that is away (CONTRACT.md "Faults,
    failover and backups"): it never dies of it, logs one line when an outage begins (not one per
    try; a traceback only for what is not a :class:`StorageError`, a bug) and one when it ends,
    and pauses between tries, doubling from ``first`` to ``most`` seconds, so that it is back at
    work within ``most`` seconds (plus one try) of the database's return, without a restart.

    ``failed(exc)`` -> the pause before the next try; ``ok()`` after a pass that worked.
    ``source``: what the lines say is away, and ``expected`` the exceptions that say it (a
    worker's feed from its node's change hub is not the database)."""

    def __init__(self, log: logging.Logger, what: str, *, first: float = 0.1, most: float = 1.0,
                 source: str = "database", expected: tuple[type[BaseException], ...] = ()):
        self.log, self.what, self.first, self.most, self.source = log, what, first, most, source
        self.expected = (StorageError, *expected)
        self.pause = 0.0   # 0: no outage now

    def failed(self, exc: BaseException) -> float:
        if not self.pause:
            if isinstance(exc, self.expected):
                self.log.warning("%s: %s unavailable (%s); retrying until it is back",
                                 self.what, self.source, type(exc).__name__)
            else:
                self.log.error("%s: pass failed; retrying", self.what, exc_info=exc)
        self.pause = min(self.most, self.pause * 2 or self.first)
        return self.pause

    def ok(self) -> None:
        if self.pause:
            self.log.info("%s: %s back, working again", self.what, self.source)
            self.pause = 0.0


def is_write_conflict(exc: BaseException) -> bool:
    """A transaction lost a race: a :class:`WriteConflict`, or pymongo's own error (code 112 or
    labelled ``TransientTransactionError``)."""
    if isinstance(exc, WriteConflict):
        return True
    if isinstance(exc, OperationFailure):
        labels = getattr(exc, "_error_labels", None) or set()
        return exc.code == 112 or TRANSIENT in labels
    return False


def label_transient(exc: OperationFailure) -> None:
    """A WriteConflict (112) is transient: label it so that the transaction is retried."""
    if exc.code == 112 and not exc.has_error_label(TRANSIENT):
        exc._add_error_label(TRANSIENT)


def translate(exc: PyMongoError) -> StorageError:
    """The :class:`StorageError` for a pymongo error (raise it ``from exc``)."""
    if isinstance(exc, DuplicateKeyError):
        return DuplicateKey(exc)
    if getattr(exc, "timeout", False):
        # the request's deadline (StoreCore.deadline) ran out, even while pymongo was retrying a
        # transient error (its timeout error keeps that error's labels): unavailable, not a race
        return StorageUnavailable(exc)
    if is_write_conflict(exc):
        return WriteConflict(exc)
    if isinstance(exc, InvalidOperation):
        return StorageClosed(exc)
    if isinstance(exc, (ConnectionFailure, AutoReconnect)):
        return StorageUnavailable(exc)
    return StorageError(exc)


def _in_transaction(session) -> bool:
    return session is not None and session.in_transaction


class Translated:
    """A cursor or change stream whose iteration raises :class:`StorageError` (pymongo's errors
    unchanged while ``session`` is in a transaction); anything else is the wrapped object's."""

    def __init__(self, inner, session=None):
        self._inner = inner
        self._session = session

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except PyMongoError as exc:
            if _in_transaction(self._session):
                raise
            raise translate(exc) from exc

    def __iter__(self):
        return self

    def __next__(self):
        return self._call(self._inner.__next__)

    def next(self):
        return self.__next__()

    def try_next(self):
        return self._call(self._inner.try_next)

    @property
    def alive(self) -> bool:
        return self._call(lambda: self._inner.alive)

    def close(self) -> None:
        self._call(self._inner.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getattr__(self, name):
        return getattr(self._inner, name)


def translated(fn):
    """``fn`` (a storage method) with pymongo's errors translated (module docstring): a call whose
    ``session`` keyword is in a transaction keeps them as they are."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generate(self, *args, **kwargs):
            yield from Translated(fn(self, *args, **kwargs), kwargs.get("session"))
        return generate

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            out = fn(self, *args, **kwargs)
        except PyMongoError as exc:
            if _in_transaction(kwargs.get("session")):
                raise
            raise translate(exc) from exc
        if isinstance(out, (Cursor, CommandCursor, ChangeStream)):
            return Translated(out, kwargs.get("session"))
        return out
    return call


def translate_methods(cls):
    """Class decorator: every public method that ``cls`` itself defines goes through
    :func:`translated` (a family of the storage facade)."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, translated(value))
    return cls
