"""The access decision (DESIGN.md "The access rules"), in HAPI FHIR's consent-service vocabulary.

:class:`~.access.RequestAccess` is the facade the guarded repository holds for one request
(``start``, ``narrow``, ``can_see``, ``will_see``, ``can_write``, ``complete``: see
:mod:`.access`); the rules live in one module per subject:

============================ ===============================================================
``access.py``                the facade: AccessPolicy, RequestAccess (HAPI's IConsentService)
``dmp_access.py``            may the caller enter this DMP (rules 2-8, DESIGN.md order),
                             searches' reachable DMPs, exact-INS lookup, destroy, access code
``documents.py``             rules 9-11: habilitation matrix, labels (MASQUE_PS...), Binary,
                             what a deposit carries (author, INS, replaces, attachment.url, CDA)
``writes.py``                who creates, updates and deletes what (update-as-create included)
``representatives.py``       legal representatives: in force, resolved at authentication, written
``consents.py``              reading Consents: kind, actors, purposes, in force
``facets.py``                the flat facts stored beside each resource, that queries filter on
``state.py``                 Decision and PatientState (the decision's context, loaded once)
============================ ===============================================================
"""
from .access import AccessPolicy, RequestAccess
from .consents import consent_in_force
from .documents import is_personal_document, record_target_matches
from .facets import access_facets
from .representatives import resolve_legal_representative
from .state import DIRECTORY, SERVER_WRITTEN, Decision, PatientState, deny, permit

__all__ = ["AccessPolicy", "RequestAccess", "Decision", "PatientState", "permit", "deny", "DIRECTORY",
           "SERVER_WRITTEN", "access_facets", "consent_in_force", "record_target_matches",
           "is_personal_document", "resolve_legal_representative"]
