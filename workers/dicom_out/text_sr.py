"""Basic Text SR writer, for PACS and viewers that cannot show a TID 1500 measurement report.

A TID 2000 "Basic Diagnostic Imaging Report" shape (PS3.16), using only the value types and
relationships the Basic Text SR IOD allows (no NUM, no SCOORD; PS3.3 A.35.1):

- root CONTAINER ``Diagnostic Imaging Report`` (LN 18748-4), language, device observer
  context (the AI bundle);
- CONTAINER ``Findings`` (LN 59776-5): per finding a TEXT ``Finding`` (DCM 121071), e.g.
  "Cardiomegaly: PRESENT, probability 0.91 (threshold 0.50)", with the algorithm (TID 4019,
  HAS CONCEPT MOD) and INFERRED FROM the source IMAGE (``Best illustration of finding``);
- CONTAINER ``Impressions`` (LN 19005-8): the triage level as CODE ``Priority`` (as in the TID
  1500 report, when given) and the plain-language summary as TEXT ``Impression`` (DCM 121073).

highdicom has no Basic Text SR class; :class:`BasicTextSR` is its common SR base with the Basic
Text SR Storage SOP Class, refusing content items that IOD does not allow.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import highdicom as hd
from highdicom.sr.sop import _SR
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage

from workers.dicom_out import common
from workers.dicom_out.sr import (
    TRIAGE_CODES,
    TRIAGE_CONCEPT,
    check_inputs,
    summary_text,
)
from workers.results import AlgorithmInfo, Finding, OutputIdentity

if TYPE_CHECKING:
    from workers.report_draft import ReportDraft

logger = logging.getLogger(__name__)

# Language of the content (TID 1204), as highdicom's TID 1500 writes it.
ENGLISH = hd.sr.CodedConcept(
    value="en-US", scheme_designator="RFC5646", meaning="English (United States)"
)

# Value types the Basic Text SR IOD allows (PS3.3 C.17.3, Table A.35.1-2).
ALLOWED_VALUE_TYPES = frozenset(
    {
        "CONTAINER",
        "TEXT",
        "CODE",
        "DATETIME",
        "DATE",
        "TIME",
        "UIDREF",
        "PNAME",
        "COMPOSITE",
        "IMAGE",
        "WAVEFORM",
    }
)


class BasicTextSR(_SR):
    """Basic Text SR document (highdicom's SR base with the Basic Text SR SOP Class)."""

    def __init__(self, evidence: Sequence[Dataset], content: Dataset, **kwargs: Any) -> None:
        for item in _walk_content(content):
            value_type = item.get("ValueType")
            if value_type is not None and value_type not in ALLOWED_VALUE_TYPES:
                raise ValueError(f"Basic Text SR does not allow {value_type} content items")
            if "ReferencedContentItemIdentifier" in item:
                raise ValueError("Basic Text SR does not allow by-reference relationships")
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs
        )


def _walk_content(item: Dataset) -> list[Dataset]:
    out = [item]
    for child in item.get("ContentSequence", []):
        out.extend(_walk_content(child))
    return out


def finding_sentence(finding: Finding) -> str:
    state = "PRESENT" if finding.present else "absent"
    return (
        f"{finding.label}: {state}, probability {finding.probability:.2f} "
        f"(threshold {finding.threshold:.2f})"
    )


def build_text_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    triage: str | None = None,
    frames: Mapping[str, int] | None = None,
    created: dt.datetime | None = None,
    draft: ReportDraft | None = None,
) -> Dataset:
    """Build a Basic Text SR of ``findings`` on ``sources`` (one study).

    Report draft: ``draft`` (``workers.report_draft``), else one built from the findings and
    triage, goes after the Impressions as a "Preliminary report" container.

    Same inputs and checks as :func:`workers.dicom_out.sr.build_sr`; ``finding.point`` is not
    written (Basic Text SR has no spatial coordinates). The IMAGE item of a finding on a
    multi-frame source names its analysed frame (``frames``) in Referenced Frame Number.
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    headers = check_inputs(sources, findings, triage, frames)
    by_uid = {str(header.SOPInstanceUID): header for header in headers}
    when = created or dt.datetime.now()
    labelled_name = f"{algorithm.name} [{algorithm.disclaimer}]"
    contains = hd.sr.RelationshipTypeValues.CONTAINS

    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(ENGLISH))
    observer = common.device_observer(algorithm)
    root.ContentSequence.extend(hd.sr.ObservationContext(observer_device_context=observer))

    section = hd.sr.ContainerContentItem(name=codes.LN.Findings, relationship_type=contains)
    section.ContentSequence = hd.sr.ContentSequence()
    for finding in findings:
        text = hd.sr.TextContentItem(
            name=codes.DCM.Finding, value=finding_sentence(finding), relationship_type=contains
        )
        text.ContentSequence = hd.sr.ContentSequence()
        text.ContentSequence.extend(
            hd.sr.AlgorithmIdentification(
                name=labelled_name,
                version=algorithm.version,
                parameters=[
                    f"{key}={value}"
                    for key, value in common.algorithm_parameters(algorithm).items()
                ]
                + [f"threshold={finding.threshold:.6g}"],
            )
        )
        source = by_uid[finding.source_sop_instance_uid]
        text.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                referenced_frame_numbers=common.check_frame(
                    source, (frames or {}).get(str(source.SOPInstanceUID))
                ),
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        )
        section.ContentSequence.append(text)
    root.ContentSequence.append(section)

    impressions = hd.sr.ContainerContentItem(name=codes.LN.Impressions, relationship_type=contains)
    impressions.ContentSequence = hd.sr.ContentSequence()
    if triage is not None:
        impressions.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=TRIAGE_CONCEPT, value=TRIAGE_CODES[triage], relationship_type=contains
            )
        )
    impressions.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Impression,
            value=summary_text(headers, findings, algorithm, triage),
            relationship_type=contains,
        )
    )
    root.ContentSequence.append(impressions)
    # Report draft (Findings / Impression, for radiologist review): workers.report_draft.
    from workers.report_draft import build_draft, draft_content

    draft = draft or build_draft(headers, findings, algorithm, triage)
    root.ContentSequence.append(draft_content(draft, headers, frames))

    sr = BasicTextSR(
        evidence=headers,
        content=root,
        **common.identity_kwargs(identity, algorithm, when),
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    common.stamp_datetimes(sr, when)
    logger.info(
        "built Basic Text SR %s (%d findings, triage %s) for %d source(s)",
        identity.sop_instance_uid,
        len(findings),
        triage,
        len(headers),
    )
    return sr
