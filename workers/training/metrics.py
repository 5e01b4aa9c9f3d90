"""Evaluation metrics in numpy: AUROC (Mann-Whitney, ties averaged), Dice, percentile bootstrap
confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Estimate", "auroc", "auroc_estimate", "bootstrap_ci", "dice", "mean_estimate"]


@dataclass(frozen=True)
class Estimate:
    """A metric with its percentile-bootstrap 95% CI (nan when undefined) and sample counts."""

    value: float
    lo: float
    hi: float
    n: int
    n_pos: int | None = None

    def excludes(self, x: float) -> bool:
        """The CI is defined and `x` lies outside it."""
        return math.isfinite(self.lo) and math.isfinite(self.hi) and not self.lo <= x <= self.hi

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # average 1-based rank of each tie group
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties 1/2.
    nan when only one class is present."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.shape} labels for {s.shape} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(indices)` over `n` items resampled with
    replacement; resamples where it is undefined (nan) are dropped, and the CI is nan when more
    than half are."""
    if n < 2 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < n_boot / 2:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def auroc_estimate(
    y_true: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> Estimate:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    lo, hi = bootstrap_ci(lambda idx: auroc(y[idx], s[idx]), len(y), n_boot, seed)
    return Estimate(auroc(y, s), lo, hi, n=len(y), n_pos=int(y.sum()))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction {a.shape} and truth {b.shape} differ in shape")
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / denom


def mean_estimate(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), n=0)
    lo, hi = bootstrap_ci(lambda idx: float(v[idx].mean()), len(v), n_boot, seed)
    return Estimate(float(v.mean()), lo, hi, n=len(v))
