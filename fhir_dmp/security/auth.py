"""Authentication: bearer token -> verified claims -> :class:`Principal`.

Contract (CONTRACT.md "Access tokens"):

* JWT signed with RS256 or ES256 only (``alg: none``, HMAC and anything else
  refused: RFC 8725 §3.1 and §3.2), key chosen by ``kid`` in the issuer's
  JWKS; ``iss`` = ``config.expected_issuer``; ``aud`` contains
  ``config.expected_audience``; ``exp`` required; ``exp``/``nbf``/``iat``
  checked with 60 s leeway (RFC 7519 §4.1).
* Failures raise :class:`Unauthorized` carrying ``WWW-Authenticate`` as in
  RFC 6750 §3: ``Bearer`` alone with no token, ``error="invalid_request"``
  for a malformed Authorization header, ``error="invalid_token"`` otherwise;
  a PS or regulation-centre token without ``acr`` eidas1 gets
  ``error="insufficient_user_authentication"`` with ``acr_values="eidas1"``
  (RFC 9470 §3). When the issuer's keys cannot be obtained at all,
  :class:`ServiceUnavailable` (503): the server cannot judge the token.
* Keys: dev mode -> the dev public key only; else ``jwks_file`` (re-read when
  it changes), ``jwks_url`` or the ``jwks_uri`` of the issuer's OpenID
  discovery document (fetched, cached, re-fetched on an unknown ``kid`` at
  most once every ``refetch_interval`` seconds, and after ``max_age``). A key
  one process has seen withdrawn leaves every process's set at once
  (:class:`SharedKeys`, through the database and the decision context cache's
  change stream: no database round trip on the request path).
* The token itself never appears in an error or a log line.

All of it is thread-safe: one ``TokenVerifier`` serves all request threads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import requests
from joserfc import jws, jwt
from joserfc.errors import (BadSignatureError, ClaimError, ExpiredTokenError, JoseError,
                            MissingClaimError)
from joserfc.jwk import Key, KeySet
from werkzeug.http import parse_list_header, parse_options_header

from ..http.errors import ServiceUnavailable, Unauthorized
from . import devkeys
from .discovery import fetch_discovery
from .principal import (ADMIN, BTG, ETREAT, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS, PURPOSE_SYSTEM,
                        REGULATION_CENTRE, TREAT, Principal)
from .scopes import Scopes

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
_KTY = {"RS256": "RSA", "ES256": "EC"}
LEEWAY = 60
JWKS_MAX_AGE = 300.0        # seconds a fetched JWKS is trusted without a new fetch
_WHITESPACE = re.compile(r"\s")
MAX_TOKEN_CHARS = 16 * 1024
REQUIRED_ACR = "eidas1"
# https://hl7.org/fhir/R4/security-labels.html / http.html: the Category header
SECURITY_SCHEME = "http://hl7.org/fhir/tag/security"
BTG_TERM = f"{PURPOSE_SYSTEM}#BTG"
_ACTREASON_SYSTEMS = (PURPOSE_SYSTEM, "urn:oid:2.16.840.1.113883.5.8")
_PURPOSES = (TREAT, BTG, ETREAT)
# fhirUser: ``Type/id``, maybe after a base URL (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)
_FHIR_USER = re.compile(r"(?:(.*)/)?([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SAFE_ALG = re.compile(r"^[A-Za-z0-9+-]{1,16}$")
_MAX_REASON = 1000


class KeysUnavailable(Exception):
    """No usable key set could be obtained from the configured source."""


# --------------------------------------------------------------------------- errors

def _quoted(text: str) -> str:
    """error_description as RFC 6750 §3 allows it (%x20-21 / %x23-5B / %x5D-7E)."""
    return "".join(c if (" " <= c <= "~" and c not in '"\\') else "'" if c == '"' else " "
                   for c in text)


def invalid_token(description: str) -> Unauthorized:
    return Unauthorized(f"Invalid access token: {description}", headers={
        "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{_quoted(description)}"'})


def _invalid_request(description: str) -> Unauthorized:
    return Unauthorized(f"Invalid authorization request: {description}", headers={
        "WWW-Authenticate": f'Bearer error="invalid_request", error_description="{_quoted(description)}"'})


def _step_up(description: str) -> Unauthorized:
    return Unauthorized(description, headers={
        "WWW-Authenticate": (f'Bearer error="insufficient_user_authentication", '
                             f'error_description="{_quoted(description)}", '
                             f'acr_values="{REQUIRED_ACR}"')})


# --------------------------------------------------------------------------- key sources

def _pick(keys: KeySet | None, kid: str | None, alg: str) -> Key | None:
    """The signing key for ``kid`` usable with ``alg`` (kty, ``use``, ``alg``
    of the JWK must agree). A token without ``kid`` is accepted only when the
    set holds a single key."""
    if not keys:
        return None
    if kid is None:
        candidates = list(keys)
        if len(candidates) != 1:
            return None
    else:
        candidates = [k for k in keys if k.kid == kid]
    for k in candidates:
        if (k.key_type == _KTY[alg] and k.get("use") in (None, "sig")
                and k.get("alg") in (None, alg)):
            return k
    return None


def _import_jwks(data) -> KeySet:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' array)")
    keys = [k for k in data["keys"] if isinstance(k, dict)]
    try:  # keys of an unknown kty are skipped (RFC 7517 §5); a broken key breaks the set
        return KeySet.import_key_set({"keys": keys})
    except JoseError:
        raise
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError("malformed JWK") from exc


def _published(keys: KeySet) -> list[list[str]]:
    """What a key set publishes, comparable across processes: sorted ``[kid, RFC 7638
    thumbprint]`` pairs (public data only; a key without ``kid`` has ``""``)."""
    return sorted([k.kid or "", k.thumbprint()] for k in keys)


class SharedKeys:
    """A key source whose view of what the issuer publishes is shared by every worker and node
    (CONTRACT.md "Access tokens": once any of them has seen that the issuer no longer publishes
    a key, every one refuses it within one second).

    ``publish`` (set by the app; None: nothing shared) records ``{"keys": pairs, "at": time of
    the load}`` (:func:`_published`: kids and thumbprints) for the other processes when this
    process loads a set that lacks a key its previous one had, or that differs from the last
    record it knows of; and when a record it is shown is older than its own load and differs
    (it knows better). The app shows every process each record (:meth:`adopt`); a record newer
    than the process's own load drops from its set every key the record does not list. A record
    never adds a key: only keys this process loaded from the issuer itself verify tokens, so the
    shared record (in the database) can withdraw a key but never make one trusted.
    Subclasses hand each set they load to :meth:`_loaded`; ``_lock`` serializes their loads
    (across a fetch), ``_swap`` only the change of ``_keys``: :meth:`adopt` (in the change
    stream's thread) never waits for the issuer.
    """

    publish: Callable[[dict], None] | None = None

    def __init__(self):
        self._lock = threading.Lock()
        self._swap = threading.Lock()
        self._keys: KeySet | None = None
        self._own: list | None = None         # the pairs of this process's last load...
        self._loaded_wall = 0.0               # ... and its time.time()
        self._shared: list | None = None      # the pairs last recorded, as far as this process knows
        self._unrecorded: dict | None = None  # a record whose publication failed, to retry
        self._recorder: threading.Thread | None = None

    def _loaded(self, keys: KeySet) -> None:
        """Take ``keys``, just loaded; record them for the others if some key went or they
        differ from the last record."""
        pairs = _published(keys)
        with self._swap:
            gone = self._own is not None and not {tuple(p) for p in self._own} <= {tuple(p) for p in pairs}
            self._keys, self._own, self._loaded_wall = keys, pairs, time.time()
            if not gone and (self._shared is None or pairs == self._shared):
                return
            self._shared, record = pairs, {"keys": pairs, "at": self._loaded_wall}
        self._record(record)

    def adopt(self, record: dict | None) -> None:
        """See a key set another process recorded (``publish``'s argument): if seen after this
        process's own last load, keys it does not list leave this process's set."""
        if not record or not isinstance(record.get("keys"), list):
            return
        with self._swap:
            self._shared = record["keys"]
            if not record.get("at", 0) > self._loaded_wall:
                if self._own is None or self._own == record["keys"]:
                    return
                self._shared, mine = self._own, {"keys": self._own, "at": self._loaded_wall}   # it knows better
            else:
                mine = None
                listed = {tuple(pair) for pair in record["keys"]}
                if self._keys is not None:
                    kept = [k for k in self._keys if (k.kid or "", k.thumbprint()) in listed]
                    if len(kept) < len(self._keys.keys):
                        self._keys = KeySet(kept)
                    if len(listed) > len(kept):
                        self._published_elsewhere()
        if mine is not None:
            self._record(mine)

    def _record(self, record: dict) -> None:
        if self.publish is None:
            return
        try:
            self.publish(record)
        except Exception as exc:   # noqa: BLE001 — this process still refuses what it no longer sees
            log.warning("cannot share the issuer's key set: %s; retrying until the database is back",
                        type(exc).__name__)
            self._record_later(record)

    def _record_later(self, record: dict) -> None:
        """Publish ``record`` (or a newer one that failed meanwhile) from a thread of its own,
        pausing up to 1 s between tries, until it is recorded: a withdrawal seen while the
        database was away reaches the other processes within about a second of its return
        (CONTRACT.md "Faults, failover and backups")."""
        with self._swap:
            self._unrecorded = record
            if self._recorder is not None and self._recorder.is_alive():
                return
            self._recorder = threading.Thread(target=self._record_until_done, name="jwks-share", daemon=True)
            self._recorder.start()

    def _record_until_done(self) -> None:
        pause = 0.1
        while True:
            time.sleep(pause)
            with self._swap:
                record, self._unrecorded = self._unrecorded, None
            if record is None:
                return
            try:
                self.publish(record)
            except Exception:   # noqa: BLE001 — the database still away: try again
                with self._swap:
                    self._unrecorded = self._unrecorded or record   # unless a newer one failed since
                pause = min(1.0, pause * 2)

    def _published_elsewhere(self) -> None:
        """The record lists keys this process lacks (it saw a newer set): a hook."""


class StaticKeys:
    """A fixed key set (dev mode)."""

    def __init__(self, keys: KeySet):
        self._keys = keys

    def lookup(self, kid: str | None, alg: str) -> Key | None:
        return _pick(self._keys, kid, alg)


class FileKeys(SharedKeys):
    """A JWKS file, re-read whenever its (mtime, size, inode) changes.

    A file that cannot be read or parsed keeps the previous key set (and is
    tried again on the next lookup). Shared with the other processes (:class:`SharedKeys`):
    a node whose copy of the file is older drops the keys the others no longer see."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = Path(path)
        self._stamp = None

    def lookup(self, kid: str | None, alg: str) -> Key | None:
        return _pick(self._current(), kid, alg)

    def _current(self) -> KeySet:
        try:
            st = os.stat(self._path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return self._keys
        with self._lock:
            if stamp is not None and stamp != self._stamp:
                try:
                    keys = _import_jwks(json.loads(self._path.read_text(encoding="utf-8")))
                except (OSError, ValueError, JoseError) as exc:
                    log.warning("cannot load JWKS file %s: %s", self._path, type(exc).__name__)
                else:
                    self._stamp = stamp
                    self._loaded(keys)
            if self._keys is None:
                raise KeysUnavailable(f"JWKS file {self._path} is missing or unreadable")
            return self._keys


class UrlKeys(SharedKeys):
    """A JWKS fetched over HTTP(S) and cached.

    ``resolve_url`` gives the JWKS URL (may itself fetch a discovery
    document). The set is fetched on first use and after ``max_age``
    seconds; a ``kid`` not in the cached set triggers a new fetch, at most
    once every ``refetch_interval`` seconds (attempts, failed or not, count).
    The server trusts exactly what the issuer publishes now: a failed fetch
    keeps the previous set only until it is ``max_age`` old (then 503), and a
    key the issuer no longer publishes is gone at the next fetch, or as soon as another process
    has seen it gone (:class:`SharedKeys`); then a ``kid`` this process lacks is fetched at once.
    """

    def __init__(self, resolve_url: Callable[[requests.Session], str], *,
                 refetch_interval: float = 5.0, max_age: float = JWKS_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic, timeout: float = 5.0):
        super().__init__()
        self._resolve_url = resolve_url
        self._interval = refetch_interval
        self._max_age = max_age
        self._clock = clock
        self._timeout = timeout
        self._session = requests.Session()
        self._attempt_at: float | None = None
        self._loaded_at: float | None = None
        self.fetches = 0  # number of JWKS fetch attempts (observability)
        self._ahead: threading.Thread | None = None

    def lookup(self, kid: str | None, alg: str) -> Key | None:
        keys = self._keys
        if keys is None or self._expired():
            keys = self._refresh()
            if self._expired():
                # never trust a set older than max_age: the issuer may have withdrawn a key
                raise KeysUnavailable("the issuer's JWKS could not be refreshed")
        elif self._clock() - self._loaded_at >= self._max_age / 2:
            self._refresh_ahead()      # half-way through its life: fetched off the request path
        key = _pick(keys, kid, alg)
        if key is None:
            keys = self._refresh()
            key = _pick(keys, kid, alg)
        return key

    def _published_elsewhere(self) -> None:
        self._attempt_at = None        # the next unknown kid is fetched without waiting

    def _expired(self) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at >= self._max_age

    def _refresh_ahead(self) -> None:
        """One background fetch at a time (JWKS work off the request path)."""
        with self._lock:
            if self._ahead is not None and self._ahead.is_alive():
                return
            self._ahead = threading.Thread(target=self._refresh_quietly, name="jwks-refresh", daemon=True)
            self._ahead.start()

    def _refresh_quietly(self) -> None:
        try:
            self._refresh()
        except KeysUnavailable:
            pass

    def _refresh(self) -> KeySet:
        with self._lock:
            now = self._clock()
            if self._attempt_at is None or now - self._attempt_at >= self._interval:
                self._attempt_at = now
                self.fetches += 1
                try:
                    url = self._resolve_url(self._session)
                    resp = self._session.get(url, timeout=self._timeout,
                                             headers={"Accept": "application/json"})
                    resp.raise_for_status()
                    keys = _import_jwks(resp.json())
                    self._loaded_at = now   # before _keys: lock-free readers rely on it
                    self._loaded(keys)
                except (requests.RequestException, ValueError, JoseError) as exc:
                    log.warning("cannot fetch the issuer JWKS: %s", type(exc).__name__)
            if self._keys is None:
                raise KeysUnavailable("the issuer's JWKS cannot be fetched")
            return self._keys


def _discovery_resolver(issuer: str, timeout: float = 5.0) -> Callable[[requests.Session], str]:
    """``jwks_uri`` from ``{issuer}/.well-known/openid-configuration``
    (OpenID Connect Discovery 1.0 §4), cached once found."""
    found: list[str] = []

    def resolve(session: requests.Session) -> str:
        if found:
            return found[0]
        doc = fetch_discovery(session, issuer, timeout)
        if not isinstance(doc.get("jwks_uri"), str):
            raise ValueError("discovery document has no jwks_uri")
        found.append(doc["jwks_uri"])
        return doc["jwks_uri"]

    return resolve


# --------------------------------------------------------------------------- verifier

class TokenVerifier:
    """Verifies access tokens and builds Principals (see module docstring).

    ``refetch_interval``, ``max_age`` and ``clock`` tune the JWKS URL cache.
    """

    CACHE_SIZE = 10_000

    def __init__(self, config, *, refetch_interval: float = 5.0, max_age: float = JWKS_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        # verified tokens by SHA-256: (kid, alg, key, claims, valid until); see verify()
        self._verified: OrderedDict[bytes, tuple] = OrderedDict()
        # Principals by (token SHA-256, break-glass headers): (the claims they come from, Principal)
        self._principals: OrderedDict[tuple, tuple] = OrderedDict()
        self._verified_lock = threading.Lock()
        self.issuer = config.expected_issuer
        self.audience = config.expected_audience
        if config.dev_mode:
            self.keys = StaticKeys(KeySet([devkeys.dev_public_key(config)]))
        elif config.jwks_file:
            self.keys = FileKeys(config.jwks_file)
        else:
            resolver = ((lambda _session: config.jwks_url) if config.jwks_url
                        else _discovery_resolver(config.issuer))
            self.keys = UrlKeys(resolver, refetch_interval=refetch_interval,
                                max_age=max_age, clock=clock)

    # -- token -> claims
    def verify(self, token: str) -> dict:
        """Verify signature and registered claims; return the claims.

        A token verified once is remembered by its SHA-256 until it expires (``exp`` + the
        leeway), as long as the issuer's key set still holds the very key that verified it
        (a rotated-out key, or a changed JWKS file, means a full verification again).
        Raises Unauthorized (invalid_token) or ServiceUnavailable (no keys)."""
        return self._verified_claims(token)[1]

    def _verified_claims(self, token: str) -> tuple[bytes, dict]:
        """:meth:`verify`, with the token's SHA-256: (digest, claims)."""
        if not isinstance(token, str) or not token.strip():
            raise invalid_token("empty token")
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid_token("token too large")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        with self._verified_lock:
            hit = self._verified.get(digest)
        if hit is not None:
            kid, alg, key, claims, until = hit
            try:
                same_key = self.keys.lookup(kid, alg) is key
            except KeysUnavailable:
                same_key = False
            if same_key and time.time() < until:
                return digest, claims
            with self._verified_lock:
                self._verified.pop(digest, None)
        claims, kid, alg, key = self._verify_fully(token)
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            with self._verified_lock:
                self._verified[digest] = (kid, alg, key, claims, exp + LEEWAY)
                while len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
        return digest, claims

    def _verify_fully(self, token: str) -> tuple[dict, str | None, str, Key]:
        try:
            header = jws.extract_compact(token.encode("utf-8")).headers()
        except (JoseError, ValueError, TypeError, KeyError, UnicodeError):
            raise invalid_token("malformed token (not a JWS compact serialization)") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            shown = alg if isinstance(alg, str) and _SAFE_ALG.match(alg) else "?"
            raise invalid_token(f"signing algorithm {shown} not accepted (RS256, ES256 only)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise invalid_token("kid must be a string")
        try:
            key = self.keys.lookup(kid, alg)
        except KeysUnavailable as exc:
            log.error("token verification impossible: %s", exc)
            raise ServiceUnavailable("The identity provider's keys are unavailable; try again later") from None
        if key is None:
            raise invalid_token("no key of the issuer matches the token's kid" if kid
                                else "token has no kid and the issuer has several keys")
        try:
            claims = jwt.decode(token, key, algorithms=[alg]).claims
        except BadSignatureError:
            raise invalid_token("signature verification failed") from None
        except (JoseError, ValueError, TypeError):
            raise invalid_token("malformed token") from None
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise invalid_token("token expired") from None
        except MissingClaimError as exc:
            raise invalid_token(f"missing claim {exc.claim}") from None
        except ClaimError as exc:
            what = {"iss": "issuer not trusted", "aud": "audience is not this server",
                    "nbf": "token not yet valid", "iat": "token issued in the future"}
            raise invalid_token(what.get(exc.claim, f"invalid claim {exc.claim}")) from None
        return claims, kid, alg, key

    # -- Authorization header -> Principal
    def authenticate(self, authorization: str | None, headers: Mapping[str, str] | None = None) -> Principal:
        """Parse ``Authorization: Bearer <token>`` (RFC 6750 §2.1), verify the
        token and build the Principal, honouring the request's break-glass
        ``Category`` and ``X-Break-Glass-Reason`` headers."""
        if authorization is None or not authorization.strip():
            raise Unauthorized("Authentication required: no access token",
                               headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise _invalid_request("the Authorization scheme must be Bearer")
        if not token or _WHITESPACE.search(token):
            raise _invalid_request("malformed Bearer credentials")
        digest, claims = self._verified_claims(token)
        # `is None`, not `or`: the truth of werkzeug's EnvironHeaders walks the whole environ
        return self._principal(digest, claims, {} if headers is None else headers)

    def _principal(self, digest: bytes, claims: dict, headers: Mapping[str, str]) -> Principal:
        """:func:`principal_from_claims`, remembered with the verified token: the same (immutable)
        Principal for the same token and break-glass headers (``Category``,
        ``X-Break-Glass-Reason``, all it reads of the request) as long as :meth:`verify` answers
        the very claims it was built from (its cache: same key, not expired); a refusal is never
        remembered."""
        key = (digest, tuple(_header_values(headers, "Category")),
               tuple(_header_values(headers, "X-Break-Glass-Reason")))
        with self._verified_lock:
            hit = self._principals.get(key)
        if hit is not None and hit[0] is claims:
            return hit[1]
        principal = principal_from_claims(claims, headers, self.config.fhir_base)
        with self._verified_lock:
            self._principals[key] = (claims, principal)
            while len(self._principals) > self.CACHE_SIZE:
                self._principals.popitem(last=False)
        return principal


# --------------------------------------------------------------------------- claims -> Principal

def principal_from_claims(claims: dict, headers: Mapping[str, str] | None = None,
                          base_url: str | None = None) -> Principal:
    """Build the Principal of verified ``claims`` (CONTRACT.md "Access tokens").

    Kind: ``dmp_role`` admin / privacy_officer / regulation_centre / legal_representative
    (another value -> 401 invalid_token); else ``SubjectNameID`` -> PS (whatever its
    ``fhirUser``); else ``fhirUser`` ``Patient/{id}`` -> PATIENT; else 401 invalid_token
    (CONTRACT.md "Who the caller is": a token that fits none of these gets 401).
    The ``fhirUser`` of a patient or a legal representative is relative or on ``base_url``
    (this server's; None: relative only), see :func:`_fhir_user`: one on another server gets 401.
    ``compartment`` from the ``patient`` claim and ``patient/`` scopes. Raises Unauthorized for
    inconsistent claims and the RFC 9470 step-up for PS / regulation centre
    without ``acr`` eidas1.
    """
    headers = {} if headers is None else headers
    role = claims.get("dmp_role")
    user = _fhir_user(claims.get("fhirUser"), base_url)     # (type, id, on this server) or None
    patient_id = user[1] if user and user[0] == "Patient" and user[2] else None
    id_nat_ps = _str(claims.get("SubjectNameID"))
    professions = _professions(claims.get("SubjectRole"))

    if role is not None:
        if role == ADMIN:
            kind = ADMIN
        elif role == PRIVACY_OFFICER:
            # CONTRACT.md "Privacy operations": never a PS, whatever else the token carries (an
            # idNatPs or a profession give it no professional right; the role wins)
            kind = PRIVACY_OFFICER
        elif role == REGULATION_CENTRE:
            kind = REGULATION_CENTRE
            if not id_nat_ps:
                raise invalid_token("a regulation_centre token needs SubjectNameID")
        elif role == LEGAL_REPRESENTATIVE:
            # CONTRACT.md "Who the caller is": the token names the RelatedPerson; the repository
            # resolves it to its patient while it is in force (resolve_legal_representative)
            kind = LEGAL_REPRESENTATIVE
            if not user or user[0] != "RelatedPerson":
                raise invalid_token("a legal_representative token needs fhirUser RelatedPerson/{id}")
            if not user[2]:
                raise invalid_token("fhirUser names a RelatedPerson of another server")
        else:
            # CONTRACT.md "Who the caller is": a role outside the habilitation data fits no kind
            raise invalid_token("dmp_role is not one this server knows")
    elif id_nat_ps:
        kind = PS            # CONTRACT.md "Who the caller is": never the patient, whatever its fhirUser
    elif user and user[0] == "Patient":
        if not user[2]:
            # CONTRACT.md "Who the caller is": a relative reference or one on this server's base URL
            raise invalid_token("fhirUser names a Patient of another server")
        kind = PATIENT
    else:
        # CONTRACT.md "Who the caller is": "A token that fits none of these gets 401"
        raise invalid_token("the token names no known kind of caller "
                            "(no dmp_role, SubjectNameID nor fhirUser Patient/{id})")

    raw_scope = claims.get("scope") if claims.get("scope") is not None else claims.get("scp")
    if raw_scope is not None and not isinstance(raw_scope, (str, list)):
        raise invalid_token("scope must be a string (or a list of strings)")
    scopes = Scopes.parse(raw_scope)

    compartment = _compartment(kind, scopes, patient_id, _str(claims.get("patient")))

    acr = _str(claims.get("acr"))
    if kind in (PS, REGULATION_CENTRE) and acr != REQUIRED_ACR:
        raise _step_up("two-factor authentication (acr eidas1) is required for health professionals")

    purpose = _purpose_from_claims(claims)
    claim_reason = _reason(claims.get("btg_reason"))
    header_reason = _reason(_header_text(headers, "X-Break-Glass-Reason"))
    if _category_requests_btg(headers):
        purpose = BTG

    name = _str(claims.get("name"))
    if not name:
        name = " ".join(p for p in (_str(claims.get("given_name")), _str(claims.get("family_name"))) if p) or None

    professional = kind in (PS, REGULATION_CENTRE)
    owner = kind in (PATIENT, LEGAL_REPRESENTATIVE)
    subject = _str(claims.get("sub")) or (id_nat_ps if professional else None) \
        or (f"Patient/{patient_id}" if kind == PATIENT else None) \
        or (_str(claims.get("fhirUser")) if owner else None) or "unknown"
    return Principal(
        kind=kind,
        subject=subject,
        scopes=scopes,
        patient_id=patient_id if owner else None,
        compartment=compartment,
        related_person=f"RelatedPerson/{user[1]}" if kind == LEGAL_REPRESENTATIVE else None,
        id_nat_ps=id_nat_ps if professional else None,
        professions=professions if professional else (),
        acr=acr,
        organization=_str(claims.get("organization")),
        purpose=purpose,
        btg_reason=header_reason or claim_reason,
        client_id=_str(claims.get("client_id")) or _str(claims.get("azp")),
        name=name,
        claims=dict(claims),
    )


def _compartment(kind: str, scopes: Scopes, owner_pid: str | None, launch_pid: str | None) -> str | None:
    """The one patient compartment ``patient/`` scopes confine the caller to (CONTRACT.md "Who the
    caller is"): the token's ``patient`` claim (SMART launch context), else the patient of a
    patient or legal representative. A ``patient`` claim that differs from the caller's own
    patient, or a professional with only ``patient/`` scopes and no ``patient`` claim: 401."""
    owner = kind in (PATIENT, LEGAL_REPRESENTATIVE)
    # a legal representative's patient is known only once its RelatedPerson is resolved
    # (security.decision.resolve_legal_representative checks the claim against it)
    if kind == PATIENT and launch_pid and launch_pid != owner_pid:
        raise invalid_token("the patient claim names another patient than fhirUser")
    contexts = scopes.contexts()
    if "patient" not in contexts or contexts - {"patient"}:
        return launch_pid if owner else None
    if launch_pid:
        return launch_pid
    if owner:
        return owner_pid
    if kind in (ADMIN, PRIVACY_OFFICER):
        return None
    raise invalid_token("patient/ scopes need the patient claim (SMART launch context)")


def _str(value) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _fhir_user(fhir_user, base_url: str | None) -> tuple[str, str, bool] | None:
    """``fhirUser`` -> ``(type, id, here)``; None when it is no ``Type/id`` reference.

    ``here``: the reference is relative (exactly ``Type/id``) or absolute on ``base_url``:
    same scheme and host (case-insensitive), same port (the scheme's default when absent) and
    the same path, a trailing slash of ``base_url`` aside (RFC 3986 §6.2.2, §6.2.3). Anything else
    (another server, another path such as ``{base}X/Patient/1``, a query, user info) is not here."""
    value = _str(fhir_user)
    m = _FHIR_USER.fullmatch(value) if value else None
    if not m:
        return None
    prefix, rtype, rid = m.groups()
    if prefix is None:
        return rtype, rid, True
    here = _base_parts(base_url.rstrip("/")) if base_url else None
    return rtype, rid, here is not None and _base_parts(prefix) == here


def _base_parts(url: str) -> tuple | None:
    """(scheme, host, port, path) of an http(s) base URL, normalized; None for anything else."""
    try:
        parts = urlsplit(url)
        scheme, port = parts.scheme.lower(), parts.port
    except ValueError:
        return None
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.query or parts.fragment
            or "@" in parts.netloc):
        return None
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], parts.path


def _professions(value) -> tuple[str, ...]:
    """SubjectRole: a list (or one string) of TRE_G15 codes, maybe ``code^oid``."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    codes = []
    for item in items:
        code = _str(item.split("^", 1)[0]) if isinstance(item, str) else None
        if code and code not in codes:
            codes.append(code)
    return tuple(codes)


def _purpose_code(value) -> str | None:
    """A purpose of use given as a code, a Coding, a CodeableConcept or a list."""
    if value is None:
        return None
    if isinstance(value, str):
        code = value.strip()
        for sep in ("#", "|"):
            if sep in code:
                system, code = code.rsplit(sep, 1)
                if system not in _ACTREASON_SYSTEMS:
                    raise invalid_token("purpose_of_use must be from v3-ActReason")
    elif isinstance(value, dict):
        if "coding" in value:
            return _purpose_code(value.get("coding"))
        system, code = value.get("system"), value.get("code")
        if system is not None and system not in _ACTREASON_SYSTEMS:
            raise invalid_token("purpose_of_use must be from v3-ActReason")
        if not isinstance(code, str):
            raise invalid_token("purpose_of_use has no code")
    elif isinstance(value, list):
        codes = {c for c in map(_purpose_code, value) if c}
        if len(codes) > 1:
            raise invalid_token("conflicting purpose_of_use values")
        return codes.pop() if codes else None
    else:
        raise invalid_token("purpose_of_use has an unexpected type")
    if code not in _PURPOSES:
        raise invalid_token("purpose_of_use must be TREAT, BTG or ETREAT")
    return code


def _purpose_from_claims(claims: dict) -> str:
    direct = _purpose_code(claims.get("purpose_of_use"))
    ext = claims.get("extensions")
    iua = ext.get("ihe_iua") if isinstance(ext, dict) else None
    via_iua = _purpose_code(iua.get("purpose_of_use")) if isinstance(iua, dict) else None
    if direct and via_iua and direct != via_iua:
        raise invalid_token("purpose_of_use and extensions.ihe_iua.purpose_of_use disagree")
    return direct or via_iua or TREAT


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    if getattr(headers, "environ", None) is not None:
        # werkzeug's EnvironHeaders: one value per name (PEP 3333: the server joins repeated
        # headers), looked up by its key; its getlist would walk the whole environ
        value = headers.get(name)
        return [value] if value else []
    getlist = getattr(headers, "getlist", None)
    if callable(getlist):
        return [v for v in getlist(name) if v]
    lname = name.lower()
    return [v for k, v in headers.items() if isinstance(k, str) and k.lower() == lname and v]


def _header_text(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    if not values:
        return None
    text = values[0]
    try:  # WSGI hands header bytes over as latin-1; clients send UTF-8
        text = text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    return text


def _reason(value) -> str | None:
    text = _str(value)
    if not text:
        return None
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:_MAX_REASON] or None


def _category_requests_btg(headers: Mapping[str, str]) -> bool:
    """True when a ``Category`` header carries the v3-ActReason BTG term in
    the FHIR security scheme (https://hl7.org/fhir/R4/security-labels.html
    "break the glass": ``Category: term; scheme="..."; label="..."``)."""
    for raw in _header_values(headers, "Category"):
        for item in parse_list_header(raw):
            term, params = parse_options_header(item)
            if term == BTG_TERM and params.get("scheme") == SECURITY_SCHEME:
                return True
    return False
