"""Pipelines and the workers that serve them.

A pipeline is a named model bundle (the ``pipelines`` table). Each has two broker queues:
``pipeline.<name>`` and ``pipeline.<name>.urgent`` (stat and urgent jobs). A worker serves the
enabled pipelines whose bundle folder it has (a ``manifest.json`` on its host), optionally
restricted by ``PACS_AGENT_WORKER_PIPELINES``, and says so every few seconds in the ``workers``
table (its heartbeat), so the console can show which pipelines no live worker serves.

No torch here: the agent imports this module.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Pipeline, WorkerBeat, utcnow
from pacs_agent.scheduling import priority
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

QUEUE_PREFIX = "pipeline"
URGENT_SUFFIX = ".urgent"
MANIFEST = "manifest.json"


def queue_name(pipeline: str, priority_number: int | None = None) -> str:
    """The broker queue of a job: the pipeline's urgent queue for stat and urgent jobs."""
    base = f"{QUEUE_PREFIX}.{pipeline}"
    if priority_number is not None and priority_number <= priority.broker_number("urgent"):
        return base + URGENT_SUFFIX
    return base


def worker_queues(pipelines: list[str], lane: str) -> list[str]:
    """The queues a worker consumes: both per pipeline on lane ``all``, the urgent ones only on
    the reserved lane ``urgent``."""
    out: list[str] = []
    for name in pipelines:
        if lane != "urgent":
            out.append(queue_name(name))
        out.append(queue_name(name) + URGENT_SUFFIX)
    return out


def seed_default_pipeline(s: Session, settings: Settings) -> bool:
    """An empty pipelines table gets the default pipeline with the configured bundle, so that a
    deployment that only sets PACS_AGENT_BUNDLE keeps working. True when a row was added."""
    if s.scalar(select(Pipeline.id).limit(1)) is not None:
        return False
    s.add(
        Pipeline(
            name=settings.default_pipeline,
            bundle=str(settings.resolved_bundle),
            description="default pipeline (PACS_AGENT_BUNDLE)",
            enabled=True,
        )
    )
    s.flush()
    log.info("pipelines: seeded %r with %s", settings.default_pipeline, settings.resolved_bundle)
    return True


def has_bundle(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / MANIFEST).is_file()


def pipelines_on_host(s: Session, settings: Settings) -> dict[str, Path]:
    """The enabled pipelines this host can run: name -> bundle folder. An empty table means the
    default pipeline with the configured bundle (as before pipelines existed)."""
    rows = list(s.scalars(select(Pipeline).order_by(Pipeline.name)))
    if rows:
        found = {r.name: Path(r.bundle).expanduser() for r in rows if r.enabled}
    else:
        found = {settings.default_pipeline: settings.resolved_bundle}
    wanted = settings.worker_pipelines
    if wanted:
        found = {k: v for k, v in found.items() if k in wanted}
    usable = {k: v for k, v in found.items() if has_bundle(v)}
    for name in sorted(set(found) - set(usable)):
        log.warning("pipeline %s: no bundle at %s on this host, not served", name, found[name])
    return usable


def beat(
    s: Session,
    name: str,
    *,
    pipelines: list[str],
    bundles: dict[str, Any],
    lane: str,
    started_at: dt.datetime | None = None,
) -> None:
    """Insert or refresh a worker's heartbeat row."""
    now = utcnow()
    row = s.scalar(select(WorkerBeat).where(WorkerBeat.name == name))
    if row is None:
        row = WorkerBeat(name=name, started_at=started_at or now)
        s.add(row)
    row.pipelines = list(pipelines)
    row.bundles = dict(bundles)
    row.lane = lane
    row.last_seen_at = now
    if started_at is not None:
        row.started_at = started_at


def live_workers(s: Session, alive_within_s: float = 60.0) -> list[WorkerBeat]:
    cutoff = utcnow() - dt.timedelta(seconds=alive_within_s)
    return list(
        s.scalars(
            select(WorkerBeat).where(WorkerBeat.last_seen_at >= cutoff).order_by(WorkerBeat.name)
        )
    )


def served_pipelines(s: Session, alive_within_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """Pipeline name -> the live workers serving it (name, lane, bundle as that worker loaded
    it, last_seen_at). A pipeline absent from the result has no live worker: its jobs wait."""
    out: dict[str, list[dict[str, Any]]] = {}
    for w in live_workers(s, alive_within_s):
        for p in w.pipelines or []:
            out.setdefault(p, []).append(
                {
                    "name": w.name,
                    "lane": w.lane,
                    "bundle": (w.bundles or {}).get(p),
                    "last_seen_at": w.last_seen_at,
                }
            )
    return out
