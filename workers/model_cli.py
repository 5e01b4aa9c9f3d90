"""`pacs-agent models ...` commands (worker side: they import torch)."""

from __future__ import annotations

import argparse
import sys

from pacs_agent.settings import Settings


def main(args: argparse.Namespace) -> int:
    from workers.models.bundle import BundleError, load_bundle, write_demo_bundle

    if args.models_cmd == "demo":
        out = args.out or Settings().resolved_bundle
        write_demo_bundle(out, seed=args.seed)
        print(f"DEMO bundle (seeded random weights, not for clinical use) written to {out}")
        return 0
    if args.models_cmd == "verify":
        try:
            bundle = load_bundle(args.bundle)
        except BundleError as exc:
            print(f"bundle invalid: {exc}", file=sys.stderr)
            return 1
        flag = " (DEMO: random weights)" if bundle.is_demo else ""
        print(f"bundle OK: {bundle.name} {bundle.version}{flag} sha256 {bundle.checksum}")
        return 0
    raise SystemExit(f"unknown models command {args.models_cmd}")
