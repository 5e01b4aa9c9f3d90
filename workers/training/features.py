"""Frozen encoder features, extracted once per (encoder, file) and cached.

Cache layout: `<cache>/<encoder fingerprint[:16]>/<file sha256>.npz` holding the CLS token and
the mean patch token (float32, what the classifier reads) and the patch tokens (float16, what the
segmenter reads), the token grid and the source shape. The encoder fingerprint covers the
encoder's file checksums, its configuration and the preprocessing, so a different encoder or
input size never reads stale features; the file sha256 makes a renamed file a hit and a changed
file a miss.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from workers.imaging import ImageError, decode
from workers.models.bundle import Bundle
from workers.models.files import replace_atomically
from workers.models.runner import ModelRunner
from workers.training.data import DataError, Sample

log = logging.getLogger(__name__)

__all__ = ["FeatureTable", "default_cache_dir", "extract_features"]


@dataclass
class FeatureTable:
    cls: np.ndarray  # [N, D] float32
    patch_mean: np.ndarray  # [N, D] float32
    patches: np.ndarray  # [N, P, D] float16 (P = h*w, the same grid for every letterboxed image)
    grid: tuple[int, int]
    shapes: list[tuple[int, int]]  # source (rows, columns)
    cache_hits: int = 0

    @property
    def image_features(self) -> np.ndarray:
        """[N, 2D]: what `ClassificationHead` reads (CLS token, mean patch token)."""
        return np.concatenate([self.cls, self.patch_mean], axis=1)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pacs-agent" / "features"


def _cache_path(cache_dir: Path, bundle: Bundle, sample: Sample) -> Path:
    return cache_dir / bundle.encoder_fingerprint[:16] / f"{sample.sha256}.npz"


def _decoded(samples: list[tuple[int, Sample]]) -> Iterator[tuple[str, np.ndarray]]:
    for i, s in samples:
        try:
            image = decode(dcmread(s.path))
        except ImageError as exc:
            raise DataError(f"{s.path.name}: cannot use the image: {exc}") from exc
        yield str(i), image


def extract_features(
    bundle: Bundle,
    samples: list[Sample],
    cache_dir: Path | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
) -> FeatureTable:
    """Features of every sample (cache first, then the encoder on the misses)."""
    n = len(samples)
    cls: list[np.ndarray | None] = [None] * n
    mean: list[np.ndarray | None] = [None] * n
    patches: list[np.ndarray | None] = [None] * n
    shapes: list[tuple[int, int] | None] = [None] * n
    grid: tuple[int, int] | None = None
    misses: list[tuple[int, Sample]] = []
    hits = 0
    for i, s in enumerate(samples):
        path = _cache_path(cache_dir, bundle, s) if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    cls[i], mean[i], patches[i] = z["cls"], z["patch_mean"], z["patches"]
                    g = (int(z["grid"][0]), int(z["grid"][1]))
                    shapes[i] = (int(z["shape"][0]), int(z["shape"][1]))
                grid = grid or g
                hits += 1
                continue
            except (OSError, KeyError, ValueError) as exc:
                log.warning("feature cache entry %s unreadable (%s); recomputing", path.name, exc)
        misses.append((i, s))

    if misses:
        runner = ModelRunner(bundle, device=device, dtype=dtype, batch_size=batch_size)
        for emb in runner.embed(_decoded(misses)):
            i = int(emb.sop)
            c = emb.cls_token.astype(np.float32)
            m = emb.patch_tokens.mean(axis=0).astype(np.float32)
            pt = emb.patch_tokens.astype(np.float16)
            cls[i], mean[i], patches[i] = c, m, pt
            shapes[i] = emb.transform.source_shape
            grid = emb.grid
            if cache_dir is not None:
                _write_cache(
                    _cache_path(cache_dir, bundle, samples[i]),
                    c,
                    m,
                    pt,
                    emb.grid,
                    emb.transform.source_shape,
                )
    log.info("features: %d images, %d from the cache", n, hits)
    assert grid is not None
    return FeatureTable(
        cls=np.stack(cls),  # type: ignore[arg-type]
        patch_mean=np.stack(mean),  # type: ignore[arg-type]
        patches=np.stack(patches),  # type: ignore[arg-type]
        grid=grid,
        shapes=[s for s in shapes if s is not None],
        cache_hits=hits,
    )


def _write_cache(
    path: Path,
    cls: np.ndarray,
    mean: np.ndarray,
    patches: np.ndarray,
    grid: tuple[int, int],
    shape: tuple[int, int],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(
                f,
                cls=cls,
                patch_mean=mean,
                patches=patches,
                grid=np.array(grid),
                shape=np.array(shape),
            )

    replace_atomically(path, write)
