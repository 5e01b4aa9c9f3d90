"""Heatmap Secondary Capture writer: the source image in grey with a colour overlay.

The image is RGB, 8 bit, with the source's rows and columns, so it lies pixel for pixel on the
source. Its grey background is the analysed image: from a reduced-resolution decode
(`workers.imaging.decode_reduced`, the default for large JPEG 2000 images) it is resampled to the
source's size, slightly softer than the source; `PACS_AGENT_DECODE_RESOLUTION=full` keeps it sharp.
Burned in: a banner "AI OUTPUT - <disclaimer>" across the top and a small colour legend
(bottom right); Burned In Annotation is YES. The source is referenced from Source Image Sequence
(purpose "Source image for image processing operation") and Referenced Image Sequence.

Multi-frame sources (XA, RF, Enhanced XA/XRF): the SC shows the analysed frame
(``workers.imaging.analysed_frame``) and both references carry its Referenced Frame Number
(Type 1C in the Image SOP Instance Reference Macro: required when the reference is to some
frames of a multi-frame image), so a viewer opens the source at that frame.
"""

from __future__ import annotations

import datetime as dt
import logging

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from workers.dicom_out import common
from workers.results import AlgorithmInfo, OutputIdentity

logger = logging.getLogger(__name__)

# Heat below this is fully transparent; the overlay's opacity grows linearly above it.
ALPHA_FLOOR = 0.2
ALPHA_MAX = 0.6


def jet(values: np.ndarray) -> np.ndarray:
    """Jet-like colormap: (...,) floats in [0, 1] -> (..., 3) floats in [0, 1]."""
    x = np.clip(values, 0.0, 1.0)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # r, g, b
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0).astype(np.float32)


def heat_alpha(heat: np.ndarray) -> np.ndarray:
    """Overlay opacity from heat: 0 below ``ALPHA_FLOOR``, rising to ``ALPHA_MAX`` at 1."""
    return (np.clip((heat - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0) * ALPHA_MAX).astype(
        np.float32
    )


# Heat is looked up in tables of this many steps (`compose_overlay`).
_HEAT_STEPS = 1024


def _heat_tables() -> tuple[np.ndarray, np.ndarray]:
    """(colour x opacity x 255 as [steps, 3], 1 - opacity as [steps]) over heat 0..1."""
    heat = np.linspace(0.0, 1.0, _HEAT_STEPS, dtype=np.float32)
    alpha = heat_alpha(heat)
    return (jet(heat) * alpha[:, np.newaxis] * 255.0).astype(np.float32), (1.0 - alpha)


_COLOUR_TABLE, _KEEP_TABLE = _heat_tables()


def compose_overlay(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Grey ``display`` blended with the coloured ``heatmap`` -> (rows, cols, 3) uint8.

    The colour and opacity of a heat value come from tables of 1,024 steps (a step is 1/1023
    of heat; an 8-bit output moves by at most one grey level): on a 1955 x 1841 radiograph
    0.07 s instead of 0.32 s for the colormap evaluated per pixel (random heat, this 2-core
    machine)."""
    heat = np.clip(heatmap, 0.0, 1.0).astype(np.float32) * float(_HEAT_STEPS - 1)
    step = np.rint(heat, out=heat).astype(np.uint16)
    grey = np.clip(display, 0.0, 1.0).astype(np.float32) * 255.0
    grey *= np.take(_KEEP_TABLE, step)
    rgb = np.take(_COLOUR_TABLE, step, axis=0)  # (rows, cols, 3): colour x opacity x 255
    rgb += grey[..., np.newaxis]
    return np.rint(rgb, out=rgb).astype(np.uint8)


def _at_source_size(display: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A reduced-resolution ``display`` (each side ceil(side / 2^r), `imaging.decode_reduced`)
    resampled onto the source's pixels (`imaging.expand_reduced`); any other array unchanged
    (the shape check then refuses a wrong one)."""
    if display.ndim != 2 or display.shape == shape:
        return display
    from workers.imaging import expand_reduced

    try:
        return expand_reduced(display, shape)
    except ValueError:
        return display


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def burn_annotations(rgb: np.ndarray, banner: str) -> np.ndarray:
    """Burn a top banner with ``banner`` and a colour legend into ``rgb`` (a new array)."""
    rows, cols = rgb.shape[:2]
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    short = min(rows, cols)

    # Banner: about 1/40 of the short side (46 px on RG1), shrunk or wrapped to fit the width.
    size = max(6, round(short / 40))
    margin = max(2, size // 3)
    lines = [banner]
    while True:
        font = _font(size)
        widths = [draw.textlength(line, font=font) for line in lines]
        if max(widths) <= cols - 2 * margin:
            break
        if len(lines) == 1 and " - " in banner:
            head, tail = banner.split(" - ", 1)
            lines = [head, tail]
            continue
        if size <= 6:
            break  # tiny image: the banner is cropped, the header still says it all
        size -= 1
    line_height = round(size * 1.25)
    banner_height = min(rows, line_height * len(lines) + 2 * margin)
    draw.rectangle([0, 0, cols - 1, banner_height - 1], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill=(255, 255, 0), font=font)

    # Legend: a vertical colour bar, hot at the top, bottom right, with "1" and "0" labels.
    bar_h = rows // 4
    bar_w = max(3, cols // 50)
    label_font = _font(max(6, round(size * 0.8)))
    label_w = int(draw.textlength("1.0", font=label_font)) + margin
    x1 = cols - margin - label_w
    x0 = x1 - bar_w
    y1 = rows - margin
    y0 = y1 - bar_h
    if bar_h >= 8 and x0 > 0 and y0 > banner_height:
        ramp = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)
        bar = np.round(jet(ramp) * 255).astype(np.uint8)
        bar = np.repeat(bar[:, np.newaxis, :], bar_w, axis=1)
        image.paste(Image.fromarray(bar, mode="RGB"), (x0, y0))
        draw.rectangle([x0 - 1, y0 - 1, x0 + bar_w, y1], outline=(255, 255, 255))
        draw.text((x1 + margin // 2, y0), "1.0", fill=(255, 255, 255), font=label_font)
        draw.text(
            (x1 + margin // 2, y1 - round(size * 0.8)), "0.0", fill=(255, 255, 255), font=label_font
        )
    return np.asarray(image, dtype=np.uint8).copy()


def _source_was_lossy(source: Dataset) -> bool:
    if str(source.get("LossyImageCompression", "")) == "01":
        return True
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return False
    return UID(syntax) in _LOSSY_SYNTAXES


_LOSSY_SYNTAXES = {
    UID("1.2.840.10008.1.2.4.50"),  # JPEG Baseline
    UID("1.2.840.10008.1.2.4.51"),  # JPEG Extended
    UID("1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
    UID("1.2.840.10008.1.2.4.91"),  # JPEG 2000
    UID("1.2.840.10008.1.2.4.203"),  # HTJ2K
}


def build_heatmap_sc(
    source: Dataset,
    display: np.ndarray,
    heatmap: np.ndarray,
    algorithm: AlgorithmInfo,
    identity: OutputIdentity,
    *,
    frame: int | None = None,
    created: dt.datetime | None = None,
) -> Dataset:
    """Build an RGB Secondary Capture: ``display`` in grey, ``heatmap`` as a colour overlay.

    ``display`` and ``heatmap`` are (rows, columns) arrays in [0, 1] in source geometry;
    ``display`` is in MONOCHROME2 sense (bright = dense). ``frame``: the 1-based frame of a
    multi-frame source they were made from (required then; None for a single-frame source).
    ``created`` fixes the creation/content date-times (default: now).
    """
    common.check_identity(identity)
    common.check_algorithm(algorithm)
    common.check_frame(source, frame)
    shape = (int(source.Rows), int(source.Columns))
    display = _at_source_size(np.asarray(display), shape)
    display = common.check_plane("display", display, shape)
    heatmap = common.check_plane("heatmap", heatmap, shape)

    when = created or dt.datetime.now()
    header = common.source_header(source)
    banner = f"AI OUTPUT - {algorithm.disclaimer}"
    rgb = burn_annotations(compose_overlay(display, heatmap), banner)

    orientation = common.patient_orientation_of(header)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **common.identity_kwargs(identity, algorithm, when),
        # highdicom's enum takes single letters only; the real value is set just below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # Patient Orientation is Type 2: the source's (or empty when unknown), never invented.
    sc.PatientOrientation = orientation if orientation is not None else []
    # Laterality (General Series, Type 2C): dciodvfy requires it in an SC whose source gives
    # none, so it is written empty then (Type 2), else the source's R or L.
    sc.Laterality = common.laterality_of(header) or ""
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{banner}. Heatmap overlay of {algorithm.name} {algorithm.version}."
    sc.DerivationDescription = (
        f"Source image with AI heatmap overlay (jet colormap, opacity by heat), "
        f"{algorithm.name} {algorithm.version}, bundle sha256 {algorithm.checksum}. "
        f"{algorithm.disclaimer}"
    )[:1024]
    sc.SourceImageSequence = [
        common.frame_reference(
            header, frame, purpose=codes.DCM.SourceImageForImageProcessingOperation
        )
    ]
    sc.ReferencedImageSequence = [common.frame_reference(header, frame)]
    if _source_was_lossy(source):
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
    common.stamp_datetimes(sc, when)
    logger.info(
        "built heatmap SC %s for source %s%s",
        identity.sop_instance_uid,
        source.SOPInstanceUID,
        f" frame {frame}" if frame is not None else "",
    )
    return sc
