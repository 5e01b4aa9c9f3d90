"""Several hosts: two agents (`pacs-agent serve`, one DICOM port each, each with its own data
folder) and two workers (`pacs-agent worker`, each in its own working directory and data folder,
with no path to any agent's folder) on one PostgreSQL and one Redis process a backlog together.

A study whose instances are split between the two agents makes one job; each worker fetches each
instance from the agent that stored it (``instances.stored_by``) over HTTP. The destination is a
real Orthanc that requires a password, configured in PACS_AGENT_DESTINATIONS on every host: the
job rows hold a masked reference and the workers resolve the password when they deliver.

Judged from the database and Orthanc: every study completed once (one ``study.complete`` event
per version), one job per study, no two attempts of a job overlapping, every output SOP Instance
UID once in Orthanc, no password in any job row, event or API answer. PostgreSQL only (several
processes writing at once is what this is about).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_agent.db.models import Event, Instance, Job, Result, Study
from pacs_agent.db.session import Database
from tests.conftest import (
    REPO,
    AgentEnv,
    _create_pg_database,
    _drop_pg_database,
    kill_group,
    storescu,
)
from tests.support import free_port
from tests.support.images import reduced_radiograph
from tests.support.orthanc import OrthancServer, start_orthanc

pytestmark = pytest.mark.e2e

PACS_PW = "multihost-Orthanc-pw-8d41"
TERMINAL = {"job.done", "job.failed", "job.delivering", "job.skipped"}


class WorkerProc:
    """`pacs-agent worker` in a working directory of its own (not the repository)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        workdir.mkdir(parents=True)
        self.log_path = workdir / "worker.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pacs_agent.cli", "worker"],
            env={**env, "PYTHONPATH": str(REPO)},
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() ends its decode pool processes with it
        )
        self._terminated = False

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal_stop(self) -> None:
        """SIGTERM (once) without waiting; `stop` waits."""
        if self.popen.poll() is None and not self._terminated:
            self.popen.terminate()
            self._terminated = True

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal_stop()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        if not self._log.closed:
            kill_group(self.popen.pid)
        self._log.close()


@pytest.fixture
def pg_url(postgres_server: str, _pg_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database, a copy of the session's migrated template."""
    name, url = _create_pg_database(postgres_server, template=_pg_template)
    try:
        yield url
    finally:
        _drop_pg_database(postgres_server, name)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    server = start_orthanc(
        tmp_path / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        webhook_url=None,
        extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"alice": PACS_PW}},
        auth=("alice", PACS_PW),
    )
    yield server
    server.stop()


def _new_instance(tmp: Path, study_uid: str) -> Path:
    """A new instance of ``study_uid``: NEMA RG3 reduced to 440 x 440, JPEG 2000 lossless (what
    is shown here is who fetches and delivers what, not the size of the image)."""
    sop = str(generate_uid())
    return reduced_radiograph(tmp / f"{sop}.dcm", study_uid, sop_uid=sop)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def test_two_agents_two_workers_share_a_backlog(
    tmp_path: Path,
    pg_url: str,
    broker_url: str,
    demo_bundle: Path,
    pacs: OrthancServer,
) -> None:
    dest = f"orthanc+http://alice:{PACS_PW}@127.0.0.1:{pacs.http_port}"
    for host in ("a", "b"):
        (tmp_path / f"host-{host}").mkdir()
    agents = [
        AgentEnv(tmp_path / f"host-{host}", pg_url, broker_url, demo_bundle, destinations=dest)
        for host in ("a", "b")
    ]
    token = agents[0].env["PACS_AGENT_API_TOKEN"]
    for a in agents:
        a.env["PACS_AGENT_API_TOKEN"] = token  # one service token for the deployment
        a.env["PACS_AGENT_AGENT_URL"] = a.url  # what this agent records as stored_by
    workers: list[WorkerProc] = []
    db = Database(pg_url)
    try:
        for a in agents:
            a.start_agent()
        for n in range(2):
            env = {
                **agents[0].env,  # broker, database, bundle, destinations, token
                "PACS_AGENT_DATA_DIR": str(tmp_path / f"worker-{n}" / "data"),
                "PACS_AGENT_AGENT_URL": agents[0].url,  # the fallback only
                "PACS_AGENT_WORKER_BATCH_JOBS": "1",  # one job per claim: the two share
            }
            workers.append(WorkerProc(tmp_path / f"worker-{n}", env))
        _wait_for(lambda: _beats(db) >= 2, 120, "both workers' heartbeats", workers)

        # The backlog: study 0 split between the agents, then one study per agent each.
        split_uid = str(generate_uid())
        sent: dict[str, list[tuple[Path, int]]] = {split_uid: []}
        for n in range(len(agents)):
            sent[split_uid].append((_new_instance(tmp_path, split_uid), n))
        for n in (0, 1, 0, 1):
            new_uid = str(generate_uid())
            sent[new_uid] = [(_new_instance(tmp_path, new_uid), n)]
        for files in sent.values():
            for path, n in files:
                res = storescu(agents[n].dicom_port, path)
                assert res.returncode == 0, res.stdout + res.stderr

        def all_settled() -> bool:
            with db.session() as s:
                states = s.scalars(
                    select(Study.status).where(Study.study_instance_uid.in_(sent))
                ).all()
            return len(states) == len(sent) and set(states) <= {"done", "failed", "skipped"}

        _wait_for(all_settled, 420, "every study settled", workers, agents)

        with db.session() as s:
            studies = {st.study_instance_uid: st for st in s.scalars(select(Study))}
            assert {u: studies[u].status for u in sent} == {u: "done" for u in sent}
            # Each instance recorded by the agent that stored it.
            stored_by = dict(s.execute(select(Instance.sop_instance_uid, Instance.stored_by)).all())
            for files in sent.values():
                for path, n in files:
                    assert stored_by[path.stem] == agents[n].url
            # Every study completed once: one study.complete event per (study, version).
            for uid in sent:
                st = studies[uid]
                completes = s.scalars(
                    select(Event).where(Event.study_id == st.id, Event.kind == "study.complete")
                ).all()
                assert len(completes) == st.version == 1, [e.message for e in completes]
            jobs = s.scalars(select(Job)).all()
            assert sorted(j.study_id for j in jobs) == sorted(studies[u].id for u in sent)
            # No job ran twice at once: each attempt's "job.running" comes after the previous
            # attempt ended (a terminal event), and the attempts count the runs.
            runners: set[str] = set()
            for job in jobs:
                evs = s.scalars(
                    select(Event).where(Event.job_id == job.id).order_by(Event.at, Event.id)
                ).all()
                running = [e for e in evs if e.kind == "job.running"]
                assert len(running) == job.attempts >= 1, [e.kind for e in evs]
                for prev, nxt in zip(running, running[1:], strict=False):
                    ends = [
                        e
                        for e in evs
                        if e.kind in TERMINAL and _aware(prev.at) <= _aware(e.at) <= _aware(nxt.at)
                    ]
                    assert ends, f"job {job.id}: attempts overlapped: {[e.kind for e in evs]}"
                runners |= {
                    m.split("worker ", 1)[1].split(" ", 1)[0]
                    for m in (e.message for e in running)
                    if "worker " in m
                }
            assert len(runners) == 2, f"the backlog was not shared: {runners}"
            results = {
                j.study_id: sorted(
                    s.scalars(select(Result.sop_instance_uid).where(Result.job_id == j.id))
                )
                for j in jobs
            }
            rows = json.dumps(
                {
                    "jobs": [[j.destinations, j.error] for j in jobs],
                    "events": [e.message for e in s.scalars(select(Event))],
                }
            )
        # Each output once in Orthanc, and all of them there.
        for uid in sent:
            in_pacs = sorted(
                i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.study_instances(uid)
            )
            made = results[studies[uid].id]
            assert len(made) == 1 + 3 * len(sent[uid]), made  # SR + SEG, SC, PM per image
            assert in_pacs == made
        # The password is in no job row, event or API answer, on either agent.
        assert "alice:***@" in rows
        answers = [rows]
        for a in agents:
            for route in ["/api/studies", *(f"/api/studies/{u}" for u in sent)]:
                r = httpx.get(f"{a.url}{route}", headers=a.auth(), timeout=10)
                assert r.status_code == 200, r.text
                answers.append(r.text)
        for text in answers:
            assert PACS_PW not in text, f"credential leaked in: {text[:300]}"
    finally:
        for w in workers:  # all shut down at once; then wait for each
            w.signal_stop()
        for a in agents:
            for p in a.procs:
                p.signal_stop()
        for w in workers:
            w.stop()
        for a in agents:
            a.stop()
        db.dispose()


def _beats(db: Database) -> int:
    from pacs_agent.db.models import WorkerBeat

    with db.session() as s:
        return len(s.scalars(select(WorkerBeat.id)).all())


def _wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    workers: list[WorkerProc],
    agents: Sequence[AgentEnv] = (),
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        for w in workers:
            if w.popen.poll() is not None:
                pytest.fail(f"a worker exited:\n{w.log_tail()}")
        time.sleep(0.5)
    logs = "\n---\n".join(
        [w.log_tail() for w in workers] + [p.log_tail(30) for a in agents for p in a.procs]
    )
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
