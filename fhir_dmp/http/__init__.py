"""The HTTP layer: the application factory and what every response shares.

- ``app``: ``create_app(config)``, the wiring of one process (services, blueprints, hooks) and
  the one mapping of errors to OperationOutcome responses.
- ``errors``: the FHIR errors (status, OperationOutcome) every layer raises.
- ``formats``: JSON/XML rendering, parsing and content negotiation.
- ``compression``: gzip request bodies in, gzip responses out.
- ``home``: ``GET /`` (``templates/home.html``) and ``GET /fhir`` for a browser.

The REST handlers live in ``fhir_dmp.resources``, the patient portal in ``fhir_dmp.portal``.
"""
