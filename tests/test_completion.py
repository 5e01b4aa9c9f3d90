"""Study completion, routing and dispatch on SQLite and PostgreSQL, with a real Redis broker."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import redis
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from pacs_agent.db.models import Destination, Event, Job, Rule, Study
from pacs_agent.db.session import Database
from pacs_agent.loop import AgentLoop
from pacs_agent.queue import INFERENCE_QUEUE, TASK_PROCESS_JOB, make_celery
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.priority import broker_number
from pacs_agent.settings import Settings
from tests.conftest import free_port, sample_path


def _setup(tmp: Path, database_url: str, broker_url: str) -> tuple[Database, Ingestor, AgentLoop]:
    db = Database(database_url)
    store = InstanceStore(tmp / "store")
    ingestor = Ingestor(db, store)
    settings = Settings(data_dir=tmp, database_url=database_url, broker_url=broker_url)
    loop = AgentLoop(
        db,
        make_celery(settings),
        quiet_period_s=0.0,
        default_destinations=["file:///tmp/out"],
        store=store,
    )
    return db, ingestor, loop


def _ingest(ingestor: Ingestor, name: str, **changes: str) -> str:
    data = sample_path(name).read_bytes()
    ds = parse_part10(data)
    if changes:
        import io

        for k, v in changes.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        ds = parse_part10(data)
    ingestor.ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="dimse", calling_ae="MOD")
    return str(ds.StudyInstanceUID)


def _age_studies(db: Database) -> None:
    with db.session() as s:
        s.execute(
            update(Study).values(
                last_received_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)
            )
        )


def _queued_messages(broker_url: str) -> list[dict]:
    r = redis.Redis.from_url(broker_url)
    msgs = []
    for key in r.keys(f"{INFERENCE_QUEUE}*"):
        if r.type(key) == b"list":
            msgs += [json.loads(m) for m in r.lrange(key, 0, -1)]
    return msgs


def test_one_job_per_study_version_and_sent_after_commit(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    study_uid = _ingest(ingestor, "RG1_J2KR.dcm")
    _age_studies(db)
    loop.run_once()
    loop.run_once()  # a second pass must not complete or send anything again
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        jobs = list(s.scalars(select(Job)))
    assert study is not None and study.status == "queued"
    assert len(jobs) == 1 and jobs[0].status == "queued"
    assert jobs[0].destinations == ["file:///tmp/out"]
    msgs = _queued_messages(broker_url)
    assert len(msgs) == 1
    assert msgs[0]["headers"]["task"] == TASK_PROCESS_JOB
    assert msgs[0]["headers"]["argsrepr"] == f"[{jobs[0].id}]"

    # An instance arriving after completion starts version 2 and a job for it only.
    _ingest(ingestor, "RG3_J2KR.dcm", StudyInstanceUID=study_uid)
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        versions = sorted(j.study_version for j in s.scalars(select(Job)))
    assert study is not None and study.version == 2
    assert versions == [1, 2]
    assert len(_queued_messages(broker_url)) == 2


def test_loop_takes_back_a_job_whose_worker_stopped_beating_and_sends_it_again(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    """Recovery (cleaning.recovery) in the agent's pass: a running job whose heartbeat is older
    than the heartbeat timeout goes back to pending and is dispatched again in the same pass;
    one whose heartbeat is fresh is left to its worker."""
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    study_uid = _ingest(ingestor, "RG1_J2KR.dcm")
    _age_studies(db)
    loop.run_once()
    assert len(_queued_messages(broker_url)) == 1
    now = dt.datetime.now(dt.UTC)
    with db.session() as s:  # what a worker's claim writes (workers.pipeline.claim_jobs)
        s.execute(
            update(Job).values(
                status="running", worker="w:1", attempts=1, started_at=now, heartbeat_at=now
            )
        )
        s.execute(update(Study).values(status="processing"))
    loop.run_once()  # heartbeat fresh: still the worker's
    with db.session() as s:
        [job] = s.scalars(select(Job))
        assert job.status == "running"
    assert len(_queued_messages(broker_url)) == 1
    with db.session() as s:  # the worker was killed 61 s ago: no heartbeat since
        s.execute(update(Job).values(heartbeat_at=now - dt.timedelta(seconds=61)))
    loop.run_once()
    with db.session() as s:
        [job] = s.scalars(select(Job))
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.job_id == job.id))]
    assert job.status == "queued" and job.attempts == 1  # sent again; the claim counts attempts
    assert study is not None and study.status == "queued"
    assert "job.worker_lost" in kinds
    assert len(_queued_messages(broker_url)) == 2


def test_study_without_analysable_images_is_skipped_with_reason(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    study_uid = _ingest(ingestor, "test-SR.dcm")
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None
        assert study.status == "skipped"
        assert "no analysable images" in (study.reason or "")
        assert "non-image SOP class" in (study.reason or "")
        assert s.scalars(select(Job)).first() is None
        kinds = {e.kind for e in s.scalars(select(Event).where(Event.study_id == study.id))}
    assert "study.skipped" in kinds
    assert _queued_messages(broker_url) == []


def test_rules_route_and_skip(tmp_path: Path, database_url: str, broker_url: str) -> None:
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    with db.session() as s:
        s.add(Destination(name="pacs", url="dicom://PACS@h:104"))
        s.add(
            Rule(
                name="skip-feet-from-MOD",
                position=1,
                when=['calling_ae == "MOD"', 'tags.BodyPartExamined == "FOOT"'],
                action="discard",
                reason="feet are not read here",
            )
        )
        s.add(
            Rule(
                name="chest",
                position=2,
                when=['tags.Modality in ["CR", "DX"]'],
                pipeline="chest",
                priority="urgent",
                destinations=["pacs", "sender"],
                notify=["ward"],
            )
        )
    chest = _ingest(ingestor, "RG1_J2KR.dcm")
    other = _ingest(
        ingestor, "RG3_J2KR.dcm", StudyInstanceUID=generate_uid(), BodyPartExamined="FOOT"
    )
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        by_uid = {st.study_instance_uid: st for st in s.scalars(select(Study))}
        [job] = list(s.scalars(select(Job)))
        events = [e.message for e in s.scalars(select(Event).where(Event.level == "warning"))]
    assert by_uid[chest].status == "queued"
    assert by_uid[chest].rule_name == "chest" and by_uid[chest].rule_version == 1
    assert job.pipeline == "chest" and job.rule_name == "chest" and job.rule_version == 1
    assert job.priority_class == "urgent" and job.priority == broker_number("urgent")
    assert job.notify == ["ward"]
    # "sender": the study came by _ingest without an address, so only the named destination.
    assert job.destinations == ["dicom://PACS@h:104"]
    assert any("'sender' left out" in m for m in events)
    assert by_uid[other].status == "skipped"
    assert by_uid[other].reason == "feet are not read here"
    assert by_uid[other].rule_name == "skip-feet-from-MOD"


def test_fallback_and_incoming_priority(tmp_path: Path, database_url: str, broker_url: str) -> None:
    """No rule matches: the fallback rule (default pipeline, default destinations); the job's
    class is the study's incoming priority when no rule sets one."""
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    with db.session() as s:
        s.add(Rule(name="mr-only", when=['tags.Modality == "MR"'], action="discard"))
    uid = _ingest(ingestor, "RG1_J2KR.dcm")
    with db.session() as s:
        s.execute(update(Study).values(incoming_priority="stat"))
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        [job] = list(s.scalars(select(Job)))
    assert st is not None and st.status == "queued"
    assert st.rule_name == "fallback" and st.rule_version == 1
    assert job.pipeline == "chest" and job.destinations == ["file:///tmp/out"]
    assert job.priority_class == "stat" and job.priority == 0


def test_continue_makes_one_job_per_pipeline(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    with db.session() as s:
        s.add(Rule(name="a", position=1, when=[], pipeline="chest", continue_=True))
        s.add(Rule(name="b", position=2, when=[], pipeline="multi-anatomy", continue_=True))
        s.add(Rule(name="c", position=3, when=[], pipeline="chest", priority="stat"))
        s.add(Rule(name="never", position=4, when=[], pipeline="other"))
    _ingest(ingestor, "RG1_J2KR.dcm")
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        jobs = {j.pipeline: j for j in s.scalars(select(Job))}
    assert set(jobs) == {"chest", "multi-anatomy"}
    assert jobs["chest"].rule_name == "a" and jobs["chest"].priority_class == "stat"
    assert jobs["multi-anatomy"].rule_name == "b"


def test_corrupted_rule_row_is_skipped_and_shows_its_error(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    """A rule row written by hand with CEL that does not compile does not stop routing: the
    study is routed by the next rule, the study has a warning event, the rule shows its error."""
    db, ingestor, loop = _setup(tmp_path, database_url, broker_url)
    with db.session() as s:
        s.add(Rule(name="broken", position=1, when=["tags.Modality =="], pipeline="x"))
        s.add(Rule(name="typo", position=2, when=["modality == 'CR'"], pipeline="y"))
        s.add(Rule(name="mapping", position=2, when={"modality": ["CR"]}, action="skip"))
        s.add(Rule(name="good", position=3, when=['tags.Modality == "CR"'], pipeline="chest"))
    uid = _ingest(ingestor, "RG1_J2KR.dcm")
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert st is not None
        [job] = list(s.scalars(select(Job)))
        rules = {r.name: r for r in s.scalars(select(Rule))}
        warnings = [
            e.message
            for e in s.scalars(select(Event).where(Event.study_id == st.id))
            if e.level == "warning"
        ]
    assert st.status == "queued" and st.rule_name == "good"
    assert job.pipeline == "chest"
    assert "does not compile" in (rules["broken"].error or "")
    assert "unknown variable 'modality'" in (rules["typo"].error or "")
    assert "when" in (rules["mapping"].error or "") and "action" in (rules["mapping"].error or "")
    assert rules["good"].error is None
    assert any("'broken' v1 skipped" in w for w in warnings)
    assert any("'typo' v1 skipped" in w for w in warnings)


def test_broker_down_keeps_job_pending_until_it_returns(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    db, ingestor, loop = _setup(tmp_path, database_url, dead)
    _ingest(ingestor, "RG3_J2KR.dcm")
    _age_studies(db)
    loop.run_once()
    with db.session() as s:
        [job] = list(s.scalars(select(Job)))
    assert job.status == "pending"
    # The broker comes back (here: the agent is pointed at a live one); the job is sent.
    _, _, live_loop = _setup(tmp_path, database_url, broker_url)
    live_loop.run_once()
    with db.session() as s:
        [job] = list(s.scalars(select(Job)))
    assert job.status == "queued"
    assert len(_queued_messages(broker_url)) == 1


def test_parse_rejects_garbage() -> None:
    import pytest

    from pacs_agent.dicom_facts import RejectedDataset

    for data in (b"", b"GIF89a not dicom", b"\x00" * 128 + b"DICM" + b"\x02\x00"):
        with pytest.raises(RejectedDataset) as exc:
            parse_part10(data)
        assert exc.value.status == 0xC210
    assert dcmread(sample_path("RG3_J2KR.dcm")).Modality


def _loop(tmp: Path, database_url: str, broker_url: str, **kw: object) -> AgentLoop:
    settings = Settings(data_dir=tmp, database_url=database_url, broker_url=broker_url)
    return AgentLoop(
        Database(database_url),
        make_celery(settings),
        quiet_period_s=3600,
        default_destinations=[],
        store=InstanceStore(tmp / "store"),
        **kw,
    )  # type: ignore[arg-type]


def _status(db: Database, uid: str) -> str:
    with db.session() as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert st is not None
        return st.status


def test_expected_count_and_required_series_complete_without_waiting(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    db, ingestor, _ = _setup(tmp_path, database_url, broker_url)
    loop = _loop(tmp_path, database_url, broker_url)  # quiet period: an hour
    with db.session() as s:
        s.add(
            Rule(
                name="two-views",
                position=1,
                when=['tags.Modality == "CR"'],
                completion={"expected_instances": 2},
            )
        )
        s.add(
            Rule(
                name="needs-lateral",
                position=2,
                when=['tags.Modality in ["DX", "OT"]'],
                completion={"required_series": ["LAT"]},
            )
        )
    uid = _ingest(ingestor, "RG1_J2KR.dcm")
    loop.run_once()
    assert _status(db, uid) == "receiving"
    _ingest(ingestor, "RG3_J2KR.dcm", StudyInstanceUID=uid, Modality="CR")
    loop.run_once()
    assert _status(db, uid) == "queued"  # second instance: expected count reached at once

    other = _ingest(
        ingestor,
        "RG3_J2KR.dcm",
        StudyInstanceUID=generate_uid(),
        Modality="DX",
        SeriesDescription="PA",
    )
    loop.run_once()
    assert _status(db, other) == "receiving"
    _ingest(
        ingestor,
        "RG1_J2KR.dcm",
        StudyInstanceUID=other,
        Modality="DX",
        SeriesInstanceUID=generate_uid(),
        SOPInstanceUID=generate_uid(),
        SeriesDescription="LAT",
    )
    loop.run_once()
    assert _status(db, other) == "queued"


def test_images_in_acquisition_completes(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    db, ingestor, _ = _setup(tmp_path, database_url, broker_url)
    loop = _loop(tmp_path, database_url, broker_url)
    with db.session() as s:
        s.add(Rule(name="iia", when=[], completion={"images_in_acquisition": True}))
    uid = _ingest(ingestor, "RG1_J2KR.dcm", ImagesInAcquisition="2", AcquisitionNumber="1")
    loop.run_once()
    assert _status(db, uid) == "receiving"
    _ingest(
        ingestor,
        "RG3_J2KR.dcm",
        StudyInstanceUID=uid,
        ImagesInAcquisition="2",
        AcquisitionNumber="1",
        SeriesInstanceUID=dcmread(
            sample_path("RG1_J2KR.dcm"), stop_before_pixels=True
        ).SeriesInstanceUID,
    )
    loop.run_once()
    assert _status(db, uid) == "queued"


def test_quiet_period_per_calling_ae(tmp_path: Path, database_url: str, broker_url: str) -> None:
    db, ingestor, _ = _setup(tmp_path, database_url, broker_url)
    fast = _loop(tmp_path, database_url, broker_url, quiet_period_by_ae={"MOD": 0.0})
    uid = _ingest(ingestor, "RG3_J2KR.dcm")  # sent by calling AE "MOD"
    fast.run_once()
    assert _status(db, uid) == "queued"


def test_complete_on_association_release(
    tmp_path: Path, database_url: str, broker_url: str
) -> None:
    """A sender that sends whole studies per association: complete as soon as it releases."""
    import time

    from pacs_agent.receiving.dimse import start_scp
    from tests.conftest import storescu

    db, ingestor, _ = _setup(tmp_path, database_url, broker_url)
    loop = _loop(tmp_path, database_url, broker_url, complete_on_release_aes=["WHOLESTUDY"])
    settings = Settings(data_dir=tmp_path, dicom_port=free_port(), dicom_host="127.0.0.1")
    server = start_scp(settings, ingestor, on_release=loop.completion.association_released)
    try:
        res = storescu(settings.dicom_port, sample_path("RG3_J2KR.dcm"), aet="WHOLESTUDY")
        assert res.returncode == 0, res.stderr
        uid = str(dcmread(sample_path("RG3_J2KR.dcm"), stop_before_pixels=True).StudyInstanceUID)
        end = time.monotonic() + 10
        while _status(db, uid) != "queued":
            assert time.monotonic() < end, "not completed on release"
            time.sleep(0.1)
        # Another sender's study waits for its quiet period.
        other = storescu(settings.dicom_port, sample_path("RG1_J2KR.dcm"), aet="OTHERMOD")
        assert other.returncode == 0
        time.sleep(1)
        uid2 = str(dcmread(sample_path("RG1_J2KR.dcm"), stop_before_pixels=True).StudyInstanceUID)
        assert _status(db, uid2) == "receiving"
    finally:
        server.shutdown()


def test_migrations_match_models(database_url: str) -> None:
    """The Alembic history produces exactly the schema the models describe."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from pacs_agent.db.models import Base

    eng = create_engine(database_url)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    eng.dispose()
    assert diff == []
