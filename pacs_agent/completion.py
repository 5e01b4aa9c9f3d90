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
from sqlalchemy.orm import Session

from pacs_agent.db.models import (
    AgentFlag,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.queue import TASK_DELIVER_JOB, enqueue_job
from pacs_agent.routing import (
    Router,
    complete_early,
    resolve_destinations,
    study_context,
    study_facts,
)
from pacs_agent.scheduling.claims import offpeak_open
from pacs_agent.scheduling.priority import broker_number
from pacs_agent.store import InstanceStore

log = logging.getLogger(__name__)

SUSPEND_FLAG = "processing_suspended"


def processing_suspended(s: Session) -> bool:
    """Whether an operator suspended processing (nothing is sent to the workers meanwhile)."""
    flag = s.get(AgentFlag, SUSPEND_FLAG)
    return flag is not None and flag.value in (True, "true", 1)


def complete_study(
    db: Database,
    study_id: int,
    version: int,
    why: str = "",
    *,
    default_destinations: list[str],
    store: InstanceStore | None = None,
    default_pipeline: str = "chest",
    router: Router | None = None,
) -> bool:
    """Complete one version of a receiving study and route it (jobs written in the same
    transaction). The loop calls it when a study is quiet; an operator's force complete
    (``POST /api/studies/{uid}/force-complete``) calls it directly. False when the study is not
    receiving that version any more (someone else took it, or a new instance arrived).

    Routing reads the instances' headers from ``store`` (the rules' ``tags``); one job per
    (study, pipeline, version), with the rule's priority class (else the study's incoming one,
    else routine), its destinations resolved to URLs (none named: ``default_destinations``)
    and its notification channel names."""
    router = router or Router(store, default_pipeline=default_pipeline)
    with db.session() as s:
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
        decision = router.decide(s, study, facts)
        for warning in decision.warnings:
            record_event(s, "rule.error", warning, study_id=study_id, level="warning")
        record_event(
            s,
            "study.complete",
            f"version {version} complete ({why}): {decision.reason}",
            study_id=study_id,
        )
        study.rule_name = decision.rule_name
        study.rule_version = decision.rule_version
        if decision.action == "skip":
            study.status = StudyStatus.SKIPPED.value
            study.reason = decision.reason
            why = decision.reason
            if decision.discarded:
                why = f"discarded by rule '{decision.rule_name}' v{decision.rule_version}: {why}"
            record_event(s, "study.skipped", why, study_id=study_id)
            return True
        ctx = study_context(study, facts.instance_count)
        for plan in decision.jobs:
            existing = s.scalar(
                select(Job).where(
                    Job.study_id == study_id,
                    Job.pipeline == plan.pipeline,
                    Job.study_version == version,
                )
            )
            if existing is not None:
                continue
            urls, warnings = resolve_destinations(s, plan.destinations, ctx, default_destinations)
            for warning in warnings:
                record_event(s, "rule.destination", warning, study_id=study_id, level="warning")
            cls = plan.priority or study.incoming_priority or "routine"
            job = Job(
                study_id=study_id,
                study_version=version,
                pipeline=plan.pipeline,
                priority=broker_number(cls),
                priority_class=cls,
                destinations=urls,
                notify=list(plan.notify),
                rule_name=plan.rule_name,
                rule_version=plan.rule_version,
                status=JobStatus.PENDING.value,
            )
            s.add(job)
            s.flush()
            record_event(
                s,
                "job.created",
                f"pipeline {plan.pipeline}, priority {cls}, by rule "
                f"'{plan.rule_name}' v{plan.rule_version}",
                study_id=study_id,
                job_id=job.id,
            )
        study.status = StudyStatus.QUEUED.value
    return True


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
        offpeak_window: str | None = None,
        store: InstanceStore | None = None,
        default_pipeline: str = "chest",
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
        # Offpeak jobs stay pending outside this window (None: no window, always sent).
        self.offpeak_window = offpeak_window
        # Routing rules read instance headers from the store (CEL variable ``tags``).
        self.router = Router(store, default_pipeline=default_pipeline)

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
            for study in receiving:
                facts = study_facts(s, study)
                completion = self.router.completion(s, study, facts)
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
                completion = self.router.completion(s, study, study_facts(s, study))
                wanted = calling_ae in self.release_aes or completion.on_association_release
                if not wanted:
                    continue
                version = study.version
            self._complete(study.id, version, f"association from {calling_ae} released")

    def _complete(self, study_id: int, version: int, why: str = "") -> bool:
        return complete_study(
            self.db,
            study_id,
            version,
            why,
            default_destinations=self.default_destinations,
            router=self.router,
        )

    def dispatch_pending(self) -> int:
        """Send pending jobs to the broker, most urgent first (broker number 0 first). Nothing
        is sent while processing is suspended (agent flag ``processing_suspended``); offpeak
        jobs wait for the offpeak window."""
        if time.monotonic() < self._broker_down_until:
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
            # Queued in the database (committed) before the wake-up is sent: a worker that gets
            # the message at once must find the job claimable.
            with self.db.session() as s:
                marked = s.execute(  # type: ignore[attr-defined]
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.PENDING.value)
                    .values(status=JobStatus.QUEUED.value, enqueued_at=utcnow())
                ).rowcount
            if marked != 1:
                continue
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
                self._broker_down_until = time.monotonic() + 5.0
                break
            with self.db.session() as s:
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
