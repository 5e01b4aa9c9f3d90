"""All output objects for one job, in one place: which objects, their series and their UIDs.

Every object joins the source study in a series of its own kind, with the source's patient and
study attributes:

======  ==============================  ======  ==========================================
kind    object                          series  Series Description
======  ==============================  ======  ==========================================
sr      Comprehensive 3D SR (TID 1500)  9001    AI findings
        or Basic Text SR (setting)
seg     Segmentation, BINARY or         9002    AI segmentation
        FRACTIONAL (setting), per image
sc      heatmap Secondary Capture,      9003    AI heatmap
        per image
pm      Parametric Map (float heatmap)  9004    AI parametric map
        per image (setting, default on)
ko      Key Object Selection of the     9005    AI key images
        images with positive findings
        (setting, default off)
======  ==============================  ======  ==========================================

Series Descriptions end in " (DEMO)" for a random-weight bundle. UIDs derive from (source or
study UID, bundle name, bundle version, study version, kind), so a re-run of the same job
produces the same objects and the PACS keeps one copy; a non-default flavour (Basic Text SR,
FRACTIONAL SEG) is a kind of its own, so switching the setting never reuses a UID for another
SOP Class.

Localisation: each finding of an image with a non-empty segmentation is placed at the heatmap
peak *inside* the segmented region (the union of its masks), so its SR SCOORD lands on the
segmented anatomy; otherwise the runner's point (the heatmap peak) is kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from pydicom.dataset import Dataset

from pacs_agent.uids import derive_uid
from workers.results import AlgorithmInfo, Finding, ImageResult, OutputIdentity

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002
SC_SERIES_NUMBER = 9003
PM_SERIES_NUMBER = 9004
KO_SERIES_NUMBER = 9005

SERIES_DESCRIPTIONS = {
    "sr": "AI findings",
    "seg": "AI segmentation",
    "sc": "AI heatmap",
    "pm": "AI parametric map",
    "ko": "AI key images",
}

SrFlavour = Literal["tid1500", "basic-text"]
SegType = Literal["binary", "fractional"]
SR_FLAVOURS: tuple[str, ...] = ("tid1500", "basic-text")
SEG_TYPES: tuple[str, ...] = ("binary", "fractional")

# ImageResult.extra key under which a runner may hand over per-class probabilities
# (n_classes, rows, columns) in [0, 1] for a FRACTIONAL SEG; without it the masks are written.
SEG_PROBABILITIES_KEY = "seg_probabilities"


@dataclass(frozen=True)
class OutputOptions:
    """Which objects to produce; read from settings by the pipeline."""

    sr_flavour: SrFlavour = "tid1500"
    seg_type: SegType = "binary"
    parametric_map: bool = True
    key_objects: bool = False

    def __post_init__(self) -> None:
        if self.sr_flavour not in SR_FLAVOURS:
            raise ValueError(f"sr_flavour must be one of {SR_FLAVOURS}, got {self.sr_flavour!r}")
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {self.seg_type!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> OutputOptions:
        defaults = cls()
        return cls(
            sr_flavour=cast(SrFlavour, getattr(settings, "sr_flavour", defaults.sr_flavour)),
            seg_type=cast(SegType, getattr(settings, "seg_type", defaults.seg_type)),
            parametric_map=bool(getattr(settings, "parametric_map", defaults.parametric_map)),
            key_objects=bool(getattr(settings, "key_objects", defaults.key_objects)),
        )


def localise(result: ImageResult) -> list[Finding]:
    """``result.findings`` with their point at the heatmap peak inside the segmented region.

    The point is the 0-based (column, row) of the hottest source pixel among those covered by
    any mask of the image. When no mask covers any pixel (or the shapes do not match), the
    findings are returned unchanged (the runner's point: the global heatmap peak).
    """
    if len({f.point for f in result.findings}) > 1:
        return list(result.findings)  # each finding has its own location (activation peaks)
    masks = np.asarray(result.masks)
    heat = np.asarray(result.heatmap, dtype=np.float32)
    if masks.ndim != 3 or masks.shape[0] == 0 or masks.shape[1:] != heat.shape:
        return list(result.findings)
    region = masks.astype(bool).any(axis=0)
    if not region.any():
        return list(result.findings)
    inside = np.where(region, heat, -np.inf)
    row, col = np.unravel_index(int(np.argmax(inside)), inside.shape)
    point = (float(col), float(row))
    return [dataclasses.replace(f, point=point) for f in result.findings]


def _seg_planes(result: ImageResult, seg_type: str) -> np.ndarray:
    if seg_type == "fractional":
        probabilities = result.extra.get(SEG_PROBABILITIES_KEY)
        if isinstance(probabilities, np.ndarray) and probabilities.shape == result.masks.shape:
            return probabilities
    return result.masks


def build_outputs(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    algorithm: AlgorithmInfo,
    study_version: int,
    options: OutputOptions | None = None,
    triage: str | None = None,
    *,
    created: dt.datetime | None = None,
) -> list[tuple[str, Dataset, str | None]]:
    """All output objects for one study: (kind, dataset, source SOP UID or None).

    ``triage`` is the study's triage level (``workers.pipeline.triage_level``), written in the
    SR when given. ``created`` fixes the objects' creation date-times (default: now).
    """
    from workers.dicom_out.ko import build_key_objects, positive_sources
    from workers.dicom_out.pm import build_parametric_map
    from workers.dicom_out.sc import build_heatmap_sc
    from workers.dicom_out.seg import build_seg
    from workers.dicom_out.sr import build_sr
    from workers.dicom_out.text_sr import build_text_sr

    options = options or OutputOptions()
    if not sources:
        raise ValueError("build_outputs needs at least one source")
    study_uid = str(sources[0].StudyInstanceUID)
    key = (algorithm.name, algorithm.version, str(study_version))
    suffix = " (DEMO)" if algorithm.is_demo else ""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    when = created or dt.datetime.now()

    def identity(root: str, kind: str, series_number: int, n: int, name: str) -> OutputIdentity:
        return OutputIdentity(
            derive_uid(study_uid, *key, f"{kind}-series"),
            derive_uid(root, *key, kind),
            series_number,
            n,
            f"{SERIES_DESCRIPTIONS[name]}{suffix}",
        )

    seg_kind = "seg" if options.seg_type == "binary" else "seg-fractional"
    outputs: list[tuple[str, Dataset, str | None]] = []
    for n, r in enumerate(results, start=1):
        src_uid = r.source_sop_instance_uid
        src = by_uid[src_uid]
        if len(r.segment_labels) > 0 and np.asarray(r.masks).shape[0] > 0:
            seg = build_seg(
                src,
                _seg_planes(r, options.seg_type),
                r.segment_labels,
                algorithm,
                identity(src_uid, seg_kind, SEG_SERIES_NUMBER, n, "seg"),
                segmentation_type=options.seg_type,
                created=when,
            )
            outputs.append(("seg", seg, src_uid))
        sc = build_heatmap_sc(
            src,
            r.display,
            r.heatmap,
            algorithm,
            identity(src_uid, "sc", SC_SERIES_NUMBER, n, "sc"),
            created=when,
        )
        outputs.append(("sc", sc, src_uid))
        if options.parametric_map:
            pm = build_parametric_map(
                src,
                r.heatmap,
                algorithm,
                identity(src_uid, "pm", PM_SERIES_NUMBER, n, "pm"),
                created=when,
            )
            outputs.append(("pm", pm, src_uid))

    analysed = [by_uid[r.source_sop_instance_uid] for r in results]
    findings = [f for r in results for f in localise(r)]
    if findings:
        if options.sr_flavour == "tid1500":
            sr = build_sr(
                analysed,
                findings,
                algorithm,
                identity(study_uid, "sr", SR_SERIES_NUMBER, 1, "sr"),
                triage=triage,
                created=when,
            )
        else:
            sr = build_text_sr(
                analysed,
                findings,
                algorithm,
                identity(study_uid, "sr-basic-text", SR_SERIES_NUMBER, 1, "sr"),
                triage=triage,
                created=when,
            )
        outputs.insert(0, ("sr", sr, None))
    else:
        logger.info("study %s: no findings (bundle without classifier), no SR", study_uid)
    if options.key_objects and positive_sources(analysed, findings):
        ko = build_key_objects(
            analysed,
            findings,
            algorithm,
            identity(study_uid, "ko", KO_SERIES_NUMBER, 1, "ko"),
            created=when,
        )
        outputs.append(("ko", ko, None))
    return outputs
