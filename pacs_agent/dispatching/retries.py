"""Dispatching: deliveries that wait for another attempt go back to a worker.

The worker that made a job's results sends them (``pacs_agent.dispatching.delivery``); a
destination that failed gets its next attempt after a backoff, and this pass sends the job a
``deliver`` task when one is due, with a lease so the same retry is not sent twice meanwhile.
"""

from __future__ import annotations

import datetime as dt
import logging

from celery import Celery
from sqlalchemy import select, update

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Result, utcnow
from pacs_agent.db.session import Database
from pacs_agent.queue import TASK_DELIVER_JOB, enqueue_job
from pacs_agent.scheduling.dispatch import BrokerGate

log = logging.getLogger(__name__)


class DeliveryRetrier:
    def __init__(
        self, db: Database, celery: Celery, gate: BrokerGate, *, lease_s: float = 300.0
    ) -> None:
        self.db = db
        self.celery = celery
        self.gate = gate
        self.delivery_lease = dt.timedelta(seconds=lease_s)

    def retry_due_deliveries(self) -> int:
        """Send jobs whose deliveries are due for another attempt back to a worker."""
        if not self.gate.open:
            return 0
        now = utcnow()
        with self.db.session() as s:
            due = s.execute(
                select(Job.id, Job.priority, Job.pipeline)
                .join(Result, Result.job_id == Job.id)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(
                    Job.status == JobStatus.DELIVERING.value,
                    Delivery.status == DeliveryStatus.PENDING.value,
                    Delivery.next_attempt_at <= now,
                )
                .distinct()
            ).all()
        due = sorted(due, key=lambda row: (row[1], row[0]))  # most urgent job first
        sent = 0
        for job_id, priority, pipeline in due:
            try:
                enqueue_job(self.celery, job_id, priority, task=TASK_DELIVER_JOB, pipeline=pipeline)
            except Exception as exc:
                log.warning("broker unreachable, delivery retry of job %s waits: %s", job_id, exc)
                self.gate.refused()
                break
            with self.db.session() as s:
                result_ids = select(Result.id).where(Result.job_id == job_id)
                # A lease, so the same retry is not sent again while a worker holds it.
                s.execute(
                    update(Delivery)
                    .where(
                        Delivery.result_id.in_(result_ids),
                        Delivery.status == DeliveryStatus.PENDING.value,
                    )
                    .values(next_attempt_at=now + self.delivery_lease)
                )
            sent += 1
        return sent
