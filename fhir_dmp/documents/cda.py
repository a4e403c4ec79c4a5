"""Safe inspection of CDA R2 documents (DESIGN.md "Documents", access rule 10).

The XML is parsed by lxml (libxml2) with every dangerous feature off:
no entity resolution, no DTD loading or validation, no network, no huge-tree
mode (libxml2's depth / text-size limits stay on). Any DOCTYPE is refused
outright, so XXE (``file:///etc/passwd``), external DTDs and entity-expansion
bombs ("billion laughs") never get further than the parser. See OWASP "XML
External Entity Prevention Cheat Sheet" (lxml section).

Diagnostics name elements and the failed rule, never document content
(no text, no attribute values, no identifiers).

CDA R2: namespace ``urn:hl7-org:v3``, root ``ClinicalDocument``; patient in
``recordTarget/patientRole/id`` (INS roots 1.2.250.1.213.1.4.8 NIR, .9 NIA,
.10 test NIR, .11 demo NIR — CI-SIS "Volet Structuration Minimale"), type in
``ClinicalDocument/code`` (LOINC 2.16.840.1.113883.6.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from fhir_dmp.http.errors import Unprocessable
from fhir_dmp.security.decision import record_target_matches

HL7 = "urn:hl7-org:v3"
NS = {"h": HL7}
LOINC_OID = "2.16.840.1.113883.6.1"
INS_ROOTS = ("1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11")
ATTACHMENT = "DocumentReference.content[0].attachment"
TYPE = "DocumentReference.type"
_NO_DOCTYPE = "CDA document must not contain a DOCTYPE (DTDs and entities are refused)"
_DOCTYPE_MARKERS = tuple("<!DOCTYPE".encode(enc) for enc in ("ascii", "utf-16-le", "utf-16-be"))


@dataclass(frozen=True)
class CdaInfo:
    """What the server needs from a CDA header.

    ``patient_ids``: every ``recordTarget/patientRole/id`` as (root, extension);
    ``type_code``: (codeSystem OID, code) of ``ClinicalDocument/code``;
    ``effective_time``: the raw HL7 TS value of ``effectiveTime/@value``.
    """

    patient_ids: list[tuple[str, str]] = field(default_factory=list)
    type_code: tuple[str, str] = ("", "")
    title: str | None = None
    effective_time: str | None = None
    record_targets: int = 1


def _parser() -> etree.XMLParser:
    # a fresh parser per call: lxml parsers are not thread-safe to share
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_pis=True,
                           collect_ids=False, recover=False)


def _local(tag) -> str:
    if not isinstance(tag, str):
        return "?"
    name = etree.QName(tag).localname
    return name[:64] if name.replace("-", "").replace("_", "").replace(".", "").isalnum() else "?"


def inspect_cda(data: bytes, *, expression: str = ATTACHMENT) -> CdaInfo:
    """Parse a CDA R2 document safely and extract its header facts.

    Raises :class:`Unprocessable` (422) with ``expression`` when the content is
    not XML, has a DOCTYPE or entities, is not a ``urn:hl7-org:v3``
    ``ClinicalDocument``, or lacks ``recordTarget`` / ``code``.
    """
    def fail(msg: str):
        return Unprocessable(msg, expression=expression)

    if not isinstance(data, (bytes, bytearray, memoryview)) or not bytes(data[:1]):
        raise fail("CDA content is empty")
    data = bytes(data)
    # refuse before parsing, for a precise diagnostic (the docinfo check below covers other encodings)
    if any(marker in data for marker in _DOCTYPE_MARKERS):
        raise fail(_NO_DOCTYPE)
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        err = exc.error_log.last_error if exc.error_log else None
        where = f" (line {err.line}, column {err.column}, {err.type_name})" if err is not None else ""
        raise fail(f"CDA content is not well-formed XML{where}") from None
    except (ValueError, etree.LxmlError):
        raise fail("CDA content is not parseable XML") from None

    tree = root.getroottree()
    docinfo = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise fail(_NO_DOCTYPE)
    for _ in root.iter(etree.Entity):
        raise fail("CDA document must not contain entity references")

    if not isinstance(root.tag, str) or etree.QName(root).namespace != HL7:
        raise fail(f"root element '{_local(root.tag)}' is not in the CDA namespace {HL7}")
    if etree.QName(root).localname != "ClinicalDocument":
        raise fail(f"root element is '{_local(root.tag)}', expected ClinicalDocument")

    targets = root.findall("h:recordTarget", NS)
    if not targets:
        raise fail("CDA header has no recordTarget")
    ids: list[tuple[str, str]] = []
    for rt in targets:
        for el in rt.findall("h:patientRole/h:id", NS):
            ids.append(((el.get("root") or "").strip(), (el.get("extension") or "").strip()))
    if not ids:
        raise fail("CDA recordTarget has no patientRole/id")

    code = root.find("h:code", NS)
    if code is None or not (code.get("code") or "").strip():
        raise fail("CDA header has no code (ClinicalDocument/code/@code)")
    type_code = ((code.get("codeSystem") or "").strip(), code.get("code").strip())

    title_el = root.find("h:title", NS)
    title = "".join(title_el.itertext()).strip() or None if title_el is not None else None
    eff = root.find("h:effectiveTime", NS)
    effective = (eff.get("value") or "").strip() or None if eff is not None else None
    return CdaInfo(patient_ids=ids, type_code=type_code, title=title, effective_time=effective,
                   record_targets=len(targets))


def check_cda_matches(info: CdaInfo, ins: tuple[str, str], type_codes: set[str], *,
                      journal=None) -> None:
    """Refuse (422) a CDA whose patient or type disagrees with the DocumentReference.

    ``ins`` is the Patient's INS as FHIR (system ``urn:oid:<root>``, value);
    the CDA must carry exactly one recordTarget with INS ids (roots in
    :data:`INS_ROOTS`); whether they name the DMP's patient is the decision
    module's rule (:func:`~fhir_dmp.security.decision.record_target_matches`),
    whose denial is passed to ``journal`` before the 422. ``type_codes`` are
    the codes of ``DocumentReference.type``; the CDA's LOINC code must be one.
    """
    if info.record_targets != 1:
        raise Unprocessable("a DMP document must have exactly one recordTarget", expression=ATTACHMENT)
    cda_ins = [(r, e) for r, e in info.patient_ids if r in INS_ROOTS]
    if not cda_ins:
        raise Unprocessable("CDA recordTarget carries no INS (patientRole/id with an INS root OID)",
                            expression=ATTACHMENT)
    decision = record_target_matches(ins, cda_ins)
    if not decision.permit:
        if journal is not None:
            journal(decision)
        raise Unprocessable(decision.reason, expression=ATTACHMENT)
    cs, code = info.type_code
    if cs and cs != LOINC_OID:
        raise Unprocessable("CDA ClinicalDocument/code must be a LOINC code (2.16.840.1.113883.6.1)",
                            expression=TYPE)
    if code not in set(type_codes or ()):
        raise Unprocessable("CDA ClinicalDocument/code disagrees with DocumentReference.type", expression=TYPE)
