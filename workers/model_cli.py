"""`pacs-agent models|adapters|bench ...`: worker-side commands (they import torch).

`pacs_agent.cli` hands over the arguments after the command name; this module parses them.

    models demo [--out DIR] [--seed N]
    models verify BUNDLE
    models import SRC --out BUNDLE [--layout auto|hf|dinov2] [--heads N] [--classifier FILE
                  --labels ...] [--segmenter FILE --classes ...] [--view-head FILE]
                  [--body-part-head FILE] [--anatomy chest --views PA AP] [--link|--symlink]
    models embed BUNDLE FILE.dcm... --out FILE.npz
    adapters train --bundle B --data DIR --labels labels.csv [--masks DIR] --out B2
    adapters train-report --bundle B --data DIR --texts texts.csv --out B2 [--epochs N]
    adapters audit --bundle B --data DIR --labels labels.csv [--masks DIR] [--json FILE]
    bench encoder [--full] [--device cpu|cuda] [--models S B L] [--sizes ...] [--batch ...]
                  [--compare-transformers] [--compile MODE] [--rounds N]
    bench pipeline [--n N] [--bundle B] [--device ...] [--workers N] [--compare]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pacs_agent.settings import Settings

log = logging.getLogger(__name__)


def _names(values: list[str] | None) -> list[str] | None:
    """`--labels a b` or `--labels a,b` -> ["a", "b"]."""
    if values is None:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _floats(values: list[str] | None) -> list[float] | None:
    names = _names(values)
    return [float(v) for v in names] if names is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-agent")
    sub = p.add_subparsers(dest="group", required=True)

    # models ---------------------------------------------------------------------------------
    models = sub.add_parser("models", help="model bundles").add_subparsers(
        dest="cmd", required=True
    )
    demo = models.add_parser("demo", help="write a DEMO bundle with seeded random weights")
    demo.add_argument("--out", type=Path, default=None, help="bundle folder (default: settings)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--kind", choices=("chest", "multi-anatomy"), default="chest")
    verify = models.add_parser("verify", help="check a bundle's files and checksums")
    verify.add_argument("bundle", type=Path)

    imp = models.add_parser(
        "import",
        help="build a bundle from a checkpoint folder "
        "(transformers Dinov2 or original DINOv2 layout)",
    )
    imp.add_argument("src", type=Path, help="checkpoint folder (or an original-layout file)")
    imp.add_argument("--out", type=Path, required=True, help="new bundle folder")
    imp.add_argument("--layout", choices=("auto", "hf", "dinov2"), default="auto")
    imp.add_argument("--weights", default=None, help="original-layout weights file name")
    imp.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads (original layout; default: config.json or dim/64)",
    )
    imp.add_argument("--name", default=None)
    imp.add_argument("--version", default=None)
    imp.add_argument("--size", type=int, default=None, help="input size (with --mean/--std)")
    imp.add_argument("--mean", nargs="+", default=None)
    imp.add_argument("--std", nargs="+", default=None)
    imp.add_argument("--classifier", type=Path, default=None, help="classifier safetensors")
    imp.add_argument("--labels", nargs="+", default=None, help="classifier label names")
    imp.add_argument("--thresholds", nargs="+", default=None)
    imp.add_argument("--segmenter", type=Path, default=None, help="segmenter safetensors")
    imp.add_argument("--classes", nargs="+", default=None, help="segmentation class names")
    imp.add_argument("--view-head", type=Path, default=None, help="QC view-position head")
    imp.add_argument("--view-labels", nargs="+", default=None)
    imp.add_argument("--body-part-head", type=Path, default=None, help="QC body-part head")
    imp.add_argument("--body-part-labels", nargs="+", default=None)
    imp.add_argument("--anatomy", default=None, help="intended anatomy, e.g. chest")
    imp.add_argument("--views", nargs="+", default=None, help="intended views, e.g. PA AP")
    imp.add_argument(
        "--random-weights",
        action="store_true",
        help="mark the bundle as random weights (test checkpoints)",
    )
    mode = imp.add_mutually_exclusive_group()
    mode.add_argument(
        "--link",
        dest="mode",
        action="store_const",
        const="link",
        help="hard-link the encoder files (copy across file systems)",
    )
    mode.add_argument("--symlink", dest="mode", action="store_const", const="symlink")
    imp.set_defaults(mode="copy")

    emb = models.add_parser("embed", help="frozen encoder features of DICOM files to .npz")
    emb.add_argument("bundle", type=Path)
    emb.add_argument("files", type=Path, nargs="+")
    emb.add_argument("--out", type=Path, required=True)
    emb.add_argument("--device", default="cpu")
    emb.add_argument("--dtype", default="float32")
    emb.add_argument("--batch", type=int, default=8)

    # adapters -------------------------------------------------------------------------------
    adapters = sub.add_parser("adapters", help="train and audit adapters").add_subparsers(
        dest="cmd", required=True
    )
    for name in ("train", "audit"):
        a = adapters.add_parser(name)
        a.add_argument("--bundle", type=Path, required=True)
        a.add_argument("--data", type=Path, required=True, help="folder of DICOM files")
        a.add_argument("--labels", type=Path, required=True, help="CSV: key column + 0/1 labels")
        a.add_argument("--masks", type=Path, default=None, help="folder of masks (.npy/.npz/.png)")
        a.add_argument("--classes", nargs="+", default=None, help="segmentation class names")
        a.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--cache", type=Path, default=None, help="feature cache folder")
        a.add_argument("--json", type=Path, default=None, help="write the report as JSON")
        a.add_argument("--device", default="cpu")
        a.add_argument("--dtype", default="float32")
        if name == "train":
            a.add_argument("--out", type=Path, required=True, help="new bundle folder")
            a.add_argument("--test-fraction", type=float, default=0.3)
            a.add_argument("--weight-decay", type=float, default=1e-3)
            a.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
            a.add_argument("--max-iter", type=int, default=300)
            a.add_argument("--label-columns", nargs="+", default=None)
            a.add_argument("--name", default=None)
            a.add_argument("--version", default=None)
        else:
            a.add_argument(
                "--min-group", type=int, default=5, help="smallest subgroup that can be flagged"
            )

    rep = adapters.add_parser(
        "train-report",
        help="train a report-generation adapter (patch tokens -> small causal LM)",
    )
    rep.add_argument("--bundle", type=Path, required=True)
    rep.add_argument("--data", type=Path, required=True, help="folder of DICOM files")
    rep.add_argument(
        "--texts", type=Path, required=True, help="CSV: key column + text (+ optional split)"
    )
    rep.add_argument("--out", type=Path, required=True, help="new bundle folder")
    rep.add_argument("--epochs", type=int, default=40)
    rep.add_argument("--batch-size", type=int, default=32)
    rep.add_argument("--lr", type=float, default=3e-3)
    rep.add_argument("--layers", type=int, default=2, help="LM layers")
    rep.add_argument("--width", type=int, default=128, help="LM embedding width")
    rep.add_argument("--prefix-grid", type=int, default=8, help="prefix tokens per side")
    rep.add_argument("--max-tokens", type=int, default=24, help="longest generated text")
    rep.add_argument("--test-fraction", type=float, default=0.25)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--cache", type=Path, default=None, help="feature cache folder")
    rep.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--dtype", default="float32")
    rep.add_argument("--name", default=None)
    rep.add_argument("--version", default=None)
    rep.add_argument(
        "--trained-on", default="user data", help="what the texts are, kept in the manifest"
    )

    # bench ----------------------------------------------------------------------------------
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    enc = bench.add_parser("encoder", help="encoder images/s and TFLOP/s (random weights)")
    enc.add_argument(
        "--full", action="store_true", help="ViT-S/B/L x 224/518 x batch 1..64 (slow on a CPU)"
    )
    enc.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    enc.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 autocast on CUDA, float32 on a CPU",
    )
    enc.add_argument(
        "--compile",
        default="off",
        choices=("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode for our encoder (as PACS_AGENT_TORCH_COMPILE)",
    )
    enc.add_argument("--no-tf32", action="store_true", help="CUDA: keep float32 matmuls exact")
    enc.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time transformers' Dinov2Model (SDPA) with the same weights and input",
    )
    enc.add_argument("--rounds", type=int, default=5, help="timed calls per point (median)")
    enc.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    enc.add_argument("--models", nargs="+", default=None, help="S B L")
    enc.add_argument("--sizes", nargs="+", type=int, default=None)
    enc.add_argument("--batch", nargs="+", type=int, default=None)
    enc.add_argument("--min-time", type=float, default=1.0, help="seconds timed per point")
    enc.add_argument(
        "--max-call",
        type=float,
        default=30.0,
        help="skip a batch whose single call would exceed this many seconds",
    )
    enc.add_argument("--json", type=Path, default=None)
    pipe = bench.add_parser("pipeline", help="end-to-end images/s from compressed DICOM")
    pipe.add_argument("--n", type=int, default=8, help="images (copies of the source)")
    pipe.add_argument("--bundle", type=Path, default=None, help="default: a DEMO bundle")
    pipe.add_argument("--device", default="cpu")
    pipe.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    pipe.add_argument("--batch", type=int, default=4, help="model batch size")
    pipe.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: CPU count - 1)"
    )
    pipe.add_argument("--per-job", type=int, default=2, help="images per job")
    pipe.add_argument(
        "--rounds", type=int, default=1, help="alternate the paths; report the fastest of each"
    )
    pipe.add_argument(
        "--compare", action="store_true", help="also time the old serial path, print the speedup"
    )
    pipe.add_argument("--source", default="RG1_J2KR.dcm", help="pydicom-data test file")
    pipe.add_argument(
        "--decode-resolution",
        choices=("reduced", "full"),
        default="reduced",
        help="the production path's JPEG 2000 decoding (PACS_AGENT_DECODE_RESOLUTION; default "
        "reduced); the old path always decodes every pixel",
    )
    pipe.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    handler = {
        ("models", "demo"): _models_demo,
        ("models", "verify"): _models_verify,
        ("models", "import"): _models_import,
        ("models", "embed"): _models_embed,
        ("adapters", "train"): _adapters_train,
        ("adapters", "audit"): _adapters_audit,
        ("adapters", "train-report"): _adapters_train_report,
        ("bench", "encoder"): _bench_encoder,
        ("bench", "pipeline"): _bench_pipeline,
    }.get((args.group, args.cmd))
    if handler is None:
        raise SystemExit(f"unknown command {args.group} {getattr(args, 'cmd', '')}")
    return handler(args)


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 1


# models -------------------------------------------------------------------------------------


def _models_demo(args: argparse.Namespace) -> int:
    from workers.models.bundle import write_demo_bundle

    out = args.out or Settings().resolved_bundle
    write_demo_bundle(out, seed=args.seed, kind=args.kind)
    print(f"DEMO bundle (seeded random weights, not for clinical use) written to {out}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    from workers.models.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        return _fail(f"bundle invalid: {exc}")
    flag = " (DEMO: random weights)" if bundle.is_demo else ""
    print(f"bundle OK: {bundle.name} {bundle.version}{flag} sha256 {bundle.checksum}")
    return 0


def _models_import(args: argparse.Namespace) -> int:
    from workers.imaging import Preprocessing
    from workers.models.bundle import BundleError, load_bundle
    from workers.models.importer import AdapterSource, ImportOptions, import_bundle
    from workers.models.qc import QC_LABELS

    try:
        pre = None
        if args.size is not None or args.mean is not None or args.std is not None:
            if args.size is None or args.mean is None or args.std is None:
                return _fail("--size, --mean and --std go together")
            pre = Preprocessing.from_dict(
                {"size": args.size, "mean": _floats(args.mean), "std": _floats(args.std)}
            )
        opt = ImportOptions(
            layout=args.layout,
            weights=args.weights,
            num_heads=args.heads,
            name=args.name,
            version=args.version,
            preprocessing=pre,
            mode=args.mode,
            random_weights=args.random_weights,
        )
        if args.classifier is not None:
            labels = _names(args.labels)
            if not labels:
                return _fail("--classifier needs --labels")
            opt.classifier = AdapterSource(args.classifier, labels, _floats(args.thresholds))
        if args.segmenter is not None:
            classes = _names(args.classes)
            if not classes:
                return _fail("--segmenter needs --classes")
            opt.segmenter = AdapterSource(args.segmenter, classes)
        if args.view_head is not None:
            opt.qc["view"] = AdapterSource(
                args.view_head, _names(args.view_labels) or QC_LABELS["view"]
            )
        if args.body_part_head is not None:
            opt.qc["body_part"] = AdapterSource(
                args.body_part_head, _names(args.body_part_labels) or QC_LABELS["body_part"]
            )
        intended: dict[str, Any] = {}
        if args.anatomy:
            intended["anatomy"] = args.anatomy
        if args.views:
            intended["views"] = _names(args.views)
        opt.intended = intended or None
        out = import_bundle(args.src, args.out, opt)
        bundle = load_bundle(out)
    except (BundleError, ValueError) as exc:
        return _fail(f"import failed: {exc}")
    for w in opt.warnings:
        print(f"warning: {w}")
    cfg = bundle.encoder_config
    print(
        f"bundle written to {out}: {bundle.name} {bundle.version}, encoder "
        f"{bundle.encoder_format} (dim {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, {cfg.num_register_tokens} registers, patch "
        f"{cfg.patch_size}), input {bundle.preprocessing.size} px, adapters "
        f"{sorted(bundle.manifest.get('adapters', {}))}, sha256 {bundle.checksum}"
    )
    return 0


def _models_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from pydicom import dcmread

    from workers.imaging import ImageError, decode
    from workers.models.bundle import BundleError, load_bundle
    from workers.models.runner import ModelRunner

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        return _fail(f"bundle invalid: {exc}")
    images: list[tuple[str, Any]] = []
    files: list[str] = []
    skipped: list[str] = []
    for f in args.files:
        try:
            ds = dcmread(f)
            images.append((str(ds.SOPInstanceUID), decode(ds)))
            files.append(str(f))
        except (ImageError, OSError, ValueError, AttributeError) as exc:
            skipped.append(f"{f}: {exc}")
            print(f"skipped {f}: {exc}", file=sys.stderr)
    if not images:
        return _fail("no image could be embedded")
    runner = ModelRunner(bundle, device=args.device, dtype=args.dtype, batch_size=args.batch)
    embs = list(runner.embed(images))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        cls=np.stack([e.cls_token for e in embs]).astype(np.float32),
        patch_tokens=np.stack([e.patch_tokens for e in embs]).astype(np.float32),
        grid=np.array(embs[0].grid),
        sop_uids=np.array([e.sop for e in embs]),
        files=np.array(files),
        input_size=np.array(bundle.preprocessing.size),
        bundle=np.array(f"{bundle.name} {bundle.version}"),
        bundle_sha256=np.array(bundle.checksum),
    )
    h, w = embs[0].grid
    print(
        f"embedded {len(embs)} images with {bundle.name} {bundle.version}: CLS "
        f"[{len(embs)}, {bundle.encoder_config.hidden_size}], patch tokens "
        f"[{len(embs)}, {h * w}, {bundle.encoder_config.hidden_size}] (grid {h} x {w}) "
        f"-> {args.out}" + (f"; {len(skipped)} skipped" if skipped else "")
    )
    return 0


# adapters -----------------------------------------------------------------------------------


def _adapters_train(args: argparse.Namespace) -> int:
    from workers.models.bundle import BundleError
    from workers.training.data import DataError
    from workers.training.features import default_cache_dir
    from workers.training.train import TrainOptions, train_adapters

    opt = TrainOptions(
        test_fraction=args.test_fraction,
        seed=args.seed,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        max_iter=args.max_iter,
        n_boot=args.bootstrap,
        classes=_names(args.classes),
        label_columns=_names(args.label_columns),
        cache_dir=args.cache or default_cache_dir(),
        device=args.device,
        dtype=args.dtype,
        name=args.name,
        version=args.version,
    )
    try:
        report = train_adapters(args.bundle, args.data, args.labels, args.out, args.masks, opt)
    except (BundleError, DataError) as exc:
        return _fail(f"training failed: {exc}")
    print(report.table())
    print(f"features: {report.cache_hits} of {report.n_train + report.n_test} from the cache")
    print(f"new bundle: {args.out}")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _adapters_train_report(args: argparse.Namespace) -> int:
    from workers.models.bundle import BundleError
    from workers.training.data import DataError
    from workers.training.features import default_cache_dir
    from workers.training.report import ReportTrainOptions, train_report_adapter

    opt = ReportTrainOptions(
        test_fraction=args.test_fraction,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_layer=args.layers,
        n_embd=args.width,
        prefix_grid=args.prefix_grid,
        max_new_tokens=args.max_tokens,
        cache_dir=args.cache or default_cache_dir(),
        device=args.device,
        dtype=args.dtype,
        name=args.name,
        version=args.version,
        trained_on=args.trained_on,
    )
    try:
        report = train_report_adapter(args.bundle, args.data, args.texts, args.out, opt)
    except (BundleError, DataError) as exc:
        return _fail(f"training failed: {exc}")
    print(report.table())
    print(f"features: {report.cache_hits} of {report.n_train + report.n_test} from the cache")
    print(f"new bundle: {args.out}")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _adapters_audit(args: argparse.Namespace) -> int:
    from workers.models.bundle import BundleError
    from workers.training.audit import audit_bundle
    from workers.training.data import DataError
    from workers.training.features import default_cache_dir

    try:
        report = audit_bundle(
            args.bundle,
            args.data,
            args.labels,
            args.masks,
            n_boot=args.bootstrap,
            seed=args.seed,
            min_group=args.min_group,
            cache_dir=args.cache or default_cache_dir(),
            device=args.device,
            dtype=args.dtype,
            classes=_names(args.classes),
        )
    except (BundleError, DataError) as exc:
        return _fail(f"audit failed: {exc}")
    print(report.table())
    flagged = report.flagged
    print(f"{len(flagged)} subgroup(s) flagged (95% CI excludes the overall figure)")
    json_path = args.json or Path("audit.json")
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"report written to {json_path}")
    return 0


# bench --------------------------------------------------------------------------------------


def _bench_encoder(args: argparse.Namespace) -> int:
    from workers.bench import DEFAULT_PLAN, FULL_BATCHES, FULL_MODELS, FULL_SIZES, bench_encoder
    from workers.bench import write_json as bench_json

    if args.full or args.models or args.sizes or args.batch:
        models = args.models or (FULL_MODELS if args.full else ["S", "B"])
        sizes = args.sizes or (FULL_SIZES if args.full else [224])
        batches = tuple(args.batch or (FULL_BATCHES if args.full else (1, 4)))
        plan = [(m, s, batches) for m in models for s in sizes]
    else:
        plan = list(DEFAULT_PLAN)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.compare_transformers and not (args.full or args.models or args.sizes or args.batch):
        plan = [("B", 518, (1,))]  # RAD-DINO's setting: the goal's comparison point
    results = bench_encoder(
        plan,
        device=args.device,
        dtype=args.dtype,
        min_time=args.min_time,
        max_call_s=args.max_call,
        rounds=args.rounds,
        compile=args.compile,
        tf32=not args.no_tf32,
        compare_transformers=args.compare_transformers,
    )
    bench_json(str(args.json) if args.json else None, [r.to_dict() for r in results])
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from workers.bench import bench_pipeline
    from workers.bench import write_json as bench_json

    result = bench_pipeline(
        args.n,
        bundle_path=str(args.bundle) if args.bundle else None,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch,
        workers=args.workers,
        per_job=args.per_job,
        compare=args.compare,
        rounds=args.rounds,
        source=args.source,
        reduced=args.decode_resolution == "reduced",
    )
    bench_json(str(args.json) if args.json else None, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
