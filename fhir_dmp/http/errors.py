"""Typed errors and their one mapping to FHIR OperationOutcome.

Every layer raises a subclass of :class:`FhirError`; the Flask error handlers
registered in :func:`fhir_dmp.http.app.create_app` turn it (and anything unexpected)
into an OperationOutcome with the right status. Nothing else builds error bodies.

Spec: https://hl7.org/fhir/R4/operationoutcome.html and
https://hl7.org/fhir/R4/http.html#Status-Codes
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Issue:
    """One OperationOutcome.issue."""

    diagnostics: str
    code: str = "invalid"
    severity: str = "error"
    expression: list[str] | None = None

    def as_json(self) -> dict:
        out = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


class FhirError(Exception):
    """Base of all errors that become an OperationOutcome.

    ``expression`` is a FHIRPath-ish location of the faulty element
    (``Patient.identifier[0].value``); ``issues`` may carry several.
    ``headers`` are extra HTTP headers (``WWW-Authenticate`` for 401).
    """

    status = 400
    code = "invalid"

    def __init__(self, diagnostics: str = "", *, expression: str | list[str] | None = None,
                 code: str | None = None, issues: list[Issue] | None = None,
                 headers: dict | None = None, status: int | None = None):
        super().__init__(diagnostics)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if isinstance(expression, str):
            expression = [expression]
        self.issues = list(issues or [])
        if diagnostics or not self.issues:
            self.issues.insert(0, Issue(diagnostics or self.default_message(), self.code,
                                        expression=expression))
        self.headers = dict(headers or {})

    def default_message(self) -> str:
        return type(self).__name__

    @property
    def diagnostics(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues)

    def outcome(self) -> dict:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    status, code = 400, "invalid"


class Unauthorized(FhirError):
    status, code = 401, "login"


class Forbidden(FhirError):
    status, code = 403, "forbidden"


class NotFound(FhirError):
    status, code = 404, "not-found"


class MethodNotAllowed(FhirError):
    status, code = 405, "not-supported"


class NotAcceptable(FhirError):
    status, code = 406, "not-supported"


class Conflict(FhirError):
    status, code = 409, "conflict"


class Gone(FhirError):
    status, code = 410, "deleted"


class PreconditionFailed(FhirError):
    status, code = 412, "conflict"


class PayloadTooLarge(FhirError):
    status, code = 413, "too-long"


class UnsupportedMediaType(FhirError):
    status, code = 415, "not-supported"


class Unprocessable(FhirError):
    status, code = 422, "processing"


class ServiceUnavailable(FhirError):
    """The server cannot serve safely now (audit store down: fail closed)."""

    status, code = 503, "transient"


RETRY_AFTER_S = 2      # what a 503 of an unavailable database asks the client to wait


def unavailable(message: str) -> ServiceUnavailable:
    """The 503 ``transient`` of a database that did not answer within FHIR_DMP_DB_WAIT (or a
    journal that could not be written): nothing was half-written, the client may retry after
    ``Retry-After`` seconds (CONTRACT.md "Faults, failover and backups")."""
    return ServiceUnavailable(message, headers={"Retry-After": str(RETRY_AFTER_S)})


def not_found(resource_type: str, rid: str) -> NotFound:
    """The one 404 body, used for missing *and* denied resources (no leak)."""
    return NotFound(f"Resource {resource_type}/{rid} is not known")


def operation_outcome(issues: list[Issue], *, information: str | None = None) -> dict:
    out = {"resourceType": "OperationOutcome", "issue": [i.as_json() for i in issues]}
    if information:
        out["issue"].append({"severity": "information", "code": "informational",
                             "diagnostics": information})
    return out


def information_outcome(message: str) -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational",
                       "diagnostics": message}]}
