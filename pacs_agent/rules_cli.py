"""`pacs-agent rules export` and `pacs-agent rules import FILE`: routing rules as YAML.

The file is a YAML list of rules in order, each a mapping with ``name``, ``when``, ``action``,
``reason``, ``pipeline``, ``priority``, ``destinations``, ``completion``, ``notify``,
``continue``, ``enabled`` (see the README); a last entry named ``fallback`` (no ``when``) is the
fallback rule. Import replaces every rule, validated as a whole: if any entry is invalid, nothing
changes. Changes are audited with the actor ``cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import yaml

from pacs_agent.db.session import Database
from pacs_agent.scheduling import rules as engine
from pacs_agent.settings import Settings

ACTOR = "cli"


def export_yaml(settings: Settings) -> str:
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            return engine.dump_yaml(engine.export_entries(s))
    finally:
        db.dispose()


def import_yaml(settings: Settings, text: str) -> dict[str, int]:
    """Replace the rules with the YAML ``text``; raises RuleInvalid (nothing changed) or
    ValueError (not YAML)."""
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            catalog = engine.load_catalog(s, settings.default_pipeline)
            return engine.import_entries(s, entries, ACTOR, catalog)
    finally:
        db.dispose()


def cmd_rules(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.rules_cmd == "export":
        out.write(export_yaml(settings))
        return 0
    path = Path(args.file)
    try:
        text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"pacs-agent: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        counts = import_yaml(settings, text)
    except ValueError as exc:
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return 1
    except engine.RuleInvalid as exc:
        print("pacs-agent: rules not imported, nothing changed:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p.field}: {p.reason}", file=sys.stderr)
        return 1
    print(
        "rules imported: {created} created, {updated} updated, {deleted} deleted, "
        "{unchanged} unchanged".format(**counts),
        file=out,
    )
    return 0
