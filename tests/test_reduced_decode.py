"""Reduced-resolution JPEG 2000 decoding (`workers.imaging.decode_reduced`) and what uses it:
the decode pool, the letterbox with the source's transform, the Secondary Capture's background.

Real data: NEMA RG1 (1955 x 1841, 15-bit, lossless J2K) from pydicom-data, and synthetic images
encoded here with pylibjpeg-openjpeg (8-, 12- and 16-bit, signed, multi-frame)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from openjpeg.utils import encode_array
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from workers.imaging import (
    ImageError,
    decode,
    decode_reduced,
    expand_reduced,
    letterbox,
    letterbox_transform,
    reduction_levels,
    resize_plane,
)


def _rg1() -> Dataset:
    path = get_testdata_file("RG1_J2KR.dcm")
    assert path is not None, "RG1_J2KR.dcm not found: is pydicom-data installed?"
    return dcmread(str(path))


def _phantom(rows: int, cols: int, top: int, seed: int = 0) -> np.ndarray:
    """A smooth image with a bright disc and some noise: what a wavelet band keeps."""
    y, x = np.mgrid[0:rows, 0:cols]
    img = (x / cols + y / rows) * top * 0.4
    img[(y - rows / 2) ** 2 + (x - cols / 3) ** 2 < (rows / 6) ** 2] = top * 0.9
    img += np.random.default_rng(seed).normal(0, top * 0.01, img.shape)
    return np.clip(img, 0, top).astype(np.uint16 if top > 255 else np.uint8)


def _j2k_ds(frames: list[np.ndarray], bits: int, *, signed: bool = False) -> Dataset:
    """A CR-like dataset whose frames are J2K lossless codestreams made by OpenJPEG."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = frames[0].shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if frames[0].dtype == np.uint8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    streams = [encode_array(f, bits_stored=bits) for f in frames]
    ds.PixelData = encapsulate(streams)
    ds["PixelData"].VR = "OB"
    return ds


def test_rg1_decodes_at_half_resolution_close_to_the_full_decode() -> None:
    ds = _rg1()
    full = decode(ds)
    reduced = decode_reduced(ds, 224)
    assert reduced is not None and reduced.dtype == np.float32
    assert reduced.shape == (978, 921)  # ceil(1955 / 2), ceil(1841 / 2)
    assert 0.0 <= reduced.min() and reduced.max() <= 1.0
    for size in (224, 256):
        boxed_full, t_full = letterbox(full, size)
        boxed_red, t_red = letterbox(reduced, size, source_shape=full.shape)
        assert t_red == t_full  # the maps land on the source's pixels either way
        diff = np.abs(boxed_full - boxed_red)
        # measured: mean 0.0007, p99 0.006, max 0.022 at 224 px (docs/benchmarks.md)
        assert diff.mean() < 0.002 and np.percentile(diff, 99) < 0.012 and diff.max() < 0.05


def test_reduction_levels() -> None:
    # RG1 at 224 px: one halving (978 >= 448); two would need Pillow to size 1841 / 4 as
    # OpenJPEG does (460 against 461): refused.
    assert reduction_levels(1955, 1841, 224, levels=5) == 1
    assert reduction_levels(1955, 1841, 518, levels=5) == 0  # 978 < 2 x 518: every pixel
    assert reduction_levels(4096, 4096, 224, levels=5) == 3  # 512 >= 448; 256 would not be
    assert reduction_levels(4096, 4096, 224, levels=2) == 2  # no more than the codestream has
    assert reduction_levels(300, 300, 224, levels=5) == 0
    for rows, cols in ((1955, 1841), (3000, 2500), (2049, 1537), (4096, 3072)):
        for size in (224, 518):
            r = reduction_levels(rows, cols, size, levels=6)
            power = 1 << r
            assert max(-(-rows // power), -(-cols // power)) >= 2 * size or r == 0


@pytest.mark.parametrize(("bits", "top"), [(8, 255), (12, 4095), (16, 65535)])
def test_synthetic_depths_decode_reduced_like_full(bits: int, top: int) -> None:
    img = _phantom(1024, 900, top)
    ds = _j2k_ds([img], bits)
    reduced = decode_reduced(ds, 128)  # 1024 -> 256 px: two halvings
    assert reduced is not None and reduced.shape == (256, 225)
    full = decode(ds)
    boxed_full, _ = letterbox(full, 128)
    boxed_red, _ = letterbox(reduced, 128, source_shape=full.shape)
    assert np.abs(boxed_full - boxed_red).mean() < 0.01


def test_multiframe_reduces_the_analysed_frame_only() -> None:
    frames = [_phantom(512, 512, 4095, seed=i) // (i + 1) for i in range(3)]
    ds = _j2k_ds(frames, 12)
    ds.RepresentativeFrameNumber = 3
    reduced = decode_reduced(ds, 64)
    assert reduced is not None
    for frame in (1, 2, 3):
        full = decode(ds, frame)
        got = decode_reduced(ds, 64, frame)
        assert got is not None
        boxed_full, _ = letterbox(full, 64)
        boxed_red, _ = letterbox(got, 64, source_shape=full.shape)
        assert np.abs(boxed_full - boxed_red).mean() < 0.01
    np.testing.assert_array_equal(reduced, decode_reduced(ds, 64, 3))


def test_what_does_not_qualify_is_left_to_the_full_decode() -> None:
    ds = _rg1()
    assert decode_reduced(ds, 518) is None  # not four times the input
    signed = _j2k_ds([_phantom(512, 512, 2047)], 12, signed=True)
    assert decode_reduced(signed, 64) is None
    other_syntax = get_testdata_file("CT_small.dcm")
    assert other_syntax is not None and decode_reduced(dcmread(other_syntax), 16) is None
    colour = get_testdata_file("US1_J2KR.dcm")
    assert colour is not None and decode_reduced(dcmread(colour), 16) is None
    # a damaged codestream: no reduced image, and the full decode says what is wrong
    broken = copy.deepcopy(_j2k_ds([_phantom(512, 512, 4095)], 12))
    data = bytearray(broken.PixelData)
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)
    broken.PixelData = bytes(data)
    assert decode_reduced(broken, 64) is None


def test_decode_pool_reduced_keeps_the_source_geometry() -> None:
    from workers.decode_pool import DecodePool

    path = get_testdata_file("RG1_J2KR.dcm")
    ct = get_testdata_file("CT_small.dcm")
    assert path is not None and ct is not None
    with DecodePool(size=224, workers=1, reduced=True) as pool:
        rg1, small = list(pool.imap([("rg1", str(path)), ("ct", str(ct))]))
    assert rg1.error is None and rg1.backend == "cpu-reduced"
    assert rg1.image.display.shape == (978, 921)
    assert rg1.image.transform == letterbox_transform((1955, 1841), 224)
    assert small.backend == "cpu" and small.image.display.shape == (128, 128)


def test_secondary_capture_background_from_a_reduced_decode() -> None:
    from workers.dicom_out.sc import build_heatmap_sc
    from workers.results import AlgorithmInfo, OutputIdentity

    ds = _rg1()
    reduced = decode_reduced(ds, 224)
    assert reduced is not None
    heat = np.zeros((1955, 1841), np.float32)
    heat[900:1100, 800:1000] = 1.0
    algorithm = AlgorithmInfo(name="test", version="1", checksum="0" * 64, is_demo=True)
    identity = OutputIdentity(
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=901,
        instance_number=1,
        series_description="test",
    )
    sc = build_heatmap_sc(ds, reduced, heat, algorithm, identity)
    rgb = sc.pixel_array
    assert rgb.shape == (1955, 1841, 3)
    # the grey background is the source, resampled: close to the full decode away from the
    # banner, the legend and the heat
    grey = rgb[1300:1900, 100:700, 0].astype(np.float32) / 255.0
    expected = decode(ds)[1300:1900, 100:700]
    assert np.abs(grey - expected).mean() < 0.01
    r, _, b = (int(v) for v in rgb[1000, 900])
    assert r > b + 40  # the heat lies where it was put
    # a display of any other shape is still refused
    with pytest.raises(ValueError, match="shape"):
        build_heatmap_sc(ds, np.zeros((500, 500), np.float32), heat, algorithm, identity)


def test_resize_plane_round_trip() -> None:
    img = _phantom(200, 180, 4095).astype(np.float32) / 4095
    small = resize_plane(img, (100, 90))
    back = resize_plane(small, (200, 180))
    assert small.shape == (100, 90) and back.shape == (200, 180)
    assert np.abs(back - img).mean() < 0.02
    np.testing.assert_array_equal(resize_plane(img, (200, 180)), img)


@pytest.mark.parametrize("mode", ["reduced", "full", None])
def test_the_worker_pool_follows_the_setting(tmp_path: Path, mode: str | None) -> None:
    from pacs_agent.db.session import Database
    from pacs_agent.settings import Settings
    from workers.pipeline import WorkerContext

    extra = {} if mode is None else {"decode_resolution": mode}
    settings = Settings(data_dir=tmp_path, worker_device="cpu", decode_workers=1, **extra)
    ctx = WorkerContext(settings, Database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    pool = ctx.decode_pool(64)
    try:
        assert pool.reduced is (mode != "full")  # reduced by default
    finally:
        pool.close()
        ctx.db.dispose()


def test_padding_and_flat_images_are_left_to_the_full_decode() -> None:
    padded = _j2k_ds([_phantom(1024, 900, 4095)], 12)
    padded.PixelPaddingValue = 0  # a reduced border pixel would blend padding and tissue
    assert decode_reduced(padded, 128) is None
    flat = _j2k_ds([np.full((1024, 900), 700, np.uint16)], 12)
    assert decode_reduced(flat, 128) is None  # the full decode says why it is refused
    with pytest.raises(ImageError):
        decode(flat)


@pytest.mark.parametrize("power", [2, 4, 8])
def test_expand_reduced_puts_each_sample_on_its_source_pixel(power: int) -> None:
    rows, cols = 61, 50  # odd and even sides
    # A level-r decode of a ramp f(i, j) = i + 1000 j holds f at the source pixels 2^r k.
    reduced = np.add.outer(
        np.arange(-(-rows // power)) * power, np.arange(-(-cols // power)) * power * 1000.0
    ).astype(np.float32)
    out = expand_reduced(reduced, (rows, cols))
    expected = np.add.outer(np.arange(rows), np.arange(cols) * 1000.0)
    last_r = (reduced.shape[0] - 1) * power  # beyond the last sample the edge value extends
    last_c = (reduced.shape[1] - 1) * power
    np.testing.assert_allclose(
        out[: last_r + 1, : last_c + 1], expected[: last_r + 1, : last_c + 1], atol=1e-2
    )
    with pytest.raises(ValueError, match="reduction"):
        expand_reduced(np.zeros((20, 20), np.float32), (rows, cols))
