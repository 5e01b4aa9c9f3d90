"""Prometheus metrics of the agent and the workers: every metric is defined here, once.

Instrumentation elsewhere is a one-line call into this module. Label values come from small,
fixed sets (doors, stages, outcomes, reason categories, priority classes, pipeline queues an
admin defines); never a UID, a name or free text: patient data must not reach a metric, and
unbounded label values would grow Prometheus without end.

The agent serves its registry at ``GET /metrics`` (pacs_agent/api/routes/metrics.py), with the
queue depth read from the jobs table at scrape time (:class:`QueueDepthCollector`); a worker
serves its own registry on ``PACS_AGENT_WORKER_METRICS_PORT`` (workers/celery_app.py). A worker
runs Celery's solo pool, so the process that does the work is the one that serves its metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pacs_agent.db.session import Database

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# The bounded label values. Anything else is counted as "other".
DOORS = ("dimse", "stow", "orthanc", "repair")
STAGES = ("fetch_decode", "encoder", "writers", "delivery")
DELIVERY_OUTCOMES = ("done", "retry", "failed")
NOTIFY_OUTCOMES = ("sent", "retry", "failed")
DESTINATION_KINDS = ("dicom", "dicomweb", "orthanc", "file")
CHANNEL_KINDS = ("webhook", "mllp", "orthanc")
# Why a door refused an instance, from its DIMSE failure status.
REFUSAL_CATEGORIES = {
    0xA700: "out_of_resources",
    0xA900: "dataset_mismatch",
    0xC210: "cannot_understand",
    0xC211: "processing_failure",
    0x0122: "sop_class_not_supported",
}
# Why a job failed or was skipped, by the step that failed.
FAILURE_CATEGORIES = ("fetch_decode", "model", "outputs", "delivery", "quality_control")
JOB_OUTCOMES = ("done", "failed", "skipped", "delivering")
OTHER = "other"

# Seconds: C-STORE to result is seconds to minutes; completion waits for the quiet period.
_LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800)
_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300)

INSTANCES_RECEIVED = Counter(
    "pacs_agent_instances_received",
    "Instances stored and recorded, per door (dimse, stow, orthanc).",
    ["door"],
)
BYTES_RECEIVED = Counter(
    "pacs_agent_received_bytes",
    "Bytes of the instances stored, per door.",
    ["door"],
)
REFUSALS = Counter(
    "pacs_agent_refusals",
    "Instances a door refused, per door and reason category (from the DIMSE status).",
    ["door", "category"],
)
COMPLETION_LATENCY = Histogram(
    "pacs_agent_study_completion_seconds",
    "From a study version's first instance received to its completion.",
    buckets=_LATENCY_BUCKETS,
)
STUDIES_COMPLETED = Counter(
    "pacs_agent_studies_completed",
    "Study versions completed and routed, by what routing decided (process or skip).",
    ["decision"],
)
JOB_STAGE = Histogram(
    "pacs_agent_job_stage_seconds",
    "Time a worker spends in each stage of a job (fetch_decode and encoder per batch).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
JOBS_FINISHED = Counter(
    "pacs_agent_jobs_finished",
    "Jobs a worker finished, by outcome (done, failed, skipped, delivering).",
    ["outcome"],
)
FAILURES = Counter(
    "pacs_agent_failures",
    "Job failures and skips on the workers, by reason category (the step that failed).",
    ["category"],
)
DELIVERIES = Counter(
    "pacs_agent_deliveries",
    "Delivery attempts of a job's results to one destination, by destination kind and outcome.",
    ["kind", "outcome"],
)
NOTIFICATIONS = Counter(
    "pacs_agent_notifications",
    "Triage notification attempts, by channel kind and outcome.",
    ["kind", "outcome"],
)
# Set by the fairness monitor's pass (pacs_agent.fairness.check) in the agent. Findings come from
# the bundles' label lists and dimensions from a fixed set: bounded; subgroup values are not labels.
FAIRNESS_FLAGS = Gauge(
    "pacs_agent_fairness_flags",
    "Subgroups whose positive prediction rate drifted past the margin, by finding and dimension.",
    ["finding", "dimension"],
)


def _bounded(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def _scheme_kind(url: str, kinds: tuple[str, ...]) -> str:
    """The kind of a destination or channel URL from its scheme only (never its host or path):
    ``dicom+tls://`` -> dicom, ``dicomweb+https://`` -> dicomweb, ``webhook+http://`` -> webhook."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return _bounded(scheme.split("+", 1)[0], kinds)


# One-line calls for the rest of the code ------------------------------------------------------


def received(door: str, size: int) -> None:
    """An instance was stored and recorded (ingest)."""
    label = _bounded(door, DOORS)
    INSTANCES_RECEIVED.labels(label).inc()
    BYTES_RECEIVED.labels(label).inc(max(size, 0))


def refused(door: str, status: int) -> None:
    """A door refused an instance with this DIMSE failure status."""
    REFUSALS.labels(_bounded(door, DOORS), REFUSAL_CATEGORIES.get(status, OTHER)).inc()


def completed(first_received_at: dt.datetime | None, decision: str) -> None:
    """A study version was completed and routed (``decision``: process or skip)."""
    STUDIES_COMPLETED.labels(_bounded(decision, ("process", "skip"))).inc()
    if first_received_at is not None:
        elapsed = (dt.datetime.now(dt.UTC) - first_received_at).total_seconds()
        COMPLETION_LATENCY.observe(max(elapsed, 0.0))


def stage_seconds(stage: str, seconds: float) -> None:
    JOB_STAGE.labels(_bounded(stage, STAGES)).observe(max(seconds, 0.0))


def timed(stage: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``fn`` and record its duration as job stage ``stage`` (also when it raises)."""
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs)
    finally:
        stage_seconds(stage, time.monotonic() - t0)


def fairness_flags(flags: dict[tuple[str, str], int]) -> None:
    """The fairness monitor's latest pass: flagged subgroups per (finding, dimension), 0
    included for every pair it evaluated; pairs no longer evaluated are dropped."""
    FAIRNESS_FLAGS.clear()
    for (finding, dimension), count in sorted(flags.items()):
        FAIRNESS_FLAGS.labels(finding=finding, dimension=dimension).set(count)


def job_finished(outcome: str) -> None:
    JOBS_FINISHED.labels(_bounded(outcome, JOB_OUTCOMES)).inc()


def failure(category: str) -> None:
    FAILURES.labels(_bounded(category, FAILURE_CATEGORIES)).inc()


def delivery(url: str, outcome: str) -> None:
    """One delivery attempt to a destination (``url``: only its scheme is kept)."""
    DELIVERIES.labels(
        _scheme_kind(url, DESTINATION_KINDS), _bounded(outcome, DELIVERY_OUTCOMES)
    ).inc()


def notification(url: str, outcome: str) -> None:
    """One notification attempt on a channel (``url``: only its scheme is kept)."""
    NOTIFICATIONS.labels(_scheme_kind(url, CHANNEL_KINDS), _bounded(outcome, NOTIFY_OUTCOMES)).inc()


# Queue depth, read at scrape time ------------------------------------------------------------

QUEUE_DEPTH = "pacs_agent_queue_depth"
WAITING_STATUSES = ("pending", "queued", "running", "delivering")


class QueueDepthCollector(Collector):
    """Jobs per broker queue, priority class and status, counted in the jobs table when
    Prometheus scrapes (the database is the queue of record; the broker only wakes workers)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(QUEUE_DEPTH, "", labels=["queue", "priority_class", "status"])

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from pacs_agent.db.models import Job
        from pacs_agent.scheduling import priority
        from pacs_agent.scheduling.pipelines import queue_name

        family = GaugeMetricFamily(
            QUEUE_DEPTH,
            "Jobs waiting or running, per broker queue, priority class and status (jobs table).",
            labels=["queue", "priority_class", "status"],
        )
        try:
            with self.db.session() as s:
                rows = s.execute(
                    select(Job.pipeline, Job.priority_class, Job.status, func.count())
                    .where(Job.status.in_(WAITING_STATUSES))
                    .group_by(Job.pipeline, Job.priority_class, Job.status)
                ).all()
        except Exception:
            log.warning("queue depth: the jobs table could not be read")
            return
        depth: dict[tuple[str, str, str], int] = {}
        for pipeline, cls, status, count in rows:
            cls = cls if cls in priority.CLASSES else OTHER
            key = (queue_name(pipeline, priority.broker_number(cls)), cls, status)
            depth[key] = depth.get(key, 0) + int(count)
        for (queue, cls, status), count in sorted(depth.items()):
            family.add_metric([queue, cls, status], count)
        yield family


def render(db: Database | None = None) -> bytes:
    """The exposition text of this process's metrics, plus the queue depth when ``db`` is given."""
    out = generate_latest(REGISTRY)
    if db is not None:
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(QueueDepthCollector(db))
        out += generate_latest(scrape)
    return out


def metric_names() -> set[str]:
    """Every series name this module exposes (histograms with their _bucket/_sum/_count,
    counters with _total), for checks such as the dashboard test."""
    names = {QUEUE_DEPTH}
    for collector in (
        INSTANCES_RECEIVED,
        BYTES_RECEIVED,
        REFUSALS,
        COMPLETION_LATENCY,
        STUDIES_COMPLETED,
        JOB_STAGE,
        JOBS_FINISHED,
        FAILURES,
        DELIVERIES,
        NOTIFICATIONS,
        FAIRNESS_FLAGS,
    ):
        for family in collector.describe():
            if family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
            elif family.type == "counter":
                names.update({f"{family.name}_total", f"{family.name}_created"})
            else:
                names.add(family.name)
    return names
