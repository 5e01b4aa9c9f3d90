"""Helpers shared by the DICOM writers (SR, SEG, SC, PM, KO).

Everything here works on *metadata*: a writer never needs the source pixels, and never mutates
the source dataset it was given (it works on :func:`source_header`, a sanitised copy).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

from workers.results import AlgorithmInfo, OutputIdentity

# Private coding scheme for concepts that have no SNOMED CT / DCM code in pydicom's dictionary.
# It is declared in the Coding Scheme Identification Sequence of every object that uses it.
PRIVATE_SCHEME = "99PACSAGENT"
PRIVATE_SCHEME_NAME = "pacs-agent private codes for AI labels without a standard code"

# Attributes of the Patient and General Study modules that are Type 2: highdicom reads some of
# them with plain attribute access, so a source that lacks one gets it empty in the header copy.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)

# Patient Orientation letters (PS3.3 C.7.6.1.1.1) as LPS direction cosines.
_ORIENTATION_VECTORS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}

_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# --------------------------------------------------------------------------- validation


def check_identity(identity: OutputIdentity) -> None:
    """Raise ValueError unless ``identity`` describes a valid output instance."""
    for name in ("series_instance_uid", "sop_instance_uid"):
        value = getattr(identity, name)
        if not isinstance(value, str) or not _UID_PATTERN.fullmatch(value) or len(value) > 64:
            raise ValueError(f"OutputIdentity.{name} is not a valid UID: {value!r}")
    if identity.series_instance_uid == identity.sop_instance_uid:
        raise ValueError("OutputIdentity series and SOP Instance UIDs must differ")
    for name in ("series_number", "instance_number"):
        value = getattr(identity, name)
        if not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            raise ValueError(f"OutputIdentity.{name} must be a positive integer: {value!r}")
    if not identity.series_description or len(identity.series_description) > 64:
        raise ValueError("OutputIdentity.series_description must have 1 to 64 characters")


def check_algorithm(algorithm: AlgorithmInfo) -> None:
    """Raise ValueError unless ``algorithm`` carries what the writers need."""
    for name in ("name", "version", "checksum", "manufacturer", "software_version"):
        if not getattr(algorithm, name):
            raise ValueError(f"AlgorithmInfo.{name} is empty")


def number_of_frames(source: Dataset) -> int:
    """Number of Frames of ``source`` (1 when absent or unreadable)."""
    try:
        value = source.get("NumberOfFrames")
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


class MultiFrameSource(ValueError):
    """This writer cannot make its object from one frame of a multi-frame source."""


def _check_source_identity(source: Dataset) -> None:
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f"source has no {keyword}")
    if not source.get("Rows") or not source.get("Columns"):
        raise ValueError(f"source {source.SOPInstanceUID} has no Rows/Columns")


def check_single_frame(source: Dataset, writer: str = "this writer") -> None:
    """Raise :class:`MultiFrameSource` for a multi-frame source (SEG and Parametric Map:
    highdicom 0.28 builds them from one frame only for a single-frame source without a
    Frame of Reference; X-ray multi-frame images have no per-frame plane positions)."""
    if number_of_frames(source) != 1:
        raise MultiFrameSource(
            f"source {source.SOPInstanceUID} has {number_of_frames(source)} frames; {writer} is "
            "made for single-frame sources only (highdicom cannot derive it from one frame of "
            "a multi-frame image without per-frame plane positions)"
        )
    _check_source_identity(source)


def check_frame(source: Dataset, frame: int | None) -> list[int] | None:
    """The Referenced Frame Number list for a reference to ``frame`` of ``source``.

    A multi-frame source needs ``frame`` (1-based, within Number of Frames); a single-frame
    source takes None (or 1, which is then not written). Raises ValueError otherwise.
    """
    _check_source_identity(source)
    n = number_of_frames(source)
    if n == 1:
        if frame not in (None, 1):
            raise ValueError(f"source {source.SOPInstanceUID} has one frame, not frame {frame}")
        return None
    if frame is None:
        raise ValueError(
            f"source {source.SOPInstanceUID} has {n} frames: the analysed frame must be named"
        )
    if not isinstance(frame, int) or not 1 <= frame <= n:
        raise ValueError(f"frame {frame!r} is not a frame of the {n}-frame source")
    return [frame]


def frame_reference(source: Dataset, frame: int | None, *, purpose: Any = None) -> Dataset:
    """An Image SOP Instance Reference item (PS3.3 C.10.3) to ``source``, with Referenced
    Frame Number when ``source`` is multi-frame, and a Purpose of Reference when given."""
    frames = check_frame(source, frame)
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames is not None:
        item.ReferencedFrameNumber = frames[0]
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(purpose)]
    return item


def check_same_study(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("at least one source image is required")
    studies = {str(s.StudyInstanceUID) for s in sources}
    if len(studies) != 1:
        raise ValueError(f"sources belong to {len(studies)} studies; an output covers one study")


# --------------------------------------------------------------------------- value helpers


def lo(text: str) -> str:
    """Fit ``text`` into a LO (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]


def disclaimer_label(algorithm: AlgorithmInfo) -> str:
    """A Code String (CS, 16 chars, A-Z 0-9 space _) for Content Label."""
    return "AI_DEMO" if algorithm.is_demo else "AI_OUTPUT"


def algorithm_parameters(algorithm: AlgorithmInfo) -> dict[str, str]:
    """Parameters recorded in every Algorithm Identification (bundle checksum, disclaimer)."""
    return {
        "bundle_sha256": algorithm.checksum,
        "random_weights": "yes" if algorithm.is_demo else "no",
        "disclaimer": algorithm.disclaimer,
    }


def algorithm_identification_sequence(
    algorithm: AlgorithmInfo,
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence for SEG segments (and any image IOD)."""
    return hd.AlgorithmIdentificationSequence(
        name=lo(algorithm.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=lo(algorithm.version),
        source=lo(algorithm.manufacturer),
        parameters=algorithm_parameters(algorithm),
    )


def private_code(label: str) -> Code:
    """A code in :data:`PRIVATE_SCHEME` for ``label``: stable, at most 16 characters."""
    slug = re.sub(r"[^A-Z0-9]+", "-", label.upper()).strip("-") or "UNNAMED"
    if len(slug) > 16:
        slug = slug[:9].rstrip("-") + "-" + hashlib.sha256(label.encode()).hexdigest()[:6].upper()
    return Code(value=slug, scheme_designator=PRIVATE_SCHEME, meaning=lo(label))


def private_scheme_items() -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name=PRIVATE_SCHEME_NAME,
            responsible_organization="pacs-agent",
        )
    ]


def normalise_label(label: str) -> str:
    return re.sub(r"[\s_\-]+", " ", label.strip().lower())


# --------------------------------------------------------------------------- source geometry


# Nominal grid of an output that must state a pixel spacing and a plane orientation (SEG Pixel
# Measures / Plane Orientation, PM plane geometry) for a source that gives neither: 1 mm, and the
# orientation OHIF / cornerstone assume for an image without Image Orientation (Patient).
NOMINAL_PIXEL_SPACING = (1.0, 1.0)
NOMINAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _positive_pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (row > 0.0 and col > 0.0) or row != row or col != col:
        return None
    return row, col


def output_pixel_spacing(source: Dataset) -> tuple[tuple[float, float], str]:
    """The pixel spacing an output grid of ``source`` states, and where it comes from.

    The source's valid Pixel Spacing ("pixel spacing"); else its valid Imager Pixel Spacing
    ("imager pixel spacing": at the detector, as cornerstone/OHIF also take it for such an
    image, so that an output fuses onto the source grid); else :data:`NOMINAL_PIXEL_SPACING`
    ("nominal"). An invalid value (RG1's ``0.000\\0.000``) is never used.
    """
    spacing = valid_pixel_spacing(source)
    if spacing is not None:
        return spacing, "pixel spacing"
    spacing = _positive_pair(source.get("ImagerPixelSpacing"))
    if spacing is not None:
        return spacing, "imager pixel spacing"
    return NOMINAL_PIXEL_SPACING, "nominal"


def output_orientation(source: Dataset) -> tuple[list[float], bool]:
    """The plane orientation an output of ``source`` states, and whether it is the source's.

    The source's own Image Orientation (Patient) when it has one; otherwise exactly
    :data:`NOMINAL_ORIENTATION` (``1\\0\\0\\0\\1\\0``), which is what OHIF assumes for the
    source image itself. An orientation derived from Patient Orientation letters (e.g. ``R\\F``
    -> ``-1\\0\\0\\0\\0\\-1``) is NOT used: OHIF rejects a SEG / PM whose plane differs
    from the one it assumes for the source (oblique / not supported) or, if flipped, flips the
    overlay against the source pixels. The Patient Orientation itself is kept where the IOD has it.
    """
    iop = source.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        return [float(v) for v in iop], True
    return list(NOMINAL_ORIENTATION), False


def valid_pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """The source's Pixel Spacing if it is present and physically meaningful (> 0)."""
    return _positive_pair(source.get("PixelSpacing"))


def patient_orientation_of(source: Dataset) -> list[str] | None:
    """Patient Orientation (row, column directions) of a single-frame source.

    Taken from Patient Orientation when it has two valid values, else derived from Image
    Orientation (Patient) (letters of the significant components, largest first, as PS3.3
    C.7.6.1.1.1 describes). None when neither is known.
    """
    po = source.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2:
        values = [str(v).strip().upper() for v in po]
        if all(v and set(v) <= set(_ORIENTATION_VECTORS) for v in values):
            return values
    iop = source.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        vectors = [[float(v) for v in iop[:3]], [float(v) for v in iop[3:]]]
        return [_letters(v) for v in vectors]
    return None


def _letters(vector: Sequence[float]) -> str:
    axes = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(vector[i]))
    out = ""
    for i in order:
        if abs(vector[i]) > 1e-4:
            out += axes[i][0] if vector[i] > 0 else axes[i][1]
    return out


def image_orientation_of(source: Dataset) -> list[float] | None:
    """Image Orientation (Patient) of a single-frame source, without inventing any.

    Image Orientation (Patient) when present; otherwise derived from a Patient Orientation
    whose two values are single, orthogonal axis letters (e.g. RG1's ``L\\F`` gives
    ``1\\0\\0\\0\\0\\-1``). Oblique or unknown orientations give None.
    """
    iop = source.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        return [float(v) for v in iop]
    po = source.get("PatientOrientation")
    if po is None or isinstance(po, str) or len(po) != 2:
        return None
    letters = [str(v).strip().upper() for v in po]
    if not all(len(v) == 1 and v in _ORIENTATION_VECTORS for v in letters):
        return None
    row, col = (_ORIENTATION_VECTORS[v] for v in letters)
    if sum(a * b for a, b in zip(row, col, strict=True)) != 0.0:
        return None
    return [*row, *col]


def laterality_of(source: Dataset) -> str | None:
    """Series-level Laterality (R or L only) from the source's Laterality / Image Laterality."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def source_header(source: Dataset) -> Dataset:
    """A metadata-only copy of ``source`` that highdicom can be given safely.

    - no pixel data (writers never need it; a compressed source is not decoded);
    - an invalid Pixel Spacing (zero, negative, malformed; RG1 has ``0.000\\0.000``) is removed,
      so no output inherits it (highdicom copies it into the SEG's Pixel Measures otherwise);
    - missing Type 2 Patient/Study attributes are added empty.
    """
    header = Dataset()
    for element in source:
        if element.keyword in _PIXEL_DATA_KEYWORDS:
            continue
        header.add(copy.deepcopy(element))
    if getattr(source, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(source.file_meta)
    if "PixelSpacing" in header and valid_pixel_spacing(header) is None:
        del header.PixelSpacing
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


# --------------------------------------------------------------------------- output stamping


def contributing_equipment(algorithm: AlgorithmInfo, when: dt.datetime) -> hd.ContributingEquipment:
    """Contributing Equipment item that names the AI bundle as processing equipment."""
    return hd.ContributingEquipment(
        manufacturer=lo(algorithm.manufacturer),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=lo(algorithm.name),
        software_versions=lo(algorithm.software_version),
        contribution_datetime=DT(when),
        contribution_description=(
            f"{algorithm.name} {algorithm.version} (bundle sha256 {algorithm.checksum}): "
            f"{algorithm.disclaimer}"
        )[:1024],
    )


def device_observer(algorithm: AlgorithmInfo) -> hd.sr.ObserverContext:
    """The AI device as the observer of an SR or KOS, its name carrying the disclaimer."""
    from pacs_agent.uids import derive_uid

    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(
                "device-observer",
                algorithm.manufacturer,
                algorithm.name,
                algorithm.version,
                algorithm.checksum,
            ),
            name=f"{algorithm.name} [{algorithm.disclaimer}]",
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.name,
        ),
    )


def identity_kwargs(
    identity: OutputIdentity, algorithm: AlgorithmInfo, when: dt.datetime
) -> dict[str, Any]:
    """The identity and provenance arguments every highdicom constructor here takes."""
    return {
        "series_instance_uid": identity.series_instance_uid,
        "series_number": identity.series_number,
        "sop_instance_uid": identity.sop_instance_uid,
        "instance_number": identity.instance_number,
        "series_description": identity.series_description,
        "manufacturer": lo(algorithm.manufacturer),
        "manufacturer_model_name": lo(algorithm.name),
        "software_versions": lo(algorithm.software_version),
        "contributing_equipment": [contributing_equipment(algorithm, when)],
        "content_date": when.date(),
        "content_time": when.time(),
    }


def stamp_datetimes(ds: Dataset, when: dt.datetime) -> None:
    """Set every creation date/time highdicom filled with ``now()`` to ``when``.

    With a fixed ``when`` the same inputs give byte-identical objects.
    """
    date, time = DA(when.date()), TM(when.time())
    for date_kw, time_kw in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_kw in ds or time_kw in ds:
            setattr(ds, date_kw, date)
            setattr(ds, time_kw, time)
    # highdicom adds itself as processing equipment, contributing "now"; the source's
    # acquisition equipment keeps its own date-time.
    processing = codes.DCM.ProcessingEquipment.value
    for item in ds.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence", [])
        if "ContributionDateTime" in item and any(p.CodeValue == processing for p in purposes):
            item.ContributionDateTime = DT(when)


def replace_uid_values(ds: Dataset, old: str, new: str) -> None:
    """Replace every UI element whose value is ``old`` (recursively) by ``new``."""

    def _walk(item: Dataset) -> None:
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    _walk(child)
            elif element.VR == "UI" and element.value == old:
                element.value = new

    _walk(ds)


# --------------------------------------------------------------------------- shared checks


TRIAGE_LEVELS = ("routine", "urgent", "critical")


def check_triage(triage: str | None) -> None:
    """Raise ValueError unless ``triage`` is None or one of :data:`TRIAGE_LEVELS`."""
    if triage is not None and triage not in TRIAGE_LEVELS:
        raise ValueError(f"triage must be one of {TRIAGE_LEVELS} or None, got {triage!r}")


def check_plane(name: str, array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``array`` as float32 in [0, 1] with the source's (rows, columns), or ValueError."""
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}; the source is {shape} (rows, columns)")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise ValueError(f"{name} must be numeric")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if array.min() < -1e-3 or array.max() > 1.0 + 1e-3:
        raise ValueError(f"{name} must lie in [0, 1], got [{array.min()}, {array.max()}]")
    return np.clip(array, 0.0, 1.0)


# --------------------------------------------------------------------------- anatomy


def frame_anatomy(source: Dataset) -> Dataset | None:
    """A Frame Anatomy functional group item (PS3.3 C.7.6.16.2.8) for ``source``, or None.

    Anatomic Region from the source's Anatomic Region Sequence, else from Body Part Examined
    through the PS3.16 Annex L correspondence (highdicom's table); Frame Laterality from the
    source's Laterality / Image Laterality (R, L, B), or U for an unpaired region. None when
    either cannot be known without guessing (no region, or a paired region of unknown side).
    """
    from highdicom._standard_utils import get_anatomic_region_map

    laterality = ""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("R", "L", "B"):
            laterality = value
            break
    region: Dataset | None = None
    paired = True
    if source.get("AnatomicRegionSequence"):
        region = copy.deepcopy(source.AnatomicRegionSequence[0])
    else:
        body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
        known = get_anatomic_region_map().get(body_part)
        if known is not None:
            concept, paired = known
            region = Dataset()
            for keyword in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"):
                setattr(region, keyword, getattr(concept, keyword))
    if region is None:
        return None
    if not laterality:
        if paired:
            return None
        laterality = "U"
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = laterality
    return item
