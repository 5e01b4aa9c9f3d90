"""`pacs-agent adapters train`: linear adapters on frozen features -> a new, evaluated bundle."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.imaging import letterbox_transform
from workers.models.bundle import (
    load_bundle,
    save_adapter,
    write_derived_bundle,
)
from workers.training.data import (
    DataError,
    LabelledSet,
    load_labelled_set,
    read_mask,
    split_indices,
)
from workers.training.features import FeatureTable, extract_features
from workers.training.heads import mask_targets, train_classifier, train_segmenter
from workers.training.metrics import Estimate, auroc_estimate, dice, mean_estimate

log = logging.getLogger(__name__)

__all__ = ["TrainOptions", "TrainReport", "train_adapters"]


@dataclass
class TrainOptions:
    test_fraction: float = 0.3
    seed: int = 0
    weight_decay: float = 1e-3
    optimizer: str = "lbfgs"
    max_iter: int = 300
    n_boot: int = 1000
    classes: list[str] | None = None
    label_columns: list[str] | None = None
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    name: str | None = None
    version: str | None = None
    link_mode: str = "link"


@dataclass
class TrainReport:
    bundle: Path
    n_train: int
    n_test: int
    auroc: dict[str, Estimate] = field(default_factory=dict)
    dice: dict[str, Estimate] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "auroc": {k: v.to_dict() for k, v in self.auroc.items()},
            "dice": {k: v.to_dict() for k, v in self.dice.items()},
            "thresholds": self.thresholds,
        }

    def table(self) -> str:
        lines = [
            f"held-out evaluation: {self.n_train} train / {self.n_test} test images",
            f"{'label':<28} {'metric':<6} {'value':>6}  {'95% CI':<15} {'n':>4} {'pos':>4}",
        ]
        for label, e in self.auroc.items():
            lines.append(
                f"{label:<28} {'AUROC':<6} {_f(e.value):>6}  "
                f"[{_f(e.lo)}, {_f(e.hi)}]{'':<1} {e.n:>4} {e.n_pos or 0:>4}"
            )
        for cls, e in self.dice.items():
            lines.append(
                f"{cls:<28} {'Dice':<6} {_f(e.value):>6}  "
                f"[{_f(e.lo)}, {_f(e.hi)}]{'':<1} {e.n:>4} {'':>4}"
            )
        return "\n".join(lines)


def _f(x: float) -> str:
    return "  n/a" if not math.isfinite(x) else f"{x:.3f}"


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold that maximises sensitivity + specificity on (y, p)."""
    ok = np.isfinite(y)
    y, p = y[ok].astype(bool), p[ok]
    if y.all() or not y.any():
        return 0.5
    best, best_t = -1.0, 0.5
    for t in np.unique(p):
        pred = p >= t
        j = pred[y].mean() + (~pred[~y]).mean()
        if j > best:
            best, best_t = j, float(t)
    return float(np.clip(best_t, 0.0, 1.0))


def predict_probabilities(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Sigmoid of a `ClassificationHead`'s logits on precomputed [N, 2D] features."""
    with torch.no_grad():
        logits = head.linear(torch.from_numpy(features.astype(np.float32)))  # type: ignore[operator]
    return torch.sigmoid(logits).numpy()


def segment_logits(head: torch.nn.Module, patches: np.ndarray) -> np.ndarray:
    """A `LinearSegHead`'s logits on one image's patch tokens [P, D] -> [C, P]."""
    with torch.no_grad():
        out = head.linear(torch.from_numpy(patches.astype(np.float32)))  # type: ignore[operator]
    return out.T.numpy()


def dice_per_image(
    head: torch.nn.Module,
    feats: FeatureTable,
    data: LabelledSet,
    indices: np.ndarray,
    size: int,
    patch: int,
) -> dict[str, tuple[list[int], list[float]]]:
    """(image indices, Dice values) of each class at source resolution, on every image whose
    mask holds that class (an image without the class says nothing about overlap; false
    positives there show in the classifier's specificity instead)."""
    h, w = feats.grid
    extent = (float(h * patch), float(w * patch))
    out: dict[str, tuple[list[int], list[float]]] = {c: ([], []) for c in data.classes}
    for i in indices:
        s = data.samples[i]
        if s.mask_path is None:
            continue
        shape = feats.shapes[i]
        truth = read_mask(s.mask_path, shape, len(data.classes))
        logits = segment_logits(head, feats.patches[i]).reshape(-1, h, w)
        pred = letterbox_transform(shape, size).to_source(logits, extent=extent) >= 0.0
        for k, c in enumerate(data.classes):
            if truth[k].any():
                out[c][0].append(int(i))
                out[c][1].append(dice(pred[k], truth[k]))
    return out


def train_adapters(
    bundle_path: str | Path,
    data_dir: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    masks_dir: str | Path | None = None,
    options: TrainOptions | None = None,
) -> TrainReport:
    opt = options or TrainOptions()
    bundle = load_bundle(bundle_path)
    data = load_labelled_set(
        data_dir, labels_csv, masks_dir, label_columns=opt.label_columns, classes=opt.classes
    )
    feats = extract_features(
        bundle,
        data.samples,
        opt.cache_dir,
        device=opt.device,
        dtype=opt.dtype,
        batch_size=opt.batch_size,
    )
    train, test = split_indices(data.samples, opt.test_fraction, opt.seed)
    cfg = bundle.encoder_config
    x = feats.image_features
    y = data.y
    fit_kw: dict[str, Any] = dict(
        weight_decay=opt.weight_decay, optimizer=opt.optimizer, max_iter=opt.max_iter, seed=opt.seed
    )
    out_root = Path(out)
    report = TrainReport(
        bundle=out_root, n_train=len(train), n_test=len(test), cache_hits=feats.cache_hits
    )

    # classifier
    for k, label in enumerate(data.labels):
        known = y[train, k][np.isfinite(y[train, k])]
        if len(np.unique(known)) < 2:
            raise DataError(f"label {label!r} has a single class in the training split")
    classifier = train_classifier(x[train], y[train], cfg.hidden_size, **fit_kw)
    p_train = predict_probabilities(classifier, x[train])
    p_test = predict_probabilities(classifier, x[test])
    for k, label in enumerate(data.labels):
        report.thresholds[label] = round(youden_threshold(y[train, k], p_train[:, k]), 6)
        ok = np.isfinite(y[test, k])
        report.auroc[label] = auroc_estimate(y[test, k][ok], p_test[ok, k], opt.n_boot, opt.seed)

    new_adapters: dict[str, dict[str, Any]] = {
        "classifier": save_adapter(
            classifier,
            out_root,
            "classifier",
            labels=data.labels,
            thresholds=[report.thresholds[lab] for lab in data.labels],
        )
    }

    # segmenter
    if data.classes:
        size, patch = bundle.preprocessing.size, cfg.patch_size
        with_mask = np.array([i for i in train if data.samples[i].mask_path is not None])
        if len(with_mask) == 0:
            raise DataError("no training image has a mask")
        targets = np.stack(
            [
                mask_targets(
                    read_mask(
                        data.samples[i].mask_path,  # type: ignore[arg-type]
                        feats.shapes[i],
                        len(data.classes),
                    ),
                    size,
                    feats.grid,
                    patch,
                )
                for i in with_mask
            ]
        )
        segmenter = train_segmenter(feats.patches[with_mask], targets, cfg.hidden_size, **fit_kw)
        per_image = dice_per_image(segmenter, feats, data, test, size, patch)
        for c, (_, values) in per_image.items():
            report.dice[c] = mean_estimate(np.array(values), opt.n_boot, opt.seed)
        new_adapters["segmenter"] = save_adapter(
            segmenter, out_root, "segmenter", classes=data.classes
        )

    digest = hashlib.sha256(
        "".join(a["sha256"] for a in new_adapters.values()).encode()
    ).hexdigest()[:8]
    parent_version = str(bundle.manifest.get("version", "0"))
    updates: dict[str, Any] = {
        "name": opt.name or bundle.name,
        "version": opt.version or f"{parent_version}+adapters.{digest}",
        "training": {
            "recipe": "linear probe on frozen features (CLS + mean patch token; patch tokens "
            "for segmentation), standardised, BCE + L2",
            "optimizer": opt.optimizer,
            "weight_decay": opt.weight_decay,
            "seed": opt.seed,
            "test_fraction": opt.test_fraction,
            "n_images": len(data.samples),
            "prevalence": {lab: _prevalence(y[:, k]) for k, lab in enumerate(data.labels)},
            "feature_fingerprint": bundle.encoder_fingerprint,
        },
        "evaluation": report.to_dict(),
    }
    write_derived_bundle(
        bundle.root, out_root, new_adapters=new_adapters, updates=updates, mode=opt.link_mode
    )
    load_bundle(out_root)  # the result must verify and load
    log.info("trained bundle written to %s", out_root)
    return report


def _prevalence(col: np.ndarray) -> float | None:
    ok = np.isfinite(col)
    return round(float(col[ok].mean()), 4) if ok.any() else None
