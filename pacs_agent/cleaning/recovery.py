"""Cleaning: jobs whose worker is gone are taken back.

A running job carries its lease (pacs_agent.scheduling.leases): ``Job.heartbeat_at``, refreshed
by the worker that holds it every ``job_heartbeat_s``, and ``Job.started_at``. A job whose
heartbeat is older than ``job_heartbeat_timeout_s`` lost its worker (killed, or paused past the
timeout); one running past the lease (the task time limit) belongs to a hung worker. Either goes
back to ``pending`` and is dispatched again; the claim token (worker, attempt) fences every
write of the old worker, so the job never runs twice at once.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pacs_agent.db.models import Job, utcnow
from pacs_agent.db.session import Database
from pacs_agent.scheduling.leases import lost_filter, take_back


def requeue_stale_jobs(
    db: Database, stale_after: dt.timedelta, heartbeat_timeout: dt.timedelta | None = None
) -> int:
    """Put running jobs whose worker is gone back to ``pending``: heartbeat older than
    ``heartbeat_timeout``, or started longer ago than ``stale_after`` (the backstop)."""
    now = utcnow()
    hb_timeout = heartbeat_timeout or stale_after
    with db.session() as s:
        stmt = select(Job).where(lost_filter(now, hb_timeout, stale_after))
        if db.engine.dialect.name == "postgresql":  # several agents: one takes each job back
            stmt = stmt.with_for_update(skip_locked=True)
        stale = list(s.scalars(stmt))
        for job in stale:
            beat = job.heartbeat_at
            if beat is not None and beat < now - hb_timeout:
                silent = (now - beat).total_seconds()
                take_back(
                    s,
                    job,
                    "job.worker_lost",
                    f"worker {job.worker} silent for {silent:.0f} s "
                    f"(attempt {job.attempts}): sent again",
                )
            else:
                take_back(
                    s,
                    job,
                    "job.stale",
                    f"worker {job.worker} running past the time limit "
                    f"(attempt {job.attempts}): sent again",
                )
    return len(stale)
