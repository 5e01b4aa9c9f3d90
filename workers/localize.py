"""Localization: one region per label and image, from the maps the runner already has.

The rule (the same for every label, positive or not; the SR draws those of positive findings,
``POST /api/grounding`` answers from all of them):

1. **Map.** The label's map on the patch-token grid: the segmenter's logits of the segment
   class with the same name (case-insensitive, spaces collapsed) when the bundle has one
   (``basis`` "segment"), else the label's class-activation map (``basis`` "cam",
   ``workers.models.adapters.class_activation_maps``, logit units).
2. **Seed.** The cell where the finding's point was taken (the peak of its CAM over the cells on
   the image, and on the segmented area when there is one; see ``runner.finding_points``). For
   a segment map whose mask does not cover that cell, the segment map's own peak.
3. **Threshold.** A segment map: logit 0 (probability 0.5, the SEG's own threshold). A CAM:
   ``REGION_THRESHOLD`` (0.5) of the way from the map's minimum over the on-image cells to its
   value at the seed (half maximum, in the spirit of CAM box localization, Zhou et al. 2016).
4. **Component.** The 4-connected cells at or above the threshold that contain the seed, on the
   token grid.
5. **Box.** The map resampled bilinearly onto the source pixels (the same resampling as the
   SEG and heatmap; on a lattice of at most ``MAX_LATTICE`` samples per side for large images)
   inside the component's cells and their neighbours; the bounding box of the pixels at or
   above the threshold, as pixel edges. Written in the SR as a closed POLYLINE of 5 points.

A region says where the map is high, not that a finding is there: under random weights
(DEMO bundles) it is as meaningless as the probability next to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from workers.imaging import Transform, _tap_matrix
from workers.results import Region

__all__ = [
    "MAX_LATTICE",
    "REGION_THRESHOLD",
    "GridGeometry",
    "component",
    "label_regions",
    "normalise_name",
]

REGION_THRESHOLD = 0.5
MAX_LATTICE = 512


def normalise_name(name: str) -> str:
    """Case-insensitive, single-spaced: how labels, segment classes and phrases are matched."""
    return " ".join(name.lower().split())


class GridGeometry:
    """Where the cells of an ``h`` x ``w`` token grid (``patch`` input pixels each) lie on the
    source image placed by ``transform``."""

    def __init__(self, transform: Transform, patch: int, h: int, w: int) -> None:
        self.transform, self.patch, self.h, self.w = transform, patch, h, w
        rows, cols = transform.source_shape
        # token cell centres in source pixels (inverse of the letterbox transform)
        self.src_r = ((np.arange(h) + 0.5) * patch - transform.pad_top) / transform.scale_y - 0.5
        self.src_c = ((np.arange(w) + 0.5) * patch - transform.pad_left) / transform.scale_x - 0.5
        self.on_image = ((self.src_r >= 0) & (self.src_r <= rows - 1))[:, None] & (
            (self.src_c >= 0) & (self.src_c <= cols - 1)
        )[None, :]

    def candidates(self, seg: np.ndarray | None) -> np.ndarray:
        """Cells a finding may peak on: on the image, and segmented when anything is."""
        if seg is not None and seg.shape[0]:
            segmented = (seg >= 0.0).any(axis=0) & self.on_image
            if segmented.any():
                return np.asarray(segmented)
        return self.on_image

    def lattice(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(step, sample rows, sample columns): source pixels sampled every ``step``."""
        rows, cols = self.transform.source_shape
        step = max(1, -(-max(rows, cols) // MAX_LATTICE))
        return step, np.arange(0, rows, step), np.arange(0, cols, step)

    def grid_coords(self, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional grid-cell indices of source pixel centres (rows ``r``, columns ``c``)."""
        t = self.transform
        gy = (t.pad_top + (r + 0.5) * t.scale_y) / self.patch - 0.5
        gx = (t.pad_left + (c + 0.5) * t.scale_x) / self.patch - 0.5
        return gy, gx


def component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of boolean ``mask`` containing ``seed`` (empty if it is off)."""
    out = np.zeros_like(mask, dtype=bool)
    if not mask[seed]:
        return out
    h, w = mask.shape
    out[seed] = True
    todo = deque([seed])
    while todo:
        r, c = todo.popleft()
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not out[rr, cc]:
                out[rr, cc] = True
                todo.append((rr, cc))
    return out


def _region(
    grid_map: np.ndarray,
    threshold: float,
    seed: tuple[int, int],
    geo: GridGeometry,
    basis: str,
) -> Region:
    cells = component((grid_map >= threshold) & geo.on_image, seed)
    if not cells.any():  # the seed itself is below (cannot happen for a CAM): the seed cell
        cells[seed] = True
    # neighbours of the component: the bilinear map is above the threshold up to half a cell out
    near = cells.copy()
    near[1:, :] |= cells[:-1, :]
    near[:-1, :] |= cells[1:, :]
    near[:, 1:] |= near[:, :-1].copy()
    near[:, :-1] |= near[:, 1:].copy()
    rows, cols = geo.transform.source_shape
    step, r, c = geo.lattice()
    gy, gx = geo.grid_coords(r.astype(np.float64), c.astype(np.float64))
    cell_r = np.clip(np.floor(gy + 0.5).astype(int), 0, geo.h - 1)
    cell_c = np.clip(np.floor(gx + 0.5).astype(int), 0, geo.w - 1)
    # only the rows and columns whose cells touch the component are resampled
    keep_r = near[cell_r].any(axis=1)
    keep_c = near[:, cell_c].any(axis=0)
    sub_r, sub_c = np.flatnonzero(keep_r), np.flatnonzero(keep_c)
    values = (
        _tap_matrix(gy[sub_r], geo.h)
        @ grid_map.astype(np.float32)
        @ _tap_matrix(gx[sub_c], geo.w).T
    )
    inside = (values >= threshold) & near[cell_r[sub_r]][:, cell_c[sub_c]]
    hits = np.argwhere(inside)
    if hits.size:
        r0, r1 = r[sub_r[hits[:, 0].min()]], r[sub_r[hits[:, 0].max()]]
        c0, c1 = c[sub_c[hits[:, 1].min()]], c[sub_c[hits[:, 1].max()]]
        top, bottom = float(r0), float(min(rows, r1 + step))
        left, right = float(c0), float(min(cols, c1 + step))
    else:  # the cells' own extent on the source
        cr, cc = np.nonzero(cells)
        half_r = geo.patch / geo.transform.scale_y / 2
        half_c = geo.patch / geo.transform.scale_x / 2
        top = float(np.clip(np.floor(geo.src_r[cr].min() + 0.5 - half_r), 0, rows - 1))
        bottom = float(np.clip(np.ceil(geo.src_r[cr].max() + 0.5 + half_r), top + 1, rows))
        left = float(np.clip(np.floor(geo.src_c[cc].min() + 0.5 - half_c), 0, cols - 1))
        right = float(np.clip(np.ceil(geo.src_c[cc].max() + 0.5 + half_c), left + 1, cols))
    return Region(left, top, right, bottom, basis, float(grid_map[seed]))


def label_regions(
    cam: np.ndarray,
    seg: np.ndarray | None,
    labels: Sequence[str],
    seg_classes: Sequence[str],
    transform: Transform,
    patch: int,
) -> list[Region | None]:
    """One region per label (see the module notes) from the token-grid maps of one image:
    ``cam`` [labels, h, w], ``seg`` [classes, h, w] logits or None. None for a label only when
    no cell of the grid lies on the image."""
    n_labels, h, w = cam.shape
    if n_labels != len(labels):
        raise ValueError(f"{n_labels} maps for {len(labels)} labels")
    geo = GridGeometry(transform, patch, h, w)
    candidates = geo.candidates(seg)
    if not candidates.any():
        return [None] * n_labels
    by_class = {normalise_name(name): k for k, name in enumerate(seg_classes)}
    out: list[Region | None] = []
    for k, label in enumerate(labels):
        m = cam[k]
        flat = int(np.argmax(np.where(candidates, m, -np.inf)))
        seed = (flat // w, flat % w)
        klass = by_class.get(normalise_name(label))
        if seg is not None and klass is not None and klass < seg.shape[0]:
            s = seg[klass]
            if s[seed] < 0.0:
                flat = int(np.argmax(np.where(geo.on_image, s, -np.inf)))
                own = (flat // w, flat % w)
                if s[own] >= 0.0:
                    out.append(_region(s, 0.0, own, geo, "segment"))
                    continue
            else:
                out.append(_region(s, 0.0, seed, geo, "segment"))
                continue
        lo = float(m[geo.on_image].min())
        threshold = lo + REGION_THRESHOLD * (float(m[seed]) - lo)
        out.append(_region(m, threshold, seed, geo, "cam"))
    return out
