"""SMART on FHIR scopes: parse them once, answer ``allows(type, interaction)``.

Spec: SMART App Launch 2.x, "Scopes and Launch Context"
https://build.fhir.org/ig/HL7/smart-app-launch/scopes-and-launch-context.html

Grammar of a resource scope (v2, section "SMART 2.0 Scope Syntax")::

    ( "patient" | "user" | "system" ) "/" ( resourceType | "*" ) "." permissions [ "?" query ]

where ``permissions`` is a non-empty, ordered subset of ``c r u d s`` (create,
read, update, delete, search). v1 permissions (section "Scopes for requesting
clinical data", SMART 1.0) are ``read`` (= ``rs``), ``write`` (= ``cud``) and
``*`` (= ``cruds``).

Interaction letters used by the server: ``c`` create, ``r`` read (also vread
and history of one instance), ``u`` update (also patch), ``d`` delete,
``s`` search (also type and system history).

Scopes that are not resource scopes (``openid``, ``fhirUser``,
``launch/patient``, ``offline_access``, or a malformed resource scope) are kept
verbatim, so ``str()`` gives the scope string back, but grant nothing.

Finer-grained scopes carrying a ``?query`` restriction (v2 "Finer-grained
resource constraints using search parameters") are parsed and kept, but the
server does not enforce such restrictions, so it fails closed: a restricted
scope grants nothing through :meth:`Scopes.allows`.
:meth:`Scopes.restrictions` exposes them for a future enforcement.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

INTERACTIONS = "cruds"
CONTEXTS = ("patient", "user", "system")

# v1 permission words, SMART 1.0 "clinical-scope" (read, write, *)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
# v2: letters in the canonical order c, r, u, d, s, each at most once
_V2 = re.compile(r"^c?r?u?d?s?$")
_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<perm>[^?]+)(?:\?(?P<query>.*))?$"
)


@dataclass(frozen=True)
class ResourceScope:
    """One parsed resource scope, e.g. ``patient/DocumentReference.rs``."""

    context: str               # patient | user | system
    resource_type: str         # a FHIR type or "*"
    permissions: frozenset     # subset of "cruds"
    restriction: str | None    # the "?query" part (without "?"), None if none
    raw: str

    def covers(self, resource_type: str, interaction: str) -> bool:
        return (self.resource_type in ("*", resource_type)
                and interaction in self.permissions)


def parse_scope(token: str) -> ResourceScope | None:
    """Parse one scope token; None when it is not a (valid) resource scope."""
    m = _RESOURCE_SCOPE.match(token)
    if not m:
        return None
    perm = m.group("perm")
    if perm in _V1:
        letters = _V1[perm]
    elif perm and _V2.match(perm):
        letters = perm
    else:
        return None
    query = m.group("query")
    return ResourceScope(m.group("context"), m.group("type"), frozenset(letters),
                         query if query is not None else None, token)


@dataclass(frozen=True)
class Scopes:
    """The scopes granted by an access token (immutable, hashable).

    Build with :meth:`parse`. Equality and hash follow the scope tokens.
    """

    tokens: tuple[str, ...] = ()
    resource_scopes: tuple[ResourceScope, ...] = field(default=(), compare=False, repr=False)

    ALL = None  # set below: every interaction on every type (internal use only)

    @classmethod
    def parse(cls, scope: str | list | tuple | None) -> "Scopes":
        """Parse a space-separated scope string (RFC 6749 §3.3) or a list of
        scope tokens (``scp`` style). None or empty -> no scope at all.
        Non-string list items are ignored.
        """
        if scope is None:
            items: list[str] = []
        elif isinstance(scope, str):
            items = scope.split()
        elif isinstance(scope, (list, tuple)):
            items = [t for item in scope if isinstance(item, str) for t in item.split()]
        else:
            raise TypeError("scope must be a string or a list of strings")
        tokens = tuple(dict.fromkeys(items))  # de-duplicate, keep order
        parsed = tuple(p for p in map(parse_scope, tokens) if p is not None)
        return cls(tokens, parsed)

    def allows(self, resource_type: str, interaction: str) -> bool:
        """True when an unrestricted resource scope grants ``interaction``
        (one of ``c r u d s``) on ``resource_type``, in any context
        (patient/user/system: *whose* records is decided by the consent
        module, not here)."""
        if interaction not in INTERACTIONS or len(interaction) != 1:
            raise ValueError(f"unknown interaction {interaction!r}; expected one of c, r, u, d, s")
        return any(s.restriction is None and s.covers(resource_type, interaction)
                   for s in self.resource_scopes)

    def restrictions(self, resource_type: str, interaction: str) -> tuple[str, ...]:
        """The ``?query`` restrictions of the restricted scopes that would
        cover this type and interaction (not enforced, see module doc)."""
        return tuple(s.restriction for s in self.resource_scopes
                     if s.restriction is not None and s.covers(resource_type, interaction))

    def has(self, token: str) -> bool:
        """True when the exact scope token was granted (``openid``, ``launch/patient``…)."""
        return token in self.tokens

    def contexts(self) -> frozenset[str]:
        """The contexts (patient, user, system) of the resource scopes held."""
        return frozenset(s.context for s in self.resource_scopes)

    def __contains__(self, token: object) -> bool:
        return token in self.tokens

    def __iter__(self):
        return iter(self.tokens)

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def __str__(self) -> str:
        return " ".join(self.tokens)


Scopes.ALL = Scopes.parse("system/*.cruds")
