"""Overlays land on the source pixels: model + writers on synthetic radiographs, read back.

Synthetic CR sources carry one bright rectangle at a known place: portrait, landscape and
square; MONOCHROME1 and MONOCHROME2; Pixel Spacing absent, valid, anisotropic and 0.000. The
DEMO bundle (random ViT-S/14 weights) gets two test-only adapters, fitted here by least squares
on *other* synthetic images (rectangles elsewhere, other sizes), never on the test cases:

- a segmentation head along the direction in patch-token space that separates bright from dark
  patches (target: the fraction of each patch inside the rectangle, minus 1/2);
- an encoder wrapper whose last-layer CLS attention follows the same direction (a normalised
  sigmoid of the head's logits), so the attention heatmap marks the rectangle too.

- a classifier whose patch half is the same direction (CLS half zero), so every label's
  class-activation map marks the rectangle; biases make all labels but the last positive.

Everything after that is production code: ``imaging.decode``, ``ModelRunner.run`` (letterbox,
encoder, heads, resampling to source pixels, ``workers.localize`` regions) and
``build_outputs``. The SEG and the Parametric Map are read back (highdicom) and compared with
the known rectangle by IoU; the SR's SCOORD point of each finding must fall inside the
rectangle, and each positive finding's Image Region (POLYLINE box) must contain it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian
from torch import nn

from pacs_agent.uids import derive_uid
from tests.dciodvfy import requires_dciodvfy, run_dciodvfy, split_findings
from workers.dicom_out.outputs import OutputOptions, build_outputs
from workers.dicom_out.pm import own_frame_of_reference_uid
from workers.imaging import decode, letterbox, normalize
from workers.models.adapters import ClassificationHead, LinearSegHead
from workers.models.bundle import Bundle, load_bundle
from workers.models.runner import ModelRunner
from workers.results import AlgorithmInfo, ImageResult

# IoU lower bounds (measured: SEG 0.89 to 0.93, map 0.78 to 0.85). The model sees a 224 px
# letterbox on a 16 x 16 token grid (14 px patches): a patch covers 15 to 25 source pixels here,
# so boundaries are off by up to about half a patch. A misregistered overlay (mirrored,
# transposed, shifted by the letterbox padding) scores far lower: see the mirrored control.
MIRRORED_IOU_MAX = 0.2
SEG_IOU_MIN = 0.8
PM_IOU_MIN = 0.7
# SR regions (bounding boxes of the CAM at half maximum around the peak): the box covers at
# least this fraction of the rectangle's pixels, and its IoU with it is at least REGION_IOU_MIN
# (measured: IoU 0.95 to 0.97, cover 0.96 to 1.0).
REGION_COVER_MIN = 0.9
REGION_IOU_MIN = 0.85
STUDY_UID = derive_uid("geometry test study")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: int
    cols: int
    photometric: str
    spacing: tuple[str, str] | None
    box: tuple[float, float, float, float]  # top, bottom, left, right as fractions
    orientation: tuple[str, str] | None = None


CASES = [
    Case("portrait-mono1-nospacing", 320, 240, "MONOCHROME1", None, (0.15, 0.45, 0.5, 0.85)),
    Case("landscape-mono2-spacing", 240, 320, "MONOCHROME2", ("0.2", "0.2"), (0.5, 0.85, 0.1, 0.4)),
    Case(
        "square-mono1-zero-spacing",
        256,
        256,
        "MONOCHROME1",
        ("0.000", "0.000"),
        (0.55, 0.9, 0.55, 0.9),
        ("L", "F"),
    ),
    Case("tall-mono2-anisotropic", 360, 200, "MONOCHROME2", ("0.1", "0.2"), (0.6, 0.85, 0.1, 0.45)),
    Case(
        "wide-mono1-spacing",
        200,
        360,
        "MONOCHROME1",
        ("0.15", "0.15"),
        (0.1, 0.5, 0.6, 0.8),
        ("R", "F"),
    ),
    Case("square-mono2-nospacing", 300, 300, "MONOCHROME2", None, (0.1, 0.4, 0.1, 0.45)),
]


def box_mask(rows: int, cols: int, box: tuple[float, float, float, float]) -> np.ndarray:
    top, bottom, left, right = box
    mask = np.zeros((rows, cols), dtype=bool)
    mask[round(top * rows) : round(bottom * rows), round(left * cols) : round(right * cols)] = True
    return mask


def make_source(
    name: str,
    rows: int,
    cols: int,
    photometric: str,
    mask: np.ndarray,
    spacing: tuple[str, str] | None = None,
    orientation: tuple[str, str] | None = None,
    seed: int = 0,
) -> Dataset:
    """A CR image, 12-bit, dim noisy background with ``mask`` bright (in display sense)."""
    rng = np.random.default_rng(seed)
    display = 0.2 + 0.05 * rng.standard_normal((rows, cols))
    display[mask] = 0.8 + 0.05 * rng.standard_normal(int(mask.sum()))
    display = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        display = 1.0 - display  # MONOCHROME1: low values are bright
    stored = np.round(display * 4095).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = derive_uid("geometry test", name)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = derive_uid("geometry test series")
    ds.PatientName = "Geometry^Test"
    ds.PatientID = "GEOMETRY"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240506"
    ds.StudyTime = "070809"
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = list(orientation) if orientation else ""
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    ds.PixelData = stored.tobytes()
    return ds


# --------------------------------------------------------------------------- test-only model


def _tokens(bundle: Bundle, images: list[np.ndarray]) -> torch.Tensor:
    pre = bundle.preprocessing
    batch = torch.stack([normalize(letterbox(image, pre.size)[0], pre) for image in images])
    with torch.inference_mode():
        return bundle.encoder(batch).patch_tokens  # [B, N, D]


def _patch_fractions(bundle: Bundle, masks: list[np.ndarray], grid: int) -> torch.Tensor:
    pre = bundle.preprocessing
    patch = bundle.encoder_config.patch_size
    out = []
    for mask in masks:
        boxed = letterbox(mask.astype(np.float32), pre.size)[0][: grid * patch, : grid * patch]
        out.append(boxed.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1))
    return torch.from_numpy(np.stack(out))  # [B, N]


def fit_brightness_head(bundle: Bundle) -> LinearSegHead:
    """Least-squares linear head: patch token -> (fraction of the patch in the region) - 1/2."""
    rng = np.random.default_rng(1)
    images, masks = [], []
    for i, (rows, cols) in enumerate(
        [
            (280, 210),
            (210, 280),
            (240, 240),
            (330, 190),
            (190, 330),
            (260, 300),
            (300, 260),
            (220, 220),
        ]
    ):
        top, left = rng.uniform(0.05, 0.5, size=2)
        height, width = rng.uniform(0.2, 0.45, size=2)
        mask = box_mask(rows, cols, (top, top + height, left, left + width))
        photometric = ("MONOCHROME1", "MONOCHROME2")[i % 2]
        source = make_source(f"train-{i}", rows, cols, photometric, mask, seed=100 + i)
        images.append(decode(source))
        masks.append(mask)
    tokens = _tokens(bundle, images)
    grid = int(round(tokens.shape[1] ** 0.5))
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    y = (_patch_fractions(bundle, masks, grid).reshape(-1) - 0.5).double()
    design = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), dim=1)
    ridge = 1e-3 * torch.eye(design.shape[1], dtype=x.dtype)
    solution = torch.linalg.solve(design.T @ design + ridge, design.T @ y)
    head = LinearSegHead(x.shape[1], 1)
    with torch.no_grad():
        head.linear.weight.copy_(solution[:-1].float()[None])
        head.linear.bias.copy_(solution[-1:].float())
    return head.eval()


class BrightnessAttention(nn.Module):
    """The encoder, with its last CLS attention replaced by a normalised sigmoid of ``head``."""

    def __init__(self, encoder: nn.Module, head: LinearSegHead, sharpness: float = 20.0) -> None:
        super().__init__()
        self.inner = encoder
        self.head = head
        self.sharpness = sharpness
        self.cfg = cast(Any, encoder).cfg

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> Any:
        out = self.inner(pixel_values, output_attentions=output_attentions)
        if out.last_attention is None:
            return out
        logits = self.head.linear(out.patch_tokens)[..., 0]  # [B, N]
        weights = torch.sigmoid(self.sharpness * logits)
        weights = weights / weights.sum(dim=1, keepdim=True)
        attention = torch.zeros_like(out.last_attention)
        attention[:, :, 0, out.n_prefix_tokens :] = weights[:, None, :]
        return dataclasses.replace(out, last_attention=attention)


def brightness_classifier(head: LinearSegHead, n_labels: int) -> ClassificationHead:
    """Every label's CAM = the brightness head's logit per patch (plus a constant); the
    biases make labels positive (probability ~1) except the last (~0)."""
    dim = head.dim
    classifier = ClassificationHead(dim, n_labels)
    with torch.no_grad():
        classifier.linear.weight.zero_()
        classifier.linear.weight[:, dim:] = head.linear.weight[0]
        classifier.linear.bias.fill_(8.0)
        classifier.linear.bias[-1] = -8.0
    return classifier.eval()


@pytest.fixture(scope="module")
def bundle(demo_bundle: Path) -> Bundle:
    """The session's DEMO bundle (``write_demo_bundle``), with the test-only adapters."""
    loaded = load_bundle(demo_bundle)
    head = fit_brightness_head(loaded)
    loaded.segmenter = head
    loaded.classifier = brightness_classifier(head, len(loaded.labels))
    loaded.seg_classes = ["Bright region"]
    loaded.encoder = cast(Any, BrightnessAttention(loaded.encoder, head))
    return loaded


@dataclasses.dataclass
class Run:
    sources: list[Dataset]
    truths: dict[str, np.ndarray]
    results: list[ImageResult]
    outputs: dict[tuple[str, str | None], bytes]


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run(bundle: Bundle) -> Iterator[Run]:
    sources: list[Dataset] = []
    truths: dict[str, np.ndarray] = {}
    for n, case in enumerate(CASES):
        truth = box_mask(case.rows, case.cols, case.box)
        source = make_source(
            case.name,
            case.rows,
            case.cols,
            case.photometric,
            truth,
            case.spacing,
            case.orientation,
            seed=n,
        )
        source.InstanceNumber = n + 1
        # through bytes, as the worker gets it from the agent
        sources.append(pydicom.dcmread(io.BytesIO(_encode(source))))
        truths[str(source.SOPInstanceUID)] = truth
    runner = ModelRunner(bundle, batch_size=len(sources))
    results = runner.run([(str(s.SOPInstanceUID), decode(s)) for s in sources])
    algorithm = AlgorithmInfo(
        name=bundle.name, version=bundle.version, checksum=bundle.checksum, is_demo=True
    )
    built = build_outputs(
        sources, results, algorithm, 1, OutputOptions(parametric_map=True), triage="urgent"
    )
    yield Run(
        sources=sources,
        truths=truths,
        results=results,
        outputs={(kind, src): _encode(ds) for kind, ds, src in built},
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seg_lands_on_the_bright_region(run: Run, case: Case) -> None:
    uid = derive_uid("geometry test", case.name)
    seg = hd.seg.segread(io.BytesIO(run.outputs[("seg", uid)]))
    assert [ref[2] for ref in seg.get_source_image_uids()] == [uid]
    pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1])
    mask = pixels[0, ..., 0].astype(bool)
    assert mask.shape == (case.rows, case.cols)
    truth = run.truths[uid]
    score = iou(mask, truth)
    control = max(iou(mask, np.flipud(truth)), iou(mask, np.fliplr(truth)))
    print(f"{case.name}: SEG IoU {score:.3f} (mirrored truth {control:.3f})")
    assert score >= SEG_IOU_MIN
    assert control <= MIRRORED_IOU_MAX


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parametric_map_lands_on_the_bright_region(run: Run, case: Case) -> None:
    uid = derive_uid("geometry test", case.name)
    ds = pydicom.dcmread(io.BytesIO(run.outputs[("pm", uid)]))
    # highdicom 0.28.2 decodes float frames only from a pixel array pydicom has already
    # decoded (its own decoder asks for Pixel Representation, which float pixel data lacks)
    stored = ds.pixel_array
    pm = hd.pm.ParametricMap.from_dataset(ds)
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (case.rows, case.cols, 1)
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    assert derivation.SourceImageSequence[0].SpatialLocationsPreserved == "YES"
    # CR sources have no Frame of Reference: the map has one of its own, never the source's
    [source] = [s for s in run.sources if s.SOPInstanceUID == uid]
    assert pm.FrameOfReferenceUID == own_frame_of_reference_uid(source)
    heat = pm.get_frame(1)  # real world values: identity mapping
    [result] = [r for r in run.results if r.source_sop_instance_uid == uid]
    assert stored.dtype == np.float32 and np.array_equal(stored, result.heatmap)
    assert np.allclose(heat, result.heatmap)  # the float map, pixel for pixel
    # highdicom reads the geometry back: one plane, in the map's own frame
    assert pm.get_volume().spatial_shape == (1, case.rows, case.cols)
    truth = run.truths[uid]
    score = iou(heat >= 0.5, truth)
    control = max(iou(heat >= 0.5, np.flipud(truth)), iou(heat >= 0.5, np.fliplr(truth)))
    print(f"{case.name}: parametric map IoU {score:.3f} (mirrored truth {control:.3f})")
    assert score >= PM_IOU_MIN
    assert control <= MIRRORED_IOU_MAX


def _groups(
    sr: hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR,
) -> tuple[
    list[hd.sr.MeasurementsAndQualitativeEvaluations],
    list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
]:
    report = cast(hd.sr.MeasurementReport, sr.content)
    return report.get_image_measurement_groups(), report.get_planar_roi_measurement_groups()


def _group_image(
    group: hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
) -> str:
    if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        region = group.roi
        assert region is not None
        return str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return str(group.source_images[0].referenced_sop_instance_uid)


def test_sr_points_land_inside_the_bright_region(run: Run) -> None:
    sr = hd.sr.srread(io.BytesIO(run.outputs[("sr", None)]))
    image_groups, roi_groups = _groups(sr)
    groups = [*image_groups, *roi_groups]
    assert len(groups) == len(run.sources) * len(run.results[0].findings)
    seen = set()
    # positive findings: the POLYLINE region holds the peak (the test classifier gives every
    # label of an image the same CAM, so each region holds every positive label's peak)
    for group in roi_groups:
        uid = _group_image(group)
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        left, top = region.value.min(axis=0)
        right, bottom = region.value.max(axis=0)
        [result] = [r for r in run.results if r.source_sop_instance_uid == uid]
        for finding in result.findings:
            assert finding.point is not None
            x, y = finding.point[0] + 0.5, finding.point[1] + 0.5
            assert run.truths[uid][int(y), int(x)], (uid, finding.label)
            if finding.present:
                assert left <= x <= right and top <= y <= bottom, (uid, finding.label)
        seen.add(uid)
    for image_group in image_groups:
        uid = _group_image(image_group)
        # the probability is a NUM measurement with the image region (what OHIF shows)
        [probability] = image_group.get_measurements(name=codes.DCM.Probability)
        scoords = [item for item in _walk(probability[0]) if item.get("ValueType") == "SCOORD"]
        assert len(scoords) == 1, image_group.tracking_identifier
        assert scoords[0].GraphicType == "POINT"
        image = scoords[0].ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == uid
        x, y = (float(v) for v in scoords[0].GraphicData)
        truth = run.truths[uid]
        assert truth[int(y), int(x)], f"{uid}: SCOORD ({x}, {y}) outside the bright region"
        seen.add(uid)
    assert seen == set(run.truths)


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def _box_mask(rows: int, cols: int, polyline: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside the axis-aligned box of a closed POLYLINE."""
    left, top = polyline.min(axis=0)
    right, bottom = polyline.max(axis=0)
    r = np.arange(rows)[:, None] + 0.5
    c = np.arange(cols)[None, :] + 0.5
    return (r >= top) & (r <= bottom) & (c >= left) & (c <= right)


def test_sr_regions_contain_the_bright_region(run: Run) -> None:
    """Each positive finding: a TID 1410 group whose Image Region is a closed 5-point POLYLINE
    box on its image that contains the bright rectangle (IoU printed); negatives keep TID 1501."""
    sr = hd.sr.srread(io.BytesIO(run.outputs[("sr", None)]))
    image_groups, roi_groups = _groups(sr)
    positives = [f for r in run.results for f in r.findings if f.present]
    negatives = [f for r in run.results for f in r.findings if not f.present]
    assert positives and negatives  # the test classifier makes both
    assert len(roi_groups) == len(positives)
    assert len(image_groups) == len(negatives)
    names = {c.name: c for c in CASES}
    by_uid = {derive_uid("geometry test", name): case for name, case in names.items()}
    seen = set()
    for group in roi_groups:
        [evaluation] = group.get_qualitative_evaluations(name=group.finding_type)
        assert evaluation.value == codes.SCT.Present
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])
        uid = _group_image(group)
        case = by_uid[uid]
        truth = run.truths[uid]
        box = _box_mask(case.rows, case.cols, points)
        cover = float((box & truth).sum() / truth.sum())
        score = iou(box, truth)
        control = max(iou(box, np.flipud(truth)), iou(box, np.fliplr(truth)))
        if uid not in seen:
            print(
                f"{case.name}: SR region IoU {score:.3f}, covers {cover:.3f} of the rectangle "
                f"(mirrored truth {control:.3f})"
            )
        assert cover >= REGION_COVER_MIN, f"{case.name}: region covers {cover:.3f}"
        assert score >= REGION_IOU_MIN, f"{case.name}: region IoU {score:.3f}"
        assert control <= MIRRORED_IOU_MAX
        seen.add(uid)
    assert seen == set(run.truths)


@requires_dciodvfy
def test_sr_with_regions_passes_dciodvfy(run: Run) -> None:
    errors, _ = split_findings(run_dciodvfy(run.outputs[("sr", None)]))
    assert errors == []
