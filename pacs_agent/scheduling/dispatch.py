"""Scheduling, second step: hand pending jobs to the broker, most urgent first.

A job is ``pending`` in the database from the transaction that completed its study; it becomes
``queued`` (committed) before its wake-up message is sent, so a worker that gets the message at
once finds it claimable. A broker that cannot take the message (Redis down) leaves the job
``pending`` for a later pass: nothing is lost.
"""

from __future__ import annotations

import logging
import time

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_agent.db.models import AgentFlag, Job, JobStatus, utcnow
from pacs_agent.db.session import Database, record_event
from pacs_agent.queue import enqueue_job
from pacs_agent.scheduling.claims import offpeak_open

log = logging.getLogger(__name__)

SUSPEND_FLAG = "processing_suspended"


def processing_suspended(s: Session) -> bool:
    """Whether an operator suspended processing (nothing is sent to the workers meanwhile)."""
    flag = s.get(AgentFlag, SUSPEND_FLAG)
    return flag is not None and flag.value in (True, "true", 1)


class BrokerGate:
    """After the broker refused a message, the agent's passes leave it alone for a few seconds
    instead of failing once per job."""

    def __init__(self, pause_s: float = 5.0) -> None:
        self.pause_s = pause_s
        self._down_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() >= self._down_until

    def refused(self) -> None:
        self._down_until = time.monotonic() + self.pause_s


class JobDispatcher:
    def __init__(
        self, db: Database, celery: Celery, gate: BrokerGate, *, offpeak_window: str | None = None
    ) -> None:
        self.db = db
        self.celery = celery
        self.gate = gate
        # Offpeak jobs stay pending outside this window (None: no window, always sent).
        self.offpeak_window = offpeak_window

    def dispatch_pending(self) -> int:
        """Send pending jobs to the broker, most urgent first (broker number 0 first). Nothing
        is sent while processing is suspended (agent flag ``processing_suspended``); offpeak
        jobs wait for the offpeak window."""
        if not self.gate.open:
            return 0
        with self.db.session() as s:
            if processing_suspended(s):
                return 0
            query = select(Job.id, Job.priority, Job.pipeline).where(
                Job.status == JobStatus.PENDING.value
            )
            if self.offpeak_window and not offpeak_open(self.offpeak_window):
                query = query.where(Job.priority_class != "offpeak")
            pending = s.execute(query.order_by(Job.priority, Job.id)).all()
        sent = 0
        for job_id, priority, pipeline in pending:
            with self.db.session() as s:
                marked = s.execute(  # type: ignore[attr-defined]
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.PENDING.value)
                    .values(status=JobStatus.QUEUED.value, enqueued_at=utcnow())
                ).rowcount
            if marked != 1:
                continue  # another agent sent it
            try:
                task_id = enqueue_job(self.celery, job_id, priority, pipeline=pipeline)
            except Exception as exc:
                log.warning("broker unreachable, job %s stays pending: %s", job_id, exc)
                with self.db.session() as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                        .values(status=JobStatus.PENDING.value, enqueued_at=None)
                    )
                self.gate.refused()
                break
            with self.db.session() as s:
                record_event(s, "job.queued", f"sent to broker as task {task_id}", job_id=job_id)
            sent += 1
        return sent
