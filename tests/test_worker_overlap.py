"""The worker's production path: decoding in the decode pool (same pixels as the serial path),
the bounded overlap of decode, model and writers, one HTTP connection to the agent for many
images, and one C-STORE association to a destination across jobs, each object delivered once.

Real parts: the agent's HTTP app (uvicorn) over its real store and database, the agent's real
C-STORE listener as the receiving side and as the destination PACS (tests/support/listener.py),
dcmtk's storescu as the modality, a real decode process pool, a (tiny) demo bundle run by the
real model runner. Nothing is mocked; the HTTP reuse test counts TCP connections at a plain
keep-alive server standing in for the agent (what it serves is the instance file)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import evt
from sqlalchemy import select

from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Delivery, Instance, Job, Result, Study
from pacs_agent.dispatching.senders import AssociationPool, sender_for
from pacs_agent.settings import Settings
from tests.conftest import sample_path, storescu
from tests.support import free_port
from tests.support.listener import Listener
from workers.decode_pool import Decoded, DecodePool
from workers.imaging import analysed_frame, decode, letterbox
from workers.models.bundle import write_demo_bundle
from workers.models.vit import ViTConfig
from workers.overlap import Group, run_overlapped

TOKEN = "worker-overlap-service-token"


# --- helpers ---------------------------------------------------------------------------------


def _small_radiographs(folder: Path, n: int, study_uid: str) -> list[Path]:
    """``n`` small CR images of one study, cut from NEMA RG1 and stored as JPEG 2000 lossless
    (the production case, small enough for a quick test)."""
    base = dcmread(sample_path("RG1_UNCR.dcm"))
    arr = base.pixel_array
    paths = []
    for i in range(n):
        ds = dcmread(sample_path("RG1_UNCR.dcm"))
        cut = np.ascontiguousarray(arr[400 + 40 * i : 400 + 40 * i + 192, 600:776])
        ds.Rows, ds.Columns = cut.shape
        ds.PixelData = cut.tobytes()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.compress(JPEG2000Lossless, cut)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class _Agent:
    """The agent's HTTP app (create_app) served by uvicorn in a thread over a real store."""

    def __init__(self, listener: Listener) -> None:
        import uvicorn

        from pacs_agent.api.app import AgentState, create_app

        state = AgentState(
            settings=listener.settings, db=listener.db, store=listener.store, puller=None
        )
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "agent HTTP did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _RecordingPool(DecodePool):
    """The real pool, keeping what it yields so the test can compare pixels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Decoded] = []

    def imap(self, sources: Any) -> Iterator[Decoded]:
        for d in super().imap(sources):
            self.seen.append(d)
            yield d


@pytest.fixture
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112)
    return write_demo_bundle(tmp_path_factory.mktemp("bundle") / "tiny", config=cfg)


# --- the production path: pool decoding, overlap, association reuse -------------------------


def test_jobs_decode_in_the_pool_and_deliver_over_one_association(
    tmp_path: Path, database_url: str, tiny_bundle: Path
) -> None:
    from workers.pipeline import WorkerContext, process

    receiving = Listener(tmp_path / "agent", database_url, api_token=TOKEN)
    pacs_db = f"sqlite:///{tmp_path / 'pacs.db'}"
    upgrade(pacs_db)  # the destination PACS has its own database
    pacs = Listener(tmp_path / "pacs", pacs_db)
    associations = []
    pacs.server.bind(evt.EVT_ACCEPTED, lambda event: associations.append(event.assoc))
    agent = _Agent(receiving)
    ctx = None
    try:
        studies = [generate_uid(entropy_srcs=["overlap", str(k)]) for k in range(2)]
        for k, study_uid in enumerate(studies):
            folder = tmp_path / f"study{k}"
            folder.mkdir()
            assert (
                storescu(receiving.port, *_small_radiographs(folder, 2, study_uid)).returncode == 0
            )
        destination = f"dicom://PACSAGENT@127.0.0.1:{pacs.port}"
        with receiving.db.session() as s:
            job_ids = []
            for study_uid in studies:
                study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                assert study is not None
                version = s.scalar(
                    select(Instance.study_version).where(Instance.study_id == study.id)
                )
                job = Job(
                    study_id=study.id,
                    study_version=version,
                    pipeline="chest",
                    status="queued",
                    destinations=[destination],
                )
                s.add(job)
                s.flush()
                job_ids.append(job.id)
        settings = Settings(
            data_dir=tmp_path / "worker",
            database_url=database_url,
            agent_url=agent.url,
            api_token=TOKEN,
            worker_device="cpu",
            worker_batch_size=3,  # batches straddle the two jobs
            worker_batch_jobs=1,  # one job per wake-up: the association outlives the first
            decode_workers=2,
            dicom_association_idle_s=30,
        )
        from pacs_agent.db.session import Database

        ctx = WorkerContext(settings, Database(database_url), bundles={"chest": tiny_bundle})
        pool = _RecordingPool(112, workers=2, prefetch=4, start_method="spawn")
        ctx._pools[112] = pool
        for job_id in job_ids:
            assert process(ctx, job_id) == "processed"

        with receiving.db.session() as s:
            jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
            assert {j.status for j in jobs.values()} == {"done"}, [j.error for j in jobs.values()]
            results = list(s.scalars(select(Result).where(Result.job_id.in_(job_ids))))
            deliveries = list(s.scalars(select(Delivery)))
        assert results and len(deliveries) == len(results)
        assert all(d.status == "done" and d.attempts == 1 for d in deliveries)
        # Each object reached the PACS once, both jobs over one association.
        stored = [i.sop_instance_uid for i in pacs.instances()]
        assert sorted(stored) == sorted(r.sop_instance_uid for r in results)
        assert len(associations) == 1 and ctx.associations.opened == 1

        # Decoded by the pool's processes, with exactly the serial path's pixels.
        assert len(pool.seen) == 4 and all(d.error is None for d in pool.seen)
        assert all(d.pid != os.getpid() for d in pool.seen)
        for d in pool.seen:
            ds = dcmread(receiving.store.path_for(receiving.instance(d.sop).path))  # type: ignore[union-attr]
            serial = decode(ds, analysed_frame(ds))
            np.testing.assert_array_equal(d.image.display, serial)
            np.testing.assert_array_equal(d.image.boxed, letterbox(serial, 112)[0])
        assert pool.high_water <= pool.prefetch
    finally:
        if ctx is not None:
            ctx.associations.close()
            for p in list(ctx._pools.values()):
                p.close()
            ctx.db.dispose()
        agent.stop()
        pacs.stop()
        receiving.stop()


def test_a_closed_pooled_association_is_reopened_and_nothing_is_stored_twice(
    tmp_path: Path, database_url: str
) -> None:
    """The destination drops the idle association (it restarted): the next delivery opens a new
    one and stores every object once."""
    pacs = Listener(tmp_path / "pacs", database_url)
    opened = []
    pacs.server.bind(evt.EVT_ACCEPTED, lambda event: opened.append(event.assoc))
    pool = AssociationPool(idle_s=30)
    try:
        files = []
        for i, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
            ds = dcmread(sample_path(name))
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["reopen", str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            files.append(tmp_path / f"{i}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        url = f"dicom://PACSAGENT@127.0.0.1:{pacs.port}"
        sender_for(url, associations=pool).send(files[:1])
        assert pool.idle() == 1
        opened[0].abort()  # the peer drops it while it waits in the pool
        deadline = time.monotonic() + 10
        while opened[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        sender_for(url, associations=pool).send(files[1:])
        assert len(opened) == 2 and pool.opened == 2
        rows, _ = pacs.count()
        assert rows == 2
        assert sorted(i.sop_instance_uid for i in pacs.instances()) == sorted(
            str(dcmread(f).SOPInstanceUID) for f in files
        )
    finally:
        pool.close()
        pacs.stop()


# --- the overlap's bounds ------------------------------------------------------------------


def test_overlap_keeps_its_queues_bounded_under_a_backlog() -> None:
    """A backlog of 12 jobs and a slow writer: the pool never holds more than its prefetch,
    the model batch never exceeds its size, the writer queue never more than 2 jobs; every job
    is written once, in order, with all its images."""
    blob = sample_path("RG3_UNCR.dcm").read_bytes()
    written: list[tuple[int, int]] = []
    pool = DecodePool(64, workers=1, prefetch=3)

    def sources(job: int) -> list[tuple[str, bytes]]:
        return [(f"{job}.{i}", blob) for i in range(2)]

    def infer(images: list[Any]) -> list[Any]:
        return [float(np.mean(p.boxed)) for p in images]

    def write(group: Group[int]) -> None:
        time.sleep(0.05)  # a slow writer: the backlog piles up in front of it
        written.append((group.key, len(group.results)))

    with pool:
        stats = run_overlapped(range(12), sources, pool, infer, write, batch_size=3, write_queue=2)
    assert written == [(k, 2) for k in range(12)]
    assert stats.images == 24 and stats.groups == 12
    assert 1 <= stats.pool_high_water <= 3
    assert stats.batch_high_water == 3
    assert 1 <= stats.write_queue_high_water <= 2
    assert stats.write_errors == 0


def test_overlap_leaves_out_what_cannot_be_decoded_or_analysed() -> None:
    """A truncated file and an image the model refuses are left out with their reasons; a job
    whose sources cannot be read carries the error; the other images go through."""
    good = sample_path("RG3_UNCR.dcm").read_bytes()
    bad = good[: len(good) // 3]
    groups: list[Group[str]] = []

    def sources(job: str) -> Iterator[tuple[str, bytes]]:
        if job == "unreachable":
            raise ConnectionError("agent down")
        yield f"{job}.ok", good
        yield f"{job}.truncated", bad
        yield f"{job}.refused", good

    def infer(images: list[Any]) -> list[Any]:
        if any(p.sop.endswith("refused") for p in images):
            raise ValueError("the model cannot take this one")
        return [p.sop for p in images]

    with DecodePool(64, workers=1) as pool:
        stats = run_overlapped(
            ["a", "unreachable", "b"], sources, pool, infer, groups.append, batch_size=2
        )
    a, unreachable, b = groups
    assert isinstance(unreachable.error, ConnectionError) and unreachable.expected == 0
    for g in (a, b):
        assert set(g.results) == {f"{g.key}.ok"}
        assert [d.sop for d in g.decoded if d.error] == [f"{g.key}.truncated"]
        assert list(g.model_errors) == [f"{g.key}.refused"]
    assert stats.images == 2


# --- one HTTP connection for many images ---------------------------------------------------


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    body = b""
    connections: list[int] = []

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(self.client_address[1])

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("content-type", "application/dicom")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_one_http_connection_for_several_images(tmp_path: Path) -> None:
    from workers.pipeline import fetch_instance

    blob = sample_path("CT_small.dcm").read_bytes()

    class Handler(_CountingHandler):
        pass

    Handler.body, Handler.connections = blob, []
    handler = Handler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = Settings(
            data_dir=tmp_path, agent_url=f"http://127.0.0.1:{server.server_address[1]}"
        )
        digests = {
            hashlib.sha256(fetch_instance(settings, f"1.2.3.{i}").PixelData).hexdigest()
            for i in range(5)
        }
        assert digests == {
            hashlib.sha256(dcmread(sample_path("CT_small.dcm")).PixelData).hexdigest()
        }
        assert len(handler.connections) == 1, handler.connections
    finally:
        server.shutdown()
        server.server_close()


# --- the GPU decode path (no GPU here: nvImageCodec stood in for, CPU-side) ---------------------


class _NvImageCodecStandIn:
    """Stands in for NVIDIA nvImageCodec (outside the product, and no GPU here): the same calls
    the GPU path makes, decoding the code stream it is given with OpenJPEG on the CPU. What is
    tested is the product's side: which frame's bytes it hands over and what it does after."""

    class ColorSpec:
        UNCHANGED = "unchanged"

    class DecodeParams:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

    class _Image:
        def __init__(self, arr: np.ndarray) -> None:
            self.arr = arr

        def cpu(self) -> np.ndarray:
            return self.arr

    class Decoder:
        def decode(self, encoded: bytes, params: object = None) -> Any:
            import openjpeg

            return _NvImageCodecStandIn._Image(openjpeg.decode(encoded))


def test_gpu_path_decodes_the_analysed_frame_like_the_cpu_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers import decode_pool

    base = dcmread(sample_path("RG1_UNCR.dcm"))
    arr = base.pixel_array
    frames = np.stack(
        [np.ascontiguousarray(arr[300 + 100 * k : 428 + 100 * k, 500:628]) for k in range(3)]
    )
    ds = dcmread(sample_path("RG1_UNCR.dcm"))
    ds.NumberOfFrames = 3
    ds.Rows, ds.Columns = 128, 128
    ds.RepresentativeFrameNumber = 3
    ds.compress(JPEG2000Lossless, frames)
    ds = dcmread(io.BytesIO(_saved(ds)))
    assert analysed_frame(ds) == 3

    monkeypatch.setattr(
        decode_pool,
        "_nvimgcodec_state",
        {"ok": True, "module": _NvImageCodecStandIn, "decoder": _NvImageCodecStandIn.Decoder()},
    )
    image, backend = decode_pool.decode_auto(ds, prefer_gpu=True)
    assert backend == "gpu"
    np.testing.assert_array_equal(image, decode(ds, 3))  # the analysed frame, as on the CPU
    assert not np.array_equal(image, decode(ds, 1))  # not the first frame
    np.testing.assert_array_equal(decode_pool.decode_gpu(ds, 2), decode(ds, 2))
    with pytest.raises(decode_pool.ImageError, match="frame 4 does not exist"):
        decode_pool.decode_gpu(ds, 4)


def _saved(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- windowing in float32 ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm"])
@pytest.mark.parametrize("voi", ["header", "SIGMOID", "percentile"])
def test_windowing_runs_in_float32_with_the_float64_result(name: str, voi: str) -> None:
    from pydicom.pixels import apply_modality_lut

    from workers import imaging

    ds = dcmread(sample_path(name))
    stored = ds.pixel_array
    values64 = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if voi == "percentile":
        for k in ("WindowCenter", "WindowWidth"):
            if k in ds:
                del ds[k]
    else:
        lo, hi = np.percentile(values64, [5, 95])
        ds.WindowCenter, ds.WindowWidth = float((lo + hi) / 2), float(hi - lo)
        if voi == "SIGMOID":
            ds.VOILUTFunction = "SIGMOID"
    invert = str(ds.PhotometricInterpretation) == "MONOCHROME1"
    out = imaging._decode_monochrome(ds, stored, invert=invert)
    assert out.dtype == np.float32  # windowed in float32, not float64
    # the float64 reference: the same window functions on float64 values
    ref = imaging._header_window(ds, values64) if voi != "percentile" else None
    if ref is None:
        ref = imaging._percentile_window(values64, None)
    if invert:
        ref = 1.0 - ref
    assert ref.dtype == np.float64
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)
    assert float(np.abs(out - ref).max()) < 2e-6 and out.std() > 0.01
