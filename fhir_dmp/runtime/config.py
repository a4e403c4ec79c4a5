"""Configuration: the only module that reads the environment.

``Config.from_env()`` reads the ``FHIR_DMP_*`` variables of CONTRACT.md
("Configuration") once; everything else receives the resulting object.
Tests build a ``Config`` directly with keyword arguments.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


PACKAGE_DATA = Path(__file__).parent.parent / "data"
FIRST_ACCESS_MODES = ("attestation", "patient-code")


class ConfigError(ValueError):
    """A configuration value is unusable (one-line message, no secret in it)."""


def _int(env: dict, name: str, default: int, *, zero_ok: bool = False) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0 or value == 0 and not zero_ok:
        raise ConfigError(f"{name} must be {'zero or more' if zero_ok else 'positive'}")
    return value


def _networks(values) -> tuple:
    """``FHIR_DMP_TRUSTED_PROXIES``: addresses or CIDRs (comma-separated string or a sequence) as
    :mod:`ipaddress` networks."""
    if isinstance(values, str):
        values = values.split(",")
    out = []
    for value in values:
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(value)
        elif str(value).strip():
            try:
                out.append(ipaddress.ip_network(str(value).strip(), strict=False))
            except ValueError:
                raise ConfigError(f"FHIR_DMP_TRUSTED_PROXIES: not an address or CIDR: {value!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class Config:
    """Everything the server needs to know, read in one place.

    ``mongodb_uri`` None means: start the embedded SecantusDB in ``data_dir``.
    ``issuer`` None means dev mode (a local signing key in ``data_dir``).
    """

    mongodb_uri: str | None = None
    db_name: str = "fhir_dmp"
    data_dir: Path = Path(".fhir-dmp")
    host: str = "127.0.0.1"
    port: int = 8080
    base_url: str | None = None
    issuer: str | None = None
    jwks_url: str | None = None
    jwks_file: Path | None = None
    audience: str | None = None
    kek_file: Path | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "Mon espace sante <ne-pas-repondre@dmp.localhost>"
    sms_webhook_url: str | None = None
    break_glass_ttl: int = 14400
    max_attachment_bytes: int = 20 * 1024 * 1024
    habilitations_file: Path = PACKAGE_DATA / "habilitations.csv"
    max_page_size: int = 1000
    default_page_size: int = 50
    notifications_worker: bool = True
    # OIDC client of the patient portal at the issuer (CONTRACT.md "The patient portal")
    portal_client_id: str | None = None
    portal_client_secret: str | None = None
    # origins allowed to call the FHIR API from a browser (CORS); "*" = any (bearer tokens, no cookies)
    cors_origins: tuple[str, ...] = ("*",)
    # CONTRACT.md "Lifecycle of a DMP": years a closed DMP is kept; how a PS's first access is granted
    retention_years: int = 10
    first_access: str = "attestation"
    # CONTRACT.md "Privacy operations": anomaly review cases opened per day at most; the hourly
    # misuse scan in the background (review/schedule.py)
    review_budget: int = 20
    privacy_scan: bool = True
    # the journal: the background sealer, its signing key, the unsealed bound
    audit_sealer: bool = True
    audit_key_file: Path | None = None
    # the register of destroyed DMP ids, outside the database (restore re-applies it; guard/lifecycle.py)
    destroyed_register_file: Path | None = None
    audit_seal_bound: int = 60
    # decision context cached per process, invalidated by the change stream
    context_cache: bool = True
    # under `fhir-dmp serve`: the Unix socket of the node's change hub (runtime/change_hub.py), set by
    # the master for its workers (their caches' feed); None: each process opens its own change stream
    change_hub: str | None = None
    # documents of recently searched DMPs cached per process (search/doc_cache.py; needs context_cache,
    # whose change stream invalidates it): at most this many documents, 0 = off
    document_cache_docs: int = 10_000
    # CONTRACT.md "Faults": seconds a request waits for an unavailable database before its 503
    db_wait: int = 10
    # reverse proxies whose X-Forwarded-For names the client (addresses or CIDRs; empty: the TCP peer)
    trusted_proxies: tuple = ()
    threads: int = 0                 # Python threads per server worker; 0 = server.default_threads()
    # the largest JSON/XML request body; Binary uploads are bounded by max_attachment_bytes
    max_body_bytes: int = field(default=0)

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.first_access not in FIRST_ACCESS_MODES:
            raise ConfigError(f"FHIR_DMP_FIRST_ACCESS must be one of {', '.join(FIRST_ACCESS_MODES)}")
        object.__setattr__(self, "trusted_proxies", _networks(self.trusted_proxies))
        if not self.max_body_bytes:
            # base64 grows content by 4/3; leave room for the metadata around it
            object.__setattr__(self, "max_body_bytes", self.max_attachment_bytes * 4 // 3 + 1024 * 1024)

    @property
    def dev_mode(self) -> bool:
        return self.issuer is None

    @property
    def fhir_base(self) -> str:
        """Public base URL of the FHIR endpoint, without trailing slash."""
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.host}:{self.port}/fhir"

    @property
    def public_origin(self) -> str:
        """Scheme, host and port of the public base URL (the portal's redirect URIs start with it)."""
        from urllib.parse import urlsplit
        parts = urlsplit(self.fhir_base)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def expected_audience(self) -> str:
        return self.audience or self.fhir_base

    @property
    def expected_issuer(self) -> str:
        """The ``iss`` accepted: the configured issuer, or the dev issuer."""
        return self.issuer or "urn:fhir-dmp:dev"

    @property
    def kek_path(self) -> Path:
        return Path(self.kek_file) if self.kek_file else self.data_dir / "kek.key"

    @property
    def audit_key_path(self) -> Path:
        """Ed25519 key signing the journal checkpoints: outside the database by design."""
        return Path(self.audit_key_file) if self.audit_key_file else self.data_dir / "audit-signing-key.pem"

    @property
    def destroyed_register_path(self) -> Path:
        """One line per destroyed DMP (time, Patient id): kept apart from the database and its backups."""
        return Path(self.destroyed_register_file) if self.destroyed_register_file else self.data_dir / "destroyed.log"

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir / "dev-signing-key.json"

    def with_(self, **changes) -> "Config":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Config":
        """Read ``FHIR_DMP_*`` from ``env`` (default ``os.environ``)."""
        env = dict(os.environ if env is None else env)
        values = dict(
            mongodb_uri=env.get("FHIR_DMP_MONGODB_URI") or None,
            db_name=env.get("FHIR_DMP_DB") or "fhir_dmp",
            data_dir=Path(env.get("FHIR_DMP_DATA_DIR") or ".fhir-dmp"),
            base_url=env.get("FHIR_DMP_BASE_URL") or None,
            issuer=env.get("FHIR_DMP_ISSUER") or None,
            jwks_url=env.get("FHIR_DMP_JWKS_URL") or None,
            jwks_file=Path(env["FHIR_DMP_JWKS_FILE"]) if env.get("FHIR_DMP_JWKS_FILE") else None,
            audience=env.get("FHIR_DMP_AUDIENCE") or None,
            kek_file=Path(env["FHIR_DMP_KEK_FILE"]) if env.get("FHIR_DMP_KEK_FILE") else None,
            smtp_host=env.get("FHIR_DMP_SMTP_HOST") or None,
            smtp_port=_int(env, "FHIR_DMP_SMTP_PORT", 25),
            sms_webhook_url=env.get("FHIR_DMP_SMS_WEBHOOK_URL") or None,
            break_glass_ttl=_int(env, "FHIR_DMP_BREAK_GLASS_TTL", 14400),
            max_attachment_bytes=_int(env, "FHIR_DMP_MAX_ATTACHMENT_BYTES", 20 * 1024 * 1024),
            portal_client_id=env.get("FHIR_DMP_PORTAL_CLIENT_ID") or None,
            portal_client_secret=env.get("FHIR_DMP_PORTAL_CLIENT_SECRET") or None,
            retention_years=_int(env, "FHIR_DMP_RETENTION_YEARS", 10),
            first_access=(env.get("FHIR_DMP_FIRST_ACCESS") or "attestation").strip(),
            audit_key_file=Path(env["FHIR_DMP_AUDIT_KEY_FILE"]) if env.get("FHIR_DMP_AUDIT_KEY_FILE") else None,
            destroyed_register_file=(Path(env["FHIR_DMP_DESTROYED_REGISTER"])
                                     if env.get("FHIR_DMP_DESTROYED_REGISTER") else None),
            audit_seal_bound=_int(env, "FHIR_DMP_AUDIT_SEAL_BOUND", 60),
            threads=_int(env, "FHIR_DMP_THREADS", 0) if env.get("FHIR_DMP_THREADS") else 0,
            document_cache_docs=_int(env, "FHIR_DMP_DOCUMENT_CACHE_DOCS", 10_000, zero_ok=True),
            db_wait=_int(env, "FHIR_DMP_DB_WAIT", 10),
            review_budget=_int(env, "FHIR_DMP_REVIEW_BUDGET", 20, zero_ok=True),
            trusted_proxies=env.get("FHIR_DMP_TRUSTED_PROXIES") or (),
        )
        if env.get("FHIR_DMP_CORS_ORIGINS"):
            values["cors_origins"] = tuple(o.strip() for o in env["FHIR_DMP_CORS_ORIGINS"].split(",")
                                           if o.strip())
        if env.get("FHIR_DMP_SMTP_FROM"):
            values["smtp_from"] = env["FHIR_DMP_SMTP_FROM"]
        if env.get("FHIR_DMP_HABILITATIONS_FILE"):
            values["habilitations_file"] = Path(env["FHIR_DMP_HABILITATIONS_FILE"])
        values.update(overrides)
        return cls(**values)
