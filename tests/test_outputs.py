"""build_outputs: which objects each option combination produces, their series, UIDs and validity.

Model results are synthetic here (findings, a mask, a heatmap): what is tested is the choice and
identity of the objects and that dciodvfy reports no error on any of them, for every option
combination on a two-image study, and for every object variant on the NEMA radiographs (RG1:
MONOCHROME1 15-bit, Pixel Spacing 0.000; RG3: Laterality R) and pydicom files of other
photometric interpretations and bit depths.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import itertools
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from pacs_agent.settings import Settings
from pacs_agent.uids import derive_uid
from tests.dciodvfy import requires_dciodvfy, run_dciodvfy, split_findings
from workers.dicom_out.outputs import (
    SEG_PROBABILITIES_KEY,
    OutputOptions,
    SegType,
    SrFlavour,
    build_outputs,
    localise,
)
from workers.dicom_out.sr import TRIAGE_CODES
from workers.results import AlgorithmInfo, Finding, ImageResult

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmInfo(
    name="pacs-agent chest demo - DEMO (random weights)",
    version="0.1.0-demo",
    checksum="fedcba9876543210" * 4,
    is_demo=True,
)
REAL = AlgorithmInfo(name="chest adapters", version="1.2.0", checksum="ab" * 32)

SOP_CLASSES = {
    "sr": {Comprehensive3DSRStorage, BasicTextSRStorage},
    "seg": {SegmentationStorage},
    "sc": {SecondaryCaptureImageStorage},
    "pm": {ParametricMapStorage},
    "ko": {KeyObjectSelectionDocumentStorage},
}
DESCRIPTIONS = {
    "sr": "AI findings",
    "seg": "AI segmentation",
    "sc": "AI heatmap",
    "pm": "AI parametric map",
    "ko": "AI key images",
}
FLAVOURS: tuple[SrFlavour, ...] = ("tid1500", "basic-text")
SEG_TYPES: tuple[SegType, ...] = ("binary", "fractional")
ALL_OPTIONS = [
    OutputOptions(sr_flavour=sr, seg_type=seg, parametric_map=pm, key_objects=ko)
    for sr, seg, pm, ko in itertools.product(FLAVOURS, SEG_TYPES, (True, False), (True, False))
]


def _source(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return pydicom.dcmread(path, stop_before_pixels=True)


def _two_image_study(name: str) -> list[Dataset]:
    """The file and a second image of the same study and series (another SOP Instance UID)."""
    first = _source(name)
    second = copy.deepcopy(first)
    second.SOPInstanceUID = derive_uid(str(first.SOPInstanceUID), "second image")
    second.InstanceNumber = 2
    return [first, second]


def _result(source: Dataset, positive: bool = True) -> ImageResult:
    """A result as the runner gives it: a disc mask, a heatmap peaking outside it."""
    rows, cols = int(source.Rows), int(source.Columns)
    uid = str(source.SOPInstanceUID)
    r, c = np.ogrid[0:rows, 0:cols]
    centre = (rows * 0.6, cols * 0.35)
    disc = (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= (min(rows, cols) * 0.2) ** 2
    heat = np.exp(-(((r - rows * 0.2) / rows) ** 2 + ((c - cols * 0.8) / cols) ** 2) * 8)
    heat = (heat / heat.max()).astype(np.float32)
    peak = (float(cols * 0.8 // 1), float(rows * 0.2 // 1))
    findings = [
        Finding("Cardiomegaly", 0.91 if positive else 0.31, 0.5, uid, point=peak),
        Finding("Pneumothorax", 0.08, 0.5, uid, point=peak),
    ]
    display = np.tile(np.linspace(0, 1, cols, dtype=np.float32), (rows, 1))
    return ImageResult(
        source_sop_instance_uid=uid,
        findings=findings,
        masks=disc[np.newaxis].astype(bool),
        segment_labels=["Heart"],
        heatmap=heat,
        display=display,
    )


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _check_study_objects(
    outputs: list[tuple[str, Dataset, str | None]],
    sources: list[Dataset],
    options: OutputOptions,
    algorithm: AlgorithmInfo = DEMO,
) -> None:
    kinds = [kind for kind, _, _ in outputs]
    expected = (
        ["sr"]
        + [k for _ in sources for k in (["seg", "sc"] + (["pm"] if options.parametric_map else []))]
        + (["ko"] if options.key_objects else [])
    )
    assert kinds == expected, kinds
    suffix = " (DEMO)" if algorithm.is_demo else ""
    series: dict[str, set[str]] = {}
    sops = set()
    for kind, ds, source_uid in outputs:
        assert ds.SOPClassUID in SOP_CLASSES[kind]
        assert ds.SeriesDescription == DESCRIPTIONS[kind] + suffix
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
            assert ds.get(keyword) == sources[0].get(keyword), (kind, keyword)
        assert ds.SeriesInstanceUID not in {str(s.SeriesInstanceUID) for s in sources}
        series.setdefault(kind, set()).add(str(ds.SeriesInstanceUID))
        sops.add(str(ds.SOPInstanceUID))
        if kind in ("sr", "ko"):
            assert source_uid is None
        else:
            assert source_uid in {str(s.SOPInstanceUID) for s in sources}
    assert all(len(uids) == 1 for uids in series.values())  # one series per kind
    assert len({uid for uids in series.values() for uid in uids}) == len(series)
    assert len(sops) == len(outputs)
    [sr] = [ds for kind, ds, _ in outputs if kind == "sr"]
    flavour = BasicTextSRStorage if options.sr_flavour == "basic-text" else Comprehensive3DSRStorage
    assert sr.SOPClassUID == flavour
    for kind, ds, _ in outputs:
        if kind == "seg":
            assert ds.SegmentationType == options.seg_type.upper()


# --------------------------------------------------------------------------- options


def test_options_from_settings() -> None:
    assert OutputOptions.from_settings(Settings()) == OutputOptions()
    settings = Settings(
        sr_flavour="basic-text", seg_type="fractional", parametric_map=False, key_objects=True
    )
    assert OutputOptions.from_settings(settings) == OutputOptions(
        sr_flavour="basic-text", seg_type="fractional", parametric_map=False, key_objects=True
    )
    # anything with the attributes will do; missing ones keep their defaults
    assert OutputOptions.from_settings(SimpleNamespace(key_objects=True)) == OutputOptions(
        key_objects=True
    )
    with pytest.raises(ValueError, match="sr_flavour"):
        OutputOptions(sr_flavour="html")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seg_type"):
        OutputOptions(seg_type="labelmap")  # type: ignore[arg-type]


def _option_id(options: OutputOptions) -> str:
    return (
        f"{options.sr_flavour}-{options.seg_type}"
        f"{'-pm' if options.parametric_map else ''}{'-ko' if options.key_objects else ''}"
    )


@requires_dciodvfy
@pytest.mark.parametrize("options", ALL_OPTIONS, ids=[_option_id(o) for o in ALL_OPTIONS])
def test_every_option_combination(options: OutputOptions) -> None:
    sources = _two_image_study("CT_small.dcm")
    results = [_result(sources[0]), _result(sources[1], positive=False)]
    outputs = build_outputs(sources, results, DEMO, 3, options, triage="urgent", created=CREATED)
    _check_study_objects(outputs, sources, options)
    for kind, ds, _ in outputs:
        errors, _ = split_findings(run_dciodvfy(_encode(ds)))
        assert errors == [], (kind, errors)
    if options.key_objects:
        [ko] = [ds for kind, ds, _ in outputs if kind == "ko"]
        images = ko.ContentSequence[-1].ReferencedSOPSequence[0]
        assert images.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID  # the positive one


SOURCES = [
    "RG1_J2KR.dcm",
    "RG3_UNCR.dcm",
    "CT_small.dcm",
    "SC_rgb.dcm",
    "US1_J2KR.dcm",
    "MR2_J2KI.dcm",
]
VARIANTS = [
    OutputOptions("tid1500", "binary", True, True),
    OutputOptions("basic-text", "fractional", True, True),
]


@requires_dciodvfy
@pytest.mark.parametrize("name", SOURCES)
def test_every_object_variant_validates_on_real_images(name: str) -> None:
    """SR both flavours, SEG binary and fractional, SC, PM and KO on each kind of source."""
    source = _source(name)
    for options in VARIANTS:
        outputs = build_outputs(
            [source], [_result(source)], DEMO, 1, options, triage="critical", created=CREATED
        )
        _check_study_objects(outputs, [source], options)
        for kind, ds, _ in outputs:
            errors, warnings = split_findings(run_dciodvfy(_encode(ds)))
            print(f"{name} {_option_id(options)} {kind}: {len(warnings)} dciodvfy warnings")
            assert errors == [], (kind, errors)
            for item in _walk(ds):
                if "PixelSpacing" in item:
                    assert all(float(v) > 0 for v in item.PixelSpacing), kind


# --------------------------------------------------------------------------- identity


def _uids(outputs: list[tuple[str, Dataset, str | None]]) -> dict[tuple[str, str | None], str]:
    return {(kind, src): str(ds.SOPInstanceUID) for kind, ds, src in outputs}


def test_uids_are_deterministic_and_flavour_specific() -> None:
    sources = _two_image_study("US1_J2KR.dcm")
    results = [_result(s) for s in sources]
    everything = OutputOptions(key_objects=True)
    first = build_outputs(sources, results, DEMO, 1, everything, "urgent", created=CREATED)
    again = build_outputs(sources, results, DEMO, 1, everything, "urgent", created=CREATED)
    assert [_encode(ds) for _, ds, _ in first] == [_encode(ds) for _, ds, _ in again]

    later = build_outputs(sources, results, DEMO, 1, everything, "urgent")  # other time
    assert _uids(later) == _uids(first)

    base = _uids(first)
    other = _uids(
        build_outputs(
            sources,
            results,
            DEMO,
            1,
            OutputOptions("basic-text", "fractional", True, True),
            "urgent",
            created=CREATED,
        )
    )
    # another flavour is another object: never the same UID for another SOP Class
    assert other[("sr", None)] != base[("sr", None)]
    for src in (str(s.SOPInstanceUID) for s in sources):
        assert other[("seg", src)] != base[("seg", src)]
        assert other[("sc", src)] == base[("sc", src)]
        assert other[("pm", src)] == base[("pm", src)]
    assert other[("ko", None)] == base[("ko", None)]
    # a new study version or bundle version gives new objects
    newer = _uids(build_outputs(sources, results, DEMO, 2, everything, created=CREATED))
    assert not set(newer.values()) & set(base.values())


def test_demo_suffix_only_for_random_weights() -> None:
    sources = [_source("CT_small.dcm")]
    options = OutputOptions(key_objects=True)
    outputs = build_outputs(sources, [_result(sources[0])], REAL, 1, options)
    _check_study_objects(outputs, sources, options, algorithm=REAL)
    assert not any("DEMO" in ds.SeriesDescription for _, ds, _ in outputs)


# --------------------------------------------------------------------------- content


@pytest.mark.parametrize("flavour", ["tid1500", "basic-text"])
def test_triage_reaches_the_report(flavour: str) -> None:
    sources = [_source("CT_small.dcm")]
    results = [_result(sources[0])]
    options = OutputOptions(sr_flavour=flavour)  # type: ignore[arg-type]
    for triage in ("routine", "urgent", "critical", None):
        [(kind, sr, _), *_] = build_outputs(sources, results, DEMO, 1, options, triage)
        assert kind == "sr"
        priorities = [
            item
            for item in _walk(sr)
            if "ConceptNameCodeSequence" in item
            and item.ConceptNameCodeSequence[0].CodeValue == codes.SCT.Priority.value
        ]
        if triage is None:
            assert priorities == []
        else:
            [priority] = priorities
            assert priority.ConceptCodeSequence[0].CodeValue == TRIAGE_CODES[triage].value
            texts = [item.TextValue for item in _walk(sr) if item.get("ValueType") == "TEXT"]
            assert any(f"Triage level: {triage.upper()}" in text for text in texts)


def test_findings_are_placed_at_the_heat_peak_inside_the_segmentation() -> None:
    source = _source("RG3_UNCR.dcm")
    result = _result(source)
    placed = localise(result)
    column, row = placed[0].point or (-1, -1)
    mask = result.masks[0]
    assert mask[int(row), int(column)]
    inside = np.where(mask, result.heatmap, -1)
    assert result.heatmap[int(row), int(column)] == inside.max()
    assert all(f.point == placed[0].point for f in placed)
    # the runner's point (global peak) lies outside the mask: it was moved
    runner_column, runner_row = result.findings[0].point or (0, 0)
    assert not mask[int(runner_row), int(runner_column)]

    # the SR's SCOORD carries the placed point
    outputs = build_outputs([source], [result], DEMO, 1, created=CREATED)
    [sr] = [ds for kind, ds, _ in outputs if kind == "sr"]
    scoords = [item for item in _walk(sr) if item.get("ValueType") == "SCOORD"]
    assert len(scoords) == len(result.findings)
    for scoord in scoords:
        assert list(scoord.GraphicData) == pytest.approx([column + 0.5, row + 0.5])

    # without any segmented pixel the runner's point is kept
    empty = copy.copy(result)
    empty.masks = np.zeros_like(result.masks)
    assert localise(empty) == result.findings


def test_fractional_seg_uses_the_runners_probabilities() -> None:
    source = _source("CT_small.dcm")
    result = _result(source)
    probabilities = np.where(result.masks, 0.8, 0.1).astype(np.float32)
    result.extra[SEG_PROBABILITIES_KEY] = probabilities
    outputs = build_outputs([source], [result], DEMO, 1, OutputOptions(seg_type="fractional"))
    [seg] = [ds for kind, ds, _ in outputs if kind == "seg"]
    stored = seg.pixel_array.astype(np.float32) / float(seg.MaximumFractionalValue)
    assert np.abs(stored - probabilities[0]).max() <= 0.5 / 255 + 1e-6
    # without them, the masks are written as 0 / 1
    plain = _result(source)
    outputs = build_outputs([source], [plain], DEMO, 1, OutputOptions(seg_type="fractional"))
    [seg] = [ds for kind, ds, _ in outputs if kind == "seg"]
    assert set(np.unique(seg.pixel_array)) <= {0, 255}


def test_missing_heads_and_negative_studies_skip_objects() -> None:
    source = _source("CT_small.dcm")
    result = _result(source, positive=False)
    outputs = build_outputs([source], [result], DEMO, 1, OutputOptions(key_objects=True))
    assert "ko" not in [kind for kind, _, _ in outputs]  # nothing positive: no key images
    bare = ImageResult(
        source_sop_instance_uid=str(source.SOPInstanceUID),
        findings=[],
        masks=np.zeros((0, source.Rows, source.Columns), dtype=bool),
        segment_labels=[],
        heatmap=result.heatmap,
        display=result.display,
    )
    outputs = build_outputs([source], [bare], DEMO, 1, OutputOptions(key_objects=True))
    assert [kind for kind, _, _ in outputs] == ["sc", "pm"]  # no classifier, no segmenter


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)
