"""Run a loaded bundle on decoded images and return results in source pixel geometry.

`ModelRunner.run` is the whole inference for a study: letterbox, batches of `batch_size` through
the encoder (scaled-dot-product attention everywhere but the last layer, whose attention weights
make the heatmaps), the adapters, and every map resampled onto the source pixels. On CUDA use
`dtype="bfloat16"` (autocast); on CPU float32 is the default and bfloat16 works too.
`dtype="auto"` (the default, `PACS_AGENT_WORKER_DTYPE`) resolves per device (`resolve_runtime`):
bfloat16 autocast and TF32 on CUDA, float32 on a CPU. The encoder runs as
`DinoViT.fused_for_inference()` (fused QKV, LayerScale folded: same function, faster), optionally
through `torch.compile` (`PACS_AGENT_TORCH_COMPILE`); inputs go to a GPU from pinned memory with
non-blocking copies.

`run_prepared` takes images already decoded and letterboxed (by `workers.decode_pool`, in other
processes) and yields results batch by batch, so decoding overlaps inference.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.imaging import Transform, letterbox, normalize
from workers.localize import label_regions
from workers.models.adapters import attention_maps, class_activation_maps
from workers.models.bundle import Bundle
from workers.models.vit import DinoViT, EncoderOutput
from workers.results import Finding, ImageResult

log = logging.getLogger(__name__)

__all__ = [
    "COMPILE_MODES",
    "Embedding",
    "ModelRunner",
    "PreparedImage",
    "RuntimeOptions",
    "apply_runtime",
    "compile_encoder",
    "resolve_runtime",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the encoder runs on one device, resolved from the worker settings."""

    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "float32" | "bfloat16" | "float16": autocast unless float32
    tf32: bool  # TF32 for float32 matmuls/convolutions (CUDA only)
    compile: str  # "off" or a torch.compile mode
    pin_memory: bool  # page-locked host batches + non_blocking copies (CUDA only)


def resolve_runtime(
    device: str = "auto", dtype: str = "auto", *, tf32: bool = True, compile: str = "off"
) -> RuntimeOptions:
    """Settings -> per-device options: on CUDA, dtype "auto" is bfloat16 autocast and TF32 is on
    (unless `tf32` is False); on a CPU, "auto" is float32 and TF32 does not apply."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    cuda = kind == "cuda"
    return RuntimeOptions(device, dtype, tf32 and cuda, compile, cuda)


def apply_runtime(options: RuntimeOptions) -> None:
    """Process-wide switches the options need (TF32 is a global torch flag)."""
    if torch.device(options.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = options.tf32
        torch.backends.cudnn.allow_tf32 = options.tf32


def compile_encoder(encoder: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`torch.compile(encoder, mode=...)` (inductor) unless mode is "off". With inductor's
    `freezing` on: weights become constants, so it prepacks them and folds what it can."""
    if mode == "off":
        return encoder
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(encoder, mode=None if mode == "default" else mode)  # type: ignore[return-value]


@dataclass
class PreparedImage:
    """A decoded image placed in the model input: what the encoder needs and what maps back."""

    sop: str
    display: np.ndarray  # the decoded source image, 0..1, [rows, columns]
    boxed: np.ndarray  # letterboxed [size, size], 0..1
    transform: Transform


@dataclass
class Embedding:
    """Frozen encoder features of one image (the `models embed` command, training)."""

    sop: str
    cls_token: np.ndarray  # [D]
    patch_tokens: np.ndarray  # [h*w, D]
    grid: tuple[int, int]
    transform: Transform


def finding_points(
    cam: np.ndarray, seg: np.ndarray | None, transform: Transform, patch: int, masks: np.ndarray
) -> list[tuple[float, float]] | None:
    """Each label's own location: the peak of its activation map over the token cells that lie
    on the image (and on the segmented region, when there is one), as a source pixel
    (column, row) snapped into the segmentation masks. None when no cell lies on the image."""
    n_labels, h, w = cam.shape
    rows, cols = transform.source_shape
    # Token cell centres in source pixels (inverse of the letterbox transform).
    src_r = ((np.arange(h) + 0.5) * patch - transform.pad_top) / transform.scale_y - 0.5
    src_c = ((np.arange(w) + 0.5) * patch - transform.pad_left) / transform.scale_x - 0.5
    on_image = ((src_r >= 0) & (src_r <= rows - 1))[:, None] & ((src_c >= 0) & (src_c <= cols - 1))[
        None, :
    ]
    candidates = on_image
    if seg is not None and seg.shape[0]:
        segmented = (seg >= 0.0).any(axis=0) & on_image
        if segmented.any():
            candidates = segmented
    if not candidates.any():
        return None
    region: np.ndarray | None = np.asarray(masks.any(axis=0)) if masks.shape[0] else None
    half_r = max(1, int(np.ceil(patch / transform.scale_y / 2)))
    half_c = max(1, int(np.ceil(patch / transform.scale_x / 2)))
    points = []
    for k in range(n_labels):
        gr, gc = np.unravel_index(int(np.argmax(np.where(candidates, cam[k], -np.inf))), (h, w))
        r = int(np.clip(round(src_r[gr]), 0, rows - 1))
        c = int(np.clip(round(src_c[gc]), 0, cols - 1))
        if region is not None and region.any() and not region[r, c]:
            # The cell is segmented on the grid; put the point on a segmented source pixel.
            r0, c0 = max(0, r - half_r), max(0, c - half_c)
            box = region[r0 : r + half_r + 1, c0 : c + half_c + 1]
            hits = np.argwhere(box)
            if hits.size:
                d = (hits[:, 0] + r0 - r) ** 2 + (hits[:, 1] + c0 - c) ** 2
                r, c = int(hits[d.argmin(), 0] + r0), int(hits[d.argmin(), 1] + c0)
        points.append((float(c), float(r)))
    return points


class ModelRunner:
    """Holds a bundle's modules on one device. `run` is the whole inference for a study.

    `cam`: per-label class-activation maps in `ImageResult.extra["cam"]`; `head_maps`: per-head
    CLS attention maps in `extra["attention_heads"]` ([heads, rows, columns]; off by default,
    they are large); QC heads, when the bundle has them, fill `extra["qc"]`.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
        *,
        cam: bool = True,
        head_maps: bool = False,
        tf32: bool = True,
        compile: str = "off",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.options = resolve_runtime(device, dtype, tf32=tf32, compile=compile)
        apply_runtime(self.options)
        self.bundle = bundle
        self.device = torch.device(self.options.device)
        self.dtype = self.options.dtype
        self.batch_size = batch_size
        self.cam = cam
        self.head_maps = head_maps
        encoder: Any = bundle.encoder
        if isinstance(encoder, DinoViT):
            # a fused copy: the bundle keeps the checkpoint-layout original
            encoder = encoder.fused_for_inference()
        # Any: a DinoViT, its torch.compile wrapper, or (tests) a module with the same outputs
        self.encoder: Any = compile_encoder(encoder.to(self.device).eval(), self.options.compile)
        self.classifier = (
            bundle.classifier.to(self.device).eval() if bundle.classifier is not None else None
        )
        self.segmenter = (
            bundle.segmenter.to(self.device).eval() if bundle.segmenter is not None else None
        )
        self.qc_heads = {
            t: (q.head.to(self.device).eval(), q.labels) for t, q in bundle.qc_heads.items()
        }
        # Report-generation adapter (workers.models.report_adapter): text per image, greedy.
        report = getattr(bundle, "report", None)
        self.reporter = report.to(self.device).eval() if report is not None else None
        # seconds spent per stage since construction (benchmarks read it)
        self.timings: dict[str, float] = {"preprocess": 0.0, "model": 0.0, "maps": 0.0}

    # ----------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.dtype])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, sop: str, image: np.ndarray) -> PreparedImage:
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"{sop}: expected a 2-D decoded image, got shape {img.shape}")
        boxed, transform = letterbox(img, self.bundle.preprocessing.size)
        return PreparedImage(sop=sop, display=img, boxed=boxed, transform=transform)

    def _pixel_values(self, batch: list[PreparedImage]) -> torch.Tensor:
        pre = self.bundle.preprocessing
        x = torch.stack([normalize(p.boxed, pre) for p in batch])
        return self._to_device(x)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Host batch -> device: from pinned memory with a non-blocking copy on CUDA."""
        if self.options.pin_memory and x.device.type == "cpu":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def encode(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> EncoderOutput:
        with torch.inference_mode(), self._autocast():
            out: EncoderOutput = self.encoder(
                self._to_device(pixel_values), output_attentions=output_attentions
            )
            return out

    # ----------------------------------------------------------------------------------------

    def run(self, images: list[tuple[str, np.ndarray]]) -> list[ImageResult]:
        """[(source SOP Instance UID, image from `imaging.decode`)] -> one `ImageResult` each,
        in the same order, every map at the source's rows x columns."""
        return list(self.run_prepared(self._prepare_lazily(images)))

    def _prepare_lazily(self, images: Iterable[tuple[str, np.ndarray]]) -> Iterator[PreparedImage]:
        for sop, image in images:
            t0 = time.perf_counter()
            p = self.prepare(sop, image)
            self.timings["preprocess"] += time.perf_counter() - t0
            yield p

    def run_prepared(self, prepared: Iterable[PreparedImage]) -> Iterator[ImageResult]:
        """Results for prepared images, in order, batch by batch as inputs arrive."""
        batch: list[PreparedImage] = []
        for p in prepared:
            batch.append(p)
            if len(batch) == self.batch_size:
                yield from self._run_batch(batch)
                batch = []
        if batch:
            yield from self._run_batch(batch)

    def embed(self, images: Iterable[tuple[str, np.ndarray]]) -> Iterator[Embedding]:
        """Frozen features (after the final LayerNorm) for each image, batch by batch."""
        batch: list[PreparedImage] = []
        for p in self._prepare_lazily(images):
            batch.append(p)
            if len(batch) == self.batch_size:
                yield from self._embed_batch(batch)
                batch = []
        if batch:
            yield from self._embed_batch(batch)

    def _embed_batch(self, batch: list[PreparedImage]) -> Iterator[Embedding]:
        out = self.encode(self._pixel_values(batch))
        cls = out.cls_token.float().cpu().numpy()
        patches = out.patch_tokens.float().cpu().numpy()
        for i, p in enumerate(batch):
            yield Embedding(p.sop, cls[i], patches[i], out.grid, p.transform)

    def _run_batch(self, batch: list[PreparedImage]) -> list[ImageResult]:
        t0 = time.perf_counter()
        pixel_values = self._pixel_values(batch)
        with torch.inference_mode(), self._autocast():
            out = self.encoder(pixel_values, output_attentions=True)
            cls_tok, patches = out.cls_token, out.patch_tokens
            cls_logits = self.classifier(cls_tok, patches) if self.classifier is not None else None
            # On the token grid they are cheap: always made, for each finding's own location;
            # the full-size maps only when asked (`cam`).
            cam = (
                class_activation_maps(self.classifier, cls_tok, patches, out.grid)
                if self.classifier is not None
                else None
            )
            seg_logits = self.segmenter(patches, out.grid) if self.segmenter is not None else None
            qc_probs = {
                t: torch.softmax(head(cls_tok, patches).float(), dim=-1)
                for t, (head, _) in self.qc_heads.items()
            }
            assert out.last_attention is not None
            heads_attn = attention_maps(out.last_attention, out.grid, out.n_prefix_tokens)
        report_texts: list[str] | None = None
        if self.reporter is not None:
            try:  # the findings do not depend on the text: a failure leaves the text out
                report_texts = self.reporter.generate(patches.float(), out.grid)
            except Exception as exc:
                log.warning("report adapter failed on %d image(s): %s", len(batch), type(exc))

        probs = torch.sigmoid(cls_logits.float()).cpu().numpy() if cls_logits is not None else None
        seg = seg_logits.float().cpu().numpy() if seg_logits is not None else None
        cam_np = cam.float().cpu().numpy() if cam is not None else None
        heads_np = heads_attn.float().cpu().numpy()
        cls_np = cls_tok.float().cpu().numpy()  # the image's embedding (similar cases)
        attn_np = heads_np.mean(axis=1)
        qc_np = {t: v.cpu().numpy() for t, v in qc_probs.items()}
        self._sync()
        t1 = time.perf_counter()
        self.timings["model"] += t1 - t0

        h, w = out.grid
        patch = self.encoder.cfg.patch_size
        extent = (float(h * patch), float(w * patch))
        pre = self.bundle.preprocessing
        results: list[ImageResult] = []
        for i, p in enumerate(batch):
            transform = p.transform
            rows, cols = transform.source_shape
            heatmap = _unit(transform.to_source(attn_np[i], extent=extent))
            peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            point = (float(peak_col), float(peak_row))
            if seg is not None:
                # bilinear on logits, then p >= 0.5 <=> logit >= 0
                masks = transform.to_source(seg[i], extent=extent) >= 0.0
            else:
                masks = np.zeros((0, rows, cols), dtype=bool)
            label_points = (
                finding_points(
                    cam_np[i], seg[i] if seg is not None else None, transform, patch, masks
                )
                if cam_np is not None
                else None
            )
            # every label's region (workers.localize), for the SR and for grounding
            regions = (
                label_regions(
                    cam_np[i],
                    seg[i] if seg is not None else None,
                    self.bundle.labels,
                    self.bundle.seg_classes,
                    transform,
                    patch,
                )
                if cam_np is not None
                else None
            )
            findings = []
            if probs is not None:
                for k, (label, threshold, prob) in enumerate(
                    zip(self.bundle.labels, self.bundle.thresholds, probs[i], strict=True)
                ):
                    findings.append(
                        Finding(
                            label=label,
                            probability=float(np.clip(prob, 0.0, 1.0)),
                            threshold=float(threshold),
                            source_sop_instance_uid=p.sop,
                            point=label_points[k] if label_points else point,
                            region=regions[k] if regions else None,
                        )
                    )
            extra: dict[str, object] = {"grid": [h, w], "input_size": pre.size, "cls": cls_np[i]}
            if report_texts is not None:  # workers.report_draft.GENERATED_TEXT_KEY
                extra["report_text"] = report_texts[i]
            # phrase -> label (workers.models.bundle.Bundle.vocabulary), persisted for grounding
            extra["vocabulary"] = self.bundle.vocabulary
            if cam_np is not None and self.cam:
                maps = transform.to_source(cam_np[i], extent=extent)
                extra["cam"] = {label: maps[k] for k, label in enumerate(self.bundle.labels)}
            if self.head_maps:
                extra["attention_heads"] = transform.to_source(heads_np[i], extent=extent)
            if qc_np:
                qc: dict[str, tuple[str, float]] = {}
                qc_all: dict[str, dict[str, float]] = {}
                for task, pr in qc_np.items():
                    labels = self.qc_heads[task][1]
                    k = int(np.argmax(pr[i]))
                    qc[task] = (labels[k], float(pr[i][k]))
                    qc_all[task] = {lab: float(v) for lab, v in zip(labels, pr[i], strict=True)}
                extra["qc"] = qc
                extra["qc_probabilities"] = qc_all
            results.append(
                ImageResult(
                    source_sop_instance_uid=p.sop,
                    findings=findings,
                    masks=masks,
                    segment_labels=list(self.bundle.seg_classes),
                    heatmap=heatmap,
                    display=p.display,
                    extra=extra,
                )
            )
            log.debug(
                "image %s: %d findings positive, mask fractions %s",
                p.sop,
                sum(f.present for f in findings),
                [round(float(m.mean()), 3) for m in masks],
            )
        self.timings["maps"] += time.perf_counter() - t1
        return results


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)
