"""`pacs-agent bench encoder` and `pacs-agent bench pipeline`: throughput on this machine.

Encoder: DINOv2 ViT-S/B/L (patch 14) with RANDOM weights (timing only; weights do not change the
arithmetic), images/s per (model, input size, batch), analytic FLOPs per image from the
configuration (`ViTConfig.flops_per_image`: patch embedding + per layer 24*N*D^2 + 4*N^2*D for a
plain MLP, multiply-add = 2 FLOPs) and the achieved TFLOP/s.

Pipeline: end-to-end from compressed DICOM (NEMA RG1, a 1955 x 1841 15-bit CR chest in JPEG 2000
lossless, from pydicom-data) through read -> decode -> preprocess (letterbox) -> encoder +
adapters -> maps to source geometry -> DICOM writers (SR, SEG, heatmap SC), timed stage by stage
on one core path, then overlapped (decode in a process pool while the model and writers run).
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bench_encoder(
    plan: Sequence[tuple[str, int, Sequence[int]]] = DEFAULT_PLAN,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    min_time: float = 1.0,
    max_call_s: float = 30.0,
    print_fn: Callable[[str], None] = print,
) -> list[EncoderResult]:
    """Time `encoder(pixel_values)` (scaled-dot-product attention path) for each
    (model, size, batches) of `plan`: images/s from the fastest of at least 3 timed calls after
    a warm-up. A batch whose estimated single call exceeds `max_call_s`
    (from the previous batch's throughput) is skipped and says so."""
    device = _resolve_device(device)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    print_fn(f"encoder benchmark on {device} ({machine_description(device)}), dtype {dtype}")
    print_fn(
        "RANDOM weights (timing only). FLOPs analytic: patch embed + per layer "
        "24*N*D^2 + 4*N^2*D (multiply-add = 2). img/s: fastest of >= 3 calls"
    )
    print_fn(
        f"{'model':<10} {'size':>5} {'batch':>5} {'tokens':>6} {'GFLOP/img':>10} "
        f"{'img/s':>9} {'ms/img':>9} {'TFLOP/s':>8}"
    )
    results: list[EncoderResult] = []
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[dtype])
        if dtype != "float32"
        else None
    )
    for name, size, batches in plan:
        if name not in MODEL_FACTORIES:
            raise ValueError(f"model must be one of {sorted(MODEL_FACTORIES)}, got {name!r}")
        cfg = MODEL_FACTORIES[name](image_size=size)
        model = DinoViT(cfg).eval().to(device)
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
            x = torch.randn(batch, 3, size, size, device=device)

            def call(x: torch.Tensor = x, model: DinoViT = model) -> None:
                with torch.inference_mode():
                    if autocast is not None:
                        with autocast:
                            model(x)
                    else:
                        model(x)

            call()  # warm-up (allocations, kernel selection)
            _sync(device)
            # at least 3 timed calls and `min_time` seconds in all; the fastest call is reported
            # (timeit's rule: on a shared machine other load only ever adds time)
            times: list[float] = []
            while len(times) < 3 or (sum(times) < min_time and len(times) < 1000):
                t0 = time.perf_counter()
                call()
                _sync(device)
                times.append(time.perf_counter() - t0)
            iters = len(times)
            ips = batch / min(times)
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
            )
            results.append(r)
            print_fn(
                f"{label:<10} {size:>5} {batch:>5} {r.tokens:>6} {gflop:>10.1f} "
                f"{ips:>9.2f} {1e3 / ips:>9.1f} {r.tflops:>8.3f}"
            )
        del model
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
    batch_size: int = 2,
    workers: int = 2,
    source: str = "RG1_J2KR.dcm",
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Per-stage seconds per image (serial), the bounding stage, and end-to-end images/s both
    serial and with decoding overlapped in a process pool."""
    from pydicom import dcmread

    from workers.decode_pool import DecodePool
    from workers.dicom_out.outputs import build_outputs
    from workers.imaging import decode
    from workers.models.bundle import load_bundle, write_demo_bundle
    from workers.models.runner import ModelRunner
    from workers.results import AlgorithmInfo

    device = _resolve_device(device)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module INFO lines
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if bundle_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="pacs-agent-bench-")
        bundle_path = str(write_demo_bundle(Path(tmp.name) / "demo"))
    try:
        bundle = load_bundle(bundle_path)
        runner = ModelRunner(bundle, device=device, dtype=dtype, batch_size=batch_size)
        algorithm = AlgorithmInfo(
            name=bundle.name,
            version=bundle.version,
            checksum=bundle.checksum,
            is_demo=bundle.is_demo,
        )
        blobs = _rg1_blobs(n, source)
        print_fn(
            f"pipeline benchmark: {n} x {source} on {device} "
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
        ds0 = dcmread(BytesIO(blobs[0]))
        image0 = decode(ds0)
        runner.run([("warmup", image0)])
        runner.timings = dict.fromkeys(runner.timings, 0.0)

        # serial, stage by stage
        stages: dict[str, float] = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
        t_all = time.perf_counter()
        sources, prepared = [], []
        for blob in blobs:
            t0 = time.perf_counter()
            ds = dcmread(BytesIO(blob))
            t1 = time.perf_counter()
            img = decode(ds)
            t2 = time.perf_counter()
            prepared.append(runner.prepare(str(ds.SOPInstanceUID), img))
            t3 = time.perf_counter()
            stages["read"] += t1 - t0
            stages["decode"] += t2 - t1
            stages["preprocess"] += t3 - t2
            sources.append(ds)
        results = list(runner.run_prepared(prepared))
        stages["encoder+adapters"] = runner.timings["model"]
        stages["maps to source"] = runner.timings["maps"]
        t0 = time.perf_counter()
        outputs = build_outputs(sources, results, algorithm, 1)
        stages["DICOM writers"] = time.perf_counter() - t0
        serial_wall = time.perf_counter() - t_all
        per_image = {k: v / n for k, v in stages.items()}
        bound = max(per_image, key=lambda k: per_image[k])

        # overlapped: decode + letterbox in a process pool while model and writers run here
        runner.timings = dict.fromkeys(runner.timings, 0.0)
        t_all = time.perf_counter()
        with DecodePool(bundle.preprocessing.size, workers=workers) as pool:
            t_pool = time.perf_counter() - t_all
            headers = [dcmread(BytesIO(b)) for b in blobs]  # pixel data stays undecoded here
            decoded = pool.imap(
                (str(ds.SOPInstanceUID), b) for ds, b in zip(headers, blobs, strict=True)
            )
            results2 = list(runner.run_prepared(d.image for d in decoded if d.image is not None))
        build_outputs(headers, results2, algorithm, 1)
        overlapped_wall = time.perf_counter() - t_all

        print_fn(f"{'stage':<18} {'s/image':>8} {'share':>6}")
        total = sum(per_image.values())
        for k, v in per_image.items():
            print_fn(f"{k:<18} {v:>8.3f} {v / total:>6.0%}{'  <- bound' if k == bound else ''}")
        print_fn(
            f"serial end to end: {n / serial_wall:.3f} images/s ({serial_wall:.2f} s for {n})"
            f", {len(outputs)} output objects"
        )
        print_fn(
            f"overlapped ({workers} decode processes, pool start {t_pool:.2f} s included): "
            f"{n / overlapped_wall:.3f} images/s ({overlapped_wall:.2f} s)"
        )
        print_fn(f"bounding stage: {bound} ({per_image[bound]:.3f} s/image)")
        return {
            "n": n,
            "device": device,
            "dtype": dtype,
            "machine": machine_description(device),
            "bundle": f"{bundle.name} {bundle.version}",
            "seconds_per_image": per_image,
            "bound": bound,
            "serial_images_per_s": n / serial_wall,
            "overlapped_images_per_s": n / overlapped_wall,
            "workers": workers,
            "outputs": len(outputs),
        }
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
