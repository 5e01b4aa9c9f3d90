"""Cleaning: jobs whose worker is gone are taken back.

A running job carries its lease (``Job.started_at``, and ``Job.heartbeat_at`` refreshed by the
worker that holds it). A job past its lease lost its worker: it goes back to ``pending`` and is
sent again; the claim's guarded UPDATE keeps two workers from running it at once.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pacs_agent.db.models import Job, JobStatus, utcnow
from pacs_agent.db.session import Database, record_event


def requeue_stale_jobs(db: Database, stale_after: dt.timedelta) -> int:
    """A job running far longer than the task time limit lost its worker: send it again."""
    cutoff = utcnow() - stale_after
    with db.session() as s:
        stale = list(
            s.scalars(
                select(Job).where(Job.status == JobStatus.RUNNING.value, Job.started_at < cutoff)
            )
        )
        for job in stale:
            job.status = JobStatus.PENDING.value
            record_event(
                s,
                "job.stale",
                "running past the time limit: sent again",
                study_id=job.study_id,
                job_id=job.id,
                level="warning",
            )
    return len(stale)
