"""Scheduling, first step: when a study is complete, and the jobs its routing decides.

A study is complete when no instance has arrived for the quiet period, when its rule's
completion condition holds (expected count, required series, Images in Acquisition), when its
sender released the association (where configured), when Orthanc said it is stable (the pull
door), or when an operator forces it. Completion fires once per study version (a guarded
UPDATE), and routing writes the jobs in the same transaction; ``pacs_agent.scheduling.dispatch``
hands them to the broker after that commit.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select, update

from pacs_agent import metrics
from pacs_agent.db.models import (
    Job,
    JobStatus,
    PullRequestRow,
    PullStatus,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.priority import broker_number
from pacs_agent.scheduling.routing import (
    Router,
    complete_early,
    resolve_destinations,
    study_context,
    study_facts,
)

log = logging.getLogger(__name__)


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
    else routine), its destinations as credential-free references (none named:
    ``default_destinations``) and its notification channel names."""
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
        metrics.completed(study.first_received_at, decision.action)
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
            # References only (credentials masked): the worker resolves them when it delivers.
            refs, warnings = resolve_destinations(s, plan.destinations, ctx, default_destinations)
            for warning in warnings:
                record_event(s, "rule.destination", warning, study_id=study_id, level="warning")
            cls = plan.priority or study.incoming_priority or "routine"
            job = Job(
                study_id=study_id,
                study_version=version,
                pipeline=plan.pipeline,
                priority=broker_number(cls),
                priority_class=cls,
                destinations=refs,
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


class CompletionChecker:
    """Finds the receiving studies that are complete and completes them (one pass per call)."""

    def __init__(
        self,
        db: Database,
        router: Router,
        *,
        quiet_period_s: float,
        default_destinations: list[str],
        quiet_period_by_ae: dict[str, float] | None = None,
        complete_on_release_aes: list[str] | None = None,
    ) -> None:
        self.db = db
        self.router = router
        self.quiet = dt.timedelta(seconds=quiet_period_s)
        self.quiet_by_ae = dict(quiet_period_by_ae or {})
        self.release_aes = set(complete_on_release_aes or [])
        self.default_destinations = default_destinations

    def quiet_period_for(self, calling_ae: str | None, rule_quiet: float | None) -> dt.timedelta:
        if rule_quiet is not None:
            return dt.timedelta(seconds=rule_quiet)
        if calling_ae and calling_ae in self.quiet_by_ae:
            return dt.timedelta(seconds=self.quiet_by_ae[calling_ae])
        return self.quiet

    def complete_quiet_studies(self) -> list[int]:
        """Complete every receiving study whose rule's condition or quiet period is met. A study
        Orthanc's pull is still bringing in (a pending or running pull request) waits for the
        pull, which completes it when every instance is in (or marks it failed)."""
        now = utcnow()
        ready: list[tuple[int, int, str]] = []
        being_pulled = select(PullRequestRow.study_instance_uid).where(
            PullRequestRow.study_instance_uid.is_not(None),
            PullRequestRow.status.in_((PullStatus.PENDING.value, PullStatus.RUNNING.value)),
        )
        with self.db.session() as s:
            receiving = list(
                s.scalars(
                    select(Study).where(
                        Study.status == StudyStatus.RECEIVING.value,
                        Study.study_instance_uid.not_in(being_pulled),
                    )
                )
            )
            for study in receiving:
                facts = study_facts(s, study)
                completion = self.router.completion(s, study, facts)
                early = complete_early(completion, facts)
                if early:
                    ready.append((study.id, study.version, early))
                    continue
                quiet = self.quiet_period_for(study.calling_ae, completion.quiet_period_s)
                if study.last_received_at <= now - quiet:
                    ready.append(
                        (study.id, study.version, f"quiet for {quiet.total_seconds():g} s")
                    )
        return [sid for sid, version, why in ready if self.complete(sid, version, why)]

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
            self.complete(study.id, version, f"association from {calling_ae} released")

    def complete_uid(self, study_uid: str, why: str) -> bool:
        """Complete the receiving version of a study now (its sender said it is complete, e.g.
        Orthanc's stable-study event). False when it is not receiving."""
        with self.db.session() as s:
            row = s.execute(
                select(Study.id, Study.version).where(
                    Study.study_instance_uid == study_uid,
                    Study.status == StudyStatus.RECEIVING.value,
                )
            ).first()
        return row is not None and self.complete(row[0], row[1], why)

    def complete(self, study_id: int, version: int, why: str = "") -> bool:
        return complete_study(
            self.db,
            study_id,
            version,
            why,
            default_destinations=self.default_destinations,
            router=self.router,
        )
