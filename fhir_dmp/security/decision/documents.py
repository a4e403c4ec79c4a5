"""Which documents a caller sees, and what a deposit carries (DESIGN.md rules 9-11, "Documents").

Rule 9 (the habilitation matrix: every type code of a document allowed for the caller's
profession), the labels (MASQUE_PS, seen only by the médecin traitant in normal mode; the
documents not yet announced to the patient or hidden from legal representatives) and the
author, who always sees what they wrote, are written once as a storage query
(:meth:`DocumentRules.document_query`), which the search runs in the database and
:meth:`DocumentRules.judge` evaluates on one document. A Binary is read under its document's
decision. Rules 10-11 on a deposit (qualified INS, author of record, ``relatesTo replaces``, an
``attachment.url`` naming content of the same record, the CDA's patient) are decided here and
applied by ``documents/pipeline.py``.
"""
from __future__ import annotations

import copy

from ...storage.filters import Memo, compiled, query_key
from ...profiles import dmp
from ...search import reference_id
from ..principal import ADMIN, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS, TREAT
from .facets import access_facets
from .state import Decision, PatientState, Rules, deny, permit

#: (document query, DMP, a document's access facets) -> does the query match: a pure function
#: of its key, asked again for every document of every search page (:meth:`DocumentRules.judge`)
_VERDICTS = Memo(16_384)


class DocumentRules(Rules):
    """Rules 9-11 for one request."""

    def judge(self, doc: dict, st: PatientState, access: Decision) -> Decision:
        """Rule 9 and the labels, judged with the same query the search guard runs."""
        if self.p.kind == ADMIN:
            return deny("admin-no-content", "administrators never read documents")
        if self.p.kind == PRIVACY_OFFICER:
            return deny("officer-no-content", "the privacy officer never reads document content")
        judged = self.access.entry(st)
        if judged[3] is None:
            query = self.document_query(st.pid)
            key = query_key(query)
            judged[3] = (key, compiled(query, key))
        if self._matches(judged[3], st.pid, access_facets("DocumentReference", doc)):
            return access
        labels = dmp.labels(doc)
        if self.p.kind == PATIENT:
            return deny("invisible-patient", "not yet announced to the patient")
        if self.p.kind == LEGAL_REPRESENTATIVE:
            return deny("invisible-representatives", "hidden from legal representatives")
        if not self.policy.habilitations.may_read(self.profession, dmp.doc_type_codes(doc)):
            return deny("habilitation", "document type not readable by this profession")
        if dmp.MASQUE_PS in labels:
            return deny("masque-ps", "document masked by the patient")
        return deny("document", "not readable")

    @staticmethod
    def _matches(query: tuple, pid: str, facets: dict) -> bool:
        """Does the document query (``(key, compiled)``) match a document of DMP ``pid`` with these
        access facets? Remembered by all three (:data:`_VERDICTS`): the query holds every term of
        the request the decision reads (caller, profession, purpose, médecin traitant), the facets
        everything it reads of the document (computed from its resource, version by version)."""
        key, test = query
        flat = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in facets.items())
        return _VERDICTS.get((key, pid, flat), lambda: test({"pid": pid, "a": facets}))

    def document_query(self, pid: str) -> dict:
        """The one definition of which documents of DMP ``pid`` the caller sees, once the DMP is
        entered (rules 4, 9 and 11): a storage filter over ``pid`` and the access facets, also
        evaluated in memory by :func:`matches` for a single document."""
        p = self.p
        if p.kind == PATIENT:
            return {"a.labels": {"$ne": dmp.INVISIBLE_PATIENT}}
        if p.kind == LEGAL_REPRESENTATIVE:
            return {"a.labels": {"$nin": [dmp.INVISIBLE_PATIENT, dmp.INVISIBLE_REPRESENTANTS_LEGAUX]}}
        if not p.is_professional:
            return {"_never": True}
        # every type code allowed by the matrix (CONTRACT.md "Habilitation"); MASQUE_PS only for
        # the médecin traitant in normal mode; the author always sees what they wrote
        allowed = sorted(self.policy.habilitations.allowed_types(self.profession))
        readable = {"a.types.0": {"$exists": True}, "a.types": {"$not": {"$elemMatch": {"$nin": allowed}}}}
        st = self.access.states.get(pid)
        if not (p.purpose == TREAT and st is not None and p.id_nat_ps in st.gp_ids):
            readable["a.masked"] = False
        return {"$or": [{"a.authors": p.id_nat_ps}, readable]}

    def can_see_binary(self, pid: str | None, doc: tuple | None) -> Decision:
        """A Binary is read under the decision of the DocumentReference its securityContext names
        (``doc`` = (pid, deleted, resource) of that document, None when there is none): the same
        DMP, not deleted, and :meth:`can_see` on it; otherwise it is an orphan nobody reads."""
        if doc is not None and doc[0] == pid and not doc[1]:
            return self.access.can_see("DocumentReference", doc[2] or {}, pid)
        return deny("binary-orphan", "content not attached to a readable document")

    # -- what a deposit carries (DESIGN.md "Documents", rules 10-11) ----------------------------
    # Decided after can_write permitted the write; the pipeline (documents/pipeline.py) parses and
    # inspects, these rules decide, and a deny answers 422 with its reason (and is journaled).
    def can_deposit(self, st: PatientState) -> Decision:
        """Rule 11: a document is deposited only on a DMP whose Patient's INS is present and
        qualified (identity status VALI or QUAL)."""
        if not dmp.is_ins_qualified(st.patient):
            return deny("ins-not-qualified",
                        "documents are deposited only on a DMP whose INS is qualified (VALI or QUAL)")
        return permit("ins-qualified", "the INS of the DMP is qualified")

    def author_of_record(self, pid: str, old: dict | None) -> list | None:
        """Rule 10: who a DocumentReference names as ``author``. A deposit by a professional names
        that professional, one in the personal space names the Patient (the patient or a
        representative deposits for them), whatever the client sent; the author of a stored
        document never changes. None: the rules set no author (the client's stands)."""
        if old is not None:
            return copy.deepcopy(old.get("author") or [])
        if self.p.id_nat_ps:
            return [self.p.reference()]
        if self.p.patient_id == pid:
            return [{"reference": f"Patient/{pid}"}]
        return None

    def may_replace(self, target, pid: str) -> Decision:
        """Rule 10: only a document's author replaces it (``relatesTo replaces``), within the same
        record. ``target`` is the stored document named (None when there is none); one answer for
        missing, elsewhere, hidden or someone else's (CONTRACT.md "REST behaviour")."""
        if target is not None and not target.deleted and target.pid == pid and self.p.kind == PS \
                and self.p.id_nat_ps in dmp.author_ids(target.resource):
            return permit("author", "the author replaces their document")
        return deny("not-author", "relatesTo.target must be a document of the same record by the same author")

    def may_attach(self, binary, pid: str, old: dict | None) -> Decision:
        """An ``attachment.url`` names a Binary of the same record not attached to another document
        (re-attaching would put it under this document's labels). ``binary`` is the stored Binary
        named (None when there is none), ``old`` the document being replaced; one answer for
        missing, elsewhere or another document's content (CONTRACT.md "REST behaviour")."""
        owner = binary and reference_id(((binary.resource or {}).get("securityContext") or {}).get("reference"),
                                        "DocumentReference")
        if binary is None or binary.deleted or binary.pid != pid \
                or (owner is not None and (old is None or owner != old.get("id"))):
            return deny("attachment-url", "attachment.url must point to a Binary of the same record not "
                        "attached to another document")
        return permit("attachment-url", "content of this record, free or this document's")


def record_target_matches(ins: tuple[str, str], cda_ins: list[tuple[str, str]]) -> Decision:
    """Rule 11: a CDA is deposited only for the DMP's patient. ``ins`` is the Patient's INS as
    FHIR (system ``urn:oid:<root>``, value), ``cda_ins`` the (root, extension) INS ids of the
    CDA's recordTarget: each must be that INS (NIR keys compared case-insensitively). Values are
    compared, never echoed."""
    system, value = ins
    want_root = system[len("urn:oid:"):] if system.startswith("urn:oid:") else system
    norm = lambda v: (v or "").strip().upper()  # noqa: E731  (NIR keys 2A/2B)
    if not cda_ins or any(r != want_root or norm(e) != norm(value) for r, e in cda_ins):
        return deny("cda-patient", "the CDA recordTarget INS does not match the INS of the DMP patient")
    return permit("cda-patient", "the CDA names the patient of the DMP")


def is_personal_document(doc: dict, pid: str) -> bool:
    """A document of the patient's personal space: its author is the Patient."""
    return any((a or {}).get("reference") == f"Patient/{pid}" for a in (doc or {}).get("author") or [])

