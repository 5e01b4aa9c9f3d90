"""Priority through the whole path: incoming class at ingest, dispatch order, the worker's claim
order (aging, offpeak window, reserved lane), the bundle's triage policy and escalation, and, with
a real agent, real Redis and real worker processes, the order and no-starvation guarantees."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from pacs_agent.bench_triage import Deployment, fifo_latencies, percentile, small_radiograph
from pacs_agent.db.models import AgentFlag, Event, Job, Pipeline, Study, WorkerBeat
from pacs_agent.db.session import Database
from pacs_agent.loop import AgentLoop
from pacs_agent.queue import make_celery
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling import claims
from pacs_agent.scheduling.pipelines import (
    beat,
    pipelines_on_host,
    queue_name,
    seed_default_pipeline,
    served_pipelines,
    worker_queues,
)
from pacs_agent.settings import Settings

UTC = dt.UTC
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _c(job_id: int, cls: str, waited_s: float = 0.0) -> claims.Candidate:
    return claims.Candidate(job_id, cls, T0 - dt.timedelta(seconds=waited_s))


# --- claim ordering: pure functions -------------------------------------------------------------


def test_claim_order_by_class_then_waiting_time() -> None:
    cands = [_c(1, "routine", 5), _c(2, "urgent", 1), _c(3, "stat", 0), _c(4, "routine", 9)]
    ordered = claims.order(cands, now=T0, aging_s=600)
    assert [c.job_id for c in ordered] == [3, 2, 4, 1]


def test_aging_lifts_a_routine_job_one_class_per_period() -> None:
    # Routine (6) that waited 1.5 periods ranks 1.5: ahead of a fresh urgent job (3).
    old_routine, fresh_urgent = _c(1, "routine", 150), _c(2, "urgent", 0)
    assert claims.effective_rank("routine", 150, 100) == pytest.approx(1.5)
    ordered = claims.order([fresh_urgent, old_routine], now=T0, aging_s=100)
    assert [c.job_id for c in ordered] == [1, 2]
    # Half a period is not enough.
    ordered = claims.order([fresh_urgent, _c(1, "routine", 50)], now=T0, aging_s=100)
    assert [c.job_id for c in ordered] == [2, 1]


def test_offpeak_window_wraps_past_midnight() -> None:
    w = "20:00-06:00"
    assert claims.in_window(w, dt.time(23, 30))
    assert claims.in_window(w, dt.time(0, 0))
    assert claims.in_window(w, dt.time(5, 59))
    assert claims.in_window(w, dt.time(20, 0))
    assert not claims.in_window(w, dt.time(6, 0))
    assert not claims.in_window(w, dt.time(12, 0))
    assert claims.in_window("01:00-05:00", dt.datetime(2026, 1, 1, 3, 0))
    assert not claims.in_window("01:00-05:00", dt.datetime(2026, 1, 1, 6, 0))
    assert claims.in_window("00:00-00:00", dt.time(13, 0))  # empty window: always open
    with pytest.raises(ValueError):
        claims.parse_window("8pm to 6am")


def test_offpeak_jobs_only_inside_the_window_and_lane_filter() -> None:
    cands = [_c(1, "offpeak", 9999), _c(2, "routine"), _c(3, "urgent"), _c(4, "stat")]
    closed = claims.order(cands, now=T0, aging_s=600, offpeak_is_open=False)
    assert [c.job_id for c in closed] == [4, 3, 2]
    opened = claims.order(cands, now=T0, aging_s=0, offpeak_is_open=True)
    assert [c.job_id for c in opened] == [4, 3, 2, 1]  # aging off: strict classes
    urgent_lane = claims.order(cands, now=T0, aging_s=600, lane="urgent")
    assert [c.job_id for c in urgent_lane] == [4, 3]


def test_batches_keep_the_head_class_and_a_stat_job_runs_alone() -> None:
    ordered = claims.order(
        [_c(1, "stat"), _c(2, "stat"), _c(3, "urgent"), _c(4, "routine")], now=T0, aging_s=600
    )
    assert [c.job_id for c in claims.batch(ordered, 8)] == [1]
    ordered = claims.order(
        [_c(3, "urgent", 2), _c(5, "urgent", 1), _c(4, "routine", 9)], now=T0, aging_s=600
    )
    assert [c.job_id for c in claims.batch(ordered, 8)] == [3, 5]  # no routine job rides along
    routine = [_c(i, "routine", 10 - i) for i in range(10)]
    assert [c.job_id for c in claims.batch(claims.order(routine, now=T0, aging_s=600), 3)] == [
        0,
        1,
        2,
    ]
    assert claims.batch([], 8) == []


def test_queue_names_and_lanes() -> None:
    assert queue_name("chest", 6) == "pipeline.chest"
    assert queue_name("chest", 3) == "pipeline.chest.urgent"
    assert queue_name("chest", 0) == "pipeline.chest.urgent"
    assert worker_queues(["a", "b"], "all") == [
        "pipeline.a",
        "pipeline.a.urgent",
        "pipeline.b",
        "pipeline.b.urgent",
    ]
    assert worker_queues(["a", "b"], "urgent") == ["pipeline.a.urgent", "pipeline.b.urgent"]


# --- triage policy and escalation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DEMO bundle with a tiny encoder (fast on 2 cores), written once for this module."""
    from workers.models.bundle import write_demo_bundle
    from workers.models.vit import ViTConfig

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56)
    return write_demo_bundle(tmp_path_factory.mktemp("tiny") / "chest", config=cfg)


def test_bundle_policy_marks_critical_and_never_lowers(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from workers.models.bundle import BundleError, TriagePolicy, load_bundle, triage_level

    bundle_dir = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle_dir)
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["triage_policy"]["labels"]  # the DEMO writer writes a policy
    manifest["triage_policy"] = {"labels": {"Pneumothorax": {"urgent": 0.3, "critical": 0.5}}}
    manifest_path.write_text(json.dumps(manifest))
    policy = load_bundle(bundle_dir).triage_policy
    assert policy is not None
    assert triage_level([("Pneumothorax", 0.6, True)], policy) == "critical"
    assert triage_level([("pneumothorax", 0.4, False)], policy) == "urgent"
    assert triage_level([("Pneumothorax", 0.2, False), ("Nodule", 0.99, True)], policy) == (
        "routine"  # Nodule is not in the policy and there is no default
    )
    with_default = TriagePolicy.from_manifest({"default": {"urgent": 0.7}})
    assert with_default is not None
    assert triage_level([("Nodule", 0.75, True)], with_default) == "urgent"
    for bad in ({"labels": {"X": {"urgent": 1.5}}}, {"labels": {"X": {"severe": 0.5}}}, []):
        with pytest.raises(BundleError):
            TriagePolicy.from_manifest(bad)


def _job(db: Database, cls: str, *, uid: str, status: str = "running") -> int:
    from pacs_agent.scheduling.priority import broker_number

    with db.session() as s:
        study = Study(study_instance_uid=uid)
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            pipeline="chest",
            status=status,
            priority_class=cls,
            priority=broker_number(cls),
        )
        s.add(job)
        s.flush()
        return int(job.id)


def test_escalation_keeps_stat_and_makes_critical_stat(database_url: str, tmp_path: Path) -> None:
    from workers.pipeline import _record_triage

    db = Database(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    stat_id = _job(db, "stat", uid="1.2.1")
    routine_id = _job(db, "routine", uid="1.2.2")
    urgent_id = _job(db, "urgent", uid="1.2.3")
    with db.session() as s:
        # An incoming stat study whose findings are all routine stays stat.
        _record_triage(s, settings, s.get_one(Job, stat_id), "routine", [])
        _record_triage(s, settings, s.get_one(Job, routine_id), "critical", [])
        _record_triage(s, settings, s.get_one(Job, urgent_id), "routine", [])
    with db.session() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        escalated = list(s.scalars(select(Event).where(Event.kind == "job.escalated")))
    assert (jobs[stat_id].priority_class, jobs[stat_id].priority, jobs[stat_id].triage) == (
        "stat",
        0,
        "routine",
    )
    assert (jobs[routine_id].priority_class, jobs[routine_id].priority) == ("stat", 0)
    assert jobs[routine_id].triage == "critical"
    assert (jobs[urgent_id].priority_class, jobs[urgent_id].priority) == ("urgent", 3)
    assert [e.job_id for e in escalated] == [routine_id]
    assert "routine -> stat" in escalated[0].message
    db.dispose()


# --- incoming priority at ingest ----------------------------------------------------------------


def _dataset(**tags: Any) -> tuple[bytes, Dataset]:
    data, ds = small_radiograph(32, seed=1)
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), parse_part10(buf.getvalue())


def test_incoming_priority_from_the_dataset_and_the_calling_ae(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    ingestor = Ingestor(db, InstanceStore(tmp_path / "store"), stat_calling_aes=["ED_CR1"])

    def ingest(ds_tags: dict[str, Any], calling_ae: str = "MOD") -> str:
        data, ds = _dataset(**ds_tags)
        ts = ds.file_meta.TransferSyntaxUID
        ingestor.ingest(data, ds, ts, source="dimse", calling_ae=calling_ae)
        return str(ds.StudyInstanceUID)

    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    item.RequestedProcedureID = "RP1"
    high = Dataset()
    high.RequestedProcedurePriority = "high"
    uids = {
        "top": ingest({"RequestedProcedurePriority": "STAT"}),
        "sequence": ingest({"RequestAttributesSequence": DicomSequence([item])}),
        "high": ingest({"RequestAttributesSequence": DicomSequence([high])}),
        "ae": ingest({}, calling_ae="ED_CR1"),
        "routine": ingest({"RequestedProcedurePriority": "ROUTINE"}),
        "none": ingest({}),
    }
    # A later instance of the stat study that says HIGH keeps the study stat.
    data, ds = _dataset(StudyInstanceUID=uids["top"], RequestedProcedurePriority="HIGH")
    ingestor.ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="dimse", calling_ae="MOD")
    with db.session() as s:
        got = {
            k: s.scalar(select(Study.incoming_priority).where(Study.study_instance_uid == u))
            for k, u in uids.items()
        }
    assert got == {
        "top": "stat",
        "sequence": "stat",
        "high": "urgent",
        "ae": "stat",
        "routine": None,
        "none": None,
    }
    db.dispose()


# --- dispatch: order, offpeak hold, suspend -----------------------------------------------------


def _closed_window_now() -> str:
    now = dt.datetime.now()
    start = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    return f"{start}-{end}"


def test_dispatch_in_priority_order_holds_offpeak_and_stops_when_suspended(
    database_url: str, broker_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=broker_url)
    loop = AgentLoop(
        db,
        make_celery(settings),
        quiet_period_s=0,
        default_destinations=[],
        offpeak_window=_closed_window_now(),
    )
    ids = {
        cls: _job(db, cls, uid=f"1.3.{i}", status="pending")
        for i, cls in enumerate(["routine", "offpeak", "urgent", "stat"])
    }
    with db.session() as s:
        s.add(AgentFlag(key="processing_suspended", value=True))
    assert loop.dispatcher.dispatch_pending() == 0
    with db.session() as s:
        s.get_one(AgentFlag, "processing_suspended").value = False
    assert loop.dispatcher.dispatch_pending() == 3
    with db.session() as s:
        status = {j.id: j.status for j in s.scalars(select(Job))}
        order = [
            e.job_id
            for e in s.scalars(select(Event).where(Event.kind == "job.queued").order_by(Event.id))
        ]
    assert order == [ids["stat"], ids["urgent"], ids["routine"]]
    assert status[ids["offpeak"]] == "pending"  # outside the window
    r = redis.Redis.from_url(broker_url)
    urgent_q = [json.loads(m) for k in r.keys("pipeline.chest.urgent*") for m in r.lrange(k, 0, -1)]
    main_q = [json.loads(m) for k in r.keys("pipeline.chest") for m in r.lrange(k, 0, -1)]
    main_q += [json.loads(m) for k in r.keys("pipeline.chest:*") for m in r.lrange(k, 0, -1)]
    assert sorted(m["headers"]["argsrepr"] for m in urgent_q) == sorted(
        [f"[{ids['stat']}]", f"[{ids['urgent']}]"]
    )
    assert [m["headers"]["argsrepr"] for m in main_q] == [f"[{ids['routine']}]"]
    assert {m["properties"]["priority"] for m in urgent_q} == {0, 3}
    r.close()
    loop.dispatcher.offpeak_window = "00:00-00:00"  # always open
    assert loop.dispatcher.dispatch_pending() == 1
    db.dispose()


def test_a_worker_hands_back_what_it_may_not_take(
    database_url: str, broker_url: str, tmp_path: Path
) -> None:
    """Offpeak work found queued outside the window goes back to pending (the agent sends it
    when the window opens); the urgent lane passes a wake-up on for routine work it may not take,
    so no job is left queued without a message."""
    from workers.pipeline import WorkerContext, process

    db = Database(database_url)
    closed = _closed_window_now()
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        broker_url=broker_url,
        offpeak_window=closed,
        worker_lane="urgent",
    )
    offpeak = _job(db, "offpeak", uid="1.4.1", status="queued")
    routine = _job(db, "routine", uid="1.4.2", status="queued")
    ctx = WorkerContext(settings, db)
    assert process(ctx, offpeak) == "skipped"  # nothing an urgent-lane worker may take
    with db.session() as s:
        status = {j.id: j.status for j in s.scalars(select(Job))}
        held = s.scalar(select(Event.message).where(Event.kind == "job.held"))
    assert status == {offpeak: "pending", routine: "queued"}
    assert held is not None and closed in held
    r = redis.Redis.from_url(broker_url)
    handed = [json.loads(m) for k in r.keys("pipeline.chest*") for m in r.lrange(k, 0, -1)]
    r.close()
    assert [m["headers"]["argsrepr"] for m in handed] == [f"[{routine}]"]
    assert handed[0]["properties"]["delivery_info"]["routing_key"] == "pipeline.chest"
    db.dispose()


# --- pipelines and heartbeats -------------------------------------------------------------------


def test_pipelines_on_host_and_served_pipelines(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    here = tmp_path / "chest"
    here.mkdir()
    (here / "manifest.json").write_text("{}")
    settings = Settings(data_dir=tmp_path, database_url=database_url, bundle=here)
    with db.session() as s:
        # An empty table: the default pipeline with the configured bundle.
        assert pipelines_on_host(s, settings) == {"chest": here.resolve()}
        # The agent seeds an empty table with it at start, once.
        assert seed_default_pipeline(s, settings) is True
        assert seed_default_pipeline(s, settings) is False
        seeded = s.scalar(select(Pipeline).where(Pipeline.name == "chest"))
        assert seeded is not None and seeded.bundle == str(here.resolve())
        s.delete(seeded)
        s.flush()
        s.add(Pipeline(name="chest", bundle=str(here)))
        s.add(Pipeline(name="multi-anatomy", bundle=str(tmp_path / "elsewhere")))
        s.add(Pipeline(name="off", bundle=str(here), enabled=False))
    with db.session() as s:
        assert pipelines_on_host(s, settings) == {"chest": here}
        only = settings.model_copy(update={"worker_pipelines": ["multi-anatomy"]})
        assert pipelines_on_host(s, only) == {}
        beat(s, "w1", pipelines=["chest"], bundles={"chest": {"is_demo": True}}, lane="all")
        beat(s, "w2", pipelines=["chest"], bundles={}, lane="urgent")
        old = WorkerBeat(
            name="gone",
            pipelines=["multi-anatomy"],
            last_seen_at=dt.datetime.now(UTC) - dt.timedelta(minutes=5),
        )
        s.add(old)
    with db.session() as s:
        served = served_pipelines(s, alive_within_s=60)
    assert set(served) == {"chest"}  # multi-anatomy: no live worker
    assert [w["name"] for w in served["chest"]] == ["w1", "w2"]
    assert served["chest"][0]["bundle"] == {"is_demo": True}
    db.dispose()


# --- FIFO figure of the bench -------------------------------------------------------------------


def test_fifo_simulation_and_percentiles() -> None:
    # 4 jobs at t=0, one at t=1; batches of 2, 1 s per job: FIFO finishes them at 2, 2, 4, 4, 5.
    lat = fifo_latencies([(1, 0), (2, 0), (3, 0), (4, 0), (5, 1.0)], 1.0, 2)
    assert lat == {1: 2.0, 2: 2.0, 3: 4.0, 4: 4.0, 5: 4.0}
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5


# --- real agent, Redis and worker processes -----------------------------------------------------


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres_server: str,
    broker_url: str,
    tiny_bundle: Path,
) -> Iterator[Deployment]:
    """Agent and worker processes on PostgreSQL and a real Redis; settings from the test's
    indirect parameter."""
    from tests.conftest import _create_pg_database, _drop_pg_database

    # One torch thread per worker: the tests share 2 cores with the agent and other workers.
    env = {"OMP_NUM_THREADS": "1", **(getattr(request, "param", {}) or {})}
    name, url = _create_pg_database(postgres_server)
    dep = None
    try:
        dep = Deployment(tmp_path, tiny_bundle, database_url=url, broker_url=broker_url, env=env)
        yield dep
    finally:
        if dep is not None:
            dep.stop()
        _drop_pg_database(postgres_server, name)


def _job_rows(dep: Deployment, ids: list[int]) -> dict[int, Job]:
    with dep.db.session() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        s.expunge_all()
    return rows


def _wait(cond: Any, timeout: float, what: str, dep: Deployment) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"{what} not within {timeout} s\n{dep.tail()}")
        time.sleep(0.05)


@pytest.mark.parametrize("deployment", [{"PACS_AGENT_WORKER_BATCH_JOBS": "16"}], indirect=True)
def test_stat_and_urgent_finish_before_every_routine_study_still_queued(
    deployment: Deployment,
) -> None:
    dep = deployment
    routine = [dep.add("routine", 48, seed=i) for i in range(40)]

    def queued() -> bool:
        return all(j.status == "queued" for j in _job_rows(dep, routine).values())

    def busy() -> bool:
        rows = _job_rows(dep, routine)
        return any(j.status != "queued" and j.status != "pending" for j in rows.values())

    # The backlog is queued before the worker starts: its first batch is a full one (16).
    _wait(queued, 60, "the routine backlog queued", dep)
    dep.start_worker()
    _wait(busy, 60, "the worker taking its first batch", dep)  # one worker busy with a batch
    urgent = dep.add("urgent", 48, seed=100)
    stat = dep.add("stat", 48, seed=101)
    dep.wait_done([*routine, urgent, stat], timeout=240)
    rows = _job_rows(dep, [*routine, urgent, stat])

    def at(t: dt.datetime | None) -> dt.datetime:
        assert t is not None
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    arrived = max(at(rows[urgent].enqueued_at), at(rows[stat].enqueued_at))
    still_queued = [r for r in routine if at(rows[r].started_at) > arrived]
    assert len(still_queued) >= 10, "the worker finished the backlog before stat/urgent arrived"
    for r in still_queued:
        assert at(rows[r].finished_at) > at(rows[stat].finished_at)
        assert at(rows[r].finished_at) > at(rows[urgent].finished_at)
    # Nor did the stat study wait for the whole routine batch in flight when it arrived: the
    # worker checks for a more urgent job before it fetches each job of the batch. It fetches
    # ahead of its writes (the decode pool's look-ahead of 2, up to 3 images waiting for a model
    # batch of 4, 2 jobs queued for the writer, 1 being written, 1 being fetched): at most
    # about ten jobs are past that check at any moment, so with twelve or more of the batch
    # still to finish when the stat study arrived, some were not fetched yet, and the stat
    # study is taken before them. The claim (started_at) is what shows it: whether it also
    # finishes first depends on its own analysis against the batch's remaining writes.
    in_flight = [
        r
        for r in routine
        if at(rows[r].started_at) < at(rows[stat].enqueued_at) < at(rows[r].finished_at)
    ]
    assert len(in_flight) >= 12, f"the stat study came late in the batch: {len(in_flight)} left"
    last = max(at(rows[r].finished_at) for r in in_flight)
    assert at(rows[stat].started_at) < last, "the stat study waited for the whole batch"
    # The stat job ran alone.
    with dep.db.session() as s:
        running = s.scalar(
            select(Event.message).where(Event.kind == "job.running", Event.job_id == stat)
        )
        batched_with_stat = s.scalar(
            select(Event.id).where(
                Event.kind == "job.running", Event.message.contains(f"batched with job {stat}")
            )
        )
    assert running is not None and "stat" in running and batched_with_stat is None


@pytest.mark.parametrize(
    "deployment",
    [{"PACS_AGENT_WORKER_BATCH_JOBS": "1", "PACS_AGENT_PRIORITY_AGING_S": "1"}],
    indirect=True,
)
def test_routine_studies_complete_under_a_steady_stream_of_urgent_ones(
    deployment: Deployment,
) -> None:
    dep = deployment
    dep.start_worker()
    urgent = [dep.add("urgent", 48, seed=200 + i) for i in range(3)]
    routine = [dep.add("routine", 48, seed=i) for i in range(3)]
    end = time.monotonic() + 120
    while time.monotonic() < end:
        rows = _job_rows(dep, routine)
        if all(j.status == "done" for j in rows.values()):
            break
        if dep.queued_count("urgent") < 3:  # never let the urgent stream run dry
            urgent.append(dep.add("urgent", 48, seed=200 + len(urgent)))
        time.sleep(0.05)
    else:
        pytest.fail(f"routine studies starved: {[j.status for j in rows.values()]}\n{dep.tail()}")
    dep.wait_done([*routine, *urgent], timeout=120)
    rows = _job_rows(dep, [*routine, *urgent])

    def at(t: dt.datetime | None) -> dt.datetime:
        assert t is not None
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    # Each routine study was taken while an urgent one was waiting: aging, not an idle queue.
    for r in routine:
        taken = at(rows[r].started_at)
        assert any(at(rows[u].enqueued_at) < taken < at(rows[u].started_at) for u in urgent), (
            f"routine job {r} only ran when no urgent job waited"
        )


@pytest.mark.parametrize("deployment", [{"PACS_AGENT_WORKER_BATCH_JOBS": "8"}], indirect=True)
def test_a_reserved_urgent_lane_takes_stat_and_urgent_jobs_only(deployment: Deployment) -> None:
    dep = deployment
    dep.start_worker("all")
    dep.start_worker("urgent")
    routine = [dep.add("routine", 48, seed=i) for i in range(16)]

    def busy() -> bool:
        return any(j.status == "running" for j in _job_rows(dep, routine).values())

    _wait(busy, 60, "the all-lane worker taking a routine batch", dep)
    urgent = [dep.add(cls, 48, seed=300 + i) for i, cls in enumerate(["stat", "urgent", "urgent"])]
    dep.wait_done([*routine, *urgent], timeout=240)
    rows = _job_rows(dep, [*routine, *urgent])

    def at(t: dt.datetime | None) -> dt.datetime:
        assert t is not None
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    with dep.db.session() as s:
        lanes = {w.name: w.lane for w in s.scalars(select(WorkerBeat))}
        ran_on = {
            e.job_id: e.message.split(", worker ", 1)[1].split(" (", 1)[0]
            for e in s.scalars(select(Event).where(Event.kind == "job.running"))
        }
    assert sorted(lanes.values()) == ["all", "urgent"]
    # The reserved lane never takes routine work, and it took stat/urgent work while the other
    # worker was busy with routine batches.
    assert all(lanes[ran_on[r]] == "all" for r in routine)
    assert any(lanes[ran_on[u]] == "urgent" for u in urgent)
    # None of them waited for the routine batch in flight when they arrived.
    for u in urgent:
        in_flight = [
            r
            for r in routine
            if at(rows[r].started_at) < at(rows[u].enqueued_at) < at(rows[r].finished_at)
        ]
        if len(in_flight) >= 2:
            assert at(rows[u].finished_at) < max(at(rows[r].finished_at) for r in in_flight)


def test_bench_triage_runs_and_reports(tiny_bundle: Path, tmp_path: Path) -> None:
    """`pacs-agent bench triage` end to end on its own deployment (embedded Redis, SQLite)."""
    import subprocess
    import sys

    out_json = tmp_path / "triage.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_agent.cli",
            "bench",
            "triage",
            "--routine",
            "4",
            "--urgent",
            "2",
            "--stat",
            "1",
            "--batch",
            "2",
            "--size",
            "48",
            "--window",
            "1",
            "--bundle",
            str(tiny_bundle),
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in ("with the backlog (measured)", "empty queue (measured)", "strict FIFO"):
        assert f"urgent, {line}" in out
    assert "computed from the measured service time" in out and "goal: urgent p95" in out
    assert "CPU cores" in out
    figures = json.loads(out_json.read_text())
    assert figures["classes"]["urgent"]["n"] == 2 and figures["classes"]["stat"]["n"] == 1


@pytest.mark.parametrize(
    "deployment",
    [{"PACS_AGENT_QUIET_PERIOD_S": "1", "PACS_AGENT_STAT_CALLING_AES": "ED_CR1"}],
    indirect=True,
)
def test_priority_flows_from_the_study_to_its_job_over_dimse(
    deployment: Deployment, tmp_path: Path
) -> None:
    """C-STORE (dcmtk's storescu) -> incoming class at ingest -> the job's class (routing, no
    rules) -> the urgent queue -> a worker -> done."""
    from tests.conftest import storescu

    dep = deployment
    dep.start_worker()
    sent: dict[str, tuple[str, str]] = {}
    for name, tag, ae in (
        ("stat-tag", "STAT", "MOD"),
        ("stat-ae", None, "ED_CR1"),
        ("high", "HIGH", "MOD"),
        ("routine", None, "MOD"),
    ):
        data, ds = small_radiograph(48, seed=len(sent), requested_priority=tag)
        f = tmp_path / f"{name}.dcm"
        f.write_bytes(data)
        sent[name] = (str(ds.StudyInstanceUID), ae)
        done = storescu(dep.dicom_port, f, aet=ae)
        assert done.returncode == 0, done.stderr
    uids = {uid: name for name, (uid, _) in sent.items()}

    def all_done() -> bool:
        with dep.db.session() as s:
            jobs = list(s.scalars(select(Job)))
            return len(jobs) == 4 and all(j.status == "done" for j in jobs)

    _wait(all_done, 120, "the four studies done", dep)
    with dep.db.session() as s:
        got = {
            uids[st.study_instance_uid]: (st.incoming_priority, job.priority_class)
            for st, job in s.execute(select(Study, Job).join(Job, Job.study_id == Study.id))
        }
        running = {
            uids[st.study_instance_uid]: msg
            for st, msg in s.execute(
                select(Study, Event.message)
                .join(Event, Event.study_id == Study.id)
                .where(Event.kind == "job.running")
            )
        }
    # The job's class can only have risen since (the DEMO policy escalates on its findings).
    from pacs_agent.scheduling.priority import rank

    assert got["stat-tag"][0] == "stat" and got["stat-ae"][0] == "stat"
    assert got["high"][0] == "urgent" and got["routine"][0] is None
    assert all(rank(got[n][1]) <= rank(got[n][0] or "routine") for n in got)
    assert ", stat" in running["stat-tag"] and ", stat" in running["stat-ae"]
    assert ", urgent" in running["high"] and ", routine" in running["routine"]
