"""Benchmark: content encryption throughput and memory (DESIGN.md "Storage": attachments).

    python bench/crypto.py [--sizes 1,10,20] [--repeat 3] [--mongodb-uri URI]

Compares, on 1 / 10 / 20 MB documents (best of ``--repeat``):

* raw ``AESGCM`` encrypt/decrypt of the whole document (the floor);
* ``DocumentCrypto.encrypt/decrypt`` (per-patient key from cache, AAD) — goal >= 0.8x raw;
* ``ChunkEncryptor`` over 1 MiB chunks (the streaming path, crypto only);
* ``BlobStore.put/read`` end to end (hashing + encryption + database writes),
  next to a baseline "raw AESGCM per 1 MiB chunk + the same inserts/finds";

then the peak Python memory (tracemalloc) during a 20 MB ``put`` (from bytes
and from a file object) and a 20 MB ``open`` iteration — goal <= 2x the document.

Without ``--mongodb-uri`` a throw-away SecantusDB is started on a free port.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pymongo  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from fhir_dmp.storage.content import BlobStore  # noqa: E402
from fhir_dmp.security.crypto import DocumentCrypto, LocalKeyFileProvider  # noqa: E402
from fhir_dmp.storage import Storage  # noqa: E402

MB = 1_000_000
MIB = 1 << 20


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def start_db(tmp: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["secantusd-py", "--host", "127.0.0.1", "--port", str(port), "--storage-path",
                             str(tmp / "db"), "--sync-on-commit"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.admin.command("ping")
            return proc, client
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("SecantusDB did not start")
            time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,20", help="document sizes in MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mongodb-uri")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        proc = None
        if args.mongodb_uri:
            client = pymongo.MongoClient(args.mongodb_uri)
        else:
            proc, client = start_db(tmp)
        db = client["bench_crypto"]
        client.drop_database("bench_crypto")
        try:
            storage = Storage(client, db)
            crypto = DocumentCrypto(storage, LocalKeyFileProvider(tmp / "kek.key"))
            store = BlobStore(storage, crypto)
            raw = AESGCM(AESGCM.generate_key(256))
            crypto.encrypt("bench-patient", "warm", 1, b"")  # create + cache the data key

            rows = []
            version = 0
            for size in sizes:
                data = os.urandom(size * MB)
                nonce = os.urandom(12)
                ct_raw = raw.encrypt(nonce, data, b"aad")
                ct_doc = crypto.encrypt("bench-patient", "bin", 1, data)
                t_raw_e = best(lambda: raw.encrypt(os.urandom(12), data, b"aad"), args.repeat)
                t_raw_d = best(lambda: raw.decrypt(nonce, ct_raw, b"aad"), args.repeat)
                t_doc_e = best(lambda: crypto.encrypt("bench-patient", "bin", 1, data), args.repeat)
                t_doc_d = best(lambda: crypto.decrypt("bench-patient", "bin", 1, ct_doc), args.repeat)

                def chunked():
                    enc = crypto.encryptor("bench-patient", "bin", 1, stream_id="s")
                    mv = memoryview(data)
                    n = (len(mv) + MIB - 1) // MIB
                    for i in range(n):
                        enc.encrypt_chunk(i, mv[i * MIB:(i + 1) * MIB], last=i == n - 1)
                t_chunk = best(chunked, args.repeat)

                base_coll = db["bench_baseline"]

                def baseline_put():
                    base_coll.delete_many({})
                    mv = memoryview(data)
                    for i in range(0, len(mv), MIB):
                        nn = os.urandom(12)
                        base_coll.insert_one({"_id": i, "d": nn + raw.encrypt(nn, mv[i:i + MIB], b"aad")})

                def baseline_read():
                    for d in base_coll.find().sort("_id", 1).batch_size(4):
                        raw.decrypt(d["d"][:12], d["d"][12:], b"aad")

                t_base_put = best(baseline_put, args.repeat)
                t_base_read = best(baseline_read, args.repeat)

                def put():
                    nonlocal version
                    version += 1
                    store.put("bench-patient", "bin", version, data, max_bytes=len(data))
                t_put = best(put, args.repeat)
                t_read = best(lambda: sum(len(c) for c in store.open("bench-patient", "bin", version)), args.repeat)
                mbs = lambda t: size / t  # noqa: E731
                rows.append((size, [
                    ("raw AESGCM encrypt", mbs(t_raw_e), 1.0),
                    ("DocumentCrypto.encrypt", mbs(t_doc_e), t_raw_e / t_doc_e),
                    ("ChunkEncryptor 1 MiB", mbs(t_chunk), t_raw_e / t_chunk),
                    ("raw AESGCM decrypt", mbs(t_raw_d), 1.0),
                    ("DocumentCrypto.decrypt", mbs(t_doc_d), t_raw_d / t_doc_d),
                    ("baseline chunks+insert", mbs(t_base_put), t_raw_e / t_base_put),
                    ("BlobStore.put", mbs(t_put), t_raw_e / t_put),
                    ("  vs baseline put", None, t_base_put / t_put),
                    ("baseline find+decrypt", mbs(t_base_read), t_raw_d / t_base_read),
                    ("BlobStore.open", mbs(t_read), t_raw_d / t_read),
                    ("  vs baseline read", None, t_base_read / t_read),
                ]))

            print("\nThroughput (MB/s, best of %d; ratio = raw AESGCM time / this time, goal >= 0.8)" % args.repeat)
            print(f"{'size':>6}  {'operation':<26} {'MB/s':>9}  {'ratio':>6}")
            for size, ops in rows:
                for name, rate, ratio in ops:
                    rate_s = f"{rate:9.0f}" if rate is not None else " " * 9
                    print(f"{size:>4}MB  {name:<26} {rate_s}  {ratio:6.2f}")

            # ---- memory: tracemalloc peak during 20 MB put and open
            size = 20 * MB
            data = os.urandom(size)
            print(f"\nPeak traced memory during a {size // MB} MB document (goal <= 2x = {2 * size / MIB:.1f} MiB)")
            print(f"{'operation':<28} {'peak MiB':>9}  {'x doc':>6}")
            cases = []

            def measure(name, fn):
                tracemalloc.start()
                tracemalloc.reset_peak()
                fn()
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                cases.append((name, peak))

            measure("put (bytes source)", lambda: store.put("mem", "bin", 1, data, max_bytes=size))
            path = tmp / "doc.bin"
            path.write_bytes(data)

            def put_file():
                with open(path, "rb") as fh:
                    store.put("mem", "bin", 2, fh, max_bytes=size)
            measure("put (file object)", put_file)
            measure("put (64 KiB iterable)", lambda: store.put(
                "mem", "bin", 3, (data[i:i + 65536] for i in range(0, size, 65536)), max_bytes=size))

            def stream():
                for _chunk in store.open("mem", "bin", 1):
                    pass
            measure("open (iterate)", stream)
            measure("read (whole, for contrast)", lambda: store.read("mem", "bin", 1))
            for name, peak in cases:
                print(f"{name:<28} {peak / MIB:9.1f}  {peak / size:6.2f}")
        finally:
            client.drop_database("bench_crypto")
            client.close()
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
