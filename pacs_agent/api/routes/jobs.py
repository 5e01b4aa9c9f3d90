"""``/api/jobs``: operator actions on jobs (retry)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from sqlalchemy import select, update

from pacs_agent.api.deps import DbSession, Operator
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Result
from pacs_agent.db.session import record_event

router = APIRouter(tags=["jobs"])


@router.post(
    "/api/jobs/{job_id}/retry",
    responses={404: {"description": "unknown job"}, 409: {"description": "job still active"}},
)
def retry_job(job_id: int, s: DbSession, who: Operator) -> dict[str, Any]:
    job = s.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="unknown job")
    if job.status not in (JobStatus.FAILED.value, JobStatus.DONE.value):
        raise HTTPException(status_code=409, detail=f"job is {job.status}")
    job.status = JobStatus.PENDING.value
    job.error = None
    # Failed deliveries get a fresh set of attempts.
    s.execute(
        update(Delivery)
        .where(
            Delivery.result_id.in_(select(Result.id).where(Result.job_id == job.id)),
            Delivery.status == DeliveryStatus.FAILED.value,
        )
        .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=None)
    )
    record_event(
        s, "job.retry", f"retry requested by {who.name}", study_id=job.study_id, job_id=job.id
    )
    record_audit(s, who.name, "job.retry", target_type="job", target=str(job.id))
    return {"job_id": job_id, "status": "pending"}
