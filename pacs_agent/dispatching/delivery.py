"""Deliver a job's results to its destinations; every attempt is persisted state.

A delivery row per (result, destination) holds its attempts, the next retry time and the last
error, so an admin sees what failed and why. One pass makes one attempt per destination; a
failed attempt schedules the next one with exponential backoff and jitter (the agent's loop sends
the job back to a worker when it is due), until ``max_attempts``, when the delivery is failed
and waits for a manual retry. Results already delivered are not sent again.

A job names its destinations by reference (``pacs_agent.destinations.reference``: credentials
masked); ``resolve`` turns a reference into the URL with its credentials, here, at delivery time.
A delivery row is keyed by the destination's identity (``redact``: everything but the
credentials), so two AE titles on one host are two destinations.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from pacs_agent import metrics
from pacs_agent.db.models import Delivery, DeliveryStatus, Result, utcnow
from pacs_agent.db.session import Database, record_event
from pacs_agent.destinations import scrub
from pacs_agent.dispatching.senders import AssociationPool, redact, sender_for

log = logging.getLogger(__name__)


@dataclass
class DeliveryOutcome:
    delivered: int = 0
    pending: list[str] = field(default_factory=list)  # destinations that will be retried
    failed: list[str] = field(default_factory=list)  # destinations out of attempts (with error)


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped, with +-50% jitter."""
    return min(max_s, base_s * (2 ** max(attempt - 1, 0))) * (0.5 + random.random())


def deliver_job_results(
    db: Database,
    job_id: int,
    study_id: int,
    destinations: Sequence[str],
    *,
    results_root: Path,
    max_attempts: int = 8,
    backoff_s: float = 30.0,
    backoff_max_s: float = 600.0,
    calling_ae: str = "PACSAGENT",
    tls: ssl.SSLContext | None = None,
    dicomweb_token: str | None = None,
    resolve: Callable[[str], str] | None = None,
    associations: AssociationPool | None = None,
) -> DeliveryOutcome:
    """``destinations``: the job's destination references (or plain URLs); ``resolve`` gives
    each one's URL with credentials (None: used as given)."""
    outcome = DeliveryOutcome()
    for ref in destinations:
        shown = redact(ref)
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
        ids = [rid for rid, _ in todo]
        url = ref
        try:
            url = resolve(ref) if resolve is not None else ref
            sender = sender_for(
                url,
                calling_ae=calling_ae,
                tls=tls,
                dicomweb_token=dicomweb_token,
                associations=associations,
            )
            sender.send([p for _, p in todo])
        except Exception as exc:
            error = scrub(f"{type(exc).__name__}: {exc}", url)
            exhausted = _mark_failed_attempt(
                db, ids, shown, error, max_attempts, backoff_s, backoff_max_s
            )
            with db.session() as s:
                if exhausted:
                    record_event(
                        s,
                        "delivery.failed",
                        f"to {shown} after {max_attempts} attempts: {error}",
                        study_id=study_id,
                        job_id=job_id,
                        level="error",
                    )
                else:
                    record_event(
                        s,
                        "delivery.retry",
                        f"to {shown} will be retried: {error}",
                        study_id=study_id,
                        job_id=job_id,
                        level="warning",
                    )
            log.warning("delivery of job %s to %s failed: %s", job_id, shown, error)
            metrics.delivery(ref, "failed" if exhausted else "retry")
            (outcome.failed if exhausted else outcome.pending).append(f"{shown}: {error}")
            continue
        with db.session() as s:
            for d in s.scalars(
                select(Delivery).where(Delivery.result_id.in_(ids), Delivery.destination == shown)
            ):
                d.attempts += 1
                d.status = DeliveryStatus.DONE.value
                d.delivered_at = utcnow()
                d.last_error = None
                d.next_attempt_at = None
            record_event(
                s,
                "delivery.done",
                f"{len(todo)} objects to {shown}",
                study_id=study_id,
                job_id=job_id,
            )
        outcome.delivered += len(todo)
        metrics.delivery(ref, "done")
    return outcome


def _mark_failed_attempt(
    db: Database,
    result_ids: list[int],
    destination: str,
    error: str,
    max_attempts: int,
    backoff_s: float,
    backoff_max_s: float,
) -> bool:
    """Record a failed attempt; return True when the rows are out of attempts."""
    exhausted = False
    with db.session() as s:
        for d in s.scalars(
            select(Delivery).where(
                Delivery.result_id.in_(result_ids), Delivery.destination == destination
            )
        ):
            d.attempts += 1
            d.last_error = error
            if d.attempts >= max_attempts:
                d.status = DeliveryStatus.FAILED.value
                d.next_attempt_at = None
                exhausted = True
            else:
                d.status = DeliveryStatus.PENDING.value
                delay = backoff_delay(d.attempts, backoff_s, backoff_max_s)
                d.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
    return exhausted
