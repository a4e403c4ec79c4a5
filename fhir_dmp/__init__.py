"""fhir_dmp: a FHIR R4 server for the French shared medical record (DMP).

``create_app(config)`` (``fhir_dmp.http.app``) is the one application factory.
"""
from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """Build the WSGI application; see :func:`fhir_dmp.http.app.create_app`."""
    from .http.app import create_app as factory  # lazy: importing the package must not load Flask and pymongo
    return factory(*args, **kwargs)
