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

Multi-frame sources (XA, RF, Enhanced XA, Enhanced XRF, or any image with Number of Frames >
1), per kind; the analysed frame (``workers.imaging.analysed_frame``: Representative Frame
Number, else the middle frame) is passed in ``frames`` and recorded in ``Result.source_frame``:

======  ===============================================================================
sr      written; the finding's IMAGE references (Source of Measurement, SCOORD, Basic Text
        SR's Best illustration) carry Referenced Frame Number
sc      written from the analysed frame; Source Image Sequence and Referenced Image Sequence
        carry its Referenced Frame Number
seg     skipped for that image (reason in the job's events): highdicom 0.28 makes a SEG of a
        multi-frame source only with a Frame of Reference and per-frame plane positions,
        which X-ray multi-frame images do not have
pm      skipped for that image, for the same reason
ko      written; the multi-frame image is selected as a whole instance
======  ===============================================================================

Isolation: each object of each image is built on its own. One that cannot be built (a writer
refusing the source, a multi-frame source for SEG/PM) is left out and listed in
``OutputSet.skipped`` with a reason that holds UIDs and our own words only (never a value of
the source dataset), and the other images' objects are still made. An image whose findings a
report cannot hold is left out of the report the same way.

Report draft: the SR (either flavour) carries ``workers.report_draft``'s draft of the job's
findings, triage and segmented regions, with the report adapter's text per image when the
runner put one in ``ImageResult.extra["report_text"]``.

Localisation: each finding of an image with a non-empty segmentation is placed at the heatmap
peak *inside* the segmented region (the union of its masks), so its SR SCOORD lands on the
segmented anatomy; otherwise the runner's point (the heatmap peak) is kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydicom.dataset import Dataset

from pacs_agent.uids import derive_uid
from workers.dicom_out import common
from workers.results import AlgorithmInfo, Finding, ImageResult, OutputIdentity

if TYPE_CHECKING:
    from workers.dicom_out.sr import SimilarPrior

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


@dataclass(frozen=True)
class OutputSkip:
    """One object not made: its kind, the source image (None: the study's report) and why."""

    kind: str
    source_sop_instance_uid: str | None
    reason: str

    def describe(self) -> str:
        where = self.source_sop_instance_uid or "study"
        return f"{self.kind} for {where}: {self.reason}"


@dataclass
class OutputSet:
    """The objects made for one study, the ones left out, and the analysed frames."""

    outputs: list[tuple[str, Dataset, str | None]]
    skipped: list[OutputSkip]
    frames: dict[str, int]
    # Images (SOP Instance UIDs) that got no object at all: neither an object of their own nor a
    # place in the report.
    images_without_outputs: list[str]


def skip_reason(exc: BaseException, kind: str = "writer") -> str:
    """A reason to record for an object that was not made, without patient data
    (``workers.reasons.reason_for``: our writers' own texts are kept, a DICOM library's are
    withheld since they may quote header values)."""
    from workers.reasons import reason_for

    if isinstance(exc, common.MultiFrameSource):
        return "multi-frame source: not made from one frame (highdicom needs plane positions)"
    return reason_for(exc, f"{kind} writer")


def build_outputs(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    algorithm: AlgorithmInfo,
    study_version: int,
    options: OutputOptions | None = None,
    triage: str | None = None,
    *,
    frames: Mapping[str, int] | None = None,
    created: dt.datetime | None = None,
) -> list[tuple[str, Dataset, str | None]]:
    """All output objects for one study: (kind, dataset, source SOP UID or None).

    The objects of :func:`build_output_set`; what could not be made is left out (logged).
    """
    return build_output_set(
        sources,
        results,
        algorithm,
        study_version,
        options,
        triage,
        frames=frames,
        created=created,
    ).outputs


def build_output_set(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    algorithm: AlgorithmInfo,
    study_version: int,
    options: OutputOptions | None = None,
    triage: str | None = None,
    *,
    frames: Mapping[str, int] | None = None,
    created: dt.datetime | None = None,
    similar_priors: Sequence[SimilarPrior] = (),
) -> OutputSet:
    """All output objects for one study, each image's built on its own (see the module notes).

    ``triage`` is the study's triage level (``workers.pipeline.triage_level``), written in the
    SR when given. ``frames`` maps the SOP Instance UID of each multi-frame source to the
    1-based frame its result was made from (required for those sources). ``created`` fixes the
    objects' creation date-times (default: now). ``similar_priors`` (``workers.similar_priors``)
    go into a TID 1500 SR, those of the images in the report; a Basic Text SR has no NUM item
    for their distance and leaves them out.
    """
    from workers.dicom_out.ko import build_key_objects, positive_sources
    from workers.dicom_out.pm import build_parametric_map
    from workers.dicom_out.sc import build_heatmap_sc
    from workers.dicom_out.seg import build_seg
    from workers.dicom_out.sr import build_sr, check_inputs
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
    frame_of = {k: int(v) for k, v in (frames or {}).items()}
    outputs: list[tuple[str, Dataset, str | None]] = []
    skipped: list[OutputSkip] = []

    def attempt(kind: str, src_uid: str | None, make: Callable[[], Dataset]) -> bool:
        try:
            outputs.append((kind, make(), src_uid))
            return True
        except Exception as exc:
            reason = skip_reason(exc, kind)
            skipped.append(OutputSkip(kind, src_uid, reason))
            # A multi-frame source's SEG / PM are left out by design (info); anything else
            # is a writer refusing a result (warning).
            logger.log(
                logging.INFO if isinstance(exc, common.MultiFrameSource) else logging.WARNING,
                "study %s: %s not made for %s: %s",
                study_uid,
                kind,
                src_uid or "the study",
                type(exc).__name__,
            )
            logger.debug("writer failure", exc_info=True)
            return False

    in_report: list[ImageResult] = []
    for n, r in enumerate(results, start=1):
        src_uid = r.source_sop_instance_uid
        src = by_uid.get(src_uid)
        if src is None:
            skipped.append(OutputSkip("all", src_uid, "no source dataset for this result"))
            continue
        frame = frame_of.get(src_uid)
        if len(r.segment_labels) > 0 and np.asarray(r.masks).shape[0] > 0:
            attempt(
                "seg",
                src_uid,
                partial(
                    build_seg,
                    src,
                    _seg_planes(r, options.seg_type),
                    r.segment_labels,
                    algorithm,
                    identity(src_uid, seg_kind, SEG_SERIES_NUMBER, n, "seg"),
                    segmentation_type=options.seg_type,
                    created=when,
                ),
            )
        attempt(
            "sc",
            src_uid,
            partial(
                build_heatmap_sc,
                src,
                r.display,
                r.heatmap,
                algorithm,
                identity(src_uid, "sc", SC_SERIES_NUMBER, n, "sc"),
                frame=frame,
                created=when,
            ),
        )
        if options.parametric_map:
            attempt(
                "pm",
                src_uid,
                partial(
                    build_parametric_map,
                    src,
                    r.heatmap,
                    algorithm,
                    identity(src_uid, "pm", PM_SERIES_NUMBER, n, "pm"),
                    created=when,
                ),
            )
        # Can the report hold this image's findings? Checked alone, so that one bad image
        # leaves the report to the others.
        image_findings = localise(r)
        if image_findings:
            try:
                check_inputs([src], image_findings, triage, frame_of)
            except Exception as exc:
                skipped.append(OutputSkip("sr", src_uid, skip_reason(exc, "sr")))
                continue
        in_report.append(r)

    analysed = [by_uid[r.source_sop_instance_uid] for r in in_report]
    findings = [f for r in in_report for f in localise(r)]
    report_made = False
    if findings:
        # The report draft (rule-based text, and the report adapter's text when the bundle has
        # one): workers.report_draft.
        from workers.report_draft import draft_from_results

        draft = draft_from_results(analysed, in_report, findings, algorithm, triage)
        if options.sr_flavour == "tid1500":
            report_made = attempt(
                "sr",
                None,
                lambda: build_sr(
                    analysed,
                    findings,
                    algorithm,
                    identity(study_uid, "sr", SR_SERIES_NUMBER, 1, "sr"),
                    triage=triage,
                    frames=frame_of,
                    created=when,
                    draft=draft,
                    similar_priors=[
                        p
                        for p in similar_priors
                        if p.query_sop_instance_uid in {str(ds.SOPInstanceUID) for ds in analysed}
                    ],
                ),
            )
        else:
            report_made = attempt(
                "sr",
                None,
                lambda: build_text_sr(
                    analysed,
                    findings,
                    algorithm,
                    identity(study_uid, "sr-basic-text", SR_SERIES_NUMBER, 1, "sr"),
                    triage=triage,
                    frames=frame_of,
                    created=when,
                    draft=draft,
                ),
            )
        if report_made:
            outputs.insert(0, outputs.pop())  # the report first
    else:
        logger.info("study %s: no findings (bundle without classifier), no SR", study_uid)
    if options.key_objects and positive_sources(analysed, findings):
        attempt(
            "ko",
            None,
            lambda: build_key_objects(
                analysed,
                findings,
                algorithm,
                identity(study_uid, "ko", KO_SERIES_NUMBER, 1, "ko"),
                frames=frame_of,
                created=when,
            ),
        )
    covered = {src for _, _, src in outputs if src is not None}
    if report_made:
        covered |= {str(ds.SOPInstanceUID) for ds in analysed}
    return OutputSet(
        outputs=outputs,
        skipped=skipped,
        frames=frame_of,
        images_without_outputs=[
            r.source_sop_instance_uid for r in results if r.source_sop_instance_uid not in covered
        ],
    )
