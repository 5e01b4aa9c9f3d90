"""Plain result types passed between the model runner and the DICOM writers.

They carry numpy arrays in *source pixel geometry* (rows x columns of the source image), so a
writer never has to know how the model resized the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance of the model bundle that produced a result."""

    name: str  # e.g. "pacs-agent demo chest (RANDOM WEIGHTS)"
    version: str  # bundle version, e.g. "0.1.0"
    checksum: str  # sha256 of the bundle manifest
    manufacturer: str = "pacs-agent"
    software_version: str = "0.1.0"
    is_demo: bool = False  # random weights: every output must say so

    @property
    def disclaimer(self) -> str:
        if self.is_demo:
            return "DEMO - random weights - not for clinical use"
        return "AI output - for decision support, verify against the image"


@dataclass(frozen=True)
class Region:
    """Where a label's map puts it on one source image (``workers.localize``): a box in source
    pixel-edge coordinates, i.e. SCOORD image coordinates (0, 0) = the top-left corner of the
    top-left pixel; ``basis`` "cam" (its class-activation map) or "segment" (the mask of the
    segment class of the same name); ``peak`` the map's value at the seed cell (logit units)."""

    left: float
    top: float
    right: float
    bottom: float
    basis: str
    peak: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.left, self.top, self.right, self.bottom)

    @property
    def polyline(self) -> list[tuple[float, float]]:
        """The box as a closed POLYLINE: 5 (column, row) points, the first repeated last."""
        corners = [
            (self.left, self.top),
            (self.right, self.top),
            (self.right, self.bottom),
            (self.left, self.bottom),
        ]
        return [*corners, corners[0]]


@dataclass(frozen=True)
class Finding:
    """One classification label's outcome for one source image."""

    label: str  # e.g. "Pleural effusion"
    probability: float  # 0..1
    threshold: float
    source_sop_instance_uid: str
    # Optional localisation in source pixel coordinates (column, row), e.g. the heatmap peak.
    point: tuple[float, float] | None = None
    # Optional region of the label on this image (every label, positive or not); the SR draws
    # it for positive findings.
    region: Region | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class ImageResult:
    """Everything the model produced for one source image, in source geometry."""

    source_sop_instance_uid: str
    findings: list[Finding]
    # Segmentation: one boolean mask per class, shape (n_classes, rows, columns).
    masks: np.ndarray
    segment_labels: list[str]
    # Attention heatmap normalised to 0..1, shape (rows, columns).
    heatmap: np.ndarray
    # The windowed source image as the model saw it, 0..1, shape (rows, columns), MONOCHROME2
    # sense (bright = dense), used as the background of the secondary capture; from a
    # reduced-resolution decode (workers.imaging.decode_reduced) each side is ceil(side / 2^r),
    # and the SC writer expands it onto the source's pixels (imaging.expand_reduced).
    display: np.ndarray
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputIdentity:
    """Identity of one output object: given explicitly, never defaulted by a writer."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    series_description: str
