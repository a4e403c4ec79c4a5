"""Dev mode signing key and token minting (CONTRACT.md "Install and run").

With no ``FHIR_DMP_ISSUER`` the server trusts only a local EC P-256 key kept
as a private JWK (RFC 7517) in ``config.dev_key_path``; ``fhir-dmp dev-token``
mints ES256 tokens with it (``mint_token``). Never used outside dev mode.
"""
from __future__ import annotations

import json
import logging
import stat
import time
import uuid
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey

from ..runtime.secret_files import write_secret
from .principal import ADMIN, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS, REGULATION_CENTRE, ETREAT, BTG, TREAT

log = logging.getLogger(__name__)

KINDS = (PATIENT, LEGAL_REPRESENTATIVE, PS, REGULATION_CENTRE, ADMIN, PRIVACY_OFFICER)
#: short names accepted for a kind (``fhir-dmp dev-token officer``)
ALIASES = {"officer": PRIVACY_OFFICER}
DEV_CLIENT_ID = "fhir-dmp-dev"


def ensure_dev_key(config) -> ECKey:
    """Return the dev private key (an ``ECKey`` with a ``kid``), creating it once.

    Creation is atomic and race-safe: the key is written to a private
    temporary file (mode 0600) and hard-linked to its final name, which fails
    if another process got there first; the loser then loads the winner's key.
    """
    path = Path(config.dev_key_path)
    if not path.exists():
        _create_key_file(path)
    return load_dev_key(path)


def load_dev_key(path: Path) -> ECKey:
    """Load the private dev key from ``path`` (a private EC P-256 JWK)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("dev signing key %s is readable by other users; chmod 600 it", path)
    data = json.loads(path.read_text(encoding="utf-8"))
    key = ECKey.import_key(data)
    if not key.is_private or key.as_dict().get("crv") != "P-256":
        raise ValueError(f"{path} is not a private EC P-256 JWK")
    key.ensure_kid()
    return key


def dev_public_key(config) -> ECKey:
    """The public half of the dev key, for the token verifier."""
    return ECKey.import_key(ensure_dev_key(config).as_dict(private=False))


def _create_key_file(path: Path) -> None:
    key = ECKey.generate_key("P-256", parameters={"use": "sig", "alg": "ES256"},
                             private=True, auto_kid=True)
    if write_secret(path, json.dumps(key.as_dict(private=True), indent=2).encode()):
        log.info("created dev signing key %s (kid %s)", path, key.kid)
    # else another process won the race: use its key


def mint_token(config, kind: str, *, patient: str | None = None, id_nat_ps: str | None = None,
               profession: str | None = None, purpose: str | None = None,
               btg_reason: str | None = None, scope: str | None = None, lifetime: int = 3600,
               acr: str = "eidas1", organization: str | None = None, name: str | None = None,
               extra: dict | None = None, related_person: str | None = None) -> str:
    """Mint an ES256 access token signed with the dev key (claims of CONTRACT.md
    "Access tokens"), ``iss`` = ``config.expected_issuer``, ``aud`` =
    ``config.expected_audience``.

    ``kind``: patient (needs ``patient``), legal_representative (needs
    ``related_person``, the RelatedPerson id), ps
    (needs ``id_nat_ps`` and ``profession``), regulation_centre (needs
    ``id_nat_ps``; profession defaults to 10, purpose to ETREAT), admin, privacy_officer
    (``officer``; ``name`` its display name, never a PS).
    Default scope: ``patient/*.cruds`` for patient and legal representative,
    ``user/*.cruds`` otherwise. ``extra`` claims are merged last. Raises
    ValueError for an unknown kind or a missing argument.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}; expected one of {', '.join(KINDS)}")
    if lifetime <= 0:
        raise ValueError("lifetime must be a positive number of seconds")
    if purpose is not None and purpose not in (TREAT, BTG, ETREAT):
        raise ValueError(f"purpose must be TREAT, BTG or ETREAT, not {purpose!r}")
    now = int(time.time())
    claims: dict = {
        "iss": config.expected_issuer,
        "aud": config.expected_audience,
        "iat": now,
        "nbf": now,
        "exp": now + int(lifetime),
        "jti": uuid.uuid4().hex,
        "client_id": DEV_CLIENT_ID,
        "acr": acr,
    }
    if kind == LEGAL_REPRESENTATIVE:
        # CONTRACT.md "Who the caller is": the token names the RelatedPerson, not the patient
        if not related_person:
            raise ValueError("a legal_representative token needs related_person (the RelatedPerson id)")
        claims["fhirUser"] = f"RelatedPerson/{related_person}"
        claims["scope"] = scope or "openid fhirUser patient/*.cruds"
        claims["dmp_role"] = LEGAL_REPRESENTATIVE
        claims["sub"] = f"dev-legal-representative-{related_person}"
    elif kind == PATIENT:
        if not patient:
            raise ValueError(f"a {kind} token needs patient (the Patient id of the DMP)")
        claims["fhirUser"] = f"Patient/{patient}"
        claims["scope"] = scope or "openid fhirUser patient/*.cruds"
        claims["sub"] = f"dev-patient-{patient}"
    elif kind in (PS, REGULATION_CENTRE):
        if kind == REGULATION_CENTRE:
            profession = profession or "10"
            purpose = purpose or ETREAT
            claims["dmp_role"] = REGULATION_CENTRE
        missing = [n for n, v in (("id_nat_ps", id_nat_ps), ("profession", profession)) if not v]
        if missing:
            raise ValueError(f"a {kind} token needs {' and '.join(missing)}")
        claims["sub"] = id_nat_ps
        claims["SubjectNameID"] = id_nat_ps
        claims["SubjectRole"] = [profession]
        claims["scope"] = scope or "openid user/*.cruds"
        claims["purpose_of_use"] = purpose or TREAT
        if btg_reason:
            claims["btg_reason"] = btg_reason
    else:  # admin, privacy officer
        claims["dmp_role"] = kind
        claims["sub"] = "dev-admin" if kind == ADMIN else "dev-privacy-officer"
        claims["scope"] = scope or "openid user/*.cruds"
    if organization:
        claims["organization"] = organization
    if name:
        claims["name"] = name
    if extra:
        claims.update(extra)
    key = ensure_dev_key(config)
    return jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key, algorithms=["ES256"])
