"""CDA and PDF inspection (fhir_dmp.documents): valid documents pass, hostile ones get 422.

CDA fixtures live in tests/fixtures/cda/; PDFs are generated with pypdf (and
one by hand, to hide JavaScript inside a compressed object stream).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import ArrayObject, DictionaryObject, NameObject, TextStringObject

from fhir_dmp.documents import inspect_document
from fhir_dmp.documents.cda import CdaInfo, check_cda_matches, inspect_cda
from fhir_dmp.documents.pdf import PdfInfo, inspect_pdf
from fhir_dmp.http.errors import PayloadTooLarge, Unprocessable

CDA_DIR = Path(__file__).parents[1] / "fixtures" / "cda"
NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
NIR = "184127645108946"
ATTACHMENT = "DocumentReference.content[0].attachment"
MAX = 20 * 1024 * 1024


def cda(name: str) -> bytes:
    return (CDA_DIR / name).read_bytes()


# ----------------------------------------------------------------------------- CDA

def test_valid_minimal_cda():
    info = inspect_cda(cda("valid_minimal.xml"))
    assert info.patient_ids == [("1.2.250.1.213.1.4.8", NIR), ("1.2.250.1.999.2", "IPP-42")]
    assert info.type_code == ("2.16.840.1.113883.6.1", "11488-4")
    assert info.title == "Compte rendu de consultation"
    assert info.effective_time == "20240315103000+0100"
    check_cda_matches(info, (NIR_SYSTEM, NIR), {"11488-4"})


@pytest.mark.parametrize("name, words", [
    ("xxe_file.xml", "DOCTYPE"),
    ("xxe_parameter_entity.xml", "DOCTYPE"),
    ("billion_laughs.xml", "DOCTYPE"),
    ("external_dtd.xml", "DOCTYPE"),
    ("wrong_namespace.xml", "namespace urn:hl7-org:v3"),
    ("wrong_root.xml", "expected ClinicalDocument"),
    ("no_record_target.xml", "no recordTarget"),
    ("no_code.xml", "no code"),
    ("not_xml.txt", "not well-formed XML"),
    ("deep_nesting.xml", "not well-formed XML"),
])
def test_hostile_or_invalid_cda_refused(name, words):
    with pytest.raises(Unprocessable) as exc:
        inspect_cda(cda(name))
    err = exc.value
    assert err.status == 422
    assert words in err.diagnostics
    assert err.issues[0].expression == [ATTACHMENT]
    # never echo content: no file contents, identifiers or entity text
    for secret in ("root:", "passwd", "lol", NIR, "SECRET", "attacker"):
        assert secret not in err.diagnostics


def test_doctype_refused_even_when_utf16():
    doc = cda("xxe_file.xml").decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    with pytest.raises(Unprocessable, match="DOCTYPE"):
        inspect_cda(doc)


def test_huge_text_node_refused():
    doc = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>' + b"x" * 11_000_000 + b"</title></ClinicalDocument>"
    with pytest.raises(Unprocessable, match="not well-formed"):
        inspect_cda(doc)


def test_empty_cda_refused():
    with pytest.raises(Unprocessable):
        inspect_cda(b"")


def test_cda_patient_mismatch():
    info = inspect_cda(cda("valid_minimal.xml"))
    with pytest.raises(Unprocessable) as exc:
        check_cda_matches(info, (NIR_SYSTEM, "299017512345678"), {"11488-4"})
    assert exc.value.issues[0].expression == [ATTACHMENT]
    assert NIR not in exc.value.diagnostics and "299017512345678" not in exc.value.diagnostics
    # same value under another INS system (test NIR) is not the same identity
    with pytest.raises(Unprocessable):
        check_cda_matches(info, ("urn:oid:1.2.250.1.213.1.4.10", NIR), {"11488-4"})


def test_cda_type_mismatch():
    info = inspect_cda(cda("valid_minimal.xml"))
    with pytest.raises(Unprocessable) as exc:
        check_cda_matches(info, (NIR_SYSTEM, NIR), {"11490-0"})
    assert exc.value.issues[0].expression == ["DocumentReference.type"]


def test_cda_without_ins_or_with_two_patients():
    no_ins = CdaInfo(patient_ids=[("1.2.250.1.999.2", "IPP-42")], type_code=("2.16.840.1.113883.6.1", "11488-4"))
    with pytest.raises(Unprocessable, match="no INS"):
        check_cda_matches(no_ins, (NIR_SYSTEM, NIR), {"11488-4"})
    two = CdaInfo(patient_ids=[("1.2.250.1.213.1.4.8", NIR), ("1.2.250.1.213.1.4.8", "299017512345678")],
                  type_code=("2.16.840.1.113883.6.1", "11488-4"))
    with pytest.raises(Unprocessable, match="does not match"):
        check_cda_matches(two, (NIR_SYSTEM, NIR), {"11488-4"})


# ----------------------------------------------------------------------------- PDF

N = NameObject


def _write(w: PdfWriter) -> bytes:
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def _base() -> PdfWriter:
    w = PdfWriter()
    w.add_blank_page(200, 200)
    w.add_blank_page(200, 200)
    return w


def _js_action() -> DictionaryObject:
    return DictionaryObject({N("/S"): N("/JavaScript"), N("/JS"): TextStringObject("app.alert(1)")})


def _pdf_with_object_stream(hidden: bytes) -> bytes:
    """PDF 1.5 whose catalog's /OpenAction is object 4, stored *compressed* in object stream 5.

    Hand-built (pypdf does not write object streams) with a correct xref stream.
    """
    out = bytearray(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}

    def obj(num: int, body: bytes) -> None:
        offsets[num] = len(out)
        out.extend(b"%d 0 obj\n" % num + body + b"\nendobj\n")

    obj(1, b"<< /Type /Catalog /Pages 2 0 R /OpenAction 4 0 R >>")
    obj(2, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>")
    obj(3, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>")
    header = b"4 0 "
    packed = zlib.compress(header + hidden)
    obj(5, b"<< /Type /ObjStm /N 1 /First %d /Filter /FlateDecode /Length %d >>\nstream\n" % (len(header), len(packed))
        + packed + b"\nendstream")
    xref_off = len(out)
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    for num in range(1, 7):
        if num == 4:
            rows.append(struct.pack(">BIH", 2, 5, 0))
        elif num == 6:
            rows.append(struct.pack(">BIH", 1, xref_off, 0))
        else:
            rows.append(struct.pack(">BIH", 1, offsets[num], 0))
    data = b"".join(rows)
    out.extend(b"6 0 obj\n<< /Type /XRef /Size 7 /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n" % len(data)
               + data + b"\nendstream\nendobj\n")
    out.extend(b"startxref\n%d\n%%%%EOF\n" % xref_off)
    return bytes(out)


def test_valid_pdf():
    info = inspect_pdf(_write(_base()), max_bytes=MAX)
    assert info == PdfInfo(pages=2, version="1.3")


def test_valid_pdf_with_object_stream():
    info = inspect_pdf(_pdf_with_object_stream(b"<< /S /URI /URI (https://example.org/) >>"), max_bytes=MAX)
    assert info.pages == 1


def _refused(data: bytes, words: str = "forbidden") -> Unprocessable:
    with pytest.raises(Unprocessable) as exc:
        inspect_pdf(data, max_bytes=MAX)
    assert exc.value.status == 422
    assert words in exc.value.diagnostics
    assert exc.value.issues[0].expression == [ATTACHMENT]
    return exc.value


def test_pdf_javascript_open_action():
    w = _base()
    w._root_object[N("/OpenAction")] = _js_action()
    data = _write(w)
    assert "JavaScript" in _refused(data).diagnostics
    # the name hex-escaped (#61 = 'a') escapes a byte scan, not the parsed object walk
    _refused(data.replace(b"/JavaScript", b"/J#61vaScript"))


def test_pdf_javascript_hidden_in_compressed_object_stream():
    assert "JavaScript" in _refused(_pdf_with_object_stream(b"<< /S /JavaScript /JS (app.alert(1)) >>")).diagnostics


def test_pdf_javascript_name_tree_and_additional_actions():
    w = _base()
    w._root_object[N("/Names")] = DictionaryObject(
        {N("/JavaScript"): DictionaryObject({N("/Names"): ArrayObject([TextStringObject("x"), _js_action()])})})
    _refused(_write(w))
    w = _base()
    w.pages[0][N("/AA")] = DictionaryObject({N("/O"): _js_action()})
    _refused(_write(w).replace(b"/JavaScript", b"/Java#53cript"))


def test_pdf_javascript_uri():
    w = _base()
    w._root_object[N("/OpenAction")] = DictionaryObject({N("/S"): N("/URI"),
                                                         N("/URI"): TextStringObject("javascript:alert(1)")})
    _refused(_write(w))


def test_pdf_launch_action():
    w = _base()
    w._root_object[N("/OpenAction")] = DictionaryObject({N("/S"): N("/Launch"), N("/F"): TextStringObject("calc.exe")})
    data = _write(w)
    assert "Launch" in _refused(data).diagnostics
    assert "Launch" in _refused(data.replace(b"/Launch", b"/L#61unch")).diagnostics


def test_pdf_embedded_file():
    w = _base()
    w.add_attachment("note.txt", b"hello")
    data = _write(w)
    assert "embedded" in _refused(data).diagnostics
    _refused(data.replace(b"/EmbeddedFile", b"/E#6dbeddedFile"))


def test_pdf_encrypted_refused():
    w = _base()
    w.encrypt("secret")
    _refused(_write(w), "encrypted")


def test_pdf_truncated_and_not_pdf():
    data = _write(_base())
    _refused(data[: len(data) // 2], "truncated")
    _refused(b"SECRET plain text", "not a PDF")
    _refused(b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n", "malformed")


def test_pdf_too_large():
    with pytest.raises(PayloadTooLarge):
        inspect_pdf(_write(_base()), max_bytes=100)


def test_pdf_structure_budget():
    # many objects, tiny budget: refused by the inspector's own limits, not by a timeout of the test
    w = PdfWriter()
    for _ in range(50):
        w.add_blank_page(10, 10)
    assert inspect_pdf(_write(w), max_bytes=MAX).pages == 50
    with pytest.raises(Unprocessable, match="too many objects"):
        inspect_pdf(_write(w), max_bytes=MAX, max_objects=10)


def test_inspect_document_dispatch():
    assert isinstance(inspect_document("application/pdf", _write(_base()), max_bytes=MAX), PdfInfo)
    assert isinstance(inspect_document("text/xml; charset=utf-8", cda("valid_minimal.xml"), max_bytes=MAX), CdaInfo)
    assert inspect_document("text/plain", b"x", max_bytes=MAX) is None
    with pytest.raises(PayloadTooLarge):
        inspect_document("application/hl7-v3+xml", cda("valid_minimal.xml"), max_bytes=10)


def _classic_pdf(objs: list[tuple[int, bytes]]) -> bytes:
    """A PDF 1.4 with a correct classic xref table around the given objects (object 1 = catalog)."""
    out, offs = bytearray(b"%PDF-1.4\n"), {}
    for num, body in objs:
        offs[num] = len(out)
        out += b"%d 0 obj\n" % num + body + b"\nendobj\n"
    xref, size = len(out), max(offs) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for i in range(1, size):
        out += b"%010d 00000 n \n" % offs.get(i, 0)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


@pytest.mark.parametrize("name", ["nesting", "page_tree_cycle", "decompression_bomb"])
def test_pdf_hostile_structures_refused(name):
    data = {
        "nesting": lambda: _classic_pdf([(1, b"<< /Type /Catalog /Pages 2 0 R /X " + b"[" * 100_000 + b"]" * 100_000
                                             + b" >>"), (2, b"<< /Type /Pages /Kids [] /Count 0 >>")]),
        "page_tree_cycle": lambda: _classic_pdf([(1, b"<< /Type /Catalog /Pages 2 0 R >>"),
                                                 (2, b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1 >>"),
                                                 (3, b"<< /Type /Page /Parent 2 0 R >>")]),
        # 64 MB of zeros in a ~64 KB compressed object stream (inspector caps inflation at 32 MB)
        "decompression_bomb": lambda: _pdf_with_object_stream(b"<< /A (" + b"0" * 64_000_000 + b") >>"),
    }[name]()
    _refused(data, "malformed")
