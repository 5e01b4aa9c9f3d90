"""Key Object Selection writer: the images of the study with positive AI findings.

A TID 2010 Key Object Selection titled ``Of Interest`` (DCM 113000), with the AI bundle as
device observer and a Key Object Description that names the positive findings per image (and
the disclaimer). Viewers that support KOs (most PACS: "key images") open the flagged images
first. Only images with at least one positive finding are referenced; with none, there is no
KO to write (:func:`positive_sources` is empty and :func:`build_key_objects` refuses).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from workers.dicom_out import common
from workers.dicom_out.sr import check_inputs
from workers.results import AlgorithmInfo, Finding, OutputIdentity

logger = logging.getLogger(__name__)

TITLE = codes.DCM.OfInterest


def positive_sources(sources: Sequence[Dataset], findings: Sequence[Finding]) -> list[Dataset]:
    """The sources (in their order) with at least one positive finding."""
    positive = {f.source_sop_instance_uid for f in findings if f.present}
    return [s for s in sources if str(s.SOPInstanceUID) in positive]


def key_object_description(
    sources: Sequence[Dataset], findings: Sequence[Finding], algorithm: AlgorithmInfo
) -> str:
    parts = []
    for n, source in enumerate(sources, start=1):
        uid = str(source.SOPInstanceUID)
        labels = [
            f"{f.label} ({f.probability:.2f})"
            for f in findings
            if f.present and f.source_sop_instance_uid == uid
        ]
        if labels:
            parts.append(f"image {n}: " + ", ".join(labels))
    return (
        f"AI positive findings ({algorithm.name} {algorithm.version}): "
        + "; ".join(parts)
        + f". {algorithm.disclaimer}."
    )


def build_key_objects(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    frames: Mapping[str, int] | None = None,
    created: dt.datetime | None = None,
) -> Dataset:
    """Build a Key Object Selection naming the ``sources`` that have a positive finding.

    ``sources`` and ``findings`` are those of the study's report; raises ValueError when no
    finding is positive. A multi-frame source is selected as a whole instance (the KOS IMAGE
    item's frame list is optional); ``frames`` is checked as for the report.
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    headers = check_inputs(sources, findings, None, frames)
    selected = positive_sources(headers, findings)
    if not selected:
        raise ValueError("no positive finding: a Key Object Selection needs at least one image")
    when = created or dt.datetime.now()

    observer = common.device_observer(algorithm)
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=selected,
        observer_device_context=observer,
        description=key_object_description(headers, findings, algorithm),
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=selected,
        content=content,
        **common.identity_kwargs(identity, algorithm, when),
    )
    common.stamp_datetimes(ko, when)
    logger.info(
        "built KO %s (%d of %d images)", identity.sop_instance_uid, len(selected), len(headers)
    )
    return ko
