"""The database connection: one ``MongoClient`` per process.

DESIGN.md ("Storage"): production is a MongoDB replica set written with
``w: majority, j: true`` and read with read concern ``majority`` (an
acknowledged write survives a primary failover; a read never returns data
that could be rolled back); the embedded SecantusDB is reached the same way.

pymongo clients must not cross ``fork()``: each server worker opens its own
(see ``fhir_dmp/runtime/server.py``).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import pymongo
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConfigurationError, PyMongoError

from .embedded_db import EmbeddedMongo

CONNECT_TIMEOUT_S = 5.0
#: how often the client checks the server when it hears nothing (pymongo's default, 10 s, would
#: leave a server marked unknown after a "not primary" for that long): CONTRACT.md "Faults" asks
#: that a database back serves again within 2 s
HEARTBEAT_MS = 1000


class DatabaseError(RuntimeError):
    """The database is unreachable or misconfigured (one line, no password)."""


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):[^@/\s]*@")


def redact_uri(uri: str) -> str:
    """``uri`` with the password replaced by ``***`` (for messages and logs)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


def _one_line(text: str, secret: str | None) -> str:
    text = " ".join(str(text).split())
    # pymongo appends timeouts and the whole topology description: keep the cause
    text = re.split(r" \(configured timeouts|, Timeout: |, Topology Description", text)[0]
    if secret:
        text = text.replace(secret, redact_uri(secret))
    return redact_uri(text)[:300]


def open_database(config, *, embedded=None, timeout: float = CONNECT_TIMEOUT_S
                  ) -> tuple[MongoClient, Database]:
    """Connect to ``embedded.uri`` if given, else ``config.mongodb_uri``.

    Options: ``w='majority'``, ``j=True``, read concern ``majority``,
    ``retryWrites``/``retryReads``, ``tz_aware=True``, a heartbeat every second. Returns
    ``(client, client[config.db_name])`` once the server answered ``ping``.
    Raises :class:`DatabaseError` (one line, password never shown) when no URI
    is known or the server does not answer within ``timeout`` seconds.
    """
    uri = embedded.uri if embedded is not None else config.mongodb_uri
    if not uri:
        raise DatabaseError("no MongoDB URI: set FHIR_DMP_MONGODB_URI or start the embedded database")
    try:
        client = MongoClient(
            uri, w="majority", journal=True, readConcernLevel="majority",
            retryWrites=True, retryReads=True, tz_aware=True, heartbeatFrequencyMS=HEARTBEAT_MS,
            appname="fhir-dmp", connect=False)
    except (ConfigurationError, ValueError, TypeError) as e:
        raise DatabaseError(f"invalid MongoDB URI {redact_uri(uri)}: {_one_line(e, uri)}") from None
    try:
        # client-side operation timeout (CSOT) for the first contact only
        with pymongo.timeout(timeout):
            client.admin.command("ping")
    except PyMongoError as e:
        client.close()
        raise DatabaseError(
            f"cannot reach MongoDB at {redact_uri(uri)} within {timeout:g}s: "
            f"{_one_line(e, uri)[:200]}") from None
    return client, client[config.db_name]


@contextmanager
def connected(config, *, log=None):
    """Context manager for one-shot commands (``load``, ``audit verify``, ``keys rotate``).

    Yields ``(config, client, db)`` where ``config.mongodb_uri`` is the URI
    actually used. With no URI configured it reuses the embedded server a
    running ``fhir-dmp serve`` keeps in ``config.data_dir``, or starts one for
    the duration of the block and stops it on exit. Raises
    :class:`DatabaseError` / ``EmbeddedDbError`` (one line) on failure.
    """
    embedded = None
    if not config.mongodb_uri:
        uri = EmbeddedMongo.find_running(config.data_dir)
        if uri is None:
            embedded = EmbeddedMongo(config.data_dir)
            uri = embedded.start()
            if log:
                log(f"started the embedded database in {embedded.data_dir}")
        config = config.with_(mongodb_uri=uri)
    try:
        client, db = open_database(config)
        try:
            yield config, client, db
        finally:
            client.close()
    finally:
        if embedded is not None:
            embedded.stop()
