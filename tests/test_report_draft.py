"""Report drafts in the SR: deterministic Findings / Impression text built from the findings,
triage level and regions, marked as a draft for radiologist review, plus a report adapter's text
marked machine-generated and unverified; both SR flavours pass dciodvfy and round-trip.

Sources: the NEMA WG04 CR chest (RG1, pydicom-data) and pydicom's RGB secondary capture.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import random
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from pacs_agent.uids import derive_uid
from tests.dciodvfy import dciodvfy_errors, requires_dciodvfy
from workers.dicom_out import build_sr, build_text_sr
from workers.dicom_out.outputs import OutputOptions, build_output_set
from workers.report_draft import (
    DRAFT_NOTE,
    GENERATED_NOTE,
    MAX_GENERATED_CHARS,
    GeneratedText,
    build_draft,
    place_name,
)
from workers.results import AlgorithmInfo, Finding, ImageResult, OutputIdentity

CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmInfo("pacs-agent demo chest (RANDOM WEIGHTS)", "0.1.0", "ab" * 32, is_demo=True)
REAL = AlgorithmInfo("chest model", "1.2.0", "cd" * 32, is_demo=False)


def _source(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def rg1() -> Dataset:
    return _source("RG1_J2KR.dcm")


def _identity(source: Dataset, kind: str) -> OutputIdentity:
    root = (str(source.StudyInstanceUID), "draft-test", kind)
    return OutputIdentity(derive_uid(*root, "series"), derive_uid(*root, "sop"), 9001, 1, "AI")


def _findings(source: Dataset) -> list[Finding]:
    uid = str(source.SOPInstanceUID)
    rows, cols = int(source.Rows), int(source.Columns)
    return [
        Finding("Pneumothorax", 0.81, 0.3, uid, point=(cols * 0.1, rows * 0.1)),  # upper left
        Finding("Cardiomegaly", 0.12, 0.5, uid),
        Finding("Pleural effusion", 0.66, 0.5, uid, point=(cols * 0.9, rows * 0.9)),
    ]


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _draft_container(sr: Dataset) -> Dataset:
    [container] = [
        i
        for i in _walk(sr)
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "121362"
    ]
    return container


def _texts(container: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in container.ContentSequence:
        if item.ValueType == "TEXT":
            out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return out


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_draft_is_deterministic_and_says_what_it_is(rg1: Dataset) -> None:
    findings = _findings(rg1)
    shuffled = list(findings)
    random.Random(4).shuffle(shuffled)
    segmented = {str(rg1.SOPInstanceUID): [("Lung field", 0.3412)]}
    first = build_draft([rg1], findings, DEMO, "urgent", segmented=segmented)
    again = build_draft([rg1], shuffled, DEMO, "urgent", segmented=segmented)
    assert first == again  # same findings, any order -> the same text
    print(first.findings, "\n", first.impression)

    assert first.findings.startswith("DEMO - RANDOM WEIGHTS - NOT FOR CLINICAL USE.")
    assert first.impression.startswith("DEMO - RANDOM WEIGHTS")
    assert DRAFT_NOTE in first.findings and DRAFT_NOTE in first.note
    assert "Pneumothorax suspected (probability 0.81, threshold 0.30, image upper left)" in (
        first.findings
    )
    assert "Pleural effusion suspected (probability 0.66, threshold 0.50, image lower right)" in (
        first.findings
    )
    assert "not suggested: Cardiomegaly" in first.findings
    assert "Lung field segmented (34% of the image)" in first.findings
    assert "Triage level URGENT." in first.impression
    assert "Suspected: Pleural effusion, Pneumothorax." in first.impression
    assert "Not suggested: Cardiomegaly." in first.impression
    # no patient data in the draft
    for text in (first.findings, first.impression):
        assert str(rg1.get("PatientID", "")) not in text or not rg1.get("PatientID")
        assert str(rg1.get("PatientName", "")) not in text or not rg1.get("PatientName")

    real = build_draft([rg1], [dataclasses.replace(f, probability=0.01) for f in findings], REAL)
    assert "DEMO" not in real.findings + real.impression
    assert "No finding reaches its threshold among the 3 assessed" in real.impression
    changed = build_draft([rg1], findings[:2], DEMO, "urgent", segmented=segmented)
    assert changed.findings != first.findings  # the text follows the findings


def test_draft_location_uses_the_finding_region_box() -> None:
    from workers.results import Region

    src = Dataset()
    src.SOPInstanceUID = "1.2.3.4"
    src.Rows, src.Columns = 300, 300
    region = Region(left=200.0, top=100.0, right=280.0, bottom=180.0, basis="cam", peak=1.0)
    draft = build_draft(
        [src], [Finding("Nodule", 0.9, 0.5, "1.2.3.4", point=(10.0, 10.0), region=region)], REAL
    )
    assert "image middle right" in draft.findings  # the box's centre, not the point
    assert place_name(150, 150, 300, 300) == "centre"
    assert place_name(299, 0, 300, 300) == "upper right"


def test_generated_text_is_bounded_and_only_for_known_images(rg1: Dataset) -> None:
    uid = str(rg1.SOPInstanceUID)
    generated = [
        GeneratedText("9.9.9", "text for an image that is not a source"),
        GeneratedText(uid, "  "),
        GeneratedText(uid, "bright   disc " + "x" * 5000),
    ]
    draft = build_draft([rg1], _findings(rg1), DEMO, generated=generated)
    assert len(draft.generated) == 1
    [g] = draft.generated
    assert g.source_sop_instance_uid == uid
    assert g.text.startswith("bright disc x") and len(g.text) == MAX_GENERATED_CHARS
    assert "machine-generated text is unverified" in draft.note


@requires_dciodvfy
@pytest.mark.parametrize("flavour", ["tid1500", "basic-text"])
def test_sr_with_draft_and_generated_text_passes_dciodvfy(rg1: Dataset, flavour: str) -> None:
    uid = str(rg1.SOPInstanceUID)
    findings = _findings(rg1)
    generated = [GeneratedText(uid, "bright disc in the upper left, large")]
    draft = build_draft([rg1], findings, DEMO, "critical", generated=generated)
    build = build_sr if flavour == "tid1500" else build_text_sr
    sr = build(
        [rg1],
        findings,
        DEMO,
        _identity(rg1, flavour),
        triage="critical",
        created=CREATED,
        draft=draft,
    )
    assert dciodvfy_errors(sr) == []
    back = _round_trip(sr)
    container = _draft_container(back)
    texts = _texts(container)
    assert texts["Findings"] == [draft.findings]
    assert texts["Impressions"] == [draft.impression]
    assert texts["Comment"] == [draft.note]
    [narrative] = texts["Narrative Summary"]
    assert narrative.startswith(f"{GENERATED_NOTE} (report adapter, image 1")
    assert narrative.endswith("bright disc in the upper left, large")
    [generated_item] = [i for i in container.ContentSequence if i.get("TextValue", "") == narrative]
    [image] = generated_item.ContentSequence
    assert image.RelationshipType == "INFERRED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid


@requires_dciodvfy
def test_every_sr_carries_a_draft_even_without_one_given() -> None:
    sc = _source("SC_rgb.dcm")
    sr = build_sr(
        [sc], _findings(sc), REAL, _identity(sc, "plain"), triage="routine", created=CREATED
    )
    assert dciodvfy_errors(sr) == []
    texts = _texts(_draft_container(_round_trip(sr)))
    assert texts["Findings"][0].startswith(DRAFT_NOTE)
    assert "Narrative Summary" not in texts  # no report adapter, no generated text
    twice = build_sr(
        [sc], _findings(sc), REAL, _identity(sc, "plain"), triage="routine", created=CREATED
    )
    assert _texts(_draft_container(twice)) == texts


@requires_dciodvfy
def test_output_set_puts_the_runner_text_into_the_sr(rg1: Dataset) -> None:
    """build_output_set (what a job writes) reads the report adapter's text from the runner's
    ImageResult.extra and the segmented regions from its masks."""
    rows, cols = int(rg1.Rows), int(rg1.Columns)
    masks = np.zeros((1, rows, cols), dtype=bool)
    masks[0, : rows // 2] = True
    result = ImageResult(
        str(rg1.SOPInstanceUID),
        _findings(rg1),
        masks,
        ["Lung field"],
        np.zeros((rows, cols), np.float32),
        np.zeros((rows, cols), np.float32),
        extra={"report_text": "bright disc in the centre, small"},
    )
    made = build_output_set(
        [rg1],
        [result],
        DEMO,
        1,
        OutputOptions(parametric_map=False),
        triage="urgent",
        created=CREATED,
    )
    kind, sr, _ = made.outputs[0]
    assert kind == "sr"
    texts = _texts(_draft_container(sr))
    assert "Lung field segmented (50% of the image)" in texts["Findings"][0]
    assert texts["Narrative Summary"][0].endswith("bright disc in the centre, small")
    assert dciodvfy_errors(sr) == []
