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


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Modalities of projection radiography (PS3.3 C.7.3.1.1.1): a Secondary Capture that says it
# comes from one of these is a radiograph.
XRAY_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "MG", "IO", "PX", "XA", "RF"})
# Conversion Type (0008,0064) DF: digitized film, whatever the Modality (often OT).
FILM_CONVERSION_TYPES = frozenset({"DF"})


def secondary_capture_not_radiograph(ds: Dataset) -> str | None:
    """None when a Secondary Capture is a radiograph worth analysing, else why it is not.

    A radiograph is grayscale (MONOCHROME1/2) and either digitized film (Conversion Type DF) or
    captured from an X-ray source (Modality CR, DX, ...). Screen captures of other modalities
    (NM, US, ...), colour captures and workstation images are stored, not analysed. Reasons are
    fixed texts: they never copy a value from the dataset.
    """

    def text(keyword: str) -> str:
        try:
            return str(ds.get(keyword, "") or "").strip().upper()
        except Exception:
            return ""

    if text("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return "Secondary Capture in colour (not MONOCHROME1/2): not a radiograph, not analysed"
    modality = text("Modality")
    if modality in XRAY_MODALITIES:
        return None
    if text("ConversionType") in FILM_CONVERSION_TYPES and modality in ("", "OT"):
        return None
    return (
        "Secondary Capture neither digitized film (Conversion Type DF) nor from an X-ray "
        "modality: not analysed"
    )


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
    # Number of Frames (0028,0008) as sent; None when absent (a single-frame image).
    number_of_frames: int | None = None


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
    frames = _frames(ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        spp = 2  # native 4:2:2: two luminance samples share one pair of chrominance samples
    total_bits = rows * cols * spp * bits * frames
    return (total_bits + 7) // 8


# Photometric Interpretation (0028,0004) -> the Samples per Pixel it needs (PS3.3 C.7.6.3.1.2).
# Retired terms (ARGB, CMYK, HSV) and anything else cannot be decoded and are refused.
PHOTOMETRIC_SAMPLES: dict[str, int] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_PARTIAL_420": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
    "XYB": 3,
}
_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})


def _mismatch(reason: str) -> RejectedDataset:
    return RejectedDataset(STATUS_DATASET_MISMATCH, reason)


def _us(ds: Dataset, keyword: str, tag: str) -> int | None:
    """An unsigned image attribute as an int; None when absent; refused when not a number.

    The reason names the attribute, never its value (values can carry anything)."""
    try:
        value = ds.get(keyword)
    except Exception:
        raise _mismatch(f"{keyword} {tag} cannot be read") from None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _mismatch(f"{keyword} {tag} is not a number") from None


def _frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008); 1 when absent. Refused when it is not a positive integer."""
    try:
        value = ds.get("NumberOfFrames")
    except Exception:
        raise _mismatch("NumberOfFrames (0028,0008) is not a valid integer") from None
    if value is None or str(value).strip() == "":
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise _mismatch("NumberOfFrames (0028,0008) is not a valid integer") from None
    if frames < 1:
        raise _mismatch("NumberOfFrames (0028,0008) is 0 or negative")
    return frames


def _check_pixel_description(ds: Dataset) -> None:
    """Refuse an Image Pixel module whose header facts contradict each other (PS3.3 C.7.6.3):
    such pixel data cannot be decoded, whatever the bytes are."""
    bits_allocated = _us(ds, "BitsAllocated", "(0028,0100)")
    if bits_allocated not in _BITS_ALLOCATED:
        raise _mismatch("BitsAllocated (0028,0100) is not 1, 8, 16, 32 or 64")
    bits_stored = _us(ds, "BitsStored", "(0028,0101)")
    if bits_stored is None or bits_stored < 1:
        raise _mismatch("BitsStored (0028,0101) missing or 0")
    if bits_stored > bits_allocated:
        raise _mismatch("BitsStored (0028,0101) exceeds BitsAllocated (0028,0100)")
    high_bit = _us(ds, "HighBit", "(0028,0102)")
    if high_bit is not None and not bits_stored - 1 <= high_bit < bits_allocated:
        raise _mismatch("HighBit (0028,0102) does not fit BitsStored and BitsAllocated")
    representation = _us(ds, "PixelRepresentation", "(0028,0103)")
    if representation not in (None, 0, 1):
        raise _mismatch("PixelRepresentation (0028,0103) is not 0 or 1")
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    except Exception:
        photometric = ""
    if not photometric:
        raise _mismatch("PhotometricInterpretation (0028,0004) missing")
    needed = PHOTOMETRIC_SAMPLES.get(photometric)
    if needed is None:
        raise _mismatch("PhotometricInterpretation (0028,0004) is not a supported defined term")
    samples = _us(ds, "SamplesPerPixel", "(0028,0002)")
    if samples is None:
        raise _mismatch("SamplesPerPixel (0028,0002) missing")
    if samples != needed:
        raise _mismatch("SamplesPerPixel (0028,0002) does not match PhotometricInterpretation")
    if samples > 1 and _us(ds, "PlanarConfiguration", "(0028,0006)") not in (None, 0, 1):
        raise _mismatch("PlanarConfiguration (0028,0006) is not 0 or 1")
    _frames(ds)


def _check_pixels(ds: Dataset, transfer_syntax: UID, source: Path | None = None) -> None:
    """Raise RejectedDataset for image datasets whose pixel data cannot be what they claim.

    With ``source`` (the file ``ds`` was read from with deferred values), the check reads only
    element headers and fragment item headers, so a 500 MB object is never held in memory.
    """
    for kw, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("BitsAllocated", "(0028,0100)"),
    ):
        value = _us(ds, kw, tag)
        if value is None or value <= 0:
            raise RejectedDataset(STATUS_DATASET_MISMATCH, f"image with {kw} missing or 0")
    _check_pixel_description(ds)
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
    frames = _frames(ds)
    if frames > fragments:
        raise RejectedDataset(
            STATUS_DATASET_MISMATCH,
            f"NumberOfFrames (0028,0008) exceeds the {fragments} pixel data fragments",
        )


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    """A tolerant read of an IS value: invalid values are ignored, not fatal."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def number_of_frames(ds: Dataset) -> int | None:
    """Number of Frames (0028,0008) when present and a positive integer, else None (single
    frame, or a value the worker will not trust either)."""
    value = _int_or_none(ds, "NumberOfFrames")
    return value if value is not None and value >= 1 else None


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
        elif sop_class == SECONDARY_CAPTURE:
            reason = secondary_capture_not_radiograph(ds)
            analysable = reason is None
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
        number_of_frames=number_of_frames(ds),
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
