"""Result delivery to a real Orthanc by each kind of destination, and persisted failure state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_agent.db.models import Delivery, Event, Job, Result, Study
from pacs_agent.db.session import Database
from pacs_agent.dispatching.delivery import deliver_job_results
from pacs_agent.dispatching.senders import DeliveryError, redact, sender_for
from tests.conftest import sample_path
from tests.support import free_port
from tests.support.orthanc import OrthancServer, start_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = start_orthanc(
        tmp_path_factory.mktemp("orthanc-delivery"),
        http_port=free_port(),
        dicom_port=free_port(),
        webhook_url=None,
    )
    yield server
    server.stop()


def _fresh_copy(tmp: Path, name: str = "CT_small.dcm") -> Path:
    ds = dcmread(sample_path(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("kind", ["dicom", "orthanc", "dicomweb", "file"])
def test_each_destination_kind_delivers(orthanc: OrthancServer, tmp_path: Path, kind: str) -> None:
    path = _fresh_copy(tmp_path)
    ds = dcmread(path, stop_before_pixels=True)
    url = {
        "dicom": f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        "orthanc": f"orthanc+http://127.0.0.1:{orthanc.http_port}",
        "dicomweb": f"dicomweb+http://127.0.0.1:{orthanc.http_port}/dicom-web",
        "file": (tmp_path / "out").as_uri(),
    }[kind]
    sender_for(url).send([path])
    sender_for(url).send([path])  # again: same UID, still one copy
    if kind == "file":
        target = tmp_path / "out" / ds.StudyInstanceUID / ds.SeriesInstanceUID / path.name
        assert target.read_bytes() == path.read_bytes()
        return
    found = [
        i
        for i in orthanc.study_instances(ds.StudyInstanceUID)
        if i["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID
    ]
    assert len(found) == 1


def test_bad_destination_urls_are_refused() -> None:
    for url in ("ftp://host/x", "dicom://host:104", "file://"):
        with pytest.raises(ValueError):
            sender_for(url)
    assert redact("orthanc+http://user:secret@pacs:8042") == "orthanc+http://pacs:8042"
    assert redact("dicom://ORTHANC@pacs:4242") == "dicom://ORTHANC@pacs:4242"


def test_unreachable_destination_is_recorded_as_failed(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    path = _fresh_copy(tmp_path)
    ds = dcmread(path, stop_before_pixels=True)
    with db.session() as s:
        study = Study(study_instance_uid=ds.StudyInstanceUID)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="default")
        s.add(job)
        s.flush()
        s.add(
            Result(
                job_id=job.id,
                kind="sr",
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                path=path.name,
            )
        )
        ids = (study.id, job.id)
    down = f"dicom://NOBODY@127.0.0.1:{free_port()}"
    first = deliver_job_results(
        db,
        ids[1],
        ids[0],
        [down],
        results_root=tmp_path,
        max_attempts=2,
        backoff_s=5,
        backoff_max_s=10,
    )
    assert first.failed == [] and len(first.pending) == 1 and "NOBODY" in first.pending[0]
    with db.session() as s:
        [d] = list(s.scalars(select(Delivery)))
        assert d.status == "pending" and d.attempts == 1 and d.last_error
        assert d.next_attempt_at is not None  # scheduled with backoff, persisted
    second = deliver_job_results(
        db,
        ids[1],
        ids[0],
        [down],
        results_root=tmp_path,
        max_attempts=2,
        backoff_s=5,
        backoff_max_s=10,
    )
    assert second.pending == [] and len(second.failed) == 1
    with db.session() as s:
        [d] = list(s.scalars(select(Delivery)))
        assert d.status == "failed" and d.attempts == 2 and d.next_attempt_at is None
        kinds = [e.kind for e in s.scalars(select(Event))]
        assert kinds == ["delivery.retry", "delivery.failed"]
    db.dispose()


def test_refused_association_raises(tmp_path: Path) -> None:
    # A peer that does not accept our calling AE (here the agent's own listener, allowlisted).
    from pacs_agent.receiving.dimse import start_scp
    from pacs_agent.receiving.ingest import Ingestor
    from pacs_agent.receiving.store import InstanceStore
    from pacs_agent.settings import Settings

    url = f"sqlite:///{tmp_path / 'peer.db'}"
    from pacs_agent.db.migrate import upgrade

    upgrade(url)
    settings = Settings(
        data_dir=tmp_path,
        dicom_port=free_port(),
        dicom_host="127.0.0.1",
        allowed_calling_aes=["ONLYTHIS"],
    )
    db = Database(url)
    server = start_scp(settings, Ingestor(db, InstanceStore(tmp_path / "store")))
    try:
        with pytest.raises(DeliveryError, match="association"):
            sender_for(f"dicom://PACSAGENT@127.0.0.1:{settings.dicom_port}").send(
                [_fresh_copy(tmp_path)]
            )
    finally:
        server.shutdown()
        db.dispose()
