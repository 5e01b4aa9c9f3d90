"""Decode a DICOM radiograph to a display-ready float image, and map model geometry back to it.

Three steps, each a plain function:

- `decode(ds)`: stored pixels -> float32 [rows, columns] in 0..1 with bright = dense (the
  MONOCHROME2 sense), after the Modality LUT, the VOI window (from the header, else a robust
  percentile window) and MONOCHROME1 inversion. A multi-frame image (XA, RF, Enhanced XA/XRF,
  or any image with Number of Frames > 1) gives one frame, `analysed_frame(ds)`, and only that
  frame is decoded (`pydicom.pixels.pixel_array(ds, index=...)`): its Representative Frame
  Number (0028,6010) when it names a frame of the image, else the middle frame
  (`(n + 1) // 2`, 1-based). The middle rather than the first frame: in an angiographic or
  fluoroscopic run the first frames are often the mask before the contrast arrives (DSA), the
  middle ones show the filled vessels or the examined motion.
- `decode_reduced(ds, size)`: the same at a reduced resolution, for JPEG 2000 images at least
  four times the model input: the codestream is decoded only up to the wavelet level that is
  still at least twice ``size`` on the longer side (OpenJPEG's reduced-resolution decoding, through
  Pillow), i.e. the low-pass band of the image's own wavelet transform. On NEMA RG1 (1955 x 1841,
  15-bit, lossless) half resolution decodes in 0.2 s instead of 0.9 s, and the 224 px model input
  differs from the full decode's by 0.0007 on average (0..1 scale; p99 0.006, max 0.022, at the
  border of the odd-sized image): a fifth of an 8-bit grey level. None when the image does not
  qualify (another transfer syntax, colour, signed, one frame of a multi-frame image without its
  own fragment, a codestream Pillow cannot size exactly, anything unexpected): then `decode`.
  Setting `PACS_AGENT_DECODE_RESOLUTION=full` turns it off. Geometry: sample k of level r lies on
  source pixel 2^r k; `letterbox` resamples it as if it covered the block 2^r k .. 2^r (k+1), a
  shift of (2^r - 1) / 2 source pixels (0.06 model pixels on RG1 at 224 px), left as it is; the
  SC's background is placed exactly (`expand_reduced`).
- `letterbox(image, size)`: the whole image scaled into a `size` x `size` square, the shorter side
  padded symmetrically; the returned `Transform` maps any map over that square (model input pixels
  or the patch-token grid) back onto exact source pixels. ``source_shape`` letterboxes a reduced
  image with the transform of the full one, so the maps still land on the source's pixels.
- `normalize(image, preprocessing)`: grey to 3 channels, mean/std normalisation -> tensor.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import JPEG2000, JPEG2000Lossless

log = logging.getLogger(__name__)

__all__ = [
    "ImageError",
    "Preprocessing",
    "Transform",
    "analysed_frame",
    "decode",
    "decode_reduced",
    "decode_stored",
    "expand_reduced",
    "letterbox",
    "letterbox_transform",
    "normalize",
]

# Robust window used when the header carries no usable VOI window.
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
# Smallest image side that is worth analysing.
MIN_SIDE = 16
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# Pixels sampled at most for the percentile window (speed on 4k x 4k detectors).
_PERCENTILE_SAMPLE = 1 << 20


class ImageError(ValueError):
    """The dataset holds no image this product can analyse; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """Model input parameters: square input side in pixels, per-channel mean and std for pixel
    values scaled to 0..1."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"preprocessing size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("preprocessing mean and std need 3 values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, object]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocessing:
        try:
            size = int(data["size"])  # type: ignore[call-overload]
            mean = _three(data["mean"])
            std = _three(data["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid preprocessing {data!r}: {exc}") from exc
        return cls(size=size, mean=mean, std=std)


def _three(values: object) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        v = float(values)
        return (v, v, v)
    seq = [float(v) for v in values]  # type: ignore[attr-defined]
    if len(seq) == 1:
        seq = seq * 3
    if len(seq) != 3:
        raise ValueError(f"expected 1 or 3 values, got {len(seq)}")
    return (seq[0], seq[1], seq[2])


# --------------------------------------------------------------------------------------------
# decode


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent or unreadable."""
    try:
        value = ds.get("NumberOfFrames")
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def analysed_frame(ds: Dataset) -> int | None:
    """The 1-based frame of a multi-frame image that is analysed and referenced by the
    outputs; None for a single-frame image.

    Representative Frame Number (0028,6010) when it names a frame of the image; otherwise
    (absent, 0, beyond Number of Frames, unreadable) the middle frame, ``(n + 1) // 2``.
    """
    n = number_of_frames(ds)
    if n <= 1:
        return None
    try:
        representative = ds.get("RepresentativeFrameNumber")
        chosen = int(representative) if representative not in (None, "") else None
    except (TypeError, ValueError):
        chosen = None
    if chosen is not None and 1 <= chosen <= n:
        return chosen
    return (n + 1) // 2


def decode(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Stored pixel data -> float32 [rows, columns], 0..1, bright = dense.

    A multi-frame image gives one frame: ``frame`` (1-based), by default `analysed_frame(ds)`;
    only that frame is decoded. Colour images give their luminance. Raises `ImageError` for
    anything that cannot be analysed (no pixels, undecodable, too small, flat). Its messages
    name the transfer syntax and the exception type, never a value of the dataset.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError("no pixel data")
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    if rows < MIN_SIDE or cols < MIN_SIDE:
        raise ImageError(f"image too small to analyse: {rows} x {cols}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise ImageError("no Photometric Interpretation")
    n_frames = number_of_frames(ds)
    if frame is None:
        frame = analysed_frame(ds)
    if frame is not None and not 1 <= frame <= n_frames:
        raise ImageError(f"frame {frame} does not exist: the image has {n_frames} frame(s)")
    try:
        if n_frames > 1 and frame is not None:
            arr = pixel_array(ds, index=frame - 1)  # decodes only this frame
        else:
            arr = ds.pixel_array
    except Exception as exc:  # pydicom/pylibjpeg raise many kinds for bad or unknown encodings
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        where = f"frame {frame} of {n_frames}, " if n_frames > 1 else ""
        # The exception's own text is left out: decoders may quote values of the dataset.
        raise ImageError(
            f"cannot decode pixel data ({where}transfer syntax {tsyntax}): {type(exc).__name__}"
        ) from exc
    return decode_stored(ds, arr)


def decode_stored(ds: Dataset, arr: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The second half of `decode`: stored pixel values (as `ds.pixel_array` gives them, from
    any decoder, e.g. a GPU one) -> float32 [rows, columns], 0..1, bright = dense. For a
    multi-frame image ``arr`` is either one decoded frame or all frames (then the first).
    ``shape``: the decoded (rows, columns) when it is not the header's (a reduced-resolution
    decode)."""
    rows, cols = shape or (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if n_frames > 1 and arr.ndim == 3:
            arr = arr[0]
        if arr.ndim != 2:
            raise ImageError(f"unexpected pixel array shape {arr.shape} for {photometric}")
        out = _decode_monochrome(ds, arr, invert=photometric == "MONOCHROME1")
    elif photometric == "PALETTE COLOR":
        if n_frames > 1 and arr.ndim == 3:
            arr = arr[0]
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageError(f"cannot apply the palette colour LUT: {type(exc).__name__}") from exc
        out = _luminance(rgb, bits=_lut_bits(rgb))
    elif photometric in _COLOUR:
        # pydicom converts YBR to RGB by default when decoding.
        if n_frames > 1 and arr.ndim == 4:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageError(f"unexpected pixel array shape {arr.shape} for {photometric}")
        out = _luminance(arr, bits=int(ds.get("BitsStored", 8) or 8))
    else:
        raise ImageError(f"unsupported Photometric Interpretation {photometric}")

    if out.shape != (rows, cols):
        raise ImageError(f"decoded shape {out.shape} does not match Rows x Columns {rows} x {cols}")
    if not np.isfinite(out).all():
        raise ImageError("decoded image has non-finite values")
    return np.ascontiguousarray(out, dtype=np.float32)


# Transfer syntaxes whose codestream is decoded at a reduced resolution (`decode_reduced`).
_J2K_SYNTAXES = {JPEG2000Lossless, JPEG2000}


def reduction_levels(rows: int, cols: int, size: int, levels: int = 32) -> int:
    """How many halvings `decode_reduced` applies to a ``rows`` x ``cols`` image for a model
    input of ``size``: the most, at most ``levels`` (the codestream's decomposition levels),
    that leave the longer side at least ``2 * size`` and on which Pillow's size for the reduced
    image (rounded) agrees with OpenJPEG's (the ceiling); 0 when none does."""
    best = 0
    for r in range(1, max(0, levels) + 1):
        power = 1 << r
        sides = [math.ceil(n / power) for n in (rows, cols)]
        if max(sides) < 2 * size:
            break
        # Pillow 13 sizes the reduced image as int((n + power / 2) / power); a mismatch makes
        # it report a broken stream (its rounding is not OpenJPEG's ceiling for every size).
        if all(
            int((n + (power >> 1)) / power) == c for n, c in zip((rows, cols), sides, strict=True)
        ):
            best = r
    return best


def _codestream_levels(codestream: bytes) -> int:
    """Decomposition levels from the main header's COD marker segment of a J2K codestream
    (0 when it cannot be read: then nothing is reduced)."""
    if codestream[:2] != b"\xff\x4f":  # SOC
        return 0
    pos = 2
    while pos + 4 <= min(len(codestream), 1 << 16):
        marker = codestream[pos : pos + 2]
        if marker == b"\xff\x90":  # SOT: the main header ended without a COD
            return 0
        if marker == b"\xff\x52":  # COD: Lcod(2) Scod(1) SGcod(4), then SPcod's levels
            return codestream[pos + 9] if pos + 9 < len(codestream) else 0
        pos += 2 + int.from_bytes(codestream[pos + 2 : pos + 4], "big")
    return 0


def decode_reduced(ds: Dataset, size: int, frame: int | None = None) -> np.ndarray | None:
    """`decode` at a reduced resolution for a model input of ``size`` (see the module notes),
    or None when the image does not qualify (then `decode` decodes it in full).

    Returns float32 [ceil(rows / 2^r), ceil(columns / 2^r)] in 0..1, bright = dense. A
    codestream that qualifies but fails to decode here returns None as well: the full decode
    then gives the real error (or the image)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _J2K_SYNTAXES or "PixelData" not in ds:
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if "PixelPaddingValue" in ds:
        # A reduced pixel on the padding's border blends padding and tissue: it would escape
        # the padding mask and pull the percentile window down.
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsStored)
        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.PixelRepresentation) != 0:
            return None
        n_frames = number_of_frames(ds)
        if frame is None:
            frame = analysed_frame(ds)
        from pydicom.encaps import get_frame

        index = (frame - 1) if (n_frames > 1 and frame is not None) else 0
        codestream = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    except Exception:
        return None
    if rows < MIN_SIDE or cols < MIN_SIDE or not 1 <= bits <= 16:
        return None
    r = reduction_levels(rows, cols, size, _codestream_levels(codestream))
    if r == 0:
        return None
    # The codestream's own header (pylibjpeg-openjpeg reads it) before any decoding: one
    # unsigned sample per pixel, and its depth, which Pillow scales to its mode's.
    try:
        import openjpeg

        params = openjpeg.get_parameters(codestream)
        precision = int(params["precision"])
        if params.get("is_signed") or int(params.get("samples_per_pixel", 1)) != 1:
            return None
    except Exception:
        return None
    power = 1 << r
    shape = (math.ceil(rows / power), math.ceil(cols / power))
    try:
        from PIL import Image

        with Image.open(io.BytesIO(codestream)) as im:
            im.reduce = r  # type: ignore[assignment,method-assign]  # the J2K plugin's level
            im.load()
            mode = im.mode
            got = np.asarray(im)
    except Exception as exc:  # Pillow without OpenJPEG, an odd codestream: the full decode
        log.debug("reduced decode not used: %s", type(exc).__name__)
        return None
    if got.shape != shape or mode not in ("L", "I;16", "I;16L", "I;16B"):
        return None
    # Pillow scales samples to its mode's depth (a 15-bit sample comes shifted left by one);
    # shifted back, the low bits must be zero, else this is not what it seems. The depth is
    # the codestream's, not Bits Stored's.
    shift = (8 if mode == "L" else 16) - precision
    if shift < 0:
        return None
    stored = got.astype(np.uint16)
    if shift and (stored & ((1 << shift) - 1)).any():
        return None
    try:
        return decode_stored(ds, stored >> shift, shape=shape)
    except ImageError:  # flat, all padding, a bad LUT: the full decode gives the verdict
        return None


def expand_reduced(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A reduced-resolution decode (`decode_reduced`: each side ceil(side / 2^r)) resampled
    bilinearly onto the source's ``shape``, sample for sample: the wavelet's low-pass samples
    are the even ones, so sample k of level r lies on source pixel 2^r k and source pixel i
    reads reduced position i / 2^r (a plain resize would shift it by (2^r - 1) / 2 source
    pixels). ValueError when ``plane`` is not such a reduction of ``shape``."""
    arr = np.asarray(plane, dtype=np.float32)
    rows, cols = int(shape[0]), int(shape[1])
    power = next(
        (1 << r for r in range(0, 16) if arr.shape == (-(-rows // (1 << r)), -(-cols // (1 << r)))),
        None,
    )
    if arr.ndim != 2 or power is None:
        raise ValueError(f"{arr.shape} is not a power-of-two reduction of {(rows, cols)}")
    if power == 1:
        return np.ascontiguousarray(arr)
    i0, i1, f = _bilinear_taps(np.arange(rows, dtype=np.float64) / power, arr.shape[0])
    fy = f.astype(np.float32)[:, None]
    tall = arr[i0] * (1.0 - fy) + arr[i1] * fy  # [rows, reduced columns]
    j0, j1, g = _bilinear_taps(np.arange(cols, dtype=np.float64) / power, arr.shape[1])
    gx = g.astype(np.float32)[None, :]
    return np.ascontiguousarray(tall[:, j0] * (1.0 - gx) + tall[:, j1] * gx, dtype=np.float32)


def resize_plane(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D float image resampled bilinearly to ``shape`` (torch's half-pixel convention,
    anti-aliased when it shrinks); float32. `letterbox` resizes with it."""
    arr = np.ascontiguousarray(plane, dtype=np.float32)
    if arr.shape == tuple(shape):
        return arr
    t = torch.from_numpy(arr)[None, None]
    shrink = shape[0] < arr.shape[0] or shape[1] < arr.shape[1]
    out = F.interpolate(
        t, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0, 0].numpy()


def _decode_monochrome(ds: Dataset, stored: np.ndarray, invert: bool) -> np.ndarray:
    padding = _padding_mask(ds, stored)
    try:
        # float32 throughout the windowing (float64 doubled its time and memory; the output
        # is a 0..1 image, where float32 is exact to about 1e-7)
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as exc:
        raise ImageError(f"cannot apply the Modality LUT: {type(exc).__name__}") from exc

    windowed = _header_window(ds, values)
    if windowed is None:
        windowed = _percentile_window(values, padding)
    if invert:
        windowed = 1.0 - windowed
    if padding is not None:
        windowed[padding] = 0.0  # padding shows as background (dark), whatever the photometric
    return windowed


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):
        return None
    try:
        pad = int(value)
    except (TypeError, ValueError):
        return None
    upper = ds.get("PixelPaddingRangeLimit")
    if upper is not None and not isinstance(upper, bytes):
        lo, hi = sorted((pad, int(upper)))
        mask = (stored >= lo) & (stored <= hi)
    else:
        mask = stored == pad
    if not mask.any():
        return None
    if mask.all():
        raise ImageError("image holds only padding")
    return np.asarray(mask)


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued DS element as a finite float, else None."""
    if value is None:
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        if len(value) == 0:  # type: ignore[arg-type]
            return None
        value = value[0]  # type: ignore[index]
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _header_window(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """Apply the first VOI window of the header (PS3.3 C.11.2.1.2); None when there is no
    usable one, or when it would leave almost nothing visible."""
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            return None
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        out = np.clip((values - center) / width + 0.5, 0.0, 1.0)
    else:
        if width < 1:
            return None
        if width == 1:
            out = (values >= center - 0.5).astype(np.float32)
        else:
            out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    # A window that saturates nearly every pixel hides the image: treat it as absent.
    inside = np.count_nonzero((out > 0.0) & (out < 1.0))
    if inside < 0.05 * out.size:
        log.info("header VOI window saturates the image; using the percentile window")
        return None
    return out


def _percentile_window(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    sample = values[~padding] if padding is not None else values.ravel()
    if sample.size > _PERCENTILE_SAMPLE:
        step = int(math.ceil(sample.size / _PERCENTILE_SAMPLE))
        sample = sample[::step]
    lo, hi = np.percentile(sample, [PERCENTILE_LOW, PERCENTILE_HIGH])
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
        if not hi > lo:
            raise ImageError("image is uniform: nothing to analyse")
    lo, hi = float(lo), float(hi)  # Python floats: the arithmetic stays in values' float32
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _lut_bits(rgb: np.ndarray) -> int:
    return 8 if rgb.dtype == np.uint8 else 16


def _luminance(rgb: np.ndarray, bits: int) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    top = float(2**bits - 1) if 1 <= bits <= 32 else float(lum.max() or 1.0)
    return np.clip(lum / top, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Transform:
    """How a source image was placed in the model's `size` x `size` input.

    Source pixel (row r, column c), centre at (r + 0.5, c + 0.5), lands at input coordinates
    (pad_top + (r + 0.5) * scale_y, pad_left + (c + 0.5) * scale_x). `scale_y` and `scale_x` are
    the exact per-axis factors of the resize (they differ from `scale` by rounding only).
    """

    source_shape: tuple[int, int]  # (rows, columns)
    size: int
    scale: float
    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int
    resized_shape: tuple[int, int]

    def to_source(
        self, grid_map: np.ndarray, extent: tuple[float, float] | None = None
    ) -> np.ndarray:
        """Resample a map over the model input onto the source pixels, bilinearly.

        `grid_map` is [h, w] (e.g. the patch-token grid, or the input itself) or [k, h, w] for k
        maps at once. It covers the input square from the top-left corner over `extent`
        (height, width) input pixels, the whole square by default; a token grid whose patches do
        not tile the input exactly passes `extent = (h * patch, w * patch)`. Returns float32
        [rows, columns] (or [k, rows, columns]).
        """
        m = np.asarray(grid_map, dtype=np.float32)
        squeeze = m.ndim == 2
        if squeeze:
            m = m[None]
        if m.ndim != 3:
            raise ValueError(f"grid_map must be [h, w] or [k, h, w], got shape {m.shape}")
        _, h, w = m.shape
        ext_h, ext_w = extent if extent is not None else (float(self.size), float(self.size))
        rows, cols = self.source_shape
        # input coordinates of the source pixel centres -> fractional grid-cell indices
        y = self.pad_top + (np.arange(rows, dtype=np.float64) + 0.5) * self.scale_y
        x = self.pad_left + (np.arange(cols, dtype=np.float64) + 0.5) * self.scale_x
        gy = y * (h / ext_h) - 0.5
        gx = x * (w / ext_w) - 0.5
        # Separable bilinear interpolation as two small matrix products per map:
        # out = Wy [rows, h] @ m [h, w] @ Wx^T [w, cols], each row of Wy/Wx holding two taps.
        wy_mat = _tap_matrix(gy, h)
        wx_mat = _tap_matrix(gx, w)
        out = np.matmul(np.matmul(wy_mat[None], m), wx_mat.T[None])  # [k, rows, cols]
        out = np.ascontiguousarray(out, dtype=np.float32)
        return out[0] if squeeze else out

    def source_to_input(self, row: float, col: float) -> tuple[float, float]:
        """Continuous source coordinates (row, column) -> model input coordinates (y, x)."""
        return (self.pad_top + row * self.scale_y, self.pad_left + col * self.scale_x)


def _bilinear_taps(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.clip(g, 0.0, n - 1.0)
    i0 = np.floor(g).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, g - i0


def _tap_matrix(g: np.ndarray, n: int) -> np.ndarray:
    """[len(g), n] float32 linear-interpolation weights at fractional cell indices `g`
    (clamped at the borders: edge cells extend to the edge)."""
    i0, i1, frac = _bilinear_taps(g, n)
    mat = np.zeros((len(g), n), dtype=np.float64)
    rows = np.arange(len(g))
    np.add.at(mat, (rows, i0), 1.0 - frac)
    np.add.at(mat, (rows, i1), frac)
    return mat.astype(np.float32)


def letterbox_transform(shape: tuple[int, int], size: int) -> Transform:
    """The `Transform` that `letterbox` returns for an image of `shape`, without the image."""
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"empty image shape {shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    scale = size / max(rows, cols)
    new_h = max(1, min(size, int(round(rows * scale))))
    new_w = max(1, min(size, int(round(cols * scale))))
    return Transform(
        source_shape=(rows, cols),
        size=size,
        scale=scale,
        scale_y=new_h / rows,
        scale_x=new_w / cols,
        pad_top=(size - new_h) // 2,
        pad_left=(size - new_w) // 2,
        resized_shape=(new_h, new_w),
    )


def letterbox(
    image: np.ndarray, size: int, source_shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, Transform]:
    """Fit the whole image into `size` x `size`: the longer side scaled to `size`, the other
    padded symmetrically with 0. Anti-aliased bilinear resampling. Returns float32 and the
    `Transform` that maps results back to the source.

    ``source_shape``: the source's (rows, columns) when ``image`` is a reduced-resolution decode
    of it (`decode_reduced`): the transform is the source's, and the image is resampled to the
    same box, so results map back onto the source's own pixels."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D image, got shape {img.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    rows, cols = img.shape
    if rows < 1 or cols < 1:
        raise ValueError(f"empty image {img.shape}")
    transform = letterbox_transform(source_shape or (rows, cols), size)
    new_h, new_w = transform.resized_shape
    if (new_h, new_w) == (rows, cols):
        resized = img
    else:
        resized = resize_plane(img, (new_h, new_w))
    out = np.zeros((size, size), dtype=np.float32)
    top, left = transform.pad_top, transform.pad_left
    out[top : top + new_h, left : left + new_w] = resized
    return out, transform


def normalize(image: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """[size, size] grey image in 0..1 -> float32 tensor [3, size, size], mean/std normalised."""
    img = np.asarray(image, dtype=np.float32)
    if img.shape != (preprocessing.size, preprocessing.size):
        raise ValueError(
            f"image shape {img.shape} does not match the model input size {preprocessing.size}"
        )
    t = torch.from_numpy(np.ascontiguousarray(img))[None].expand(3, -1, -1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
    return ((t - mean) / std).contiguous()
