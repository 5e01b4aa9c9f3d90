"""No patient data in any log or metric (issue 10): real agent and worker processes, PostgreSQL,
Redis, dcmtk's storescu as the modality. Studies carry distinctive patient names, ids, birth
dates and referring physicians (a one-component referring physician's name, which made
highdicom print it at every worker start), plus a file whose bad value (a Patient Birth Date
that is not a date) is distinctive and makes the worker's writers fail inside pydicom. Then
every line of the agent's and the worker's logs, every metric of both, and the reasons and
events an admin reads are searched for each of those values.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_agent.db.models import Event, Job, Study
from pacs_agent.db.session import Database
from tests.conftest import (
    AgentEnv,
    _create_pg_database,
    _drop_pg_database,
    free_port,
    sample_path,
    storescu,
)

pytestmark = pytest.mark.e2e

# Values that must never leave the DICOM files: none of them is a substring of anything else.
PATIENTS = [
    {
        "PatientName": "Zyxwphi^Qorvald",
        "PatientID": "PIDQX7731",
        "PatientBirthDate": "19230817",
        "ReferringPhysicianName": "Drqlinsky",  # one component: highdicom's warning quoted it
    },
    {
        "PatientName": "Vexmarrow^Ulfdis^Jr",
        "PatientID": "PIDKW5502",
        "PatientBirthDate": "19310429",
        "ReferringPhysicianName": "Plothwick^Emberly",
    },
]
BAD = {
    "PatientName": "Quaxtrel^Ynnis",
    "PatientID": "PIDBZ8814",
    "PatientBirthDate": "BADDATE4471",  # not a date: pydicom's texts quote it
    "ReferringPhysicianName": "Grumvelt",
}
SECRETS = sorted(
    {v for p in [*PATIENTS, BAD] for v in p.values()}
    | {part for p in [*PATIENTS, BAD] for v in p.values() for part in v.split("^") if part}
)


def _make(tmp: Path, values: dict[str, str]) -> tuple[Path, str]:
    ds = dcmread(sample_path("RG3_J2KR.dcm"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / f"{ds.SOPInstanceUID}.dcm"  # UIDs only in file names
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


@pytest.fixture
def deployment(
    tmp_path: Path, postgres_server: str, broker_url: str, demo_bundle: Path
) -> Iterator[tuple[AgentEnv, str, int]]:
    from pacs_agent.db.migrate import upgrade

    name, db_url = _create_pg_database(postgres_server)
    upgrade(db_url)
    out = tmp_path / "delivered"
    out.mkdir()
    agent = AgentEnv(tmp_path, db_url, broker_url, demo_bundle, destinations=out.as_uri())
    worker_port = free_port()
    agent.env["PACS_AGENT_WORKER_METRICS_PORT"] = str(worker_port)
    try:
        agent.start_agent()
        agent.start_worker()
        yield agent, db_url, worker_port
    finally:
        agent.stop()
        _drop_pg_database(postgres_server, name)


def _worker_metrics(port: int, deadline: float) -> str:
    while True:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            if r.status_code == 200:
                return r.text
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the worker's metrics port {port} did not answer")
        time.sleep(0.5)


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_no_patient_data_in_logs_metrics_reasons_or_events(
    tmp_path: Path, deployment: tuple[AgentEnv, str, int]
) -> None:
    agent, db_url, worker_port = deployment
    files = [_make(tmp_path, p) for p in PATIENTS]
    bad_file, bad_study = _make(tmp_path, BAD)
    sent = storescu(agent.dicom_port, *[f for f, _ in files], bad_file)
    assert sent.returncode == 0, sent.stderr

    for _, study_uid in files:
        assert agent.wait_study(study_uid, {"done"})["status"] == "done"
    # The bad file was stored (its value is only wrong, not unreadable) and its job failed
    # with a reason; nothing lost, and the service kept serving the others.
    bad = agent.wait_study(bad_study, {"done", "failed", "skipped"})
    assert bad["status"] == "failed", bad
    assert "BADDATE" not in str(bad)

    # Metrics of both processes, with what they counted (real processes, real work).
    agent_metrics = httpx.get(f"{agent.url}/metrics", headers=agent.auth(), timeout=10)
    assert agent_metrics.status_code == 200
    assert httpx.get(f"{agent.url}/metrics", timeout=10).status_code == 401
    agent_text = agent_metrics.text
    assert _value(agent_text, "pacs_agent_instances_received_total", door="dimse") >= 3
    assert _value(agent_text, "pacs_agent_study_completion_seconds_count") >= 3
    worker_text = _worker_metrics(worker_port, time.monotonic() + 30)
    assert _value(worker_text, "pacs_agent_job_stage_seconds_count", stage="encoder") >= 1
    assert _value(worker_text, "pacs_agent_job_stage_seconds_count", stage="writers") >= 2
    assert _value(worker_text, "pacs_agent_deliveries_total", kind="file", outcome="done") >= 2
    assert _value(worker_text, "pacs_agent_jobs_finished_total", outcome="failed") >= 1
    failures = [ln for ln in worker_text.splitlines() if ln.startswith("pacs_agent_failures_total")]
    assert _value(worker_text, "pacs_agent_failures_total") >= 1, failures

    # What an admin reads: study reasons, job errors, events.
    db = Database(db_url)
    try:
        with db.session() as s:
            texts = [e.message for e in s.scalars(select(Event))]
            texts += [j.error or "" for j in s.scalars(select(Job))]
            texts += [st.reason or "" for st in s.scalars(select(Study))]
    finally:
        db.dispose()
    withheld = [t for t in texts if "details withheld" in t]
    assert withheld, "the bad file's failure has no reason"
    print("bad file's reason:", withheld[0], "| failures:", failures)

    agent.stop()  # every line written, files closed
    logs = {p.log_path.name: p.log_path.read_text(errors="replace") for p in agent.procs}
    assert any("worker" in n for n in logs) and any("agent" in n for n in logs)
    # The logs are not empty: they carry the UIDs of what happened.
    assert any(files[0][1] in text for text in logs.values())
    places = {**logs, "agent /metrics": agent_text, "worker /metrics": worker_text}
    places["events, reasons, errors"] = "\n".join(texts)
    leaks = [
        f"{where}: {line.strip()[:200]}"
        for where, text in places.items()
        for line in text.splitlines()
        for secret in SECRETS
        if re.search(re.escape(secret), line, re.IGNORECASE)
    ]
    assert leaks == [], "patient data found:\n" + "\n".join(leaks)
