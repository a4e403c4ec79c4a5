"""``fhir-dmp serve`` with the access decision and the journal switched off: BENCH ONLY.

    python bench/_unguarded.py --port P [--workers N]     (same FHIR_DMP_* environment as serve)

Used by ``bench/peer.py`` to measure what the consent decision and the journal cost on a read:
the same server, the same token check, the same storage read and serialization, but
``RequestAccess.can_see`` permits without loading any context and ``flush_audit`` writes
nothing. Never import this module from the application.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fhir_dmp.runtime.config import Config  # noqa: E402
from fhir_dmp.guard.repository import GuardedRepository  # noqa: E402
from fhir_dmp.security.decision import Decision, RequestAccess  # noqa: E402
from fhir_dmp.runtime.server import serve  # noqa: E402


def unguarded_app(config):
    from fhir_dmp.http.app import create_app
    RequestAccess.can_see = lambda self, *a, **kw: Decision(True, "bench", "guard off")
    GuardedRepository.flush_audit = lambda self: None
    return create_app(config)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    sys.exit(serve(Config.from_env(port=a.port, audit_sealer=False), workers=a.workers,
                   app_factory=unguarded_app))
