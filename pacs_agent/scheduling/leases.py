"""Job leases: a running job belongs to the worker that claimed it while its heartbeat is fresh.

- **Claim**: the worker sets ``Job.worker`` (its name), ``attempts + 1``, ``started_at`` and
  ``heartbeat_at``. The pair (worker, attempts) is the claim's token.
- **Heartbeat**: while it holds jobs, a thread in the worker refreshes ``heartbeat_at`` of its
  running jobs every ``job_heartbeat_s``, each with a guarded UPDATE on its token.
- **Lost**: a running job whose heartbeat is older than ``job_heartbeat_timeout_s`` lost its
  worker (killed, or paused past the timeout); so did one running longer than the lease (the
  task time limit: a hung worker whose heartbeat thread still beats). It is claimable again and
  the agent's loop (``pacs_agent.cleaning.recovery``) puts it back to ``pending``.
- **Fence**: every write of a job's outcome (result rows, status, deliveries) first refreshes
  the heartbeat with a guarded UPDATE on the token and a running status, in the same
  transaction; a worker whose token no longer matches discards its work instead of writing.

No torch here: the agent imports this module.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from pacs_agent.db.models import Job, JobStatus, Study, StudyStatus, WorkerBeat, utcnow
from pacs_agent.db.session import record_event


@dataclass(frozen=True)
class Token:
    """A claim: the worker that holds the job and the attempt it holds it for."""

    job_id: int
    worker: str
    attempt: int


def lost_filter(
    now: dt.datetime, heartbeat_timeout: dt.timedelta, lease: dt.timedelta
) -> ColumnElement[bool]:
    """Running jobs whose worker is gone: heartbeat stale, or running past the lease (backstop).
    A job without a heartbeat (claimed by a worker that does not beat) has only the backstop."""
    return and_(
        Job.status == JobStatus.RUNNING.value,
        or_(Job.heartbeat_at < now - heartbeat_timeout, Job.started_at < now - lease),
    )


def held_by(token: Token) -> ColumnElement[bool]:
    return and_(
        Job.id == token.job_id,
        Job.worker == token.worker,
        Job.attempts == token.attempt,
        Job.status == JobStatus.RUNNING.value,
    )


def fence(s: Session, token: Token) -> bool:
    """Refresh the claim's heartbeat if the job is still this claim's; True when it is.

    A guarded UPDATE: it locks the job's row until the transaction ends (PostgreSQL row lock,
    SQLite write lock), so nobody can take the job between this check and the caller's writes."""
    n = s.execute(  # type: ignore[attr-defined]
        update(Job)
        .where(held_by(token))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(n == 1)


def worker_alive(s: Session, job: Job, timeout_s: float, now: dt.datetime | None = None) -> bool:
    """A running job's worker is alive: the job's heartbeat is fresh and the worker's own row in
    ``workers`` was seen within the timeout."""
    now = now or utcnow()
    limit = now - dt.timedelta(seconds=timeout_s)
    beat = job.heartbeat_at
    if job.worker is None or beat is None or beat < limit:
        return False
    seen = s.scalar(select(WorkerBeat.last_seen_at).where(WorkerBeat.name == job.worker))
    return seen is not None and seen >= limit


def lease_view(s: Session, job: Job, timeout_s: float) -> dict[str, Any]:
    """What an operator sees of a job's lease: worker, last heartbeat, whether it is alive
    (None unless the job is running)."""
    running = job.status == JobStatus.RUNNING.value
    return {
        "worker": job.worker,
        "heartbeat_at": job.heartbeat_at,
        "worker_alive": worker_alive(s, job, timeout_s) if running else None,
    }


def take_back(s: Session, job: Job, kind: str, message: str, level: str = "warning") -> None:
    """Put a running job back to ``pending`` (the agent dispatches it again) with an event; its
    study, shown ``processing``, is ``queued`` again unless another job of it still runs."""
    job.status = JobStatus.PENDING.value
    job.error = None
    study = s.get(Study, job.study_id)
    if study is not None and study.status == StudyStatus.PROCESSING.value:
        others = s.scalar(
            select(Job.id).where(
                Job.study_id == study.id,
                Job.id != job.id,
                Job.study_version == study.version,
                Job.status == JobStatus.RUNNING.value,
            )
        )
        if others is None:
            study.status = StudyStatus.QUEUED.value
    record_event(s, kind, message, study_id=job.study_id, job_id=job.id, level=level)


def mark_processing(s: Session, job: Job) -> None:
    """A claimed job of the study's current version: the study shows ``processing``."""
    s.execute(
        update(Study)
        .where(
            Study.id == job.study_id,
            Study.version == job.study_version,
            Study.status.in_((StudyStatus.QUEUED.value, StudyStatus.COMPLETE.value)),
        )
        .values(status=StudyStatus.PROCESSING.value)
        .execution_options(synchronize_session=False)
    )
