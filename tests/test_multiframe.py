"""Multi-frame X-ray (XA, RF, Enhanced XA/XRF) never fails a job.

Real multi-frame files are built here with pydicom (uncompressed XA with a Representative Frame
Number, an Enhanced XA without one, a JPEG baseline XA encoded by Pillow): each frame carries a
bright square at a place of its own, so the decoded image tells which frame was decoded. The
outputs are judged by dciodvfy; the last test runs the real path (agent and worker processes,
PostgreSQL, Redis, storescu as the modality, a folder destination) with a study holding one
single-frame CR and one multi-frame XA. Nothing is mocked.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select

from pacs_agent.db.models import Event, Instance, Job, Result, Study
from pacs_agent.db.session import Database
from pacs_agent.dicom_facts import examine
from tests.conftest import AgentEnv, sample_path, storescu
from tests.dciodvfy import dciodvfy_errors
from workers.dicom_out.outputs import OutputOptions, build_output_set
from workers.imaging import analysed_frame, decode
from workers.results import AlgorithmInfo, Finding, ImageResult

XA = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SIDE = 96
SQUARE = 16
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9)
DEMO = AlgorithmInfo(
    name="pacs-agent chest demo - DEMO (random weights)",
    version="0.1.0-demo",
    checksum="fedcba9876543210" * 4,
    is_demo=True,
)


def _square_at(frame: int) -> tuple[int, int]:
    """Top-left (row, column) of the bright square of 1-based ``frame``."""
    return (8 + 12 * (frame - 1)) % (SIDE - SQUARE), (4 + 16 * (frame - 1)) % (SIDE - SQUARE)


def _frames(n: int) -> np.ndarray:
    """n frames of 8-bit pixels: a grey ramp with one bright square per frame."""
    ramp = np.tile(np.linspace(20, 120, SIDE, dtype=np.float32), (SIDE, 1))
    out = np.empty((n, SIDE, SIDE), dtype=np.uint8)
    for k in range(n):
        img = ramp.copy()
        r, c = _square_at(k + 1)
        img[r : r + SQUARE, c : c + SQUARE] = 250
        out[k] = img.astype(np.uint8)
    return out


def multiframe_xa(
    like: Dataset,
    n_frames: int = 5,
    *,
    representative: int | None = 4,
    sop_class: str = XA,
    syntax: str = "explicit",
) -> Dataset:
    """A multi-frame XA (or Enhanced XA) in the study of ``like`` (its patient and study)."""
    ds = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, like.get(keyword, ""))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "XA"
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.Manufacturer = "test"
    ds.PatientOrientation = ["L", "F"] if sop_class == XA else None
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 66.7
    if representative is not None:
        ds.RepresentativeFrameNumber = representative
    pixels = _frames(n_frames)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax == "jpeg":
        fragments = []
        for frame in pixels:
            buf = io.BytesIO()
            Image.fromarray(frame, mode="L").save(buf, format="JPEG", quality=95)
            fragments.append(buf.getvalue())
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _square_found(image: np.ndarray) -> tuple[int, int]:
    """Top-left of the bright square in a decoded image (0..1)."""
    rows, cols = np.nonzero(image >= image.max() - 0.05)
    return int(rows.min()), int(cols.min())


@pytest.fixture(scope="module")
def cr() -> Dataset:
    return pydicom.dcmread(sample_path("RG3_J2KR.dcm"))


# --------------------------------------------------------------------------- which frame


def test_analysed_frame_is_the_representative_else_the_middle(cr: Dataset) -> None:
    assert analysed_frame(cr) is None  # single frame
    assert analysed_frame(multiframe_xa(cr, 5, representative=4)) == 4
    assert analysed_frame(multiframe_xa(cr, 5, representative=None)) == 3
    assert analysed_frame(multiframe_xa(cr, 6, representative=None)) == 3
    assert analysed_frame(multiframe_xa(cr, 5, representative=0)) == 3  # not a frame
    assert analysed_frame(multiframe_xa(cr, 5, representative=9)) == 3  # beyond the last


@pytest.mark.parametrize(
    ("sop_class", "syntax", "representative", "expected"),
    [
        (XA, "explicit", 4, 4),
        (ENHANCED_XA, "explicit", None, 3),
        (XA, "jpeg", 2, 2),
    ],
    ids=["xa-native-representative", "enhanced-xa-middle", "xa-jpeg-baseline"],
)
def test_decode_gives_the_analysed_frame(
    cr: Dataset, sop_class: str, syntax: str, representative: int | None, expected: int
) -> None:
    ds = _roundtrip(
        multiframe_xa(cr, 5, representative=representative, sop_class=sop_class, syntax=syntax)
    )
    image = decode(ds)
    assert image.shape == (SIDE, SIDE)
    assert _square_found(image) == _square_at(expected)
    # Any other frame on request, and a frame that does not exist is refused clearly.
    assert _square_found(decode(ds, 1)) == _square_at(1)
    with pytest.raises(ValueError, match="frame 6 does not exist"):
        decode(ds, 6)


def test_facts_record_the_number_of_frames(cr: Dataset) -> None:
    xa = _roundtrip(multiframe_xa(cr, 5))
    facts = examine(xa, xa.file_meta.TransferSyntaxUID)
    assert facts.analysable and facts.number_of_frames == 5
    single = examine(cr, cr.file_meta.TransferSyntaxUID)
    assert single.number_of_frames is None


# --------------------------------------------------------------------------- outputs


def _result(source: Dataset, *, point: tuple[float, float] | None = None) -> ImageResult:
    rows, cols = int(source.Rows), int(source.Columns)
    uid = str(source.SOPInstanceUID)
    r, c = np.ogrid[0:rows, 0:cols]
    disc = (r - rows * 0.5) ** 2 + (c - cols * 0.5) ** 2 <= (min(rows, cols) * 0.2) ** 2
    heat = np.exp(-(((r - rows * 0.3) / rows) ** 2 + ((c - cols * 0.6) / cols) ** 2) * 8)
    heat = (heat / heat.max()).astype(np.float32)
    at = point if point is not None else (float(cols // 2), float(rows // 3))
    return ImageResult(
        source_sop_instance_uid=uid,
        findings=[
            Finding("Cardiomegaly", 0.91, 0.5, uid, point=at),
            Finding("Pneumothorax", 0.08, 0.5, uid, point=at),
        ],
        masks=disc[np.newaxis].astype(bool),
        segment_labels=["Heart"],
        heatmap=heat,
        display=np.tile(np.linspace(0, 1, cols, dtype=np.float32), (rows, 1)),
    )


def _image_refs(item: Dataset) -> Iterator[Dataset]:
    """Every IMAGE reference of an SR content tree (ReferencedSOPSequence items)."""
    yield from item.get("ReferencedSOPSequence", [])
    for child in item.get("ContentSequence", []):
        yield from _image_refs(child)


def _valid(ds: Dataset) -> None:
    errors = dciodvfy_errors(ds)
    assert errors == [], f"dciodvfy errors in {ds.SOPClassUID.name}: {errors}"


@pytest.mark.parametrize("sr_flavour", ["tid1500", "basic-text"])
@pytest.mark.parametrize(
    ("sop_class", "syntax"),
    [(XA, "explicit"), (ENHANCED_XA, "explicit"), (XA, "jpeg")],
    ids=["xa", "enhanced-xa", "xa-jpeg"],
)
def test_outputs_reference_the_analysed_frame(
    cr: Dataset, sop_class: str, syntax: str, sr_flavour: str
) -> None:
    xa = _roundtrip(multiframe_xa(cr, 5, representative=4, sop_class=sop_class, syntax=syntax))
    xa_uid, cr_uid = str(xa.SOPInstanceUID), str(cr.SOPInstanceUID)
    made = build_output_set(
        [cr, xa],
        [_result(cr), _result(xa)],
        DEMO,
        1,
        OutputOptions(sr_flavour=sr_flavour, key_objects=True),  # type: ignore[arg-type]
        "urgent",
        frames={xa_uid: 4},
        created=CREATED,
    )
    kinds = {(kind, src) for kind, _, src in made.outputs}
    # The CR gets everything, the XA its SC; the study one report (and a KOS).
    assert kinds == {
        ("sr", None),
        ("ko", None),
        ("seg", cr_uid),
        ("sc", cr_uid),
        ("pm", cr_uid),
        ("sc", xa_uid),
    }
    # SEG and PM are skipped for the multi-frame image, each with its reason.
    assert sorted((k.kind, k.source_sop_instance_uid) for k in made.skipped) == [
        ("pm", xa_uid),
        ("seg", xa_uid),
    ]
    assert all(k.reason.startswith("multi-frame source") for k in made.skipped)
    assert made.images_without_outputs == []
    by_kind = {(kind, src): ds for kind, ds, src in made.outputs}

    sc = by_kind[("sc", xa_uid)]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == xa_uid
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 4
    assert sc.ReferencedImageSequence[0].ReferencedFrameNumber == 4
    assert (sc.Rows, sc.Columns) == (SIDE, SIDE)
    cr_sc = by_kind[("sc", cr_uid)]
    assert "ReferencedFrameNumber" not in cr_sc.SourceImageSequence[0]

    sr = by_kind[("sr", None)]
    refs = list(_image_refs(sr))
    xa_refs = [r for r in refs if r.ReferencedSOPInstanceUID == xa_uid]
    cr_refs = [r for r in refs if r.ReferencedSOPInstanceUID == cr_uid]
    assert xa_refs and cr_refs
    assert all(r.ReferencedFrameNumber == 4 for r in xa_refs)
    assert all("ReferencedFrameNumber" not in r for r in cr_refs)

    for _, ds, _ in made.outputs:
        _valid(_roundtrip(ds))


def test_one_image_that_cannot_be_written_leaves_the_others(cr: Dataset) -> None:
    """A result the writers refuse (heatmap and point outside the image) costs that image's
    objects only; the reasons name UIDs and sizes, never the patient."""
    xa = _roundtrip(multiframe_xa(cr, 3, representative=None))
    xa_uid, cr_uid = str(xa.SOPInstanceUID), str(cr.SOPInstanceUID)
    bad = _result(xa, point=(float(SIDE + 50), 1.0))
    bad.heatmap = np.zeros((3, 3), dtype=np.float32)
    made = build_output_set(
        [cr, xa], [_result(cr), bad], DEMO, 1, frames={xa_uid: 2}, created=CREATED
    )
    kinds = {(kind, src) for kind, _, src in made.outputs}
    assert kinds == {("sr", None), ("seg", cr_uid), ("sc", cr_uid), ("pm", cr_uid)}
    assert made.images_without_outputs == [xa_uid]
    reasons = {k.kind: k.reason for k in made.skipped if k.source_sop_instance_uid == xa_uid}
    assert set(reasons) == {"seg", "sc", "pm", "sr"}
    assert "shape" in reasons["sc"] and "outside" in reasons["sr"]
    assert "multi-frame source" in reasons["pm"] and "multi-frame source" in reasons["seg"]
    patient = str(cr.PatientName)
    assert patient and all(patient not in k.describe() for k in made.skipped)
    sr = next(ds for kind, ds, _ in made.outputs if kind == "sr")
    assert {r.ReferencedSOPInstanceUID for r in _image_refs(sr)} == {cr_uid}
    _valid(_roundtrip(sr))


def test_a_multiframe_source_without_the_analysed_frame_is_refused(cr: Dataset) -> None:
    from workers.dicom_out.sc import build_heatmap_sc
    from workers.results import OutputIdentity

    xa = multiframe_xa(cr, 3)
    r = _result(xa)
    identity = OutputIdentity("1.2.3.4", "1.2.3.5", 9003, 1, "AI heatmap")
    with pytest.raises(ValueError, match="analysed frame must be named"):
        build_heatmap_sc(xa, r.display, r.heatmap, DEMO, identity)
    with pytest.raises(ValueError, match="not a frame"):
        build_heatmap_sc(xa, r.display, r.heatmap, DEMO, identity, frame=4)


# --------------------------------------------------------------------------- pipeline record


def test_done_with_images_skipped_is_what_the_operator_sees(database_url: str) -> None:
    from workers.pipeline import _finish

    db = Database(database_url)
    with db.session() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.2.1125.1", status="processing")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="chest", status="running", images_skipped=2)
        clean = Job(study_id=study.id, pipeline="other", status="running")
        s.add_all([job, clean])
        s.flush()
        job_id, clean_id, study_id = job.id, clean.id, study.id
    _finish(db, job_id, error=None)
    with db.session() as s:
        assert s.get_one(Job, job_id).status == "done"
        assert s.get_one(Study, study_id).reason == "done with 2 images skipped"
        done = s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == "job.done"))
        assert "done with 2 images skipped" in next(iter(done)).message
    _finish(db, clean_id, error=None)
    with db.session() as s:
        assert s.get_one(Study, study_id).reason is None
    db.dispose()


# --------------------------------------------------------------------------- real path


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.e2e
def test_study_with_cr_and_multiframe_xa_ends_done(
    tmp_path: Path, postgres_server: str, broker_url: str, demo_bundle: Path, cr: Dataset
) -> None:
    from tests.conftest import _create_pg_database, _drop_pg_database

    name, db_url = _create_pg_database(postgres_server)
    out = tmp_path / "pacs"
    out.mkdir()
    agent = AgentEnv(tmp_path, db_url, broker_url, demo_bundle, destinations=f"file://{out}")
    try:
        from pacs_agent.db.migrate import upgrade

        upgrade(db_url)
        study_uid = generate_uid()
        single = copy.deepcopy(cr)
        single.StudyInstanceUID = study_uid
        single.SeriesInstanceUID = generate_uid()
        single.SOPInstanceUID = generate_uid()
        single.file_meta.MediaStorageSOPInstanceUID = single.SOPInstanceUID
        xa = multiframe_xa(single, 5, representative=4)
        cr_path, xa_path = tmp_path / "cr.dcm", tmp_path / "xa.dcm"
        single.save_as(cr_path, enforce_file_format=True)
        xa.save_as(xa_path, enforce_file_format=True)
        agent.start_agent()
        agent.start_worker()
        res = storescu(agent.dicom_port, cr_path, xa_path)
        assert res.returncode == 0, res.stderr
        study = agent.wait_study(study_uid, {"done", "failed", "skipped"})
        assert study["status"] == "done", study

        db = Database(db_url)
        with db.session() as s:
            frames = dict(
                s.execute(select(Instance.sop_instance_uid, Instance.number_of_frames)).all()
            )
            results = s.execute(
                select(Result.kind, Result.source_sop_instance_uid, Result.source_frame)
            ).all()
            events = [
                e.message
                for e in s.scalars(select(Event).where(Event.kind == "job.outputs_skipped"))
            ]
        db.dispose()
        xa_uid, cr_uid = str(xa.SOPInstanceUID), str(single.SOPInstanceUID)
        assert frames == {cr_uid: None, xa_uid: 5}
        assert ("sc", xa_uid, 4) in results
        assert {(k, src) for k, src, _ in results} >= {
            ("sr", None),
            ("seg", cr_uid),
            ("sc", cr_uid),
            ("pm", cr_uid),
            ("sc", xa_uid),
        }
        assert not any(k in ("seg", "pm") and src == xa_uid for k, src, _ in results)
        assert any(xa_uid in m and "multi-frame" in m for m in events)

        # What reached the destination: the XA's SC and the report point at frame 4.
        delivered = _wait(
            lambda: (
                [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
                if len(list(out.rglob("*.dcm"))) >= 5
                else None
            ),
            60,
            "the delivered objects",
        )
        by_class: dict[str, list[Dataset]] = {}
        for ds in delivered:
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
        [sr] = by_class[SR_CLASS]
        assert {
            r.ReferencedFrameNumber for r in _image_refs(sr) if r.ReferencedSOPInstanceUID == xa_uid
        } == {4}
        [xa_sc] = [
            d
            for d in by_class[SecondaryCaptureImageStorage]
            if d.SourceImageSequence[0].ReferencedSOPInstanceUID == xa_uid
        ]
        assert xa_sc.SourceImageSequence[0].ReferencedFrameNumber == 4
        assert len(by_class[SEG_CLASS]) == 1 and len(by_class[PM_CLASS]) == 1
        for ds in delivered:
            _valid(ds)
    finally:
        agent.stop()
        _drop_pg_database(postgres_server, name)


def test_an_image_the_model_refuses_is_left_out_of_its_batch(cr: Dataset) -> None:
    """The model pass fails for the whole batch: each image then runs alone, the one it
    refuses is left out with its reason and the others are analysed. The runner is a stand-in
    that refuses one image (a real model fails that way only on inputs we cannot build here);
    everything around it is the pipeline's own code."""
    from workers.pipeline import ClaimedJob, _Prepared, _run_model

    good, bad = _roundtrip(multiframe_xa(cr, 3)), copy.deepcopy(cr)
    good_uid, bad_uid = str(good.SOPInstanceUID), str(bad.SOPInstanceUID)

    class RefusesOne:
        def run(self, images: list[tuple[str, np.ndarray]]) -> list[ImageResult]:
            if any(uid == bad_uid for uid, _ in images):
                raise RuntimeError("the model cannot take this image")
            return [_result(good) for _ in images]

    prep = _Prepared(
        ClaimedJob(1, 1, 1, [], [good_uid, bad_uid]),
        sources=[good, bad],
        images=[(good_uid, np.zeros((2, 2))), (bad_uid, np.zeros((2, 2)))],
    )
    results = _run_model(RefusesOne(), [prep])
    assert [r.source_sop_instance_uid for r in results] == [good_uid]
    assert [uid for uid, _ in prep.images] == [good_uid] and prep.sources == [good]
    assert len(prep.model_skipped) == 1
    assert prep.model_skipped[0].startswith(f"{bad_uid}: model: RuntimeError")
    # Nothing analysable at all: the model's failure is the job's.
    with pytest.raises(RuntimeError):
        _run_model(
            RefusesOne(), [_Prepared(ClaimedJob(2, 1, 1, [], [bad_uid]), [bad], [(bad_uid, None)])]
        )
