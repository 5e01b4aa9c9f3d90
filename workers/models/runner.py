"""Run a loaded bundle on decoded images and return results in source pixel geometry."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

from workers.imaging import Transform, letterbox, normalize
from workers.models.adapters import cls_attention_map
from workers.models.bundle import Bundle
from workers.results import Finding, ImageResult

log = logging.getLogger(__name__)

__all__ = ["ModelRunner"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    """Holds a bundle's modules on one device. `run` is the whole inference for a study."""

    def __init__(
        self, bundle: Bundle, device: str = "cpu", dtype: str = "float32", batch_size: int = 8
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.bundle = bundle
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.encoder = bundle.encoder.to(self.device).eval()
        self.classifier = (
            bundle.classifier.to(self.device).eval() if bundle.classifier is not None else None
        )
        self.segmenter = (
            bundle.segmenter.to(self.device).eval() if bundle.segmenter is not None else None
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.dtype])

    def run(self, images: list[tuple[str, np.ndarray]]) -> list[ImageResult]:
        """[(source SOP Instance UID, image from `imaging.decode`)] -> one `ImageResult` each,
        in the same order, every map at the source's rows x columns."""
        results: list[ImageResult] = []
        for chunk in _chunks(images, self.batch_size):
            results.extend(self._run_batch(chunk))
        return results

    def _run_batch(self, batch: list[tuple[str, np.ndarray]]) -> list[ImageResult]:
        pre = self.bundle.preprocessing
        transforms: list[Transform] = []
        inputs: list[torch.Tensor] = []
        for sop, image in batch:
            img = np.asarray(image, dtype=np.float32)
            if img.ndim != 2:
                raise ValueError(f"{sop}: expected a 2-D decoded image, got shape {img.shape}")
            boxed, transform = letterbox(img, pre.size)
            transforms.append(transform)
            inputs.append(normalize(boxed, pre))
        pixel_values = torch.stack(inputs).to(self.device)

        with torch.inference_mode(), self._autocast():
            out = self.encoder(pixel_values, output_attentions=True)
            cls_logits = (
                self.classifier(out.cls_token, out.patch_tokens)
                if self.classifier is not None
                else None
            )
            seg_logits = (
                self.segmenter(out.patch_tokens, out.grid) if self.segmenter is not None else None
            )
            assert out.last_attention is not None
            attn = cls_attention_map(out.last_attention, out.grid, out.n_prefix_tokens)

        h, w = out.grid
        patch = self.encoder.cfg.patch_size
        extent = (float(h * patch), float(w * patch))
        probs = (
            torch.sigmoid(cls_logits.float()).cpu().numpy() if cls_logits is not None else None
        )
        seg = seg_logits.float().cpu().numpy() if seg_logits is not None else None
        attn_np = attn.float().cpu().numpy()

        results: list[ImageResult] = []
        for i, ((sop, image), transform) in enumerate(zip(batch, transforms, strict=True)):
            rows, cols = transform.source_shape
            heatmap = _unit(transform.to_source(attn_np[i], extent=extent))
            peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            point = (float(peak_col), float(peak_row))
            if seg is not None:
                # bilinear on logits, then p >= 0.5 <=> logit >= 0
                masks = transform.to_source(seg[i], extent=extent) >= 0.0
            else:
                masks = np.zeros((0, rows, cols), dtype=bool)
            findings = []
            if probs is not None:
                for label, threshold, p in zip(
                    self.bundle.labels, self.bundle.thresholds, probs[i], strict=True
                ):
                    findings.append(
                        Finding(
                            label=label,
                            probability=float(np.clip(p, 0.0, 1.0)),
                            threshold=float(threshold),
                            source_sop_instance_uid=sop,
                            point=point,
                        )
                    )
            results.append(
                ImageResult(
                    source_sop_instance_uid=sop,
                    findings=findings,
                    masks=masks,
                    segment_labels=list(self.bundle.seg_classes),
                    heatmap=heatmap,
                    display=np.asarray(image, dtype=np.float32),
                    extra={"grid": [h, w], "input_size": pre.size},
                )
            )
            log.debug(
                "image %s: %d findings positive, mask fractions %s",
                sop,
                sum(f.present for f in findings),
                [round(float(m.mean()), 3) for m in masks],
            )
        return results


def _unit(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(m, dtype=np.float32)
    return ((m - lo) / (hi - lo)).astype(np.float32)


def _chunks(
    items: list[tuple[str, np.ndarray]], n: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]
