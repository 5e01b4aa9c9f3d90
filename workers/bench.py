"""`pacs-agent bench encoder` and `pacs-agent bench pipeline`: throughput on this machine.

Encoder: DINOv2 ViT-S/B/L (patch 14) with RANDOM weights (timing only; weights do not change the
arithmetic), the path the worker runs (`DinoViT.fused_for_inference`, optionally torch.compile),
images/s per (model, input size, batch) from the median of several calls after a warm-up,
analytic FLOPs per image from the configuration (`ViTConfig.flops_per_image`: patch embedding +
per layer 24*N*D^2 + 4*N^2*D for a plain MLP, multiply-add = 2 FLOPs) and the achieved TFLOP/s.
`--compare-transformers` times transformers' `Dinov2Model` (SDPA) with the same weights on the
same input, interleaved call by call, and ends with
`encoder: ours X img/s, transformers Y img/s, ratio Z`.

Pipeline: end-to-end from compressed DICOM (NEMA RG1, a 1955 x 1841 15-bit CR chest in JPEG 2000
lossless, from pydicom-data) through read -> decode -> preprocess (letterbox) -> encoder +
adapters -> maps to source geometry -> DICOM writers (SR, SEG, heatmap SC) on the production
path (`workers.overlap`: decode pool, model, writer thread, overlapped), with each stage's share;
`--compare` also times the old serial path and prints the speedup.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.models.vit import DinoViT, ViTConfig

log = logging.getLogger(__name__)

__all__ = ["bench_encoder", "bench_pipeline", "machine_description"]

MODEL_FACTORIES: dict[str, Callable[..., ViTConfig]] = {
    "S": ViTConfig.vit_small,
    "B": ViTConfig.vit_base,
    "L": ViTConfig.vit_large,
}
# The default run: under a minute on a 2-core CPU.
DEFAULT_PLAN: list[tuple[str, int, tuple[int, ...]]] = [
    ("S", 224, (1, 4)),
    ("B", 224, (1, 4)),
    ("B", 518, (1,)),
]
FULL_MODELS = ("S", "B", "L")
FULL_SIZES = (224, 518)
FULL_BATCHES = (1, 2, 4, 8, 16, 32, 64)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = (
        f"{cpu_model()}, {cores} CPU cores available, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    if hasattr(os, "getloadavg"):
        desc += f", load average {os.getloadavg()[0]:.1f} at start"
    return desc


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return device


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class EncoderResult:
    model: str
    size: int
    batch: int
    dtype: str
    tokens: int
    gflop_per_image: float
    images_per_s: float | None
    tflops: float | None
    iterations: int
    skipped: str | None = None
    compile: str = "off"
    # --compare-transformers: transformers' Dinov2Model on the same input, same weights
    transformers_images_per_s: float | None = None
    ratio: float | None = None
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _time_interleaved(
    calls: dict[str, Callable[[], object]],
    device: str,
    *,
    rounds: int,
    min_time: float,
) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each (allocations, kernel selection,
    a compile), then rounds in which every function runs once in turn, so that load from other
    work on a shared machine falls on all of them alike. At least `rounds` rounds and
    `min_time` seconds per function."""
    for fn in calls.values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in calls}
    while True:
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        n = len(next(iter(times.values())))
        if n >= rounds and (min(sum(v) for v in times.values()) >= min_time or n >= 1000):
            return times


def build_encoder_pair(
    cfg: ViTConfig, *, device: str = "cpu", with_transformers: bool = False, seed: int = 0
) -> tuple[DinoViT, DinoViT, torch.nn.Module | None]:
    """(reference DinoViT, its `fused_for_inference` copy, transformers' Dinov2Model or None), all
    on `device` in eval mode with the SAME random weights: with `with_transformers`, the
    transformers model is built from `config_to_hf(cfg)` (SDPA attention) and its state dict
    loaded into ours through `hf_loader.map_hf_state_dict` (strict)."""
    from workers.models.vit import init_weights

    ref = DinoViT(cfg).eval()
    hf: torch.nn.Module | None = None
    if with_transformers:
        from transformers import Dinov2Config, Dinov2Model

        from workers.models.hf_loader import config_to_hf, map_hf_state_dict

        torch.manual_seed(seed)
        hf_cfg = Dinov2Config(**config_to_hf(cfg), attn_implementation="sdpa")  # type: ignore[call-arg]
        hf = Dinov2Model(hf_cfg).eval()
        ref.load_state_dict(map_hf_state_dict(hf.state_dict(), cfg), strict=True)
        hf = hf.to(device)
    else:
        init_weights(ref, torch.Generator().manual_seed(seed))
    ref = ref.to(device)
    return ref, ref.fused_for_inference(), hf


def bench_encoder(
    plan: Sequence[tuple[str, int, Sequence[int]]] = DEFAULT_PLAN,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    min_time: float = 1.0,
    max_call_s: float = 30.0,
    rounds: int = 5,
    compile: str = "off",
    tf32: bool = True,
    compare_transformers: bool = False,
    print_fn: Callable[[str], None] = print,
) -> list[EncoderResult]:
    """Time the worker's encoder (`DinoViT.fused_for_inference`, scaled-dot-product attention,
    `torch.compile` when `compile` is a mode) for each (model, size, batches) of `plan`: images/s
    from the median of at least `rounds` timed calls after a warm-up. A batch whose estimated
    single call exceeds `max_call_s` (from the previous batch's throughput) is skipped and says
    so. With `compare_transformers`, transformers' `Dinov2Model` (SDPA) with the same weights
    runs on the same input in the same dtype, interleaved call by call with ours, and the run
    ends with `encoder: ours X img/s, transformers Y img/s, ratio Z` (the last point of the
    plan)."""
    from workers.models.runner import apply_runtime, compile_encoder, resolve_runtime

    device = _resolve_device(device)
    opts = resolve_runtime(device, dtype, tf32=tf32, compile=compile)
    apply_runtime(opts)
    dtype = opts.dtype
    print_fn(f"encoder benchmark on {device} ({machine_description(device)}), dtype {dtype}")
    print_fn(
        f"path: fused QKV + LayerScale folded, SDPA, inference_mode; torch.compile: {compile}"
        + (" (inductor, freezing)" if compile != "off" else "")
        + (f"; TF32 {'on' if opts.tf32 else 'off'}" if device.startswith("cuda") else "")
    )
    print_fn(
        "RANDOM weights (timing only). FLOPs analytic: patch embed + per layer "
        f"24*N*D^2 + 4*N^2*D (multiply-add = 2). img/s: median of >= {rounds} calls after a "
        "warm-up" + (", interleaved with transformers' Dinov2Model" if compare_transformers else "")
    )
    header = (
        f"{'model':<10} {'size':>5} {'batch':>5} {'tokens':>6} {'GFLOP/img':>10} "
        f"{'img/s':>9} {'ms/img':>9} {'TFLOP/s':>8}"
    )
    if compare_transformers:
        header += f" {'HF img/s':>9} {'ratio':>6} {'max|diff|':>9}"
    print_fn(header)
    results: list[EncoderResult] = []
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[dtype])
        if dtype != "float32"
        else None
    )

    def runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                if autocast is not None:
                    with autocast:
                        return model(x)
                return model(x)

        return call

    last: tuple[float, float, float] | None = None
    for name, size, batches in plan:
        if name not in MODEL_FACTORIES:
            raise ValueError(f"model must be one of {sorted(MODEL_FACTORIES)}, got {name!r}")
        cfg = MODEL_FACTORIES[name](image_size=size)
        _ref, fused, hf = build_encoder_pair(
            cfg, device=device, with_transformers=compare_transformers
        )
        del _ref
        model = compile_encoder(fused, compile)
        gflop = cfg.flops_per_image() / 1e9
        per_image_s: float | None = None
        for batch in batches:
            label = f"ViT-{name}/14"
            if per_image_s is not None and per_image_s * batch > max_call_s:
                r = EncoderResult(
                    label,
                    size,
                    batch,
                    dtype,
                    cfg.tokens(size, size),
                    gflop,
                    None,
                    None,
                    0,
                    skipped=f"one call ~{per_image_s * batch:.0f} s",
                )
                results.append(r)
                print_fn(
                    f"{label:<10} {size:>5} {batch:>5} {r.tokens:>6} {gflop:>10.1f} "
                    f"{'skipped':>9} ({r.skipped})"
                )
                continue
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
            x = x.to(device)
            calls = {"ours": runner(model, x)}
            diff: float | None = None
            if hf is not None:
                calls["transformers"] = runner(hf, x)
                ours_out = calls["ours"]()
                hf_out = calls["transformers"]()
                diff = float(
                    (ours_out.patch_tokens.float() - hf_out.last_hidden_state[:, 1:].float())  # type: ignore[attr-defined]
                    .abs()
                    .max()
                )
            times = _time_interleaved(calls, device, rounds=rounds, min_time=min_time)
            iters = len(times["ours"])
            ips = batch / _median(times["ours"])
            per_image_s = 1.0 / ips
            r = EncoderResult(
                label,
                size,
                batch,
                dtype,
                cfg.tokens(size, size),
                gflop,
                ips,
                ips * gflop / 1e3,
                iters,
                compile=compile,
            )
            row = (
                f"{label:<10} {size:>5} {batch:>5} {r.tokens:>6} {gflop:>10.1f} "
                f"{ips:>9.2f} {1e3 / ips:>9.1f} {r.tflops:>8.3f}"
            )
            if hf is not None:
                hf_ips = batch / _median(times["transformers"])
                r.transformers_images_per_s = hf_ips
                r.ratio = ips / hf_ips
                r.max_abs_diff = diff
                row += f" {hf_ips:>9.2f} {r.ratio:>6.2f} {diff:>9.1e}"
                last = (ips, hf_ips, r.ratio)
            results.append(r)
            print_fn(row)
        del model, fused, hf
    if compare_transformers:
        if last is None:
            print_fn("encoder: no point was timed (all skipped)")
        else:
            print_fn(
                f"encoder: ours {last[0]:.2f} img/s, transformers {last[1]:.2f} img/s, "
                f"ratio {last[2]:.2f}"
            )
    return results


# --------------------------------------------------------------------------------------------
# pipeline


def _rg1_blobs(n: int, source: str) -> list[bytes]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    path = get_testdata_file(source)
    if path is None:
        raise SystemExit(f"{source} not found: is pydicom-data installed?")
    ds = dcmread(str(path))
    blobs = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[source, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    return blobs


def bench_pipeline(
    n: int = 8,
    *,
    bundle_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
    workers: int | None = None,
    per_job: int = 2,
    compare: bool = False,
    rounds: int = 1,
    source: str = "RG1_J2KR.dcm",
    reduced: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """End-to-end images/s of the production path (`workers.overlap.run_overlapped`, as
    `workers.pipeline` runs it: decode + letterbox in a `DecodePool` of ``workers`` processes,
    the model on batches of ``batch_size`` in this thread, each job's DICOM outputs built in the
    writer thread), jobs of ``per_job`` images, and each stage's share of the time. With
    ``compare``, the same run also times the old path (each image read and decoded serially in
    this process, the model at batch 8 over all images, then the writers one job after the
    other) and ends with ``pipeline: X img/s, old path Y img/s, speedup Z``. ``rounds`` > 1
    alternates the paths that many times and reports the fastest run of each. ``reduced``:
    the production path decodes JPEG 2000 at the resolution the model needs
    (`PACS_AGENT_DECODE_RESOLUTION=reduced`, the default; the old path decodes every pixel)."""
    from pydicom import dcmread

    from workers.decode_pool import DecodePool
    from workers.dicom_out.outputs import build_outputs
    from workers.imaging import decode
    from workers.models.bundle import load_bundle, write_demo_bundle
    from workers.models.runner import ModelRunner
    from workers.overlap import Group, run_overlapped
    from workers.results import AlgorithmInfo

    device = _resolve_device(device)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = max(1, (cpus or 1) - 1)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module INFO lines
    logging.getLogger("workers.dicom_out").setLevel(logging.WARNING)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if bundle_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="pacs-agent-bench-")
        bundle_path = str(write_demo_bundle(Path(tmp.name) / "demo"))
    try:
        bundle = load_bundle(bundle_path)
        runner = ModelRunner(bundle, device=device, dtype=dtype, batch_size=batch_size, cam=False)
        algorithm = AlgorithmInfo(
            name=bundle.name,
            version=bundle.version,
            checksum=bundle.checksum,
            is_demo=bundle.is_demo,
        )
        blobs = _rg1_blobs(n, source)
        jobs = [list(range(i, min(n, i + per_job))) for i in range(0, n, per_job)]
        print_fn(
            f"pipeline benchmark: {n} x {source} in {len(jobs)} jobs on {device} "
            f"({machine_description(device)}), dtype {dtype}, batch {batch_size}"
        )
        print_fn(
            f"bundle: {bundle.name} {bundle.version} "
            f"({'RANDOM weights' if bundle.is_demo else 'trained weights'}), encoder "
            f"width {bundle.encoder_config.hidden_size}, "
            f"{bundle.encoder_config.num_hidden_layers} layers, input "
            f"{bundle.preprocessing.size} px"
        )
        # warm-up: one image through the model (allocations, lazy imports)
        runner.run([("warmup", decode(dcmread(BytesIO(blobs[0]))))])

        # the production path: overlapped -------------------------------------------------
        headers: dict[str, Any] = {}
        outputs_new = 0

        def sources(job: list[int]) -> list[tuple[str, bytes]]:
            out = []
            for i in job:
                ds = dcmread(BytesIO(blobs[i]))  # the header, as the worker reads it
                headers[str(ds.SOPInstanceUID)] = ds
                out.append((str(ds.SOPInstanceUID), blobs[i]))
            return out

        def write(group: Group[list[int]]) -> None:
            nonlocal outputs_new
            done = [d for d in group.decoded if d.sop in group.results]
            outputs_new += len(
                build_outputs(
                    [headers[d.sop] for d in done],
                    [group.results[d.sop] for d in done],
                    algorithm,
                    1,
                )
            )

        old_runner = ModelRunner(bundle, device=device, dtype=dtype, batch_size=8, cam=False)

        def run_new(pool: DecodePool) -> tuple[Any, dict[str, float], int]:
            nonlocal outputs_new
            outputs_new = 0
            runner.timings = dict.fromkeys(runner.timings, 0.0)
            stats = run_overlapped(
                jobs,
                sources,
                pool,
                lambda images: list(runner.run_prepared(images)),
                write,
                batch_size=batch_size,
            )
            if stats.images != n:
                raise SystemExit(f"only {stats.images} of {n} images went through the model")
            return stats, dict(runner.timings), outputs_new

        def run_old() -> tuple[float, tuple[float, float, float], int]:
            """The old path: serial decode, one model pass at batch 8, writers job by job."""
            t_all = time.perf_counter()
            old_sources, images = [], []
            for blob in blobs:
                ds = dcmread(BytesIO(blob))
                images.append((str(ds.SOPInstanceUID), decode(ds)))
                old_sources.append(ds)
            t_decoded = time.perf_counter()
            results = old_runner.run(images)
            t_model = time.perf_counter()
            made = 0
            for job in jobs:
                made += len(
                    build_outputs(
                        [old_sources[i] for i in job], [results[i] for i in job], algorithm, 1
                    )
                )
            wall = time.perf_counter() - t_all
            return wall, (t_decoded - t_all, t_model - t_decoded, t_all + wall - t_model), made

        # Rounds alternate the two paths; the fastest of each is reported (timeit's rule: on a
        # shared machine other load only ever adds time).
        best_new: tuple[Any, dict[str, float], int] | None = None
        best_old: tuple[float, tuple[float, float, float], int] | None = None
        with DecodePool(bundle.preprocessing.size, workers=workers, reduced=reduced) as pool:
            list(pool.imap([("warmup", blobs[0])] * workers))  # the worker's pool is long-lived
            for _ in range(max(1, rounds)):
                got = run_new(pool)
                if best_new is None or got[0].wall_s < best_new[0].wall_s:
                    best_new = got
                if compare:
                    old = run_old()
                    if best_old is None or old[0] < best_old[0]:
                        best_old = old
        assert best_new is not None
        stats, timings, outputs_new = best_new
        new_ips = n / stats.wall_s
        stage_s = {
            "read": stats.read_s,
            "decode": stats.decode_s,
            "preprocess": stats.preprocess_s,
            "encoder+adapters": timings["model"],
            "maps to source": timings["maps"],
            "DICOM writers": stats.write_s,
        }
        per_image = {k: v / n for k, v in stage_s.items()}
        bound = max(per_image, key=lambda k: per_image[k])
        print_fn(
            f"overlapped ({workers} decode processes, "
            f"{'reduced-resolution' if reduced else 'full'} JPEG 2000 decoding, "
            f"model batch {batch_size}, writer "
            f"thread): {new_ips:.3f} images/s ({stats.wall_s:.2f} s for {n}), "
            f"{outputs_new} output objects"
            + (f", fastest of {rounds} rounds" if rounds > 1 else "")
        )
        print_fn(f"{'stage':<18} {'s/image':>8} {'share':>6}   (stage time summed over processes)")
        total = sum(per_image.values()) or 1.0
        for k, v in per_image.items():
            print_fn(f"{k:<18} {v:>8.3f} {v / total:>6.0%}{'  <- bound' if k == bound else ''}")
        print_fn(
            f"model thread waited {stats.wait_s / n:.3f} s/image for decoding; high water: pool "
            f"{stats.pool_high_water}/{pool.prefetch}, batch {stats.batch_high_water}/"
            f"{batch_size}, writer queue {stats.write_queue_high_water}/2"
        )
        print_fn(f"bounding stage: {bound} ({per_image[bound]:.3f} s/image)")
        result: dict[str, Any] = {
            "n": n,
            "device": device,
            "dtype": dtype,
            "machine": machine_description(device),
            "bundle": f"{bundle.name} {bundle.version}",
            "seconds_per_image": per_image,
            "bound": bound,
            "images_per_s": new_ips,
            "workers": workers,
            "decode_resolution": "reduced" if reduced else "full",
            "batch": batch_size,
            "rounds": rounds,
            "outputs": outputs_new,
            "high_water": {
                "pool": stats.pool_high_water,
                "batch": stats.batch_high_water,
                "writer_queue": stats.write_queue_high_water,
            },
        }
        if best_old is None:
            print_fn(f"pipeline: {new_ips:.3f} img/s")
            return result
        old_wall, (t_dec, t_mod, t_wri), outputs_old = best_old
        old_ips = n / old_wall
        print_fn(
            f"old path (serial decode, batch 8, no overlap): {old_ips:.3f} images/s "
            f"({old_wall:.2f} s: read+decode {t_dec:.2f}, model {t_mod:.2f}, writers {t_wri:.2f})"
        )
        speedup = new_ips / old_ips
        print_fn(
            f"pipeline: {new_ips:.3f} img/s, old path {old_ips:.3f} img/s, speedup {speedup:.2f}"
        )
        result.update(old_images_per_s=old_ips, speedup=speedup, old_outputs=outputs_old)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def full_plan(
    models: Sequence[str] = FULL_MODELS,
    sizes: Sequence[int] = FULL_SIZES,
    batches: Sequence[int] = FULL_BATCHES,
) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(m, s, tuple(batches)) for m in models for s in sizes]


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()  # type: ignore[no-any-return]
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
