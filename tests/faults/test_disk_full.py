"""Disk full under the database (CONTRACT.md "Faults, failover and backups").

The database's storage path is on a small tmpfs of the test's own (``mount -t tmpfs -o size=``;
skipped, saying why, where the machine does not allow the mount), nearly filled by a filler
file. Under mixed load the disk fills: WiredTiger panics on ENOSPC (as in mongod) and the
database answers every command with an internal error. Writes, and reads (their AuditEvent cannot
be written), answer 503 ``transient``, never 500. Then space comes back (the filler removed) and
the database is restarted on the same path, as an operator would: the running ``fhir-dmp serve``
serves again without a restart, nothing acknowledged is lost (content byte for byte), every
answered request is journaled and ``fhir-dmp audit verify`` passes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests import builders as b
from tests.faults.process_kit import (MixedLoad, assert_nothing_lost, back_within, kill_database, open_dmps,
                                      own_database, verified)

DISK_MB = 48
MARGIN_MB = 1       # left free by the filler: the load fills it within seconds


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of ``DISK_MB`` MiB mounted at ``tmp_path/disk``; unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, margin_mb: int):
    """A filler file leaving ``margin_mb`` MiB free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free - margin_mb * 2**20
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free, 1))
    return filler


def test_disk_full_answers_503_then_serves_again_with_nothing_lost(small_disk, serve, idp, fhir_dmp_cli):
    database = own_database(small_disk / "home")
    env = {"FHIR_DMP_MONGODB_URI": database.uri, "FHIR_DMP_DB": "disk_full", "FHIR_DMP_DB_WAIT": "2"}
    load = server = None
    try:
        server = serve("a", **env)
        dr = idp.ps(b.PS_DR)
        pids = open_dmps(server.url, dr, 2)
        filler = fill(small_disk, MARGIN_MB)
        load = MixedLoad(lambda: server.url, idp, pids, pad=40000).start()
        deadline = time.monotonic() + 40
        while True:      # until both reads and deposits are refused
            refused = {what.split("/")[0].split("?")[0] for status, _, what in list(load.answered.values())
                       if status == 503}
            if {"DocumentReference", "Patient"} <= refused and load.statuses()[503] >= 10:
                break
            assert time.monotonic() < deadline, (load.statuses(), database.running)
            time.sleep(0.2)
        full = load.statuses()

        filler.unlink()
        if database.running:         # panicked (WiredTiger on ENOSPC): restarted on the same path
            kill_database(database)
        database.start()
        back = back_within(f"{server.url}/Patient/{pids[0]}", dr, timeout=20)
        time.sleep(2)
        load.stop()
        assert server.proc.poll() is None, "serve died"
        assert_nothing_lost(load, server.url, idp)
        out = verified(fhir_dmp_cli, env, timeout=20)
        assert "audit chains intact" in out, out
        print("full", full, "after", load.statuses(), f"back after {back:.1f} s")
    finally:
        if load is not None:
            load.stop()
        if server is not None:
            server.stop()       # before its database: no shutdown spent waiting for it
        database.stop()
