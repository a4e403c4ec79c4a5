"""The ``fhir-dmp`` command line (CONTRACT.md "Install and run").

Subcommands: ``serve``, ``dev-token``, ``load``, ``audit verify``,
``keys rotate``, ``retention run``, ``privacy scan``, ``backup``, ``restore``. Configuration comes only from ``Config.from_env()``; the
options ``--host/--port`` override it (``serve --workers`` is no configuration: it goes to
``server.serve``). Expected failures (bad
configuration, port taken, database that will not start, missing file) end
with one line ``fhir-dmp: error: ...`` on stderr and a non-zero status,
never a traceback. What loads the web app (Flask) or the database driver (pymongo) is imported
inside the subcommand that needs it (``# lazy:``): ``--help`` and ``dev-token`` start without them.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from ..http.errors import FhirError
from .config import Config, ConfigError
from .embedded_db import EmbeddedDbError

PROG = "fhir-dmp"
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ISO date or instant {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="FHIR R4 server for the French shared medical record (DMP).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def listen_options(p, where):
        p.add_argument("--host", default=None, help=f"address {where} (default 127.0.0.1)")
        p.add_argument("--port", type=_port, default=None, help=f"port {where} (default 8080)")

    p = sub.add_parser("serve", help="serve the FHIR API at http://HOST:PORT/fhir")
    listen_options(p, "to listen on")
    p.add_argument("--workers", type=_positive, default=None,
                   help="worker processes (default: one per CPU core, at most 8)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dev-token", help="mint an access token for the dev-mode server",
                       description="Print an access token signed with the dev key. KIND: patient, "
                                   "legal_representative, ps, regulation_centre, admin, officer (the "
                                   "privacy officer, also privacy_officer). The token's "
                                   "audience is the server's base URL: pass the --host/--port given "
                                   "to serve (or set FHIR_DMP_BASE_URL).")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("--patient", help="Patient id (patient)")
    p.add_argument("--related-person", dest="related_person", metavar="ID",
                   help="RelatedPerson id (legal_representative)")
    p.add_argument("--ps", dest="id_nat_ps", metavar="IDNATPS", help="idNatPs of the PS (8 + RPPS)")
    p.add_argument("--profession", metavar="CODE", help="TRE_G15 profession code (10 = médecin, ...)")
    p.add_argument("--purpose", choices=("TREAT", "BTG", "ETREAT"), help="purpose of use")
    p.add_argument("--reason", dest="btg_reason", metavar="TEXT", help="break-glass reason")
    p.add_argument("--scope", metavar="S", help="SMART scopes (space separated)")
    p.add_argument("--lifetime", type=_positive, default=3600, metavar="SEC",
                   help="validity in seconds (default 3600)")
    listen_options(p, "the server listens on")
    p.set_defaults(func=cmd_dev_token)

    p = sub.add_parser("load", help="import FHIR Bundles (JSON) or NDJSON files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("audit", help="journal operations")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="check the AuditEvent hash chains")
    v.add_argument("--patient", metavar="ID", help="only this patient's chain")
    v.set_defaults(func=cmd_audit_verify)
    v = asub.add_parser("seal", help="seal the unsealed AuditEvents now (a running server does it itself)")
    v.set_defaults(func=cmd_audit_seal)

    p = sub.add_parser("keys", help="key management")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    r = ksub.add_parser("rotate", help="new key-encryption key; rewrap every data key; retire old ones")
    r.set_defaults(func=cmd_keys_rotate)

    p = sub.add_parser("retention", help="lifecycle of closed DMPs")
    rsub = p.add_subparsers(dest="retention_command", metavar="ACTION", required=True)
    r = rsub.add_parser("run", help="destroy the closed DMPs whose retention (FHIR_DMP_RETENTION_YEARS) is over")
    r.set_defaults(func=cmd_retention_run)

    p = sub.add_parser("privacy", help="privacy operations")
    psub = p.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    r = psub.add_parser("scan", help="score every (professional, DMP) pair of the window and open review "
                                     "cases for the highest (FHIR_DMP_REVIEW_BUDGET a day)")
    r.add_argument("--since", type=_instant, default=None, help="ISO instant (default: where the last scan ended)")
    r.add_argument("--until", type=_instant, default=None, help="ISO instant (default: now)")
    r.add_argument("--out", type=Path, default=None, help="write one NDJSON line per pair to FILE")
    r.set_defaults(func=cmd_privacy_scan)

    p = sub.add_parser("backup", help="consistent online copy of the database into DIR (never the KEK)")
    p.add_argument("directory", metavar="DIR", help="a new or empty directory")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="load the backup in DIR into an empty database, then re-apply "
                                       "the destroys of the register made after it")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_restore)
    return parser


# -- configuration -------------------------------------------------------
def _config(args=None):
    """``Config.from_env()`` with the command line's overrides."""
    overrides = {}
    for name in ("host", "port"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Config.from_env(**overrides)


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# -- subcommands -----------------------------------------------------------
def cmd_serve(args, *, app_factory: Callable | None = None) -> int:
    from .server import ServeError, serve  # lazy: Flask and pymongo

    config = _config(args)
    try:
        return serve(config, workers=args.workers, app_factory=app_factory)
    except ServeError as e:
        raise CliError(str(e)) from None


def cmd_dev_token(args, **_) -> int:
    config = _config(args)
    if not config.dev_mode:
        raise CliError("dev-token works only in dev mode; FHIR_DMP_ISSUER is set, "
                       "get tokens from that issuer")
    from ..security.devkeys import mint_token  # lazy: cryptography, joserfc: twice --help's start
    try:
        token = mint_token(config, args.kind, patient=args.patient, id_nat_ps=args.id_nat_ps,
                           profession=args.profession, purpose=args.purpose,
                           btg_reason=args.btg_reason, scope=args.scope, lifetime=args.lifetime,
                           related_person=args.related_person)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print(token)
    return 0


def cmd_load(args, **_) -> int:
    from .database import connected  # lazy: pymongo

    paths = [Path(f) for f in args.files]
    for p in paths:
        if not p.is_file():
            raise CliError(f"no such file: {p}")
    config = _config(args)
    from .loader import load_files  # lazy: Flask and pymongo
    from tqdm import tqdm

    class Progress(tqdm):
        """A tqdm bar that is also a callable: ``progress(n)`` == ``progress.update(n)``."""

        def __call__(self, n=1):
            self.update(n)

    with connected(config, log=_say) as (config, _client, _db):
        with Progress(desc="loading", unit=" resources", file=sys.stderr,
                      disable=None) as progress:  # disable=None: no bar when not a tty
            count = load_files(config, paths, progress)
    _say(f"loaded {count} resources from {len(paths)} file(s)")
    return 0


@contextmanager
def _storage(config):
    """(the configuration used, a Storage) on the configured database, for one command."""
    from ..storage import Storage  # lazy: pymongo
    from .database import connected  # lazy: pymongo

    with connected(config, log=_say) as (config_used, client, db):
        yield config_used, Storage(client, db)


def cmd_audit_verify(args, **_) -> int:
    config = _config(args)
    from ..audit.sealer import load_signing_key  # lazy: pymongo
    from ..audit.verify import verify_chains  # lazy: cryptography, joserfc: twice --help's start
    key = load_signing_key(config.audit_key_path)
    with _storage(config) as (_config_used, storage):
        problems = verify_chains(storage, patient_id=args.patient,
                                 unsealed_bound_s=config.audit_seal_bound, check_signatures=True, public_key=key.public_key() if key else None)
    if not problems:
        print("audit chains intact")
        return 0
    print(f"audit chain broken: {problems[0]}")
    if len(problems) > 1:
        print(f"({len(problems) - 1} more problem(s))")
    return 1


def cmd_audit_seal(args, **_) -> int:
    config = _config(args)
    from ..audit.sealer import LeaseLost, Sealer  # lazy: pymongo
    with _storage(config) as (_config_used, storage):
        sealer = Sealer(storage, config.audit_key_path)
        try:
            n = sealer.seal_all()
        except LeaseLost:
            raise CliError("a running server holds the sealer lease; it seals by itself") from None
        finally:
            sealer.release()
    print(f"sealed {n} AuditEvent(s)")
    return 0


def cmd_keys_rotate(args, **_) -> int:
    config = _config(args)
    from ..security.crypto import retire_unused_keks, rotate_kek  # lazy: cryptography, joserfc: twice --help's start
    with _storage(config) as (config_used, storage):
        count = rotate_kek(config_used, storage)
        # a destroyed DMP's data key must not be recoverable from an old backup of the wrapped keys
        # with an old KEK: once nothing is wrapped by them, older KEKs leave the key file
        retired = retire_unused_keks(config_used, storage)
    print(f"new key-encryption key in place; {count} data key(s) rewrapped; "
          f"{len(retired)} old key-encryption key(s) retired")
    return 0


def cmd_retention_run(args, **_) -> int:
    from .database import connected  # lazy: pymongo

    config = _config(args)
    from ..guard.lifecycle import run_retention  # lazy: pymongo
    from ..guard.repository import GuardedRepository  # lazy: pymongo
    from .services import build_services  # lazy: Flask and pymongo
    with connected(config, log=_say) as (config_used, client, db):
        count = run_retention(build_services(config_used.with_(notifications_worker=False), client, db),
                              GuardedRepository)
    print(f"{count} closed DMP(s) past retention destroyed")
    return 0


def cmd_privacy_scan(args, **_) -> int:
    """``fhir-dmp privacy scan``: review/scan.py over the window, its NDJSON in ``--out``."""
    from .database import connected  # lazy: pymongo

    config = _config(args)
    try:
        from ..review.scan import run_scan  # lazy: scikit-learn, the privacy extra
    except ImportError as e:
        raise CliError(f"the privacy scan needs the 'privacy' extra (pip install fhir-dmp[privacy]): {e}") from None
    from .services import build_services  # lazy: Flask and pymongo
    with connected(config, log=_say) as (config_used, client, db):
        services = build_services(config_used.with_(notifications_worker=False), client, db)
        try:
            with open(args.out, "w", encoding="utf-8") if args.out else nullcontext() as out:
                result = run_scan(services.storage, since=args.since, until=args.until, out=out,
                                  budget=config_used.review_budget, audit_log=services.audit_log)
        except OSError as e:
            raise CliError(f"cannot write {args.out}: {e.strerror}") from None
        finally:
            services.audit_log.close()
    print(f"{result.pairs} pair(s) from {result.events} access(es) scored in {result.seconds:.1f} s; "
          f"{len(result.opened)} review case(s) opened")
    return 0


def cmd_backup(args, **_) -> int:
    """``fhir-dmp backup DIR``: storage/backup.py's one-snapshot copy and its manifest."""
    from ..resources.capability import software_version  # lazy: Flask
    from ..storage import BackupRefused  # lazy: pymongo
    config = _config(args)
    with _storage(config) as (_config_used, storage):
        try:
            manifest = storage.backup_to(Path(args.directory), server_version=software_version())
        except BackupRefused as e:
            raise CliError(str(e)) from None
    total = sum(c["count"] for c in manifest["collections"].values())
    print(f"backup of {len(manifest['collections'])} collection(s), {total} document(s) "
          f"at {manifest['time']} in {args.directory}")
    return 0


def cmd_restore(args, **_) -> int:
    """``fhir-dmp restore DIR``: checksums first, an empty database only, the indexes, then the
    destroys of the register made after the backup (guard/lifecycle.reapply_destroys)."""
    from datetime import datetime

    from ..guard.lifecycle import DestroyedRegister, reapply_destroys  # lazy: pymongo
    from ..storage import BackupRefused  # lazy: pymongo
    config = _config(args)
    with _storage(config) as (config_used, storage):
        try:
            manifest = storage.restore_from(Path(args.directory))
        except BackupRefused as e:
            raise CliError(str(e)) from None
        storage.ensure_all_indexes()
        destroyed = reapply_destroys(storage, DestroyedRegister(config_used.destroyed_register_path),
                                     datetime.fromisoformat(manifest["time"].replace("Z", "+00:00")))
    total = sum(c["count"] for c in manifest["collections"].values())
    print(f"restored {total} document(s) of the backup at {manifest['time']}; "
          f"{len(destroyed)} DMP(s) destroyed since then purged again")
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .database import DatabaseError  # lazy: pymongo

    return (CliError, ConfigError, DatabaseError, EmbeddedDbError, FhirError,
            FileNotFoundError, PermissionError, IsADirectoryError)


def _message(exc: BaseException) -> str:
    if isinstance(exc, FhirError):
        text = "; ".join(i.diagnostics for i in exc.issues) or exc.__class__.__name__
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or exc.__class__.__name__
    return " ".join(text.split())  # one line


def main(argv: Sequence[str] | None = None, *, app_factory: Callable | None = None) -> int:
    """Run the command line; return the exit status.

    ``app_factory`` replaces ``fhir_dmp.http.app.create_app`` for ``serve`` (to
    embed the server or test it with another WSGI app).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, app_factory=app_factory)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except _expected_errors() as exc:
        code = getattr(exc, "code", EXIT_ERROR)
        print(f"{PROG}: error: {_message(exc)}", file=sys.stderr, flush=True)
        return code if isinstance(code, int) and code > 0 else EXIT_ERROR
    except SystemExit as exc:
        # the server halts with sys.exit(status) (granian, when its workers keep crashing)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
