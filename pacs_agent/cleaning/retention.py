"""Cleaning: the retention policy removes what the agent and the workers no longer need.

Everything that grows with each study has a retention here: instance files
(``PACS_AGENT_RETENTION_DAYS``), events (``PACS_AGENT_EVENT_RETENTION_DAYS``, never those of a
study not finished), refusal records and finished pull requests
(``PACS_AGENT_REFUSAL_RETENTION_DAYS``), all run by the agent's housekeeping
(:func:`housekeeping`); and result files on each worker host (``PACS_AGENT_RESULT_RETENTION_DAYS``,
:func:`purge_result_files`, run by the worker's heartbeat thread: no folder is shared between
hosts, so each worker cleans its own). A setting of 0 keeps everything of its kind.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, or_, select

from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Job,
    JobStatus,
    PullRequestRow,
    PullStatus,
    Refusal,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

FINISHED = (StudyStatus.DONE.value, StudyStatus.SKIPPED.value, StudyStatus.FAILED.value)
# Rows deleted per statement: short transactions, no long lock on a busy table.
BATCH = 2000


def _cutoff(days: float) -> dt.datetime:
    return utcnow() - dt.timedelta(days=days)


def purge_expired(db: Database, store: InstanceStore, retention_days: float) -> int:
    """Remove the instance files of studies finished more than ``retention_days`` ago."""
    if retention_days <= 0:
        return 0
    cutoff = _cutoff(retention_days)
    with db.session() as s:
        expired = list(
            s.scalars(
                select(Study).where(
                    Study.status.in_(FINISHED),
                    Study.completed_at < cutoff,
                    Study.purged_at.is_(None),
                )
            )
        )
        for study in expired:
            folder = store.root / study.study_instance_uid
            if folder.is_dir():
                shutil.rmtree(folder)
            study.purged_at = utcnow()
            record_event(
                s,
                "study.purged",
                f"instance files removed after {retention_days:g} days",
                study_id=study.id,
            )
    return len(expired)


def _delete_batches(db: Database, model: Any, *where: Any) -> int:
    """Delete the rows of ``model`` matching ``where``, ``BATCH`` rows per transaction."""
    total = 0
    while True:
        with db.session() as s:
            ids = list(s.scalars(select(model.id).where(*where).limit(BATCH)))
            if not ids:
                return total
            s.execute(delete(model).where(model.id.in_(ids)))
        total += len(ids)


def purge_events(db: Database, retention_days: float) -> int:
    """Remove events older than ``retention_days``, except those of a study not finished (its
    trail is what an admin reads while it is in flight)."""
    if retention_days <= 0:
        return 0
    unfinished = exists().where(Study.id == Event.study_id, Study.status.not_in(FINISHED))
    return _delete_batches(db, Event, Event.at < _cutoff(retention_days), ~unfinished)


def purge_refusals(db: Database, retention_days: float) -> int:
    """Remove refusal records older than ``retention_days``."""
    if retention_days <= 0:
        return 0
    return _delete_batches(db, Refusal, Refusal.at < _cutoff(retention_days))


def purge_pull_requests(db: Database, retention_days: float) -> int:
    """Remove pull requests that finished (done or failed) more than ``retention_days`` ago;
    pending and running ones stay, whatever their age."""
    if retention_days <= 0:
        return 0
    cutoff = _cutoff(retention_days)
    return _delete_batches(
        db,
        PullRequestRow,
        PullRequestRow.status.in_((PullStatus.DONE.value, PullStatus.FAILED.value)),
        or_(
            PullRequestRow.finished_at < cutoff,
            PullRequestRow.finished_at.is_(None) & (PullRequestRow.created_at < cutoff),
        ),
    )


def purge_result_files(db: Database, results_root: Path, retention_days: float) -> int:
    """Remove this host's result files of jobs done more than ``retention_days`` ago whose
    deliveries are all done (a pending or failed delivery may still need them). The result rows
    stay: a re-run makes the same objects under the same UIDs. Returns the files removed."""
    if retention_days <= 0:
        return 0
    cutoff = _cutoff(retention_days)
    undelivered = exists().where(
        Delivery.result_id == Result.id, Delivery.status != DeliveryStatus.DONE.value
    )
    with db.session() as s:
        paths = list(
            s.scalars(
                select(Result.path)
                .join(Job, Job.id == Result.job_id)
                .where(Job.status == JobStatus.DONE.value, Job.finished_at < cutoff, ~undelivered)
            )
        )
    root = results_root.resolve()
    removed = 0
    for rel in paths:
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue
        path.unlink()
        removed += 1
        for folder in (path.parent, path.parent.parent):  # series, then study folder
            if folder != root and folder.is_relative_to(root):
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break
    return removed


@dataclass(frozen=True)
class Purged:
    studies: int = 0
    events: int = 0
    refusals: int = 0
    pull_requests: int = 0


def housekeeping(db: Database, store: InstanceStore, settings: Settings) -> Purged:
    """The agent's retention pass (AgentLoop's housekeeping): each purge on its own, so that one
    failing does not keep the others from running."""
    counts: dict[str, int] = {}
    for name, purge in (
        ("studies", lambda: purge_expired(db, store, settings.retention_days)),
        ("events", lambda: purge_events(db, settings.event_retention_days)),
        ("refusals", lambda: purge_refusals(db, settings.refusal_retention_days)),
        ("pull_requests", lambda: purge_pull_requests(db, settings.refusal_retention_days)),
    ):
        try:
            counts[name] = purge()
        except Exception as exc:
            log.error(
                "retention of %s failed: %s; retried at the next pass", name, type(exc).__name__
            )
    done = Purged(**counts)
    if any(counts.values()):
        log.info(
            "retention: %d studies' files, %d events, %d refusals, %d pull requests removed",
            done.studies,
            done.events,
            done.refusals,
            done.pull_requests,
        )
    return done
