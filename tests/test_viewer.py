"""What a radiologist sees in a real open-source viewer: OHIF 3.13 in headless chromium.

The product's own model (the DEMO bundle) and writers build the result objects for a real
radiograph in-process; the source and the results go into a real Orthanc (Debian packages
orthanc + orthanc-dicomweb), and OHIF, served on the same origin as Orthanc's DICOMweb, opens the
study. Each test loads one object the way a user does (double-click in the study browser) and
checks, through OHIF's state and the screenshots, that it shows and lies on the source pixels:

- the source radiograph renders (a grey image, not a blank viewport);
- the SEG loads as a segmentation: its segments by label, each mask where the writer put it
  (pixel count and centroid of OHIF's labelmap equal to the SEG's own frame);
- the SR's findings are drawn on the image: one annotation per measurement with an image region,
  at the SCOORD, with a text naming the finding and giving its probability;
- the heatmap Secondary Capture displays, in colour, at the source's size;
- the Parametric Map displays as a colour overlay (on a calibrated radiograph: see below).

Sources: NEMA WG04 ``RG3_J2KR`` (CR extremity, JPEG 2000 lossless, MONOCHROME1, no Pixel
Spacing) as delivered, and for the Parametric Map the same image with an Imager Pixel Spacing,
as a calibrated detector writes it: OHIF shows a Parametric Map as a volume fused on its source,
and cornerstone builds no volume from a source without any pixel spacing (NaN spacing, shader
compile error), whatever the map says. ``RG1`` is not used: its Pixel Spacing ``0.000\\0.000``
makes OHIF's GPU path draw the radiograph black (it renders with ``?viewportRendering=cpu``),
which no result object can change (see docs/viewer.md).

Needs Debian chromium, Python playwright and the OHIF dist: ``scripts/install-viewer-deps.sh``.
They are test dependencies: a missing one FAILS the tests, it does not skip them. Screenshots
go to ``$PACS_AGENT_VIEWER_SHOTS`` (default: a pytest temporary folder, named in the messages).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_agent.uids import derive_uid
from tests.conftest import sample_path
from tests.support import free_port
from tests.support.ohif import (
    BrowserLog,
    OhifServer,
    Viewer,
    annotation_text_boxes,
    annotation_texts,
    answer_prompt,
    boxes_overlap,
    error_notification,
    image_annotations,
    image_stats,
    load_series,
    open_study,
    save_screenshot,
    segmentations,
    serve_ohif,
    sop_uid_of,
    viewer_crashed,
    viewer_unavailable,
    viewport_canvas,
    viewport_element,
    viewports,
    wait_for,
    wait_viewport_drawn,
)
from tests.support.orthanc import OrthancServer, orthanc_available, start_orthanc

pytestmark = pytest.mark.viewer

SOURCE = "RG3_J2KR.dcm"
# Console errors that end a load at once (OHIF logs them and shows an empty or crashed viewport).
SHOWS_IMAGE_JS = """uid => {
  const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const id = vp.getCurrentImageId && vp.getCurrentImageId();
  return Boolean(id && id.includes(uid));
}"""
FATAL = ("not yet supported", "TypeError", "Error compiling", "Cannot read properties", "missing")
CALIBRATED_SPACING = [0.1, 0.1]  # mm, Imager Pixel Spacing of the calibrated copy


@dataclass
class Study:
    """A source radiograph and the product's outputs for it, as stored in Orthanc."""

    name: str
    source: Dataset
    outputs: dict[str, Dataset]  # kind (sr, seg, sc, pm, ...) -> dataset

    @property
    def uid(self) -> str:
        return str(self.source.StudyInstanceUID)

    @property
    def n_series(self) -> int:
        return 1 + len({str(d.SeriesInstanceUID) for d in self.outputs.values()})

    def output(self, kind: str) -> Dataset:
        if kind not in self.outputs:
            pytest.fail(f"the writers produced no {kind!r} object (got {sorted(self.outputs)})")
        return self.outputs[kind]


@dataclass
class ViewerEnv:
    orthanc: OrthancServer
    ohif: OhifServer
    viewer: Viewer
    shots: Path
    studies: dict[str, Study] = field(default_factory=dict)


def _calibrated_copy(ds: Dataset) -> Dataset:
    """``ds`` as a calibrated detector would send it: an Imager Pixel Spacing, own UIDs."""
    copy = dcmread(io.BytesIO(_encode(ds)))
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(copy, attr, derive_uid("viewer-test-calibrated", str(getattr(ds, attr))))
    copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    copy.PatientID = f"{ds.PatientID}-CAL"  # its own patient: not listed as a prior study
    copy.ImagerPixelSpacing = CALIBRATED_SPACING
    return copy


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _build_outputs(runner: Any, algorithm: Any, source: Dataset) -> dict[str, Dataset]:
    """The product's outputs for one source, built in-process as the worker builds them."""
    from workers.dicom_out.outputs import build_outputs
    from workers.imaging import decode

    results = runner.run([(str(source.SOPInstanceUID), decode(source))])
    built = build_outputs([source], results, algorithm, 1)
    by_kind: dict[str, Dataset] = {}
    for kind, ds, _source_uid in built:
        assert kind not in by_kind, f"one source gave two {kind!r} objects"
        by_kind[kind] = ds
    return by_kind


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path) -> Iterator[ViewerEnv]:
    missing = viewer_unavailable()
    if missing:
        pytest.fail(f"the viewer test needs chromium, playwright and OHIF: {missing}")
    reason = orthanc_available()
    if reason:
        pytest.fail(f"the viewer test needs a real Orthanc: {reason}")

    from workers.models.bundle import load_bundle
    from workers.models.runner import ModelRunner
    from workers.results import AlgorithmInfo

    bundle = load_bundle(demo_bundle)
    runner = ModelRunner(bundle)
    algorithm = AlgorithmInfo(
        name=bundle.name, version=bundle.version, checksum=bundle.checksum, is_demo=bundle.is_demo
    )
    raw = sample_path(SOURCE).read_bytes()
    plain = dcmread(io.BytesIO(raw))
    calibrated = _calibrated_copy(plain)
    studies = {
        "plain": Study("plain", plain, _build_outputs(runner, algorithm, plain)),
        "calibrated": Study(
            "calibrated", calibrated, _build_outputs(runner, algorithm, calibrated)
        ),
    }

    tmp = tmp_path_factory.mktemp("viewer")
    shots = Path(os.environ.get("PACS_AGENT_VIEWER_SHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    orthanc = start_orthanc(
        tmp / "orthanc", http_port=free_port(), dicom_port=free_port(), webhook_url=None
    )
    ohif: OhifServer | None = None
    viewer: Viewer | None = None
    try:
        orthanc.upload(raw)  # the source exactly as the modality sent it
        orthanc.upload(_encode(calibrated))
        for study in studies.values():
            for ds in study.outputs.values():
                orthanc.upload(_encode(ds))
        ohif = serve_ohif(orthanc.url)
        viewer = Viewer().start()
        yield ViewerEnv(orthanc, ohif, viewer, shots, studies)
    finally:
        if viewer is not None:
            viewer.stop()
        if ohif is not None:
            ohif.stop()
        orthanc.stop()


@dataclass
class Session:
    """One browser page on OHIF, with its log and the place for its screenshots."""

    env: ViewerEnv
    page: Any
    log: BrowserLog
    name: str
    since: int = 0  # console entries before the current action

    def open(self, study: Study) -> None:
        message = None
        try:
            open_study(self.page, self.env.ohif.url, study.uid, n_series=study.n_series)
        except TimeoutError as exc:
            message = f"OHIF did not open study {study.name}: {exc}"
        if message:
            self.fail(message)

    def load(self, series_description: str) -> None:
        """Load a series as a user does (double-click in the study browser)."""
        self.since = len(self.log.console)
        load_series(self.page, series_description)

    def abort_reason(self) -> str | None:
        """The viewer crashed, or logged an error that ends the current load."""
        crashed = viewer_crashed(self.page)
        fatal = [
            e
            for e in self.log.console[self.since :]
            if e.startswith(("error:", "pageerror:")) and any(p in e for p in FATAL)
        ]
        if fatal:
            return fatal[0].splitlines()[0]
        return crashed

    def shot(self, what: str, element: bool = False) -> Path:
        path = self.env.shots / f"{self.name}-{what}.png"
        save_screenshot(self.page, path, viewport_element(self.page) if element else None)
        return path

    def fail(self, message: str) -> None:
        path = self.shot("failure")
        notice = error_notification(self.page)
        pytest.fail(
            f"{message}\n{notice or ''}\nscreenshot: {path}\nbrowser log:\n{self.log.tail()}",
            pytrace=False,
        )


@pytest.fixture
def session(env: ViewerEnv, request: pytest.FixtureRequest) -> Iterator[Session]:
    page, blog = env.viewer.new_page()
    try:
        yield Session(env, page, blog, request.node.name)
    finally:
        page.close()


def _wait(s: Session, script: str, timeout_s: float, what: str, arg: Any = None) -> Any:
    message = None
    try:
        return wait_for(s.page, script, timeout_s, what, arg, abort=s.abort_reason)
    except TimeoutError as exc:
        message = str(exc)
    s.fail(message)


def _current_sop(s: Session) -> str | None:
    vps = viewports(s.page)
    return sop_uid_of(vps[0]["imageId"]) if vps else None


# the source -------------------------------------------------------------------------------


def test_source_radiograph_renders(session: Session) -> None:
    study = session.env.studies["plain"]
    session.open(study)
    source_uid = str(study.source.SOPInstanceUID)
    if _current_sop(session) != source_uid:  # the hanging protocol chose another series
        session.load("CR")
    _wait(
        session,
        SHOWS_IMAGE_JS,
        20,
        "the source image in the viewport",
        source_uid,
    )
    stats = wait_viewport_drawn(session.page)
    path = session.shot("source")
    listed = " | ".join(session.page.locator("[data-cy=studyBrowser-panel]").all_inner_texts())
    # A grey radiograph: spread of grey levels, hardly any colour.
    assert stats.std > 20 and stats.coloured < 0.02, f"not a grey radiograph: {stats} ({path})"
    for kind, ds in study.outputs.items():
        assert str(ds.SeriesDescription) in listed, (
            f"the study browser does not list the {kind} series {ds.SeriesDescription!r}: "
            f"{listed!r}"
        )


# SEG --------------------------------------------------------------------------------------


def _seg_frames(seg: Dataset) -> dict[int, np.ndarray]:
    """Segment number -> its mask (rows, columns), from the SEG's own pixel data."""
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    frames: dict[int, np.ndarray] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = item if "SegmentIdentificationSequence" in item else shared
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask = pixels[i] > 0
        frames[number] = frames[number] | mask if number in frames else mask
    return frames


def test_seg_loads_as_segmentation(session: Session) -> None:
    study = session.env.studies["plain"]
    seg = study.output("seg")
    session.open(study)
    session.load(str(seg.SeriesDescription))
    answer_prompt(
        session.page, "Do you want to open this Segmentation?", abort=session.abort_reason
    )
    loaded = _wait(
        session,
        "() => { const t = window.cornerstoneTools; if (!t) return null;"
        " const s = t.segmentation.state.getSegmentations();"
        " return s.length && s.every(x => x.representationData && x.representationData.Labelmap"
        " && (x.representationData.Labelmap.imageIds || []).length) ? s.length : null; }",
        30,
        "OHIF loading the SEG as a labelmap segmentation",
    )
    assert loaded
    path = session.shot("seg")
    [state] = segmentations(session.page)

    expected_labels = {
        int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence
    }
    shown = {int(k): v for k, v in state["segments"].items()}
    assert shown == expected_labels, f"segments shown {shown}, SEG has {expected_labels}"

    [image] = state["images"]
    source = study.source
    assert sop_uid_of(image["referencedImageId"]) == str(source.SOPInstanceUID)
    assert (image["rows"], image["columns"]) == (int(source.Rows), int(source.Columns))
    # Registration: OHIF's labelmap holds each mask where the SEG put it (a flipped or rotated
    # reading of the SEG's orientation would move the centroid).
    for number, mask in _seg_frames(seg).items():
        got = image["stats"].get(str(number))
        count = int(mask.sum())
        if count == 0:
            assert got is None, f"segment {number} is empty in the SEG but not in OHIF"
            continue
        assert got is not None, f"segment {number} ({count} pixels) is empty in OHIF ({path})"
        rows, cols = np.nonzero(mask)
        assert got["count"] == count, f"segment {number}: {got['count']} pixels, SEG {count}"
        assert abs(got["row"] - rows.mean()) < 1 and abs(got["col"] - cols.mean()) < 1, (
            f"segment {number} centroid in OHIF (row {got['row']:.1f}, col {got['col']:.1f}) "
            f"!= SEG ({rows.mean():.1f}, {cols.mean():.1f}): mask misregistered ({path})"
        )
    canvas = save_screenshot(
        session.page,
        session.env.shots / f"{session.name}-canvas.png",
        viewport_canvas(session.page),
    )
    assert canvas.coloured > 0.01, f"no segment colour drawn on the image: {canvas} ({path})"


# SR ---------------------------------------------------------------------------------------


@dataclass
class SrMeasurement:
    tracking_uid: str
    finding: str
    name: str  # concept name of the NUM, e.g. Probability
    value: float
    points: list[tuple[float, float]]  # SCOORD graphic data, image coordinates (column, row)
    image_uid: str | None


def _items(seq: Any) -> list[Dataset]:
    return list(seq or [])


def _code_meaning(item: Dataset, attr: str) -> str:
    seq = item.get(attr)
    return str(seq[0].CodeMeaning) if seq else ""


def _scoords(item: Dataset) -> list[Dataset]:
    found = [item] if item.get("ValueType") == "SCOORD" else []
    for child in _items(item.get("ContentSequence")):
        found += _scoords(child)
    return found


def _sr_measurements(sr: Dataset) -> list[SrMeasurement]:
    """The TID 1500 measurement groups' numeric measurements that carry an image region."""
    out: list[SrMeasurement] = []
    for container in _items(sr.get("ContentSequence")):
        if container.get("ValueType") != "CONTAINER":
            continue
        for group in _items(container.get("ContentSequence")):
            if _code_meaning(group, "ConceptNameCodeSequence") != "Measurement Group":
                continue
            content = _items(group.get("ContentSequence"))
            uid = next(
                (
                    str(i.UID)
                    for i in content
                    if _code_meaning(i, "ConceptNameCodeSequence") == "Tracking Unique Identifier"
                ),
                "",
            )
            finding = next(
                (
                    _code_meaning(i, "ConceptCodeSequence")
                    for i in content
                    if _code_meaning(i, "ConceptNameCodeSequence") == "Finding"
                ),
                "",
            )
            group_regions = [
                sc for i in content if i.get("ValueType") == "SCOORD" for sc in _scoords(i)
            ]
            for num in (i for i in content if i.get("ValueType") == "NUM"):
                regions = _scoords(num) or group_regions
                if not regions:
                    continue
                graphic = [float(v) for v in regions[0].GraphicData]
                refs = [
                    r
                    for sc in regions
                    for r in _items(sc.get("ContentSequence"))
                    if "ReferencedSOPSequence" in r
                ]
                out.append(
                    SrMeasurement(
                        tracking_uid=uid,
                        finding=finding,
                        name=_code_meaning(num, "ConceptNameCodeSequence"),
                        value=float(num.MeasuredValueSequence[0].NumericValue),
                        points=list(zip(graphic[0::2], graphic[1::2], strict=True)),
                        image_uid=str(refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                        if refs
                        else None,
                    )
                )
    return out


def test_sr_findings_drawn_on_image(session: Session) -> None:
    study = session.env.studies["plain"]
    sr = study.output("sr")
    expected = _sr_measurements(sr)
    assert expected, (
        "the SR has no numeric measurement with an image region (SCOORD): OHIF draws nothing "
        "of a TID 1500 report without one (its qualitative evaluations are not shown)"
    )
    session.open(study)
    session.load(str(sr.SeriesDescription))
    _wait(
        session,
        "n => { const t = window.cornerstoneTools; if (!t) return false;"
        " return t.annotation.state.getAllAnnotations()"
        ".filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay').length >= n; }",
        30,
        f"OHIF drawing {len(expected)} SR measurement(s)",
        len({m.tracking_uid for m in expected}),
    )
    path = session.shot("sr", element=True)
    drawn = [a for a in image_annotations(session.page) if a["tool"] == "DICOMSRDisplay"]
    texts = annotation_texts(session.page)
    by_uid = {a["trackingUid"]: a for a in drawn}
    problems = []
    for m in expected:
        a = by_uid.get(m.tracking_uid)
        if a is None:
            problems.append(f"{m.finding}: no annotation for Tracking UID {m.tracking_uid}")
            continue
        if m.image_uid and sop_uid_of(a["imageId"]) != m.image_uid:
            problems.append(f"{m.finding}: drawn on {a['imageId']}, SCOORD on {m.image_uid}")
        got = [tuple(p[:2]) for p in a["points"]]
        pairs = zip(got, m.points, strict=False)
        if len(got) != len(m.points) or any(
            abs(g[0] - e[0]) > 0.5 or abs(g[1] - e[1]) > 0.5 for g, e in pairs
        ):
            problems.append(f"{m.finding}: drawn at {got}, SCOORD {m.points}")
        lines = [f"{label}: {value}".strip() for label, value in a["labels"]]
        text = " | ".join(lines)
        if m.finding.lower() not in text.lower():
            problems.append(f"{m.finding}: OHIF's text does not name the finding: {text!r}")
        if f"{m.value:.2f}" not in text:
            problems.append(f"{m.finding}: OHIF's text lacks {m.name} {m.value:.2f}: {text!r}")
    assert any(f"{m.value:.2f}" in t for m in expected for t in texts), (
        f"no measurement text in the viewport's annotation layer: {texts} ({path})"
    )
    # Each finding's text must be readable: texts drawn on top of each other are not.
    boxes = annotation_text_boxes(session.page)
    finding_of = {m.tracking_uid: m.finding for m in expected}
    uids = [u for u in boxes if u in finding_of]
    stacked = sorted(
        {
            finding_of[w]
            for i, u in enumerate(uids)
            for v in uids[i + 1 :]
            if finding_of[u] != finding_of[v] and boxes_overlap(boxes[u], boxes[v])
            for w in (u, v)
        }
    )
    if stacked:
        problems.append(
            f"the texts of {len(stacked)} findings ({', '.join(stacked)}) are drawn over each "
            "other (same image region): none of them is readable"
        )
    assert not problems, "SR as OHIF shows it:\n  " + "\n  ".join(problems) + f"\n({path})"


# heatmap Secondary Capture ----------------------------------------------------------------


def test_heatmap_secondary_capture_displays(session: Session) -> None:
    study = session.env.studies["plain"]
    sc = study.output("sc")
    session.open(study)
    session.load(str(sc.SeriesDescription))
    _wait(
        session,
        SHOWS_IMAGE_JS,
        20,
        "the heatmap image in the viewport",
        str(sc.SOPInstanceUID),
    )
    wait_viewport_drawn(session.page)
    path = session.shot("heatmap")
    canvas = save_screenshot(
        session.page,
        session.env.shots / f"{session.name}-canvas.png",
        viewport_canvas(session.page),
    )
    assert canvas.coloured > 0.05, f"the heatmap shows no colour: {canvas} ({path})"
    dims = viewports(session.page)[0]["dims"]
    source = study.source
    assert dims is not None and list(dims[:2]) == [int(source.Columns), int(source.Rows)], (
        f"the heatmap is shown at {dims}, the source is {source.Columns}x{source.Rows}"
    )


# Parametric Map ---------------------------------------------------------------------------


def test_parametric_map_displays(session: Session) -> None:
    study = session.env.studies["calibrated"]
    pm = study.output("pm")
    session.open(study)
    session.load(str(pm.SeriesDescription))
    _wait(
        session,
        "() => { const vs = window.cornerstone.getRenderingEngines()[0].getViewports();"
        " return vs.some(v => (v.getActors ? v.getActors() : [])"
        ".some(a => String(a.uid).includes('pmap') || String(a.referencedId).includes('pmap')));"
        " }",
        30,
        "OHIF adding the Parametric Map to the viewport",
    )
    # The fused view draws the source first, the coloured map once its volume has loaded.
    stats = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and session.abort_reason() is None:
        canvas = viewport_canvas(session.page)
        if canvas.count() and canvas.is_visible():
            stats = image_stats(canvas.screenshot(timeout=5000))
            if stats.coloured > 0.05:
                break
        time.sleep(0.5)
    path = session.shot("parametric-map")
    if session.page.get_by_text("Loading Parametric Map").count():
        session.fail("OHIF is still 'Loading Parametric Map...'")
    errors = [e for e in session.log.errors() if "shader" in e.lower() or "pmap" in e.lower()]
    assert not errors, f"OHIF reported: {errors} ({path})"
    assert stats is not None, f"the Parametric Map viewport has no canvas ({path})"
    assert stats.coloured > 0.05, f"the Parametric Map shows no colour overlay: {stats} ({path})"
