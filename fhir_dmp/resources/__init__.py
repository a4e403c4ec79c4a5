"""FHIR REST handlers (thin): parse, validate, call the guarded repository, serialize.

Their blueprints are mounted under /fhir by ``fhir_dmp.http.app.create_app``.
"""
