"""Structured logs: one JSON object per line, the request id on every line (issue 9).

``configure()`` is called by ``fhir-dmp serve`` (before the workers fork, so every worker
inherits it). Each line carries ``time``, ``level``, ``logger``, ``message`` and
``request_id`` (the ``X-Request-Id`` of the request being served, null outside one). Expected
refusals (401, 403, 404...) are answered, journaled and never logged with a traceback; tokens
and document content never reach a log line.
"""
from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

#: the WSGI environ key where the app leaves a request's id, for the server's access line
REQUEST_ID_ENVIRON = "fhir_dmp.request_id"


class RequestIdFilter(logging.Filter):
    """Binds the current request's id to every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:   # unless the caller bound one (access line)
            from flask import g, has_app_context
            record.request_id = g.get("request_id") if has_app_context() else None
        return True


def json_handler(stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}{request_id}", style="{",
                                       rename_fields={"asctime": "time", "levelname": "level",
                                                      "name": "logger"}))
    handler.addFilter(RequestIdFilter())
    return handler


def configure(level: str = "INFO", stream=None) -> None:
    """Route every logger through one JSON handler on stderr (or ``stream``)."""
    root = logging.getLogger()
    root.handlers[:] = [json_handler(stream)]
    root.setLevel(level)
