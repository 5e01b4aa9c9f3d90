"""Deliver a job's results to its destinations; every attempt is persisted state.

A delivery row per (result, destination) holds attempts, the next retry time and the last error,
so an admin sees what failed and why. Results already delivered are not sent again.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Result, utcnow
from pacs_agent.db.session import Database, record_event
from pacs_agent.delivery.senders import redact, sender_for

log = logging.getLogger(__name__)


def deliver_job_results(
    db: Database,
    job_id: int,
    study_id: int,
    destinations: Sequence[str],
    *,
    results_root: Path,
    attempts: int = 3,
    backoff_s: float = 2.0,
    calling_ae: str = "PACSAGENT",
) -> list[str]:
    """Send every undelivered result of the job; return the errors left, one per destination."""
    errors: list[str] = []
    for url in destinations:
        shown = redact(url)
        with db.session() as s:
            results = s.scalars(
                select(Result).where(Result.job_id == job_id).order_by(Result.id)
            ).all()
            todo: list[tuple[int, Path]] = []
            for r in results:
                d = s.scalar(
                    select(Delivery).where(
                        Delivery.result_id == r.id, Delivery.destination == shown
                    )
                )
                if d is None:
                    d = Delivery(
                        result_id=r.id,
                        destination=shown,
                        status=DeliveryStatus.PENDING.value,
                        attempts=0,
                    )
                    s.add(d)
                if d.status != DeliveryStatus.DONE.value:
                    todo.append((r.id, results_root / r.path))
        if not todo:
            continue
        sender = sender_for(url, calling_ae=calling_ae)
        last_error = ""
        for attempt in range(1, attempts + 1):
            try:
                sender.send([p for _, p in todo])
                _mark(db, [rid for rid, _ in todo], shown, ok=True, error=None, retry_at=None)
                with db.session() as s:
                    record_event(
                        s,
                        "delivery.done",
                        f"{len(todo)} objects to {shown}",
                        study_id=study_id,
                        job_id=job_id,
                    )
                last_error = ""
                break
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                delay = backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())
                retry_at = utcnow() + dt.timedelta(seconds=delay) if attempt < attempts else None
                _mark(
                    db,
                    [rid for rid, _ in todo],
                    shown,
                    ok=False,
                    error=last_error,
                    retry_at=retry_at,
                )
                log.warning(
                    "delivery to %s failed (attempt %d/%d): %s",
                    shown,
                    attempt,
                    attempts,
                    last_error,
                )
                if attempt < attempts:
                    time.sleep(delay)
        if last_error:
            with db.session() as s:
                record_event(
                    s,
                    "delivery.failed",
                    f"to {shown}: {last_error}",
                    study_id=study_id,
                    job_id=job_id,
                    level="error",
                )
            errors.append(f"{shown}: {last_error}")
    return errors


def _mark(
    db: Database,
    result_ids: list[int],
    destination: str,
    *,
    ok: bool,
    error: str | None,
    retry_at: dt.datetime | None,
) -> None:
    with db.session() as s:
        for d in s.scalars(
            select(Delivery).where(
                Delivery.result_id.in_(result_ids), Delivery.destination == destination
            )
        ):
            d.attempts += 1
            if ok:
                d.status = DeliveryStatus.DONE.value
                d.delivered_at = utcnow()
                d.last_error = None
                d.next_attempt_at = None
            else:
                d.last_error = error
                d.next_attempt_at = retry_at
                d.status = DeliveryStatus.PENDING.value if retry_at else DeliveryStatus.FAILED.value
