"""The patient portal: the patient's own space at ``/portal/`` (CONTRACT.md "The patient portal").

Server-rendered French pages (Jinja), usable without JavaScript, for the
patient and legal representatives. The portal is one more client of the
guarded repository (a signed-in space, ``fhir_dmp.spaces``): the signed-in
person's access token is verified like any API token, the same Principal is
built from it, and every read and action goes through ``GuardedRepository``
(decision point + journal). It has no other way to data.

- ``signin``: who may enter, the dev sign-in (OpenID Connect and the session:
  ``spaces.signin``);
- ``views``: the pages and the form actions (CSRF-protected by Flask-WTF);
- ``present``: FHIR resources -> rows the templates show;
- ``directory``: what the directory of professionals says of one.

Its stylesheet and base template serve the other spaces too.
"""
from __future__ import annotations

from .signin import PORTAL
from .views import bp

__all__ = ["PORTAL", "bp"]
