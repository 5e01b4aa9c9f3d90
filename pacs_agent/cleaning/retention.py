"""Cleaning: the retention policy removes what the agent no longer needs."""

from __future__ import annotations

import datetime as dt
import shutil

from sqlalchemy import select

from pacs_agent.db.models import Study, StudyStatus, utcnow
from pacs_agent.db.session import Database, record_event
from pacs_agent.receiving.store import InstanceStore


def purge_expired(db: Database, store: InstanceStore, retention_days: float) -> int:
    """Remove the instance files of studies finished more than ``retention_days`` ago."""
    if retention_days <= 0:
        return 0
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    finished = (StudyStatus.DONE.value, StudyStatus.SKIPPED.value, StudyStatus.FAILED.value)
    with db.session() as s:
        expired = list(
            s.scalars(
                select(Study).where(
                    Study.status.in_(finished),
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
