"""DICOM Segmentation writer: one segment per class, pixel-aligned with the source.

BINARY (masks) or FRACTIONAL (Segmentation Fractional Type PROBABILITY, 8 bit, maximum
fractional value 255: per-pixel class probabilities, or the masks as 0/1 when the model gave no
probabilities), by the ``seg_type`` setting.

Construction notes for projection radiographs (CR/DX without a Frame of Reference, e.g. the
NEMA RG1 chest), each checked with dciodvfy:

- No invalid Pixel Spacing is carried over. RG1 has ``0.000\\0.000``; highdicom copies it into
  the Pixel Measures functional group and dciodvfy reports "Value is zero for ... Pixel
  Spacing". :func:`common.source_header` drops an invalid value. For a projection source (no
  Frame of Reference + Image Position) highdicom would write Pixel Measures without Slice
  Thickness, which its own ``segread`` rejects, or none at all, on which OHIF 3.13 crashes
  ("Cannot destructure property 'SpacingBetweenSlices' of 'PixelMeasures'"). The shared
  functional groups therefore get a Pixel Measures item of our own: Pixel Spacing = the source's
  valid Pixel Spacing, else its Imager Pixel Spacing, else a nominal 1 mm
  (:func:`common.output_pixel_spacing`), and a nominal Slice Thickness of 1 mm. The choice is
  written in the Derivation Description of the Derivation Image item.
- Without patient-space geometry the General Image module's Patient Orientation is Type 2C
  required; highdicom does not write it. It is copied from the source (or left empty when the
  source has none, which Type 2 allows).
- OHIF refuses a SEG without an image orientation. When the source has no Frame of Reference,
  highdicom refuses a ``plane_orientation``; the Plane Orientation (Patient) functional group is
  then added to the shared functional groups afterwards: the source's own Image Orientation
  (Patient) if it has one, otherwise exactly ``1\\0\\0\\0\\1\\0``, which is what OHIF
  assumes for the source image (:func:`common.output_orientation`). An orientation derived
  from Patient Orientation (RG3's ``R\\F`` -> ``-1\\0\\0\\0\\0\\-1``) is rejected by OHIF
  ("oblique"), and a flipped one would make it flip the mask against the source pixels. The
  true orientation stays in Patient Orientation. No Plane Position is invented.
- Series-level Laterality is NOT copied: dciodvfy reports "Attribute present when condition
  unsatisfied" for Laterality in a SEG whatever Body Part Examined says (checked on RG3, which
  has Laterality R); the laterality stays with the referenced source image.
- highdicom draws a random Dimension Organization UID; it is replaced by one derived from the
  output SOP Instance UID so that a retried job gives the same object.
- Multi-frame sources (XA, RF, Enhanced XA/XRF) get no SEG: the IOD would allow a one-frame
  SEG whose Derivation Image references the analysed frame, but highdicom 0.28 refuses a
  multi-frame source without a Frame of Reference ("Only a single frame is supported when the
  source image has no Frame of Reference UID"), and an Enhanced XA/XRF has no per-frame Plane
  Position (Patient) to copy. ``build_seg`` raises ``common.MultiFrameSource``; the job's
  events say that the SEG was skipped for that image (``outputs.build_output_set``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacs_agent.uids import derive_uid
from workers.dicom_out import common
from workers.results import AlgorithmInfo, OutputIdentity

logger = logging.getLogger(__name__)

# Segment label (normalised: lower case, single spaces) -> (property category, property type,
# laterality modifier or None). Labels not listed get category "Anatomical Structure" and a
# type in the private scheme ``common.PRIVATE_SCHEME`` (see ``common.private_code``).
SEGMENT_CODES: dict[str, tuple[Code, Code, Code | None]] = {
    "lung": (codes.SCT.Organ, codes.SCT.Lung, None),
    "lungs": (codes.SCT.Organ, codes.SCT.Lung, None),
    "left lung": (codes.SCT.Organ, codes.SCT.Lung, codes.SCT.Left),
    "right lung": (codes.SCT.Organ, codes.SCT.Lung, codes.SCT.Right),
    "heart": (codes.SCT.Organ, codes.SCT.Heart, None),
    "clavicle": (codes.SCT.AnatomicalStructure, codes.SCT.Clavicle, None),
    "left clavicle": (codes.SCT.AnatomicalStructure, codes.SCT.Clavicle, codes.SCT.Left),
    "right clavicle": (codes.SCT.AnatomicalStructure, codes.SCT.Clavicle, codes.SCT.Right),
    "rib": (codes.SCT.AnatomicalStructure, codes.SCT.Rib, None),
    "ribs": (codes.SCT.AnatomicalStructure, codes.SCT.Rib, None),
    "trachea": (codes.SCT.AnatomicalStructure, codes.SCT.Trachea, None),
    "mediastinum": (codes.SCT.AnatomicalStructure, codes.SCT.Mediastinum, None),
    "diaphragm": (codes.SCT.AnatomicalStructure, codes.SCT.Diaphragm, None),
    "spine": (codes.SCT.AnatomicalStructure, codes.SCT.Spine, None),
    "aorta": (codes.SCT.AnatomicalStructure, codes.SCT.Aorta, None),
    "pleural effusion": (
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.PleuralEffusion,
        None,
    ),
    "pneumothorax": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Pneumothorax, None),
    "nodule": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule, None),
    "mass": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Mass, None),
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion, None),
    "endotracheal tube": (codes.SCT.PhysicalObject, codes.SCT.EndotrachealTube, None),
    "catheter": (codes.SCT.PhysicalObject, codes.SCT.Catheter, None),
}

# Slice Thickness of the Pixel Measures of a SEG on a projection image: nominal (a projection
# has none), required by highdicom's reader (segread) and OHIF next to the Pixel Spacing.
NOMINAL_SLICE_THICKNESS = 1.0

SEGMENTATION_TYPES = {
    "binary": hd.seg.SegmentationTypeValues.BINARY,
    "fractional": hd.seg.SegmentationTypeValues.FRACTIONAL,
}
# FRACTIONAL pixels are probabilities in 1/255 steps (8 bit).
MAX_FRACTIONAL_VALUE = 255

# Distinct display colours (sRGB), cycled over segments; stored as CIELab.
SEGMENT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


def segment_codes(label: str) -> tuple[Code, Code, Code | None]:
    """(category, type, laterality modifier) for a segment label."""
    known = SEGMENT_CODES.get(common.normalise_label(label))
    if known is not None:
        return known
    return codes.SCT.AnatomicalStructure, common.private_code(label), None


def build_seg(
    source: Dataset,
    masks: np.ndarray,
    segment_labels: Sequence[str],
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    segmentation_type: str = "binary",
    created: dt.datetime | None = None,
) -> Dataset:
    """Build a Segmentation of ``source`` with one segment per mask.

    ``masks`` has shape (n_classes, rows, columns) in source pixel geometry; segment i + 1 is
    ``masks[i]``, labelled ``segment_labels[i]``. ``segmentation_type`` is ``"binary"`` (masks
    boolean or 0/1) or ``"fractional"`` (masks are probabilities in [0, 1], or boolean).
    ``created`` fixes the creation/content date-times (default: now), making the output
    byte-identical for identical inputs.
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    common.check_single_frame(source, "a Segmentation")
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(
            f"segmentation_type must be one of {sorted(SEGMENTATION_TYPES)}, "
            f"got {segmentation_type!r}"
        )
    fractional = segmentation_type == "fractional"
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (n_classes, rows, columns), got {masks.shape}")
    if masks.shape[1:] != (int(source.Rows), int(source.Columns)):
        raise ValueError(
            f"masks are {masks.shape[1]}x{masks.shape[2]} but the source is "
            f"{source.Rows}x{source.Columns}; resample to source geometry first"
        )
    if masks.shape[0] == 0 or masks.shape[0] != len(segment_labels):
        raise ValueError(
            f"{masks.shape[0]} masks for {len(segment_labels)} segment labels; need >= 1 each"
        )
    if fractional:
        if not (np.issubdtype(masks.dtype, np.number) or masks.dtype == np.bool_):
            raise ValueError("fractional masks must be numeric probabilities")
        masks = masks.astype(np.float32)
        if not np.isfinite(masks).all() or masks.min() < 0.0 or masks.max() > 1.0:
            raise ValueError("fractional masks must be probabilities in [0, 1]")
    elif masks.dtype != np.bool_:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError("masks must be boolean (or contain only 0 and 1)")
        masks = masks.astype(bool)
    if any(not label.strip() for label in segment_labels):
        raise ValueError("segment labels must not be empty")

    when = created or dt.datetime.now()
    header = common.source_header(source)
    if "ImagePositionPatient" in header and common.valid_pixel_spacing(header) is None:
        # Patient-space geometry without a usable Pixel Spacing cannot be carried over: keep the
        # SEG pixel-aligned with the source (Derivation Image) but without plane positions.
        logger.warning(
            "source %s has a position but no valid Pixel Spacing; SEG written without positions",
            source.SOPInstanceUID,
        )
        del header.ImagePositionPatient
    if hd.spatial.get_image_coordinate_system(header) is None and "PixelSpacing" in header:
        # For a projection image highdicom writes Pixel Measures without Slice Thickness, which
        # its own reader (segread) rejects; the SEG is pixel-aligned with the source, whose
        # spacing stays on the source image.
        del header.PixelSpacing
    algorithm_id = common.algorithm_identification_sequence(algorithm)

    descriptions = []
    uses_private = False
    for number, label in enumerate(segment_labels, start=1):
        category, prop_type, modifier = segment_codes(label)
        uses_private |= prop_type.scheme_designator == common.PRIVATE_SCHEME
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=common.lo(label),
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=derive_uid(identity.sop_instance_uid, "segment", str(number), label),
            tracking_id=common.lo(f"{label} #{number}"),
            display_color=hd.color.CIELabColor.from_rgb(
                *SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]
            ),
        )
        if modifier is not None:
            property_type = description.SegmentedPropertyTypeCodeSequence[0]
            property_type.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(modifier)
            ]
        description.SegmentDescription = algorithm.disclaimer
        descriptions.append(description)

    # (n_classes, rows, cols) -> one frame, segments stacked last: (1, rows, cols, n_classes).
    pixel_array = np.moveaxis(masks, 0, -1)[np.newaxis]

    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=pixel_array,
        segmentation_type=SEGMENTATION_TYPES[segmentation_type],
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        segment_descriptions=descriptions,
        **common.identity_kwargs(identity, algorithm, when),
        device_serial_number=f"sha256:{algorithm.checksum[:16]}",  # bundle, not hardware
        content_description=common.lo(algorithm.disclaimer),
        content_label=common.disclaimer_label(algorithm),
        content_creator_name=None,
        omit_empty_frames=False,
        coding_schemes=common.private_scheme_items() if uses_private else None,
    )

    _conform_projection_geometry(seg, header)
    seg.ImageComments = algorithm.disclaimer

    # Deterministic output: fixed date-times and a derived Dimension Organization UID.
    common.stamp_datetimes(seg, when)
    for item in seg.get("DimensionOrganizationSequence", []):
        common.replace_uid_values(
            seg,
            str(item.DimensionOrganizationUID),
            derive_uid(identity.sop_instance_uid, "dimension-organization"),
        )

    logger.info(
        "built %s SEG %s (%d segments) for source %s",
        segmentation_type,
        identity.sop_instance_uid,
        len(descriptions),
        source.SOPInstanceUID,
    )
    return seg


def _conform_projection_geometry(seg: hd.seg.Segmentation, header: Dataset) -> None:
    """Patient Orientation, Pixel Measures and Plane Orientation for a projection source.

    highdicom handles a source with a Frame of Reference and Image Position (Patient) itself
    (plane orientation and positions); anything else (no Frame of Reference, or one without a
    position, as in DX) is a projection image for it and gets neither. See the module notes.
    """
    if hd.spatial.get_image_coordinate_system(header) is not None:
        return
    orientation = common.patient_orientation_of(header)
    # Type 2: empty when the source gives none
    seg.PatientOrientation = orientation if orientation is not None else []
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing, spacing_from = common.output_pixel_spacing(header)
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in spacing]
    measures.SliceThickness = NOMINAL_SLICE_THICKNESS
    shared.PixelMeasuresSequence = [measures]
    iop, own = common.output_orientation(header)
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_orientation=iop,
    )
    note = (
        "Pixel-aligned with the source (pixel r,c = source pixel r,c). Pixel Measures: "
        + {
            "pixel spacing": "the source's Pixel Spacing",
            "imager pixel spacing": "the source's Imager Pixel Spacing (at the detector)",
            "nominal": "nominal 1 mm (the source gives no valid spacing)",
        }[spacing_from]
        + "; Slice Thickness nominal 1 mm (projection image). Plane Orientation: "
        + (
            "the source's Image Orientation (Patient)."
            if own
            else "nominal 1\\0\\0\\0\\1\\0 (the source has no Image Orientation (Patient); "
            "see Patient Orientation)."
        )
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for item in frame.get("DerivationImageSequence", []):
            item.DerivationDescription = note[:1024]
