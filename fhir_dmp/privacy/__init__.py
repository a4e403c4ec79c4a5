"""The privacy officer's pages at ``/privacy/`` (CONTRACT.md "Privacy operations", "The officer's
pages").

Server-rendered French pages for the privacy officer (``dmp_role: privacy_officer``): the queue
of open review cases, a case with its evidence and the decision form, and a chart of the
professional's accesses per day against peers of the same profession. A signed-in space
(``fhir_dmp.spaces``) like the patient portal, and like it one more client of the guarded
repository: the officer's token gives the officer's Principal, every read and every decision goes
through ``GuardedRepository`` (decision point + journal). It never reads document content.

- ``signin``: who may enter (privacy officers only) and the dev sign-in;
- ``views``: the pages and the two actions (take a case, decide it);
- ``present``: review Tasks and journal entries -> rows the templates show;
- ``activity``: accesses per day, the professional against peers, and the chart's geometry.
"""
from __future__ import annotations

from .signin import OFFICER
from .views import bp

__all__ = ["OFFICER", "bp"]
