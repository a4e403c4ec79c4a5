"""Envelope encryption (fhir_dmp.security.crypto) and encrypted blobs (fhir_dmp.storage.content).

Runs against a real SecantusDB started for this module (no mocks).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from bson.raw_bson import RawBSONDocument

from fhir_dmp.storage.content import BlobNotFound, BlobStore
from fhir_dmp.runtime.config import Config
from fhir_dmp.http.errors import Conflict, PayloadTooLarge
from fhir_dmp.security.crypto import (ContentUnavailable, DocumentCrypto, LocalKeyFileProvider, key_provider,
                                      retire_unused_keks, rotate_kek)

MIB = 1 << 20


# ----------------------------------------------------------------------------- database

@pytest.fixture
def mongo(mongo_client):
    """The session's SecantusDB client (tests/conftest.py)."""
    return mongo_client


@pytest.fixture
def config(tmp_path):
    return Config(data_dir=tmp_path)


@pytest.fixture
def crypto(db_storage, config):
    return DocumentCrypto(db_storage, key_provider(config))


@pytest.fixture
def store(db_storage, crypto):
    return BlobStore(db_storage, crypto)


# ----------------------------------------------------------------------------- key file

def test_key_file_created_0600_and_reused(config):
    p1 = key_provider(config)
    mode = stat.S_IMODE(os.stat(config.kek_path).st_mode)
    assert mode == 0o600
    doc = json.loads(config.kek_path.read_text())
    assert doc["current"] == p1.key_id and len(base64.b64decode(doc["keys"][p1.key_id]["k"])) == 32
    assert LocalKeyFileProvider(config.kek_path).key_id == p1.key_id


def test_key_file_creation_race(tmp_path):
    path = tmp_path / "sub" / "kek.key"
    barrier = threading.Barrier(8)

    def make():
        barrier.wait()
        return LocalKeyFileProvider(path).key_id
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: make(), range(8)))
    assert len(ids) == 1


# ----------------------------------------------------------------------------- DocumentCrypto

def test_round_trip(crypto):
    ct = crypto.encrypt("pat-1", "bin-1", 1, b"compte rendu")
    assert b"compte rendu" not in ct
    assert crypto.decrypt("pat-1", "bin-1", 1, ct) == b"compte rendu"
    assert crypto.decrypt("pat-1", "bin-1", 1, crypto.encrypt("pat-1", "bin-1", 1, b"")) == b""


@pytest.mark.parametrize("other", [("pat-2", "bin-1", 1), ("pat-1", "bin-2", 1), ("pat-1", "bin-1", 2)])
def test_aad_mismatch_fails(crypto, other):
    crypto.encrypt("pat-2", "x", 1, b"make pat-2 key exist")
    ct = crypto.encrypt("pat-1", "bin-1", 1, b"secret")
    with pytest.raises(ContentUnavailable):
        crypto.decrypt(*other, ct)


def test_tamper_fails(crypto):
    ct = bytearray(crypto.encrypt("pat-1", "bin-1", 1, b"secret content"))
    for pos in (0, 5, len(ct) // 2, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        with pytest.raises(ContentUnavailable):
            crypto.decrypt("pat-1", "bin-1", 1, bytes(bad))
    with pytest.raises(ContentUnavailable):
        crypto.decrypt("pat-1", "bin-1", 1, bytes(ct[:10]))


def test_per_patient_keys_differ(crypto, db, config, db_storage):
    crypto.encrypt("pat-a", "r", 1, b"a")
    crypto.encrypt("pat-b", "r", 1, b"b")
    provider = key_provider(config)
    docs = {d["_id"]: d for d in db.datakeys.find()}
    assert set(docs) == {"pat-a", "pat-b"}
    keys = [provider.unwrap(docs[p]["wrapped"], docs[p]["kek_id"]) for p in ("pat-a", "pat-b")]
    assert keys[0] != keys[1] and all(len(k) == 32 for k in keys)
    assert all(docs[p]["kek_id"] == provider.key_id for p in docs)


def test_first_use_key_creation_is_race_safe(db, config, db_storage):
    # separate instances = separate caches, as separate worker processes would have
    instances = [DocumentCrypto(db_storage, key_provider(config)) for _ in range(12)]
    barrier = threading.Barrier(len(instances))

    def work(i):
        barrier.wait()
        return instances[i].encrypt("pat-race", "bin", i, b"doc %d" % i)
    with ThreadPoolExecutor(len(instances)) as pool:
        cts = list(pool.map(work, range(len(instances))))
    assert db.datakeys.count_documents({"_id": "pat-race"}) == 1
    fresh = DocumentCrypto(db_storage, key_provider(config))
    for i, ct in enumerate(cts):
        assert fresh.decrypt("pat-race", "bin", i, ct) == b"doc %d" % i


def test_rotate_kek_rewraps_all_and_old_kek_can_go(crypto, db, config, db_storage):
    cts = {p: crypto.encrypt(p, "bin", 1, f"content of {p}".encode()) for p in ("p1", "p2", "p3")}
    old_id = key_provider(config).key_id
    before = {d["_id"]: d["wrapped"] for d in db.datakeys.find()}

    assert rotate_kek(config, db_storage) == 3
    provider = key_provider(config)
    assert provider.key_id != old_id and old_id in provider.key_ids
    after = list(db.datakeys.find())
    assert all(d["kek_id"] == provider.key_id for d in after)
    assert all(d["wrapped"] != before[d["_id"]] for d in after)

    # a running instance (cached provider) sees the new key file and keeps working
    assert crypto.encryptor("p4", "bin", 1) is not None
    assert db.datakeys.find_one({"_id": "p4"})["kek_id"] == provider.key_id

    assert retire_unused_keks(config, db_storage) == [old_id]
    assert old_id not in json.loads(config.kek_path.read_text())["keys"]
    fresh = DocumentCrypto(db_storage, key_provider(config))
    for p, ct in cts.items():  # content never re-encrypted, still readable without the old KEK
        assert fresh.decrypt(p, "bin", 1, ct) == f"content of {p}".encode()


def shred(crypto, pid: str) -> None:
    """Crypto-shredding as a destroy does it: the data key deleted (Storage.purge_dmp's first
    step), this process's copy dropped (DocumentCrypto.forget)."""
    crypto.storage.db["datakeys"].delete_one({"_id": pid})
    crypto.forget(pid)


def test_shred_makes_content_unrecoverable(crypto, db, config, db_storage):
    ct = crypto.encrypt("pat-x", "bin", 1, b"to be destroyed")
    shred(crypto, "pat-x")
    assert db.datakeys.count_documents({"_id": "pat-x"}) == 0
    for c in (crypto, DocumentCrypto(db_storage, key_provider(config))):
        with pytest.raises(ContentUnavailable):
            c.decrypt("pat-x", "bin", 1, ct)
    # a new key created later does not resurrect old content
    crypto.encrypt("pat-x", "bin", 2, b"new")
    with pytest.raises(ContentUnavailable):
        crypto.decrypt("pat-x", "bin", 1, ct)


def test_missing_kek_is_content_unavailable(crypto, db, tmp_path, db_storage):
    ct = crypto.encrypt("pat-k", "bin", 1, b"x")
    other = DocumentCrypto(db_storage, LocalKeyFileProvider(tmp_path / "other.key"))
    with pytest.raises(ContentUnavailable):
        other.decrypt("pat-k", "bin", 1, ct)


# ----------------------------------------------------------------------------- BlobStore

def _pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("size", [0, 1, MIB + 1, 5 * MIB])
@pytest.mark.parametrize("kind", ["bytes", "file", "iter"])
def test_blob_round_trip(store, size, kind):
    data = os.urandom(size)
    source = {"bytes": data, "file": io.BytesIO(data), "iter": _pieces(data, 300_001)}[kind]
    info = store.put("pat-1", "bin-1", 1, source, max_bytes=20 * MIB)
    assert info.size == size
    assert info.sha1_b64 == base64.b64encode(hashlib.sha1(data).digest()).decode()
    assert info.sha256_hex == hashlib.sha256(data).hexdigest()
    assert store.read("pat-1", "bin-1", 1) == data
    assert store.size("pat-1", "bin-1", 1) == size
    chunks = list(store.open("pat-1", "bin-1", 1))
    assert all(len(c) <= store.chunk_size for c in chunks)
    assert b"".join(chunks) == data


@pytest.mark.parametrize("kind", ["bytes", "iter", "file"])
def test_blob_over_limit_stores_nothing(store, db, kind):
    data = os.urandom(3 * MIB + 5)
    source = {"bytes": data, "file": io.BytesIO(data), "iter": _pieces(data, 65_536)}[kind]
    with pytest.raises(PayloadTooLarge) as exc:
        store.put("pat-big", "bin", 1, source, max_bytes=3 * MIB)
    assert exc.value.status == 413
    assert db.content_chunks.count_documents({"p": "pat-big"}) == 0
    assert db.content_blobs.count_documents({"p": "pat-big"}) == 0
    assert not store.exists("pat-big", "bin", 1)


def test_no_plaintext_anywhere_in_database(store, crypto, db):
    marker = b"PLAINTEXT-MARKER-7f3a9c"
    body = (marker + b" compte rendu ") * 100_000  # ~3.7 MiB, several chunks
    store.put("pat-scan", "bin-scan", 1, body, max_bytes=20 * MIB)
    store.put("pat-scan", "bin-small", 1, marker, max_bytes=20 * MIB)
    crypto.encrypt("pat-scan", "doc", 1, marker)
    raw = db.with_options(codec_options=db.codec_options.with_options(document_class=RawBSONDocument))
    names = raw.list_collection_names()
    assert {"content_chunks", "content_blobs", "datakeys"} <= set(names)
    for name in names:
        for doc in raw[name].find():
            assert marker not in doc.raw, f"plaintext found in collection {name}"
            assert marker[:12] not in doc.raw


def test_blob_version_conflict_and_delete(store, db):
    store.put("pat-1", "bin", 1, b"v1", max_bytes=MIB)
    with pytest.raises(Conflict):
        store.put("pat-1", "bin", 1, b"v1 again", max_bytes=MIB)
    store.put("pat-1", "bin", 2, b"v2", max_bytes=MIB)
    store.delete("pat-1", "bin", 1)
    with pytest.raises(BlobNotFound):
        store.open("pat-1", "bin", 1)
    assert store.read("pat-1", "bin", 2) == b"v2"
    store.storage.delete_blobs({"p": "pat-1"})       # what destroying a DMP does (purge_dmp)
    assert db.content_chunks.count_documents({"p": "pat-1"}) == 0
    assert db.content_blobs.count_documents({"p": "pat-1"}) == 0


def test_blob_put_inside_transaction(mongo, store, db):
    with mongo.start_session() as s:
        with s.start_transaction():
            store.put("pat-t", "bin", 1, b"aborted", max_bytes=MIB, session=s)
            s.abort_transaction()
    assert db.content_chunks.count_documents({"p": "pat-t"}) == 0
    with mongo.start_session() as s:
        with s.start_transaction():
            store.put("pat-t", "bin", 1, b"committed", max_bytes=MIB, session=s)
    assert store.read("pat-t", "bin", 1) == b"committed"


@pytest.fixture
def small_store(db_storage, crypto):
    return BlobStore(db_storage, crypto, chunk_size=1024)


def test_blob_chunks_cannot_be_reordered_swapped_or_dropped(small_store, db):
    data = os.urandom(5000)  # 5 chunks of 1 KiB
    info = small_store.put("pat-r", "bin", 1, data, max_bytes=MIB)
    chunks = db.content_chunks
    c0, c1 = (chunks.find_one({"b": info.blob_id, "n": n}) for n in (0, 1))
    # swap the ciphertexts of chunks 0 and 1
    chunks.update_one({"_id": c0["_id"]}, {"$set": {"d": c1["d"]}})
    chunks.update_one({"_id": c1["_id"]}, {"$set": {"d": c0["d"]}})
    with pytest.raises(ContentUnavailable):
        small_store.read("pat-r", "bin", 1)
    chunks.update_one({"_id": c0["_id"]}, {"$set": {"d": c0["d"]}})
    chunks.update_one({"_id": c1["_id"]}, {"$set": {"d": c1["d"]}})
    assert small_store.read("pat-r", "bin", 1) == data

    # a chunk from another blob (same patient, other version) at the same index
    other = small_store.put("pat-r", "bin", 2, data, max_bytes=MIB)
    foreign = chunks.find_one({"b": other.blob_id, "n": 2})
    mine = chunks.find_one({"b": info.blob_id, "n": 2})
    chunks.update_one({"_id": mine["_id"]}, {"$set": {"d": foreign["d"]}})
    with pytest.raises(ContentUnavailable):
        small_store.read("pat-r", "bin", 1)
    chunks.update_one({"_id": mine["_id"]}, {"$set": {"d": mine["d"]}})

    # truncation: drop the last chunk and fix up the count
    chunks.delete_one({"b": info.blob_id, "n": 4})
    db.content_blobs.update_one({"_id": info.blob_id}, {"$set": {"n": 4, "size": 4096}})
    with pytest.raises(ContentUnavailable):
        small_store.read("pat-r", "bin", 1)


def test_blob_after_shred_is_unavailable(store, crypto):
    store.put("pat-s", "bin", 1, b"soon gone", max_bytes=MIB)
    shred(crypto, "pat-s")
    with pytest.raises(ContentUnavailable):
        store.open("pat-s", "bin", 1)


def test_open_raises_before_streaming_when_missing(store):
    with pytest.raises(BlobNotFound):
        store.open("nobody", "bin", 1)
