"""Comprehensive 3D SR writer: TID 1500 Measurement Report with one group per finding.

Each finding becomes a TID 1501 Measurement Group holding:

- Tracking Identifier and Tracking UID (derived from the output SOP Instance UID, so a retried
  job gives the same UIDs);
- Finding (the label's code) and a qualitative evaluation ``<finding> = Present | Absent``;
- TID 300 Measurement ``Probability`` in UCUM ``%`` (probability x 100, 2 decimals; OHIF prints
  "44.26 %"), with an INFERRED FROM SCOORD POINT on the source image when the finding has a
  point. Every group with a point keeps it, even when findings of one image share it: OHIF
  3.13 crashes on an SR with a measurement group that has no SCOORD (its
  ``_checkIfCanAddMeasurementsToDisplaySet`` reads ``measurement.coords[0]``), so dropping
  the point of some findings is not an option for OHIF users;
- a TEXT ``Comment`` (DCM 121106): the finding's name and outcome, e.g. "Pleural effusion
  (present)", which OHIF shows as the label of the drawn measurement;
- the source image (Source of Measurement) and TID 4019 Algorithm Identification (family
  Artificial Intelligence, name + disclaimer, version, parameters: bundle checksum, threshold).

Localization: a *positive* finding with a ``Finding.region`` (``workers.localize``: the box of
its class-activation map or matching segment around its peak) is written as a TID 1410 Planar
ROI Measurement Group instead: the same items (tracking, finding, evaluation, probability,
comment, algorithm) plus an Image Region (111030, DCM) SCOORD POLYLINE, the box as 5 points
closed on the first, in pixel-edge image coordinates, on the source image (and frame), which
viewers draw as the finding's outline. TID 1410 has no Source of Measurement (the region names
the image) and its probability carries no POINT (a TID 1410 measurement refers to the group's
region; the peak lies inside the box and stays in the job's result summary).

After the Imaging Measurements, a report-level Qualitative Evaluations container (TID 1500 row
12, (C0034375, UMLS, "Qualitative Evaluations")) holds:

- the study's triage level, when given: CODE ``Priority`` (SCT 260870009) = ``Routine`` (SCT
  373115008) | ``Urgency`` (SCT 103391001, "urgent") | ``Emergency`` (SCT 25876001,
  "critical"), see :data:`TRIAGE_CODES`;
- a plain-language TEXT ``Summary`` (DCM 121111) of the findings and triage, for viewers that
  show an SR as text only.

Similar prior images (setting ``PACS_AGENT_SR_SIMILAR_PRIORS``, given in ``similar_priors`` by
``workers.similar_priors``, which asks the agent's similarity index): after the report draft, a
report-level CONTAINER ``Similar prior images`` holding a TEXT ``Comment`` (what the list is and
is not) and one CONTAINER ``Similar prior`` per earlier image of another study, nearest first:

- IMAGE ``Similar prior image``: the prior's SOP Class and Instance UIDs;
- UIDREF ``Study Instance UID`` (110180, DCM): the prior's study;
- NUM ``Cosine distance`` in UCUM ``1`` (no units; 1 - cos of the two CLS embeddings, 0 is
  identical), rounded to 1e-6;
- IMAGE ``Source of Measurement`` (121112, DCM): the image of this study it resembles.

DICOM has no concept for "similar prior image" nor for a cosine distance, so these concept
names are private codes in ``99PACSAGENT`` (declared in the Coding Scheme Identification
Sequence): see :data:`SIMILAR_PRIORS`. The priors are listed in the Pertinent Other Evidence
Sequence (they belong to other studies), as PS3.3 C.17.2 asks of every instance the content
references. Only CONTAINER, TEXT, UIDREF, NUM and IMAGE items with CONTAINS: valid in a
Comprehensive 3D SR.

Multi-frame sources (XA, RF, Enhanced XA/XRF): a finding refers to the analysed frame
(``workers.imaging.analysed_frame``, passed in ``frames``): the group's Source of Measurement
IMAGE item and the SCOORD's selected IMAGE item carry its Referenced Frame Number (PS3.3
C.18.3.1: required for a multi-frame image when the reference is to some of its frames).

The disclaimer (``AlgorithmInfo.disclaimer``) also appears in the Device Observer Name, the
Algorithm Name, the Contributing Equipment description, the summary, and (by the caller) the
Series Description.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from pacs_agent.uids import derive_uid
from workers.dicom_out import common
from workers.results import AlgorithmInfo, Finding, OutputIdentity

if TYPE_CHECKING:
    from workers.report_draft import ReportDraft

logger = logging.getLogger(__name__)

# Finding label (normalised: lower case, single spaces) -> code. Labels not listed are coded in
# the private scheme ``common.PRIVATE_SCHEME`` (value: upper-case slug of the label, see
# ``common.private_code``), e.g. "Consolidation" -> (CONSOLIDATION, 99PACSAGENT, "Consolidation"),
# "Atelectasis" -> (ATELECTASIS, 99PACSAGENT, "Atelectasis"), since pydicom's dictionary has no
# SNOMED CT concept for them.
FINDING_CODES: dict[str, Code] = {
    "cardiomegaly": codes.SCT.Cardiomegaly,
    "pleural effusion": codes.SCT.PleuralEffusion,
    "effusion": codes.SCT.PleuralEffusion,  # chest X-ray label sets mean pleural effusion
    "pneumothorax": codes.SCT.Pneumothorax,
    "nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "lesion": codes.SCT.Lesion,
    "edema": codes.SCT.PulmonaryEdema,  # chest X-ray label sets mean pulmonary edema
    "pulmonary edema": codes.SCT.PulmonaryEdema,
    "fibrosis": codes.SCT.Fibrosis,
    "infiltrate": codes.DCM.Infiltrate,
    "infiltration": codes.DCM.Infiltrate,
    "opacity": codes.DCM.Opacity,
    "lung opacity": codes.DCM.Opacity,
}

# Modality of the source -> Procedure Reported (CID 100). Projection X-ray by default.
PROCEDURE_CODES: dict[str, Code] = {
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
    "RG": codes.cid100.XRUnspecifiedBodyRegion,
    "XA": codes.cid100.XRUnspecifiedBodyRegion,
    "RF": codes.cid100.XRUnspecifiedBodyRegion,
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
}


# Triage level (workers.pipeline.triage_level) -> value of the report-level Priority evaluation.
TRIAGE_CONCEPT = codes.SCT.Priority
TRIAGE_CODES: dict[str, Code] = {
    "routine": codes.SCT.Routine,
    "urgent": codes.SCT.Urgency,
    "critical": codes.SCT.Emergency,
}
# TID 1500 row 12: the report-level container of qualitative evaluations (not in pydicom's
# dictionary; UMLS is a standard coding scheme of PS3.16 Table 8-1, no declaration needed).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Similar prior images: no standard concept names exist (PS3.16 has neither a similar-image
# reference nor a cosine distance), hence private codes (values are SH: at most 16 characters).
SIMILAR_PRIORS = Code("SIMILAR-PRIORS", common.PRIVATE_SCHEME, "Similar prior images")
SIMILAR_PRIOR = Code("SIMILAR-PRIOR", common.PRIVATE_SCHEME, "Similar prior")
SIMILAR_PRIOR_IMAGE = Code("SIMILAR-IMAGE", common.PRIVATE_SCHEME, "Similar prior image")
COSINE_DISTANCE = Code("COSINE-DISTANCE", common.PRIVATE_SCHEME, "Cosine distance")
SIMILAR_NOTE = "MACHINE-GENERATED, UNVERIFIED"


@dataclass(frozen=True)
class SimilarPrior:
    """An earlier image of another study whose CLS embedding (same bundle) lies near one of this
    study's images, as the agent's index answered (``POST /api/similar/priors``)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    distance: float  # cosine distance, 1 - cos: 0 identical, 2 opposite
    query_sop_instance_uid: str  # the image of this study it resembles


def check_prior(prior: SimilarPrior, study_uid: str, source_uids: set[str]) -> None:
    """Raise ValueError unless ``prior`` can be written in the SR of ``study_uid`` whose images
    are ``source_uids``: UIDs valid, another study, a distance in [0, 2], a known query image."""
    for name in (
        "sop_instance_uid",
        "sop_class_uid",
        "series_instance_uid",
        "study_instance_uid",
        "query_sop_instance_uid",
    ):
        value = getattr(prior, name)
        if not isinstance(value, str) or not UID(value).is_valid:
            raise ValueError(f"similar prior: {name} is not a UID")
    if prior.study_instance_uid == study_uid:
        raise ValueError(f"similar prior {prior.sop_instance_uid} belongs to this study")
    d = prior.distance
    if not isinstance(d, numbers.Real) or not (math.isfinite(float(d)) and 0 <= float(d) <= 2):
        raise ValueError(f"similar prior {prior.sop_instance_uid}: distance {d!r} not in [0, 2]")
    if prior.query_sop_instance_uid not in source_uids:
        raise ValueError(
            f"similar prior {prior.sop_instance_uid}: its query image "
            f"{prior.query_sop_instance_uid} is not among the sources"
        )


def similar_priors_note(algorithm: AlgorithmInfo, count: int) -> str:
    """The Comment of the Similar prior images container: what the list is, and is not."""
    demo = (
        f" {algorithm.disclaimer}: with random weights, similarity reflects image statistics "
        "(size, exposure, collimation), not findings."
        if algorithm.is_demo
        else ""
    )
    return (
        f"{SIMILAR_NOTE}: the {count} earlier image(s) of other studies nearest to this "
        f"study's images by the image embedding of {algorithm.name} {algorithm.version} "
        "(cosine distance, 0 is identical). A similar image is not the same diagnosis." + demo
    )


def similar_priors_content(
    priors: Sequence[SimilarPrior],
    sources: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    frames: Mapping[str, int] | None = None,
) -> hd.sr.ContainerContentItem:
    """The Similar prior images container (see the module notes), nearest first."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    container = hd.sr.ContainerContentItem(name=SIMILAR_PRIORS, relationship_type=contains)
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=similar_priors_note(algorithm, len(priors)),
            relationship_type=contains,
        )
    ]
    for prior in sorted(priors, key=lambda p: (p.distance, p.sop_instance_uid)):
        query = by_uid[prior.query_sop_instance_uid]
        frame = (frames or {}).get(prior.query_sop_instance_uid)
        group = hd.sr.ContainerContentItem(name=SIMILAR_PRIOR, relationship_type=contains)
        group.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.ImageContentItem(
                    name=SIMILAR_PRIOR_IMAGE,
                    referenced_sop_class_uid=prior.sop_class_uid,
                    referenced_sop_instance_uid=prior.sop_instance_uid,
                    relationship_type=contains,
                ),
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.StudyInstanceUID,
                    value=prior.study_instance_uid,
                    relationship_type=contains,
                ),
                hd.sr.NumContentItem(
                    name=COSINE_DISTANCE,
                    value=round(float(prior.distance), 6),
                    unit=codes.UCUM.NoUnits,
                    relationship_type=contains,
                ),
                hd.sr.ImageContentItem(
                    name=codes.DCM.SourceOfMeasurement,
                    referenced_sop_class_uid=query.SOPClassUID,
                    referenced_sop_instance_uid=query.SOPInstanceUID,
                    referenced_frame_numbers=common.check_frame(query, frame),
                    relationship_type=contains,
                ),
            ]
        )
        items.append(group)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def prior_evidence(prior: SimilarPrior) -> Dataset:
    """The identity of a prior image, as the SR's evidence lists it (Pertinent Other Evidence)."""
    ds = Dataset()
    ds.StudyInstanceUID = prior.study_instance_uid
    ds.SeriesInstanceUID = prior.series_instance_uid
    ds.SOPClassUID = prior.sop_class_uid
    ds.SOPInstanceUID = prior.sop_instance_uid
    return ds


def finding_code(label: str) -> Code:
    """The code of a finding label (standard where pydicom has one, else private)."""
    return FINDING_CODES.get(common.normalise_label(label)) or common.private_code(label)


def procedure_codes(sources: Sequence[Dataset]) -> list[Code]:
    """Procedure Reported: one CID 100 code per distinct source modality."""
    out: list[Code] = []
    for source in sources:
        code = PROCEDURE_CODES.get(str(source.get("Modality", "")), codes.cid100.ImagingProcedure)
        if code not in out:
            out.append(code)
    return out


def summary_text(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    triage: str | None = None,
) -> str:
    """A plain-language summary of the findings, for people and for text-only viewers.

    Images are named by their place in ``sources`` (and Instance Number when known), never by
    patient data.
    """
    names: dict[str, str] = {}
    for n, source in enumerate(sources, start=1):
        number = source.get("InstanceNumber")
        names[str(source.SOPInstanceUID)] = (
            f"image {n} (instance {number})" if number not in (None, "") else f"image {n}"
        )

    def describe(finding: Finding) -> str:
        where = names.get(finding.source_sop_instance_uid, "an image")
        return (
            f"{finding.label} (probability {finding.probability:.2f}, threshold "
            f"{finding.threshold:.2f}, {where})"
        )

    positive = [describe(f) for f in findings if f.present]
    negative = [describe(f) for f in findings if not f.present]
    lines = [
        f"AI results of {algorithm.name} {algorithm.version}: {algorithm.disclaimer}.",
    ]
    if triage is not None:
        lines.append(f"Triage level: {triage.upper()}.")
    lines.append("Positive findings: " + ("; ".join(positive) if positive else "none") + ".")
    lines.append("Negative findings: " + ("; ".join(negative) if negative else "none") + ".")
    lines.append(
        f"{len(sources)} image(s) analysed. A finding is positive when its probability reaches "
        "its threshold. Not a diagnosis: verify against the images."
    )
    return "\n".join(lines)


def probability_percent(probability: float) -> float:
    """A probability (0..1) as the NUM value in UCUM ``%`` (0..100), rounded to 0.01 %."""
    return round(float(probability) * 100.0, 2)


def comment_text(finding: Finding, code: Code) -> str:
    """The group's Comment: the finding's name and outcome (what OHIF labels the point with)."""
    return f"{code.meaning} ({'present' if finding.present else 'absent'})"


def report_evaluations(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    triage: str | None,
) -> list[hd.sr.CodeContentItem | hd.sr.TextContentItem]:
    """The report-level items: triage (CODE, when known) and the summary (TEXT)."""
    items: list[hd.sr.CodeContentItem | hd.sr.TextContentItem] = []
    if triage is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=TRIAGE_CONCEPT,
                value=TRIAGE_CODES[triage],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Summary,
            value=summary_text(sources, findings, algorithm, triage),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return items


def check_inputs(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    triage: str | None,
    frames: Mapping[str, int] | None = None,
) -> list[Dataset]:
    """Validate the inputs of a report; return the sources' header copies.

    ``frames``: SOP Instance UID -> the analysed 1-based frame of each multi-frame source.
    """
    common.check_same_study(sources)
    common.check_triage(triage)
    if not findings:
        raise ValueError("a report needs at least one finding")
    headers = [common.source_header(s) for s in sources]
    by_uid: dict[str, Dataset] = {}
    for header in headers:
        common.check_frame(header, (frames or {}).get(str(header.SOPInstanceUID)))
        by_uid[str(header.SOPInstanceUID)] = header
    for finding in findings:
        _check_finding(finding, by_uid)
    return headers


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    triage: str | None = None,
    frames: Mapping[str, int] | None = None,
    created: dt.datetime | None = None,
    draft: ReportDraft | None = None,
    similar_priors: Sequence[SimilarPrior] = (),
) -> Dataset:
    """Build a Comprehensive 3D SR (TID 1500) with one measurement group per finding.

    Report draft: ``draft`` (``workers.report_draft``), else one built from the findings and
    triage, goes after the Qualitative Evaluations as a "Preliminary report" container.
    ``similar_priors`` (earlier images of other studies, ``workers.similar_priors``), when
    given, follow as a "Similar prior images" container; each must pass :func:`check_prior`.

    ``sources`` are the images the findings refer to (one study); every
    ``finding.source_sop_instance_uid`` must be one of them. ``finding.point`` is read as the
    0-based (column, row) array index of a source pixel and written as that pixel's centre,
    (column + 0.5, row + 0.5), in SCOORD image coordinates (PS3.3 C.18.6.1.1). ``triage`` is the
    study's triage level ("routine", "urgent", "critical"), written when given. ``frames``
    maps the SOP Instance UID of each multi-frame source to its analysed (1-based) frame,
    which the references name. ``created`` fixes the creation/content date-times (default: now).
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    headers = check_inputs(sources, findings, triage, frames)
    by_uid = {str(header.SOPInstanceUID): header for header in headers}
    study_uid = str(headers[0].StudyInstanceUID)
    for prior in similar_priors:
        check_prior(prior, study_uid, set(by_uid))
    if len({p.sop_instance_uid for p in similar_priors}) != len(similar_priors):
        raise ValueError("similar priors name the same image twice")

    when = created or dt.datetime.now()
    labelled_name = f"{algorithm.name} [{algorithm.disclaimer}]"

    groups = []
    uses_private = False
    for index, finding in enumerate(findings, start=1):
        source = by_uid[finding.source_sop_instance_uid]
        frame_numbers = common.check_frame(source, (frames or {}).get(str(source.SOPInstanceUID)))
        code = finding_code(finding.label)
        uses_private |= code.scheme_designator == common.PRIVATE_SCHEME
        algorithm_id = hd.sr.AlgorithmIdentification(
            name=labelled_name,
            version=algorithm.version,
            parameters=[
                f"{key}={value}" for key, value in common.algorithm_parameters(algorithm).items()
            ]
            + [f"threshold={finding.threshold:.6g}"],
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=algorithm.manufacturer,
        )
        coordinates = None
        if finding.point is not None:
            column, row = finding.point
            coordinates = [
                hd.sr.CoordinatesForMeasurement(
                    graphic_type=hd.sr.GraphicTypeValues.POINT,
                    # array indices -> centre of that pixel in SCOORD image coordinates
                    graphic_data=np.array([[column + 0.5, row + 0.5]], dtype=float),
                    source_image=hd.sr.SourceImageForRegion.from_source_image(
                        source, referenced_frame_numbers=frame_numbers
                    ),
                )
            ]
        probability = hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=probability_percent(finding.probability),
            unit=codes.UCUM.Percent,
            referenced_coordinates=coordinates,
        )
        tracking = hd.sr.TrackingIdentifier(
            uid=derive_uid(
                identity.sop_instance_uid,
                "finding",
                str(index),
                finding.label,
                finding.source_sop_instance_uid,
            ),
            identifier=f"{finding.label} #{index}",
        )
        evaluation = hd.sr.QualitativeEvaluation(
            name=code,
            value=codes.SCT.Present if finding.present else codes.SCT.Absent,
        )
        group: (
            hd.sr.MeasurementsAndQualitativeEvaluations
            | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        )
        if finding.present and finding.region is not None:
            # TID 1410: the finding's region (a closed POLYLINE box) is the group's Image
            # Region, which viewers draw (OHIF reads it as the measurement's outline).
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=region_item(finding, source, frame_numbers),
                finding_type=code,
                algorithm_id=algorithm_id,
                # TID 1410 measurements refer to the group's region, not to a SCOORD of
                # their own (highdicom refuses one): the peak point is not repeated here.
                # The NUM is named by the finding (its value: the finding's probability in
                # %): OHIF labels a TID 1410 region only from its NUM concept names, so a
                # NUM named "Probability" would draw the box without saying what it shows.
                measurements=[
                    hd.sr.Measurement(
                        name=code,
                        value=probability_percent(finding.probability),
                        unit=codes.UCUM.Percent,
                    )
                ],
                qualitative_evaluations=[evaluation],
            )
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=code,
                algorithm_id=algorithm_id,
                measurements=[probability],
                qualitative_evaluations=[evaluation],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup.from_source_image(
                        source, referenced_frame_numbers=frame_numbers
                    )
                ],
            )
        # (121106, DCM, "Comment"): the finding's name, which OHIF shows as the text of the
        # drawn measurement ("Pleural effusion (present): Probability: 44.26 %").
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=comment_text(finding, code),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        groups.append(group)

    observer = common.device_observer(algorithm)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_codes(headers),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        report_evaluations(headers, findings, algorithm, triage)
    )
    report[0].ContentSequence.append(evaluations)
    # Report draft (Findings / Impression, for radiologist review): workers.report_draft.
    from workers.report_draft import build_draft, draft_content

    draft = draft or build_draft(headers, findings, algorithm, triage)
    report[0].ContentSequence.append(draft_content(draft, headers, frames))
    if similar_priors:
        report[0].ContentSequence.append(
            similar_priors_content(similar_priors, headers, algorithm, frames)
        )
        uses_private = True

    sr = hd.sr.Comprehensive3DSR(
        # the study's own images first (highdicom copies patient and study from the first)
        evidence=[*headers, *(prior_evidence(p) for p in similar_priors)],
        content=report[0],
        **common.identity_kwargs(identity, algorithm, when),
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=common.private_scheme_items() if uses_private else None,
    )
    common.stamp_datetimes(sr, when)
    logger.info(
        "built SR %s (%d findings, triage %s, %d similar priors) for %d source(s)",
        identity.sop_instance_uid,
        len(findings),
        triage,
        len(similar_priors),
        len(headers),
    )
    return sr


def region_item(
    finding: Finding, source: Dataset, frame_numbers: Sequence[int] | None
) -> hd.sr.ImageRegion:
    """The finding's region as a TID 1410 Image Region: its box as a closed POLYLINE of 5
    points in SCOORD image coordinates (pixel edges) on the source image (and frame)."""
    assert finding.region is not None
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(finding.region.polyline, dtype=float),
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            source, referenced_frame_numbers=frame_numbers
        ),
    )


def _check_finding(finding: Finding, by_uid: dict[str, Dataset]) -> None:
    if not finding.label.strip():
        raise ValueError("finding label is empty")
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(f"finding {finding.label!r}: {name} must be in [0, 1], got {value!r}")
    source = by_uid.get(finding.source_sop_instance_uid)
    if source is None:
        raise ValueError(
            f"finding {finding.label!r} refers to {finding.source_sop_instance_uid}, "
            "which is not among the sources"
        )
    if finding.point is not None:
        column, row = finding.point
        if not (0 <= column < int(source.Columns) and 0 <= row < int(source.Rows)):
            raise ValueError(
                f"finding {finding.label!r}: point {finding.point} lies outside the "
                f"{source.Columns}x{source.Rows} source image"
            )
    region = finding.region
    if region is not None:
        if not all(math.isfinite(v) for v in region.box) or not (
            0 <= region.left < region.right <= int(source.Columns)
            and 0 <= region.top < region.bottom <= int(source.Rows)
        ):
            raise ValueError(
                f"finding {finding.label!r}: region {region.box} is not a box inside the "
                f"{source.Columns}x{source.Rows} source image"
            )
