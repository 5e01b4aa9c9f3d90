"""What the agent needs to know about an incoming dataset, and the checks that refuse bad ones.

Cheap structural checks only: the C-STORE handler must answer quickly, so pixel data is measured,
not decoded (decoding happens on the worker).
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# The image storage classes an X-ray department sends and the worker can analyse.
ANALYSABLE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "Enhanced XA Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "Enhanced XRF Image Storage",
}

# Accepted and kept (they belong to the study) but never analysed.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}

# Other image classes accepted and stored, but not X-ray projection images this product reads.
OTHER_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
}


class RejectedDataset(Exception):
    """The dataset cannot be kept; ``status`` is the DIMSE failure status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# DIMSE C-STORE failure statuses (PS3.4 B.2.3 and pynetdicom's conventions).
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0xC211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class DatasetFacts:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    rows: int | None
    columns: int | None
    analysable: bool
    reason: str | None  # why it is not analysable
    series_description: str | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None
    # Priority class the dataset asks for (Requested Procedure Priority): "stat", "urgent" or None.
    requested_priority: str | None = None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise RejectedDataset(STATUS_DATASET_MISMATCH, f"missing {keyword}")
    uid = str(value).strip().rstrip("\x00")
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise RejectedDataset(STATUS_DATASET_MISMATCH, f"invalid {keyword} (not a valid UID)")
    return uid


def expected_native_pixel_bytes(ds: Dataset) -> int:
    rows = int(ds.Rows)
    cols = int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    total_bits = rows * cols * spp * bits * frames
    return (total_bits + 7) // 8


def _check_pixels(ds: Dataset, transfer_syntax: UID, source: Path | None = None) -> None:
    """Raise RejectedDataset for image datasets whose pixel data cannot be what they claim.

    With ``source`` (the file ``ds`` was read from with deferred values), the check reads only
    element headers and fragment item headers, so a 500 MB object is never held in memory.
    """
    for kw in ("Rows", "Columns", "BitsAllocated"):
        value = ds.get(kw)
        if value is None or int(value) <= 0:
            raise RejectedDataset(STATUS_DATASET_MISMATCH, f"image with {kw} missing or 0")
    if "PixelData" not in ds:
        raise RejectedDataset(STATUS_DATASET_MISMATCH, "image without Pixel Data")
    item = ds.get_item("PixelData", keep_deferred=True)
    deferred = isinstance(item, RawDataElement) and item.value is None and source is not None
    if deferred:
        assert isinstance(item, RawDataElement) and source is not None
        if transfer_syntax.is_encapsulated:
            with open(source, "rb") as f:
                f.seek(item.value_tell)
                fragments = _check_fragments(f, source.stat().st_size, in_file=True)
            _check_frame_count(ds, fragments)
            return
        length = int(item.length)
        if item.value_tell + length > source.stat().st_size:
            raise RejectedDataset(STATUS_DATASET_MISMATCH, "Pixel Data truncated: file too short")
    else:
        raw = ds["PixelData"].value
        if raw is None or len(raw) == 0:
            raise RejectedDataset(STATUS_DATASET_MISMATCH, "image with empty Pixel Data")
        if transfer_syntax.is_encapsulated:
            fragments = _check_fragments(io.BytesIO(raw), len(raw), in_file=False)
            _check_frame_count(ds, fragments)
            return
        length = len(raw)
    if length == 0:
        raise RejectedDataset(STATUS_DATASET_MISMATCH, "image with empty Pixel Data")
    expected = expected_native_pixel_bytes(ds)
    if length < expected:
        raise RejectedDataset(
            STATUS_DATASET_MISMATCH,
            f"Pixel Data truncated: {length} bytes, {expected} expected from "
            "Rows x Columns x Samples x Bits Allocated",
        )


def _check_fragments(buf: BinaryIO, end: int, *, in_file: bool) -> int:
    """Walk the encapsulated Pixel Data item headers without reading the fragments.

    In a file the items must end with a Sequence Delimitation Item inside the file; an in-memory
    value (as pydicom holds it) ends where the buffer ends.
    """
    items = 0
    frames = 0
    while True:
        header = buf.read(8)
        if len(header) < 8:
            if in_file or header:
                raise RejectedDataset(
                    STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data truncated (no delimiter)"
                )
            break
        group, elem, length = struct.unpack("<HHL", header)
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000 or length == 0xFFFFFFFF:
            raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "malformed encapsulated Pixel Data")
        if buf.tell() + length > end:
            raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data truncated")
        if items > 0 and length > 0:  # the first item is the Basic Offset Table
            frames += 1
        items += 1
        buf.seek(length, 1)
    if frames == 0:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data has no frames")
    return frames


def _check_frame_count(ds: Dataset, fragments: int) -> None:
    """Each frame has at least one fragment: more frames than fragments cannot be decoded."""
    frames = _int_or_none(ds, "NumberOfFrames") or 1
    if frames < 1 or frames > fragments:
        raise RejectedDataset(
            STATUS_DATASET_MISMATCH,
            f"Number of Frames {frames} does not fit {fragments} pixel data fragments",
        )


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    """A tolerant read of an IS value: invalid values are ignored, not fatal."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def requested_priority(ds: Dataset) -> str | None:
    """The most urgent class named by Requested Procedure Priority (0040,1003), at the top level
    or in any item of the Request Attributes Sequence (0040,0275): STAT -> stat, HIGH -> urgent;
    other values (ROUTINE, MEDIUM, LOW) or none -> None. Never raises on odd values."""
    from pacs_agent.scheduling.priority import from_requested_priority, more_urgent

    found: list[str] = []
    try:
        values = [ds.get("RequestedProcedurePriority")]
        for item in ds.get("RequestAttributesSequence") or []:
            values.append(item.get("RequestedProcedurePriority"))
    except Exception:  # a malformed element must not refuse the instance
        return None
    for v in values:
        named = from_requested_priority(v) if v not in (None, "") else None
        if named:
            found.append(named)
    if not found:
        return None
    best = found[0]
    for other in found[1:]:
        best = more_urgent(best, other)
    return best


def examine(ds: Dataset, transfer_syntax: UID, source: Path | None = None) -> DatasetFacts:
    """Check a dataset and say whether it is analysable; raise RejectedDataset if not storable."""
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    sop_uid = _uid(ds, "SOPInstanceUID")
    sop_class = _uid(ds, "SOPClassUID")
    meta_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    if meta_class and str(meta_class) != sop_class:
        # For C-STORE the file meta is the request's: the dataset must be what was announced.
        raise RejectedDataset(
            STATUS_DATASET_MISMATCH, "SOP Class UID differs from the one the sender announced"
        )
    modality = str(ds.get("Modality", "") or "") or None
    body_part = str(ds.get("BodyPartExamined", "") or "") or None
    rows = int(ds.Rows) if ds.get("Rows") not in (None, "") else None
    cols = int(ds.Columns) if ds.get("Columns") not in (None, "") else None

    analysable = True
    reason: str | None = None
    if sop_class in ANALYSABLE_SOP_CLASSES:
        _check_pixels(ds, transfer_syntax, source)
        if int(ds.get("SamplesPerPixel", 1) or 1) not in (1, 3):
            analysable, reason = False, "unsupported Samples per Pixel"
    elif sop_class in NON_IMAGE_SOP_CLASSES:
        analysable = False
        reason = f"non-image SOP class ({NON_IMAGE_SOP_CLASSES[sop_class]}): stored, not analysed"
    elif sop_class in OTHER_IMAGE_SOP_CLASSES:
        _check_pixels(ds, transfer_syntax, source)
        analysable = False
        reason = f"not a projection X-ray ({OTHER_IMAGE_SOP_CLASSES[sop_class]}): not analysed"
    else:
        analysable = False
        reason = f"SOP class {sop_class} is not analysed"
    if analysable and not transfer_syntax.is_encapsulated and transfer_syntax.is_deflated:
        pass  # deflate is decoded by pydicom on read
    return DatasetFacts(
        series_description=(str(ds.get("SeriesDescription", "") or "")[:64] or None),
        acquisition_number=_int_or_none(ds, "AcquisitionNumber"),
        images_in_acquisition=_int_or_none(ds, "ImagesInAcquisition"),
        requested_priority=requested_priority(ds),
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        modality=modality,
        body_part=body_part,
        rows=rows,
        columns=cols,
        analysable=analysable,
        reason=reason,
    )
