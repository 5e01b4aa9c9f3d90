"""The webhook door loses nothing: a pull request is persisted before the 202, survives a killed
agent, retries with backoff while Orthanc is down, ends ``failed`` with its reason (and an
operator's retry pulls it once Orthanc is back), and a webhook that never came is made up for by
the agent reading Orthanc's /changes feed.

Real parts only: a real Orthanc (tests/support/orthanc.py), the agent as a process
(tests/conftest.AgentEnv), PostgreSQL and Redis. No worker: "processed" here means pulled and
completed (routed into a job); the analysis itself is covered by test_e2e.py. PostgreSQL only
(several agents sharing one database is the case the claims guard); the webhook's HTTP contract
runs on SQLite and PostgreSQL in test_http.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine

from pacs_agent import users
from pacs_agent.db.models import AgentFlag, PullRequestRow, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.pull import CHANGES_FLAG
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.conftest import (
    AgentEnv,
    _create_pg_database,
    _drop_pg_database,
    free_port,
    sample_path,
)
from tests.support import wait_until
from tests.support.orthanc import OrthancServer, orthanc_available, start_orthanc

pytestmark = pytest.mark.skipif(
    orthanc_available() is not None, reason=f"real Orthanc unavailable: {orthanc_available()}"
)

SECRET = "pull-durability-webhook-secret"
COMPLETED = {"complete", "queued", "processing", "delivering", "done", "skipped"}


@pytest.fixture
def db_url(postgres_server: str) -> Iterator[str]:
    from pacs_agent.db.migrate import upgrade

    name, url = _create_pg_database(postgres_server)
    try:
        upgrade(url)
        yield url
    finally:
        _drop_pg_database(postgres_server, name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def agent(tmp_path: Path, db_url: str, broker_url: str, demo_bundle: Path) -> Iterator[AgentEnv]:
    env = AgentEnv(tmp_path, db_url, broker_url, demo_bundle, destinations="")
    env.env.update(
        PACS_AGENT_WEBHOOK_SECRET=SECRET,
        PACS_AGENT_PULL_BACKOFF_S="0.2",
        PACS_AGENT_PULL_BACKOFF_MAX_S="0.5",
        PACS_AGENT_PULL_LEASE_S="3",
        PACS_AGENT_PULL_POLL_S="0.2",
        PACS_AGENT_PULL_CHANGES="false",
    )
    yield env
    env.stop()


def _orthanc(tmp_path: Path, **kw: Any) -> tuple[OrthancServer, dict[str, Any]]:
    """Orthanc with the pacs-agent plugin's webhook disabled: each test sends (or withholds)
    the webhook itself."""
    args: dict[str, Any] = dict(
        workdir=tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        webhook_url=None,
        stable_age=1,
        **kw,
    )
    return start_orthanc(**args), args


def _radiograph(tmp_path: Path) -> tuple[bytes, str]:
    """RG3 (CR, JPEG 2000 lossless) with fresh UIDs: a study no other test holds."""
    ds = pydicom.dcmread(sample_path("RG3_J2KR.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "rg3.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes(), str(ds.StudyInstanceUID)


def _webhook(agent: AgentEnv, orthanc_id: str, study_uid: str) -> httpx.Response:
    """The signed call the Orthanc plugin makes (same contract, same secret)."""
    body = json.dumps(
        {"event": "StableStudy", "orthanc_study_id": orthanc_id, "study_instance_uid": study_uid}
    ).encode()
    ts = int(time.time())
    return httpx.post(
        f"{agent.url}/webhook/orthanc",
        content=body,
        headers={
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(SECRET, ts, body),
            "content-type": "application/json",
        },
        timeout=10,
    )


def _pull_rows(engine: Engine, orthanc_id: str) -> list[PullRequestRow]:
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        return list(
            s.scalars(
                select(PullRequestRow)
                .where(PullRequestRow.orthanc_study_id == orthanc_id)
                .order_by(PullRequestRow.id)
            )
        )


def test_a_killed_agent_pulls_after_restart(
    tmp_path: Path, agent: AgentEnv, engine: Engine
) -> None:
    data, study_uid = _radiograph(tmp_path)
    pacs, _ = _orthanc(tmp_path)
    try:
        orthanc_id = pacs.upload(data)["ParentStudy"]
        # The first agent cannot reach Orthanc (nothing listens on its port), so it cannot
        # have pulled before the kill whatever the timing: only the persisted row can carry the
        # request over the restart.
        agent.env["PACS_AGENT_ORTHANC_URL"] = f"http://127.0.0.1:{free_port()}"
        first = agent.start_agent()
        r = _webhook(agent, orthanc_id, study_uid)
        first.popen.kill()  # kill -9 right after the 202
        first.popen.wait(timeout=10)
        assert r.status_code == 202, r.text
        [row] = _pull_rows(engine, orthanc_id)
        assert row.id == r.json()["pull_id"] and row.status in {"pending", "running"}

        agent.env["PACS_AGENT_ORTHANC_URL"] = pacs.url
        agent.start_agent()
        st = agent.wait_study(study_uid, COMPLETED, timeout=90)
        assert st["instances"] == 1 and st["source"] == "orthanc"
        [row] = _pull_rows(engine, orthanc_id)
        assert row.status == "done" and row.last_error is None
        assert st["pull"]["id"] == row.id and st["pull"]["status"] == "done"
        events = [e["kind"] for e in agent.study(study_uid)["events"]]  # type: ignore[index]
        assert "study.pulled" in events
    finally:
        pacs.stop()


def test_orthanc_down_fails_with_reason_and_operator_retry_pulls(
    tmp_path: Path, agent: AgentEnv, engine: Engine, db_url: str
) -> None:
    data, study_uid = _radiograph(tmp_path)
    pacs, args = _orthanc(tmp_path)
    orthanc_id = pacs.upload(data)["ParentStudy"]
    pacs.stop()  # Orthanc is down while the agent pulls
    agent.env.update(PACS_AGENT_ORTHANC_URL=pacs.url, PACS_AGENT_PULL_ATTEMPTS="3")
    agent.start_agent()
    r = _webhook(agent, orthanc_id, study_uid)
    assert r.status_code == 202, r.text
    pull_id = r.json()["pull_id"]

    def failed() -> dict[str, Any] | None:
        got = httpx.get(f"{agent.url}/api/pulls?status=failed", headers=agent.auth(), timeout=10)
        return next((p for p in got.json() if p["id"] == pull_id), None)

    row = wait_until(failed, 60, 0.3, "the pull did not end failed within 60 s")
    assert row is not None
    assert row["attempts"] == 3 and row["study_instance_uid"] == study_uid
    assert row["reason"].startswith("ConnectionError") and orthanc_id in row["reason"]
    assert "gave up after 3 attempt(s)" in row["reason"]
    assert row["study_url"] is None  # no instance arrived: the pull itself is what shows it
    ds = pydicom.dcmread(sample_path("RG3_J2KR.dcm"), stop_before_pixels=True)
    assert str(ds.PatientName) not in json.dumps(row) and str(ds.PatientID) not in row["reason"]
    [stored] = _pull_rows(engine, orthanc_id)
    assert stored.status == "failed" and stored.finished_at is not None

    pacs = start_orthanc(**args)  # Orthanc is back, with the same storage
    try:
        db = Database(db_url)
        try:
            with db.session() as s:
                users.create_user(s, "op", "operator", None, actor="test")
                token = users.issue_token(s, "op", actor="test").token
        finally:
            db.dispose()
        retried = httpx.post(
            f"{agent.url}/api/pulls/{pull_id}/retry",
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert retried.status_code == 200, retried.text
        st = agent.wait_study(study_uid, COMPLETED, timeout=90)
        assert st["instances"] == 1
        [stored] = _pull_rows(engine, orthanc_id)
        assert stored.status == "done" and stored.attempts == 1
    finally:
        pacs.stop()


def test_a_lost_webhook_is_pulled_from_the_changes_feed(
    tmp_path: Path, agent: AgentEnv, engine: Engine
) -> None:
    from sqlalchemy.orm import Session

    pacs, _ = _orthanc(tmp_path)
    try:
        # Backstop on by default once the Orthanc URL is configured.
        del agent.env["PACS_AGENT_PULL_CHANGES"]
        agent.env.update(PACS_AGENT_ORTHANC_URL=pacs.url, PACS_AGENT_PULL_CHANGES_EVERY_S="0.5")
        agent.start_agent()

        def cursor() -> AgentFlag | None:
            with Session(engine) as s:
                return s.get(AgentFlag, CHANGES_FLAG)

        wait_until(cursor, 30, 0.2, "the agent did not start reading Orthanc's /changes")
        data, study_uid = _radiograph(tmp_path)
        orthanc_id = pacs.upload(data)["ParentStudy"]  # no webhook is ever sent for it
        st = agent.wait_study(study_uid, COMPLETED, timeout=90)
        assert st["instances"] == 1
        [row] = _pull_rows(engine, orthanc_id)
        assert row.status == "done" and row.study_instance_uid == study_uid
        with Session(engine) as s:
            source = s.scalar(select(Study.source).where(Study.study_instance_uid == study_uid))
            assert source == "orthanc"
        flag = cursor()
        assert flag is not None and flag.value["seq"] > 0
    finally:
        pacs.stop()
