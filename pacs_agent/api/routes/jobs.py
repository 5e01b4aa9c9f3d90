"""``/api/jobs``: operator actions on jobs (retry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Result
from pacs_agent.db.session import record_event

router = APIRouter(tags=["jobs"])

AUTH = AUTH_RESPONSES


class RetryOut(BaseModel):
    job_id: int
    status: str


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


@router.post(
    "/api/jobs/{job_id}/retry",
    response_model=RetryOut,
    responses={
        **AUTH,
        404: {"description": "unknown job"},
        409: {"description": "job still active"},
    },
)
def retry_job(
    job_id: Annotated[int, Path(ge=1, le=2**31 - 1)], s: DbSession, who: Operator
) -> RetryOut:
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="unknown job")
    if job.status not in (JobStatus.FAILED.value, JobStatus.DONE.value):
        raise HTTPException(status_code=409, detail=f"job is {job.status}")
    before = {"status": job.status}
    job.status = JobStatus.PENDING.value
    job.error = None
    reset_failed_deliveries(s, job.id)
    record_event(
        s, "job.retry", f"retry requested by {who.name}", study_id=job.study_id, job_id=job.id
    )
    record_audit(
        s,
        who.name,
        "job.retry",
        target_type="job",
        target=str(job.id),
        before=before,
        after={"status": job.status},
    )
    return RetryOut(job_id=job_id, status=JobStatus.PENDING.value)
