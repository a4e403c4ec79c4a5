"""The guard: every way from a request to stored data, bound to one principal.

:class:`~fhir_dmp.guard.repository.GuardedRepository` is the facade handlers hold; it decides
through ``security/decision/``, journals every access and writes in one unit of work.
"""
