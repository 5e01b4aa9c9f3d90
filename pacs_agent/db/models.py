"""Database schema (SQLAlchemy 2.0). Changed only through Alembic migrations in migrations/."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL keeps the zone (``timestamptz``); SQLite keeps none and gives naive values back.
    Binding converts an aware value to UTC (SQLite would drop its offset otherwise) and takes a
    naive one as UTC; reading attaches UTC to a naive value, so callers never compare naive and
    aware datetimes. The column type in the database is unchanged (``DateTime(timezone=True)``).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(dt.UTC)

    def coerce_compared_value(self, op: Any, value: Any) -> Any:
        """A datetime in an expression binds as this type (converted to UTC); anything else
        (``at - timedelta``: an interval) as DateTime would bind it."""
        if isinstance(value, dt.datetime):
            return self
        return self.impl_instance.coerce_compared_value(op, value)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyStatus(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet complete
    COMPLETE = "complete"  # quiet period over; routing pending
    QUEUED = "queued"  # at least one job created
    PROCESSING = "processing"  # a worker runs a job of the current version
    DELIVERING = "delivering"  # results made, some destinations not reached yet
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobStatus(enum.StrEnum):
    PENDING = "pending"  # in the database, not yet handed to the broker
    QUEUED = "queued"  # sent to the broker
    RUNNING = "running"
    DELIVERING = "delivering"  # outputs made; some deliveries wait for a retry
    DONE = "done"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


UID = String(64)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.RECEIVING.value, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    # Incremented when instances arrive after the study was complete: a new version, a new job.
    version: Mapped[int] = mapped_column(Integer, default=1)
    source: Mapped[str] = mapped_column(String(32), default="dimse")  # dimse | orthanc | stow
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    sender_address: Mapped[str | None] = mapped_column(String(64))  # IP of the sending host
    orthanc_id: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Set when the retention policy removed the study's instance files.
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Priority class the study arrived with (pacs_agent.scheduling.priority): from Requested
    # Procedure Priority (0040,1003) STAT/HIGH or a stat calling AE; None when it says nothing.
    incoming_priority: Mapped[str | None] = mapped_column(String(16))
    # The routing decision of the latest version: the rule's name and version (None: fallback).
    rule_name: Mapped[str | None] = mapped_column(String(128))
    rule_version: Mapped[int | None] = mapped_column(Integer)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the instance store root
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    analysable: Mapped[bool] = mapped_column(Boolean, default=True)
    reason: Mapped[str | None] = mapped_column(Text)  # why not analysable
    study_version: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Images in Acquisition (0020,1002) and Acquisition Number: an expected-count completion.
    acquisition_number: Mapped[int | None] = mapped_column(Integer)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)  # None: single frame
    # The agent that holds the file (its URL, settings.resolved_agent_url): workers fetch the
    # instance from there. None (rows from before 0004): the worker's configured agent.
    stored_by: Mapped[str | None] = mapped_column(String(255))

    series: Mapped[Series] = relationship(back_populates="instances")


class Rule(Base):
    """A routing rule: CEL conditions over each instance decide what happens to a study.

    Validated and versioned by pacs_agent.scheduling.rules; see the README for the format.
    """

    __tablename__ = "rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    position: Mapped[int] = mapped_column(Integer, default=100)  # rule order: lower first
    # CEL expressions; all must hold for one instance of the study.
    when: Mapped[list[str]] = mapped_column(JSON, default=list)
    action: Mapped[str] = mapped_column(String(16), default="process")  # process | discard
    reason: Mapped[str | None] = mapped_column(Text)  # why a discard rule discards
    pipeline: Mapped[str | None] = mapped_column(String(128))  # None: the default pipeline
    priority: Mapped[str | None] = mapped_column(String(16))  # stat | urgent | routine | offpeak
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    # How studies this rule takes are known to be complete (scheduling.routing.Completion).
    completion: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    notify: Mapped[list[str]] = mapped_column(JSON, default=list)  # notification channel names
    continue_: Mapped[bool] = mapped_column("continue", Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The last run-time failure of this rule (e.g. a row written by hand); cleared on save.
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class Destination(Base):
    """A named result destination or notification channel; the URL may hold credentials, which
    are never shown back (API, console, logs)."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # "destination" (results) or "notify" (a triage notification channel).
    purpose: Mapped[str] = mapped_column(String(16), default="destination")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Pipeline(Base):
    """A named model bundle with its adapters: what a rule's ``pipeline`` runs."""

    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # Bundle folder as the worker hosts see it.
    bundle: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerBeat(Base):
    """A worker's heartbeat: which pipelines it serves, in which lane, and when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    pipelines: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Bundle name, version, checksum and DEMO flag per pipeline as the worker loaded them.
    bundles: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    lane: Mapped[str] = mapped_column(String(16), default="all")  # all | urgent
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "pipeline", "study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer, default=1)
    pipeline: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING.value, index=True)
    # The broker's number for priority_class (pacs_agent.scheduling.priority): 0 is served first.
    priority: Mapped[int] = mapped_column(Integer, default=6)
    priority_class: Mapped[str] = mapped_column(String(16), default="routine")
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    notify: Mapped[list[str]] = mapped_column(JSON, default=list)  # channel names or URLs
    rule_name: Mapped[str | None] = mapped_column(String(128))
    rule_version: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    triage: Mapped[str | None] = mapped_column(String(16))  # routine | urgent | critical
    bundle_checksum: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The lease of a running job: the worker holding it and its last heartbeat. A running job
    # whose heartbeat is older than the heartbeat timeout lost its worker and may be taken back.
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), index=True)
    # Images of the job that got no output (not decodable, not analysable, no object could be
    # written); the job is still done with the others: "done with N images skipped".
    images_skipped: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job")


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | seg | sc
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    source_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    # The frame of a multi-frame source the output was made from (1-based); None: single frame.
    source_frame: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    result: Mapped[Result] = relationship(back_populates="deliveries")


class Event(Base):
    """An audit trail an admin can read: what happened to each study and job, and why."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    level: Mapped[str] = mapped_column(String(8), default="info")
    duration_s: Mapped[float | None] = mapped_column(Float)


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Notification(Base):
    """One triage notification: sent once per study version and channel, retried like deliveries."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("study_id", "study_version", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer, default=1)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    channel: Mapped[str] = mapped_column(Text)  # URL (credentials never shown back)
    level: Mapped[str] = mapped_column(String(16))  # urgent | critical
    priority: Mapped[int] = mapped_column(Integer, default=6)  # broker number: 0 first
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | operator | viewer
    password_hash: Mapped[str | None] = mapped_column(Text)  # Argon2id
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))  # shown to admins to tell tokens apart
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class UserSession(Base):
    """A console login: the cookie holds a random id whose SHA-256 is stored here."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """Who changed what and when: logins, rules (before/after), destinations, pipelines, users,
    retries and re-runs. Never patient data."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(64))  # user name, or None for the system
    action: Mapped[str] = mapped_column(String(32))  # e.g. rule.update, login.failure
    target_type: Mapped[str | None] = mapped_column(String(32))  # rule | destination | ...
    target: Mapped[str | None] = mapped_column(String(128))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(Text)


class AgentFlag(Base):
    """Switches an operator flips at run time (e.g. processing suspended)."""

    __tablename__ = "agent_flags"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class PullStatus(enum.StrEnum):
    PENDING = "pending"  # persisted; the agent's loop pulls it (again after a backoff)
    RUNNING = "running"  # an agent holds it until lease_until
    DONE = "done"
    FAILED = "failed"  # gave up after the last attempt; shown with its reason


class PullRequestRow(Base):
    """A study Orthanc said is stable, persisted before the webhook answers 202 and pulled from
    the agent's loop with backoff, so an agent restart loses nothing."""

    __tablename__ = "pull_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    orthanc_study_id: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    status: Mapped[str] = mapped_column(String(16), default=PullStatus.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Refusal(Base):
    """An instance a door refused (C-STORE failure status, STOW-RS failed SOP, pull refusal):
    what an admin sees instead of a log line. UIDs and reasons only, never patient data."""

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    door: Mapped[str] = mapped_column(String(16))  # dimse | stow | orthanc
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    sender_address: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)  # None when unreadable
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    status: Mapped[int] = mapped_column(Integer)  # the DIMSE status (e.g. 0xA900, 0xC000)
    reason: Mapped[str] = mapped_column(Text)


class Embedding(Base):
    """The CLS embedding of one analysed image (similar-case retrieval, pacs_agent.retrieval):
    a unit float32 vector, written with the job's results. Vectors of different bundles
    (``bundle_checksum``) are never compared."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "bundle_checksum"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    bundle_checksum: Mapped[str] = mapped_column(String(64), index=True)
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # dim little-endian float32, unit norm
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FairnessObservation(Base):
    """fairness: one analysed image's outcome for one finding, with its coarse subgroup bins
    (pacs_agent.fairness). Bounded values only, never patient data; aggregated on read into
    prediction rates per subgroup, removed after the monitor's window and baseline."""

    __tablename__ = "fairness_observations"
    __table_args__ = (UniqueConstraint("bundle_checksum", "sop_instance_uid", "finding"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, index=True)  # UTC day the result was stored
    pipeline: Mapped[str] = mapped_column(String(128))
    bundle_checksum: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)  # the analysed image: counted once
    finding: Mapped[str] = mapped_column(String(128))
    positive: Mapped[bool] = mapped_column(Boolean)
    sex: Mapped[str] = mapped_column(String(8))  # M | F | O | unknown
    age_band: Mapped[str] = mapped_column(String(8))  # 0-17 | 18-39 | 40-64 | 65+ | unknown
    manufacturer: Mapped[str] = mapped_column(String(32))  # a fixed vendor set, other, unknown
    view: Mapped[str] = mapped_column(String(8))  # PA | AP | LAT | other | unknown
    calling_ae: Mapped[str] = mapped_column(String(16))  # the study's calling AE, or unknown
