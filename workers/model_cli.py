"""`pacs-agent models|adapters|bench ...`: worker-side commands (they import torch).

`pacs_agent.cli` hands over the arguments after the command name; this module parses them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pacs_agent.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-agent")
    sub = p.add_subparsers(dest="group", required=True)
    models = sub.add_parser("models", help="model bundles").add_subparsers(
        dest="cmd", required=True
    )
    demo = models.add_parser("demo", help="write a DEMO bundle with seeded random weights")
    demo.add_argument("--out", type=Path, default=None, help="bundle folder (default: settings)")
    demo.add_argument("--seed", type=int, default=0)
    verify = models.add_parser("verify", help="check a bundle's files and checksums")
    verify.add_argument("bundle", type=Path)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from workers.models.bundle import BundleError, load_bundle, write_demo_bundle

    if args.group == "models" and args.cmd == "demo":
        out = args.out or Settings().resolved_bundle
        write_demo_bundle(out, seed=args.seed)
        print(f"DEMO bundle (seeded random weights, not for clinical use) written to {out}")
        return 0
    if args.group == "models" and args.cmd == "verify":
        try:
            bundle = load_bundle(args.bundle)
        except BundleError as exc:
            print(f"bundle invalid: {exc}", file=sys.stderr)
            return 1
        flag = " (DEMO: random weights)" if bundle.is_demo else ""
        print(f"bundle OK: {bundle.name} {bundle.version}{flag} sha256 {bundle.checksum}")
        return 0
    raise SystemExit(f"unknown command {args.group} {getattr(args, 'cmd', '')}")
