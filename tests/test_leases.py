"""Job leases (issue 10): a job whose worker died runs again in about the heartbeat timeout,
never twice at once, and an operator can take it back.

Real parts: SQLite and PostgreSQL, the FastAPI app with real tokens, and for the last test a
real agent, two real Celery worker processes, dcmtk's storescu as the modality and dcmtk's
storescp as the PACS the results go to. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, text, update

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.cleaning.recovery import requeue_stale_jobs
from pacs_agent.db.models import (
    AuditEntry,
    Delivery,
    Event,
    Job,
    Result,
    Study,
    WorkerBeat,
    utcnow,
)
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.leases import Token
from pacs_agent.scheduling.pipelines import beat
from pacs_agent.settings import Settings
from tests.conftest import AgentEnv, free_port, sample_path, storescu
from tests.support.auth import bearer, make_user
from workers.leases import JobLeases
from workers.pipeline import (
    LeaseLost,
    WorkerContext,
    _deliver,
    _finish,
    _store_outputs,
    claim_jobs,
)

LEASE = dt.timedelta(seconds=900)
HEARTBEAT = dt.timedelta(seconds=60)


def _ago(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)


def _make_jobs(
    db: Database, n: int = 1, status: str = "queued", same_version: bool = False
) -> list[int]:
    """``n`` jobs of one study: versions 1..n of pipeline chest, or (``same_version``) the
    current version in pipelines chest, p1, p2..."""
    with db.session() as s:
        study = Study(study_instance_uid=generate_uid(), status="queued")
        s.add(study)
        s.flush()
        jobs = [
            Job(
                study_id=study.id,
                pipeline=f"p{i}" if same_version and i else "chest",
                study_version=1 if same_version else i + 1,
                status=status,
            )
            for i in range(n)
        ]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        return s.get_one(Job, job_id)


def _events(db: Database, job_id: int) -> list[tuple[str, str]]:
    with db.session() as s:
        return [
            (e.kind, e.message)
            for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
        ]


def _claim(db: Database, worker: str, **kw: object) -> list[int]:
    got = claim_jobs(db, "chest", lease=LEASE, heartbeat_timeout=HEARTBEAT, worker=worker, **kw)  # type: ignore[arg-type]
    return [c.job_id for c in got]


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url)
    yield d
    d.dispose()


# --- claim, heartbeat timeout, backstop -------------------------------------------------------


def test_claim_writes_the_lease_and_a_stale_heartbeat_makes_the_job_claimable(
    db: Database,
) -> None:
    [job_id] = _make_jobs(db)
    assert _claim(db, "host-a:1") == [job_id]
    job = _job(db, job_id)
    assert (job.status, job.worker, job.attempts) == ("running", "host-a:1", 1)
    assert job.heartbeat_at is not None and job.started_at is not None
    with db.session() as s:
        assert s.get_one(Study, job.study_id).status == "processing"  # follows its job
    # Heartbeat fresh: nobody else takes it.
    assert _claim(db, "host-b:2") == []
    # Heartbeat older than the timeout: the worker is gone, another takes it over.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=_ago(61)))
    assert _claim(db, "host-b:2") == [job_id]
    job = _job(db, job_id)
    assert (job.worker, job.attempts) == ("host-b:2", 2)
    # The backstop: heartbeat fresh (a hung worker's thread still beats) but past the lease.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=_ago(901)))
    assert _claim(db, "host-c:3") == [job_id]
    assert _job(db, job_id).attempts == 3


def test_recovery_puts_jobs_of_dead_or_hung_workers_back_to_pending(db: Database) -> None:
    dead, hung, alive = _make_jobs(db, 3, status="running", same_version=True)
    with db.session() as s:
        s.execute(update(Study).values(status="processing"))
        s.execute(
            update(Job)
            .where(Job.id == dead)
            .values(worker="w-dead", attempts=1, started_at=_ago(70), heartbeat_at=_ago(65))
        )
        s.execute(
            update(Job)
            .where(Job.id == hung)
            .values(worker="w-hung", attempts=1, started_at=_ago(2000), heartbeat_at=_ago(1))
        )
        s.execute(
            update(Job)
            .where(Job.id == alive)
            .values(worker="w-ok", attempts=1, started_at=_ago(70), heartbeat_at=_ago(5))
        )
    assert requeue_stale_jobs(db, dt.timedelta(seconds=1350), HEARTBEAT) == 2
    assert [_job(db, j).status for j in (dead, hung, alive)] == ["pending", "pending", "running"]
    [(kind, message)] = [e for e in _events(db, dead) if e[0].startswith("job.")]
    assert kind == "job.worker_lost" and "w-dead" in message and "silent for" in message
    assert [k for k, _ in _events(db, hung)] == ["job.stale"]
    assert _events(db, alive) == []
    with db.session() as s:  # one of its jobs still runs: the study stays processing
        assert s.get_one(Study, _job(db, alive).study_id).status == "processing"
    with db.session() as s:
        s.execute(update(Job).where(Job.id == alive).values(heartbeat_at=_ago(120)))
    assert requeue_stale_jobs(db, dt.timedelta(seconds=1350), HEARTBEAT) == 1
    with db.session() as s:  # no job of it runs any more: queued again
        assert s.get_one(Study, _job(db, alive).study_id).status == "queued"
    assert requeue_stale_jobs(db, dt.timedelta(seconds=1350), HEARTBEAT) == 0


# --- fencing: a worker that lost its claim writes nothing -------------------------------------


def _ctx(tmp_path: Path, database_url: str, db: Database) -> WorkerContext:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    return WorkerContext(settings, db, name="w-old:1")


def test_a_worker_that_lost_its_claim_discards_its_outputs_and_outcome(
    tmp_path: Path, database_url: str, db: Database
) -> None:
    ctx = _ctx(tmp_path, database_url, db)
    [job_id] = _make_jobs(db)
    [old] = claim_jobs(db, "chest", lease=LEASE, heartbeat_timeout=HEARTBEAT, worker=ctx.name)
    ds = dcmread(sample_path("CT_small.dcm"))
    outputs: list[tuple[str, Dataset, str | None]] = [("sc", ds, None)]
    # Paused past the timeout: another worker took the job over.
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=_ago(61)))
    assert _claim(db, "w-new:2") == [job_id]
    with pytest.raises(LeaseLost):
        _store_outputs(ctx, job_id, outputs, [], old.token)
    with pytest.raises(LeaseLost):
        _deliver(ctx, job_id, old.study_id, ["file:///nowhere"], old.token)
    assert _finish(db, job_id, error=None, token=old.token) is False
    assert _finish(db, job_id, error="boom", token=old.token) is False
    job = _job(db, job_id)
    assert (job.status, job.worker, job.attempts) == ("running", "w-new:2", 2)
    with db.session() as s:
        assert s.scalars(select(Result)).all() == []
        assert s.scalars(select(Delivery)).all() == []
    assert not any(p.is_file() for p in ctx.settings.results_dir.rglob("*"))
    lost = [m for k, m in _events(db, job_id) if k == "job.lease_lost"]
    assert len(lost) == 4 and all("w-old:1" in m and "attempt 1" in m for m in lost)
    # The claim that holds the job writes: same calls, new token.
    new = Token(job_id, "w-new:2", 2)
    _store_outputs(ctx, job_id, outputs, [], new)
    assert _finish(db, job_id, error=None, token=new) is True
    with db.session() as s:
        assert [r.sop_instance_uid for r in s.scalars(select(Result))] == [ds.SOPInstanceUID]
        assert s.get_one(Study, job.study_id).status == "done"
    assert _job(db, job_id).status == "done"


def test_the_heartbeat_thread_refreshes_held_jobs_and_notices_a_take_back(
    db: Database,
) -> None:
    [job_id] = _make_jobs(db)
    [claim] = claim_jobs(db, "chest", lease=LEASE, heartbeat_timeout=HEARTBEAT, worker="w:1")
    first = _job(db, job_id).heartbeat_at
    leases = JobLeases(db, every_s=0.2)
    try:
        leases.hold(claim.token)
        end = time.monotonic() + 20
        while _job(db, job_id).heartbeat_at == first:
            assert time.monotonic() < end, "heartbeat not refreshed"
            time.sleep(0.05)
        assert not leases.lost(job_id)
        with db.session() as s:  # what recovery or an operator does
            s.execute(update(Job).where(Job.id == job_id).values(status="pending"))
        while not leases.lost(job_id):
            assert time.monotonic() < end, "loss not noticed"
            time.sleep(0.05)
        assert leases.held() == []
    finally:
        leases.stop()


# --- PostgreSQL: concurrent claims ------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_claims_on_postgresql_never_share_a_job(database_url: str) -> None:
    setup = Database(database_url)
    ids = _make_jobs(setup, 40)
    setup.dispose()
    workers = 6
    barrier = threading.Barrier(workers)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        d = Database(database_url)
        mine: list[int] = []
        try:
            barrier.wait(timeout=30)
            while True:
                taken = _claim(d, name, batch_size=3)
                if not taken:
                    break
                mine += taken
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            got[name] = mine
            d.dispose()

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    claimed = [j for js in got.values() for j in js]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert sum(1 for js in got.values() if js) >= 2  # they did claim side by side
    check = Database(database_url)
    with check.session() as s:
        rows = s.execute(select(Job.id, Job.attempts, Job.worker)).all()
    check.dispose()
    by_worker = {j: w for w, js in got.items() for j in js}
    assert all(a == 1 and by_worker[i] == w for i, a, w in rows)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_row_being_claimed_is_skipped_not_waited_for(database_url: str) -> None:
    d = Database(database_url)
    first, second = _make_jobs(d, 2)
    holder = d.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": first})
    try:
        out: list[list[int]] = []
        t = threading.Thread(target=lambda: out.append(_claim(d, "w2")))
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "the claim waited for the locked row"
        assert out == [[second]]
    finally:
        tx.rollback()
        holder.close()
    assert _claim(d, "w3") == [first]
    d.dispose()


# --- operator: see the lease, take back a job whose worker is gone ----------------------------


@pytest.fixture
def client(tmp_path: Path, database_url: str) -> Iterator[tuple[TestClient, Database, dict]]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, broker_url="redis://127.0.0.1:1/0"
    )
    d = Database(database_url)
    state = AgentState(
        settings=settings, db=d, store=InstanceStore(settings.instance_dir), puller=None
    )
    who = bearer(make_user(database_url, "operator", "operator"))
    with TestClient(create_app(state)) as c:
        yield c, d, who
    d.dispose()


def test_retry_takes_back_a_running_job_only_when_its_worker_is_gone(
    client: tuple[TestClient, Database, dict],
) -> None:
    c, d, who = client
    [job_id] = _make_jobs(d)
    _claim(d, "w-live:7")
    with d.session() as s:
        beat(s, "w-live:7", pipelines=["chest"], bundles={}, lane="all")
        uid = s.get_one(Study, _job(d, job_id).study_id).study_instance_uid
    r = c.get(f"/api/jobs/{job_id}", headers=who)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["worker"], body["worker_alive"]) == ("running", "w-live:7", True)
    assert body["heartbeat_at"]
    # Alive: 409 naming the worker and its last heartbeat.
    r = c.post(f"/api/jobs/{job_id}/retry", headers=who)
    assert r.status_code == 409
    assert "w-live:7" in r.json()["detail"] and "last heartbeat" in r.json()["detail"]
    page = c.get(f"/studies/{uid}", headers=who)
    assert page.status_code == 200 and "w-live:7" in page.text and "Take back" not in page.text
    # The worker's row stops beating (the process is gone): the job can be taken back even
    # though its last job heartbeat is recent.
    with d.session() as s:
        s.execute(update(WorkerBeat).values(last_seen_at=_ago(300)))
    assert c.get(f"/api/jobs/{job_id}", headers=who).json()["worker_alive"] is False
    page = c.get(f"/studies/{uid}", headers=who)
    assert "worker gone" in page.text and "Take back" in page.text
    r = c.post(f"/api/jobs/{job_id}/retry", headers=who)
    assert r.status_code == 200, r.text
    assert r.json() == {"job_id": job_id, "status": "pending"}
    assert _job(d, job_id).status == "pending"
    assert [k for k, _ in _events(d, job_id)][-1] == "job.taken_back"
    with d.session() as s:
        [audit] = s.scalars(select(AuditEntry).where(AuditEntry.action == "job.take_back"))
        assert audit.actor == "operator" and audit.before and audit.before["worker"] == "w-live:7"
        assert s.get_one(Study, _job(d, job_id).study_id).status == "queued"
    # A pending job is not retried (it will run), and an unknown one is 404.
    assert c.post(f"/api/jobs/{job_id}/retry", headers=who).status_code == 409
    assert c.post("/api/jobs/999999/retry", headers=who).status_code == 404
    assert c.get("/api/jobs/999999", headers=who).status_code == 404
    # A stale job heartbeat alone also means gone (the worker row may still beat).
    with d.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="queued"))
    assert _claim(d, "w-live:7") == [job_id]
    with d.session() as s:
        beat(s, "w-live:7", pipelines=["chest"], bundles={}, lane="all")
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=_ago(61)))
    assert c.post(f"/api/jobs/{job_id}/retry", headers=who).status_code == 200


# --- real processes: kill -9 a worker mid-job -------------------------------------------------


def _storescp(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """dcmtk's storescp as the PACS: every object received gets a file of its own (+uf), so an
    object sent twice shows up twice."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "+xa", "+uf", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _study_of(tmp: Path, n: int) -> tuple[list[Path], str]:
    """``n`` copies of the RG1 radiograph (JPEG 2000) as one new study."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = dcmread(sample_path("RG1_J2KR.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp / f"in-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study


def _wait(what: str, cond, timeout: float, env: AgentEnv):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        for p in env.procs:
            if p.popen.poll() is not None and p.popen.returncode not in (-9,):
                pytest.fail(f"a product process exited:\n{p.log_tail()}")
        if time.monotonic() > end:
            logs = "\n---\n".join(p.log_tail(30) for p in env.procs)
            pytest.fail(f"{what} not within {timeout} s\n{logs}")
        time.sleep(0.1)


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_killed_workers_job_is_finished_by_another_worker_once(
    tmp_path: Path, database_url: str, broker_url: str, demo_bundle: Path
) -> None:
    out_port = free_port()
    received = tmp_path / "pacs"
    scp = _storescp(received, out_port)
    env = AgentEnv(
        tmp_path, database_url, broker_url, demo_bundle, f"dicom://STORESCP@127.0.0.1:{out_port}"
    )
    # A short heartbeat timeout for the test; the defaults are 10 s / 60 s (see the README).
    env.env.update(
        PACS_AGENT_JOB_HEARTBEAT_S="2",
        PACS_AGENT_JOB_HEARTBEAT_TIMEOUT_S="15",
        PACS_AGENT_WORKER_DEVICE="cpu",
        OMP_NUM_THREADS="1",
    )
    db = Database(database_url)
    try:
        env.start_agent()
        workers = {p.popen.pid: p for p in (env.start_worker(), env.start_worker())}

        def both_beat() -> bool:
            with db.session() as s:
                names = set(s.scalars(select(WorkerBeat.name)))
            return {int(n.rsplit(":", 1)[1]) for n in names} >= set(workers)

        _wait("both workers' heartbeat", both_beat, 120, env)
        paths, study_uid = _study_of(tmp_path, 3)  # three radiographs: a job of some seconds
        assert storescu(env.dicom_port, *paths).returncode == 0
        st = env.wait_study(study_uid, {"processing"}, timeout=120)  # not "queued"
        [job_id] = [j["id"] for j in st["jobs"]]

        def running() -> Job | None:
            job = _job(db, job_id)
            return job if job.status == "running" and job.worker else None

        first = _wait("the job running", running, 60, env)
        time.sleep(1.0)  # mid-job: fetching, decoding or in the model
        victim = workers.pop(int(first.worker.rsplit(":", 1)[1]))
        killed_at = time.monotonic()
        victim.stop(sig="kill")
        env.procs.remove(victim)

        def taken_over() -> Job | None:
            job = _job(db, job_id)
            return job if job.attempts >= 2 and job.status != "pending" else None

        second = _wait("another worker taking the job", taken_over, 120, env)
        recovered_s = time.monotonic() - killed_at
        done = env.wait_study(study_uid, {"done", "failed"}, timeout=240)
        finished_s = time.monotonic() - killed_at
        print(
            f"\nrecovery: job running again {recovered_s:.1f} s after kill -9, done after "
            f"{finished_s:.1f} s (heartbeat 2 s, timeout 15 s)"
        )
        assert done["status"] == "done", done
        job = _job(db, job_id)
        (survivor,) = workers
        assert job.attempts == 2 and job.worker and job.worker.endswith(f":{survivor}")
        assert second.worker != first.worker
        kinds = [k for k, _ in _events(db, job_id)]
        assert "job.worker_lost" in kinds and "job.lease_lost" not in kinds
        with db.session() as s:
            results = list(s.scalars(select(Result).where(Result.job_id == job_id)))
            deliveries = list(s.scalars(select(Delivery)))
        assert results and all(d.attempts == 1 and d.status == "done" for d in deliveries)
        assert len(deliveries) == len(results)
        # The PACS got each output once: one file per SOP Instance UID, no second copy.
        got = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()]
        assert sorted(got) == sorted(r.sop_instance_uid for r in results)
    finally:
        env.stop()
        scp.terminate()
        scp.wait(timeout=10)
        db.dispose()


def test_heartbeat_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least twice"):
        Settings(job_heartbeat_s=10, job_heartbeat_timeout_s=15)
    with pytest.raises(ValueError):
        Settings(job_heartbeat_s=0)
    s = Settings()
    assert (s.job_heartbeat_s, s.job_heartbeat_timeout_s) == (10.0, 60.0)
