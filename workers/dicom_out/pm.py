"""Parametric Map writer: the float heatmap (0..1) in source geometry, for viewers that window it.

One frame, FLOAT pixel data (32 bit), the source's rows and columns, so that map pixel (r, c) is
source pixel (r, c). A Real World Value Mapping (identity, unit-less, "AI heat 0..1") and a VOI
window (centre 0.5, width 1) make it renderable without special processing.

Geometry, and why (PS3.3 A.75, C.7.6.16; each checked with dciodvfy):

- The Parametric Map IOD has the Frame of Reference module as Mandatory, and its functional
  groups require Pixel Measures, and Plane Position (Patient) + Plane Orientation (Patient)
  when the Frame of Reference is patient-relative (Plane Position (Slide) otherwise). dciodvfy
  reports all of them missing for a PM without positions. A PM therefore always has a Frame of
  Reference and plane geometry; a projection radiograph (CR/DX, RG1/RG3) has none to give.
- A source with full patient-space geometry (Frame of Reference, Image Position and
  Orientation (Patient), a valid Pixel Spacing: CT, MR) shares it: the PM takes the source's
  Frame of Reference and plane, as highdicom builds it.
- Any other source (no Frame of Reference; or one without a position, as in DX; or an invalid
  Pixel Spacing) gets a **new Frame of Reference of the PM's own**, derived from the source
  SOP Instance UID (so a retried job gives the same one, and every map of that source shares
  it). In that frame the PM's first pixel is at (0, 0, 0), the orientation is the source's own
  Image Orientation (Patient) where it has one, else exactly the nominal ``1\\0\\0\\0\\1\\0``
  that OHIF assumes for the source image (an orientation derived from Patient Orientation,
  e.g. ``R\\F`` -> ``-1\\0\\0\\0\\0\\-1``, makes OHIF refuse the map: "oblique to the
  acquisition plane ... not yet supported"; a flipped one would flip it on the source), and
  the pixel spacing is the source's valid Pixel Spacing, else its Imager Pixel Spacing (the
  spacing cornerstone gives the source volume the map is fused on), else a nominal
  1 mm. No other object uses that Frame of Reference, so nothing is said about where the source
  lies in the patient: the positions describe the map's own grid, the source keeps no invented
  geometry, and the registration to the source is the pixel grid itself, stated by the
  Derivation Image / Source Image references (Spatial Locations Preserved YES). Position
  Reference Indicator is empty (Type 2). Image Comments say so.
- This also avoids highdicom 0.28.2's "Unexpected mismatch between dimension index values"
  for sources without a coordinate system (its Frame Label dimension index gets no values when
  the single Real World Value Mapping goes to the shared functional groups).
- Spacing Between Slices, which highdicom derives for one plane, is removed: a single 2D map
  has no slices.
- Frame Anatomy (Mandatory in A.75.5): from the source's Anatomic Region Sequence or Body Part
  Examined (PS3.16 Annex L) and laterality (U for an unpaired region); left out when it cannot
  be known without guessing (dciodvfy, in the dicom3tools version here, does not require it).
- Series Laterality (General Series, Type 2C) is required only without a Frame Laterality:
  dciodvfy reports it missing then, and "present when condition unsatisfied" next to a Frame
  Anatomy. So: Frame Anatomy, or else Laterality = the source's R or L, or empty (unknown).
- Content Qualification RESEARCH: no bundle carries a regulatory clearance.
- highdicom draws a random Dimension Organization UID; it is replaced by one derived from the
  output SOP Instance UID, so a retried job gives the same object.

- Multi-frame sources (XA, RF, Enhanced XA/XRF) get no Parametric Map, for the reasons the SEG
  writer gives (highdicom 0.28 derives a map from a multi-frame source only frame for frame with
  plane positions): ``build_parametric_map`` raises ``common.MultiFrameSource`` and the job's
  events say so.

Reading back: highdicom 0.28.2 decodes a float frame only when pydicom has already decoded the
pixel array (``ds.pixel_array`` first), else it asks for a Pixel Representation, which float
pixel data does not have.
"""

from __future__ import annotations

import datetime as dt
import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from pacs_agent.uids import derive_uid
from workers.dicom_out import common
from workers.results import AlgorithmInfo, OutputIdentity

logger = logging.getLogger(__name__)

LUT_LABEL = "AI_HEAT"
NOMINAL_ORIENTATION = list(common.NOMINAL_ORIENTATION)
NOMINAL_PIXEL_SPACING = list(common.NOMINAL_PIXEL_SPACING)

_SOURCE_GEOMETRY = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PixelSpacing",
)


def has_patient_geometry(source: Dataset) -> bool:
    """True when ``source`` has a Frame of Reference, position, orientation and valid spacing."""
    return (
        hd.spatial.get_image_coordinate_system(source) == hd.CoordinateSystemNames.PATIENT
        and "ImagePositionPatient" in source
        and len(source.get("ImageOrientationPatient") or []) == 6
        and common.valid_pixel_spacing(source) is not None
    )


def own_frame_of_reference_uid(source: Dataset) -> str:
    """The Frame of Reference of the maps of a source without usable patient geometry."""
    return derive_uid(str(source.SOPInstanceUID), "parametric-map-frame-of-reference")


def _geometry_header(source: Dataset, header: Dataset) -> tuple[Dataset, bool]:
    """The header highdicom takes geometry from, and whether it is the PM's own frame."""
    if has_patient_geometry(header):
        return header, False
    own = Dataset()
    for element in header:
        if element.keyword not in _SOURCE_GEOMETRY:
            own.add(element)
    if getattr(header, "file_meta", None) is not None:
        own.file_meta = header.file_meta
    own.FrameOfReferenceUID = own_frame_of_reference_uid(source)
    own.PositionReferenceIndicator = ""
    own.ImagePositionPatient = [0.0, 0.0, 0.0]
    own.ImageOrientationPatient = common.output_orientation(header)[0]
    own.PixelSpacing = list(common.output_pixel_spacing(header)[0])
    own.SliceThickness = None  # a projection has none; highdicom then writes none
    return own, True


def build_parametric_map(
    source: Dataset,
    heatmap: np.ndarray,
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    created: dt.datetime | None = None,
) -> Dataset:
    """Build a float Parametric Map of ``heatmap`` ((rows, columns) in [0, 1], source geometry).

    ``created`` fixes the creation/content date-times (default: now).
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    common.check_single_frame(source, "a Parametric Map")
    shape = (int(source.Rows), int(source.Columns))
    heat = common.check_plane("heatmap", heatmap, shape)

    when = created or dt.datetime.now()
    header = common.source_header(source)
    geometry, own_frame = _geometry_header(source, header)

    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=common.lo(f"AI heat 0..1, {algorithm.name}"),
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=[geometry],
        pixel_array=heat.astype(np.float32),
        **common.identity_kwargs(identity, algorithm, when),
        device_serial_number=f"sha256:{algorithm.checksum[:16]}",  # bundle, not hardware
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=0.5,
                window_width=1.0,
                window_explanation="AI heat 0..1",
            )
        ],
        content_description=common.lo(algorithm.disclaimer),
        content_label=common.disclaimer_label(algorithm),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )

    shared = pm.SharedFunctionalGroupsSequence[0]
    for measures in shared.get("PixelMeasuresSequence", []):
        if "SpacingBetweenSlices" in measures:
            del measures.SpacingBetweenSlices
    anatomy = common.frame_anatomy(header)
    if anatomy is not None:
        shared.FrameAnatomySequence = [anatomy]
    else:
        # Laterality (Type 2C, required unless Frame Laterality is present): the source's R or
        # L, else empty (unknown).
        pm.Laterality = common.laterality_of(header) or ""
    comments = [algorithm.disclaimer]
    if own_frame:
        comments.append(
            "Frame of Reference of this map only (the source has no usable patient geometry): "
            "registered to the source pixel for pixel, positions describe the map grid only."
        )
        spacing_from = common.output_pixel_spacing(header)[1]
        if spacing_from == "nominal":
            comments.append("Pixel spacing is nominal (1 mm): the source gives none.")
        elif spacing_from == "imager pixel spacing":
            comments.append("Pixel spacing is the source's Imager Pixel Spacing (at the detector).")
        if not common.output_orientation(header)[1]:
            comments.append(
                "Orientation is nominal (1\\0\\0\\0\\1\\0, as viewers assume for the source); "
                "the source's Patient Orientation gives its true directions."
            )
    pm.ImageComments = " ".join(comments)

    common.stamp_datetimes(pm, when)
    for item in pm.get("DimensionOrganizationSequence", []):
        common.replace_uid_values(
            pm,
            str(item.DimensionOrganizationUID),
            derive_uid(identity.sop_instance_uid, "dimension-organization"),
        )
    logger.info(
        "built parametric map %s for source %s (%s frame of reference)",
        identity.sop_instance_uid,
        source.SOPInstanceUID,
        "own" if own_frame else "source",
    )
    return pm
