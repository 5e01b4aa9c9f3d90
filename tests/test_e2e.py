"""End to end with real parts: a real Orthanc (with the plugin from orthanc/), a real Redis, the
agent and a Celery worker as processes, PostgreSQL, storescu as the modality, dciodvfy as judge.

One deployment serves the tests of this module in order: C-STORE path, webhook path, redelivery.
Its bundle is the DEMO one plus an UNTRAINED report-generation adapter (random weights,
tests/support/report_bundle.py), so the SR in Orthanc also carries the adapter's text.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from pacs_agent.db.models import Delivery, Job, Result
from pacs_agent.db.session import Database
from pacs_agent.queue import enqueue_job, make_celery
from pacs_agent.settings import Settings
from tests.conftest import AgentEnv, _create_pg_database, _drop_pg_database, sample_path, storescu
from tests.dciodvfy import dciodvfy_errors
from tests.support import free_port
from tests.support.orthanc import OrthancServer, start_orthanc
from tests.support.report_bundle import SENTENCES as REPORT_SENTENCES
from tests.support.report_bundle import write_untrained_report_bundle

pytestmark = pytest.mark.e2e

SECRET = "e2e-webhook-secret"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"


@dataclass
class Stack:
    agent: AgentEnv
    orthanc: OrthancServer
    database_url: str
    orthanc_args: dict

    def restart_orthanc(self) -> None:
        self.orthanc = start_orthanc(**self.orthanc_args)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: str,
    redis_server: str,
    demo_bundle: Path,
) -> Iterator[Stack]:
    import redis

    tmp = tmp_path_factory.mktemp("e2e")
    bundle = write_untrained_report_bundle(demo_bundle, tmp / "bundle")
    name, db_url = _create_pg_database(postgres_server)
    from pacs_agent.db.migrate import upgrade

    upgrade(db_url)
    broker_url = f"{redis_server}/15"
    redis.Redis.from_url(broker_url).flushdb()
    orthanc_http, orthanc_dicom = free_port(), free_port()
    agent = AgentEnv(
        tmp,
        db_url,
        broker_url,
        bundle,
        destinations=f"dicom://ORTHANC@127.0.0.1:{orthanc_dicom}",
    )
    agent.env["PACS_AGENT_ORTHANC_URL"] = f"http://127.0.0.1:{orthanc_http}"
    agent.env["PACS_AGENT_WEBHOOK_SECRET"] = SECRET
    # Quick retries, and a short broker visibility timeout so that a killed worker's job comes
    # back within the test (production keeps the defaults: minutes).
    agent.env["PACS_AGENT_DELIVERY_BACKOFF_S"] = "1"
    agent.env["PACS_AGENT_DELIVERY_BACKOFF_MAX_S"] = "2"
    agent.env["PACS_AGENT_DELIVERY_ATTEMPTS"] = "60"
    agent.env["PACS_AGENT_BROKER_VISIBILITY_TIMEOUT_S"] = "8"
    # A killed worker's job is taken back when its heartbeat is 20 s old (defaults: 10 s / 60 s).
    # Not shorter: a decoder that holds the GIL (JPEG 2000 on a loaded 2-core machine) can keep
    # the heartbeat thread waiting for seconds, and a taken-back job only starts over.
    agent.env["PACS_AGENT_JOB_HEARTBEAT_S"] = "2"
    agent.env["PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S"] = "20"
    orthanc_args = dict(
        workdir=tmp / "orthanc",
        http_port=orthanc_http,
        dicom_port=orthanc_dicom,
        modalities={"pacsagent": ("PACSAGENT", "127.0.0.1", agent.dicom_port)},
        webhook_url=f"{agent.url}/webhook/orthanc",
        webhook_secret=SECRET,
        stable_age=2,
    )
    stack = Stack(agent, start_orthanc(**orthanc_args), db_url, orthanc_args)
    try:
        agent.start_agent()
        agent.start_worker()
        yield stack
    finally:
        agent.stop()
        stack.orthanc.stop()
        redis.Redis.from_url(broker_url).flushdb()
        _drop_pg_database(postgres_server, name)


def _outputs(orthanc: OrthancServer, study_uid: str) -> dict[str, list[Dataset]]:
    by_class: dict[str, list[Dataset]] = {}
    for inst in orthanc.study_instances(study_uid):
        ds = dcmread(io.BytesIO(orthanc.get_instance_file(inst["ID"])))
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    return by_class


def _wait_outputs(
    orthanc: OrthancServer, study_uid: str, n_sources: int, timeout: float = 60
) -> dict[str, list[Dataset]]:
    end = time.monotonic() + timeout
    while True:
        found = _outputs(orthanc, study_uid)
        if all(
            len(found.get(c, [])) >= n
            for c, n in (
                (SR_CLASS, 1),
                (SEG_CLASS, n_sources),
                (SC_CLASS, n_sources),
                (PM_CLASS, n_sources),
            )
        ):
            return found
        if time.monotonic() > end:
            pytest.fail(f"outputs missing in Orthanc: { {k: len(v) for k, v in found.items()} }")
        time.sleep(0.5)


def _check_outputs(found: dict[str, list[Dataset]], source: Dataset, tmp: Path) -> None:
    [sr] = found[SR_CLASS]
    segs = [
        d
        for d in found[SEG_CLASS]
        if d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    ]
    scs = [
        d
        for d in found[SC_CLASS]
        if any(
            ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            for ref in d.get("SourceImageSequence", [])
        )
    ]
    assert len(segs) == 1 and len(scs) == 1
    for ds in (sr, segs[0], scs[0]):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        path = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors = dciodvfy_errors(path)
        assert errors == [], f"dciodvfy errors in {ds.SOPClassUID.name}: {errors}"
    [pm] = found[PM_CLASS]
    for ds in (segs[0], scs[0], pm):
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    pm_path = tmp / "pm.dcm"
    pm.save_as(pm_path, enforce_file_format=True)
    assert dciodvfy_errors(pm_path) == []
    assert "DEMO" in str(sr.SeriesDescription) + str(sr.get("ContentLabel", ""))


def _check_generated_text(sr: Dataset, source: Dataset) -> None:
    """The report adapter's text for the image, in the SR's draft container (121362), marked
    machine-generated and unverified, inferred from the image; the SR itself unverified."""
    [draft] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121362"]
    [text] = [
        i for i in draft.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111412"
    ]
    assert text.ValueType == "TEXT"
    assert text.TextValue.startswith("MACHINE-GENERATED, UNVERIFIED (report adapter, image 1")
    said = text.TextValue.split(": ", 1)[1]
    assert said.strip() and set(said.replace(",", " ").split()) <= {
        w for line in REPORT_SENTENCES for w in line.replace(",", " ").split()
    }  # the untrained adapter's own words
    [image] = text.ContentSequence
    assert image.RelationshipType == "INFERRED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    note = draft.ContentSequence[0].TextValue
    assert "not verified" in note and "machine-generated text is unverified" in note
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"


def test_cstore_study_gets_sr_seg_sc_in_orthanc(stack: Stack, tmp_path: Path) -> None:
    src_path = sample_path("RG1_J2KR.dcm")
    source = dcmread(src_path)
    res = storescu(stack.agent.dicom_port, src_path)
    assert res.returncode == 0, res.stderr
    study = stack.agent.wait_study(source.StudyInstanceUID, {"done", "failed", "skipped"})
    assert study["status"] == "done", study
    found = _wait_outputs(stack.orthanc, source.StudyInstanceUID, 1)
    _check_outputs(found, source, tmp_path)
    _check_generated_text(found[SR_CLASS][0], source)
    # The plugin must not send the agent's own results back to it as a new study: wait for its
    # decision on the study made stable by the results, then check the agent saw nothing new.
    stack.orthanc.wait_for_log(f"(StudyInstanceUID {source.StudyInstanceUID}) skipped", 60)
    again = stack.agent.study(source.StudyInstanceUID)
    assert again is not None and again["version"] == 1 and len(again["jobs"]) == 1


def test_webhook_path_pulls_from_orthanc(stack: Stack, tmp_path: Path) -> None:
    src_path = sample_path("RG3_J2KR.dcm")
    source = dcmread(src_path)
    stack.orthanc.upload(src_path.read_bytes())  # arrives in the PACS, not at the agent
    study = stack.agent.wait_study(source.StudyInstanceUID, {"done", "failed", "skipped"})
    assert study["status"] == "done", study
    assert study["source"] == "orthanc"
    found = _wait_outputs(stack.orthanc, source.StudyInstanceUID, 1)
    _check_outputs(found, source, tmp_path)
    # Results arriving in Orthanc make the study stable again: the agent must recognise its
    # own objects and not start another version (the plugin says so once they are stable).
    stack.orthanc.wait_for_log(f"(StudyInstanceUID {source.StudyInstanceUID}) skipped", 60)
    again = stack.agent.study(source.StudyInstanceUID)
    assert again is not None and again["version"] == 1 and len(again["jobs"]) == 1


def test_redelivered_job_makes_no_second_copy(stack: Stack) -> None:
    source = dcmread(sample_path("RG1_J2KR.dcm"), stop_before_pixels=True)
    study = stack.agent.study(source.StudyInstanceUID)
    assert study is not None and study["status"] == "done"
    job_id = study["jobs"][0]["id"]
    before = sorted(
        i["MainDicomTags"]["SOPInstanceUID"]
        for i in stack.orthanc.study_instances(source.StudyInstanceUID)
    )
    db = Database(stack.database_url)
    # What a worker killed after sending but before recording leaves behind: the job marked
    # running, its deliveries not recorded, its message redelivered by the broker.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running"))
        result_ids = list(s.scalars(select(Result.id).where(Result.job_id == job_id)))
        s.execute(
            update(Delivery).where(Delivery.result_id.in_(result_ids)).values(status="pending")
        )
    settings = Settings(broker_url=stack.agent.env["PACS_AGENT_BROKER_URL"])
    enqueue_job(make_celery(settings), job_id, priority=5)
    end = time.monotonic() + 120
    while True:
        with db.session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        if job.status == "done" and job.attempts == 2:
            break
        if time.monotonic() > end:
            pytest.fail(f"redelivered job not done: {job.status} attempts={job.attempts}")
        time.sleep(0.5)
    with db.session() as s:
        statuses = set(s.scalars(select(Delivery.status).where(Delivery.result_id.in_(result_ids))))
        attempts = set(
            s.scalars(select(Delivery.attempts).where(Delivery.result_id.in_(result_ids)))
        )
    db.dispose()
    assert statuses == {"done"} and attempts == {2}  # sent again, same UIDs
    after = sorted(
        i["MainDicomTags"]["SOPInstanceUID"]
        for i in stack.orthanc.study_instances(source.StudyInstanceUID)
    )
    assert after == before


def _new_study(tmp: Path, name: str = "RG3_J2KR.dcm") -> tuple[Path, Dataset]:
    """A copy of a sample radiograph as a new study (new study, series and SOP UIDs)."""
    from pydicom.uid import generate_uid

    ds = dcmread(sample_path(name))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _sop_uids(orthanc: OrthancServer, study_uid: str) -> list[str]:
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study_uid))


def test_pacs_down_gets_everything_once_when_back(stack: Stack, tmp_path: Path) -> None:
    stack.orthanc.stop()
    paths = [_new_study(tmp_path)[0] for _ in range(2)]
    uids = [str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths]
    for p in paths:
        assert storescu(stack.agent.dicom_port, p).returncode == 0
    for uid in uids:
        st = stack.agent.wait_study(uid, {"delivering", "done", "failed"})
        assert st["status"] == "delivering", st  # results made, PACS unreachable: waiting
    db = Database(stack.database_url)
    with db.session() as s:
        pending = list(s.scalars(select(Delivery).where(Delivery.status == "pending")))
        assert pending and all(d.last_error and d.next_attempt_at for d in pending)
    db.dispose()
    time.sleep(3)  # a few failed attempts while it is down
    stack.restart_orthanc()
    for uid in uids:
        st = stack.agent.wait_study(uid, {"done", "failed"})
        assert st["status"] == "done", st
        found = _sop_uids(stack.orthanc, uid)
        assert len(found) == 4 and len(set(found)) == 4  # SR, SEG, SC, PM: each exactly once


def test_worker_killed_mid_job_leaves_exactly_one_copy(stack: Stack, tmp_path: Path) -> None:
    worker = next(
        p for p in stack.agent.procs if p.popen.args[-1] == "worker" and p.popen.poll() is None
    )
    path, ds = _new_study(tmp_path, "RG1_J2KR.dcm")
    assert storescu(stack.agent.dicom_port, path).returncode == 0
    db = Database(stack.database_url)
    end = time.monotonic() + 120
    while True:  # wait until the worker has claimed the job, then kill it without warning
        with db.session() as s:
            job = s.scalar(
                select(Job)
                .join(Job.study)
                .where(Job.study.has(study_instance_uid=str(ds.StudyInstanceUID)))
            )
        if job is not None and job.status == "running":
            break
        assert time.monotonic() < end, "job never started"
        time.sleep(0.05)
    worker.stop(sig="kill")
    stack.agent.procs.remove(worker)
    stack.agent.start_worker()
    st = stack.agent.wait_study(str(ds.StudyInstanceUID), {"done", "failed"}, timeout=240)
    assert st["status"] == "done", st
    with db.session() as s:
        job = s.get_one(Job, job.id)
        assert job.attempts >= 2  # the job ran again after the kill
    db.dispose()
    found = _sop_uids(stack.orthanc, str(ds.StudyInstanceUID))
    assert len(found) == 4 and len(set(found)) == 4
