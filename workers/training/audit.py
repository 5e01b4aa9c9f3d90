"""`pacs-agent adapters audit`: a bundle's metrics per subgroup, with gaps and flags.

Subgroups come from the DICOM header (Patient's Sex, age band, Manufacturer, View Position; see
`workers.training.data`). For each label, each subgroup gets its AUROC with a bootstrap 95% CI and
its gap to the overall AUROC; a subgroup is flagged when its CI excludes the overall figure (the
model does measurably better or worse there). With masks and a segmenter, mean Dice per class is
audited the same way. Groups smaller than `min_group` images are reported but never flagged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.models.bundle import BundleError, load_bundle
from workers.training.data import SUBGROUP_ATTRIBUTES, DataError, load_labelled_set
from workers.training.features import extract_features
from workers.training.metrics import Estimate, auroc_estimate, mean_estimate
from workers.training.train import dice_per_image, predict_probabilities

log = logging.getLogger(__name__)

__all__ = ["AuditRow", "audit_bundle"]


@dataclass
class AuditRow:
    metric: str  # "AUROC" or "Dice"
    target: str  # label or segmentation class
    attribute: str  # "overall", "sex", "age_band", "manufacturer", "view"
    group: str
    estimate: Estimate
    gap: float | None = None
    flagged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "target": self.target,
            "attribute": self.attribute,
            "group": self.group,
            **self.estimate.to_dict(),
            "gap": None if self.gap is None or not math.isfinite(self.gap) else self.gap,
            "flagged": self.flagged,
        }


@dataclass
class AuditReport:
    rows: list[AuditRow] = field(default_factory=list)
    n_images: int = 0
    bundle: str = ""

    @property
    def flagged(self) -> list[AuditRow]:
        return [r for r in self.rows if r.flagged]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "n_images": self.n_images,
            "rows": [r.to_dict() for r in self.rows],
            "flagged": [r.to_dict() for r in self.flagged],
        }

    def table(self) -> str:
        head = (
            f"{'metric':<6} {'target':<22} {'attribute':<12} {'group':<12} {'n':>4} "
            f"{'pos':>4} {'value':>6}  {'95% CI':<15} {'gap':>7}  flag"
        )
        lines = [f"subgroup audit of {self.bundle}: {self.n_images} images", head]
        for r in self.rows:
            e = r.estimate
            ci = f"[{_f(e.lo)}, {_f(e.hi)}]"
            gap = "" if r.gap is None or not math.isfinite(r.gap) else f"{r.gap:+.3f}"
            pos = "" if e.n_pos is None else str(e.n_pos)
            lines.append(
                f"{r.metric:<6} {r.target[:22]:<22} {r.attribute:<12} "
                f"{r.group[:12]:<12} {e.n:>4} {pos:>4} {_f(e.value):>6}  {ci:<15} "
                f"{gap:>7}  {'FLAG' if r.flagged else ''}"
            )
        return "\n".join(lines)


def _f(x: float) -> str:
    return "  n/a" if not math.isfinite(x) else f"{x:.3f}"


def audit_bundle(
    bundle_path: str | Path,
    data_dir: str | Path,
    labels_csv: str | Path,
    masks_dir: str | Path | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_group: int = 5,
    cache_dir: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    classes: list[str] | None = None,
) -> AuditReport:
    bundle = load_bundle(bundle_path)
    if bundle.classifier is None and bundle.segmenter is None:
        raise BundleError(f"bundle {bundle.name} has no classifier or segmenter to audit")
    data = load_labelled_set(
        data_dir, labels_csv, masks_dir, classes=classes or (bundle.seg_classes or None)
    )
    columns = [lab for lab in data.labels if lab in bundle.labels]
    if bundle.classifier is not None and not columns and not data.classes:
        raise DataError(f"no CSV column matches the bundle's labels {bundle.labels}")
    feats = extract_features(bundle, data.samples, cache_dir, device=device, dtype=dtype)
    report = AuditReport(n_images=len(data.samples), bundle=f"{bundle.name} {bundle.version}")
    groups = {attr: np.array([s.tags[attr] for s in data.samples]) for attr in SUBGROUP_ATTRIBUTES}

    if bundle.classifier is not None and columns:
        probs = predict_probabilities(bundle.classifier, feats.image_features)
        for label in columns:
            y = data.y[:, data.labels.index(label)]
            p = probs[:, bundle.labels.index(label)]
            ok = np.isfinite(y)
            overall = auroc_estimate(y[ok], p[ok], n_boot, seed)
            report.rows.append(AuditRow("AUROC", label, "overall", "all", overall))
            for attr, values in groups.items():
                for g in sorted(set(values[ok])):
                    sel = ok & (values == g)
                    est = auroc_estimate(y[sel], p[sel], n_boot, seed)
                    report.rows.append(_row("AUROC", label, attr, g, est, overall, min_group))

    if bundle.segmenter is not None and data.classes:
        idx = np.array([i for i, s in enumerate(data.samples) if s.mask_path is not None])
        per_image = dice_per_image(
            bundle.segmenter,
            feats,
            data,
            idx,
            bundle.preprocessing.size,
            bundle.encoder_config.patch_size,
        )
        for cls, (where, dice_values) in per_image.items():
            v = np.array(dice_values)
            overall = mean_estimate(v, n_boot, seed)
            report.rows.append(AuditRow("Dice", cls, "overall", "all", overall))
            for attr, all_values in groups.items():
                vals = all_values[np.array(where, dtype=int)]
                for g in sorted(set(vals)):
                    est = mean_estimate(v[vals == g], n_boot, seed)
                    report.rows.append(_row("Dice", cls, attr, g, est, overall, min_group))
    log.info("audit: %d rows, %d flagged", len(report.rows), len(report.flagged))
    return report


def _row(
    metric: str,
    target: str,
    attr: str,
    group: str,
    est: Estimate,
    overall: Estimate,
    min_group: int,
) -> AuditRow:
    gap = est.value - overall.value
    flagged = est.n >= min_group and math.isfinite(overall.value) and est.excludes(overall.value)
    return AuditRow(metric, target, attr, str(group), est, gap, flagged)
