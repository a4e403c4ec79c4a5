"""FHIR REST handlers (thin): parse, validate, call the guarded repository, serialize."""
from __future__ import annotations


def register(app) -> None:
    """Mount the FHIR blueprints under /fhir (metadata first: it needs no token)."""
    from . import bundles, capability, conformance, rest
    app.register_blueprint(capability.bp)
    app.register_blueprint(conformance.bp)
    app.register_blueprint(bundles.bp)
    app.register_blueprint(rest.bp)
