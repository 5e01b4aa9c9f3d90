"""Study completion and job dispatch: the loop that turns quiet studies into queued jobs.

A study is complete when no instance has arrived for the quiet period. Completion fires once per
study version (a guarded UPDATE), routing writes the jobs in the same transaction, and jobs are
sent to the broker only after that commit. A job the broker cannot take (Redis down) stays
``pending`` in the database and is sent on a later pass: nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from celery import Celery
from sqlalchemy import select, update

from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Rule,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.queue import TASK_DELIVER_JOB, enqueue_job
from pacs_agent.routing import (
    complete_early,
    completion_for,
    decide,
    matching_rule,
    study_facts,
)

log = logging.getLogger(__name__)


class CompletionLoop:
    def __init__(
        self,
        db: Database,
        celery: Celery,
        *,
        quiet_period_s: float,
        default_destinations: list[str],
        poll_s: float = 0.5,
        delivery_lease_s: float = 300.0,
        stale_job_s: float = 1800.0,
        quiet_period_by_ae: dict[str, float] | None = None,
        complete_on_release_aes: list[str] | None = None,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_every_s: float = 300.0,
    ) -> None:
        self.db = db
        self.celery = celery
        self.quiet = dt.timedelta(seconds=quiet_period_s)
        self.quiet_by_ae = dict(quiet_period_by_ae or {})
        self.release_aes = set(complete_on_release_aes or [])
        self.housekeeping = housekeeping
        self.housekeeping_every_s = housekeeping_every_s
        self._next_housekeeping = 0.0
        self.default_destinations = default_destinations
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down_until = 0.0
        self.delivery_lease = dt.timedelta(seconds=delivery_lease_s)
        self.stale_job = dt.timedelta(seconds=stale_job_s)

    # One pass ---------------------------------------------------------------------------------

    def quiet_period_for(self, calling_ae: str | None, rule_quiet: float | None) -> dt.timedelta:
        if rule_quiet is not None:
            return dt.timedelta(seconds=rule_quiet)
        if calling_ae and calling_ae in self.quiet_by_ae:
            return dt.timedelta(seconds=self.quiet_by_ae[calling_ae])
        return self.quiet

    def complete_quiet_studies(self) -> list[int]:
        """Complete every receiving study whose rule's condition or quiet period is met."""
        now = utcnow()
        ready: list[tuple[int, int, str]] = []
        with self.db.session() as s:
            receiving = list(
                s.scalars(select(Study).where(Study.status == StudyStatus.RECEIVING.value))
            )
            rules = list(s.scalars(select(Rule))) if receiving else []
            for study in receiving:
                facts = study_facts(s, study)
                completion = completion_for(matching_rule(rules, facts))
                early = complete_early(completion, facts)
                if early:
                    ready.append((study.id, study.version, early))
                    continue
                quiet = self.quiet_period_for(study.calling_ae, completion.quiet_period_s)
                last = study.last_received_at
                if last.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
                    last = last.replace(tzinfo=dt.UTC)
                if last <= now - quiet:
                    ready.append(
                        (study.id, study.version, f"quiet for {quiet.total_seconds():g} s")
                    )
        return [sid for sid, version, why in ready if self._complete(sid, version, why)]

    def association_released(self, study_uids: set[str], calling_ae: str) -> None:
        """A sender released its association: complete its studies now where configured."""
        for uid in study_uids:
            with self.db.session() as s:
                study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
                if study is None or study.status != StudyStatus.RECEIVING.value:
                    continue
                rule = matching_rule(list(s.scalars(select(Rule))), study_facts(s, study))
                wanted = (
                    calling_ae in self.release_aes or completion_for(rule).on_association_release
                )
                if not wanted:
                    continue
                version = study.version
            self._complete(study.id, version, f"association from {calling_ae} released")

    def _complete(self, study_id: int, version: int, why: str = "") -> bool:
        with self.db.session() as s:
            claimed = s.execute(  # type: ignore[attr-defined]
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.version == version,
                    Study.status == StudyStatus.RECEIVING.value,
                )
                .values(status=StudyStatus.COMPLETE.value, completed_at=utcnow())
            ).rowcount
            if claimed != 1:
                return False  # someone else took it, or a new instance arrived meanwhile
            study = s.get_one(Study, study_id)
            facts = study_facts(s, study)
            rules = list(s.scalars(select(Rule)))
            decision = decide(rules, facts, self.default_destinations)
            record_event(
                s,
                "study.complete",
                f"version {version} complete ({why}): {decision.reason}",
                study_id=study_id,
            )
            if decision.action == "skip":
                study.status = StudyStatus.SKIPPED.value
                study.reason = decision.reason
                record_event(s, "study.skipped", decision.reason, study_id=study_id)
                return True
            existing = s.scalar(
                select(Job).where(
                    Job.study_id == study_id,
                    Job.pipeline == decision.pipeline,
                    Job.study_version == version,
                )
            )
            if existing is None:
                job = Job(
                    study_id=study_id,
                    study_version=version,
                    pipeline=decision.pipeline,
                    priority=decision.priority,
                    destinations=list(decision.destinations),
                    rule_name=decision.rule_name,
                    status=JobStatus.PENDING.value,
                )
                s.add(job)
                s.flush()
                record_event(
                    s,
                    "job.created",
                    f"pipeline {decision.pipeline}",
                    study_id=study_id,
                    job_id=job.id,
                )
            study.status = StudyStatus.QUEUED.value
        return True

    def dispatch_pending(self) -> int:
        if time.monotonic() < self._broker_down_until:
            return 0
        with self.db.session() as s:
            pending = s.execute(
                select(Job.id, Job.priority)
                .where(Job.status == JobStatus.PENDING.value)
                .order_by(Job.priority.desc(), Job.id)
            ).all()
        sent = 0
        for job_id, priority in pending:
            try:
                task_id = enqueue_job(self.celery, job_id, priority)
            except Exception as exc:
                log.warning("broker unreachable, job %s stays pending: %s", job_id, exc)
                self._broker_down_until = time.monotonic() + 5.0
                break
            with self.db.session() as s:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.PENDING.value)
                    .values(status=JobStatus.QUEUED.value, enqueued_at=utcnow())
                )
                record_event(s, "job.queued", f"sent to broker as task {task_id}", job_id=job_id)
            sent += 1
        return sent

    def retry_due_deliveries(self) -> int:
        """Send jobs whose deliveries are due for another attempt back to a worker."""
        if time.monotonic() < self._broker_down_until:
            return 0
        now = utcnow()
        with self.db.session() as s:
            due = s.execute(
                select(Job.id, Job.priority)
                .join(Result, Result.job_id == Job.id)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(
                    Job.status == JobStatus.DELIVERING.value,
                    Delivery.status == DeliveryStatus.PENDING.value,
                    Delivery.next_attempt_at <= now,
                )
                .distinct()
            ).all()
        sent = 0
        for job_id, priority in due:
            try:
                enqueue_job(self.celery, job_id, priority, task=TASK_DELIVER_JOB)
            except Exception as exc:
                log.warning("broker unreachable, delivery retry of job %s waits: %s", job_id, exc)
                self._broker_down_until = time.monotonic() + 5.0
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

    def requeue_stale_jobs(self) -> int:
        """A job running far longer than the task time limit lost its worker: send it again."""
        cutoff = utcnow() - self.stale_job
        with self.db.session() as s:
            stale = list(
                s.scalars(
                    select(Job).where(
                        Job.status == JobStatus.RUNNING.value, Job.started_at < cutoff
                    )
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

    def run_once(self) -> None:
        self.complete_quiet_studies()
        self.requeue_stale_jobs()
        self.dispatch_pending()
        self.retry_due_deliveries()
        if self.housekeeping is not None and time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self.housekeeping_every_s
            self.housekeeping()

    # Thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("completion loop pass failed; retrying")
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
