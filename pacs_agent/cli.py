"""`pacs-agent`: the command-line entry point. Each command is a few lines over a module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from pacs_agent.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"configuration error:\n{exc}") from None


def cmd_run(_args: argparse.Namespace) -> int:
    from pacs_agent.service import run_all_in_one

    run_all_in_one(_settings())
    return 0


def cmd_serve(_args: argparse.Namespace) -> int:
    from pacs_agent.service import SchemaNotReady, serve

    try:
        serve(_settings())
    except SchemaNotReady as exc:
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.celery_app import run_worker  # imports torch: only on worker hosts

    settings = _settings()
    updates: dict[str, object] = {}
    if getattr(args, "lane", None):
        updates["worker_lane"] = args.lane
    if getattr(args, "pipelines", None):
        updates["worker_pipelines"] = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    return run_worker(settings.model_copy(update=updates) if updates else settings)


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from pacs_agent.db import migrate

    settings = _settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    print(f"database at revision {migrate.current_head()}")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from pacs_agent import users

    return users.run_command(
        _settings(),
        args.users_cmd,
        getattr(args, "name", None),
        role=getattr(args, "role", "viewer"),
        password_stdin=getattr(args, "password_stdin", False),
    )


def cmd_rules(args: argparse.Namespace) -> int:
    from pacs_agent import rules_cli

    return rules_cli.cmd_rules(args, _settings())


def cmd_models(args: argparse.Namespace) -> int:
    # Worker-side commands (they import torch) parse their own arguments.
    from workers import model_cli

    return model_cli.main([args.command, *args.rest])


def cmd_bench(args: argparse.Namespace) -> int:
    if args.rest[:1] == ["triage"]:
        from pacs_agent import bench_triage  # agent side: drives a real agent and worker

        return int(bench_triage.main(args.rest[1:]))
    if args.rest[:1] == ["chaos"]:
        from pacs_agent import bench_chaos  # agent side: kills and restarts a real deployment

        return int(bench_chaos.main(args.rest[1:]))
    if args.rest[:1] == ["retrieval"]:
        from pacs_agent import bench_retrieval  # agent side: the similar-case index, no torch

        return int(bench_retrieval.main(args.rest[1:]))
    if args.rest[:1] == ["ingest"]:
        import importlib

        bench_ingest = importlib.import_module("pacs_agent.bench_ingest")  # agent side: no torch
        return int(bench_ingest.main(args.rest[1:]))
    from workers import model_cli

    return model_cli.main(["bench", *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-agent", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="all-in-one: agent, embedded broker, worker").set_defaults(
        func=cmd_run
    )
    sub.add_parser("serve", help="agent only (DICOM listener, HTTP, completion)").set_defaults(
        func=cmd_serve
    )
    worker = sub.add_parser("worker", help="a Celery worker that runs the model pipelines")
    worker.add_argument(
        "--lane",
        choices=("all", "urgent"),
        default=None,
        help="all: every class; urgent: a reserved lane for stat and urgent jobs only "
        "(default: PACS_AGENT_WORKER_LANE)",
    )
    worker.add_argument(
        "--pipelines",
        default=None,
        help="comma list of pipelines to serve (default: PACS_AGENT_WORKER_PIPELINES, else all "
        "whose bundle is on this host)",
    )
    worker.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(func=cmd_db_upgrade)

    rules = sub.add_parser("rules", help="routing rules as YAML").add_subparsers(
        dest="rules_cmd", required=True
    )
    rules.add_parser("export", help="print all rules (and the fallback) as YAML").set_defaults(
        func=cmd_rules
    )
    imp = rules.add_parser("import", help="replace all rules from a YAML file, validated first")
    imp.add_argument("file", help="the YAML file ('-': standard input)")
    imp.set_defaults(func=cmd_rules)

    users = sub.add_parser("users", help="console users and API tokens").add_subparsers(
        dest="users_cmd", required=True
    )
    add = users.add_parser("add", help="create a user (password: --password-stdin or a prompt)")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd = users.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    token = users.add_parser("token", help="print a new API token (alone on the last line)")
    token.add_argument("name")
    users.add_parser("list", help="users, roles and active tokens")
    for sp in users.choices.values():
        sp.set_defaults(func=cmd_users)

    for name, text in (
        ("models", "model bundles: demo, verify, import, embed (worker side)"),
        ("adapters", "train and audit task adapters on frozen features (worker side)"),
    ):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=cmd_models)
    bench = sub.add_parser(
        "bench",
        help="benchmarks: ingest, encoder, pipeline, triage, chaos, retrieval",
        add_help=False,
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return p


PASS_THROUGH = {"models": cmd_models, "adapters": cmd_models, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace
    if argv and argv[0] in PASS_THROUGH:
        # These parse their own arguments (argparse's REMAINDER drops a leading --help).
        args = argparse.Namespace(
            command=argv[0], rest=argv[1:], verbose=False, func=PASS_THROUGH[argv[0]]
        )
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # pynetdicom logs every PDU exchange at INFO; the agent logs what matters per instance.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
