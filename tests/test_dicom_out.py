"""DICOM writers (TID 1500 SR, Basic Text SR, SEG binary and fractional, heatmap SC, Parametric
Map, Key Object Selection): build from real test images, save, read back, compare, and validate
with dciodvfy.

Sources: NEMA WG04 radiographs from pydicom-data (RG1: CR chest, 1955x1841, 15-bit MONOCHROME1,
Pixel Spacing 0.000, JPEG 2000 lossless; RG3: CR extremity, Laterality R) and pydicom's own
files of other kinds (CT MONOCHROME2 16-bit with a Frame of Reference, RGB 8-bit secondary
capture, YBR_RCT JPEG 2000 ultrasound, lossy JPEG 2000 MR).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
from collections.abc import Iterator
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    ParametricMapStorage,
)

from pacs_agent.uids import derive_uid
from tests.dciodvfy import requires_dciodvfy, run_dciodvfy, split_findings
from workers.dicom_out import (
    build_heatmap_sc,
    build_key_objects,
    build_parametric_map,
    build_seg,
    build_sr,
    build_text_sr,
    common,
)
from workers.dicom_out.pm import has_patient_geometry, own_frame_of_reference_uid
from workers.dicom_out.sc import jet
from workers.dicom_out.sr import TRIAGE_CODES
from workers.results import AlgorithmInfo, Finding, OutputIdentity

SOURCES = [
    "RG1_J2KR.dcm",
    "RG3_UNCR.dcm",
    "CT_small.dcm",
    "SC_rgb.dcm",
    "US1_J2KR.dcm",
    "MR2_J2KI.dcm",
]
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmInfo(
    name="pacs-agent demo chest (RANDOM WEIGHTS)",
    version="0.1.0",
    checksum="0123456789abcdef" * 4,
    is_demo=True,
)
SEGMENT_LABELS = ["Left lung", "Heart", "Mystery structure"]


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return str(path)


def _identity(source: Dataset, kind: str, number: int) -> OutputIdentity:
    root = (str(source.StudyInstanceUID), "pipeline-0.1.0", kind)
    return OutputIdentity(
        series_instance_uid=derive_uid(*root, "series"),
        sop_instance_uid=derive_uid(*root, str(source.SOPInstanceUID)),
        series_number=number,
        instance_number=1,
        series_description=f"AI {kind} (DEMO)",
    )


def _display(source: Dataset) -> np.ndarray:
    """Source pixels as 0..1 grey, MONOCHROME2 sense (what the model runner hands over)."""
    pixels = source.pixel_array.astype(np.float32)
    if pixels.ndim == 3:  # colour: pydicom converts YBR to RGB
        pixels = pixels.mean(axis=-1)
    lo, hi = np.percentile(pixels, [1, 99])
    grey = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        grey = 1.0 - grey
    return grey


def _heatmap(rows: int, cols: int) -> tuple[np.ndarray, tuple[int, int]]:
    peak = (int(rows * 0.4), int(cols * 0.6))
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float32)
    sigma_r, sigma_c = max(rows * 0.12, 1.0), max(cols * 0.12, 1.0)
    heat = np.exp(-(((r - peak[0]) / sigma_r) ** 2 + ((c - peak[1]) / sigma_c) ** 2))
    return heat, peak


def _masks(rows: int, cols: int) -> np.ndarray:
    masks = np.zeros((3, rows, cols), dtype=bool)
    masks[0, rows // 8 : rows * 7 // 8, cols // 10 : cols // 2] = True  # rectangle
    r, c = np.ogrid[0:rows, 0:cols]
    masks[1] = (r - rows / 2) ** 2 + (c - cols * 0.6) ** 2 <= (min(rows, cols) / 5) ** 2  # disc
    # masks[2] stays empty: an empty segment must survive the round trip too
    return masks


def _probabilities(masks: np.ndarray) -> np.ndarray:
    """Soft versions of ``masks``: 0.9 inside, a ramp from 0 to 0.4 outside."""
    ramp = np.linspace(0.0, 0.4, masks.shape[2], dtype=np.float32)[np.newaxis, np.newaxis, :]
    return np.where(masks, np.float32(0.9), np.broadcast_to(ramp, masks.shape))


def _findings(source: Dataset) -> list[Finding]:
    uid = str(source.SOPInstanceUID)
    return [
        Finding("Cardiomegaly", 0.91, 0.5, uid, point=(source.Columns // 2, source.Rows // 2)),
        Finding("Pleural effusion", 0.12, 0.5, uid),
        Finding("Consolidation", 0.5, 0.5, uid, point=(0, 0)),  # private code, at threshold
    ]


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@dataclasses.dataclass
class Built:
    source: Dataset
    findings: list[Finding]
    masks: np.ndarray
    heat: np.ndarray
    heat_peak: tuple[int, int]
    identities: dict[str, OutputIdentity]
    encoded: dict[str, bytes]


@pytest.fixture(scope="module", params=SOURCES)
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    """SR, SEG and SC built once per source and encoded to bytes."""
    source = pydicom.dcmread(_path(request.param))
    rows, cols = int(source.Rows), int(source.Columns)
    findings = _findings(source)
    masks = _masks(rows, cols)
    heat, peak = _heatmap(rows, cols)
    identities = {
        "sr": _identity(source, "findings", 901),
        "seg": _identity(source, "segmentation", 902),
        "sc": _identity(source, "heatmap", 903),
        "pm": _identity(source, "parametric map", 904),
        "ko": _identity(source, "key images", 905),
        "sr-text": _identity(source, "findings text", 906),
        "seg-fractional": _identity(source, "fractional segmentation", 907),
    }
    objects = {
        "sr": build_sr(
            [source], findings, DEMO, identities["sr"], triage="urgent", created=CREATED
        ),
        "seg": build_seg(source, masks, SEGMENT_LABELS, DEMO, identities["seg"], created=CREATED),
        "sc": build_heatmap_sc(
            source, _display(source), heat, DEMO, identities["sc"], created=CREATED
        ),
        "pm": build_parametric_map(source, heat, DEMO, identities["pm"], created=CREATED),
        "ko": build_key_objects([source], findings, DEMO, identities["ko"], created=CREATED),
        "sr-text": build_text_sr(
            [source], findings, DEMO, identities["sr-text"], triage="critical", created=CREATED
        ),
        "seg-fractional": build_seg(
            source,
            _probabilities(masks),
            SEGMENT_LABELS,
            DEMO,
            identities["seg-fractional"],
            segmentation_type="fractional",
            created=CREATED,
        ),
    }
    yield Built(
        source=source,
        findings=findings,
        masks=masks,
        heat=heat,
        heat_peak=peak,
        identities=identities,
        encoded={kind: _to_bytes(ds) for kind, ds in objects.items()},
    )


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _assert_common(ds: Dataset, source: Dataset, identity: OutputIdentity) -> None:
    assert ds.SOPInstanceUID == identity.sop_instance_uid
    assert ds.SeriesInstanceUID == identity.series_instance_uid
    assert ds.SeriesNumber == identity.series_number
    assert ds.InstanceNumber == identity.instance_number
    assert ds.SeriesDescription == identity.series_description
    assert ds.file_meta.MediaStorageSOPInstanceUID == identity.sop_instance_uid
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.Manufacturer == DEMO.manufacturer
    assert ds.ManufacturerModelName == DEMO.name
    assert ds.SoftwareVersions == DEMO.software_version
    assert ds.ContentDate == "20240506" and ds.ContentTime.startswith("070809")
    [equipment] = [
        e for e in ds.ContributingEquipmentSequence if e.Manufacturer == DEMO.manufacturer
    ]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing
    assert DEMO.disclaimer in equipment.ContributionDescription
    assert DEMO.checksum in equipment.ContributionDescription


def _walk(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


# --------------------------------------------------------------------------- SR


def test_sr_round_trip(built: Built) -> None:
    identity = built.identities["sr"]
    ds = _read(built.encoded["sr"])
    _assert_common(ds, built.source, identity)
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == built.source.SOPInstanceUID

    sr = hd.sr.srread(io.BytesIO(built.encoded["sr"]))
    groups = cast(hd.sr.MeasurementReport, sr.content).get_image_measurement_groups()
    assert len(groups) == len(built.findings)
    for index, (group, finding) in enumerate(zip(groups, built.findings, strict=True), start=1):
        assert group.tracking_uid == derive_uid(
            identity.sop_instance_uid,
            "finding",
            str(index),
            finding.label,
            finding.source_sop_instance_uid,
        )
        assert group.finding_type is not None and group.finding_type.meaning == finding.label
        assert [img.referenced_sop_instance_uid for img in group.source_images] == [
            finding.source_sop_instance_uid
        ]
        [evaluation] = group.get_qualitative_evaluations(name=group.finding_type)
        assert evaluation.value == (codes.SCT.Present if finding.present else codes.SCT.Absent)
        measurement = group.get_measurements(name=codes.DCM.Probability)[0]
        assert measurement.value == pytest.approx(round(finding.probability * 100, 2))
        assert measurement.unit == codes.UCUM.Percent
        texts: dict[str, list[str]] = {}
        for item in group[0].ContentSequence:
            if item.ValueType == "TEXT":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                texts.setdefault(name, []).append(item.TextValue)
        assert DEMO.disclaimer in texts["Algorithm Name"][0]
        # the finding's name as Comment: what OHIF labels the drawn point with
        outcome = "present" if finding.present else "absent"
        assert texts["Comment"] == [f"{group.finding_type.meaning} ({outcome})"]
        assert texts["Algorithm Version"] == [DEMO.version]
        params = " ".join(texts["Algorithm Parameters"])
        assert f"bundle_sha256={DEMO.checksum}" in params and "threshold=0.5" in params
        scoords = [item for item in _walk(group[0]) if item.get("ValueType") == "SCOORD"]
        if finding.point is None:
            assert scoords == []
        else:
            assert len(scoords) == 1 and scoords[0].GraphicType == "POINT"
            column, row = finding.point
            assert list(scoords[0].GraphicData) == pytest.approx([column + 0.5, row + 0.5])
            image = scoords[0].ContentSequence[0].ReferencedSOPSequence[0]
            assert image.ReferencedSOPInstanceUID == finding.source_sop_instance_uid
    # private code for the label without a SNOMED CT concept, and its scheme declared
    private = groups[2].finding_type
    assert private is not None and private.scheme_designator == common.PRIVATE_SCHEME
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == common.PRIVATE_SCHEME


def test_sr_procedure_describes_imaging_not_algorithm(built: Built) -> None:
    ds = _read(built.encoded["sr"])
    items = [
        item
        for item in _walk(ds)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"
    ]
    assert len(items) == 1
    procedure = items[0].ConceptCodeSequence[0]
    if built.source.Modality == "CR":
        assert procedure.CodeValue == codes.cid100.XRUnspecifiedBodyRegion.value
    assert "AI" not in procedure.CodeMeaning and "algorithm" not in procedure.CodeMeaning.lower()


# --------------------------------------------------------------------------- SEG


def test_seg_round_trip(built: Built) -> None:
    identity = built.identities["seg"]
    ds = _read(built.encoded["seg"])
    _assert_common(ds, built.source, identity)
    assert (ds.Rows, ds.Columns) == (built.source.Rows, built.source.Columns)
    assert ds.SegmentationType == "BINARY"
    assert ds.ContentLabel == "AI_DEMO" and ds.ContentDescription == DEMO.disclaimer
    assert ds.ImageComments == DEMO.disclaimer

    seg = hd.seg.segread(io.BytesIO(built.encoded["seg"]))
    assert [uid[2] for uid in seg.get_source_image_uids()] == [built.source.SOPInstanceUID]
    assert seg.get_segment_numbers() == [1, 2, 3]
    for number, label in enumerate(SEGMENT_LABELS, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == label
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm_id = description.algorithm_identification
        assert algorithm_id is not None
        family = algorithm_id[0].AlgorithmFamilyCodeSequence[0]
        assert family.CodeValue == codes.cid7162.ArtificialIntelligence.value
        assert DEMO.checksum in algorithm_id[0].AlgorithmParameters
        assert len(description.RecommendedDisplayCIELabValue) == 3
    left_lung = seg.get_segment_description(1).SegmentedPropertyTypeCodeSequence[0]
    assert left_lung.CodeValue == codes.SCT.Lung.value
    assert left_lung.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Left.value
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[built.source.SOPInstanceUID], segment_numbers=[1, 2, 3]
    )
    assert pixels.shape == (1, built.source.Rows, built.source.Columns, 3)
    assert np.array_equal(np.moveaxis(pixels[0], -1, 0).astype(bool), built.masks)

    # geometry: never a zero Pixel Spacing; an orientation OHIF can use; no invented positions
    for item in _walk(ds):
        if "PixelSpacing" in item:
            assert all(float(v) > 0 for v in item.PixelSpacing)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if hd.spatial.get_image_coordinate_system(built.source) is None:
        assert ds.PatientOrientation == built.source.get("PatientOrientation")
        assert "PlanePositionSequence" not in shared
        for frame in ds.PerFrameFunctionalGroupsSequence:
            assert "PlanePositionSequence" not in frame
        # the source's Image Orientation (Patient), else the nominal one OHIF assumes
        expected = common.output_orientation(built.source)[0]
        iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        assert [float(v) for v in iop] == pytest.approx(expected)
        # Pixel Measures: OHIF and highdicom's reader need it (spacing and thickness)
        measures = shared.PixelMeasuresSequence[0]
        spacing = common.output_pixel_spacing(built.source)[0]
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx(list(spacing))
        assert float(measures.SliceThickness) > 0
    else:
        assert ds.FrameOfReferenceUID == built.source.FrameOfReferenceUID
        assert "PlaneOrientationSequence" in shared


def test_seg_rg1_drops_zero_pixel_spacing() -> None:
    source = pydicom.dcmread(_path("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]  # the invalid input
    masks = np.zeros((1, source.Rows, source.Columns), dtype=bool)
    masks[0, 100:200, 300:400] = True
    seg = build_seg(source, masks, ["Heart"], DEMO, _identity(source, "seg-ps", 950))
    # the zero spacing is not carried: a nominal 1 mm grid, said so in the derivation
    spacings = [item.PixelSpacing for item in _walk(seg) if "PixelSpacing" in item]
    assert [[float(v) for v in ps] for ps in spacings] == [[1.0, 1.0]]
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert "nominal 1 mm" in derivation.DerivationDescription
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]  # the source is untouched
    # no Image Orientation (Patient): the nominal orientation OHIF assumes for the source, not
    # one derived from "L\F" (OHIF refuses or flips a SEG with another); L\F stays as is
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in iop.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert seg.PatientOrientation == ["L", "F"]


def test_seg_projection_uses_imager_pixel_spacing() -> None:
    source = pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    source.ImagerPixelSpacing = [0.15, 0.2]
    seg = build_seg(
        source,
        _masks(source.Rows, source.Columns),
        SEGMENT_LABELS,
        DEMO,
        _identity(source, "seg-ips", 955),
    )
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.2]
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert "Imager Pixel Spacing" in derivation.DerivationDescription
    hd.seg.segread(io.BytesIO(_to_bytes(seg)))  # highdicom reads it back


def test_seg_ct_with_zero_pixel_spacing_writes_no_positions() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"))
    source.PixelSpacing = ["0.000", "0.000"]
    seg = build_seg(
        source,
        _masks(source.Rows, source.Columns),
        SEGMENT_LABELS,
        DEMO,
        _identity(source, "seg-ct0", 951),
    )
    assert not any("PlanePositionSequence" in item for item in _walk(seg))
    # the zero spacing is not carried (nominal 1 mm); the CT's own orientation is kept
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == pytest.approx(
        [float(v) for v in source.ImageOrientationPatient]
    )


@requires_dciodvfy
def test_seg_projection_with_frame_of_reference() -> None:
    """A DX-like source: Frame of Reference but no position. Orientation from L\\F etc."""
    source = pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    source.FrameOfReferenceUID = derive_uid("frame of reference", str(source.SOPInstanceUID))
    masks = _masks(source.Rows, source.Columns)
    seg = build_seg(source, masks, SEGMENT_LABELS, DEMO, _identity(source, "seg-for", 954))
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientOrientation == ["R", "F"]
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in iop.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # nominal
    assert not any("PlanePositionSequence" in item for item in _walk(seg))
    errors, _ = split_findings(run_dciodvfy(seg))
    assert errors == []


def test_seg_rejects_misaligned_masks() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"), stop_before_pixels=True)
    identity = _identity(source, "seg-bad", 952)
    with pytest.raises(ValueError, match="source geometry"):
        build_seg(source, np.zeros((1, 64, 64), bool), ["Heart"], DEMO, identity)
    with pytest.raises(ValueError, match="segment labels"):
        build_seg(source, np.zeros((2, 128, 128), bool), ["Heart"], DEMO, identity)
    with pytest.raises(ValueError, match="boolean"):
        build_seg(source, np.full((1, 128, 128), 2, np.uint8), ["Heart"], DEMO, identity)


# --------------------------------------------------------------------------- SC


def test_sc_round_trip(built: Built) -> None:
    identity = built.identities["sc"]
    ds = _read(built.encoded["sc"])
    _assert_common(ds, built.source, identity)
    assert (ds.Rows, ds.Columns) == (built.source.Rows, built.source.Columns)
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.BitsAllocated == 8
    assert ds.BurnedInAnnotation == "YES"
    assert DEMO.disclaimer in ds.ImageComments and "AI OUTPUT" in ds.ImageComments
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == built.source.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == built.source.SOPClassUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == built.source.SOPInstanceUID
    assert ds.Laterality == (common.laterality_of(built.source) or "")
    assert ds.PatientOrientation == (common.patient_orientation_of(built.source) or "")
    lossy_source = built.source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    assert (ds.get("LossyImageCompression") == "01") == lossy_source

    rgb = ds.pixel_array
    assert rgb.shape == (built.source.Rows, built.source.Columns, 3)
    # the banner is burned in at the top: dark background with bright (yellow) text pixels
    band = rgb[: max(6, built.source.Rows // 30)]
    assert np.median(band) < 40
    if built.source.Rows >= 100:
        assert band[..., 0].max() > 100  # anti-aliased text pixels
    # the overlay lies on the source pixels: hot (red > blue) at the heat peak
    r, c = built.heat_peak
    red, _, blue = (int(v) for v in rgb[r, c])
    assert red > blue + 40


def test_jet_colormap_ends() -> None:
    ends = jet(np.array([0.0, 1.0], dtype=np.float32))
    assert ends[0, 2] > 0.4 and ends[0, 0] == 0  # cold end is blue
    assert ends[1, 0] > 0.4 and ends[1, 2] == 0  # hot end is red


def test_sc_rejects_misaligned_heatmap() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"), stop_before_pixels=True)
    identity = _identity(source, "sc-bad", 953)
    grey = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError, match="shape"):
        build_heatmap_sc(source, grey, np.zeros((64, 64)), DEMO, identity)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_heatmap_sc(source, grey, np.full((128, 128), 3.0), DEMO, identity)
    with pytest.raises(ValueError, match="NaN"):
        build_heatmap_sc(source, grey, np.full((128, 128), np.nan), DEMO, identity)


# --------------------------------------------------------------------------- SR extras


def _items_named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [
        item
        for item in _walk(ds)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def test_sr_triage_and_plain_language_summary(built: Built) -> None:
    ds = _read(built.encoded["sr"])
    [container] = _items_named(ds, "Qualitative Evaluations")
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    assert container in list(ds.ContentSequence)  # report level, after the measurements
    priority, summary = container.ContentSequence
    assert priority.ValueType == "CODE"
    assert priority.ConceptNameCodeSequence[0].CodeValue == codes.SCT.Priority.value
    assert priority.ConceptCodeSequence[0].CodeValue == TRIAGE_CODES["urgent"].value
    assert summary.ValueType == "TEXT"
    assert summary.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Summary.value
    text = summary.TextValue
    assert DEMO.disclaimer in text and "Triage level: URGENT" in text
    positives = text.split("Positive findings:")[1].split("Negative findings:")[0]
    assert "Cardiomegaly (probability 0.91" in positives and "Consolidation" in positives
    assert "Pleural effusion" not in positives
    for keyword in ("PatientName", "PatientID"):
        value = str(built.source.get(keyword, "") or "")
        if len(value) > 3:
            assert value not in text  # no patient data in the summary


def test_text_sr_round_trip(built: Built) -> None:
    identity = built.identities["sr-text"]
    ds = _read(built.encoded["sr-text"])
    _assert_common(ds, built.source, identity)
    assert ds.SOPClassUID == BasicTextSRStorage
    assert ds.ConceptNameCodeSequence[0].CodeValue == codes.LN.DiagnosticImagingReport.value
    value_types = {item.get("ValueType") for item in _walk(ds)} - {None}
    assert value_types <= {"CONTAINER", "TEXT", "CODE", "UIDREF", "IMAGE"}, value_types
    sentences = [item.TextValue for item in _items_named(ds, "Finding")]
    assert sentences == [
        "Cardiomegaly: PRESENT, probability 0.91 (threshold 0.50)",
        "Pleural effusion: absent, probability 0.12 (threshold 0.50)",
        "Consolidation: PRESENT, probability 0.50 (threshold 0.50)",
    ]
    for finding in _items_named(ds, "Finding"):
        [image] = [c for c in finding.ContentSequence if c.ValueType == "IMAGE"]
        assert image.RelationshipType == "INFERRED FROM"
        reference = image.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == built.source.SOPInstanceUID
        names = [c.ConceptNameCodeSequence[0].CodeMeaning for c in finding.ContentSequence]
        assert "Algorithm Name" in names and "Algorithm Parameters" in names
    [priority] = _items_named(ds, "Priority (attribute)")
    assert priority.ConceptCodeSequence[0].CodeValue == TRIAGE_CODES["critical"].value
    [impression] = _items_named(ds, "Impression")
    assert "Triage level: CRITICAL" in impression.TextValue
    assert DEMO.disclaimer in impression.TextValue
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == built.source.SOPInstanceUID


def test_reports_refuse_an_unknown_triage_level() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"), stop_before_pixels=True)
    identity = _identity(source, "triage", 9)
    for build in (build_sr, build_text_sr):
        with pytest.raises(ValueError, match="triage"):
            build([source], _findings(source), DEMO, identity, triage="soon")


# --------------------------------------------------------------------------- FRACTIONAL SEG


def test_fractional_seg_round_trip(built: Built) -> None:
    identity = built.identities["seg-fractional"]
    ds = _read(built.encoded["seg-fractional"])
    _assert_common(ds, built.source, identity)
    assert ds.SegmentationType == "FRACTIONAL"
    assert ds.SegmentationFractionalType == "PROBABILITY"
    assert ds.MaximumFractionalValue == 255 and ds.BitsAllocated == 8
    seg = hd.seg.segread(io.BytesIO(built.encoded["seg-fractional"]))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[built.source.SOPInstanceUID],
        segment_numbers=[1, 2, 3],
        rescale_fractional=True,
    )
    expected = _probabilities(built.masks)
    assert np.abs(np.moveaxis(pixels[0], -1, 0) - expected).max() <= 0.5 / 255 + 1e-6
    for item in _walk(ds):
        if "PixelSpacing" in item:
            assert all(float(v) > 0 for v in item.PixelSpacing)


def test_fractional_seg_rejects_values_outside_0_1() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"), stop_before_pixels=True)
    identity = _identity(source, "seg-frac-bad", 955)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_seg(
            source,
            np.full((1, 128, 128), 1.5, np.float32),
            ["Heart"],
            DEMO,
            identity,
            segmentation_type="fractional",
        )
    with pytest.raises(ValueError, match="segmentation_type"):
        build_seg(
            source,
            np.zeros((1, 128, 128), bool),
            ["Heart"],
            DEMO,
            identity,
            segmentation_type="labelmap",
        )


# --------------------------------------------------------------------------- Parametric Map


def test_parametric_map_round_trip(built: Built) -> None:
    identity = built.identities["pm"]
    ds = _read(built.encoded["pm"])
    _assert_common(ds, built.source, identity)
    assert ds.SOPClassUID == ParametricMapStorage
    assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == (built.source.Rows, built.source.Columns, 1)
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    assert np.array_equal(ds.pixel_array, built.heat.astype(np.float32))
    assert ds.ContentLabel == "AI_DEMO" and DEMO.disclaimer in ds.ImageComments
    shared = ds.SharedFunctionalGroupsSequence[0]
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert (
        mapping.DoubleFloatRealWorldValueFirstValueMapped,
        mapping.DoubleFloatRealWorldValueLastValueMapped,
    ) == (0.0, 1.0)
    voi = shared.FrameVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (0.5, 1.0)
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    source_ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == built.source.SOPInstanceUID
    assert source_ref.SpatialLocationsPreserved == "YES"

    # geometry: never a zero spacing, no slice spacing, the source's frame only when it has
    # full patient geometry, else one of the map's own at the origin
    measures = shared.PixelMeasuresSequence[0]
    assert all(float(v) > 0 for v in measures.PixelSpacing)
    assert "SpacingBetweenSlices" not in measures
    position = frame.PlanePositionSequence[0].ImagePositionPatient
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    if has_patient_geometry(built.source):
        assert ds.FrameOfReferenceUID == built.source.FrameOfReferenceUID
        assert [float(v) for v in position] == pytest.approx(
            [float(v) for v in built.source.ImagePositionPatient]
        )
    else:
        assert ds.FrameOfReferenceUID == own_frame_of_reference_uid(built.source)
        assert ds.FrameOfReferenceUID != built.source.get("FrameOfReferenceUID")
        assert [float(v) for v in position] == [0.0, 0.0, 0.0]
        expected = common.output_orientation(built.source)[0]
        assert [float(v) for v in orientation] == pytest.approx(expected)
        spacing = common.output_pixel_spacing(built.source)[0]
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx(list(spacing))
    # Series Laterality only when there is no Frame Laterality (dciodvfy checks both ways)
    assert ("FrameAnatomySequence" in shared) != ("Laterality" in ds)

    pm = hd.pm.ParametricMap.from_dataset(ds)
    assert [uids[2] for uids in pm.get_source_image_uids()] == [built.source.SOPInstanceUID]


def test_parametric_map_rg1_geometry() -> None:
    source = pydicom.dcmread(_path("RG1_UNCR.dcm"), stop_before_pixels=True)
    heat = np.zeros((source.Rows, source.Columns), np.float32)
    pm = build_parametric_map(source, heat, DEMO, _identity(source, "pm-rg1", 960))
    shared = pm.SharedFunctionalGroupsSequence[0]
    # RG1 has no Image Orientation (Patient): the nominal orientation OHIF assumes for it (an
    # L\F-derived one is refused by OHIF as oblique); Pixel Spacing 0.000 is not carried: the
    # map's own frame has a nominal 1 mm grid
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == [1, 0, 0, 0, 1, 0]
    assert "Orientation is nominal" in pm.ImageComments
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]
    assert "Frame of Reference of this map only" in pm.ImageComments
    anatomy = shared.FrameAnatomySequence[0]
    assert anatomy.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    assert anatomy.FrameLaterality == "U"  # chest: unpaired
    assert "FrameOfReferenceUID" not in source  # the source is untouched
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]


@requires_dciodvfy
def test_parametric_map_of_a_projection_with_frame_of_reference() -> None:
    """DX-like: a Frame of Reference but no position. The map does not claim a place in it."""
    source = pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    source.FrameOfReferenceUID = derive_uid("frame of reference", str(source.SOPInstanceUID))
    heat = np.zeros((source.Rows, source.Columns), np.float32)
    pm = build_parametric_map(source, heat, DEMO, _identity(source, "pm-for", 963))
    assert pm.FrameOfReferenceUID == own_frame_of_reference_uid(source)
    assert pm.FrameOfReferenceUID != source.FrameOfReferenceUID
    iop = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in iop.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # nominal
    errors, _ = split_findings(run_dciodvfy(pm))
    assert errors == []


# --------------------------------------------------------------------------- Key Objects


def test_key_objects_round_trip(built: Built) -> None:
    identity = built.identities["ko"]
    ds = _read(built.encoded["ko"])
    _assert_common(ds, built.source, identity)
    assert ds.SOPClassUID == KeyObjectSelectionDocumentStorage and ds.Modality == "KO"
    assert ds.ConceptNameCodeSequence[0].CodeValue == codes.DCM.OfInterest.value
    images = [item for item in _walk(ds) if item.get("ValueType") == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        built.source.SOPInstanceUID
    ]
    [description] = _items_named(ds, "Key Object Description")
    assert "Cardiomegaly (0.91)" in description.TextValue
    assert "Pleural effusion" not in description.TextValue
    assert DEMO.disclaimer in description.TextValue
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == built.source.SOPInstanceUID


def test_key_objects_name_only_images_with_positive_findings() -> None:
    first = pydicom.dcmread(_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    second = copy.deepcopy(first)
    second.SOPInstanceUID = derive_uid(str(first.SOPInstanceUID), "second")
    findings = [
        Finding("Pneumothorax", 0.2, 0.5, str(first.SOPInstanceUID)),
        Finding("Pneumothorax", 0.8, 0.5, str(second.SOPInstanceUID)),
    ]
    ko = build_key_objects([first, second], findings, DEMO, _identity(first, "ko2", 961))
    images = [item for item in _walk(ko) if item.get("ValueType") == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        str(second.SOPInstanceUID)
    ]
    with pytest.raises(ValueError, match="no positive finding"):
        build_key_objects([first], findings[:1], DEMO, _identity(first, "ko3", 962))


# --------------------------------------------------------------------------- validation


@requires_dciodvfy
@pytest.mark.parametrize("kind", ["sr", "sr-text", "seg", "seg-fractional", "sc", "pm", "ko"])
def test_dciodvfy_reports_no_errors(built: Built, kind: str) -> None:
    errors, warnings = split_findings(run_dciodvfy(built.encoded[kind]))
    print(f"{built.source.SOPInstanceUID} {kind}: {len(warnings)} dciodvfy warnings")
    assert errors == []


@requires_dciodvfy
def test_dciodvfy_helper_sees_errors() -> None:
    """The helper does report errors: RG1 itself carries Pixel Spacing 0.000."""
    errors, _ = split_findings(run_dciodvfy(_path("RG1_UNCR.dcm")))
    assert any("Pixel Spacing" in line for line in errors)


# --------------------------------------------------------------------------- determinism


def test_same_inputs_give_identical_objects() -> None:
    source = pydicom.dcmread(_path("RG3_UNCR.dcm"))
    rows, cols = int(source.Rows), int(source.Columns)
    display = np.linspace(0, 1, rows * cols, dtype=np.float32).reshape(rows, cols)
    heat, _ = _heatmap(rows, cols)
    masks = _masks(rows, cols)

    def build_all(created: dt.datetime | None) -> list[Dataset]:
        findings = _findings(source)
        return [
            build_sr([source], findings, DEMO, _identity(source, "f", 1), created=created),
            build_seg(
                source, masks, SEGMENT_LABELS, DEMO, _identity(source, "s", 2), created=created
            ),
            build_heatmap_sc(
                source, display, heat, DEMO, _identity(source, "h", 3), created=created
            ),
            build_parametric_map(source, heat, DEMO, _identity(source, "p", 4), created=created),
            build_key_objects([source], findings, DEMO, _identity(source, "k", 5), created=created),
            build_text_sr([source], findings, DEMO, _identity(source, "t", 6), created=created),
            build_seg(
                source,
                _probabilities(masks),
                SEGMENT_LABELS,
                DEMO,
                _identity(source, "q", 7),
                segmentation_type="fractional",
                created=created,
            ),
        ]

    first, second = build_all(CREATED), build_all(CREATED)
    for a, b in zip(first, second, strict=True):
        assert _to_bytes(a) == _to_bytes(b), a.Modality
    # without a fixed time only date-times may differ: every UID is the same
    third = build_all(None)
    for a, b in zip(first, third, strict=True):
        uids_a = [e.value for item in _walk(a) for e in item if e.VR == "UI"]
        uids_b = [e.value for item in _walk(b) for e in item if e.VR == "UI"]
        assert uids_a == uids_b, a.Modality


def test_identity_and_inputs_are_validated() -> None:
    source = pydicom.dcmread(_path("CT_small.dcm"), stop_before_pixels=True)
    good = _identity(source, "v", 7)
    findings = _findings(source)
    with pytest.raises(ValueError, match="valid UID"):
        build_sr([source], findings, DEMO, dataclasses.replace(good, sop_instance_uid="1.2.x"))
    with pytest.raises(ValueError, match="series_number"):
        build_sr([source], findings, DEMO, dataclasses.replace(good, series_number=0))
    with pytest.raises(ValueError, match="at least one finding"):
        build_sr([source], [], DEMO, good)
    with pytest.raises(ValueError, match="not among the sources"):
        build_sr(
            [source],
            [dataclasses.replace(findings[0], source_sop_instance_uid="1.2.3")],
            DEMO,
            good,
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_sr([source], [dataclasses.replace(findings[0], probability=1.5)], DEMO, good)
    with pytest.raises(ValueError, match="outside"):
        build_sr([source], [dataclasses.replace(findings[0], point=(500, 1))], DEMO, good)
    other_study = copy.deepcopy(source)
    other_study.StudyInstanceUID = derive_uid("another study")
    with pytest.raises(ValueError, match="studies"):
        build_sr([source, other_study], findings, DEMO, good)


def test_sr_with_two_sources_of_one_study() -> None:
    first = pydicom.dcmread(_path("RG1_UNCR.dcm"), stop_before_pixels=True)
    second = copy.deepcopy(first)
    second.SOPInstanceUID = derive_uid(str(first.SOPInstanceUID), "lateral")
    findings = [
        Finding("Pneumothorax", 0.7, 0.5, str(first.SOPInstanceUID)),
        Finding("Pneumothorax", 0.2, 0.5, str(second.SOPInstanceUID), point=(10, 20)),
    ]
    sr = build_sr([first, second], findings, DEMO, _identity(first, "two", 8), created=CREATED)
    read = hd.sr.srread(io.BytesIO(_to_bytes(sr)))
    groups = cast(hd.sr.MeasurementReport, read.content).get_image_measurement_groups()
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [
        str(first.SOPInstanceUID),
        str(second.SOPInstanceUID),
    ]
    assert groups[0].tracking_uid != groups[1].tracking_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence
    }
    assert referenced == {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
    assert UID(sr.SOPInstanceUID).is_valid
