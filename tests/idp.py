"""A test identity provider: real keys, real signed tokens, a real JWKS file.

Usage::

    idp = TestIdP(tmp_path)
    config = Config(data_dir=tmp_path / "data", **idp.config_kwargs())
    token = idp.ps("810001234567", profession="10")
    headers = {"Authorization": f"Bearer {token}"}

Tokens carry the claims of CONTRACT.md "Access tokens". ``token()`` fills
``iss``, ``aud``, ``iat``, ``exp`` and ``jti``; a claim passed as ``None`` is
removed (to test missing claims). The convenience minters (``patient``,
``ps``…) only set defaults: any keyword overrides them.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey


class TestIdP:
    """Signs tokens with an RSA-2048 (RS256) and an EC P-256 (ES256) key and
    publishes their public halves as a JWKS at ``self.jwks_file``."""

    __test__ = False  # not a pytest test class

    def __init__(self, tmp_dir: Path, issuer: str = "https://idp.test",
                 audience: str = "https://dmp.test/fhir"):
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.issuer = issuer
        self.audience = audience
        self.jwks_file = self.dir / "jwks.json"
        self._counter = 0
        self._lock = threading.RLock()  # rotate() may be called from several threads
        self.keys: list = []           # every key ever published, oldest first
        self.signing: dict = {}        # alg -> current signing key
        self.signing["RS256"] = self._new_key("RS256")
        self.signing["ES256"] = self._new_key("ES256")
        self._write_jwks()

    # -- keys
    def _new_key(self, alg: str):
        self._counter += 1
        if alg == "RS256":
            key = RSAKey.generate_key(2048, parameters={"kid": f"rsa-{self._counter}", "use": "sig",
                                                        "alg": "RS256"})
        elif alg == "ES256":
            key = ECKey.generate_key("P-256", parameters={"kid": f"ec-{self._counter}", "use": "sig",
                                                          "alg": "ES256"})
        else:
            raise ValueError(f"TestIdP signs with RS256 or ES256, not {alg}")
        self.keys.append(key)
        return key

    def jwks(self) -> dict:
        """The public JWKS (what an IdP publishes)."""
        return KeySet(self.keys).as_dict(private=False)

    def _write_jwks(self) -> None:
        tmp = self.jwks_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.jwks()), encoding="utf-8")
        os.replace(tmp, self.jwks_file)  # readers never see a half-written file

    def rotate(self, alg: str = "RS256") -> str:
        """Publish a new signing key for ``alg`` (new kid) and sign with it from
        now on; older keys stay published. Returns the new kid."""
        with self._lock:
            key = self._new_key(alg)
            self.signing[alg] = key
            self._write_jwks()
            return key.kid

    def kid(self, alg: str = "RS256") -> str:
        return self.signing[alg].kid

    def public_pem(self, alg: str = "RS256") -> bytes:
        """PEM of the current public key (for algorithm-confusion tests)."""
        return self.signing[alg].as_pem(private=False)

    # -- tokens
    def token(self, claims: dict | None = None, *, alg: str = "RS256", kid: str | None = None,
              lifetime: int = 300, header: dict | None = None, **claims_kw) -> str:
        """Sign ``claims`` (dict and keywords merged) with the current ``alg``
        key. ``kid`` overrides the header kid (the key used stays the current
        one); ``header`` adds header members (a member set to None is removed)."""
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + lifetime,
                "jti": uuid.uuid4().hex}
        body.update(claims or {})
        body.update(claims_kw)
        body = {k: v for k, v in body.items() if v is not None}
        key = self.signing[alg]
        hdr = {"alg": alg, "kid": kid or key.kid}
        hdr.update(header or {})
        hdr = {k: v for k, v in hdr.items() if v is not None}
        return jwt.encode(hdr, body, key, algorithms=[alg])

    def patient(self, patient_id: str, **kw) -> str:
        kw.setdefault("scope", "openid fhirUser patient/*.cruds")
        kw.setdefault("sub", f"patient-{patient_id}")
        kw.setdefault("fhirUser", f"Patient/{patient_id}")
        return self.token(**kw)

    def legal_rep(self, related_person_id: str, **kw) -> str:
        """A legal representative's token names its RelatedPerson (CONTRACT.md "Who the caller is")."""
        kw.setdefault("scope", "openid fhirUser patient/*.cruds")
        kw.setdefault("sub", f"legal-rep-{related_person_id}")
        kw.setdefault("fhirUser", f"RelatedPerson/{related_person_id}")
        kw.setdefault("dmp_role", "legal_representative")
        return self.token(**kw)

    def ps(self, id_nat_ps: str, profession: str = "10", purpose: str | None = None, **kw) -> str:
        kw.setdefault("scope", "openid user/*.cruds")
        kw.setdefault("sub", id_nat_ps)
        kw.setdefault("acr", "eidas1")
        if purpose is not None:
            kw.setdefault("purpose_of_use", purpose)
        kw.setdefault("SubjectNameID", id_nat_ps)
        kw.setdefault("SubjectRole", [profession])
        return self.token(**kw)

    def regulation_centre(self, id_nat_ps: str, profession: str = "10", **kw) -> str:
        kw.setdefault("purpose_of_use", "ETREAT")
        kw.setdefault("dmp_role", "regulation_centre")
        return self.ps(id_nat_ps, profession, **kw)

    def admin(self, **kw) -> str:
        kw.setdefault("scope", "openid user/*.cruds")
        kw.setdefault("sub", "admin-1")
        kw.setdefault("dmp_role", "admin")
        return self.token(**kw)

    def officer(self, **kw) -> str:
        """The privacy officer (CONTRACT.md "Privacy operations")."""
        kw.setdefault("scope", "openid user/*.cruds")
        kw.setdefault("sub", "officer-1")
        kw.setdefault("name", "Claire Délégué")
        kw.setdefault("dmp_role", "privacy_officer")
        return self.token(**kw)

    # -- server configuration
    def config_kwargs(self) -> dict:
        """Keyword arguments for ``Config(...)`` trusting this IdP."""
        return dict(issuer=self.issuer, jwks_file=self.jwks_file, audience=self.audience)
