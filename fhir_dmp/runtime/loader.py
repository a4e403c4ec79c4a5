"""``fhir-dmp load FILE...``: import FHIR resources from Bundles (JSON) or NDJSON files.

Each resource goes through validation and the guarded repository like an
HTTP write, as the administrator (``dmp_role`` admin, ``system/*.cruds``):
it is journaled, and the access rules apply — an administrator manages
Patients and Consents; documents are deposited by professionals through the
API. A resource with an ``id`` is written with that id (update or create);
one without gets a server id. The first bad resource stops the import with
``FILE:LINE`` (NDJSON) or ``FILE entry N`` (Bundle); what came before is kept.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterator

from ..http import formats
from ..http.errors import BadRequest, FhirError
from ..profiles import validate
from ..guard.journal import RequestInfo
from ..guard.repository import GuardedRepository
from ..security.principal import ADMIN, Principal
from ..security.scopes import Scopes
from .database import open_database
from .services import Services, build_services

LOADER = Principal(kind=ADMIN, subject="fhir-dmp load", scopes=Scopes.parse("system/*.cruds"),
                   client_id="fhir-dmp-load")


def iter_resources(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, resource) for every resource in a Bundle JSON file or an NDJSON file."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".ndjson" or not _is_json(raw):
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                yield f"{path}:{lineno}", _parse(line, f"{path}:{lineno}")
        return
    doc = _parse(raw, str(path))
    if doc.get("resourceType") == "Bundle":
        for i, entry in enumerate(doc.get("entry") or []):
            res = (entry or {}).get("resource")
            if isinstance(res, dict):
                yield f"{path} entry {i}", res
    else:
        yield str(path), doc


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


def _parse(data: bytes, where: str) -> dict:
    try:
        return formats.parse_body("application/fhir+json", data, max_bytes=len(data) + 1)
    except FhirError as exc:
        raise BadRequest(f"{where}: {exc.diagnostics}") from None


def load_files(config, paths: list[Path], progress) -> int:
    """Import every resource of ``paths``; returns how many were written."""
    client, db = open_database(config)
    try:
        services = build_services(config, client, db)
        count = 0
        for path in paths:
            for where, resource in iter_resources(Path(path)):
                _load_one(services, where, resource)
                count += 1
                progress.update(1)
        return count
    finally:
        client.close()


def _load_one(services: Services, where: str, resource: dict) -> None:
    repo = GuardedRepository(services, LOADER, RequestInfo(request_id=f"load-{uuid.uuid4().hex[:12]}"))
    rtype = resource.get("resourceType")
    try:
        resource = validate(resource, resource_type=rtype)
        if resource.get("id"):
            repo.update(rtype, resource["id"], resource)
        else:
            repo.create(rtype, resource)
    except FhirError as exc:
        exc.issues[0].diagnostics = f"{where}: {exc.issues[0].diagnostics}"
        raise
    finally:
        repo.flush_audit()
