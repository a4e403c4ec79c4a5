"""The feed of database changes that keeps a process's caches honest, from one of two sources.

The decision context cache (``context_cache.py``) and its followers drop an entry as soon as the
database says that entry's patient changed. What says it is a *feed*: a sequence of changes, each
reduced to what the caches need (:func:`reduce`: collection, operation, patient id), that is
*live* from the moment it opened until it ends. Two sources give one:

* :class:`StreamFeed`: the process's own MongoDB change stream (``Storage.watch_decision_inputs``):
  the WSGI app in one process, tests, bench scripts, and the node's change hub itself;
* :class:`HubFeed`: under ``fhir-dmp serve``, the node's change hub (``runtime/change_hub.py``), one
  change stream per node whose changes are fanned out to every worker over a Unix domain socket
  (issue 22: the database scans each oplog entry once per stream, not once per worker).

:func:`follow` runs either feed with the one fault semantics (CONTRACT.md "Faults, failover and
backups"): nothing is served from a cache while its feed is not live, and any loss of the feed
drops the caches.

The hub's wire format: one JSON object per line (:func:`encode`): ``{"live": true}`` when its
stream opened (or when a worker connects while it is open), ``{"live": false}`` when it lost it
(a gap), a change ``{"coll", "op", "pid"}``, and ``{}`` (a beat: its stream still answers) at least
every :data:`BEAT_S` while nothing else is said.
"""
from __future__ import annotations

import json
import socket
from contextlib import closing
import threading
import time

from ..storage.errors import StorageClosed

# after a batch of the own stream (empty: the database woke the getMore for a write it then
# filtered out, the journal mostly; or not: a write it watches, e.g. each deposit's
# DocumentReference) wait this long before the next one: ~20 getMores/s per stream instead of
# one per write, each reading every oplog entry written since the last, a bounded delay well
# inside the 1 s invalidation promise
POLL_PAUSE_S = 0.05
#: the hub says something (a beat at least) this often while its stream answers
BEAT_S = 0.2
#: a worker that hears nothing from its hub this long takes the feed for lost (a hub frozen, or
#: its stream stuck): not live, caches dropped, connect again; within the second of the
#: invalidation promise, since the worker goes on serving while its hub is stuck
SILENCE_S = 0.8
#: how long a worker's connection waits at once for the hub's "live" (then looks at its stop flag)
WAIT_S = 0.5

LIVE, GAP, BEAT = {"live": True}, {"live": False}, {}


class FeedLost(Exception):
    """The node's change hub cannot be reached, hung up or fell silent: its feed is lost."""


class FeedStopped(Exception):
    """The feed was asked to stop while it waited for its source."""


def reduce(change: dict) -> dict:
    """A change stream event as the caches use it: ``coll``, ``op`` (``operationType``) and ``pid``
    (the patient: a Patient's ``_id``, else the document's ``pid``; None when unknown, which
    drops everything)."""
    coll = (change.get("ns") or {}).get("coll")
    if coll == "Patient":
        pid = (change.get("documentKey") or {}).get("_id")
    else:
        pid = (change.get("fullDocument") or {}).get("pid")
    return {"coll": coll, "op": change.get("operationType"), "pid": pid if isinstance(pid, str) else None}


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _buffered(stream) -> bool:
    """True while the stream holds changes it has fetched and not yet returned (pymongo's command
    cursor buffer; the cursor is replaced on a resume), or where this pymongo keeps them elsewhere
    (then no pause after a change: the previous pace)."""
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    return data is None or len(data) > 0


class StreamFeed:
    """A change stream of this process on the decision's inputs and ``also``, opened within
    ``FHIR_DMP_DB_WAIT`` (``StoreCore.deadline``), paced by :data:`POLL_PAUSE_S`."""

    def __init__(self, stream):
        self._stream = stream
        self._pause = False

    @classmethod
    def open(cls, storage, also: tuple = ()) -> "StreamFeed":
        with storage.deadline():
            return cls(storage.watch_decision_inputs(also=also))

    @property
    def alive(self) -> bool:
        return self._stream.alive

    def next(self, stop: threading.Event) -> dict | None:
        """The next change (reduced), or None when the database had none (one getMore)."""
        if self._pause:        # no change, or the last one of a batch: pause before the next getMore
            stop.wait(POLL_PAUSE_S)
        change = self._stream.try_next()
        self._pause = change is None or not _buffered(self._stream)
        return reduce(change) if change is not None else None

    def close(self) -> None:
        self._stream.close()


class HubFeed:
    """This worker's feed from its node's change hub (the Unix socket at ``path``): opened once the
    hub says its stream is live; it ends on the hub's gap, and is lost (:class:`FeedLost`) when the
    connection breaks or the hub says nothing for :data:`SILENCE_S`."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray()
        self.alive = True

    @classmethod
    def open(cls, path: str, stop: threading.Event) -> "HubFeed":
        """Connect and wait (as long as it takes, until ``stop``) for the hub's "live"."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        feed = cls(sock)
        try:
            try:
                sock.settimeout(WAIT_S)
                sock.connect(path)
            except OSError as exc:
                raise FeedLost(f"change hub: {exc.strerror or exc}") from exc
            while not stop.is_set():
                if feed._read(WAIT_S) == LIVE:
                    return feed
            raise FeedStopped
        except BaseException:
            sock.close()
            raise

    def next(self, stop: threading.Event) -> dict | None:
        """The next change, or None (a beat; or the hub's gap: then the feed is no longer alive)."""
        message = self._read(SILENCE_S, silent_is_lost=True)
        if message == GAP:
            self.alive = False
            return None
        return message if "coll" in message else None

    def _read(self, timeout: float, silent_is_lost: bool = False) -> dict | None:
        """One message; None when none came within ``timeout`` (lost if ``silent_is_lost``)."""
        deadline = time.monotonic() + timeout
        while (end := self._buffer.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                if silent_is_lost:
                    raise FeedLost(f"change hub silent for {timeout:g} s") from None
                return None
            except OSError as exc:
                raise FeedLost(f"change hub: {exc.strerror or exc}") from exc
            if not chunk:
                raise FeedLost("change hub hung up")
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return json.loads(line)

    def close(self) -> None:
        self._sock.close()


def follow(open_feed, *, stop: threading.Event, outage, on_live, on_change, on_gap, on_pass=None) -> None:
    """Run feeds until ``stop``: ``open_feed()`` -> a feed (``alive``, ``next(stop)``, ``close()``);
    ``on_live()`` once it is open (an exception there closes it), ``on_change(change)`` for each
    change, ``on_pass()`` (if given) after each read that went through, ``on_gap()`` whenever it
    is lost or ends.

    Faults (CONTRACT.md "Faults, failover and backups"): on a resumable error (a dropped
    connection, a primary stepping down) pymongo resumes a change stream once from its resume
    token, nothing missed, the caches kept. Any other loss (the resume failed, a resume token the
    server no longer knows, ChangeStreamHistoryLost, an invalidate, a timeout; for a worker, its
    hub's gap, its hub gone or silent) is a gap: ``on_gap`` (the caches are dropped and off), and
    the feed is opened afresh, short pauses between tries (``outage``, a
    :class:`~fhir_dmp.storage.errors.Outage`), until it is back; only then (``on_live``) is
    anything cached again, so no decision is ever taken on what was cached before the gap.
    """
    while not stop.is_set():
        try:
            with closing(open_feed()) as feed:
                on_live()
                while not stop.is_set() and feed.alive:
                    change = feed.next(stop)
                    outage.ok()      # a read went through: back (said once)
                    if change is not None:
                        on_change(change)
                    if on_pass is not None:
                        on_pass()
            pause = outage.first   # ended by its source (an invalidate, the hub's gap): reopen
        except (StorageClosed, FeedStopped):   # the client was closed, or stopping: going away
            on_gap()
            return
        except Exception as exc:   # noqa: BLE001 — never serve from a cache nobody invalidates
            pause = outage.failed(exc)
        on_gap()
        stop.wait(pause)
