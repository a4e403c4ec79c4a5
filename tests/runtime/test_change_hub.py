"""One change stream per node (issue 22): ``fhir-dmp serve``'s change hub (``fhir_dmp/runtime/change_hub.py``).

Real parts only: ``fhir-dmp serve`` processes (granian workers, each with its decision context
cache fed by the node's hub) on the session's SecantusDB, real tokens, HTTP from outside. What is
checked:

* the database serves ONE change stream to a server of three workers: SecantusDB's ``currentOp``
  lists every change stream as an idle tailable, awaitData cursor on ``<db>.$cmd.aggregate``
  (counted over two seconds; the hub's log says "change stream opened" once, each worker's cache
  that it is live on the hub's feed);
* a block written through one worker is in force on every worker within one second, and so is
  its lifting;
* the hub SIGKILLed: the workers stop serving from their caches at once (a block written in the
  database by another process while the hub is down is in force on the next request), serve
  starts the hub again, and the workers' caches are live again (each says so) and invalidated as
  before;
* the hub frozen (SIGSTOP): silent for a second, it is taken for lost (a block written meanwhile is
  in force within the second), and the caches come back when it goes on.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests import builders as b
from tests.api import Api
from tests.faults.process_kit import call, hub_pids

OPENED = "change hub: change stream opened"
CACHE_LIVE = "decision context cache: live (the node's change hub)"


def _streams(mongo_client, db) -> int:
    """Change streams open on the test's database now (SecantusDB ``currentOp``)."""
    return sum(1 for op in mongo_client.admin.command("currentOp")["inprog"]
               if op.get("type") == "idleCursor" and op.get("ns") == f"{db.name}.$cmd.aggregate"
               and op.get("tailable") and op.get("awaitData"))


def _statuses(url: str, path: str, token: str, n: int = 24) -> set[int]:
    """``n`` requests, each on a new connection (so that every worker answers some)."""
    return {call("GET", f"{url}/{path}", token).status_code for _ in range(n)}


def _within(seconds: float, probe, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.05)


def _said(server, text: str) -> int:
    return server.log.read_text(errors="replace").count(text)


def _one_second_after(t0: float) -> None:
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))


def test_serve_opens_one_change_stream_for_its_workers_and_a_block_reaches_them_all(serve, mongo_client, db, idp):
    a = serve("a", workers=3)
    _within(30, lambda: _said(a, CACHE_LIVE) == 3, "every worker's feed live")
    ps = idp.ps(b.PS_DR)
    r = call("POST", f"{a.url}/Patient", ps, b.patient(email=None))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert call("POST", f"{a.url}/DocumentReference", ps, b.docref(pid)).status_code == 201
    assert _statuses(a.url, f"Patient/{pid}", ps) == {200}         # cached in every worker

    counts = []
    for _ in range(20):
        counts.append(_streams(mongo_client, db))
        time.sleep(0.1)
    assert max(counts) == 1, counts
    assert _said(a, OPENED) == 1, a.tail()

    # the patient blocks the médecin through one worker: every worker refuses within one second
    patient = idp.patient(pid)
    r = call("POST", f"{a.url}/Consent", patient, b.consent(pid, "deny", actor=b.PS_DR))
    t0 = time.monotonic()
    assert r.status_code == 201, r.text
    _one_second_after(t0)
    assert _statuses(a.url, f"Patient/{pid}", ps) == {404}
    assert call("DELETE", f"{a.url}/Consent/{r.json()['id']}", patient).status_code == 204
    _one_second_after(time.monotonic())
    assert _statuses(a.url, f"Patient/{pid}", ps) == {200}


@pytest.fixture
def cached(serve, build_app, config, idp):
    """``(server, writer, pid, ps)``: a server of two workers, each with the DMP ``pid``'s context
    cached for ``ps`` (a médecin authorized there) on its hub's live feed; ``writer`` is another
    process writing straight to the database (an app with no cache and no stream of its own)."""
    a = serve("a", workers=2)
    _within(30, lambda: _said(a, CACHE_LIVE) == 2, "every worker's feed live")
    writer = Api(build_app(config.with_(context_cache=False)), idp)
    pid = writer.as_ps(b.PS_DR).create(b.patient(email=None))["id"]
    ps = idp.ps(b.PS_DR)
    assert _statuses(a.url, f"Patient/{pid}", ps) == {200}
    return a, writer, pid, ps


def _block(writer, pid: str):
    block = writer.as_patient(pid).post("Consent", b.consent(pid, "deny", actor=b.PS_DR))
    assert block.status_code == 201
    return block.json["id"]


def test_a_killed_hub_stops_the_caches_at_once_and_serve_starts_it_again(cached):
    a, writer, pid, ps = cached
    [hub] = hub_pids(a.proc.pid)
    os.kill(hub, signal.SIGKILL)
    block = _block(writer, pid)
    # at once, not within a second: nobody could have told the workers of the block
    assert _statuses(a.url, f"Patient/{pid}", ps) == {404}
    assert _said(a, OPENED) == 1, "the hub was back before the reads: nothing shown"

    # serve starts the hub again; every worker's feed is back and invalidates as before
    _within(30, lambda: _said(a, OPENED) == 2 and _said(a, CACHE_LIVE) == 4, "hub and feeds back")
    assert hub_pids(a.proc.pid) not in ([], [hub])
    assert _statuses(a.url, f"Patient/{pid}", ps) == {404}           # cached again, as blocked
    assert writer.as_patient(pid).delete(f"Consent/{block}").status_code == 204
    _one_second_after(time.monotonic())
    assert _statuses(a.url, f"Patient/{pid}", ps) == {200}
    _block(writer, pid)
    _one_second_after(time.monotonic())
    assert _statuses(a.url, f"Patient/{pid}", ps) == {404}


def test_a_frozen_hub_is_a_lost_feed_within_a_second(cached):
    """A hub that says nothing (SIGSTOP: neither dead nor forwarding) for a second is taken for lost:
    a block written meanwhile is in force within the contract's second, although no change reached
    the workers; once the hub goes on, so do their caches."""
    a, writer, pid, ps = cached
    [hub] = hub_pids(a.proc.pid)
    os.kill(hub, signal.SIGSTOP)
    try:
        _block(writer, pid)
        _one_second_after(time.monotonic())
        assert _statuses(a.url, f"Patient/{pid}", ps) == {404}
    finally:
        os.kill(hub, signal.SIGCONT)
    _within(30, lambda: _said(a, CACHE_LIVE) == 4, "feeds back")
    assert hub_pids(a.proc.pid) == [hub]                              # the same hub, going on
    assert _statuses(a.url, f"Patient/{pid}", ps) == {404}


def test_a_hub_that_keeps_dying_is_restarted_ever_more_slowly():
    from fhir_dmp.runtime.change_hub import RESTART_PAUSE_MAX_S, RESTART_PAUSE_S, restart_pause
    pause, seen = 0.0, []
    for _ in range(8):                       # each one dies within a second of its start
        pause = restart_pause(pause, 0.5)
        seen.append(pause)
    assert seen[0] == RESTART_PAUSE_S and seen == sorted(seen) and seen[-1] == RESTART_PAUSE_MAX_S
    assert restart_pause(RESTART_PAUSE_MAX_S, 3600) == RESTART_PAUSE_S    # one that ran long: 1 s again


def test_socket_directories_of_dead_masters_are_removed(tmp_path):
    """A master SIGKILLed leaves its hub's directory: the next serve removes it, never a live
    master's, nor one too young to have its pid file yet, nor one whose hub still answers."""
    import subprocess
    import sys
    from fhir_dmp.runtime.change_hub import DIR_PREFIX, MASTER_FILE, SOCKET_NAME, remove_orphan_dirs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("live", os.getpid()), ("young", None), ("old", None)):
        d = tmp_path / f"{DIR_PREFIX}{name}"
        d.mkdir()
        if pid is not None:
            (d / MASTER_FILE).write_text(str(pid))
    os.utime(tmp_path / f"{DIR_PREFIX}old", (time.time() - 120, time.time() - 120))
    import socket
    answering = tmp_path / f"{DIR_PREFIX}answering"          # its master's pid unknown here, its hub alive
    answering.mkdir()
    (answering / MASTER_FILE).write_text(str(dead.pid))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(answering / SOCKET_NAME))
    listener.listen(1)
    (tmp_path / "other").mkdir()
    try:
        removed = {os.path.basename(p) for p in remove_orphan_dirs(str(tmp_path))}
    finally:
        listener.close()
    assert removed == {f"{DIR_PREFIX}dead", f"{DIR_PREFIX}old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["other", f"{DIR_PREFIX}live", f"{DIR_PREFIX}young", f"{DIR_PREFIX}answering"])
