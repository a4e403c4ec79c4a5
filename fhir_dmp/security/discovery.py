"""The issuer's OpenID Connect discovery document (OpenID Connect Discovery 1.0 §4).

:func:`fetch_discovery` gets and checks ``{issuer}/.well-known/openid-configuration``
with the same HTTP client (requests) the JWKS cache uses; :class:`IssuerMetadata`
keeps it in the process (an hour when found, half a minute after a failure) so
that ``/.well-known/smart-configuration`` and the CapabilityStatement can tell
the issuer's real endpoints without a round trip per request.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import requests

log = logging.getLogger(__name__)

WELL_KNOWN = "/.well-known/openid-configuration"


def fetch_discovery(session: requests.Session, issuer: str, timeout: float = 5.0) -> dict:
    """The issuer's discovery document; ``ValueError`` when it is not one for ``issuer``."""
    resp = session.get(issuer.rstrip("/") + WELL_KNOWN, timeout=timeout,
                       headers={"Accept": "application/json"})
    resp.raise_for_status()
    doc = resp.json()
    if not isinstance(doc, dict):
        raise ValueError("discovery document is not a JSON object")
    # §4.3: the issuer in the document must be the one asked for
    if str(doc.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise ValueError("discovery document issuer mismatch")
    return doc


class IssuerMetadata:
    """The configured issuer's discovery document, cached; ``{}`` while it cannot be had."""

    def __init__(self, issuer: str, *, max_age: float = 3600.0, retry_after: float = 30.0,
                 timeout: float = 3.0, clock: Callable[[], float] = time.monotonic):
        self.issuer = issuer
        self._max_age, self._retry_after, self._timeout = max_age, retry_after, timeout
        self._clock = clock
        self._session = requests.Session()
        self._lock = threading.Lock()
        self._doc: dict = {}
        self._next_fetch = 0.0

    def document(self) -> dict:
        with self._lock:
            now = self._clock()
            if now >= self._next_fetch:
                try:
                    self._doc = fetch_discovery(self._session, self.issuer, self._timeout)
                    self._next_fetch = now + self._max_age
                except (requests.RequestException, ValueError) as exc:
                    log.warning("cannot fetch the issuer's discovery document: %s", type(exc).__name__)
                    self._next_fetch = now + self._retry_after     # keep what we had
            return self._doc
