"""``/api/queue``: what waits for which pipeline at which priority, who works, and the switch
that suspends processing (agent flag ``processing_suspended``, honoured by the dispatch loop:
nothing new is sent to the workers while it is set; running jobs finish)."""

from __future__ import annotations

import datetime as dt
import logging
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator, Viewer, get_state
from pacs_agent.audit import record_audit
from pacs_agent.db.models import AgentFlag, Job, JobStatus, utcnow
from pacs_agent.scheduling import priority
from pacs_agent.scheduling.dispatch import SUSPEND_FLAG, processing_suspended
from pacs_agent.scheduling.pipelines import QUEUE_PREFIX, live_workers

log = logging.getLogger(__name__)
router = APIRouter(tags=["queue"])

ALIVE_WITHIN_S = 60.0
WAITING = (JobStatus.PENDING.value, JobStatus.QUEUED.value)
AUTH = AUTH_RESPONSES


class Depth(BaseModel):
    pipeline: str
    priority_class: str
    pending: int = Field(description="in the database, not yet sent to the broker")
    queued: int = Field(description="sent to the broker, waiting for a worker")
    running: int


class WorkerOut(BaseModel):
    name: str
    pipelines: list[str]
    lane: str
    started_at: dt.datetime
    last_seen_at: dt.datetime


class Unserved(BaseModel):
    pipeline: str
    waiting: int = Field(description="pending and queued jobs that no live worker will take")


class BrokerOut(BaseModel):
    reachable: bool | None = Field(description="null: not a Redis broker, not asked")
    queues: dict[str, int] = Field(
        default_factory=dict, description="messages per broker queue (all priorities)"
    )
    error: str | None = None


class QueueOut(BaseModel):
    suspended: bool
    depth: list[Depth]
    totals: dict[str, int]
    workers: list[WorkerOut]
    unserved: list[Unserved]
    broker: BrokerOut


class SuspendOut(BaseModel):
    suspended: bool


def _depth(s: Session) -> list[Depth]:
    rows = s.execute(
        select(Job.pipeline, Job.priority_class, Job.status, func.count(Job.id))
        .where(Job.status.in_((*WAITING, JobStatus.RUNNING.value)))
        .group_by(Job.pipeline, Job.priority_class, Job.status)
    ).all()
    cells: dict[tuple[str, str], dict[str, int]] = {}
    for pipeline, cls, status, n in rows:
        cell = cells.setdefault(
            (str(pipeline), str(cls)), {"pending": 0, "queued": 0, "running": 0}
        )
        cell[str(status)] = int(n)
    return [
        Depth(pipeline=p, priority_class=c, **cells[(p, c)])
        for p, c in sorted(cells, key=lambda k: (k[0], priority.rank(k[1])))
    ]


def _redis_url(broker_url: str) -> str | None:
    scheme = urlsplit(broker_url).scheme
    if scheme == "redis+socket":
        return "unix://" + broker_url.split("://", 1)[1]
    if scheme in ("redis", "rediss", "unix"):
        return broker_url
    return None


def broker_lengths(broker_url: str, timeout_s: float = 1.0) -> BrokerOut:
    """Lengths of the pipeline queues in a Redis broker (kombu keeps one list per priority step,
    ``<queue>`` and ``<queue>:<n>``; they are summed per queue). Optional: a broker that does not
    answer within ``timeout_s`` says so and nothing else fails."""
    url = _redis_url(broker_url)
    if url is None:
        return BrokerOut(reachable=None)
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        queues: dict[str, int] = {}
        for key in client.scan_iter(match=f"{QUEUE_PREFIX}.*", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            if client.type(name) not in (b"list", "list"):
                continue
            base, sep, step = name.rpartition(":")
            queue = base if sep and step.isdigit() else name
            queues[queue] = queues.get(queue, 0) + int(client.llen(name))
            if len(queues) > 1000:
                break
        return BrokerOut(reachable=True, queues=dict(sorted(queues.items())))
    except redis.RedisError as exc:
        return BrokerOut(reachable=False, error=type(exc).__name__)
    finally:
        client.close()


@router.get("/api/queue", response_model=QueueOut, responses=AUTH)
def get_queue(request: Request, s: DbSession, _who: Viewer) -> QueueOut:
    depth = _depth(s)
    workers = live_workers(s, ALIVE_WITHIN_S)
    serving = {p for w in workers for p in (w.pipelines or [])}
    waiting: dict[str, int] = {}
    for d in depth:
        waiting[d.pipeline] = waiting.get(d.pipeline, 0) + d.pending + d.queued
    totals = {k: sum(getattr(d, k) for d in depth) for k in ("pending", "queued", "running")}
    settings = get_state(request).settings
    return QueueOut(
        suspended=processing_suspended(s),
        depth=depth,
        totals=totals,
        workers=[
            WorkerOut(
                name=w.name,
                pipelines=list(w.pipelines or []),
                lane=w.lane,
                started_at=w.started_at,
                last_seen_at=w.last_seen_at,
            )
            for w in workers
        ],
        unserved=[
            Unserved(pipeline=p, waiting=n)
            for p, n in sorted(waiting.items())
            if n and p not in serving
        ],
        broker=broker_lengths(settings.resolved_broker_url),
    )


def _set_suspended(s: Session, who: str, value: bool) -> SuspendOut:
    before = processing_suspended(s)
    flag = s.get(AgentFlag, SUSPEND_FLAG)
    if flag is None:
        flag = AgentFlag(key=SUSPEND_FLAG)
        s.add(flag)
    flag.value = value
    flag.updated_at = utcnow()
    flag.updated_by = who
    if before != value:
        record_audit(
            s,
            who,
            "queue.suspend" if value else "queue.resume",
            target_type="queue",
            target=SUSPEND_FLAG,
            before={SUSPEND_FLAG: before},
            after={SUSPEND_FLAG: value},
        )
        log.info("processing %s by %s", "suspended" if value else "resumed", who)
    return SuspendOut(suspended=value)


@router.post("/api/queue/suspend", response_model=SuspendOut, responses=AUTH)
def suspend(s: DbSession, who: Operator) -> SuspendOut:
    """Stop sending jobs to the workers (running jobs finish; new ones wait as pending)."""
    return _set_suspended(s, who.name, True)


@router.post("/api/queue/resume", response_model=SuspendOut, responses=AUTH)
def resume(s: DbSession, who: Operator) -> SuspendOut:
    return _set_suspended(s, who.name, False)
