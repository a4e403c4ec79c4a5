"""Storage: versions, decimals, flat filters and the access facets stored beside each document."""
import json
import threading
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_dmp.runtime.services import services
from fhir_dmp.security.decision import access_facets
from fhir_dmp.storage import Storage, VersionConflict, merge_filters, pack, unpack
from tests import builders as b


def test_merge_filters_stays_flat_unless_keys_collide():
    assert merge_filters({"pid": "1"}, {"del": False}, {}) == {"pid": "1", "del": False}
    assert merge_filters({"pid": "1"}, {"pid": "2"}) == {"pid": "1", "$and": [{"pid": "2"}]}
    assert merge_filters({"$and": [{"a": 1}]}, {"b": 2}) == {"b": 2, "$and": [{"a": 1}]}
    assert merge_filters({"$or": [{"a": 1}]}, {"$or": [{"b": 1}]}) == \
        {"$or": [{"a": 1}], "$and": [{"$or": [{"b": 1}]}]}


def test_access_facets_fold_rule_9():
    doc = b.docref("p", b.LAB, labels=("MASQUE_PS",), author=b.PS_DR)
    assert access_facets("DocumentReference", doc) == {
        "types": [b.LAB], "masked": True, "authors": [b.PS_DR], "labels": ["MASQUE_PS"]}
    assert access_facets("DocumentReference", b.docref("p", b.LAB))["masked"] is False
    pat = b.patient("185037500000115")
    assert access_facets("Patient", pat) == {"ins": [f"{b.NIR}|185037500000115"], "gp": []}
    assert access_facets("Patient", b.patient(ins=False, gp=b.PS_DR)) == {"gp": [b.PS_DR]}
    consent = b.consent("p", "permit", actor=b.PS_DR)
    assert access_facets("Consent", consent) == {"actors": [f"{b.IDNATPS}|{b.PS_DR}"]}


def test_versions_conflicts_and_decimals(mongo_client, db):
    storage = Storage(mongo_client, db, annotate=access_facets)
    storage.ensure_indexes()
    obs = dict(b.patient(), multipleBirthInteger=2)
    v1 = storage.run_transaction(lambda s: storage.create("Patient", obs, pid=None, session=s))
    assert v1.vid == 1 and v1.pid == v1.id
    v2 = storage.run_transaction(lambda s: storage.update("Patient", v1.id, dict(v1.resource, gender="male"),
                                                          pid=v1.pid, expected_vid=1, session=s))
    assert v2.vid == 2 and storage.vread("Patient", v1.id, 1).resource["gender"] == "female"
    with pytest.raises(VersionConflict):
        storage.run_transaction(lambda s: storage.update("Patient", v1.id, v1.resource, pid=v1.pid,
                                                         expected_vid=1, session=s))
    assert storage.read("Patient", v1.id).vid == 2                 # the loser wrote nothing
    doc = dict(b.docref(v1.id), content=[{"attachment": {"contentType": "application/pdf", "size": 3}}])
    doc["extension"] = [{"url": "urn:x", "valueDecimal": Decimal("72.50")}]
    d = storage.run_transaction(lambda s: storage.create("DocumentReference", doc, pid=v1.id, session=s))
    back = storage.read("DocumentReference", d.id).resource
    assert back["extension"][0]["valueDecimal"] == Decimal("72.50")
    assert str(back["extension"][0]["valueDecimal"]) == "72.50"     # precision kept
    assert db["DocumentReference"].find_one({"_id": d.id})["a"]["types"] == [b.CONSULTATION]


def test_a_key_set_record_is_replaced_only_by_a_later_one(db_storage):
    """The shared view of the issuer's keys (security/auth.py SharedKeys): the latest ``at`` wins,
    whatever the order the records arrive in."""
    assert db_storage.key_set("https://idp.test") is None
    assert db_storage.record_key_set("https://idp.test", {"at": 2.0, "keys": [["a", "x"]]})
    assert not db_storage.record_key_set("https://idp.test", {"at": 1.0, "keys": [["b", "y"]]})
    assert not db_storage.record_key_set("https://idp.test", {"at": 2.0, "keys": [["b", "y"]]})
    assert db_storage.key_set("https://idp.test") == {"at": 2.0, "keys": [["a", "x"]]}
    assert db_storage.record_key_set("https://idp.test", {"at": 3.0, "keys": []})
    assert db_storage.key_set("https://idp.test") == {"at": 3.0, "keys": []}


def test_storage_wraps_pymongo_errors_except_inside_a_transaction(mongo_server, db):
    """storage/errors.py: outside a transaction a pymongo error comes out as a StorageError (the
    pymongo error its cause); inside one, a call made with the transaction's session raises
    pymongo's own (with_transaction must see it to retry a lost race), and run_transaction wraps
    what is left once it returns; cursors and a closed client raise storage's errors too."""
    import pymongo
    from pymongo.errors import DuplicateKeyError

    from fhir_dmp.storage import DuplicateKey, StorageClosed, StorageError, WriteConflict, is_write_conflict
    storage = Storage(db.client, db)
    assert storage.add_data_key({"_id": "p1", "kek_id": "k"})
    assert not storage.add_data_key({"_id": "p1", "kek_id": "k"})       # another request's first
    storage.add_blob({"_id": "b0", "p": "p", "r": "r", "v": 0})
    with pytest.raises(DuplicateKey) as info:
        storage.add_blob({"_id": "b0", "p": "p", "r": "r", "v": 0})
    assert isinstance(info.value, StorageError) and isinstance(info.value.__cause__, DuplicateKeyError)
    seen = []

    def attempt(s):
        try:
            storage.add_blob({"_id": "b1", "p": "p", "r": "r", "v": 1}, session=s)
            storage.add_blob({"_id": "b1", "p": "p", "r": "r", "v": 2}, session=s)
        except Exception as exc:
            seen.append(type(exc))
            raise
    with pytest.raises(DuplicateKey):
        storage.run_transaction(attempt)
    assert seen == [DuplicateKeyError]
    conflict = WriteConflict(pymongo.errors.OperationFailure("WriteConflict", 112))
    assert is_write_conflict(conflict) and not is_write_conflict(info.value)

    client = pymongo.MongoClient(mongo_server.uri, tz_aware=True)
    closing = Storage(client, client[db.name])
    heads = closing.chain_heads()
    client.close()
    with pytest.raises(StorageClosed):
        closing.data_key("p1")
    with pytest.raises(StorageError):
        list(heads)


# ---------- one DMP per INS, enforced by the database (review hole 4)
def test_second_dmp_with_same_ins_is_409(api):
    ins = b.nir()
    dr = api.as_ps(b.PS_DR)
    first = dr.create(b.patient(ins))
    r = api.as_ps(b.PS_OTHER).post("Patient", b.patient(ins))
    assert r.status_code == 409, r.json
    assert r.json["issue"][0]["code"] == "duplicate"
    diag = r.json["issue"][0]["diagnostics"]
    assert "identifier" in diag and "verification" in diag and first["id"] not in diag
    # closed: still taken
    admin = api.as_admin()
    pat = admin.get(f"Patient/{first['id']}").json
    assert admin.put(f"Patient/{first['id']}", dict(pat, active=False)).status_code == 200
    assert admin.post("Patient", b.patient(ins)).status_code == 409
    # the test NIR system and another system with the same value are other identities
    other = b.patient(ins)
    other["identifier"] = [{"system": "urn:oid:1.2.250.1.213.1.4.10", "value": ins}]
    assert dr.post("Patient", other).status_code == 201


def test_ins_uniqueness_is_enforced_by_the_database(api):
    ins = b.nir()
    results = []

    def create(i):
        results.append(api.as_ps(b.PS_DR).post("Patient", b.patient(ins)).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(201) == 1, results
    assert all(s in (201, 409) for s in results), results


def test_ins_index_is_unique(app):
    storage = services(app).storage
    info = storage.db["Patient"].index_information()
    assert any(ix.get("unique") and any(k[0] == "a.ins" for k in ix["key"]) for ix in info.values()), info


# the journal's packed resources read back as the standard library reads them (storage/core.py
# unpack: orjson where it reads the same, the standard library where it could not)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_a_packed_resource_unpacks_to_what_the_standard_library_reads(value):
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    got = unpack(pack(raw))
    assert repr(got) == repr(json.loads(raw))


def test_a_packed_integer_beyond_64_bits_stays_an_integer():
    for n in (2 ** 64, 2 ** 70, -(2 ** 63) - 1, 10 ** 19):
        assert repr(unpack(pack({"n": n, "id": "1234567890123456789012"}))) == repr({"n": n, "id": "1234567890123456789012"})
