"""`pacs-agent`: the command-line entry point. Each command is a few lines over a module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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


def cmd_worker(_args: argparse.Namespace) -> int:
    from workers.celery_app import run_worker  # imports torch: only on worker hosts

    return run_worker(_settings())


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from pacs_agent.db import migrate

    settings = _settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    print(f"database at revision {migrate.current_head()}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from workers import model_cli

    return model_cli.main(args)


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
    sub.add_parser("worker", help="a Celery worker that runs the model pipeline").set_defaults(
        func=cmd_worker
    )

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(func=cmd_db_upgrade)

    models = sub.add_parser("models", help="model bundles").add_subparsers(
        dest="models_cmd", required=True
    )
    demo = models.add_parser("demo", help="write a DEMO bundle with seeded random weights")
    demo.add_argument("--out", type=Path, default=None, help="bundle folder (default: settings)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_models)
    verify = models.add_parser("verify", help="check a bundle's files and checksums")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
