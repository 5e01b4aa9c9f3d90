"""Every refusal is right and visible (issue 10): header facts that contradict each other are
refused with a specific C-STORE status, sent as a modality would (dcmtk's storescu, one
association per file), and the listener keeps serving; Secondary Capture is analysed only when it
is a radiograph; each refusal is a row in ``refusals`` (without patient data), listed by
``GET /api/refusals``; reasons, events and the agent's log never copy a dataset value.

Real parts throughout: the pynetdicom SCP from ``start_scp`` (``Listener``) or a real
``pacs-agent serve`` process, SQLite and PostgreSQL, storescu as the sender. Nothing is mocked.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, generate_uid
from sqlalchemy import select, text

from pacs_agent.db.models import Event, Refusal, Study
from pacs_agent.db.session import Database
from tests.conftest import AgentEnv, sample_path, storescu
from tests.support.listener import Listener

SC = UID("1.2.840.10008.5.1.4.1.1.7")
SECRET = "ZQXSECRET42"  # a distinctive bad value: it must never come back in any text
# pydicom in this test process warns about the bad values the tests write, with the value.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR IS")


@pytest.fixture
def listener(tmp_path: Path, database_url: str) -> Iterator[Listener]:
    lst = Listener(tmp_path, database_url)
    yield lst
    lst.stop()


def fresh(name: str = "RG3_UNCR.dcm", study_uid: str | None = None) -> Dataset:
    """A sample under new UIDs (RG3_UNCR: CR, 1760x1760, 16 bits allocated, 10 stored)."""
    ds = dcmread(sample_path(name))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def save(ds: Dataset, tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def raw_value(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put bytes pydicom would refuse to encode (e.g. an IS that is no number) in ``ds``."""
    if len(value) % 2:
        value += b" "
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _set(**tags: object) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        for key, value in tags.items():
            setattr(ds, key, value)

    return apply


def _two_frames_one_frame_of_pixels(ds: Dataset) -> None:
    ds.NumberOfFrames = 2  # Pixel Data holds Rows x Columns x 1 frame


def _frames_not_a_number(ds: Dataset) -> None:
    raw_value(ds, 0x00280008, "IS", SECRET.encode())


# (case id, mutation, status name storescu prints, attribute keyword the reason must name)
MALFORMED = [
    (
        "bits-stored-over-allocated",
        _set(BitsStored=20),
        "DataSetDoesNotMatchSOPClass",
        "BitsStored",
    ),
    (
        "photometric-FOO",
        _set(PhotometricInterpretation="FOO"),
        "DataSetDoesNotMatchSOPClass",
        "PhotometricInterpretation",
    ),
    ("high-bit-over-allocated", _set(HighBit=16), "DataSetDoesNotMatchSOPClass", "HighBit"),
    ("high-bit-under-stored", _set(HighBit=3), "DataSetDoesNotMatchSOPClass", "HighBit"),
    (
        "samples-vs-photometric",
        _set(PhotometricInterpretation="RGB"),
        "DataSetDoesNotMatchSOPClass",
        "SamplesPerPixel",
    ),
    ("bits-allocated-12", _set(BitsAllocated=12), "DataSetDoesNotMatchSOPClass", "BitsAllocated"),
    (
        "pixel-representation-2",
        _set(PixelRepresentation=2),
        "DataSetDoesNotMatchSOPClass",
        "PixelRepresentation",
    ),
    (
        "frames-vs-pixel-length",
        _two_frames_one_frame_of_pixels,
        "DataSetDoesNotMatchSOPClass",
        "Pixel Data truncated",
    ),
    ("frames-not-a-number", _frames_not_a_number, "DataSetDoesNotMatchSOPClass", "NumberOfFrames"),
]


@pytest.mark.parametrize(
    ("mutate", "status_name", "named"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_header_is_refused_recorded_and_listener_keeps_serving(
    listener: Listener,
    tmp_path: Path,
    mutate: Callable[[Dataset], None],
    status_name: str,
    named: str,
) -> None:
    bad = fresh()
    mutate(bad)
    res = storescu(listener.port, save(bad, tmp_path, "bad"))
    out = res.stdout + res.stderr
    assert status_name in out, out
    assert listener.instances() == []
    assert not list(listener.store.root.rglob(f"{bad.SOPInstanceUID}*"))
    with listener.db.session() as s:
        [row] = s.scalars(select(Refusal)).all()
    assert row.door == "dimse" and row.calling_ae == "MODALITY"
    assert row.sender_address == "127.0.0.1"
    assert row.sop_instance_uid == bad.SOPInstanceUID  # read even from a refused file
    assert row.sop_class_uid == bad.SOPClassUID
    assert row.status in (0xA900, 0xC210)
    assert named in row.reason, row.reason
    assert SECRET not in row.reason
    # The service keeps serving: a good file right after is stored.
    good = fresh()
    res = storescu(listener.port, save(good, tmp_path, "good"))
    assert res.returncode == 0 and "Success" in res.stdout + res.stderr, res.stderr
    assert [i.sop_instance_uid for i in listener.instances()] == [good.SOPInstanceUID]


def test_refusal_reads_the_uids_of_a_truncated_file(listener: Listener, tmp_path: Path) -> None:
    bad = fresh()
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]
    out = storescu(listener.port, save(bad, tmp_path, "short"))
    assert "DataSetDoesNotMatchSOPClass" in out.stdout + out.stderr
    with listener.db.session() as s:
        [row] = s.scalars(select(Refusal)).all()
    assert (row.sop_instance_uid, row.study_instance_uid, row.status) == (
        bad.SOPInstanceUID,
        bad.StudyInstanceUID,
        0xA900,
    )
    assert "truncated" in row.reason


def test_refusal_is_answered_when_recording_it_fails(tmp_path: Path, database_url: str) -> None:
    """The ``refusals`` table is gone (a real database failure, not a mock): the sender still
    gets the refusal status, nothing is stored, and a good file after it is stored."""
    lst = Listener(tmp_path, database_url)
    try:
        with lst.db.session() as s:
            s.execute(text("DROP TABLE refusals"))
        bad = fresh()
        bad.BitsStored = 20
        res = storescu(lst.port, save(bad, tmp_path, "bad"))
        assert "DataSetDoesNotMatchSOPClass" in res.stdout + res.stderr, res.stdout
        assert lst.instances() == []
        good = fresh()
        assert storescu(lst.port, save(good, tmp_path, "good")).returncode == 0
        assert [i.sop_instance_uid for i in lst.instances()] == [good.SOPInstanceUID]
    finally:
        lst.stop()


# --- Secondary Capture: analysed only when it is a radiograph ---------------------------------


def _df_chest_film(ds: Dataset) -> None:
    """A digitized chest film: the CR's pixels as a Secondary Capture, Conversion Type DF."""
    ds.SOPClassUID = SC
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.Modality = "OT"
    ds.ConversionType = "DF"
    ds.BodyPartExamined = "CHEST"


SC_CASES = [
    # (id, sample, mutation, analysable, words of the reason)
    ("nm-screen-capture", "JPEG2000.dcm", None, False, "neither digitized film"),
    ("rgb-capture", "SC_rgb.dcm", None, False, "colour"),
    ("deflated-ot-image", "image_dfl.dcm", None, False, "neither digitized film"),
    ("df-chest-film", "RG3_UNCR.dcm", _df_chest_film, True, None),
]


@pytest.mark.parametrize(
    ("name", "mutate", "analysable", "reason"),
    [case[1:] for case in SC_CASES],
    ids=[case[0] for case in SC_CASES],
)
def test_secondary_capture_is_analysed_only_when_it_is_a_radiograph(
    listener: Listener,
    tmp_path: Path,
    name: str,
    mutate: Callable[[Dataset], None] | None,
    analysable: bool,
    reason: str | None,
) -> None:
    ds = fresh(name)
    if mutate is not None:
        mutate(ds)
    assert ds.SOPClassUID == SC
    res = storescu(listener.port, save(ds, tmp_path, "sc"))
    assert res.returncode == 0 and "Success" in res.stdout + res.stderr, res.stdout + res.stderr
    inst = listener.instance(ds.SOPInstanceUID)
    assert inst is not None, "stored, not refused"
    assert inst.analysable is analysable, inst.reason
    if reason is None:
        assert inst.reason is None
    else:
        assert inst.reason is not None and reason in inst.reason
    with listener.db.session() as s:
        assert s.scalars(select(Refusal)).all() == []


# --- the API, the events and the agent's log, on a real agent process --------------------------


@pytest.fixture
def agent(tmp_path: Path, database_url: str) -> Iterator[AgentEnv]:
    # Ingest only: no worker, a broker nobody listens on, no study completes within the test.
    env = AgentEnv(tmp_path, database_url, "redis://127.0.0.1:9/0", tmp_path / "none", "")
    env.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"
    env.start_agent()
    yield env
    env.stop()


def _stow(env: AgentEnv, *bodies: bytes) -> httpx.Response:
    boundary = "refusal-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b + b"\r\n"
        for b in bodies
    )
    body += f"--{boundary}--\r\n".encode()
    return httpx.post(
        f"{env.url}/dicomweb/studies",
        content=body,
        headers={
            **env.auth(),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=60,
    )


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_refusals_are_listed_without_the_bad_values(
    agent: AgentEnv, tmp_path: Path, database_url: str
) -> None:
    study = generate_uid()
    good = fresh("RG3_UNCR.dcm", study)
    assert storescu(agent.dicom_port, save(good, tmp_path, "good")).returncode == 0
    photometric = fresh("RG3_UNCR.dcm", study)  # same study: its refusal is also an event
    photometric.PhotometricInterpretation = SECRET
    frames = fresh("RG3_UNCR.dcm", study)
    _frames_not_a_number(frames)
    for i, ds in enumerate((photometric, frames)):
        res = storescu(agent.dicom_port, save(ds, tmp_path, f"bad{i}"), aet="BADMOD")
        assert "Success" not in res.stdout + res.stderr, res.stdout
    stow_bad = fresh("RG3_UNCR.dcm", study)
    stow_bad.BitsStored = 20
    r = _stow(agent, _encode(stow_bad))
    assert r.status_code == 409, r.text

    api = f"{agent.url}/api/refusals"
    assert httpx.get(api, timeout=10).status_code == 401
    rows = httpx.get(api, headers=agent.auth(), timeout=10).json()
    assert [(x["door"], x["sop_instance_uid"]) for x in rows] == [
        ("stow", stow_bad.SOPInstanceUID),  # newest first
        ("dimse", frames.SOPInstanceUID),
        ("dimse", photometric.SOPInstanceUID),
    ]
    assert rows[0]["status_hex"] == "0xA900" and "BitsStored" in rows[0]["reason"]
    assert rows[0]["sender_address"] == "127.0.0.1" and rows[0]["calling_ae"] is None
    assert rows[2]["calling_ae"] == "BADMOD" and rows[2]["study_instance_uid"] == study
    assert "PhotometricInterpretation" in rows[2]["reason"]
    only_dimse = httpx.get(api, params={"door": "dimse"}, headers=agent.auth(), timeout=10)
    assert [x["door"] for x in only_dimse.json()] == ["dimse", "dimse"]
    by_ae = httpx.get(api, params={"calling_ae": "NOBODY"}, headers=agent.auth(), timeout=10)
    assert by_ae.json() == []
    page = httpx.get(
        api, params={"before_id": rows[1]["id"], "limit": 5}, headers=agent.auth(), timeout=10
    )
    assert [x["id"] for x in page.json()] == [rows[2]["id"]]
    assert (
        httpx.get(api, params={"door": "fax"}, headers=agent.auth(), timeout=10).status_code == 422
    )

    # The distinctive value is nowhere: not in the rows, the study's events, the STOW answer or
    # the agent's log (pydicom's own warnings quote it; the agent hides them).
    db = Database(database_url)
    try:
        with db.session() as s:
            sid = s.scalar(select(Study.id).where(Study.study_instance_uid == study))
            events = s.scalars(select(Event).where(Event.study_id == sid)).all()
            reasons = [x.reason for x in s.scalars(select(Refusal))]
    finally:
        db.dispose()
    refused_events = [e.message for e in events if e.kind == "instance.refused"]
    assert len(refused_events) == 3, [e.message for e in events]
    texts = [*reasons, *(e.message for e in events), r.text, str(rows)]
    assert not [t for t in texts if SECRET in t]
    log = agent.procs[0].log_path.read_text(errors="replace")
    assert frames.SOPInstanceUID in log  # the log does speak of the refusal, by UID
    assert SECRET not in log
    # Still serving after all that.
    again = fresh("RG3_UNCR.dcm", study)
    assert storescu(agent.dicom_port, save(again, tmp_path, "again")).returncode == 0


def test_console_page_needs_a_login(agent: AgentEnv) -> None:
    r = httpx.get(f"{agent.url}/refusals", follow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


def test_check_is_not_vacuous() -> None:
    """The secret really is something pydicom would print: reading it back warns with it."""
    import warnings

    ds = fresh()
    _frames_not_a_number(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcmread(io.BytesIO(_encode(ds)))["NumberOfFrames"]  # noqa: B018
    assert any(SECRET in str(w.message) for w in caught)
