"""A Binary's content beside its resource (storage/content.py, issue 22) and in its own documents.

Small content (one chunk, ciphertext up to ``RESOURCE_INLINE_MAX``) is kept, encrypted, in its
Binary's stored document; larger content in ``content_blobs``/``content_chunks``; content stored
the old way (a ``content_blobs`` document) keeps reading. Through the real app and SecantusDB:
read and vread over HTTP, a superseded version, the searches and listings that must not carry the
ciphertext, crypto-shredding and destroy, backup and restore, and a failed create.
"""
from __future__ import annotations

import base64
import uuid

import bson
import pytest

from fhir_dmp.runtime.services import services
from fhir_dmp.security.crypto import ContentUnavailable
from fhir_dmp.storage import Storage
from fhir_dmp.storage.content import RESOURCE_INLINE_MAX, BlobStore
from tests import builders as b

PDF = "application/pdf"
TEXT = "text/plain"
LARGE = b"Compte rendu long. " * (RESOURCE_INLINE_MAX // 19 + 100)    # over the limit, one chunk


def deposit(ps, pid: str, content: bytes, content_type: str = PDF) -> tuple[dict, str]:
    r = ps.post("DocumentReference", b.docref(pid, content=content, content_type=content_type))
    assert r.status_code == 201, r.json
    return r.json, r.json["content"][0]["attachment"]["url"].split("/")[-1]


def read_binary(ps, bid: str, accept: str, version: int | None = None) -> bytes:
    path = f"Binary/{bid}" + (f"/_history/{version}" if version else "")
    r = ps.get(path, headers={"Accept": accept})
    assert r.status_code == 200, (r.status_code, r.data[:200])
    return r.data


@pytest.fixture
def record(api):
    ps = api.as_ps(b.PS_DR)
    return ps, ps.create(b.patient(email="claire@example.org"))["id"]


def test_small_content_lives_in_its_binary_larger_in_blobs_both_read_back(record, db):
    ps, pid = record
    small = b.pdf_bytes("Compte rendu du jour")
    _, sid = deposit(ps, pid, small)
    _, lid = deposit(ps, pid, LARGE, TEXT)

    binary = db["Binary"].find_one({"_id": sid})
    assert binary["blob"]["v"] == 1 and binary["blob"]["size"] == len(small)
    assert len(binary["blob"]["d"]) <= RESOURCE_INLINE_MAX and small not in binary["blob"]["d"]
    assert db["content_blobs"].count_documents({"r": sid}) == 0
    assert db["content_chunks"].count_documents({"r": sid}) == 0
    # larger: no ciphertext in the Binary, a content document of its own (storage/content.py)
    large = db["Binary"].find_one({"_id": lid})
    assert set(large["blob"]) == {"size", "sha1"}
    assert db["content_blobs"].count_documents({"r": lid}) == 1
    # no search index or sort key holds it
    assert binary["blob"]["d"] not in bson.encode({"s": binary["s"], "o": binary["o"], "res": binary["res"]})

    for version in (None, 1):     # read and vread
        assert read_binary(ps, sid, PDF, version) == small
        assert read_binary(ps, lid, TEXT, version) == LARGE
    as_json = ps.get(f"Binary/{sid}").json
    assert base64.b64decode(as_json["data"]) == small
    assert ps.get(f"Binary/{sid}/_history").json["total"] == 1


def test_reads_of_a_binary_other_than_its_content_leave_the_ciphertext_out(record, db_storage):
    ps, pid = record
    _, bid = deposit(ps, pid, b"x" * 1000, TEXT)
    listed = db_storage.find_docs("Binary", {"pid": pid}, [("_id", 1)], 0)
    assert [d["_id"] for d in listed] == [bid]
    assert all("d" not in d["blob"] for d in listed)
    assert all("d" not in d["blob"] for d in db_storage.compartment_docs("Binary", [pid]))
    assert db_storage.blob_info(bid) == {"size": 1000, "sha1": listed[0]["blob"]["sha1"]}
    assert db_storage.read("Binary", bid).resource.keys() == {"resourceType", "id", "meta", "contentType",
                                                              "securityContext"}


def test_content_stored_the_old_way_keeps_reading(record, db, db_storage, app):
    """A Binary written before issue 22: ``blob`` has size and hash, its content a ``content_blobs``
    document (here: a new deposit moved back to that layout)."""
    ps, pid = record
    content = b.pdf_bytes("Ancien compte rendu")
    _, bid = deposit(ps, pid, content)
    blobs = services(app).blobs
    db["Binary"].update_one({"_id": bid}, {"$unset": {"blob.d": "", "blob.v": "", "blob.b": ""}})
    with pytest.raises(ContentUnavailable):
        blobs.read(pid, bid, 1)
    blobs.put(pid, bid, 1, content, max_bytes=1 << 20)      # the old layout: a header holding it
    assert db["content_blobs"].count_documents({"r": bid}) == 1
    assert read_binary(ps, bid, PDF) == content and read_binary(ps, bid, PDF, 1) == content


def test_a_superseded_version_keeps_its_content_in_its_history_copy(record, db, db_storage, app):
    ps, pid = record
    content = b"premier contenu"
    _, bid = deposit(ps, pid, content, TEXT)
    blobs = services(app).blobs
    stored = db_storage.read("Binary", bid)
    with db_storage.client.start_session() as s:
        db_storage.update("Binary", bid, None, pid=pid, expected_vid=1, session=s, deleted=True)
    current = db["Binary"].find_one({"_id": bid})
    assert current["vid"] == 2 and "d" not in current["blob"]        # not kept twice
    copy = db["Binary_history"].find_one({"_id": f"{bid}/1"})
    assert copy["blob"]["v"] == 1 and content not in copy["blob"]["d"]
    assert blobs.read(pid, bid, 1) == content
    assert all("d" not in (d.get("blob") or {}) for d in
               db["Binary_history"].find({"rid": bid}, {"blob.d": 0}))   # sanity of the projection
    history = db_storage.history("Binary", bid)
    assert [h.vid for h in history] == [2, 1] and history[1].resource == stored.resource
    assert db_storage.vread("Binary", bid, 1).resource == stored.resource


def test_crypto_shredding_makes_content_in_a_binary_unreadable_and_destroy_removes_it(api, record, db, app):
    ps, pid = record
    _, small = deposit(ps, pid, b.pdf_bytes("petit"))
    _, large = deposit(ps, pid, LARGE, TEXT)
    svc = services(app)
    # the data key alone gone (the first step of a destroy): neither layout decrypts any more
    key = db["datakeys"].find_one({"_id": pid})
    db["datakeys"].delete_one({"_id": pid})
    svc.crypto.forget(pid)
    for bid in (small, large):
        with pytest.raises(ContentUnavailable):
            svc.blobs.read(pid, bid, 1)
    db["datakeys"].insert_one(key)
    assert svc.blobs.read(pid, large, 1) == LARGE

    assert api.as_patient(pid).post(f"Patient/{pid}/$destroy").status_code == 204
    for coll in ("Binary", "Binary_history", "content_blobs", "content_chunks"):
        assert db[coll].count_documents({}) == 0, coll
    assert db["datakeys"].count_documents({"_id": pid}) == 0


def test_backup_and_restore_carry_both_layouts(record, db, db_storage, app, mongo_client, tmp_path):
    ps, pid = record
    small_content = b.pdf_bytes("sauvegarde")
    _, small = deposit(ps, pid, small_content)
    _, large = deposit(ps, pid, LARGE, TEXT)
    db_storage.backup_to(tmp_path / "backup", server_version="test")
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        restored = Storage(mongo_client, mongo_client[name])
        restored.restore_from(tmp_path / "backup")
        blobs = BlobStore(restored, services(app).crypto)     # the same key file (never in a backup)
        assert blobs.read(pid, small, 1) == small_content
        assert blobs.read(pid, large, 1) == LARGE
    finally:
        mongo_client.drop_database(name)


def test_a_failed_create_leaves_no_binary_and_no_content(record, db):
    """Three attachments: small (beside its Binary), large (its own document) under an id the client
    names (ITI-65), then one more under that same id (409 when its Binary is written): nothing of
    the first two stays."""
    ps, pid = record
    deposit(ps, pid, b"deja la", TEXT)
    counts = {c: db[c].count_documents({}) for c in ("Binary", "content_blobs", "content_chunks",
                                                     "DocumentReference")}
    doc = b.docref(pid, content=b"petit", content_type=TEXT)
    doc["content"] += [{"attachment": {"contentType": TEXT, "url": "Binary/twice",
                                       "data": base64.b64encode(data).decode()}} for data in (LARGE, b"autre")]
    r = ps.post("DocumentReference", doc)
    assert r.status_code == 409, r.json
    assert {c: db[c].count_documents({}) for c in counts} == counts


def test_blob_info_never_shows_the_ciphertext(db_storage, app):
    info = services(app).blobs.put("pat-r", "bin-r", 1, b"secret", max_bytes=1 << 20, beside=True)
    assert info.inline is not None and repr(info.inline["d"]) not in repr(info)
    assert "secret" not in repr(info)
