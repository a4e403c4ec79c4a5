"""What the misuse scan reads in one AuditEvent and in the records, and the signal codes
(CONTRACT.md "Privacy operations", "Looking for misuse"; the codes: ``profiles/review_task.py``).

:func:`access_of` turns a journal entry (IHE BALP AuditEvent, ``audit/events.py``) into an
:class:`Access`: who (idNatPs, name, profession, establishment), from where (network address,
client, user agent), why (purpose, the ``dmp-access-basis`` extension when the event has one,
else the decision's rule), what (interaction, resource), when. The records' facts a pair is
judged on (:class:`PatientFacts`, :class:`PractitionerFacts`, :class:`Relationship`) are read
from what storage returns (``storage/privacy.py``).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from ..audit.events import CLIENT_ID_SYSTEM, DMP_AUDIT_SYSTEM, PROFESSION_SYSTEM
from ..profiles.review_task import SIGNAL_SYSTEM, SIGNALS
from ..security.decision.basis import event_basis
from ..security.principal import IDNATPS_SYSTEM, PS, REGULATION_CENTRE

FINESS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"

NO_RELATIONSHIP = "no-relationship"
ATTESTATION_ONLY = "attestation-only"
SAME_SURNAME = "same-surname"
SAME_PLACE = "same-place"
BULK = "bulk"
SHARED_CREDENTIAL = "shared-credential"
BREAK_GLASS_RATE = "break-glass-rate"
OFF_HOURS = "off-hours"
assert SIGNALS == (NO_RELATIONSHIP, ATTESTATION_ONLY, SAME_SURNAME, SAME_PLACE, BULK, SHARED_CREDENTIAL,
                   BREAK_GLASS_RATE, OFF_HOURS)   # the dmp-privacy-signal codes: the features' order (model.py)

#: bases (dmp-access-basis codes, or the decision's rule before the extension) that show care
CARE_BASES = frozenset({"medecin-traitant", "creator", "establishment", "ps-creates-dmp"})
BREAK_GLASS_BASES = frozenset({"break-glass"})
#: the working day in France: accesses outside it, or on a week-end, are off-hours
PARIS = ZoneInfo("Europe/Paris")
DAY_START, DAY_END = 7, 20
DOCUMENT_TYPES = ("DocumentReference", "Binary")


def fold(text: str | None) -> str:
    """``text`` compared as people write names: no accents, no case, no hyphen or apostrophe."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.replace("-", " ").replace("'", " ").casefold().split())


@dataclass(slots=True)
class Access:
    """One journaled access of a professional to a DMP."""

    actor: str
    pid: str
    at: datetime
    event_id: str
    kind: str
    profession: str | None
    name: str | None
    organization: str | None
    address: str | None
    client: str | None
    user_agent: str | None
    purpose: str | None
    basis: str | None
    granted: bool
    interaction: str | None
    resource_type: str | None

    @property
    def credential_key(self) -> tuple:
        """Where the credential was used from: network address and client (and user agent when
        journaled)."""
        return (self.address, self.client, self.user_agent)

    @property
    def off_hours(self) -> bool:
        local = self.at.astimezone(PARIS)
        return local.weekday() >= 5 or not DAY_START <= local.hour < DAY_END


def _codes(concept: dict | None, system: str) -> list[str]:
    return [c.get("code") for c in (concept or {}).get("coding") or () if c.get("system") == system]


def _basis(event: dict, details: dict) -> str | None:
    return event_basis(event) or details.get("rule")


def access_of(pid: str, at: datetime, event: dict) -> Access | None:
    """The professional's access an AuditEvent records; None for anyone else's."""
    agents = event.get("agent") or ()
    if not agents:
        return None
    user = agents[0]
    ident = (user.get("who") or {}).get("identifier") or {}
    if ident.get("system") != IDNATPS_SYSTEM or not ident.get("value"):
        return None
    kind = profession = None
    for role in user.get("role") or ():
        kind = kind or next(iter(_codes(role, DMP_AUDIT_SYSTEM)), None)
        profession = profession or next(iter(_codes(role, PROFESSION_SYSTEM)), None)
    if kind not in (PS, REGULATION_CENTRE):
        return None
    organization = client = None
    for agent in agents[1:]:
        who = (agent.get("who") or {}).get("identifier") or {}
        if "organization" in [c for r in agent.get("role") or () for c in _codes(r, DMP_AUDIT_SYSTEM)]:
            organization = who.get("value")
        elif who.get("system") == CLIENT_ID_SYSTEM:
            client = who.get("value")
    details = {}
    for entity in event.get("entity") or ():
        if (entity.get("type") or {}).get("code") == "decision":
            details = {d.get("type"): d.get("valueString") for d in entity.get("detail") or ()}
    resource = next(((e.get("what") or {}).get("reference") for e in event.get("entity") or ()
                     if (e.get("role") or {}).get("code") == "4"), None)
    purpose = next((c.get("code") for p in event.get("purposeOfEvent") or () for c in p.get("coding") or ()), None)
    return Access(
        actor=ident["value"], pid=pid, at=at, event_id=event.get("id") or "", kind=kind, profession=profession,
        name=user.get("name") or (user.get("who") or {}).get("display"), organization=organization,
        address=(user.get("network") or {}).get("address"), client=client, user_agent=details.get("user-agent"),
        purpose=purpose, basis=_basis(event, details), granted=event.get("outcome") == "0",
        interaction=next((s.get("code") for s in event.get("subtype") or ()), None),
        resource_type=resource.split("/", 1)[0] if resource else None)


# -- the records ---------------------------------------------------------------------------------

def _places(addresses) -> set[str]:
    """Cities and postal codes of FHIR addresses, folded."""
    out = set()
    for a in addresses or ():
        for key in ("city", "postalCode"):
            if a.get(key):
                out.add(f"{key}:{fold(a[key])}")
    return out


def _surnames(names) -> set[str]:
    return {fold(n.get("family")) for n in names or () if n.get("family")}


@dataclass(slots=True)
class PatientFacts:
    surnames: set[str] = field(default_factory=set)
    places: set[str] = field(default_factory=set)
    gps: set[str] = field(default_factory=set)


def patient_facts(res: dict) -> PatientFacts:
    gps = {(g.get("identifier") or {}).get("value") for g in res.get("generalPractitioner") or ()
           if (g.get("identifier") or {}).get("system") == IDNATPS_SYSTEM}
    return PatientFacts(_surnames(res.get("name")), _places(res.get("address")), gps - {None})


@dataclass(slots=True)
class PractitionerFacts:
    surnames: set[str] = field(default_factory=set)
    places: set[str] = field(default_factory=set)


def practitioner_facts(res: dict) -> PractitionerFacts:
    return PractitionerFacts(_surnames(res.get("name")), _places(res.get("address")))


def journaled_surname(name: str | None, patient_surnames: set[str]) -> bool:
    """The PS's journaled name (``given family``, as Pro Santé Connect gives them) ends with one of
    the patient's surnames (compared folded)."""
    folded = fold(name)
    return any(s and (folded == s or folded.endswith(" " + s)) for s in patient_surnames)


@dataclass(slots=True)
class Relationship:
    """What the records say about one professional and one DMP."""

    attested: bool = False        # an authorization Consent the PS attested (verification.verified)
    given: bool = False           # an authorization Consent the patient gave (not attested by a PS)
    deposited: bool = False       # the PS authored a document of the DMP
    gp: bool = False              # the PS is the médecin traitant


def consent_actors(res: dict) -> list[str]:
    """Identifier values a permit Consent in force authorizes (idNatPs or establishment)."""
    prov = res.get("provision") or {}
    if res.get("status") != "active" or prov.get("type") != "permit":
        return []
    return [((a.get("reference") or {}).get("identifier") or {}).get("value") for a in prov.get("actor") or ()]


def consent_attested(res: dict) -> bool:
    return any(v.get("verified") for v in res.get("verification") or ())


def document_authors(res: dict) -> list[str]:
    return [(a.get("identifier") or {}).get("value") for a in res.get("author") or ()]
