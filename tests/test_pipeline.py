"""Worker pipeline pieces that need no broker: quality control against the bundle's intended use,
triage levels, and job claiming with leases and batching on both databases."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from pacs_agent.db.models import Event, Job, Study
from pacs_agent.db.session import Database
from tests.conftest import sample_path
from workers.models.bundle import TriagePolicy
from workers.pipeline import (
    ClaimedJob,
    _Prepared,
    _quality_control,
    claim_jobs,
    triage_level,
)
from workers.results import Finding, ImageResult


def _result(
    uid: str,
    view: tuple[str, float],
    part: tuple[str, float],
    findings: list[Finding] | None = None,
) -> ImageResult:
    return ImageResult(
        uid,
        findings or [],
        np.zeros((0, 2, 2), bool),
        [],
        np.zeros((2, 2)),
        np.zeros((2, 2)),
        extra={"qc": {"view": view, "body_part": part}},
    )


def test_quality_control_refuses_images_the_bundle_is_not_for() -> None:
    ds = dcmread(sample_path("RG3_J2KR.dcm"), stop_before_pixels=True)
    bundle = SimpleNamespace(intended={"anatomy": "chest", "views": ["PA", "AP"]})
    prep = _Prepared(
        ClaimedJob(1, 1, 1, [], ["a", "b", "c"]),
        sources=[ds, ds, ds],
        images=[("a", None), ("b", None), ("c", None)],
    )
    by_uid = {
        "a": _result("a", ("PA", 0.9), ("CHEST", 0.9)),
        "b": _result("b", ("LATERAL", 0.95), ("CHEST", 0.9)),
        "c": _result("c", ("PA", 0.9), ("EXTREMITY", 0.8)),
    }
    results, sources, refused = _quality_control(bundle, prep, by_uid)
    assert [r.source_sop_instance_uid for r in results] == ["a"] and len(sources) == 1
    assert len(refused) == 2
    assert "LATERAL" in refused[0] and "EXTREMITY" in refused[1]


def test_triage_levels() -> None:
    def f(label: str, p: float) -> Finding:
        return Finding(label, p, 0.5, "1.2")

    def level(label: str, p: float, policy: TriagePolicy | None = None) -> str:
        return triage_level([_result("a", ("PA", 1), ("CHEST", 1), [f(label, p)])], policy)

    # No policy: a present finding is urgent, nothing is critical.
    assert level("Nodule", 0.1) == "routine"
    assert level("Nodule", 0.9) == "urgent"
    assert level("Pneumothorax", 0.7) == "urgent"
    policy = TriagePolicy.from_manifest(
        {"labels": {"pneumothorax": {"urgent": 0.3, "critical": 0.5}}}
    )
    assert level("Pneumothorax", 0.7, policy) == "critical"
    assert level("Pneumothorax", 0.4, policy) == "urgent"
    assert level("Nodule", 0.99, policy) == "routine"  # not in the policy, no default


def test_claims_respect_leases_and_batch_queued_jobs(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        jobs = [
            Job(study_id=study.id, pipeline="chest", study_version=i + 1, status="queued")
            for i in range(4)
        ]
        s.add_all(jobs)
        s.flush()
        ids = [j.id for j in jobs]
    lease = dt.timedelta(seconds=60)
    first = claim_jobs(db, "chest", lease=lease, batch_size=3)
    assert [c.job_id for c in first] == ids[:3]  # the oldest routine job and two of its class
    # Their own messages arrive while the lease holds: they take the last queued job, then none.
    assert [c.job_id for c in claim_jobs(db, "chest", lease=lease, batch_size=3)] == [ids[3]]
    assert claim_jobs(db, "chest", lease=lease, batch_size=3) == []
    # A lease that ran out (the worker died): the next message takes it over.
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == ids[1])
            .values(started_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120))
        )
    again = claim_jobs(db, "chest", lease=lease, batch_size=3)
    assert [c.job_id for c in again] == [ids[1]]
    with db.session() as s:
        attempts = {j.id: j.attempts for j in s.scalars(select(Job))}
        assert s.scalars(select(Event).where(Event.kind == "job.running")).first() is not None
    assert attempts[ids[1]] == 2 and attempts[ids[3]] == 1
    db.dispose()


def test_fetch_waits_for_a_restarting_agent() -> None:
    """A worker fetching while the agent restarts (connection refused for a few seconds) gets the
    instance once the agent is back, instead of failing the job (the chaos bench lost whole
    studies this way); an agent that answers 404 is not waited for."""
    import http.server
    import threading

    from pacs_agent.settings import Settings
    from tests.conftest import free_port
    from workers.pipeline import JobError, fetch_instance_bytes

    port = free_port()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"DICM-bytes" if self.path.endswith("/present") else b""
            self.send_response(200 if body else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers: list[http.server.ThreadingHTTPServer] = []

    def start_late() -> None:  # the agent comes back 2.5 s after the first attempt
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        servers.append(srv)
        srv.serve_forever()

    timer = threading.Timer(2.5, start_late)
    timer.start()
    settings = Settings(agent_url=f"http://127.0.0.1:{port}", agent_fetch_wait_s=60)
    try:
        assert fetch_instance_bytes(settings, "present") == b"DICM-bytes"
        started = time.monotonic()
        with pytest.raises(JobError, match="404"):
            fetch_instance_bytes(settings, "absent")
        assert time.monotonic() - started < 10  # a 404 is final: no waiting out the deadline
    finally:
        timer.cancel()  # not started yet (an early failure): it never will
        while timer.is_alive():  # serve_forever runs in the timer's thread: stop it, then join
            for srv in servers:
                srv.shutdown()
            timer.join(timeout=0.2)
