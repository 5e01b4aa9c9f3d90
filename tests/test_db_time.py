"""Timestamps come back from the database as aware UTC datetimes on SQLite and PostgreSQL
(``pacs_agent.db.models.UTCDateTime``), so no caller compares naive with aware values."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pacs_agent.db.models import Study
from pacs_agent.db.session import Database


def test_timestamps_round_trip_as_aware_utc(database_url: str) -> None:
    db = Database(database_url)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    local = dt.datetime(2026, 3, 1, 14, 30, 5, 123000, tzinfo=plus_two)  # 12:30:05.123 UTC
    naive = dt.datetime(2026, 3, 1, 9, 0, 0)  # taken as UTC
    try:
        with db.session() as s:
            s.add(Study(study_instance_uid="2.25.1", last_received_at=local, completed_at=naive))
        with db.session() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == "2.25.1")).one()
            assert study.last_received_at.tzinfo is not None
            assert study.last_received_at == local  # the same instant
            assert study.last_received_at.utcoffset() == dt.timedelta(0)
            assert study.completed_at == naive.replace(tzinfo=dt.UTC)
            assert study.first_received_at.tzinfo is not None  # the default, utcnow()
            # a comparison in SQL binds the aware value as UTC: the row is found by its instant
            found = s.scalar(
                select(Study.id).where(
                    Study.last_received_at <= dt.datetime(2026, 3, 1, 12, 30, 6, tzinfo=dt.UTC),
                    Study.last_received_at >= dt.datetime(2026, 3, 1, 12, 30, 4, tzinfo=dt.UTC),
                )
            )
            assert found == study.id
    finally:
        db.dispose()
