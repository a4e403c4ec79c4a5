"""Taking and closing a review case: which changes of a ``Task`` the privacy officer may make.

CONTRACT.md "Privacy operations". Who writes is the decision's (only the privacy officer updates a
review Task, ``security/decision/writes.py``); this module says what a change may be:

- ``requested`` -> ``in-progress`` (taken: ``owner`` becomes the officer), ``requested`` or
  ``in-progress`` -> ``completed`` (closed: ``businessStatus`` ``justified`` or ``unjustified`` and a
  ``note``, required by the profile); staying in the same open status (a note added) is allowed;
  any other status: 422;
- a completed case no longer changes: 409;
- what the server wrote (``code``, ``for``, ``focus``, ``intent``, ``authoredOn``, the evidence in
  ``input`` but ``documents-read``) stays as it is: 422 otherwise;
- ``documents-read`` is computed at review time: the server writes it again when the case is
  taken and when it is closed (the journal's document reads by that professional in that DMP
  under the case's access mode, ``guard/review.py``), so the officer sees the whole emergency
  access, not only its first request;
- ``lastModified`` is the server's.
"""
from __future__ import annotations

from datetime import datetime

from ..http.errors import Conflict, Unprocessable
from ..profiles.review_task import REVIEW_SYSTEM, coded
from ..storage import instant
from .cases import case_input

NEXT = {"requested": ("requested", "in-progress", "completed"), "in-progress": ("in-progress", "completed")}
SERVER_FIELDS = ("code", "for", "focus", "intent", "authoredOn", "description")
DOCUMENTS_READ = "documents-read"


def _evidence(task: dict) -> list:
    return [i for i in task.get("input") or () if coded(i.get("type"), REVIEW_SYSTEM) != DOCUMENTS_READ]


def with_documents_read(task: dict, count: int) -> dict:
    """``task`` whose ``documents-read`` input says ``count`` (added when missing)."""
    return {**task, "input": [*_evidence(task), case_input(DOCUMENTS_READ, valueInteger=count)]}


def next_version(old: dict, new: dict, *, owner: dict, at: datetime) -> dict:
    """The version to store when the officer writes ``new`` over ``old`` (module docstring);
    raises Conflict (409) on a completed case, Unprocessable (422) on another change."""
    status = old.get("status")
    if status == "completed":
        raise Conflict("a completed review case no longer changes", code="conflict", expression="Task.status")
    if new.get("status") not in NEXT.get(status, ()):
        raise Unprocessable(f"a review case goes from {status} to one of {', '.join(NEXT.get(status, ()))}",
                            code="business-rule", expression="Task.status")
    for name in SERVER_FIELDS:
        if new.get(name) != old.get(name):
            raise Unprocessable(f"Task.{name} is written by the server and does not change",
                                code="business-rule", expression=f"Task.{name}")
    if _evidence(new) != _evidence(old):
        raise Unprocessable("the evidence of a review case (Task.input) is written by the server",
                            code="business-rule", expression="Task.input")
    out = dict(new)
    if new["status"] != "requested":
        out["owner"] = owner
    out["lastModified"] = instant(at)
    return out
