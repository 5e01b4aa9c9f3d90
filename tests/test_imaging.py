"""Decoding, photometric handling, letterbox geometry and its inverse on real and synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from workers.imaging import ImageError, Preprocessing, decode, letterbox, normalize

# --------------------------------------------------------------------------------------------
# helpers


def make_ds(
    arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **attrs: object
) -> Dataset:
    ds = Dataset()
    ds.set_pixel_data(arr, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def phantom(rows: int = 96, cols: int = 80, top: int = 4095) -> np.ndarray:
    """Smooth ramp plus a bright square: distinct values almost everywhere."""
    y, x = np.mgrid[0:rows, 0:cols]
    img = (x * 17 + y * 31) % 3000 + 200
    img[30:50, 20:40] = top - 50
    return img.astype(np.uint16)


def rg1_path(name: str) -> str:
    path = get_testdata_file(name)  # pydicom-data's external source registers these files
    assert path is not None, f"{name} not found: is pydicom-data installed?"
    return str(path)


# --------------------------------------------------------------------------------------------
# decode: real data


def test_decode_rg1_jpeg2000_monochrome1() -> None:
    ds = dcmread(rg1_path("RG1_J2KR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = decode(ds)
    assert img.dtype == np.float32
    assert img.shape == (1955, 1841) == (ds.Rows, ds.Columns)
    assert 0.0 <= img.min() < 0.3 and 0.7 < img.max() <= 1.0
    # bright = dense after inversion: the mediastinum is brighter than both lung fields
    r0, r1 = int(0.30 * 1955), int(0.55 * 1955)
    mediastinum = img[r0:r1, int(0.46 * 1841) : int(0.54 * 1841)].mean()
    right_lung = img[r0:r1, int(0.20 * 1841) : int(0.33 * 1841)].mean()
    left_lung = img[r0:r1, int(0.67 * 1841) : int(0.80 * 1841)].mean()
    print(f"RG1 mean mediastinum {mediastinum:.3f}, lungs {right_lung:.3f} / {left_lung:.3f}")
    assert mediastinum > right_lung + 0.1 and mediastinum > left_lung + 0.1
    # lossless JPEG 2000 decodes to exactly the uncompressed file's image
    np.testing.assert_array_equal(img, decode(dcmread(rg1_path("RG1_UNCR.dcm"))))


# --------------------------------------------------------------------------------------------
# decode: synthetic


def test_monochrome1_inverts_ordering() -> None:
    arr = phantom()
    m2 = decode(make_ds(arr, "MONOCHROME2"))
    m1 = decode(make_ds(arr, "MONOCHROME1"))
    # same stored values: MONOCHROME1 shows high values dark
    assert m2[40, 30] > 0.9 and m1[40, 30] < 0.1
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_complementary_monochrome1_and_2_decode_identically() -> None:
    top = 4095
    arr = phantom(top=top)
    comp = (top - arr.astype(np.int32)).astype(np.uint16)
    # percentile window (no window in the header)
    a = decode(make_ds(arr, "MONOCHROME2"))
    b = decode(make_ds(comp, "MONOCHROME1"))
    print(f"percentile window: max |M2 - M1| = {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-5)
    # header window: PS3.3 C.11.2.1.2 on stored values, centre mirrored for the complement
    c, w = 1800.0, 2400.0
    a = decode(make_ds(arr, "MONOCHROME2", WindowCenter=c, WindowWidth=w))
    b = decode(make_ds(comp, "MONOCHROME1", WindowCenter=top - c + 1, WindowWidth=w))
    print(f"header window: max |M2 - M1| = {np.abs(a - b).max():.2e}")
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.min() == 0.0 and a.max() == 1.0  # the window clips


def test_modality_lut_and_window_in_output_units() -> None:
    arr = np.tile(np.arange(0, 64, dtype=np.uint16) * 10, (32, 1))  # stored 0..630
    # HU = 2 * stored - 1000: window [-1000, 260] over output values covers stored 0..630
    ds = make_ds(
        arr,
        "MONOCHROME2",
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=-370,
        WindowWidth=1261,
    )
    img = decode(ds)
    row = img[0]
    assert np.all(np.diff(row) > 0)
    assert row[0] == pytest.approx(0.0, abs=1e-3) and row[-1] == pytest.approx(1.0, abs=1e-3)


def test_multiframe_takes_first_frame_and_rgb_gives_luminance() -> None:
    frames = np.stack([phantom(), np.zeros((96, 80), np.uint16) + 7])
    img = decode(make_ds(frames, "MONOCHROME2"))
    np.testing.assert_allclose(img, decode(make_ds(phantom(), "MONOCHROME2")))

    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green
    out = decode(make_ds(rgb, "RGB", bits=8))
    assert out.shape == (40, 50)
    np.testing.assert_allclose(out, 0.587, atol=1e-6)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: Dataset(), "no pixel data"),
        (lambda: make_ds(np.zeros((8, 8), np.uint16) + 3), "too small"),
        (lambda: make_ds(np.zeros((64, 64), np.uint16) + 3), "uniform"),
        (lambda: _truncated(), "cannot decode"),
    ],
)
def test_unusable_images_raise_image_error(make: object, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode(make())  # type: ignore[operator]


def _truncated() -> Dataset:
    ds = make_ds(phantom())
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    return ds


# --------------------------------------------------------------------------------------------
# geometry


def _box_image(rows: int, cols: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((rows, cols), dtype=np.float32)
    r0, r1, c0, c1 = box
    img[r0:r1, c0:c1] = 1.0
    return img


@pytest.mark.parametrize(
    "shape, box",
    [
        ((900, 500), (400, 640, 120, 300)),  # portrait
        ((480, 1000), (60, 260, 620, 900)),  # landscape
        ((700, 700), (100, 330, 380, 600)),  # square
        ((1955, 1841), (900, 1400, 200, 700)),  # RG1's geometry
    ],
)
def test_letterbox_token_grid_round_trip(shape: tuple[int, int], box: tuple[int, ...]) -> None:
    size, patch = 224, 14
    src = _box_image(*shape, box)  # type: ignore[arg-type]
    boxed, transform = letterbox(src, size)
    assert boxed.shape == (size, size) and boxed.dtype == np.float32
    g = size // patch
    tokens = boxed.reshape(g, patch, g, patch).mean(axis=(1, 3))  # average pooling to the grid
    back = transform.to_source(tokens)
    assert back.shape == shape
    pred = back >= 0.5
    truth = src > 0.5
    iou = (pred & truth).sum() / (pred | truth).sum()
    print(f"{shape}: IoU after 14-px token grid round trip = {iou:.3f}")
    assert iou > 0.7


def test_letterbox_pads_symmetrically_and_input_maps_back() -> None:
    rows, cols = 300, 150
    y, x = np.mgrid[0:rows, 0:cols]
    src = (0.5 + 0.4 * np.sin(x / 25.0) * np.cos(y / 40.0)).astype(np.float32)
    boxed, t = letterbox(src, 100)
    assert t.resized_shape == (100, 50) and (t.pad_top, t.pad_left) == (0, 25)
    assert np.all(boxed[:, :25] == 0) and np.all(boxed[:, 75:] == 0)
    assert boxed[:, 25:75].min() > 0.05
    # a map at model-input resolution maps back onto the source (smooth image: small error)
    back = t.to_source(boxed)
    assert back.shape == (rows, cols)
    err = np.abs(back - src)[3:-3, 3:-3].max()
    print(f"input-size round trip max error {err:.4f}")
    assert err < 0.05
    # several maps at once
    stacked = t.to_source(np.stack([boxed, 1 - boxed]))
    assert stacked.shape == (2, rows, cols)
    np.testing.assert_allclose(stacked[0], back)


def test_normalize() -> None:
    pre = Preprocessing(size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = np.full((28, 28), 0.75, dtype=np.float32)
    t = normalize(img, pre)
    assert t.shape == (3, 28, 28) and t.dtype == torch.float32
    assert torch.allclose(t, torch.ones_like(t))
    with pytest.raises(ValueError):
        normalize(np.zeros((10, 10), np.float32), pre)


# --------------------------------------------------------------------------------------------
# decode pool and GPU decode


def test_letterbox_transform_matches_letterbox() -> None:
    from workers.imaging import letterbox_transform

    for shape in ((1955, 1841), (300, 150), (64, 64), (17, 400)):
        _, t = letterbox(np.zeros(shape, np.float32), 224)
        assert letterbox_transform(shape, 224) == t


def test_decode_pool_matches_serial_decode_in_order() -> None:
    from workers.decode_pool import DecodePool

    names = ["RG1_J2KR.dcm", "CT_small.dcm", "MR_small.dcm"]
    paths = [rg1_path(n) for n in names]
    bad = b"not a dicom file"
    with DecodePool(size=224, workers=2) as pool:
        out = list(pool.imap([(n, p) for n, p in zip(names, paths, strict=True)] + [("bad", bad)]))
    assert [d.sop for d in out] == [*names, "bad"]
    for d, p in zip(out[:3], paths, strict=True):
        assert d.error is None and d.image is not None and d.backend == "cpu"
        expected = decode(dcmread(p))
        np.testing.assert_array_equal(d.image.display, expected)
        boxed, transform = letterbox(expected, 224)
        np.testing.assert_array_equal(d.image.boxed, boxed)
        assert d.image.transform == transform and d.decode_s > 0
    assert out[3].image is None and out[3].error


def test_gpu_decode_falls_back_to_cpu_when_unavailable() -> None:
    from workers.decode_pool import decode_auto, nvimgcodec_available

    ds = dcmread(rg1_path("RG1_J2KR.dcm"))
    image, backend = decode_auto(ds)
    assert backend == ("gpu" if nvimgcodec_available() else "cpu")
    np.testing.assert_array_equal(image, decode(dcmread(rg1_path("RG1_UNCR.dcm"))))


def test_nvimgcodec_gpu_decode_equals_cpu_decode() -> None:
    from workers.decode_pool import decode_gpu, nvimgcodec_available, nvimgcodec_unavailable_reason

    if not nvimgcodec_available():
        pytest.skip(
            "GPU decode path NOT tested here: nvidia.nvimgcodec is not importable or "
            f"finds no GPU ({nvimgcodec_unavailable_reason()}); the CPU path is tested"
        )
    for name in ("RG1_J2KR.dcm", "RG3_J2KR.dcm"):
        ds = dcmread(rg1_path(name))
        np.testing.assert_array_equal(decode_gpu(ds), decode(dcmread(rg1_path(name))))
