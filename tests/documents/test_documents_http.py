"""Encrypted documents end to end, over HTTP (DESIGN.md "Documents", "Storage": attachments).

Through the real app, real tokens and the real database: deposits of PDF and
CDA R2 (inline ``attachment.data``, raw ``Binary`` upload, IHE MHD ITI-65
Provide Document Bundle), retrieval byte for byte (ITI-67 search, ITI-68
retrieve), hostile content refused before anything is stored, no plaintext
anywhere in the database, replacement and withdrawal by the author, KEK
rotation and crypto-shredding.
"""
from __future__ import annotations

import base64
import hashlib
import io
import re
import uuid
from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import (
    DecodedStreamObject,
    DictionaryObject,
    NameObject,
    TextStringObject,
)

from fhir_dmp.runtime.services import services

from tests import builders as b

CDA_DIR = Path(__file__).parents[1] / "fixtures" / "cda"
INS_ROOT = "1.2.250.1.213.1.4.8"
XDS_PDF = "urn:ihe:iti:xds-sd:pdf:2008"
# every collection where a deposit leaves a trace (metadata, content, history)
STORED = ("DocumentReference", "DocumentReference_history", "Binary", "Binary_history",
          "content_blobs", "content_chunks")


# ----------------------------------------------------------------------------- content builders

def marker(kind: str) -> str:
    """A unique plaintext string put in a document, searched for later in the database."""
    return f"PLAINTEXT{kind}{uuid.uuid4().hex[:16]}".upper()


def pdf(text: str = "Compte rendu", *, padding: int = 0, writer_hook=None) -> bytes:
    """A valid PDF whose metadata and (uncompressed) page content carry ``text``.

    ``padding`` bytes of printable filler go into an extra uncompressed stream
    object (multi-megabyte documents that still pass ``inspect_pdf``).
    """
    w = PdfWriter()
    page = w.add_blank_page(width=200, height=200)
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 12 Tf 10 100 Td ({text}) Tj ET".encode("latin-1"))
    page[NameObject("/Contents")] = w._add_object(content)
    w.add_metadata({"/Title": text})
    if padding:
        filler = DecodedStreamObject()
        line = f"% {text} filler line for a large scanned document\n".encode("latin-1")
        filler.set_data((line * (padding // len(line) + 1))[:padding])
        page[NameObject("/PieceInfo")] = w._add_object(filler)
    if writer_hook:
        writer_hook(w, page)
    out = io.BytesIO()
    w.write(out)
    return out.getvalue()


def cda(ins: str, type_code: str = b.CONSULTATION, text: str = "Patiente vue en consultation.", *,
        root: str = INS_ROOT, namespace: str = "urn:hl7-org:v3", prolog: str = "") -> bytes:
    """A CDA R2 header as the DMP expects it (tests/fixtures/cda/valid_minimal.xml), for ``ins``."""
    doc = (CDA_DIR / "valid_minimal.xml").read_text(encoding="utf-8")
    doc = doc.replace('extension="184127645108946"', f'extension="{ins}"')
    doc = doc.replace('root="1.2.250.1.213.1.4.8"', f'root="{root}"')
    doc = doc.replace('code="11488-4"', f'code="{type_code}"')
    doc = doc.replace("Patiente vue en consultation.", text)
    doc = doc.replace('xmlns="urn:hl7-org:v3"', f'xmlns="{namespace}"')
    if prolog:
        doc = doc.replace("?>\n", "?>\n" + prolog + "\n", 1)
    return doc.encode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha1_b64(data: bytes) -> str:
    return b64(hashlib.sha1(data).digest())


def docref(pid: str, content: bytes | None = None, *, content_type: str = "application/pdf",
           type_code: str = b.CONSULTATION, url: str | None = None, **kw) -> dict:
    res = b.docref(pid, type_code, content=content if content is not None else pdf(),
                   content_type=content_type, **kw)
    if url is not None:
        res["content"][0]["attachment"].pop("data")
        res["content"][0]["attachment"]["url"] = url
    return res


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def ps(api):
    return api.as_ps()


@pytest.fixture
def dmp(ps):
    """A DMP opened by the PS (qualified INS, VALI): (patient id, NIR)."""
    ins = b.nir()
    created = ps.create(b.patient(ins))
    return created["id"], ins


def counts(db) -> dict[str, int]:
    return {name: db[name].count_documents({}) for name in STORED}


def deposit(caller, body) -> dict:
    r = caller.post("DocumentReference", body)
    assert r.status_code == 201, (r.status_code, r.get_data(as_text=True))
    return r.json


def binary_id(doc: dict, i: int = 0) -> str:
    url = doc["content"][i]["attachment"]["url"]
    assert url.startswith("Binary/"), url
    return url.split("/")[-1]


def location_id(r) -> str:
    """The Binary id from a create response's Location."""
    assert r.status_code == 201, (r.status_code, r.get_data(as_text=True))
    return r.headers["Location"].split("/Binary/")[1].split("/")[0]


def read_raw(caller, bid: str, accept: str = "application/pdf"):
    return caller.get(f"Binary/{bid}", headers={"Accept": accept})


def assert_round_trip(caller, doc: dict, content: bytes, content_type: str = "application/pdf") -> None:
    """Metadata keeps url/size/hash, never data; the content comes back byte for byte (raw and FHIR)."""
    att = doc["content"][0]["attachment"]
    assert "data" not in att
    assert att["size"] == len(content)
    assert att["hash"] == sha1_b64(content)
    bid = binary_id(doc)
    raw = read_raw(caller, bid, content_type)
    assert raw.status_code == 200, raw.get_data(as_text=True)
    assert raw.content_type.split(";")[0] == content_type
    assert raw.get_data() == content
    fhir = caller.get(f"Binary/{bid}")   # Accept: application/fhir+json
    assert fhir.status_code == 200
    assert fhir.json["resourceType"] == "Binary" and fhir.json["contentType"] == content_type
    assert base64.b64decode(fhir.json["data"]) == content
    again = caller.get(f"DocumentReference/{doc['id']}")
    assert again.status_code == 200 and "data" not in again.json["content"][0]["attachment"]


def assert_refused(r, status: int, words: str, expression: str | None = None) -> None:
    body = r.get_data(as_text=True)
    assert r.status_code == status, (r.status_code, body)
    outcome = r.json
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(i.get("diagnostics", "") for i in outcome["issue"])
    assert words in diagnostics, diagnostics
    if expression is not None:
        exprs = [e for i in outcome["issue"] for e in i.get("expression", [])]
        assert any(e.startswith(expression) for e in exprs), exprs


# ----------------------------------------------------------------------------- 1. deposits

def test_pdf_and_cda_inline_round_trip(ps, dmp):
    pid, ins = dmp
    pdf_content = pdf("Compte rendu de consultation")
    doc = deposit(ps, docref(pid, pdf_content))
    assert_round_trip(ps, doc, pdf_content)

    cda_content = cda(ins, b.DISCHARGE)
    doc = deposit(ps, docref(pid, cda_content, content_type="text/xml", type_code=b.DISCHARGE))
    assert_round_trip(ps, doc, cda_content, "text/xml")
    # the patient reads their own documents too
    assert read_raw(ps.api.as_patient(pid), binary_id(doc), "text/xml").get_data() == cda_content


def test_multi_megabyte_pdf_inline_round_trips(ps, dmp):
    pid, _ = dmp
    big = pdf("Imagerie", padding=5 * 1024 * 1024)
    assert len(big) > 5 * 1024 * 1024
    doc = deposit(ps, docref(pid, big, type_code=b.IMAGING))
    assert_round_trip(ps, doc, big)


def test_multi_megabyte_pdf_raw_upload_round_trips(ps, dmp):
    pid, _ = dmp
    big = pdf("Imagerie", padding=5 * 1024 * 1024)
    r = upload(ps, pid, big)
    assert r.status_code == 201, r.get_data(as_text=True)
    doc = deposit(ps, docref(pid, type_code=b.IMAGING, url=f"Binary/{location_id(r)}"))
    assert_round_trip(ps, doc, big)


def test_vread_of_binary_gives_the_same_bytes(ps, dmp):
    pid, _ = dmp
    content = pdf("vread")
    doc = deposit(ps, docref(pid, content))
    r = ps.get(f"Binary/{binary_id(doc)}/_history/1", headers={"Accept": "application/pdf"})
    assert r.status_code == 200 and r.get_data() == content


def test_binary_is_read_under_the_document_decision(api, ps, dmp):
    pid, _ = dmp
    doc = deposit(ps, docref(pid, pdf("secret")))
    bid = binary_id(doc)
    stranger = api.as_ps(b.PS_OTHER)
    assert stranger.get(f"DocumentReference/{doc['id']}").status_code == 404
    denied = read_raw(stranger, bid)
    missing = read_raw(stranger, "does-not-exist")
    assert denied.status_code == missing.status_code == 404
    assert denied.json["resourceType"] == "OperationOutcome"


# ----------------------------------------------------------------------------- 2. raw Binary upload

def upload(caller, pid: str, content: bytes, content_type: str = "application/pdf"):
    return caller.post("Binary", raw=content, content_type=content_type,
                       headers={"X-Security-Context": f"Patient/{pid}"})


@pytest.mark.parametrize("kind", ["pdf", "cda"])
def test_raw_binary_upload_then_document(ps, dmp, kind):
    pid, ins = dmp
    content, ctype = (pdf("upload"), "application/pdf") if kind == "pdf" else (cda(ins), "text/xml")
    r = upload(ps, pid, content, ctype)
    assert r.status_code == 201, r.get_data(as_text=True)
    bid = r.json["id"] if r.json else location_id(r)
    assert "data" not in (r.json or {})
    # not attached to a document yet: nobody reads it
    assert read_raw(ps, bid, ctype).status_code == 404
    doc = deposit(ps, docref(pid, content_type=ctype, url=f"Binary/{bid}"))
    assert binary_id(doc) == bid
    assert_round_trip(ps, doc, content, ctype)


def test_raw_binary_content_is_checked_when_attached(ps, dmp, db):
    pid, _ = dmp
    other = cda(b.nir())                          # CDA of somebody else
    r = upload(ps, pid, other, "text/xml")
    assert r.status_code == 201
    bid = location_id(r)
    before = db["DocumentReference"].count_documents({})
    r = ps.post("DocumentReference", docref(pid, content_type="text/xml", url=f"Binary/{bid}"))
    assert_refused(r, 422, "INS does not match")
    assert db["DocumentReference"].count_documents({}) == before

    js = pdf("js", writer_hook=_js_open_action)
    bid = upload(ps, pid, js).headers["Location"].split("/Binary/")[1].split("/")[0]
    r = ps.post("DocumentReference", docref(pid, url=f"Binary/{bid}"))
    assert_refused(r, 422, "JavaScript")


def test_raw_binary_of_another_record_cannot_be_attached(ps, dmp):
    pid, _ = dmp
    other_pid = ps.create(b.patient())["id"]
    bid = upload(ps, other_pid, pdf()).headers["Location"].split("/Binary/")[1].split("/")[0]
    r = ps.post("DocumentReference", docref(pid, url=f"Binary/{bid}"))
    assert_refused(r, 422, "Binary of the same record")


def test_content_type_of_the_binary_must_match_the_attachment(ps, dmp):
    """A hostile PDF uploaded as application/octet-stream must not escape inspection."""
    pid, _ = dmp
    hostile = pdf("js", writer_hook=_js_open_action)
    bid = location_id(upload(ps, pid, hostile, "application/octet-stream"))
    r = ps.post("DocumentReference", docref(pid, url=f"Binary/{bid}"))
    assert_refused(r, 422, "differs from the contentType of its Binary", "DocumentReference.content[0]")


def test_content_of_a_document_cannot_be_attached_to_another(ps, dmp):
    pid, _ = dmp
    content = pdf("first")
    first = deposit(ps, docref(pid, content))
    r = ps.post("DocumentReference", docref(pid, url=f"Binary/{binary_id(first)}"))
    assert_refused(r, 422, "not attached to another document")
    # nor overwritten through inline data naming it: the taken id is ignored (it may be another
    # DMP's, so no refusal tells it exists) and the content gets a server id
    body = docref(pid, pdf("second"))
    body["content"][0]["attachment"]["url"] = f"Binary/{binary_id(first)}"
    second = deposit(ps, body)
    assert binary_id(second) != binary_id(first)
    assert read_raw(ps, binary_id(first)).get_data() == content
    assert ps.get(f"Binary/{binary_id(first)}").json["securityContext"]["reference"] == \
        f"DocumentReference/{first['id']}"


def test_size_and_hash_come_from_the_server(ps, dmp):
    pid, _ = dmp
    content = pdf("hash")
    doc = deposit(ps, docref(pid, content))
    lie = dict(doc)
    lie["content"] = [{"attachment": dict(doc["content"][0]["attachment"], size=3, hash=sha1_b64(b"x"))}]
    r = ps.put(f"DocumentReference/{doc['id']}", lie)
    assert r.status_code == 200, r.get_data(as_text=True)
    att = r.json["content"][0]["attachment"]
    assert (att["size"], att["hash"]) == (len(content), sha1_b64(content))
    body = docref(pid, content)
    body["content"][0]["attachment"].update(size=1, hash=sha1_b64(b"y"))
    att = deposit(ps, body)["content"][0]["attachment"]
    assert (att["size"], att["hash"]) == (len(content), sha1_b64(content))


# ----------------------------------------------------------------------------- 3. IHE MHD

def provide_bundle(pid: str, content: bytes, content_type: str = "application/pdf",
                   type_code: str = b.CONSULTATION, *, submission_set: bool = True) -> dict:
    """ITI-65 Provide Document Bundle: List (submission set) + DocumentReference + Binary, urn:uuid fullUrls."""
    doc_url, bin_url, list_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    doc = docref(pid, content_type=content_type, type_code=type_code, url=bin_url)
    doc["content"][0]["format"] = {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                                   "code": XDS_PDF if content_type == "application/pdf" else
                                   "urn:ihe:iti:xds-sd:text:2008"}
    entries = [
        {"fullUrl": doc_url, "resource": doc, "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": bin_url, "resource": {"resourceType": "Binary", "contentType": content_type,
                                          "data": b64(content)},
         "request": {"method": "POST", "url": "Binary"}},
    ]
    if submission_set:
        entries.insert(0, {"fullUrl": list_url, "resource": {
            "resourceType": "List", "status": "current", "mode": "working",
            "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                                 "code": "submissionset"}]},
            "subject": {"reference": f"Patient/{pid}"}, "entry": [{"item": {"reference": doc_url}}]},
            "request": {"method": "POST", "url": "List"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_iti65_provide_then_iti67_search_and_iti68_retrieve(ps, dmp, db):
    pid, ins = dmp
    content = cda(ins, b.LAB, "Resultats de laboratoire")
    r = ps.post("", provide_bundle(pid, content, "text/xml", b.LAB))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in r.json["entry"]]
    assert statuses[1:] == ["201 Created", "201 Created"], statuses
    # ITI-67: find the document by patient
    found = ps.search(f"DocumentReference?patient=Patient/{pid}")
    assert found["total"] == 1
    doc = found["entry"][0]["resource"]
    att = doc["content"][0]["attachment"]
    assert att["size"] == len(content) and att["hash"] == sha1_b64(content) and "data" not in att
    assert doc["author"][0]["identifier"]["value"] == b.PS_DR
    # ITI-68: retrieve the attachment URL, byte for byte
    r = ps.get(att["url"], headers={"Accept": "text/xml"})
    assert r.status_code == 200 and r.get_data() == content
    assert db["Binary"].count_documents({}) == 1     # the Binary of the bundle was not stored twice


def test_iti65_without_submission_set_pdf(ps, dmp):
    pid, _ = dmp
    content = pdf("mhd")
    bundle = provide_bundle(pid, content, submission_set=False)
    bundle["entry"].reverse()       # the Binary first: order within the Bundle does not matter
    r = ps.post("", bundle)
    assert r.status_code == 200, r.get_data(as_text=True)
    found = ps.search(f"DocumentReference?patient={pid}")
    assert found["total"] == 1
    assert_round_trip(ps, found["entry"][0]["resource"], content)


def test_iti65_cda_of_another_patient_stores_nothing(ps, dmp, db):
    pid, _ = dmp
    ok = pdf("ok")
    bundle = provide_bundle(pid, cda(b.nir()), "text/xml")
    # a second, valid document in the same bundle must not be stored either
    extra = provide_bundle(pid, ok, submission_set=False)
    bundle["entry"] += extra["entry"]
    before = counts(db)
    r = ps.post("", bundle)
    assert_refused(r, 422, "INS does not match")
    assert counts(db) == before
    assert ps.search(f"DocumentReference?patient={pid}")["total"] == 0


# ----------------------------------------------------------------------------- 4. no plaintext at rest

_B64 = re.compile(r"^[A-Za-z0-9+/=_-]{16,}$")


def _strings_and_bytes(value, out: list):
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(str(k))
            _strings_and_bytes(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings_and_bytes(v, out)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(bytes(value))
    elif isinstance(value, str):
        out.append(value)
        compact = value.strip()
        if _B64.match(compact):
            for decoder in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    out.append(decoder(compact + "=" * (-len(compact) % 4)))
                except (ValueError, TypeError):
                    pass
    elif value is not None:
        out.append(str(value))


def plaintext_found(db, markers: list[str]) -> list[str]:
    """(collection, marker) for each marker found anywhere in the database."""
    hits: list[str] = []
    needles = [(m, m.encode(), m.encode("utf-16-le")) for m in markers]
    for name in db.list_collection_names():
        for doc in db[name].find({}):
            values: list = []
            _strings_and_bytes(doc, values)
            for v in values:
                for m, raw, wide in needles:
                    if (isinstance(v, str) and m in v) or (isinstance(v, bytes) and (raw in v or wide in v)):
                        hits.append(f"{name}: {m}")
    return sorted(set(hits))


def test_no_plaintext_anywhere_in_the_database(ps, dmp, db):
    pid, ins = dmp
    markers = []

    def mark(kind):
        markers.append(marker(kind))
        return markers[-1]

    pdf_inline = pdf(mark("PDFINLINE"))
    deposit(ps, docref(pid, pdf_inline))
    cda_inline = cda(ins, text=mark("CDAINLINE"))
    deposit(ps, docref(pid, cda_inline, content_type="text/xml"))
    for content, ctype in ((pdf(mark("PDFRAW")), "application/pdf"), (cda(ins, text=mark("CDARAW")), "text/xml")):
        r = upload(ps, pid, content, ctype)
        bid = location_id(r)
        deposit(ps, docref(pid, content_type=ctype, url=f"Binary/{bid}"))
    r = ps.post("", provide_bundle(pid, cda(ins, b.LAB, mark("CDAMHD")), "text/xml", b.LAB))
    assert r.status_code == 200, r.get_data(as_text=True)
    r = ps.post("", provide_bundle(pid, pdf(mark("PDFMHD"))))
    assert r.status_code == 200, r.get_data(as_text=True)
    r = upload(ps, pid, pdf(mark("PDFBIG"), padding=3 * 1024 * 1024))
    deposit(ps, docref(pid, url=f"Binary/{location_id(r)}"))
    # refused deposits leave nothing readable either
    ps.post("DocumentReference", docref(pid, cda(b.nir(), text=mark("CDAREFUSED")), content_type="text/xml"))
    assert ps.search(f"DocumentReference?patient={pid}")["total"] == 7
    # sanity of the scanner itself: the markers are really in what the readers get back
    doc = ps.search(f"DocumentReference?patient={pid}&_count=1")["entry"][0]["resource"]
    assert read_raw(ps, binary_id(doc), doc["content"][0]["attachment"]["contentType"]).status_code == 200
    probe = db.client[db.name + "_probe"]
    try:
        probe["x"].insert_one({"s": markers[0], "b": b"..." + markers[1].encode(),
                               "e": b64(markers[2].encode())})
        assert len(plaintext_found(probe, markers)) == 3
    finally:
        db.client.drop_database(probe.name)

    assert plaintext_found(db, markers) == []


# ----------------------------------------------------------------------------- 5. hostile documents

XXE = ('<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>')
LAUGHS = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
          '<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]>')
PLAIN_DOCTYPE = '<!DOCTYPE ClinicalDocument>'


def _js_open_action(w, page):
    action = DictionaryObject({NameObject("/S"): NameObject("/JavaScript"),
                               NameObject("/JS"): TextStringObject("app.alert(1)")})
    w._root_object[NameObject("/OpenAction")] = w._add_object(action)


def _launch(w, page):
    action = DictionaryObject({NameObject("/S"): NameObject("/Launch"),
                               NameObject("/F"): TextStringObject("calc.exe")})
    w._root_object[NameObject("/OpenAction")] = w._add_object(action)


def _embedded(w, page):
    w.add_attachment("payload.exe", b"MZ not really")


def _hostile_cases():
    """(id, content builder(ins), content type, type code, status, diagnostic words)."""
    return [
        ("cda-xxe", lambda ins: cda(ins, prolog=XXE.replace("]>", "]>")).replace(
            b"<title>Compte", b"<title>&xxe; Compte"), "text/xml", "DOCTYPE"),
        ("cda-billion-laughs", lambda ins: cda(ins, prolog=LAUGHS).replace(b"<title>Compte", b"<title>&lol2; Compte"),
         "text/xml", "DOCTYPE"),
        ("cda-doctype", lambda ins: cda(ins, prolog=PLAIN_DOCTYPE), "text/xml", "DOCTYPE"),
        ("cda-wrong-namespace", lambda ins: cda(ins, namespace="urn:hl7-org:v2"), "text/xml",
         "not in the CDA namespace"),
        ("cda-other-ins", lambda ins: cda(b.nir()), "text/xml", "INS does not match"),
        ("cda-type-mismatch", lambda ins: cda(ins, b.DISCHARGE), "text/xml", "disagrees with DocumentReference.type"),
        ("cda-not-xml", lambda ins: b"<ClinicalDocument xmlns='urn:hl7-org:v3'><oops>", "text/xml",
         "not well-formed XML"),
        ("pdf-js-openaction", lambda ins: pdf("js", writer_hook=_js_open_action), "application/pdf", "JavaScript"),
        ("pdf-launch", lambda ins: pdf("launch", writer_hook=_launch), "application/pdf", "Launch"),
        ("pdf-embedded-file", lambda ins: pdf("embedded", writer_hook=_embedded), "application/pdf", "embedded file"),
        ("pdf-truncated", lambda ins: pdf("truncated")[:-200], "application/pdf", "truncated"),
        ("pdf-not-pdf", lambda ins: b"MZ\x90\x00 this is an executable, not a PDF" * 10, "application/pdf",
         "not a PDF"),
    ]


@pytest.mark.parametrize("case", _hostile_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("route", ["inline", "mhd"])
def test_hostile_documents_refused_and_nothing_stored(ps, dmp, db, case, route):
    _name, build, ctype, words = case
    pid, ins = dmp
    content = build(ins)
    before = counts(db)
    if route == "inline":
        r = ps.post("DocumentReference", docref(pid, content, content_type=ctype))
        assert_refused(r, 422, words, "DocumentReference")
    else:
        r = ps.post("", provide_bundle(pid, content, ctype))
        assert_refused(r, 422, words)
    body = r.get_data(as_text=True)
    for leak in ("root:", "passwd", "lollol", "calc.exe", "app.alert", ins):
        assert leak not in body
    assert counts(db) == before
    # the server keeps serving
    assert deposit(ps, docref(pid, pdf("after"))).get("id")


@pytest.mark.parametrize("data", ["%%% not base64 %%%", "QUJD=", "QUJDRA=="[:-1]], ids=["alphabet", "padding", "length"])
def test_invalid_base64_is_422(ps, dmp, db, data):
    pid, _ = dmp
    body = docref(pid)
    body["content"][0]["attachment"]["data"] = data
    before = counts(db)
    assert_refused(ps.post("DocumentReference", body), 422, "base64",
                   "DocumentReference.content[0].attachment.data")
    bundle = provide_bundle(pid, b"")
    bundle["entry"][-1]["resource"]["data"] = data
    assert_refused(ps.post("", bundle), 422, "base64")
    assert counts(db) == before


def test_base64_wrapped_in_lines_is_accepted(ps, dmp):
    """MIME-style base64 (76-column lines, as XML writers produce) decodes to the same bytes."""
    pid, _ = dmp
    content = pdf("wrapped")
    body = docref(pid, content)
    body["content"][0]["attachment"]["data"] = base64.encodebytes(content).decode("ascii")
    assert_round_trip(ps, deposit(ps, body), content)


@pytest.fixture
def small_api(config, build_app, idp):
    """The app with FHIR_DMP_MAX_ATTACHMENT_BYTES = 64 KiB."""
    from tests.api import Api
    app = build_app(config.with_(max_attachment_bytes=64 * 1024, max_body_bytes=0))
    return Api(app, idp)


def test_attachment_over_the_limit_is_413(small_api, db):
    ps = small_api.as_ps()
    ins = b.nir()
    pid = ps.create(b.patient(ins))["id"]
    big = pdf("big", padding=100 * 1024)
    before = counts(db)
    r = ps.post("DocumentReference", docref(pid, big))
    assert r.status_code == 413, r.get_data(as_text=True)
    assert r.json["resourceType"] == "OperationOutcome"
    r = upload(ps, pid, big)
    assert r.status_code == 413, r.get_data(as_text=True)
    r = ps.post("", provide_bundle(pid, big))
    assert r.status_code == 413, r.get_data(as_text=True)
    assert counts(db) == before
    # just under the limit still works
    deposit(ps, docref(pid, pdf("small", padding=16 * 1024)))


def test_raw_upload_over_the_limit_without_content_length_is_413(small_api, db):
    """Chunked upload (no Content-Length): the limit is enforced while streaming."""
    ps = small_api.as_ps()
    pid = ps.create(b.patient())["id"]
    before = counts(db)

    body = io.BytesIO(b"%PDF-1.7\n" + b"x" * (200 * 1024))
    # what a WSGI server gives for Transfer-Encoding: chunked: no CONTENT_LENGTH, input terminated
    r = ps.post("Binary", input_stream=body, content_type="application/pdf",
                headers={"X-Security-Context": f"Patient/{pid}", "Transfer-Encoding": "chunked"},
                environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413, r.get_data(as_text=True)
    assert counts(db) == before


# ----------------------------------------------------------------------------- 6. who may deposit

def test_deposit_refused_when_ins_not_qualified(ps, db):
    pid = ps.create(b.patient(status="PROV"))["id"]
    before = counts(db)
    r = ps.post("DocumentReference", docref(pid))
    assert_refused(r, 422, "INS is qualified", "DocumentReference.subject")
    assert counts(db) == before


def test_deposit_refused_for_a_ps_not_authorized(api, dmp, db):
    pid, _ = dmp
    before = counts(db)
    r = api.as_ps(b.PS_OTHER).post("DocumentReference", docref(pid))
    assert_refused(r, 422, "not known", "DocumentReference.subject")
    r = upload(api.as_ps(b.PS_OTHER), pid, pdf())
    assert r.status_code in (403, 422), r.get_data(as_text=True)
    assert counts(db) == before


# ----------------------------------------------------------------------------- 7. replacement, withdrawal

def test_replacement_and_withdrawal_by_the_author(api, ps, dmp):
    pid, _ = dmp
    first = deposit(ps, docref(pid, pdf("v1")))
    new = docref(pid, pdf("v2"))
    new["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{first['id']}"}}]
    second = deposit(ps, new)
    assert ps.get(f"DocumentReference/{first['id']}").json["status"] == "superseded"
    assert ps.get(f"DocumentReference/{second['id']}").json["status"] == "current"
    # the old content is still there, byte for byte
    assert read_raw(ps, binary_id(first)).get_data() == pdf_text_check(ps, first)

    # another authorized PS may not replace it
    other = api.as_ps(b.PS_OTHER)
    assert other.post("Consent", b.consent(pid, actor=b.PS_OTHER, verified=True)).status_code == 201
    bad = docref(pid, pdf("v3"))
    bad["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{second['id']}"}}]
    assert_refused(other.post("DocumentReference", bad), 422, "by the same author")
    withdrawn = dict(ps.get(f"DocumentReference/{second['id']}").json, status="entered-in-error")
    assert other.put(f"DocumentReference/{second['id']}", withdrawn).status_code in (403, 404)

    # withdrawal by the author
    r = ps.put(f"DocumentReference/{second['id']}", withdrawn)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert ps.get(f"DocumentReference/{second['id']}").json["status"] == "entered-in-error"
    att = r.json["content"][0]["attachment"]
    assert att["url"] == second["content"][0]["attachment"]["url"] and att["hash"] == \
        second["content"][0]["attachment"]["hash"]


def pdf_text_check(caller, doc) -> bytes:
    """The bytes of a document, through the FHIR Binary (cross-check of the raw read)."""
    r = caller.get(f"Binary/{binary_id(doc)}")
    return base64.b64decode(r.json["data"])


# ----------------------------------------------------------------------------- 8. keys

def test_kek_rotation_keeps_documents_readable(app, config, db, ps, dmp):
    from fhir_dmp.security.crypto import rotate_kek
    pid, ins = dmp
    contents = [pdf("before rotation"), cda(ins)]
    docs = [deposit(ps, docref(pid, contents[0])),
            deposit(ps, docref(pid, contents[1], content_type="text/xml"))]
    kek_before = db["datakeys"].find_one({"_id": pid})["kek_id"]
    assert rotate_kek(config, services(app).storage) >= 1
    assert db["datakeys"].find_one({"_id": pid})["kek_id"] != kek_before
    services(app).crypto.forget(pid)   # as a restarted server would
    for doc, content, ctype in zip(docs, contents, ("application/pdf", "text/xml")):
        assert read_raw(ps, binary_id(doc), ctype).get_data() == content
    # new deposits after the rotation work too
    after = pdf("after rotation")
    assert_round_trip(ps, deposit(ps, docref(pid, after)), after)


def test_crypto_shredding_makes_content_gone_not_500(app, db, ps, dmp):
    pid, _ = dmp
    other_pid = ps.create(b.patient())["id"]
    mine, theirs = pdf("shredded"), pdf("kept")
    doc = deposit(ps, docref(pid, mine))
    kept = deposit(ps, docref(other_pid, theirs))
    db["datakeys"].delete_one({"_id": pid})          # the key alone goes (Storage.purge_dmp's first step)
    services(app).crypto.forget(pid)
    for accept in ("application/pdf", "application/fhir+json"):
        r = read_raw(ps, binary_id(doc), accept)
        assert r.status_code == 404, (accept, r.status_code, r.get_data(as_text=True))
        assert r.json["resourceType"] == "OperationOutcome"
    assert read_raw(ps, binary_id(kept)).get_data() == theirs
    # the metadata remains searchable; nothing 500s
    assert ps.get(f"DocumentReference/{doc['id']}").status_code == 200


def test_admin_does_not_deposit_document_content(api, dmp, db):
    pid, _ = dmp
    before = counts(db)
    r = api.as_admin().post("DocumentReference", docref(pid, pdf("admin")))
    assert r.status_code in (403, 422), r.get_data(as_text=True)
    assert counts(db) == before
