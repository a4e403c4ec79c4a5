"""Builders of valid DMP resources for tests (INS with a correct key, DMP labels, Consents)."""
from __future__ import annotations

import base64
import itertools
import uuid

NIR = "urn:oid:1.2.250.1.213.1.4.8"
IDNATPS = "urn:oid:1.2.250.1.71.4.2.1"
LABELS = "urn:oid:1.2.250.1.213.1.1.4.13"
LOINC = "http://loinc.org"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
STATUS_CS = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-identity-status"

PS_DR = "810000000001"        # médecin
PS_OTHER = "810000000002"     # another médecin
PS_PHARMA = "810000000003"    # pharmacien
PS_KINE = "810000000004"      # masseur-kinésithérapeute
PS_SAMU = "810000000015"      # médecin régulateur

CONSULTATION, DISCHARGE, LAB, IMAGING, PRESCRIPTION = "11488-4", "11490-0", "11502-2", "18748-4", "57833-6"

_serial = itertools.count(1)


def nir(body13: str | None = None) -> str:
    """A valid NIR: body + key = 97 - (body mod 97) (Corsica 2A -> 19, 2B -> 18)."""
    if body13 is None:
        body13 = f"1850375{next(_serial):06d}"
    number = int(body13.replace("2A", "19").replace("2B", "18"))
    return f"{body13}{97 - number % 97:02d}"


def patient(ins: str | None = None, *, status: str = "VALI", gp: str | None = None, email: str | None = None,
            phone: str | None = None, active: bool = True, family: str = "Martin", given: str = "Claire") -> dict:
    res = {"resourceType": "Patient", "active": active,
           "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": "1985-03-12"}
    if ins is not False:
        res["identifier"] = [{"system": NIR, "value": ins or nir()}]
    if status:
        res["extension"] = [{"url": RELIABILITY, "extension": [{
            "url": "identityStatus", "valueCoding": {"system": STATUS_CS, "code": status}}]}]
    if gp:
        res["generalPractitioner"] = [{"identifier": {"system": IDNATPS, "value": gp}}]
    telecom = []
    if email:
        telecom.append({"system": "email", "value": email})
    if phone:
        telecom.append({"system": "phone", "value": phone, "use": "mobile"})
    if telecom:
        res["telecom"] = telecom
    return res


def related_person(pid: str, relationship: str = "GUARD", *, active: bool = True, start: str | None = None,
                   end: str | None = None, family: str = "Martin", given: str = "Jeanne") -> dict:
    """A legal representative: v3-RoleCode PRN (parent) or GUARD (guardian)."""
    res = {"resourceType": "RelatedPerson", "active": active, "patient": {"reference": f"Patient/{pid}"},
           "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                         "code": relationship}]}],
           "name": [{"family": family, "given": [given]}]}
    if start or end:
        res["period"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    return res


def pdf_bytes(text: str = "Compte rendu") -> bytes:
    from io import BytesIO
    from pypdf import PdfWriter
    w = PdfWriter()
    w.add_blank_page(width=200, height=200)
    w.add_metadata({"/Title": text})
    out = BytesIO()
    w.write(out)
    return out.getvalue()


def docref(pid: str, type_code: str = CONSULTATION, *, labels=(), content: bytes | None = None,
           content_type: str = "application/pdf", author: str | None = None) -> dict:
    res = {"resourceType": "DocumentReference", "status": "current",
           "type": {"coding": [{"system": LOINC, "code": type_code}]},
           "subject": {"reference": f"Patient/{pid}"}, "date": "2026-11-20T10:00:00+01:00",
           "content": [{"attachment": {"contentType": content_type,
                                       "data": base64.b64encode(content if content is not None
                                                                else pdf_bytes()).decode()}}]}
    if labels:
        res["securityLabel"] = [{"coding": [{"system": LABELS, "code": code}]} for code in labels]
    if author:
        res["author"] = [{"identifier": {"system": IDNATPS, "value": author}}]
    return res


def consent(pid: str, ptype: str = "permit", *, actor: str | None = None, purpose: str = "TREAT",
            verified: bool | None = None, status: str = "active") -> dict:
    prov = {"type": ptype, "purpose": [{"system": ACT_REASON, "code": purpose}]}
    if actor:
        prov["actor"] = [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                               "code": "PRCP"}]},
                          "reference": {"identifier": {"system": IDNATPS, "value": actor}}}]
    res = {"resourceType": "Consent", "status": status,
           "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                 "code": "patient-privacy"}]},
           "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
           "patient": {"reference": f"Patient/{pid}"},
           "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                      "code": "OPTIN" if ptype == "permit" else "OPTOUT"}]},
           "provision": prov}
    if verified is not None:
        res["verification"] = [{"verified": verified}]
    return res


# --- the directory of professionals (a small sample of the ANS « Annuaire Santé » FHIR export) -----

PROFESSION = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
SPECIALTY = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"
#: idNatPs -> (family, given, town, TRE_G15 profession, TRE_R38 speciality code and label)
DIRECTORY = {
    PS_DR: ("Dupont", "Jeanne", "Lyon", "10", "SM54", "Médecine générale"),
    PS_OTHER: ("Durand", "Paul", "Paris", "10", "SM04", "Cardiologie et maladies vasculaires"),
    PS_PHARMA: ("Bernard", "Lucie", "Lyon", "21", None, None),
    PS_SAMU: ("Petit", "Marc", "Marseille", "10", "SM54", "Médecine générale"),
}


def practitioner(id_nat_ps: str) -> dict:
    """The directory's Practitioner for one idNatPs of :data:`DIRECTORY` (id ``ps-<idNatPs>``)."""
    family, given, town, profession, _, _ = DIRECTORY[id_nat_ps]
    return {"resourceType": "Practitioner", "id": f"ps-{id_nat_ps}", "active": True,
            "identifier": [{"system": IDNATPS, "value": id_nat_ps}],
            "name": [{"family": family, "given": [given]}],
            "address": [{"use": "work", "city": town, "country": "FRA"}],
            "qualification": [{"code": {"coding": [{"system": PROFESSION, "code": profession}]}}]}


def practitioner_role(id_nat_ps: str) -> dict:
    """Its PractitionerRole: the profession (``code``) and the speciality (``specialty``)."""
    _, _, _, profession, specialty, label = DIRECTORY[id_nat_ps]
    role = {"resourceType": "PractitionerRole", "id": f"role-{id_nat_ps}", "active": True,
            "practitioner": {"reference": f"Practitioner/ps-{id_nat_ps}"},
            "code": [{"coding": [{"system": PROFESSION, "code": profession}]}]}
    if specialty:
        role["specialty"] = [{"coding": [{"system": SPECIALTY, "code": specialty, "display": label}]}]
    return role


def directory_bundle() -> dict:
    """The sample as the national directory publishes it: a collection Bundle."""
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": make(ps)} for ps in DIRECTORY for make in (practitioner, practitioner_role)]}


def load_directory(config, folder) -> int:
    """Import :func:`directory_bundle` the way ``fhir-dmp load`` does (``loader.load_files``)."""
    import json
    from pathlib import Path

    from fhir_dmp.runtime.loader import load_files
    path = Path(folder) / "directory.json"
    path.write_text(json.dumps(directory_bundle()), encoding="utf-8")

    class Quiet:
        def update(self, _n):
            pass
    return load_files(config, [path], Quiet())


# --- the journal as stored (entries are packed: fhir_dmp.storage.core.pack) -----------------------

def journal_entries(db, flt: dict | None = None) -> list[dict]:
    """Raw journal entries matching ``flt``, each with its resource unpacked: those still in a
    page (as the sealer will derive them: ``fhir_dmp.storage.pages``), those of the runs
    (``fhir_dmp.storage.runs``) and the previous versions' ``AuditEvent`` documents, the pages
    read first (an entry sealed between the two reads comes once)."""
    from fhir_dmp.storage import unpack
    from fhir_dmp.storage.filters import matches
    from fhir_dmp.storage.pages import entries
    from fhir_dmp.storage.runs import unpacked_entry
    found = {d["_id"]: d for page in db["AuditEvent_page"].find() for d in entries(page) if matches(flt or {}, d)}
    found.update((d["_id"], d) for run in db["AuditEvent_link"].find({"e": {"$exists": True}})
                 for d in map(unpacked_entry, run["e"]) if matches(flt or {}, d))
    found.update((d["_id"], d) for d in db["AuditEvent"].find(flt or {}))
    return [{**d, "res": unpack(d["res"])} for d in found.values()]


def _run_of(db, event_id: str) -> dict | None:
    """The run holding the sealed entry ``event_id`` (found by its metadata), None if none does."""
    meta = db["AuditEvent_run_meta"].find_one({"ids": event_id}, {"_id": 1})
    return meta and db["AuditEvent_link"].find_one({"_id": meta["_id"]})


def _rewrite_run(db, run: dict, **meta_changes) -> None:
    """Store ``run``'s entries ``e`` as they are now, with a new ``u`` in the run and its metadata
    (not read from a process's memo: fhir_dmp.storage.runs) and ``meta_changes`` in the latter."""
    u = uuid.uuid4().hex
    db["AuditEvent_link"].update_one({"_id": run["_id"]}, {"$set": {"e": run["e"], "u": u}})
    db["AuditEvent_run_meta"].update_one({"_id": run["_id"]}, {"$set": {"u": u, **meta_changes}})


def rewrite_journal_entry(db, event_id: str, **changes) -> None:
    """Tamper with a stored journal entry the way someone with database access would (in its
    run, or an ``AuditEvent`` document of a previous version)."""
    from fhir_dmp.storage import pack, unpack
    run = _run_of(db, event_id)
    if run is None:
        doc = db["AuditEvent"].find_one({"_id": event_id})
        db["AuditEvent"].update_one({"_id": event_id}, {"$set": {"res": pack({**unpack(doc["res"]), **changes})}})
        return
    for d in run["e"]:
        if d["_id"] == event_id:
            d["res"] = pack({**unpack(d["res"]), **changes})
    _rewrite_run(db, run)


def delete_journal_entry(db, event_id: str) -> None:
    """Delete a stored journal entry the way someone with database access would (from its run,
    or an ``AuditEvent`` document of a previous version), its link left in place."""
    run = _run_of(db, event_id)
    if run is None:
        db["AuditEvent"].delete_one({"_id": event_id})
        return
    run["e"] = [d for d in run["e"] if d["_id"] != event_id]
    _rewrite_run(db, run, ids=[d["_id"] for d in run["e"]])


def retime_journal(db, when) -> None:
    """Set each sealed entry's ``lu`` to ``when(entry)`` (tests that move the journal in time): in
    its run (its metadata's bounds kept true) or its ``AuditEvent`` document of a previous version."""
    for run in db["AuditEvent_link"].find({"e": {"$exists": True}}):
        for d in run["e"]:
            d["lu"] = when(d)
        lus = [d["lu"] for d in run["e"]]
        _rewrite_run(db, run, lo=min(lus), hi=max(lus), **{"b.lu": [min(lus), max(lus)]})
    for d in db["AuditEvent"].find({}, {"lu": 1, "pid": 1}):
        db["AuditEvent"].update_one({"_id": d["_id"]}, {"$set": {"lu": when(d)}})


def seal_journal(db, key_path) -> int:
    """Seal every unsealed page now, as the sealer does within its bound (tests about sealed
    entries as stored); the number of events sealed."""
    from fhir_dmp.audit.sealer import Sealer
    from fhir_dmp.storage import Storage
    sealer = Sealer(Storage(db.client, db), key_path)
    try:
        return sealer.seal_all()
    finally:
        sealer.release()
