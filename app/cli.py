"""The `runyard` command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from app.config import current_config


def _database_url() -> str:
    """DATABASE_URL, or else the embedded PostgreSQL that `runyard up` keeps under RUNYARD_HOME."""
    from app.db import db

    cfg = current_config()
    url = cfg.database_url
    pgdata = cfg.home / "pgdata"
    if not url and pgdata.exists():
        from app.embedded import EmbeddedPostgres

        print(
            f"runyard: DATABASE_URL is unset; using the embedded PostgreSQL in {pgdata}",
            file=sys.stderr,
        )
        url = EmbeddedPostgres(pgdata).start()
    if not url:
        url = cfg.require_database()
    db.configure(url)
    return url


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade(_database_url())
    print("database at head")
    return 0


def cmd_orgs_create(args: argparse.Namespace) -> int:
    from app.db import db
    from app.orgs import services

    _database_url()
    with db.session() as session:
        org, token = services.create_org(session, args.name)
        session.commit()
    if args.json:
        print(json.dumps({"org": {"id": str(org.id), "name": org.name}, "token": token}))
    else:
        print(f"organization {org.name} ({org.id})")
        print(f"admin token (shown once): {token}")
    return 0


def cmd_orgs_limits(args: argparse.Namespace) -> int:
    from app.db import db
    from app.flow import services

    _database_url()
    changes = {name: getattr(args, name) for name in services.SETTABLE}
    with db.session() as session:
        limits = services.set_limits(
            session, args.name, {name: value for name, value in changes.items() if value != _KEEP}
        )
        session.commit()
    if args.json:
        print(json.dumps(limits.as_dict()))
    else:
        for name, value in limits.as_dict().items():
            print(f"{name:<20} {'none' if value is None else value}")
    return 0


# An option not given leaves its limit as it is; `none` removes it.
_KEEP = object()


def _limit(raw: str) -> float | None:
    if raw == "none":
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a number, or none: {raw!r}") from exc


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from app.audit import services as audit
    from app.db import db
    from app.errors import NotFound
    from app.orgs import services

    _database_url()
    with db.session() as session:
        org = services.get_org_by_name(session, args.org)
        if org is None:
            raise NotFound(f"no organization {args.org!r}")
        token = services.create_token(
            session, org.id, name=args.name, role=args.role, audited_as=audit.Actor.cli(org.id)
        )
        session.commit()
    if args.json:
        print(
            json.dumps(
                {"org": {"id": str(org.id), "name": org.name}, "role": args.role, "token": token}
            )
        )
    else:
        print(f"{args.role} token for {org.name} (shown once): {token}")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from app.db import db
    from app.orgs import services

    _database_url()
    with db.session() as session:
        tokens = services.list_tokens(session, args.org)
        rows = [
            {
                "id": str(t.id),
                "name": t.name,
                "role": t.role,
                "prefix": t.prefix,
                "created_at": t.created_at.isoformat(),
                "expires_at": t.expires_at.isoformat() if t.expires_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in tokens
        ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            state = "revoked" if row["revoked_at"] else "active"
            print(f"{row['id']}  {row['prefix']}...  {row['role']:<9}  {state:<7}  {row['name']}")
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    import uuid

    from app.db import db
    from app.errors import NotFound
    from app.orgs import services

    _database_url()
    try:
        token_id = uuid.UUID(args.token_id)
    except ValueError as exc:
        raise NotFound(f"no token {args.token_id!r}", hint="`runyard tokens list ORG`") from exc
    with db.session() as session:
        services.revoke_token(session, token_id)
        session.commit()
    print(f"revoked {token_id} (API processes forget it within RUNYARD_TOKEN_CACHE_SECONDS)")
    return 0


def _audited_org(session, name: str):
    from app.errors import NotFound
    from app.orgs import services

    org = services.get_org_by_name(session, name)
    if org is None:
        raise NotFound(f"no organization {name!r}", hint="runyard orgs create NAME")
    return org


def _anchor(raw: str):
    from app.audit.services import Head

    seq, _, hashed = raw.partition(":")
    if not seq.isdigit() or len(hashed) != 64:
        raise argparse.ArgumentTypeError(f"SEQ:HASH as `runyard audit head` prints it: {raw!r}")
    return Head(int(seq), hashed)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from app.audit import services as audit
    from app.db import db

    _database_url()
    with db.session() as session:
        org = _audited_org(session, args.org)
        verdict = audit.verify(session, org.id, args.anchor)
    holds = verdict.bad_seq is None
    if args.json:
        print(
            json.dumps(
                {"org": org.name, "holds": holds, "events": verdict.count}
                | ({} if holds else {"bad_seq": verdict.bad_seq, "reason": verdict.reason})
            )
        )
    elif holds:
        anchored = f", through the anchor at seq {args.anchor.seq}" if args.anchor else ""
        print(f"{verdict.count} events: the audit trail of {org.name} holds{anchored}")
    else:
        print(
            f"seq {verdict.bad_seq}: {verdict.reason} (the {verdict.count} events before it hold)"
        )
    return 0 if holds else 1


def cmd_audit_head(args: argparse.Namespace) -> int:
    from app.audit import services as audit
    from app.db import db

    _database_url()
    with db.session() as session:
        org = _audited_org(session, args.org)
        head = audit.head(session, org.id)
    if args.json:
        print(json.dumps({"org": org.name, "seq": head.seq, "hash": head.hash}))
    else:
        print(f"{head.seq}:{head.hash}")
    return 0


def cmd_secrets_reencrypt(_args: argparse.Namespace) -> int:
    """Seal every secret, webhook secret and notification secret under the first key."""
    from app.config import Config, use_config
    from app.db import db
    from app.secrets import services
    from app.up import SECRET_KEYS_FILE, secret_keys

    cfg = current_config()
    if not cfg.secret_keys and (cfg.home / SECRET_KEYS_FILE).exists():
        print(
            f"runyard: RUNYARD_SECRET_KEYS is unset; using {cfg.home / SECRET_KEYS_FILE}",
            file=sys.stderr,
        )
        os.environ["RUNYARD_SECRET_KEYS"] = secret_keys(cfg.home)
        use_config(Config.from_env())
    _database_url()
    with db.session() as session:
        counts = {"secrets": services.reencrypt(session)}
        for table in services.SEALED_COLUMNS:
            counts[table] = services.reencrypt_column(session, table)
        session.commit()
    for what, (resealed, total) in counts.items():
        print(f"{what}: {resealed} re-encrypted, {total} in all")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    cfg = current_config()
    cfg.require_database()
    # /metrics must add up every gunicorn worker, not answer for whichever took the scrape:
    # prometheus_client's multiprocess mode, with a directory of this server's own.
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="runyard-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    def child_exit(_server, worker) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host or cfg.api_host}:{args.port or cfg.api_port}")
            self.cfg.set("workers", cfg.api_workers)
            # Each open event stream holds a thread while it waits (cheaply, on an Event): the
            # streams get threads of their own, capped per process by the stream route's
            # semaphore (503 beyond), so ordinary requests always keep their api_threads.
            self.cfg.set("threads", cfg.api_threads + cfg.max_streams_per_process)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", "-" if args.access_log else None)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("child_exit", child_exit)
            # Two servers on one host would fight over the default control socket path.
            self.cfg.set("control_socket_disable", True)

        def load(self):
            from app import create_app

            return create_app()

    try:
        Server().run()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from app.up import up

    return up(with_examples=not args.no_examples)


def _add_audit_commands(commands) -> None:
    audit = commands.add_parser("audit", help="the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="check an organization's hash chain: exit 0 when it holds, 1 naming the first "
        "changed, removed or inserted event",
    )
    verify.add_argument("org", help="organization name")
    verify.add_argument(
        "--anchor",
        type=_anchor,
        metavar="SEQ:HASH",
        help="a head printed by `runyard audit head` earlier and kept elsewhere: the chain must "
        "still pass through it (catches a rewrite of the whole table)",
    )
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=cmd_audit_verify)
    head = audit_commands.add_parser(
        "head", help="print the chain's head as SEQ:HASH, to keep outside the database"
    )
    head.add_argument("org", help="organization name")
    head.add_argument("--json", action="store_true", help="print JSON")
    head.set_defaults(func=cmd_audit_head)


def _add_secrets_commands(commands) -> None:
    secrets_parser = commands.add_parser("secrets", help="secrets at rest")
    secrets_commands = secrets_parser.add_subparsers(dest="secrets_command", required=True)
    secrets_commands.add_parser(
        "reencrypt",
        help="seal every secret (and webhook and notification secret) under the first key of "
        "RUNYARD_SECRET_KEYS; run it after putting a new key first",
    ).set_defaults(func=cmd_secrets_reencrypt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runyard", description="Run versioned, typed agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    db_parser = commands.add_parser("db", help="database schema")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply the migrations to head").set_defaults(
        func=cmd_db_upgrade
    )

    orgs = commands.add_parser("orgs", help="organizations")
    orgs_commands = orgs.add_subparsers(dest="orgs_command", required=True)
    create = orgs_commands.add_parser("create", help="create one and print its admin token")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=cmd_orgs_create)
    limits = orgs_commands.add_parser(
        "limits",
        help="set an organization's limits (none removes one) and weight, and print them all",
    )
    limits.add_argument("name")
    for option, meaning in (
        ("--max-running", "executions running at once, over all workers; the rest wait, queued"),
        ("--max-queued", "executions not yet started; a submit past it is a 429"),
        ("--submit-rate", "submits a second, one budget over every API process"),
        ("--submit-burst", "submits at once above the rate (default: the rate)"),
        ("--cpu-seconds-per-day", "CPU its executions may use per UTC day before submits are 429"),
        (
            "--retention-days",
            "days its finished executions and their logs are kept (none: RUNYARD_RETENTION_DAYS)",
        ),
    ):
        limits.add_argument(option, type=_limit, default=_KEEP, metavar="N|none", help=meaning)
    limits.add_argument(
        "--weight",
        type=_limit,
        default=_KEEP,
        metavar="W",
        help="share of busy queues against other organizations: a whole number 1..1000 "
        "(default 1; it cannot be removed, so none is refused)",
    )
    limits.add_argument("--json", action="store_true", help="print JSON")
    limits.set_defaults(func=cmd_orgs_limits)

    tokens = commands.add_parser("tokens", help="API tokens")
    tokens_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    token = tokens_commands.add_parser("create", help="create a token and print it once")
    token.add_argument("org", help="organization name")
    token.add_argument(
        "--role", default="developer", choices=["admin", "developer", "operator", "viewer"]
    )
    token.add_argument("--name", default="cli")
    token.add_argument("--json", action="store_true", help="print JSON")
    token.set_defaults(func=cmd_tokens_create)
    listing = tokens_commands.add_parser("list", help="an organization's tokens (never the secret)")
    listing.add_argument("org", help="organization name")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens_commands.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=cmd_tokens_revoke)

    _add_audit_commands(commands)
    _add_secrets_commands(commands)

    api = commands.add_parser("api", help="serve the HTTP API (gunicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--access-log", action="store_true")
    api.set_defaults(func=cmd_api)

    up_parser = commands.add_parser("up", help="every process for one machine")
    up_parser.add_argument("--no-examples", action="store_true", help="skip the example agents")
    up_parser.set_defaults(func=cmd_up)
    return parser


def commands() -> dict[str, str]:
    """The admin commands and their help, for the `runyard` of runyard-client, which runs them
    through `main` (this module is its `runyard.commands` entry point, in setup.cfg)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def main(argv: list[str] | None = None) -> int:
    from app.errors import RunyardError
    from app.hardening import make_undumpable

    make_undumpable()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RunyardError, RuntimeError) as exc:
        print(f"runyard: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
