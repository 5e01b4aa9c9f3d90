"""The report draft every SR carries: Findings and Impression, for the radiologist to review.

Built by rule, deterministically, from what the job produced: the findings (label, probability,
threshold, image), the study's triage level, where each positive finding lies on its image (its
region's box, else its point, named by image thirds: "upper left", "centre", ...) and the
segmented regions (class and share of the image). Same inputs, same text: findings are ordered by
image (the order of the sources) then label, and numbers are rounded. Images are named by their
place and Instance Number, never by patient data. A DEMO (random-weight) bundle says so in the
first line of both texts.

When the bundle has a report-generation adapter (``workers.models.report_adapter``), the runner
puts its text for each image in ``ImageResult.extra[GENERATED_TEXT_KEY]``; the draft carries it
next to the rule-based texts, marked as machine-generated and unverified.

In the SR (:func:`draft_content`): a CONTAINER (121362, DCM, "Preliminary report") holding

- TEXT (121106, DCM, "Comment"): "DRAFT for radiologist review - not verified ...";
- TEXT (59776-5, LN, "Findings") and TEXT (19005-8, LN, "Impressions");
- per image with generated text: TEXT (111412, DCM, "Narrative Summary") "MACHINE-GENERATED,
  UNVERIFIED ...: <text>", INFERRED FROM the source IMAGE.

Only CONTAINER, TEXT and IMAGE items with CONTAINS / INFERRED FROM, so the same container fits a
TID 1500 Comprehensive 3D SR and a Basic Text SR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from workers.dicom_out import common
from workers.results import AlgorithmInfo, Finding, ImageResult

__all__ = [
    "DRAFT_CONCEPT",
    "GENERATED_CONCEPT",
    "GENERATED_TEXT_KEY",
    "GeneratedText",
    "ReportDraft",
    "build_draft",
    "draft_content",
    "draft_from_results",
    "place_name",
]

# ImageResult.extra key holding the report adapter's text for the image.
GENERATED_TEXT_KEY = "report_text"
DRAFT_CONCEPT = codes.DCM.PreliminaryReport  # (121362, DCM, "Preliminary report")
GENERATED_CONCEPT = codes.DCM.NarrativeSummary  # (111412, DCM, "Narrative Summary")
DRAFT_NOTE = "DRAFT for radiologist review - not verified"
GENERATED_NOTE = "MACHINE-GENERATED, UNVERIFIED"
# Longest text kept from a report adapter (a TEXT value is UT; this bounds what a model writes).
MAX_GENERATED_CHARS = 1000
_ROWS = ("upper", "middle", "lower")
_COLUMNS = ("left", "centre", "right")


@dataclass(frozen=True)
class GeneratedText:
    """A report adapter's text for one image."""

    source_sop_instance_uid: str
    text: str


@dataclass(frozen=True)
class ReportDraft:
    findings: str
    impression: str
    note: str
    generated: tuple[GeneratedText, ...] = ()


def place_name(column: float, row: float, columns: int, rows: int) -> str:
    """Which ninth of the image a (column, row) lies in, in image terms: "upper left", "centre",
    "lower right" ... (image left is the viewer's left, not the patient's side)."""
    r = min(2, max(0, int(3 * row / max(rows, 1))))
    c = min(2, max(0, int(3 * column / max(columns, 1))))
    return "centre" if (r, c) == (1, 1) else f"{_ROWS[r]} {_COLUMNS[c]}"


def _where(finding: Finding, source: Dataset) -> str | None:
    rows, cols = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    if not rows or not cols:
        return None
    region = getattr(finding, "region", None)
    if region is not None:
        column, row = (region.left + region.right) / 2, (region.top + region.bottom) / 2
    elif finding.point is not None:
        column, row = finding.point[0] + 0.5, finding.point[1] + 0.5
    else:
        return None
    return f"image {place_name(column, row, cols, rows)}"


def _image_names(sources: Sequence[Dataset]) -> dict[str, str]:
    names: dict[str, str] = {}
    for n, source in enumerate(sources, start=1):
        number = source.get("InstanceNumber")
        names[str(source.SOPInstanceUID)] = (
            f"image {n} (instance {number})" if number not in (None, "") else f"image {n}"
        )
    return names


def build_draft(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    triage: str | None = None,
    *,
    segmented: Mapping[str, Sequence[tuple[str, float]]] | None = None,
    generated: Sequence[GeneratedText] = (),
) -> ReportDraft:
    """The draft of a report on ``findings`` (see the module notes).

    ``segmented``: SOP Instance UID -> [(segment class, share of the image 0..1)];
    ``generated``: report adapter texts per image.
    """
    names = _image_names(sources)
    order = {str(s.SOPInstanceUID): n for n, s in enumerate(sources)}
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    ranked = sorted(
        findings,
        key=lambda f: (order.get(f.source_sop_instance_uid, len(order)), f.label.lower()),
    )
    demo = f"{algorithm.disclaimer.upper()}. " if algorithm.is_demo else ""
    head = (
        f"{demo}{DRAFT_NOTE}. Drafted by rule from the AI results of {algorithm.name} "
        f"{algorithm.version}."
    )
    lines = [head]
    for uid in sorted({f.source_sop_instance_uid for f in ranked}, key=lambda u: order.get(u, 0)):
        mine = [f for f in ranked if f.source_sop_instance_uid == uid]
        parts = []
        for f in (f for f in mine if f.present):
            where = _where(f, by_uid[uid]) if uid in by_uid else None
            parts.append(
                f"{f.label} suspected (probability {f.probability:.2f}, threshold "
                f"{f.threshold:.2f}{', ' + where if where else ''})"
            )
        absent = [f.label for f in mine if not f.present]
        if absent:
            parts.append("not suggested: " + ", ".join(absent))
        for cls, share in (segmented or {}).get(uid, ()):
            parts.append(f"{cls} segmented ({100 * share:.0f}% of the image)")
        lines.append(f"{names.get(uid, 'an image')}: " + "; ".join(parts) + ".")

    positive = sorted({f.label for f in ranked if f.present}, key=str.lower)
    assessed = sorted({f.label for f in ranked}, key=str.lower)
    impression = [f"{demo}{DRAFT_NOTE}."]
    if triage is not None:
        impression.append(f"Triage level {triage.upper()}.")
    if positive:
        impression.append("Suspected: " + ", ".join(positive) + ".")
        rest = [label for label in assessed if label not in positive]
        if rest:
            impression.append("Not suggested: " + ", ".join(rest) + ".")
    else:
        impression.append(
            f"No finding reaches its threshold among the {len(assessed)} assessed "
            f"({', '.join(assessed)})."
        )
    impression.append("Confirm or reject each item against the images before signing.")
    texts = tuple(
        GeneratedText(g.source_sop_instance_uid, " ".join(g.text.split())[:MAX_GENERATED_CHARS])
        for g in sorted(generated, key=lambda g: order.get(g.source_sop_instance_uid, len(order)))
        if g.text.strip() and g.source_sop_instance_uid in by_uid
    )
    return ReportDraft(
        findings="\n".join(lines),
        impression=" ".join(impression),
        note=f"{demo}{DRAFT_NOTE}; built by rule from the findings, triage level and regions"
        + ("; machine-generated text is unverified" if texts else ""),
        generated=texts,
    )


def draft_from_results(
    sources: Sequence[Dataset],
    results: Sequence[ImageResult],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    triage: str | None,
) -> ReportDraft:
    """The draft of a job: segmented shares and generated texts read from ``results``."""
    segmented: dict[str, list[tuple[str, float]]] = {}
    generated: list[GeneratedText] = []
    for r in results:
        masks = np.asarray(r.masks)
        if masks.ndim == 3 and masks.shape[0] == len(r.segment_labels):
            shares = [
                (label, float(masks[k].mean()))
                for k, label in enumerate(r.segment_labels)
                if masks[k].any()
            ]
            if shares:
                segmented[r.source_sop_instance_uid] = shares
        text = r.extra.get(GENERATED_TEXT_KEY)
        if isinstance(text, str) and text.strip():
            generated.append(GeneratedText(r.source_sop_instance_uid, text))
    return build_draft(
        sources, findings, algorithm, triage, segmented=segmented, generated=generated
    )


def draft_content(
    draft: ReportDraft,
    sources: Sequence[Dataset],
    frames: Mapping[str, int] | None = None,
) -> hd.sr.ContainerContentItem:
    """The draft as an SR CONTAINER (see the module notes); ``frames`` names the analysed frame
    of each multi-frame source in its IMAGE reference."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    container = hd.sr.ContainerContentItem(name=DRAFT_CONCEPT, relationship_type=contains)
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=draft.note, relationship_type=contains),
        hd.sr.TextContentItem(
            name=codes.LN.Findings, value=draft.findings, relationship_type=contains
        ),
        # LN "Impressions", not DCM "Impression": a Basic Text SR already has one Impression
        # (the summary), which readers look up by name.
        hd.sr.TextContentItem(
            name=codes.LN.Impressions, value=draft.impression, relationship_type=contains
        ),
    ]
    names = _image_names(sources)
    for g in draft.generated:
        source = by_uid[g.source_sop_instance_uid]
        item = hd.sr.TextContentItem(
            name=GENERATED_CONCEPT,
            value=f"{GENERATED_NOTE} (report adapter, {names[g.source_sop_instance_uid]}): "
            f"{g.text}",
            relationship_type=contains,
        )
        frame = (frames or {}).get(g.source_sop_instance_uid)
        item.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.ImageContentItem(
                    name=codes.DCM.BestIllustrationOfFinding,
                    referenced_sop_class_uid=source.SOPClassUID,
                    referenced_sop_instance_uid=source.SOPInstanceUID,
                    referenced_frame_numbers=common.check_frame(source, frame),
                    relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
                )
            ]
        )
        items.append(item)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
