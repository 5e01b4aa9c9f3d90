"""Triage notifications: queued by the worker with the job's triage level, sent by the agent.

Interface fixed for the worker:

queue_notifications(s, settings, *, job_id, level, findings) -> int
    Called by the worker inside the transaction that stores a job's triage level. Creates one
    pending Notification per channel (the job's `notify` names resolved to URLs, else
    PACS_AGENT_NOTIFY) for this study version when `level` is in PACS_AGENT_NOTIFY_LEVELS; a row
    that exists already (a retried job) is left as it is. Returns the number created.
    `findings` is a list of {"label", "probability", "present"} dicts. Optional keyword
    `random_weights` (the bundle is a DEMO); when it is not given, the job's stored results say.

The rows are the queue of record: one per (study, study version, channel), so a redelivered or
re-processed job never sends a second message, and one already sent is not sent again. The
agent's NotificationLoop sends due rows (most urgent first: critical before urgent), taking a
lease on each first (next_attempt_at pushed forward) so that two agents never send the same row
at once; a failed attempt is retried with exponential backoff and jitter up to
PACS_AGENT_NOTIFY_ATTEMPTS, then the row is ``failed`` until an operator retries it
(POST /api/notifications/{id}/retry). Sending is at least once: a crash between sending and
recording it sends the message again when the lease runs out, with the same idempotency key
(webhook ``idempotency_key`` / ``Idempotency-Key``, HL7 MSH-10), so receivers can de-duplicate.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs_agent import metrics
from pacs_agent.db.models import (
    Destination,
    Instance,
    Job,
    Notification,
    NotificationStatus,
    Result,
    Study,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.destinations import scrub
from pacs_agent.dispatching.channels import (
    Message,
    NotifyError,
    channel_for,
    channel_kind,
    check_channel_url,
    mask_url,
)
from pacs_agent.dispatching.delivery import backoff_delay
from pacs_agent.receiving.store import InstanceStore, StoreError
from pacs_agent.scheduling.priority import BROKER_NUMBER, broker_number, escalate
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

CHANNEL_TIMEOUT_S = 10.0
_DEMO_SUFFIX = "(DEMO)"  # the series description suffix of outputs of a random-weights bundle


# Queueing (worker side) -----------------------------------------------------------------------


def resolve_channels(
    s: Session, settings: Settings, names: list[str]
) -> tuple[list[str], list[str]]:
    """Channel URLs for a job's ``notify`` list (destination names of purpose "notify", or
    literal URLs); when it names none, PACS_AGENT_NOTIFY. Returns (URLs, problems)."""
    urls: list[str] = []
    problems: list[str] = []
    for name in names or settings.notify_urls:
        name = name.strip()
        if not name:
            continue
        if "://" in name:
            url = name
        else:
            dest = s.scalar(select(Destination).where(Destination.name == name))
            if dest is None or dest.purpose != "notify":
                problems.append(f"no notification channel named {name!r}")
                continue
            if not dest.enabled:
                problems.append(f"notification channel {name!r} is disabled")
                continue
            url = dest.url
        try:
            url = check_channel_url(url)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if url not in urls:
            urls.append(url)
    return urls, problems


def links_for(settings: Settings, study_uid: str) -> dict[str, str]:
    base = (settings.public_url or settings.resolved_agent_url).rstrip("/")
    return {"console": f"{base}/studies/{study_uid}", "api": f"{base}/api/studies/{study_uid}"}


def _job_used_demo_bundle(s: Session, job_id: int) -> bool:
    descriptions = s.scalars(select(Result.summary).where(Result.job_id == job_id)).all()
    return any(
        str((d or {}).get("series_description", "")).endswith(_DEMO_SUFFIX) for d in descriptions
    )


def queue_notifications(
    s: Session,
    settings: Settings,
    *,
    job_id: int,
    level: str | None,
    findings: list[dict[str, Any]],
    random_weights: bool | None = None,
) -> int:
    """Create the pending notifications of a job's triage result (see the module docstring)."""
    if not level or level not in settings.notify_levels:
        return 0
    job = s.get(Job, job_id)
    if job is None:
        log.warning("queue_notifications: no job %s", job_id)
        return 0
    study = s.get_one(Study, job.study_id)
    urls, problems = resolve_channels(s, settings, list(job.notify or []))
    for problem in problems:
        record_event(
            s, "notification.channel", problem, study_id=study.id, job_id=job.id, level="warning"
        )
    if not urls:
        return 0
    cls = escalate(job.priority_class, level)
    if random_weights is None:
        random_weights = _job_used_demo_bundle(s, job.id)
    payload: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "study_version": job.study_version,
        "job_id": job.id,
        "pipeline": job.pipeline,
        "level": level,
        "priority": cls,
        "findings": [
            {
                "label": str(f.get("label", "")),
                "probability": None
                if f.get("probability") is None
                else round(float(f["probability"]), 4),
                "present": bool(f.get("present")),
            }
            for f in findings
        ],
        "links": links_for(settings, study.study_instance_uid),
        "random_weights": bool(random_weights),
    }
    created = 0
    for url in urls:
        exists = s.scalar(
            select(Notification.id).where(
                Notification.study_id == study.id,
                Notification.study_version == job.study_version,
                Notification.channel == url,
            )
        )
        if exists is not None:
            continue  # a retried or redelivered job: the row (sent or not) stays as it is
        row = {
            "study_id": study.id,
            "study_version": job.study_version,
            "job_id": job.id,
            "channel": url,
            "level": level,
            "priority": broker_number(cls),
            "payload": payload,
            "status": NotificationStatus.PENDING.value,
            "attempts": 0,
            "created_at": utcnow(),
        }
        if not _insert_if_absent(s, row):
            continue  # another worker made it a moment ago
        created += 1
        record_event(
            s,
            "notification.queued",
            f"{level} ({cls}) to {channel_kind(url)} {mask_url(url)}",
            study_id=study.id,
            job_id=job.id,
        )
    return created


def _insert_if_absent(s: Session, row: dict[str, Any]) -> bool:
    """Insert a notification unless (study, version, channel) exists; True when inserted.

    PostgreSQL and SQLite: INSERT ... ON CONFLICT DO NOTHING (no error, no savepoint needed);
    other databases: the insert in a SAVEPOINT, the unique constraint's error ignored.
    """
    dialect = s.get_bind().dialect.name
    keys = ["study_id", "study_version", "channel"]
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = (
            postgresql.insert(Notification)
            .values(**row)
            .on_conflict_do_nothing(index_elements=keys)
        )
        return bool(s.execute(pg).rowcount == 1)  # type: ignore[attr-defined]
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(Notification).values(**row).on_conflict_do_nothing(index_elements=keys)
        return bool(s.execute(lite).rowcount == 1)  # type: ignore[attr-defined]
    try:
        with s.begin_nested():
            s.execute(insert(Notification).values(**row))
    except IntegrityError:
        return False
    return True


# Showing and retrying (API side) --------------------------------------------------------------


def _iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()


def notification_summary(n: Notification) -> dict[str, Any]:
    """A notification as the API and the console show it (channel without credentials)."""
    try:
        kind = channel_kind(n.channel)
    except ValueError:
        kind = None
    return {
        "id": n.id,
        "study_version": n.study_version,
        "job_id": n.job_id,
        "channel": mask_url(n.channel),
        "kind": kind,
        "level": n.level,
        "priority": n.priority,
        "status": n.status,
        "attempts": n.attempts,
        "last_error": n.last_error,
        "next_attempt_at": _iso(n.next_attempt_at),
        "created_at": _iso(n.created_at),
        "sent_at": _iso(n.sent_at),
    }


def study_notifications(s: Session, study_id: int) -> list[dict[str, Any]]:
    rows = s.scalars(
        select(Notification).where(Notification.study_id == study_id).order_by(Notification.id)
    )
    return [notification_summary(n) for n in rows]


def retry_notification(s: Session, n: Notification, actor: str) -> None:
    """Give a failed notification a fresh set of attempts, due now."""
    n.status = NotificationStatus.PENDING.value
    n.attempts = 0
    n.next_attempt_at = None
    record_event(
        s,
        "notification.retry",
        f"retry to {mask_url(n.channel)} requested by {actor}",
        study_id=n.study_id,
        job_id=n.job_id,
    )


# Sending (agent side) -------------------------------------------------------------------------

_CLASS_OF_NUMBER = {number: cls for cls, number in BROKER_NUMBER.items()}


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def study_header(s: Session, store: InstanceStore, study_id: int) -> Any | None:
    """The header of the study's first stored instance (no pixels), or None if none is left."""
    rels = s.scalars(
        select(Instance.path).where(Instance.study_id == study_id).order_by(Instance.id).limit(5)
    ).all()
    for rel in rels:
        try:
            path: Path = store.path_for(rel)
            return dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, StoreError) as exc:
            log.info("study %s: instance header not readable (%s)", study_id, type(exc).__name__)
    return None


def build_message(
    n: Notification, study: Study, header: Any | None, *, include_patient_name: bool
) -> Message:
    p = dict(n.payload or {})
    cls = p.get("priority") or _CLASS_OF_NUMBER.get(n.priority, "urgent")
    message = Message(
        notification_id=n.id,
        idempotency_key=f"pacs-agent-notification-{n.id}-{study.study_instance_uid}",
        study_instance_uid=study.study_instance_uid,
        study_version=n.study_version,
        level=n.level,
        priority=str(cls),
        findings=list(p.get("findings") or []),
        links=dict(p.get("links") or {}),
        random_weights=bool(p.get("random_weights")),
    )
    if header is not None:
        message.accession_number = _text(header, "AccessionNumber")
        message.study_description = _text(header, "StudyDescription")
        date = _text(header, "StudyDate")
        time_ = (_text(header, "StudyTime") or "").split(".", 1)[0]
        message.study_datetime = (date + time_) if date else None
        message.patient_id = _text(header, "PatientID")
        message.patient_id_issuer = _text(header, "IssuerOfPatientID")
        if include_patient_name:
            message.patient_name = _text(header, "PatientName")
    return message


class NotificationLoop:
    """The agent's sender: due notifications, most urgent first, one attempt each per pass."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: InstanceStore,
        *,
        poll_s: float | None = None,
        timeout_s: float = CHANNEL_TIMEOUT_S,
        batch: int = 50,
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.poll_s = poll_s if poll_s is not None else max(settings.completion_poll_s, 0.2)
        self.timeout_s = timeout_s
        self.batch = batch
        # Held while one row is sent: longer than any channel can take.
        self.lease = dt.timedelta(seconds=max(60.0, 4 * timeout_s))
        self.backoff_max_s = max(settings.notify_backoff_s, settings.delivery_backoff_max_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def secret(self) -> str:
        return self.settings.notify_secret or self.settings.webhook_secret

    # One pass ---------------------------------------------------------------------------------

    def due(self) -> list[int]:
        now = utcnow()
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Notification.id)
                    .where(
                        Notification.status == NotificationStatus.PENDING.value,
                        or_(
                            Notification.next_attempt_at.is_(None),
                            Notification.next_attempt_at <= now,
                        ),
                    )
                    .order_by(Notification.priority, Notification.id)
                    .limit(self.batch)
                )
            )

    def _take(self, notification_id: int) -> bool:
        """Lease a due row (another agent may be looking at it too); True when it is ours."""
        now = utcnow()
        with self.db.session() as s:
            taken = s.execute(  # type: ignore[attr-defined]
                update(Notification)
                .where(
                    Notification.id == notification_id,
                    Notification.status == NotificationStatus.PENDING.value,
                    or_(
                        Notification.next_attempt_at.is_(None),
                        Notification.next_attempt_at <= now,
                    ),
                )
                .values(next_attempt_at=now + self.lease)
            ).rowcount
        return bool(taken == 1)

    def run_once(self) -> int:
        """Send what is due; return the number sent."""
        sent = 0
        for notification_id in self.due():
            if self._stop.is_set():
                break
            if self._take(notification_id) and self.send(notification_id):
                sent += 1
        return sent

    def send(self, notification_id: int) -> bool:
        """One attempt for a leased row; True when it was sent."""
        with self.db.session() as s:
            n = s.get_one(Notification, notification_id)
            study = s.get_one(Study, n.study_id)
            header = study_header(s, self.store, study.id)
            message = build_message(
                n, study, header, include_patient_name=self.settings.notify_patient_name
            )
            url, shown = n.channel, mask_url(n.channel)
        try:
            channel = channel_for(
                url,
                secret=self.secret,
                timeout_s=self.timeout_s,
                include_patient_name=self.settings.notify_patient_name,
            )
            note = channel.send(message)
        except NotifyError as exc:
            self._failed(notification_id, scrub(str(exc), url))
            return False
        except Exception as exc:  # a bug or an odd answer: still a failed attempt, not a crash
            log.exception("notification %s to %s: unexpected error", notification_id, shown)
            self._failed(notification_id, scrub(f"{type(exc).__name__}: {exc}", url))
            return False
        with self.db.session() as s:
            n = s.get_one(Notification, notification_id)
            n.attempts += 1
            n.status = NotificationStatus.DONE.value
            n.sent_at = utcnow()
            n.last_error = None
            n.next_attempt_at = None
            record_event(
                s,
                "notification.sent",
                f"{n.level} to {shown} ({note}), attempt {n.attempts}",
                study_id=n.study_id,
                job_id=n.job_id,
            )
        metrics.notification(url, "sent")
        return True

    def _failed(self, notification_id: int, error: str) -> None:
        error = error[:1000]
        with self.db.session() as s:
            n = s.get_one(Notification, notification_id)
            n.attempts += 1
            n.last_error = error
            shown = mask_url(n.channel)
            exhausted = n.attempts >= self.settings.notify_attempts
            metrics.notification(n.channel, "failed" if exhausted else "retry")
            if n.attempts >= self.settings.notify_attempts:
                n.status = NotificationStatus.FAILED.value
                n.next_attempt_at = None
                record_event(
                    s,
                    "notification.failed",
                    f"{n.level} to {shown} after {n.attempts} attempts: {error}",
                    study_id=n.study_id,
                    job_id=n.job_id,
                    level="error",
                )
                return
            delay = backoff_delay(n.attempts, self.settings.notify_backoff_s, self.backoff_max_s)
            n.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
            record_event(
                s,
                "notification.retry",
                f"{n.level} to {shown} will be retried in {delay:.0f} s: {error}",
                study_id=n.study_id,
                job_id=n.job_id,
                level="warning",
            )

    # Thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("notification pass failed; retrying")
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.timeout_s)
            self._thread = None
