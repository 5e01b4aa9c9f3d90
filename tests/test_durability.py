"""Nothing acknowledged is lost: start-up repair, retention, and a kill -9 of the agent in the
middle of a 200-instance transfer from storescu."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from pacs_agent.cleaning.retention import (
    housekeeping,
    purge_events,
    purge_expired,
    purge_result_files,
)
from pacs_agent.db.models import (
    Delivery,
    Event,
    Instance,
    Job,
    PullRequestRow,
    Refusal,
    Result,
    Study,
)
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.repair import MISSING, repair_store
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import AgentEnv, free_port, sample_path
from tests.support.storescu import acknowledged


def _ingest(ingestor: Ingestor, name: str) -> str:
    data = sample_path(name).read_bytes()
    ds = parse_part10(data)
    ingestor.ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="dimse")
    return str(ds.SOPInstanceUID)


def test_repair_indexes_orphan_files_and_marks_lost_ones(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    store = InstanceStore(tmp_path / "store")
    ingestor = Ingestor(db, store)
    kept = _ingest(ingestor, "RG3_J2KR.dcm")
    # A file fsynced just before a crash, its row never committed:
    ds = dcmread(sample_path("CT_small.dcm"))
    orphan = store.write(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        sample_path("CT_small.dcm").read_bytes(),
    )
    # A write that never finished, and a row whose file was lost:
    (store.root / ds.StudyInstanceUID / ".incoming-x.part").write_bytes(b"partial")
    lost = _ingest(ingestor, "RG1_J2KR.dcm")
    with db.session() as s:
        lost_path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == lost))
    assert lost_path is not None
    (store.root / lost_path).unlink()

    report = repair_store(db, store, ingestor)
    assert (report.indexed, report.missing, report.temp_removed) == (1, 1, 1)
    with db.session() as s:
        by_uid = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        events = [e.kind for e in s.scalars(select(Event))]
    assert by_uid[ds.SOPInstanceUID].path == orphan.relpath
    assert by_uid[kept].analysable
    assert not by_uid[lost].analysable and by_uid[lost].reason == MISSING
    assert "instance.missing" in events
    # A second start finds nothing more to do.
    again = repair_store(db, store, ingestor)
    assert (again.indexed, again.missing, again.temp_removed) == (0, 0, 0)
    db.dispose()


def test_retention_removes_old_finished_studies_only(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    store = InstanceStore(tmp_path / "store")
    ingestor = Ingestor(db, store)
    _ingest(ingestor, "RG3_J2KR.dcm")
    _ingest(ingestor, "RG1_J2KR.dcm")
    old = dcmread(sample_path("RG3_J2KR.dcm"), stop_before_pixels=True).StudyInstanceUID
    new = dcmread(sample_path("RG1_J2KR.dcm"), stop_before_pixels=True).StudyInstanceUID
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == old)
            .values(status="done", completed_at=now - dt.timedelta(days=10))
        )
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == new)
            .values(status="done", completed_at=now - dt.timedelta(days=1))
        )
    assert purge_expired(db, store, retention_days=0) == 0  # 0 keeps everything
    assert purge_expired(db, store, retention_days=7) == 1
    assert not (store.root / old).exists()
    assert any((store.root / new).rglob("*.dcm"))
    with db.session() as s:
        purged = {st.study_instance_uid: st.purged_at for st in s.scalars(select(Study))}
    assert purged[old] is not None and purged[new] is None
    # Purged files are not reported as lost by the next start-up repair.
    assert repair_store(db, store, ingestor).missing == 0
    db.dispose()


def _copies(tmp: Path, n: int) -> list[Path]:
    base = dcmread(sample_path("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        base.StudyInstanceUID, base.SeriesInstanceUID = study, series
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        p = tmp / f"ct{i:03d}.dcm"
        base.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.mark.e2e
def test_kill_9_during_transfer_loses_no_acknowledged_instance(
    tmp_path: Path, demo_bundle: Path
) -> None:
    from pacs_agent.db.migrate import upgrade

    db_url = f"sqlite:///{tmp_path / 'agent.db'}"
    upgrade(db_url)
    # No broker is needed to receive; jobs simply wait in the database.
    agent = AgentEnv(tmp_path, db_url, f"redis://127.0.0.1:{free_port()}/0", demo_bundle, "")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"
    files = _copies(tmp_path, 200)
    proc = agent.start_agent()
    log_path = tmp_path / "storescu.log"
    with open(log_path, "w") as log:
        sender = subprocess.Popen(
            [
                "storescu",
                "-v",
                "-aec",
                "PACSAGENT",
                "127.0.0.1",
                str(agent.dicom_port),
                *map(str, files),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + 120
        while len(acknowledged(log_path.read_text())) < 60:
            assert time.monotonic() < end, "transfer too slow"
            assert sender.poll() is None, "storescu finished before the kill"
            time.sleep(0.02)
        proc.stop(sig="kill")
        sender.wait(timeout=60)
    acked = acknowledged(log_path.read_text())
    assert 60 <= len(acked) < 200, len(acked)

    agent.procs.clear()
    agent.start_agent()  # start-up repair runs before the listener opens
    try:
        db = Database(db_url)
        with db.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        store = InstanceStore(agent.data_dir / "instances")
        for f in acked:
            ds = dcmread(f)
            assert ds.SOPInstanceUID in rows, f"acknowledged {Path(f).name} lost"
            back = dcmread(store.path_for(rows[ds.SOPInstanceUID].path))
            assert back.PixelData == ds.PixelData
        # Nothing partial: every row has its complete file, no temporary files remain.
        for inst in rows.values():
            assert dcmread(store.path_for(inst.path)).SOPInstanceUID == inst.sop_instance_uid
        assert not list(store.root.rglob(".incoming-*"))
        db.dispose()
        print(f"acknowledged before kill -9: {len(acked)}, recorded after restart: {len(rows)}")
    finally:
        agent.stop()


@pytest.mark.e2e
def test_kill_9_after_a_burst_from_four_associations_loses_no_acknowledged_instance(
    tmp_path: Path, demo_bundle: Path
) -> None:
    """Group commit: four storescu associations at once, the agent killed (-9) while they
    send; every instance any of them was told was stored is there, complete, after restart
    (so no Success left before its group's fsync and commit)."""
    import os

    from pacs_agent.db.migrate import upgrade

    db_url = f"sqlite:///{tmp_path / 'agent.db'}"
    upgrade(db_url)
    agent = AgentEnv(tmp_path, db_url, f"redis://127.0.0.1:{free_port()}/0", demo_bundle, "")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"
    batches = []
    for g in range(4):
        folder = tmp_path / f"batch{g}"
        folder.mkdir()
        batches.append(_copies(folder, 60))
    proc = agent.start_agent()
    logs = [tmp_path / f"storescu-{g}.log" for g in range(4)]
    senders = []
    for g, files in enumerate(batches):
        with open(logs[g], "w") as log:
            senders.append(
                subprocess.Popen(
                    [
                        "storescu",
                        "-v",
                        "-aet",
                        f"MOD{g}",
                        "-aec",
                        "PACSAGENT",
                        "127.0.0.1",
                        str(agent.dicom_port),
                        *map(str, files),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
            )

    def acked() -> list[str]:
        return [f for path in logs for f in acknowledged(path.read_text())]

    end = time.monotonic() + 120
    while len(acked()) < 60:
        assert time.monotonic() < end, "transfer too slow"
        assert all(p.poll() is None for p in senders), "a storescu finished before the kill"
        time.sleep(0.02)
    proc.stop(sig="kill")
    for sender in senders:
        sender.wait(timeout=60)
    done = acked()
    assert 60 <= len(done) < 240, len(done)
    assert all(len(acknowledged(path.read_text())) > 0 for path in logs)  # all four sent

    agent.procs.clear()
    agent.start_agent()  # start-up repair runs before the listener opens
    try:
        db = Database(db_url)
        with db.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        store = InstanceStore(agent.data_dir / "instances")
        for f in done:
            ds = dcmread(f)
            assert ds.SOPInstanceUID in rows, f"acknowledged {Path(f).name} lost"
            back = dcmread(store.path_for(rows[ds.SOPInstanceUID].path))
            assert back.PixelData == ds.PixelData
        for inst in rows.values():
            assert dcmread(store.path_for(inst.path)).SOPInstanceUID == inst.sop_instance_uid
        assert not list(store.root.rglob(".incoming-*"))
        db.dispose()
        print(f"acknowledged before kill -9: {len(done)}, recorded after restart: {len(rows)}")
    finally:
        agent.stop()


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.e2e
def test_large_multiframe_streams_to_disk(tmp_path: Path, demo_bundle: Path) -> None:
    """A 157 MB multi-frame object is streamed to disk: the agent's peak memory does not grow
    by anything like its size."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pacs_agent.db.migrate import upgrade

    frames, rows, cols = 150, 1024, 1024
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # XA
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "XA", "BIG-1"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (
        np.random.default_rng(0).integers(0, 255, frames * rows * cols, dtype=np.uint8).tobytes()
    )
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    size_mb = big.stat().st_size / 2**20
    del ds

    db_url = f"sqlite:///{tmp_path / 'agent.db'}"
    upgrade(db_url)
    agent = AgentEnv(tmp_path, db_url, f"redis://127.0.0.1:{free_port()}/0", demo_bundle, "")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "3600"
    proc = agent.start_agent()
    try:
        before = _vm_hwm_kb(proc.popen.pid)
        res = subprocess.run(
            ["storescu", "-aec", "PACSAGENT", "127.0.0.1", str(agent.dicom_port), str(big)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        growth_mb = (_vm_hwm_kb(proc.popen.pid) - before) / 1024
        print(f"object {size_mb:.0f} MB, agent peak RSS growth {growth_mb:.1f} MB")
        assert growth_mb < size_mb / 4
        stored = list((agent.data_dir / "instances").rglob("*.dcm"))
        assert len(stored) == 1
        # Same dataset (the file meta is the receiver's own): same size within the meta, same
        # pixel bytes at the end.
        assert abs(stored[0].stat().st_size - big.stat().st_size) < 256
        with open(stored[0], "rb") as a, open(big, "rb") as b:
            a.seek(-(1 << 20), 2)
            b.seek(-(1 << 20), 2)
            assert a.read() == b.read()
    finally:
        agent.stop()


# Retention of everything that grows (issue 10): events, refusals, pull requests, result files.


def _study(s: Any, status: str) -> Study:
    study = Study(study_instance_uid=generate_uid(), status=status)
    s.add(study)
    s.flush()
    return study


def _days_ago(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def test_event_retention_keeps_recent_events_and_studies_in_flight(database_url: str) -> None:
    db = Database(database_url)
    with db.session() as s:
        done, receiving, failed = _study(s, "done"), _study(s, "receiving"), _study(s, "failed")
        rows = {
            "old-done": Event(kind="k", message="m", study_id=done.id, at=_days_ago(100)),
            "old-failed": Event(kind="k", message="m", study_id=failed.id, at=_days_ago(91)),
            "old-no-study": Event(kind="k", message="m", at=_days_ago(200)),
            "old-in-flight": Event(kind="k", message="m", study_id=receiving.id, at=_days_ago(100)),
            "recent-done": Event(kind="k", message="m", study_id=done.id, at=_days_ago(10)),
        }
        s.add_all(rows.values())
        s.flush()
        ids = {name: e.id for name, e in rows.items()}
    assert purge_events(db, retention_days=0) == 0  # 0 keeps everything
    assert purge_events(db, retention_days=90) == 3
    with db.session() as s:
        left = set(s.scalars(select(Event.id)))
    assert left == {ids["old-in-flight"], ids["recent-done"]}
    assert purge_events(db, retention_days=90) == 0  # nothing more on the next pass
    db.dispose()


def test_refusal_and_pull_request_retention_through_housekeeping(
    tmp_path: Path, database_url: str
) -> None:
    """The agent's housekeeping (wired into AgentLoop by pacs_agent.service) runs every purge:
    old refusals and finished pull requests go; pending and running pulls stay at any age."""
    db = Database(database_url)
    with db.session() as s:
        s.add_all(
            [
                Refusal(door="dimse", status=0xC210, reason="r", at=_days_ago(40)),
                Refusal(door="stow", status=0xA900, reason="r", at=_days_ago(5)),
            ]
        )
        pulls = {
            "old-done": PullRequestRow(
                orthanc_study_id="a", status="done", finished_at=_days_ago(40)
            ),
            "old-failed": PullRequestRow(
                orthanc_study_id="b", status="failed", finished_at=_days_ago(40)
            ),
            "old-pending": PullRequestRow(
                orthanc_study_id="c", status="pending", created_at=_days_ago(400)
            ),
            "old-running": PullRequestRow(
                orthanc_study_id="d", status="running", created_at=_days_ago(400)
            ),
            "recent-done": PullRequestRow(
                orthanc_study_id="e", status="done", finished_at=_days_ago(5)
            ),
        }
        s.add_all(pulls.values())
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, refusal_retention_days=30, retention_days=0
    )
    done = housekeeping(db, InstanceStore(tmp_path / "store"), settings)
    assert (done.refusals, done.pull_requests, done.studies) == (1, 2, 0)
    with db.session() as s:
        assert [r.door for r in s.scalars(select(Refusal))] == ["stow"]
        left = {p.orthanc_study_id for p in s.scalars(select(PullRequestRow))}
    assert left == {"c", "d", "e"}
    db.dispose()


def test_result_files_go_only_when_their_job_is_done_and_delivered(
    tmp_path: Path, database_url: str
) -> None:
    db = Database(database_url)
    root = tmp_path / "results"
    cases = {
        # name: (job status, finished days ago, delivery statuses)
        "old-delivered": ("done", 40, ["done", "done"]),
        "old-no-destination": ("done", 40, []),
        "old-pending-delivery": ("done", 40, ["done", "pending"]),
        "old-failed-delivery": ("failed", 40, ["failed"]),
        "old-delivering": ("delivering", 40, ["pending"]),
        "recent-delivered": ("done", 5, ["done"]),
    }
    files: dict[str, Path] = {}
    with db.session() as s:
        for name, (status, days, deliveries) in cases.items():
            study = _study(s, "done")
            job = Job(
                study_id=study.id, pipeline="chest", status=status, finished_at=_days_ago(days)
            )
            s.add(job)
            s.flush()
            rel = f"{study.study_instance_uid}/{generate_uid()}/{generate_uid()}.dcm"
            files[name] = root / rel
            files[name].parent.mkdir(parents=True)
            files[name].write_bytes(b"result")
            result = Result(
                job_id=job.id,
                kind="sr",
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                path=rel,
            )
            s.add(result)
            s.flush()
            for i, d in enumerate(deliveries):
                s.add(Delivery(result_id=result.id, destination=f"file:///d{i}", status=d))
    assert purge_result_files(db, root, retention_days=0) == 0  # 0 keeps everything
    assert purge_result_files(db, root, retention_days=30) == 2
    gone = {name for name, f in files.items() if not f.exists()}
    assert gone == {"old-delivered", "old-no-destination"}
    # Their emptied series and study folders went with them; the result rows stay.
    assert not files["old-delivered"].parent.parent.exists()
    with db.session() as s:
        assert len(s.scalars(select(Result)).all()) == len(cases)
    assert purge_result_files(db, root, retention_days=30) == 0
    db.dispose()
