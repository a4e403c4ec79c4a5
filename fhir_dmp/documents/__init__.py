"""Document content checks (DESIGN.md "Documents"): safe CDA and PDF inspection.

``inspect_document`` picks the inspector from the attachment's content type;
content types other than CDA/XML and PDF are not inspected here (the caller
decides whether to accept them).
"""
from __future__ import annotations

from fhir_dmp.documents.cda import CdaInfo, check_cda_matches, inspect_cda
from fhir_dmp.documents.pdf import PdfInfo, inspect_pdf
from fhir_dmp.http.errors import PayloadTooLarge

CDA_CONTENT_TYPES = frozenset({"text/xml", "application/xml", "application/hl7-v3+xml",
                               "application/hl7-cda+xml"})
PDF_CONTENT_TYPES = frozenset({"application/pdf"})

__all__ = ["CdaInfo", "PdfInfo", "inspect_cda", "inspect_pdf", "check_cda_matches", "inspect_document",
           "CDA_CONTENT_TYPES", "PDF_CONTENT_TYPES"]


def inspect_document(content_type: str | None, data: bytes, *, max_bytes: int,
                     expression: str = "DocumentReference.content[0].attachment") -> CdaInfo | PdfInfo | None:
    """Inspect ``data`` as CDA or PDF according to ``content_type`` (parameters ignored); None if neither."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct in PDF_CONTENT_TYPES:
        return inspect_pdf(data, max_bytes=max_bytes, expression=expression)
    if ct in CDA_CONTENT_TYPES:
        if len(data) > max_bytes:
            raise PayloadTooLarge(f"document exceeds the limit of {max_bytes} bytes", expression=expression)
        return inspect_cda(data, expression=expression)
    return None
