"""May the caller write this? (DESIGN.md rules 10-11, CONTRACT.md "Lifecycle of a DMP").

:meth:`WriteRules.can_write` decides every create, update, patch and delete, by type: the
Patient (who opens a DMP, who sets the médecin traitant and opens or closes it, who changes the
INS), Consents (the patient's choices; a professional only attests their own first access),
documents and their content (professionals in normal mode feed the DMP, only the author changes
or withdraws a document, the patient's personal space, the patient masking a document, the
opposition to feeding), legal representatives (:mod:`.representatives`). Update-as-create with a
client-chosen id is the administrator's.
"""
from __future__ import annotations

from ...profiles import dmp
from ..principal import ADMIN, IDNATPS_SYSTEM, LEGAL_REPRESENTATIVE, PATIENT, PRIVACY_OFFICER, PS, TREAT
from .consents import consent_actor_ids, consent_kind, identifier_key
from .documents import is_personal_document
from .state import DIRECTORY, SERVER_WRITTEN, Decision, PatientState, Rules, deny, permit

PERSONAL_SPACE_TYPES = ("application/pdf", "text/plain")
OWNER_FIELDS_REASON = ("only the patient, a legal representative or the administrator sets the médecin "
                       "traitant (generalPractitioner) or opens and closes the DMP (active)")


class WriteRules(Rules):
    """The write rules for one request."""

    def can_create_with_id(self, resource_type: str) -> Decision:
        """Update-as-create (PUT of an id that does not exist) is the administrator's (``fhir-dmp
        load``); for anyone else the id answers like one they may not see (CONTRACT.md "REST")."""
        if self.p.kind == ADMIN:
            return permit("admin", f"the administrator creates {resource_type} with its id")
        return deny("update-as-create", "only the administrator creates a resource with a chosen id")

    def can_write(self, interaction: str, resource_type: str, new: dict | None, old: dict | None,
                  pid: str | None, *, context: dict | None = None) -> Decision:
        """May the caller write ``new`` over ``old`` in DMP ``pid``? ``context`` is the
        DocumentReference a new Binary attaches to (its securityContext)."""
        role = self.role_decision()
        if role:
            return role
        if resource_type in SERVER_WRITTEN:
            return deny("read-only", f"{resource_type} is read-only")
        if resource_type in DIRECTORY:
            # only the administrator's import reaches here: REST answers 405 before any decision
            return permit("admin", "the directory is imported by the administrator") if self.p.kind == ADMIN \
                else deny("read-only", f"{resource_type} is read-only")
        if resource_type == "Patient":
            return self._write_patient(interaction, new, old, pid)
        if pid is None:
            return deny("no-patient", "resource outside any DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if resource_type in ("Consent", "DocumentReference", "Binary") and not st.exists:
            return deny("dmp-state", "no such DMP")
        if resource_type == "Consent":
            return self._write_consent(interaction, new, old, st, access)
        if resource_type in ("DocumentReference", "Binary"):
            decision = self._write_document(interaction, resource_type, new, old, st, access)
            if decision.permit and resource_type == "Binary" and context is not None \
                    and self.p.id_nat_ps not in dmp.author_ids(context):
                return deny("not-author", "only the author attaches content to a document")
            return decision
        if resource_type == "RelatedPerson":
            return self.access.representatives.can_write(interaction, new, old, st, access)
        if resource_type == "Task":
            return self._write_task(interaction, access)
        return deny("type", f"{resource_type} is not writable")

    def _write_task(self, interaction, access) -> Decision:
        """Review cases (CONTRACT.md "Privacy operations"): the server opens them (``fhir_dmp/review/``,
        never through this decision), the privacy officer takes and closes them, nobody deletes
        one; which changes a case allows is the review's (``review/decide.py``)."""
        if interaction == "create":
            return deny("review-server", "review cases are opened by the server")
        if interaction == "delete":
            return deny("review-kept", "review cases are never deleted")
        if self.p.kind != PRIVACY_OFFICER:
            return deny("review-officer", "only the privacy officer takes and closes review cases")
        if not access.permit:
            return access
        return permit("privacy-officer", "the privacy officer takes or closes a review case")

    def _write_patient(self, interaction, new, old, pid) -> Decision:
        p = self.p
        if p.kind == ADMIN:
            return permit("admin", "administrator manages DMPs")
        if interaction == "create":
            if p.kind == PS and p.purpose == TREAT:
                if _owner_fields_changed(new, None):
                    return deny("owner-fields", OWNER_FIELDS_REASON)
                return permit("ps-creates-dmp", "a professional opens the DMP (patient agreed)",
                              obligations={"authorize_creator": True, "notify": "first_access"})
            return deny("create-dmp", "only a professional or an administrator opens a DMP")
        if interaction == "delete":
            return deny("delete-dmp", "only an administrator deletes a DMP")
        st = self.state(pid)
        access = self.dmp_access(st)
        if not access.permit:
            return access
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            if (new or {}).get("identifier") != (old or {}).get("identifier"):
                return deny("patient-identity", "the INS is changed by a professional, not the patient")
            return access
        if p.kind == PS and p.purpose == TREAT and access.rule in ("authorized", "establishment", "medecin-traitant"):
            if _owner_fields_changed(new, old):
                return deny("owner-fields", OWNER_FIELDS_REASON)
            return access
        return deny("patient-write", "not allowed to change this DMP")

    def _write_consent(self, interaction, new, old, st, access) -> Decision:
        p = self.p
        if p.kind == ADMIN:
            return permit("admin", "administrator manages consents")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            return access
        if p.kind == PS:
            if interaction != "create":
                return deny("ps-consent", "a professional only attests a first access")
            if not st.open:
                return deny("dmp-closed", "the DMP is closed")
            if st.matching("block", self.my_ids) and p.id_nat_ps not in st.gp_ids:
                return deny("blocked", "the patient blocked this professional")
            if consent_kind(new) != "permit":
                return deny("ps-consent", "a professional may only create their own authorization")
            if consent_actor_ids(new) != {identifier_key(IDNATPS_SYSTEM, p.id_nat_ps)}:
                return deny("ps-consent", "a professional may only authorize themselves")
            if not any(v.get("verified") is True for v in new.get("verification") or []):
                return deny("ps-consent", "the first access must be attested (verification.verified)")
            if self.policy.config.first_access == "patient-code":
                # CONTRACT.md "Lifecycle": the PS also gives the one-time code the patient received
                return permit("first-access", "first access with the patient's code",
                              obligations={"notify": "first_access", "patient_code": True})
            return permit("first-access", "attested first access", obligations={"notify": "first_access"})
        return deny("consent-write", "not allowed")

    def _write_document(self, interaction, rtype, new, old, st, access) -> Decision:
        p = self.p
        if p.kind == ADMIN:
            return deny("admin-no-content", "an administrator never writes document content")
        if p.kind in (PATIENT, LEGAL_REPRESENTATIVE):
            personal = self._personal_space(interaction, rtype, new, old, st, access)
            if personal is not None:
                return personal
            if interaction in ("update", "patch") and rtype == "DocumentReference" and p.kind == PATIENT \
                    and access.permit and old is not None:
                if dmp.INVISIBLE_PATIENT in dmp.labels(old):
                    return deny("invisible-patient", "not yet announced to the patient")
                keep = {dmp.MASQUE_PS}
                if _without_labels(new, keep) == _without_labels(old, keep) and \
                        dmp.labels(new) - keep == dmp.labels(old) - keep:
                    return permit("patient-masks", "the patient masks or unmasks a document")
                return deny("patient-document", "a patient may change only MASQUE_PS")
            return deny("patient-document", "patients do not write clinical documents")
        if p.kind != PS or p.purpose != TREAT:
            return deny("feed-mode", "documents are fed in normal mode by a professional")
        if not access.permit:
            return access
        if interaction == "create":
            return self._feeding_opposition(st) or access
        if old is not None and p.id_nat_ps in dmp.author_ids(old):
            return permit("author", "the author changes their document")
        return deny("not-author", "only the author replaces or withdraws a document")

    # -- lifecycle rules (CONTRACT.md "Lifecycle of a DMP") ---------------------------------
    def _feeding_opposition(self, st: PatientState) -> Decision | None:
        """A deposit the patient's opposition to feeding forbids (no actor: every PS)."""
        opposed = st.matching("oppose_feeding", self.my_ids, everyone=True)
        if opposed:
            return deny("feeding-opposed", "the patient opposed the feeding of their DMP "
                        "(motif légitime); nothing can be deposited", consents=opposed)
        return None

    def _personal_space(self, interaction, rtype, new, old, st, access) -> Decision | None:
        """The patient's personal space: the patient or a representative deposits PDF or text
        documents authored by the Patient, and only they change or withdraw them. None: the
        write is not about the personal space (other rules decide)."""
        if not access.permit or rtype != "DocumentReference":
            return None
        if interaction == "create":
            types = {((c or {}).get("attachment") or {}).get("contentType", "").split(";")[0].strip()
                     for c in (new or {}).get("content") or []}
            if not types or not types <= set(PERSONAL_SPACE_TYPES):
                return deny("personal-space", "the personal space takes PDF or text documents only")
            return permit("personal-space", "the patient deposits in their personal space")
        if old is not None and is_personal_document(old, st.pid):
            return permit("personal-space", "the patient changes or withdraws their own document")
        if interaction == "delete":
            return deny("patient-document", "only the author withdraws a document")
        return None


def _owner_fields_changed(new: dict | None, old: dict | None) -> bool:
    """Does a write set or change what only the patient's side decides (CONTRACT.md "The DMP in FHIR
    terms": ``generalPractitioner`` and ``active``)? A DMP is created open."""
    new, old = new or {}, old
    if old is None:
        return bool(new.get("generalPractitioner")) or new.get("active", True) is not True
    return (dmp.general_practitioner_ids(new) != dmp.general_practitioner_ids(old)
            or (new.get("generalPractitioner") or []) != (old.get("generalPractitioner") or [])
            or new.get("active", True) != old.get("active", True))


def _without_labels(doc: dict | None, codes: set[str]) -> dict:
    """The document without the given DMP labels and without meta (for comparisons)."""
    if doc is None:
        return {}
    out = dmp.set_labels(doc, dmp.labels(doc) - codes)
    out = {k: v for k, v in out.items() if k not in ("meta", "text")}
    if not out.get("securityLabel"):
        out.pop("securityLabel", None)
    return out
