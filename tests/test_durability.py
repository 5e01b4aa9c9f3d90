"""Nothing acknowledged is lost: start-up repair, retention, and a kill -9 of the agent in the
middle of a 200-instance transfer from storescu."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from pacs_agent.db.models import Event, Instance, Study
from pacs_agent.db.session import Database
from pacs_agent.ingest import Ingestor, parse_part10
from pacs_agent.repair import MISSING, purge_expired, repair_store
from pacs_agent.store import InstanceStore
from tests.conftest import AgentEnv, free_port, sample_path


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


def _acknowledged(log_text: str) -> list[str]:
    """Files storescu was told were stored, from its verbose log, in order."""
    acked, current = [], None
    for line in log_text.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


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
        while len(_acknowledged(log_path.read_text())) < 60:
            assert time.monotonic() < end, "transfer too slow"
            assert sender.poll() is None, "storescu finished before the kill"
            time.sleep(0.02)
        proc.stop(sig="kill")
        sender.wait(timeout=60)
    acked = _acknowledged(log_path.read_text())
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
