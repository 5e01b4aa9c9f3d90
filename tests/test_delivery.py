"""Result delivery to a real Orthanc by each kind of destination, and persisted failure state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def test_destination_identity_and_references() -> None:
    """The identity of a destination keeps everything but its credentials."""
    from pacs_agent.destinations import reference, resolve_reference

    assert redact("dicom+tls://ARCHIVE_A@pacs:2762") == "dicom+tls://ARCHIVE_A@pacs:2762"
    assert redact("dicom+tls://ARCHIVE_B@pacs:2762") != redact("dicom+tls://ARCHIVE_A@pacs:2762")
    assert (
        redact("dicomweb+https://u:pw@pacs/dicom-web?token=abc&x=1")
        == "dicomweb+https://pacs/dicom-web?x=1"
    )
    ref = reference("orthanc+http://alice:secret-pw@pacs:8042")
    assert ref == "orthanc+http://alice:***@pacs:8042"
    assert resolve_reference(ref, ["orthanc+http://alice:secret-pw@pacs:8042"]).endswith(
        "secret-pw@pacs:8042"
    )
    with pytest.raises(LookupError, match="not configured any more") as err:
        resolve_reference(ref, ["orthanc+http://alice:secret-pw@elsewhere:8042"])
    assert "secret-pw" not in str(err.value)


AUTH_PW = "Orthanc-delivery-pw-31c7"


@pytest.fixture(scope="module")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc that refuses anonymous REST and DICOMweb calls."""
    server = start_orthanc(
        tmp_path_factory.mktemp("orthanc-auth"),
        http_port=free_port(),
        dicom_port=free_port(),
        webhook_url=None,
        extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"alice": AUTH_PW}},
        auth=("alice", AUTH_PW),
    )
    yield server
    server.stop()


def test_credentials_stay_out_of_jobs_events_and_api(
    orthanc_auth: OrthancServer, tmp_path: Path, database_url: str
) -> None:
    """A study routed (by a rule) to a destination with credentials: the job stores a masked
    reference, the worker resolves the password only when it delivers, the delivery
    authenticates with the real Orthanc; no job row, event, delivery row or API answer holds
    the password. When the credentials are gone, the next delivery fails with a clear reason."""
    import json

    import httpx
    from fastapi.testclient import TestClient

    from pacs_agent.api.app import AgentState, create_app
    from pacs_agent.db.models import Destination, Pipeline
    from pacs_agent.receiving.ingest import Ingestor
    from pacs_agent.receiving.store import InstanceStore
    from pacs_agent.scheduling.completion import complete_study
    from pacs_agent.settings import Settings
    from tests.support.auth import bearer, make_user
    from workers.pipeline import WorkerContext, _deliver

    assert httpx.get(f"{orthanc_auth.url}/system").status_code == 401  # auth is really on
    web = f"dicomweb+http://alice:{AUTH_PW}@127.0.0.1:{orthanc_auth.http_port}/dicom-web"
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, min_free_disk_mb=1)
    db = Database(database_url)
    with db.session() as s:
        s.add(Pipeline(name="chest", bundle="/b/chest"))
    store = InstanceStore(settings.instance_dir)
    state = AgentState(settings=settings, db=db, store=store, puller=None)
    admin = bearer(make_user(database_url, "admin", "admin"))
    seen: list[str] = []
    with TestClient(create_app(state)) as c:

        def call(method: str, url: str, **kw: Any) -> Any:
            r = c.request(method, url, headers=admin, **kw)
            seen.append(r.text)
            return r

        r = call("POST", "/api/destinations", json={"name": "pacs-web", "url": web})
        assert r.status_code == 201, r.text
        rule = {"name": "all-to-pacs", "when": ["true"], "action": "process"}
        r = call("POST", "/api/rules", json={**rule, "destinations": ["pacs-web"]})
        assert r.status_code == 201, r.text

        source = _fresh_copy(tmp_path, "RG3_J2KR.dcm")  # an X-ray: analysable
        ds = dcmread(source)
        out_study = str(dcmread(sample_path("CT_small.dcm")).StudyInstanceUID)  # the results'
        outcome = Ingestor(db, store).ingest(
            source.read_bytes(), ds, ds.file_meta.TransferSyntaxUID, source="test"
        )
        assert complete_study(db, outcome.study_id, 1, "test", default_destinations=[], store=store)
        with db.session() as s:
            [job] = list(s.scalars(select(Job)))
            assert job.destinations == [
                f"dicomweb+http://alice:***@127.0.0.1:{orthanc_auth.http_port}/dicom-web"
            ]
            job_id, study_id, refs = job.id, job.study_id, list(job.destinations)

        def add_result() -> str:
            out = _fresh_copy(tmp_path)
            rel = f"out/{out.name}"
            (settings.results_dir / "out").mkdir(parents=True, exist_ok=True)
            out.rename(settings.results_dir / rel)
            r_ds = dcmread(settings.results_dir / rel, stop_before_pixels=True)
            with db.session() as s:
                s.add(
                    Result(
                        job_id=job_id,
                        kind="sc",
                        sop_instance_uid=r_ds.SOPInstanceUID,
                        series_instance_uid=r_ds.SeriesInstanceUID,
                        sop_class_uid=r_ds.SOPClassUID,
                        path=rel,
                    )
                )
            return str(r_ds.SOPInstanceUID)

        first = add_result()
        ctx = WorkerContext(settings, db)
        _deliver(ctx, job_id, study_id, refs)
        uids = {
            i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc_auth.study_instances(out_study)
        }
        assert first in uids  # the delivery authenticated
        with db.session() as s:
            assert s.get_one(Job, job_id).status == "done"
            [d] = list(s.scalars(select(Delivery)))
            assert d.status == "done"
            assert d.destination == f"dicomweb+http://127.0.0.1:{orthanc_auth.http_port}/dicom-web"

        # The secret is removed from the configuration: the next delivery says why it cannot go.
        second = add_result()
        with db.session() as s:
            s.get_one(Job, job_id).status = "delivering"
            s.delete(s.scalars(select(Destination)).one())
        _deliver(ctx, job_id, study_id, refs)
        with db.session() as s:
            d = s.scalars(select(Delivery).where(Delivery.status == "pending")).one()
            assert d.last_error and "not configured any more" in d.last_error
        assert second not in {
            i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc_auth.study_instances(out_study)
        }

        for url in (
            f"/api/studies/{ds.StudyInstanceUID}",
            "/api/studies",
            "/api/destinations",
            "/api/rules",
        ):
            assert call("GET", url).status_code == 200, url
    with db.session() as s:
        rows = json.dumps(
            {
                "jobs": [[j.destinations, j.error] for j in s.scalars(select(Job))],
                "events": [e.message for e in s.scalars(select(Event))],
                "deliveries": [[d.destination, d.last_error] for d in s.scalars(select(Delivery))],
            }
        )
    assert "alice:***@" in rows and "delivery.done" not in rows  # job refs dumped, not kinds
    for text in [rows, *seen]:
        assert AUTH_PW not in text, f"credential leaked in: {text[:300]}"
    db.dispose()
