"""STOW-RS against a real agent process (`pacs-agent serve` on SQLite and on PostgreSQL):
dicomweb-client as the client for good requests, raw httpx for bad ones. Every refused instance
is listed with its DIMSE status and leaves no row and no file; the agent keeps serving.

The multipart parser is also fed byte by byte here (no server needed), since chunk boundaries
fall anywhere in a real stream."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_agent.db.models import Instance, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.stow import MalformedMultipart, MultipartReader
from tests.conftest import AgentEnv, _create_pg_database, _drop_pg_database, sample_path

TOKEN = "stow-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "stow-test-boundary-7d1e"
CT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'

REFERENCED = "00081199"
FAILED = "00081198"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
RETRIEVE_URL = "00081190"


@dataclass
class StowAgent:
    env: AgentEnv
    db: Database
    store_root: Path

    @property
    def stow_url(self) -> str:
        return f"{self.env.url}/dicomweb/studies"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(f"{self.env.url}/dicomweb", headers=AUTH)

    def instance(self, sop_uid: str) -> Instance | None:
        with self.db.session() as s:
            return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))

    def assert_nothing_recorded(self, sop_uid: str) -> None:
        assert self.instance(sop_uid) is None
        assert list(self.store_root.rglob(f"{sop_uid}*")) == []
        assert list(self.store_root.rglob(".incoming-*")) == []

    def assert_serving(self) -> None:
        assert httpx.get(f"{self.env.url}/health", timeout=10).status_code == 200
        ds = fresh("CT_small.dcm")
        r = post(self, multipart([encode(ds)]))
        assert r.status_code == 200, r.text
        assert self.instance(ds.SOPInstanceUID) is not None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StowAgent]:
    from pacs_agent.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp(f"stow-{request.param}")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'agent.db'}"
    else:
        admin = request.getfixturevalue("postgres_server")
        pg_name, url = _create_pg_database(admin)
    upgrade(url)
    # Ingest only: no worker, and a broker nobody listens on (no study completes in an hour).
    env = AgentEnv(tmp, url, "redis://127.0.0.1:9/0", tmp / "no-bundle", destinations="")
    env.env["PACS_AGENT_API_TOKEN"] = TOKEN
    env.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"
    # Retrieve URLs use it (dicomweb-client's Host header has no port).
    env.env["PACS_AGENT_AGENT_URL"] = env.url
    db = Database(url)
    try:
        env.start_agent()
        probe = httpx.post(f"{env.url}/dicomweb/studies", headers=AUTH, timeout=10)
        if probe.status_code in (404, 405):
            pytest.fail(
                "POST /dicomweb/studies is not served: create_app() must include "
                "pacs_agent.receiving.stow.router (app.include_router(stow_router))"
            )
        yield StowAgent(env, db, tmp / "agent-data" / "instances")
    finally:
        env.stop()
        db.dispose()
        if pg_name is not None:
            _drop_pg_database(request.getfixturevalue("postgres_server"), pg_name)


# --- helpers -----------------------------------------------------------------------------------


def fresh(name: str, study_uid: str | None = None) -> Dataset:
    """A sample file under new UIDs, so that tests sharing one agent never collide."""
    ds = dcmread(sample_path(name))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(
    bodies: list[bytes], part_type: str = "application/dicom", close: bool = True
) -> bytes:
    out = b""
    for body in bodies:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + body + b"\r\n"
    if close:
        out += f"--{BOUNDARY}--\r\n".encode()
    return out


def post(
    agent: StowAgent, body: bytes, content_type: str | None = CT_TYPE, path: str = ""
) -> httpx.Response:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(agent.stow_url + path, content=body, headers=headers, timeout=60)


def failed_items(doc: dict) -> list[tuple[str | None, int]]:
    return [
        ((item[SOP_INSTANCE].get("Value") or [None])[0], item[FAILURE_REASON]["Value"][0])
        for item in doc.get(FAILED, {}).get("Value", [])
    ]


def referenced_uids(doc: dict) -> list[str]:
    return [item[SOP_INSTANCE]["Value"][0] for item in doc.get(REFERENCED, {}).get("Value", [])]


def truncated(name: str = "RG1_UNCR.dcm") -> Dataset:
    ds = fresh(name)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


# --- good requests, through a real DICOMweb client ---------------------------------------------


def test_store_with_dicomweb_client_is_durable_and_readable(agent: StowAgent) -> None:
    study = generate_uid()
    sent = [fresh("RG3_J2KR.dcm", study), fresh("CT_small.dcm", study)]
    answer = agent.client().store_instances(sent)
    assert "FailedSOPSequence" not in answer
    refs = {item.ReferencedSOPInstanceUID: item for item in answer.ReferencedSOPSequence}
    assert set(refs) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        assert refs[ds.SOPInstanceUID].ReferencedSOPClassUID == ds.SOPClassUID
        inst = agent.instance(ds.SOPInstanceUID)
        assert inst is not None
        back = dcmread(agent.store_root / inst.path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData
        # The Retrieve URL serves the stored file (with the token).
        url = refs[ds.SOPInstanceUID].RetrieveURL
        got = httpx.get(url, headers=AUTH, timeout=30)
        assert got.status_code == 200
        assert dcmread(io.BytesIO(got.content)).SOPInstanceUID == ds.SOPInstanceUID
    with agent.db.session() as s:
        row = s.scalar(select(Study).where(Study.study_instance_uid == study))
        assert row is not None and row.source == "stow"


def test_large_radiograph_streams_in_chunks(agent: StowAgent) -> None:
    # 7 MB: dicomweb-client sends it with chunked transfer encoding, 1 MB per chunk.
    ds = fresh("RG1_UNCR.dcm")
    answer = agent.client().store_instances([ds])
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [ds.SOPInstanceUID]
    inst = agent.instance(ds.SOPInstanceUID)
    assert inst is not None and inst.analysable
    assert dcmread(agent.store_root / inst.path).PixelData == ds.PixelData


def test_resend_is_idempotent(agent: StowAgent) -> None:
    ds = fresh("CT_small.dcm")
    for _ in range(2):
        r = post(agent, multipart([encode(ds)]))
        assert r.status_code == 200, r.text
    with agent.db.session() as s:
        rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert len(list(rows)) == 1


def test_study_path_refuses_instances_of_another_study(agent: StowAgent) -> None:
    study = generate_uid()
    mine, other = fresh("CT_small.dcm", study), fresh("CT_small.dcm")
    answer = agent.client().store_instances([mine, other], study_instance_uid=study)
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        mine.SOPInstanceUID
    ]
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert failed.FailureReason == 0xA900
    assert agent.instance(mine.SOPInstanceUID) is not None
    agent.assert_nothing_recorded(other.SOPInstanceUID)


def test_all_refused_is_409_for_the_client_too(agent: StowAgent) -> None:
    ds = truncated("CT_small.dcm")
    with pytest.raises(requests.HTTPError) as info:
        agent.client().store_instances([ds])
    response = info.value.response
    assert response is not None and response.status_code == 409
    assert failed_items(response.json()) == [(ds.SOPInstanceUID, 0xA900)]
    agent.assert_nothing_recorded(ds.SOPInstanceUID)


# --- bad requests, raw -------------------------------------------------------------------------


def test_part_that_is_not_dicom(agent: StowAgent) -> None:
    r = post(agent, multipart([b"this is not DICOM at all, just text." * 10]))
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    assert failed_items(r.json()) == [(None, 0xC210)]
    assert REFERENCED not in r.json()
    agent.assert_serving()


def test_truncated_pixel_data(agent: StowAgent) -> None:
    ds = truncated()
    r = post(agent, multipart([encode(ds)]))
    assert r.status_code == 409, r.text
    [item] = r.json()[FAILED]["Value"]
    assert item[SOP_CLASS]["Value"] == [ds.SOPClassUID]
    assert failed_items(r.json()) == [(ds.SOPInstanceUID, 0xA900)]
    agent.assert_nothing_recorded(ds.SOPInstanceUID)
    agent.assert_serving()


def test_truncated_encapsulated_pixel_data(agent: StowAgent) -> None:
    ds = fresh("RG3_J2KR.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # cut inside a JPEG 2000 fragment
    r = post(agent, multipart([encode(ds)]))
    assert r.status_code == 409, r.text
    [(sop, status)] = failed_items(r.json())
    assert sop == ds.SOPInstanceUID and status in (0xA900, 0xC210)
    agent.assert_nothing_recorded(ds.SOPInstanceUID)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("BitsStored", 20), ("PhotometricInterpretation", "FOO"), ("HighBit", 16)],
    ids=["bits-stored-over-allocated", "photometric-FOO", "high-bit-over-allocated"],
)
def test_undecodable_pixel_description(agent: StowAgent, attribute: str, value: object) -> None:
    """Header facts that contradict each other: the same 0xA900 as a C-STORE, and a refusal row
    naming the attribute (never its value)."""
    from pacs_agent.db.models import Refusal

    ds = fresh("RG3_UNCR.dcm")
    setattr(ds, attribute, value)
    r = post(agent, multipart([encode(ds)]))
    assert r.status_code == 409, r.text
    assert failed_items(r.json()) == [(ds.SOPInstanceUID, 0xA900)]
    agent.assert_nothing_recorded(ds.SOPInstanceUID)
    with agent.db.session() as s:
        row = s.scalar(select(Refusal).where(Refusal.sop_instance_uid == ds.SOPInstanceUID))
    assert row is not None and row.door == "stow" and row.status == 0xA900
    assert attribute in row.reason and str(value) not in row.reason.replace(attribute, "")
    agent.assert_serving()


def test_zero_byte_part(agent: StowAgent) -> None:
    r = post(agent, multipart([b""]))
    assert r.status_code == 409, r.text
    assert failed_items(r.json()) == [(None, 0xC210)]
    agent.assert_serving()


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/dicom",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "text/plain",
    ],
    ids=["none", "single-part-dicom", "form-data", "dicom-json-parts", "text"],
)
def test_wrong_content_type_is_415(agent: StowAgent, content_type: str | None) -> None:
    ds = fresh("CT_small.dcm")
    r = post(agent, multipart([encode(ds)]), content_type=content_type)
    assert r.status_code == 415, r.text
    agent.assert_nothing_recorded(ds.SOPInstanceUID)
    agent.assert_serving()


@pytest.mark.parametrize(
    "case", ["no-boundary-param", "no-delimiter", "garbage-after-delimiter", "no-parts", "empty"]
)
def test_malformed_multipart_is_400(agent: StowAgent, case: str) -> None:
    ds = fresh("CT_small.dcm")
    data = encode(ds)
    content_type = CT_TYPE
    if case == "no-boundary-param":
        body = multipart([data])
        content_type = 'multipart/related; type="application/dicom"'
    elif case == "no-delimiter":
        body = data
    elif case == "garbage-after-delimiter":
        body = f"--{BOUNDARY}garbage\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--".encode()
    elif case == "no-parts":
        body = f"preamble only\r\n--{BOUNDARY}--\r\n".encode()
    else:
        body = b""
    r = post(agent, body, content_type=content_type)
    assert r.status_code == 400, r.text
    agent.assert_nothing_recorded(ds.SOPInstanceUID)
    agent.assert_serving()


@pytest.mark.filterwarnings("ignore:The value length")  # the over-long UID, on purpose
def test_mixed_good_and_bad_is_202_with_both_sequences(agent: StowAgent) -> None:
    good_ct, good_cr = fresh("CT_small.dcm"), fresh("RG3_J2KR.dcm")
    bad_pixels = truncated()
    rows0 = fresh("RG3_J2KR.dcm")
    rows0.Rows = 0
    bad_uid = fresh("CT_small.dcm")
    bad_uid.SOPInstanceUID = "1.2." + "3" * 70  # over 64 characters
    body = multipart(
        [
            encode(good_ct),
            b"not dicom",
            encode(bad_pixels),
            b"",
            encode(rows0),
            encode(bad_uid),
            encode(good_cr),
        ]
    )
    r = post(agent, body)
    assert r.status_code == 202, r.text
    doc = r.json()
    assert referenced_uids(doc) == [good_ct.SOPInstanceUID, good_cr.SOPInstanceUID]
    assert failed_items(doc) == [
        (None, 0xC210),
        (bad_pixels.SOPInstanceUID, 0xA900),
        (None, 0xC210),
        (rows0.SOPInstanceUID, 0xA900),
        (None, 0xA900),  # the invalid UID itself is not echoed back
    ]
    for ds in (good_ct, good_cr):
        assert agent.instance(ds.SOPInstanceUID) is not None
    for ds in (bad_pixels, rows0):
        agent.assert_nothing_recorded(ds.SOPInstanceUID)
    assert agent.instance(bad_uid.SOPInstanceUID) is None
    agent.assert_serving()


def test_part_of_another_media_type_is_refused(agent: StowAgent) -> None:
    ds = fresh("CT_small.dcm")
    r = post(agent, multipart([encode(ds)], part_type="application/octet-stream"))
    assert r.status_code == 409, r.text
    assert failed_items(r.json()) == [(None, 0xC210)]
    agent.assert_nothing_recorded(ds.SOPInstanceUID)


def test_body_broken_after_a_good_part(agent: StowAgent) -> None:
    # Streaming: the first part is stored when its delimiter arrives; the unterminated tail is
    # reported as a failure, not silently dropped.
    good, tail = fresh("CT_small.dcm"), fresh("CT_small.dcm")
    body = multipart([encode(good)], close=False)
    body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + encode(tail)
    r = post(agent, body)
    assert r.status_code == 202, r.text
    assert referenced_uids(r.json()) == [good.SOPInstanceUID]
    assert failed_items(r.json()) == [(None, 0xC210)]
    agent.assert_nothing_recorded(tail.SOPInstanceUID)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_token_is_required(agent: StowAgent, auth: str | None) -> None:
    ds = fresh("CT_small.dcm")
    headers = {"Content-Type": CT_TYPE}
    if auth:
        headers["Authorization"] = auth
    r = httpx.post(agent.stow_url, content=multipart([encode(ds)]), headers=headers, timeout=30)
    assert r.status_code == 401
    agent.assert_nothing_recorded(ds.SOPInstanceUID)


# --- the parser alone --------------------------------------------------------------------------


def _parse(
    body: bytes, step: int, max_part: int = 1 << 20
) -> list[tuple[bytes, tuple[int, str] | None]]:
    with tempfile.TemporaryDirectory() as spool:
        reader = MultipartReader(BOUNDARY, Path(spool), max_part_bytes=max_part)
        parts = []
        try:
            for i in range(0, len(body), step):
                parts += reader.feed(body[i : i + step])
            reader.close()
        finally:
            # Every part file is the caller's to remove; an aborted body leaves none behind.
            files = sorted(p.name for p in Path(spool).iterdir())
            assert files == sorted(p.path.name for p in parts if p.path is not None)
        out = [(p.read_bytes(), p.refused) for p in parts]
        for p in parts:
            p.discard()
        assert list(Path(spool).iterdir()) == []
        return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 41, 1 << 20])
def test_parser_is_independent_of_chunk_boundaries(step: int) -> None:
    a, b = b"\r\n--" + BOUNDARY.encode()[:-1] + b"x\r\n", bytes(range(256)) * 3
    body = (
        b"preamble to ignore\r\n"
        + multipart([a, b"", b])
        + b"epilogue to ignore --"
        + BOUNDARY.encode()
    )
    assert _parse(body, step) == [(a, None), (b"", None), (b, None)]


def test_parser_accepts_padding_and_parts_without_headers() -> None:
    body = (
        f"--{BOUNDARY}  \t\r\n\r\nfirst\r\n--{BOUNDARY}\r\nX-Other: 1\r\n\r\nsecond"
        f"\r\n--{BOUNDARY}--"
    ).encode()
    assert _parse(body, 5) == [(b"first", None), (b"second", None)]


def test_parser_drops_an_oversized_part_and_goes_on() -> None:
    body = multipart([b"x" * 5000, b"small"])
    [(big, refused), second] = _parse(body, 100, max_part=1000)
    assert big == b"" and refused is not None and refused[0] == 0xA700
    assert second == (b"small", None)


@pytest.mark.parametrize(
    "body",
    [b"", b"no delimiter at all", multipart([b"x"], close=False), f"--{BOUNDARY}x".encode()],
    ids=["empty", "no-delimiter", "unterminated", "bad-delimiter-line"],
)
def test_parser_refuses_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MalformedMultipart):
        _parse(body, 3)


def test_dicomweb_destination_sends_the_bearer_token(agent: StowAgent, tmp_path: Path) -> None:
    """The product's own STOW-RS sender, against this STOW-RS endpoint that wants a token."""
    from pacs_agent.dispatching.senders import DeliveryError, sender_for

    ds = fresh("CT_small.dcm")
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    url = f"dicomweb+{agent.env.url}/dicomweb"
    with pytest.raises(DeliveryError):
        sender_for(url).send([path])  # no token: refused
    sender_for(url, dicomweb_token=TOKEN).send([path])
    assert agent.instance(ds.SOPInstanceUID) is not None


# --- memory: parts stream to disk ----------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_large_request_streams_to_disk_with_bounded_memory(
    agent: StowAgent, tmp_path: Path
) -> None:
    """A 300 MB instance (over the 256 MB that were once held in memory) plus a small one in one
    request: both stored, byte for byte, and the agent's peak memory grows by far less than the
    request (the body goes to a spool file, the store takes it by hard link)."""
    import hashlib

    import numpy as np

    rows = cols = 12288  # 16-bit: 302 MB of pixel data
    big = fresh("RG1_UNCR.dcm")
    big.Rows, big.Columns = rows, cols
    big.PixelData = np.zeros((rows, cols), dtype=np.uint16).tobytes()
    big_path = tmp_path / "big.dcm"
    big.save_as(big_path, enforce_file_format=True)
    del big.PixelData  # the test process need not hold it either
    small = fresh("CT_small.dcm")
    small_bytes = encode(small)
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        with open(big_path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield b"\r\n" + head + small_bytes + f"\r\n--{BOUNDARY}--\r\n".encode()

    pid = agent.env.procs[0].popen.pid
    before = _peak_rss(pid)
    r = httpx.post(
        agent.stow_url,
        content=body(),
        headers={**AUTH, "Content-Type": CT_TYPE},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    assert referenced_uids(r.json()) == [big.SOPInstanceUID, small.SOPInstanceUID]
    growth = _peak_rss(pid) - before
    size = big_path.stat().st_size
    print(f"STOW {size >> 20} MB part: agent peak memory grew by {growth >> 20} MB")
    assert growth < 64 * 1024 * 1024, f"peak memory grew by {growth >> 20} MB for {size >> 20} MB"
    inst = agent.instance(big.SOPInstanceUID)
    assert inst is not None and inst.size == size
    stored = agent.store_root / inst.path

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    assert digest(stored) == digest(big_path) == inst.sha256
    spool = agent.store_root.parent / "spool"
    assert not list(spool.glob("stow-*")), "no part file is left in the spool"
    agent.assert_serving()
