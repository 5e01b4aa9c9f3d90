"""Quality control: is this image what the model was made for?

Two optional bundle heads classify each image's view position and body part (XR-0's QC tasks).
`qc_refusal` compares their answers with the bundle's `intended` use, so that a lateral view or an
extremity sent to a PA chest model can be refused with a reason instead of analysed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from workers.results import ImageResult

__all__ = ["QC_LABELS", "QC_TASKS", "qc_refusal"]

# Default label sets of the QC heads (a bundle may name its own in the manifest).
QC_LABELS: dict[str, list[str]] = {
    "view": ["PA", "AP", "LATERAL"],
    "body_part": ["CHEST", "ABDOMEN", "EXTREMITY", "SKULL", "SPINE", "PELVIS"],
}
QC_TASKS = tuple(QC_LABELS)
DEFAULT_MIN_PROBABILITY = 0.5


def _norm(s: object) -> str:
    return str(s).strip().upper().replace(" ", "_")


def qc_refusal(
    result: ImageResult,
    intended: Mapping[str, Any],
    min_probability: float = DEFAULT_MIN_PROBABILITY,
) -> str | None:
    """A reason to refuse `result`'s image for a bundle whose manifest says `intended`
    (e.g. ``{"anatomy": "chest", "views": ["PA", "AP"]}``), or None when it fits or when nothing
    is known. Only a QC prediction with probability >= `min_probability` can refuse."""
    qc = result.extra.get("qc") if isinstance(result.extra, dict) else None
    if not isinstance(qc, Mapping):
        return None
    reasons: list[str] = []
    views_raw = intended.get("views")
    views: Sequence[object] = views_raw if isinstance(views_raw, list | tuple) else []
    view = qc.get("view")
    if views and view is not None:
        label, p = view
        if p >= min_probability and _norm(label) not in {_norm(v) for v in views}:
            reasons.append(
                f"view classified as {label} (p={p:.2f}); this model is for "
                f"{'/'.join(str(v) for v in views)} views"
            )
    anatomy = intended.get("anatomy")
    part = qc.get("body_part")
    if anatomy and part is not None:
        label, p = part
        allowed = anatomy if isinstance(anatomy, list | tuple) else [anatomy]
        if p >= min_probability and _norm(label) not in {_norm(a) for a in allowed}:
            reasons.append(
                f"body part classified as {label} (p={p:.2f}); this model is for "
                f"{'/'.join(str(a) for a in allowed)}"
            )
    return "; ".join(reasons) if reasons else None
