"""``/api/jobs``: a job's state and lease (worker, last heartbeat, worker alive), and the
operator's retry, which also takes back a running job whose worker is gone."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator, Viewer, get_state
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Result
from pacs_agent.db.session import record_event
from pacs_agent.scheduling.leases import lease_view, take_back, worker_alive

router = APIRouter(tags=["jobs"])

AUTH = AUTH_RESPONSES
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


class RetryOut(BaseModel):
    job_id: int
    status: str


class JobOut(BaseModel):
    id: int
    study_id: int
    pipeline: str
    study_version: int
    status: str
    attempts: int
    error: str | None
    priority: str = Field(description="priority class")
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    worker: str | None = Field(description="the worker holding (or that last held) the job")
    heartbeat_at: dt.datetime | None = Field(description="the job's last heartbeat")
    worker_alive: bool | None = Field(
        description="running jobs: heartbeat fresh and the worker's row alive; else null"
    )


def reset_failed_deliveries(s: Session, job_id: int) -> None:
    """Failed deliveries of a job's results get a fresh set of attempts."""
    s.execute(
        update(Delivery)
        .where(
            Delivery.result_id.in_(select(Result.id).where(Result.job_id == job_id)),
            Delivery.status == DeliveryStatus.FAILED.value,
        )
        .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=None)
    )


def _timeout_s(request: Request) -> float:
    return float(get_state(request).settings.job_heartbeat_timeout_s)


@router.get("/api/jobs/{job_id}", response_model=JobOut, responses={**AUTH, 404: {}})
def get_job(job_id: JobId, request: Request, s: DbSession, _who: Viewer) -> JobOut:
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="unknown job")
    return JobOut(
        id=job.id,
        study_id=job.study_id,
        pipeline=job.pipeline,
        study_version=job.study_version,
        status=job.status,
        attempts=job.attempts,
        error=job.error,
        priority=job.priority_class,
        started_at=job.started_at,
        finished_at=job.finished_at,
        **lease_view(s, job, _timeout_s(request)),
    )


@router.post(
    "/api/jobs/{job_id}/retry",
    response_model=RetryOut,
    responses={
        **AUTH,
        404: {"description": "unknown job"},
        409: {"description": "job still active (a running job: its worker is alive)"},
    },
)
def retry_job(job_id: JobId, request: Request, s: DbSession, who: Operator) -> RetryOut:
    """Run a finished job again; take back a running job whose worker is gone (heartbeat stale
    or its worker row not alive). A running job whose worker is alive answers 409."""
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="unknown job")
    before = {"status": job.status}
    if job.status == JobStatus.RUNNING.value:
        timeout = _timeout_s(request)
        beat = job.heartbeat_at
        last = beat.isoformat(timespec="seconds") if beat else "never"
        if worker_alive(s, job, timeout):
            raise HTTPException(
                status_code=409,
                detail=f"job is running on worker {job.worker} (alive, last heartbeat {last})",
            )
        before.update(worker=job.worker or "", heartbeat_at=last, attempt=str(job.attempts))
        take_back(
            s,
            job,
            "job.taken_back",
            f"taken back by {who.name} from worker {job.worker} "
            f"(last heartbeat {last}, attempt {job.attempts}): sent again",
        )
        action = "job.take_back"
    elif job.status in (JobStatus.FAILED.value, JobStatus.DONE.value):
        job.status = JobStatus.PENDING.value
        job.error = None
        reset_failed_deliveries(s, job.id)
        record_event(
            s, "job.retry", f"retry requested by {who.name}", study_id=job.study_id, job_id=job.id
        )
        action = "job.retry"
    else:
        raise HTTPException(status_code=409, detail=f"job is {job.status}")
    record_audit(
        s,
        who.name,
        action,
        target_type="job",
        target=str(job.id),
        before=before,
        after={"status": job.status},
    )
    return RetryOut(job_id=job_id, status=JobStatus.PENDING.value)
