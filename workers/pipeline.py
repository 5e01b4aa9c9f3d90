"""Process jobs: fetch the study's images from the agent, run the pipeline's model, write and
deliver DICOM SR, SEG and heatmap Secondary Captures. Called by the thin Celery task.

A broker message is a wake-up token: the worker claims from the database the most urgent queued
job of the message's pipeline (pacs_agent.scheduling.claims: class, aging, offpeak window, lane),
plus queued jobs of the same class for one model pass; a stat job runs alone. After inference the
bundle's triage policy gives the job's triage level, which can raise (never lower) its class.

Idempotent: output UIDs derive from (source, bundle version, kind), results are upserted by SOP
Instance UID, and deliveries already done are not repeated.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pacs_agent import fairness, metrics
from pacs_agent.db.models import (
    Instance,
    Job,
    JobStatus,
    Result,
    Study,
    StudyStatus,
    utcnow,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.destinations import configured_urls, resolve_reference
from pacs_agent.dispatching.delivery import deliver_job_results
from pacs_agent.dispatching.senders import AssociationPool, client_tls_context
from pacs_agent.receiving.store import fsync_dir
from pacs_agent.scheduling import claims as claim_rules
from pacs_agent.scheduling import leases as job_leases
from pacs_agent.scheduling import priority
from pacs_agent.scheduling.leases import Token, fence
from pacs_agent.scheduling.pipelines import queue_name
from pacs_agent.settings import Settings
from workers.dicom_out.outputs import OutputOptions, OutputSet, build_output_set
from workers.leases import JobLeases
from workers.overlap import Group, run_overlapped
from workers.reasons import hide_value_warnings, reason_for, trace
from workers.results import AlgorithmInfo, ImageResult

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    # Pipeline name -> bundle folder on this host (set when the worker starts; looked up in the
    # pipelines table when a job names one that is not here yet).
    bundles: dict[str, Path] = field(default_factory=dict)
    _runners: dict[str, object] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _celery: Any = None
    # This worker's name (its heartbeat row), named in each job's "job.running" event.
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _leases: JobLeases | None = None
    # Input size -> this process's decode pool (processes; threads when decoding on a GPU),
    # kept for the worker's life; the associations to C-STORE destinations kept between jobs.
    _pools: dict[int, Any] = field(default_factory=dict)
    _associations: AssociationPool | None = None

    def decode_pool(self, size: int) -> Any:
        """The process's `DecodePool` for input ``size`` (started with the first job)."""
        from workers.decode_pool import DecodePool

        with self._lock:
            pool = self._pools.get(size)
            if pool is None:
                workers = self.settings.resolved_decode_workers
                pool = DecodePool(
                    size,
                    workers=workers,
                    prefetch=2 * workers,
                    prefer_gpu=self.settings.worker_device != "cpu",
                    # The worker has threads (leases, broker) and maybe CUDA: no fork of it.
                    start_method="spawn",
                    reduced=self.settings.decode_resolution == "reduced",
                )
                log.info(
                    "decode pool: %d %s for %d px inputs",
                    workers,
                    "GPU threads" if pool.prefer_gpu else "processes",
                    size,
                )
                self._pools[size] = pool
            return pool

    def drop_decode_pool(self, size: int) -> None:
        """Close a pool that failed (a crashed process breaks it); the next job starts one."""
        with self._lock:
            pool = self._pools.pop(size, None)
        if pool is not None:
            pool.close()

    @property
    def associations(self) -> AssociationPool:
        with self._lock:
            if self._associations is None:
                self._associations = AssociationPool(self.settings.dicom_association_idle_s)
            return self._associations

    @property
    def leases(self) -> JobLeases:
        """The jobs this process holds; their heartbeat thread starts with the first one."""
        with self._lock:
            if self._leases is None:
                self._leases = JobLeases(self.db, self.settings.job_heartbeat_s)
            return self._leases

    @property
    def lane(self) -> str:
        return self.settings.worker_lane

    def bundle_for(self, pipeline: str) -> Path:
        if pipeline in self.bundles:
            return self.bundles[pipeline]
        from pacs_agent.scheduling.pipelines import pipelines_on_host

        with self.db.session() as s:
            self.bundles.update(pipelines_on_host(s, self.settings))
        if pipeline not in self.bundles:
            raise JobError(f"pipeline {pipeline!r} has no bundle on this worker host")
        return self.bundles[pipeline]

    def runner(self, pipeline: str | None = None):  # type: ignore[no-untyped-def]
        """The pipeline's model, loaded lazily once per worker process (never at import)."""
        name = pipeline or self.settings.default_pipeline
        with self._lock:
            if name not in self._runners:
                from workers.models.bundle import load_bundle
                from workers.models.runner import ModelRunner

                bundle = load_bundle(self.bundle_for(name))
                device = self.settings.worker_device
                if device == "auto":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                # Per-label activation maps are not written anywhere yet: leave them off
                # (full-size float maps, about 72 MB per radiograph for five labels).
                self._runners[name] = ModelRunner(
                    bundle,
                    device=device,
                    dtype=self.settings.worker_dtype,
                    batch_size=self.settings.worker_batch_size,
                    cam=False,
                    tf32=self.settings.worker_tf32,
                    compile=self.settings.torch_compile,
                )
                log.info(
                    "pipeline %s: bundle %s %s loaded on %s",
                    name,
                    bundle.name,
                    bundle.version,
                    device,
                )
            return self._runners[name]

    def wake(
        self, job_id: int, job_priority: int, pipeline: str, *, queue: str | None = None
    ) -> None:
        """Send a wake-up message for a job (a token handed on: see ``process``)."""
        from pacs_agent.queue import TASK_PROCESS_JOB, make_celery

        if self._celery is None:
            self._celery = make_celery(self.settings)
        self._celery.send_task(
            TASK_PROCESS_JOB,
            args=[job_id],
            queue=queue or queue_name(pipeline, job_priority),
            priority=job_priority,
            retry=False,
        )


_CONTEXT: WorkerContext | None = None


def get_context(settings: Settings) -> WorkerContext:
    global _CONTEXT
    if _CONTEXT is None:
        hide_value_warnings()  # no header values in the worker's log (workers/reasons.py)
        _CONTEXT = WorkerContext(settings, Database(settings.resolved_database_url))
    return _CONTEXT


class JobError(Exception):
    pass


class LeaseLost(Exception):
    """The job is no longer this worker's claim (taken back, or claimed by another worker)."""


_HTTP: dict[int, httpx.Client] = {}  # pid -> this worker process's client to the agents
_HTTP_LOCK = threading.Lock()


def agent_client() -> httpx.Client:
    """One HTTP client per worker process, shared by all its jobs: its connections to the
    agents stay open between images and jobs (keep-alive), and a connection that fails to open
    is retried by the transport. A forked child makes its own (sockets are not shared)."""
    pid = os.getpid()
    with _HTTP_LOCK:
        client = _HTTP.get(pid)
        if client is None:
            client = httpx.Client(
                transport=httpx.HTTPTransport(retries=2),
                timeout=httpx.Timeout(60.0, connect=10.0),
                limits=httpx.Limits(max_keepalive_connections=8, keepalive_expiry=60.0),
            )
            _HTTP.clear()  # a parent's client, inherited over fork, is never used here
            _HTTP[pid] = client
        return client


def fetch_instance_bytes(settings: Settings, sop_uid: str, db: Database | None = None) -> bytes:
    """The instance's file, over HTTP from the agent that stored it (``instances.stored_by``;
    with several agents each holds its own); the configured agent URL when the row names none
    or no database is given. Workers share no folder with any agent. Over the process's
    shared client (`agent_client`). An agent that is restarting (connection refused, dropped,
    5xx) is waited for up to ``agent_fetch_wait_s`` with backoff while the job keeps its lease
    (the heartbeat thread runs meanwhile): a restart must not fail a job for good."""
    agent = settings.resolved_agent_url
    if db is not None:
        with db.session() as s:
            stored_by = s.scalar(
                select(Instance.stored_by).where(Instance.sop_instance_uid == sop_uid)
            )
        agent = (stored_by or agent).rstrip("/")
    headers = {"authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    url = f"{agent}/api/instances/{sop_uid}"
    last: Exception | None = None
    deadline = time.monotonic() + settings.agent_fetch_wait_s
    attempt = 0
    while True:
        try:
            r = agent_client().get(url, headers=headers)
            if r.status_code == 200:
                return r.content
            last = JobError(f"agent answered {r.status_code} for instance {sop_uid}")
            if r.status_code < 500:  # 404/410 gone, 401/403 refused: waiting will not help
                break
        except httpx.HTTPError as exc:
            last = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0 * 2**attempt, 10.0, max(deadline - time.monotonic(), 0.0)))
        attempt += 1
    raise JobError(f"cannot fetch instance {sop_uid}: {last}")


def fetch_instance(settings: Settings, sop_uid: str, db: Database | None = None) -> Dataset:
    """`fetch_instance_bytes`, read as a dataset."""
    return dcmread(io.BytesIO(fetch_instance_bytes(settings, sop_uid, db)))


def triage_level(results: list[ImageResult], policy: Any = None) -> str:
    """The study's triage level from its findings under the bundle's triage policy
    (workers.models.bundle.TriagePolicy; None: a present finding is urgent, none critical)."""
    from workers.models.bundle import triage_level as level_of

    return level_of(
        [(f.label, f.probability, f.present) for r in results for f in r.findings], policy
    )


def _write(root: Path, ds: Dataset) -> str:
    folder = root / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{ds.SOPInstanceUID}.dcm"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(folder)
    return target.relative_to(root).as_posix()


@dataclass
class ClaimedJob:
    job_id: int
    study_id: int
    study_version: int
    destinations: list[str]
    sops: list[str]
    priority_class: str = "routine"
    # The claim's token (pacs_agent.scheduling.leases): who holds the job, for which attempt.
    worker: str = ""
    attempt: int = 0

    @property
    def token(self) -> Token:
        return Token(self.job_id, self.worker, self.attempt)


def _load_claimed(s: Session, job: Job, note: str) -> ClaimedJob:
    sops = list(
        s.scalars(
            select(Instance.sop_instance_uid)
            .where(
                Instance.study_id == job.study_id,
                Instance.study_version == job.study_version,
                Instance.analysable.is_(True),
            )
            .order_by(Instance.id)
        )
    )
    record_event(
        s,
        "job.running",
        f"attempt {job.attempts}, {len(sops)} images{note}",
        study_id=job.study_id,
        job_id=job.id,
    )
    return ClaimedJob(
        job.id,
        job.study_id,
        job.study_version,
        list(job.destinations),
        sops,
        job.priority_class or priority.DEFAULT_CLASS,
        job.worker or "",
        job.attempts,
    )


def _claimable_filter(
    pipeline: str,
    now: dt.datetime,
    lease: dt.timedelta,
    heartbeat_timeout: dt.timedelta | None = None,
) -> Any:
    """Queued jobs of the pipeline, and running ones whose worker is gone: heartbeat older than
    ``heartbeat_timeout`` (killed or paused), or started longer ago than ``lease`` (the backstop
    for a hung worker whose heartbeat thread still beats)."""
    return and_(
        Job.pipeline == pipeline,
        or_(
            Job.status == JobStatus.QUEUED.value,
            job_leases.lost_filter(now, heartbeat_timeout or lease, lease),
        ),
    )


def claim_jobs(
    db: Database,
    pipeline: str,
    *,
    lease: dt.timedelta,
    heartbeat_timeout: dt.timedelta | None = None,
    lane: str = "all",
    aging_s: float = 600.0,
    offpeak_window: str | None = None,
    batch_size: int = 1,
    now: dt.datetime | None = None,
    above: str | None = None,
    worker: str | None = None,
) -> list[ClaimedJob]:
    """Claim the most urgent claimable job of ``pipeline`` and up to ``batch_size - 1`` more of
    its class (pacs_agent.scheduling.claims). Each claim writes the worker's name, the attempt
    and a first heartbeat (the lease, pacs_agent.scheduling.leases) with a guarded UPDATE; on
    PostgreSQL the chosen rows are locked first with ``SELECT ... FOR UPDATE SKIP LOCKED``, so
    two workers never take the same job nor wait for each other. ``above``: only jobs of a class
    more urgent than this one (an interjection between the jobs of a batch). Empty when there
    is nothing this worker may take."""
    me = worker or f"{socket.gethostname()}:{os.getpid()}"
    skip_locked = db.engine.dialect.name == "postgresql"
    is_open = offpeak_window is None or claim_rules.offpeak_open(offpeak_window)
    skipped: set[int] = set()  # rows another worker is claiming now (PostgreSQL)
    for round_ in range(10):  # another worker may take the head first: look again
        at = now or utcnow()
        claimable = _claimable_filter(pipeline, at, lease, heartbeat_timeout)
        with db.session() as s:
            rows = s.execute(
                select(Job.id, Job.priority_class, Job.enqueued_at, Job.created_at).where(claimable)
            ).all()
        candidates = [
            claim_rules.Candidate(jid, cls or priority.DEFAULT_CLASS, enq or created or at)
            for jid, cls, enq, created in rows
        ]
        if above is not None:
            candidates = [
                c for c in candidates if priority.rank(c.priority_class) < priority.rank(above)
            ]
        ordered = claim_rules.order(
            candidates, now=at, aging_s=aging_s, lane=lane, offpeak_is_open=is_open
        )
        chosen = claim_rules.batch([c for c in ordered if c.job_id not in skipped], batch_size)
        if not chosen:
            return []
        claimed: list[ClaimedJob] = []
        head_id = chosen[0].job_id
        with db.session() as s:
            ids = [c.job_id for c in chosen]
            if skip_locked:  # rows another worker is claiming right now are skipped, not waited
                locked = set(
                    s.scalars(
                        select(Job.id)
                        .where(Job.id.in_(ids), claimable)
                        .with_for_update(skip_locked=True)
                    )
                )
                skipped.update(c.job_id for c in chosen if c.job_id not in locked)
                chosen = [c for c in chosen if c.job_id in locked]
            for c in chosen:
                started = utcnow()
                taken = s.execute(  # type: ignore[attr-defined]
                    update(Job)
                    .where(Job.id == c.job_id, claimable)
                    .values(
                        status=JobStatus.RUNNING.value,
                        attempts=Job.attempts + 1,
                        started_at=started,
                        heartbeat_at=started,
                        worker=me,
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount
                if taken != 1:
                    continue
                note = "" if c.job_id == head_id else f", batched with job {head_id}"
                note += f", worker {me} ({lane} lane)"
                job = s.get_one(Job, c.job_id, populate_existing=True)
                job_leases.mark_processing(s, job)
                claimed.append(_load_claimed(s, job, f", {c.priority_class}{note}"))
        if claimed:
            return claimed
        if not skipped:  # taken between the look and the claim: look again
            time.sleep(0.01 * (round_ + 1))
    return []


def _hand_on(ctx: WorkerContext, job_id: int) -> str:
    """Nothing this worker may take: make sure the message's job and the pipeline's other
    queued jobs are not left without a wake-up token. Offpeak jobs outside their window go back
    to pending (the agent sends them when the window opens); on the reserved urgent lane, a job
    of another class gets a token on the pipeline's main queue."""
    settings = ctx.settings
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return "skipped"
        pipeline = job.pipeline
        queued = list(
            s.scalars(
                select(Job).where(Job.pipeline == pipeline, Job.status == JobStatus.QUEUED.value)
            )
        )
        if not queued:
            return "skipped"
        if not claim_rules.offpeak_open(settings.offpeak_window):
            for j in queued:
                if j.priority_class == "offpeak":
                    j.status = JobStatus.PENDING.value
                    record_event(
                        s,
                        "job.held",
                        f"offpeak: waits for the window {settings.offpeak_window}",
                        study_id=j.study_id,
                        job_id=j.id,
                    )
        others = [
            j
            for j in queued
            if j.priority_class != "offpeak"
            and j.priority_class not in claim_rules.URGENT_LANE_CLASSES
        ]
        handoff = None
        if ctx.lane == "urgent" and others:
            handoff = min(others, key=lambda j: (j.priority, j.id))
        if handoff is not None:
            hid, hprio = handoff.id, handoff.priority
    if handoff is not None:
        ctx.wake(hid, hprio, pipeline, queue=queue_name(pipeline))
        log.info("urgent lane: handed a wake-up for job %s to the %s queue", hid, pipeline)
    return "skipped"


def _lease_lost(s: Session, token: Token, what: str) -> None:
    """The event of a worker that lost its claim: its work is discarded, nothing written."""
    job = s.get(Job, token.job_id)
    record_event(
        s,
        "job.lease_lost",
        f"worker {token.worker} lost its claim (attempt {token.attempt}); {what} discarded",
        study_id=job.study_id if job is not None else None,
        job_id=token.job_id,
        level="warning",
    )


def _fence_or_raise(ctx: WorkerContext, token: Token | None, what: str) -> None:
    """Before work that writes: stop here if the job is no longer this claim's."""
    if token is None:
        return
    with ctx.db.session() as s:
        held = fence(s, token)
        if not held:
            _lease_lost(s, token, what)
    if not held:  # raised after the commit, so that the event stays
        raise LeaseLost(f"job {token.job_id}: {what} discarded")


def images_skipped_note(count: int | None) -> str | None:
    """What an operator reads on a job that is done without some of its images."""
    if not count:
        return None
    return f"done with {count} image{'s' if count != 1 else ''} skipped"


def _finish(
    db: Database,
    job_id: int,
    *,
    error: str | None,
    delivering: bool = False,
    skipped: str | None = None,
    token: Token | None = None,
) -> bool:
    """Record a job's outcome and settle its study. With the claim's ``token`` the write is
    fenced: a worker that no longer holds the job records ``job.lease_lost`` instead (False)."""
    with db.session() as s:
        if token is not None and not fence(s, token):
            _lease_lost(s, token, "its outcome" + (f" ({error})" if error else ""))
            return False
        job = s.get_one(Job, job_id)
        study = s.get_one(Study, job.study_id)
        # A newer version of the study may be arriving: leave its state to the agent then.
        settle = study.status != StudyStatus.RECEIVING.value and study.version == job.study_version
        if error:
            job.status = JobStatus.FAILED.value
            job.error = error
            job.finished_at = utcnow()
            if settle:
                study.status = StudyStatus.FAILED.value
                study.reason = error
            record_event(s, "job.failed", error, study_id=study.id, job_id=job.id, level="error")
        elif skipped:
            job.status = JobStatus.DONE.value
            job.error = None
            job.finished_at = utcnow()
            if settle:
                study.status = StudyStatus.SKIPPED.value
                study.reason = skipped
            record_event(s, "job.skipped", skipped, study_id=study.id, job_id=job.id)
        elif delivering:
            job.status = JobStatus.DELIVERING.value
            job.error = None
            if settle:
                study.status = StudyStatus.DELIVERING.value
                study.reason = images_skipped_note(job.images_skipped)
            record_event(
                s,
                "job.delivering",
                "results made; some destinations will be retried",
                study_id=study.id,
                job_id=job.id,
            )
        else:
            job.status = JobStatus.DONE.value
            job.error = None
            job.finished_at = utcnow()
            note = images_skipped_note(job.images_skipped)
            if settle:
                study.status = StudyStatus.DONE.value
                study.reason = note
            record_event(
                s,
                "job.done",
                f"triage {job.triage}" + (f"; {note}" if note else ""),
                study_id=study.id,
                job_id=job.id,
                level="warning" if note else "info",
            )
    metrics.job_finished(
        "failed" if error else "skipped" if skipped else "delivering" if delivering else "done"
    )
    return True


def _deliver(
    ctx: WorkerContext,
    job_id: int,
    study_id: int,
    destinations: list[str],
    token: Token | None = None,
) -> None:
    """Deliver a job's results. ``destinations`` are the job's references (credentials masked);
    their credentials are looked up here, now (destinations table, then this host's
    PACS_AGENT_DESTINATIONS), and never written back anywhere."""
    settings = ctx.settings
    _fence_or_raise(ctx, token, "its deliveries")  # a claim's deliveries: only while it holds
    with ctx.db.session() as s:
        configured = configured_urls(s, settings)
    t_delivery = time.monotonic()
    outcome = deliver_job_results(
        ctx.db,
        job_id,
        study_id,
        destinations,
        results_root=settings.results_dir,
        max_attempts=settings.delivery_attempts,
        backoff_s=settings.delivery_backoff_s,
        backoff_max_s=settings.delivery_backoff_max_s,
        calling_ae=settings.ae_title,
        tls=client_tls_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        if any(u.startswith("dicom+tls://") for u in destinations)
        else None,
        dicomweb_token=settings.dicomweb_token,
        resolve=lambda ref: resolve_reference(ref, configured),
        associations=ctx.associations,
    )
    metrics.stage_seconds("delivery", time.monotonic() - t_delivery)
    if outcome.failed:
        metrics.failure("delivery")
        _finish(ctx.db, job_id, error="delivery failed: " + "; ".join(outcome.failed), token=token)
    else:
        _finish(ctx.db, job_id, error=None, delivering=bool(outcome.pending), token=token)


def deliver(ctx: WorkerContext, job_id: int) -> str:
    """A delivery retry: send what is not delivered yet (credentials resolved in ``_deliver``).
    Results made on another worker host are not here; the job then runs again, which makes the
    same objects under the same UIDs."""
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.DELIVERING.value:
            return "nothing to do"
        paths = [
            ctx.settings.results_dir / p
            for p in s.scalars(select(Result.path).where(Result.job_id == job_id))
        ]
        study_id, destinations = job.study_id, list(job.destinations)
    if paths and all(p.is_file() for p in paths):
        _deliver(ctx, job_id, study_id, destinations)
        return "delivered"
    with ctx.db.session() as s:
        job = s.get_one(Job, job_id)
        job.status = JobStatus.QUEUED.value  # claimable by process()
        pipeline, job_priority = job.pipeline, job.priority
    outcome = process(ctx, job_id)
    with ctx.db.session() as s:
        still_queued = s.get_one(Job, job_id).status == JobStatus.QUEUED.value
    if still_queued:  # a more urgent job went first: this one keeps a wake-up of its own
        ctx.wake(job_id, job_priority, pipeline)
    return outcome


def _store_outputs(
    ctx: WorkerContext,
    job_id: int,
    outputs: list[tuple[str, Dataset, str | None]],
    results: list[ImageResult],
    token: Token | None = None,
    *,
    frames: dict[str, int] | None = None,
    sources: list[Dataset] | None = None,
    bundle_checksum: str | None = None,
    bundle_is_demo: bool = False,
) -> None:
    """Write the output files and upsert their result rows (``source_frame``: the analysed
    frame of a multi-frame source, from ``frames``). With the claim's ``token`` the rows
    are written in the transaction that fences the claim; a worker that lost it raises
    LeaseLost before writing anything (files included). Then, with the ``sources`` headers
    and the ``bundle_checksum``, each image's findings are counted for the fairness monitor
    (pacs_agent.fairness: coarse subgroup bins only; best effort, never fails the job)."""
    root = ctx.settings.results_dir
    with ctx.db.session() as s:
        # The fence locks the job's row until these rows commit: nobody takes the job meanwhile.
        held = token is None or fence(s, token)
        for kind, ds, source_uid in outputs if held else []:
            relpath = _write(root, ds)
            summary: dict[str, object] = {
                "sop_class": ds.SOPClassUID.name,
                "series_description": str(ds.get("SeriesDescription", "")),
                "rows": int(ds.get("Rows", 0) or 0) or None,
                "columns": int(ds.get("Columns", 0) or 0) or None,
            }
            if kind == "sr":
                summary["findings"] = [
                    {
                        "label": f.label,
                        "probability": round(f.probability, 4),
                        "present": f.present,
                        "source": f.source_sop_instance_uid,
                        # localization of every label, for POST /api/grounding
                        "point": list(f.point) if f.point is not None else None,
                        "region": {
                            "box": [round(v, 2) for v in f.region.box],
                            "basis": f.region.basis,
                            "peak": round(f.region.peak, 6),
                        }
                        if f.region is not None
                        else None,
                    }
                    for r in results
                    for f in r.findings
                ]
                # grounding phrases (label names and the bundle's synonyms) -> label; one
                # bundle per job, so the first image's is everyone's
                vocabulary: Any = results[0].extra.get("vocabulary") if results else None
                summary["vocabulary"] = dict(vocabulary or {})
            existing = s.scalar(
                select(Result).where(Result.sop_instance_uid == str(ds.SOPInstanceUID))
            )
            if existing is None:
                s.add(
                    Result(
                        job_id=job_id,
                        kind=kind,
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        source_sop_instance_uid=source_uid,
                        source_frame=(frames or {}).get(source_uid) if source_uid else None,
                        path=relpath,
                        summary=summary,
                    )
                )
            else:
                existing.path = relpath
                existing.summary = summary
                existing.source_frame = (frames or {}).get(source_uid) if source_uid else None
        if held and bundle_checksum:
            # similar cases: each image's CLS embedding, in the same transaction
            _store_embeddings(s, job_id, results, bundle_checksum, demo=bundle_is_demo)
    if not held:
        _fence_or_raise(ctx, token, "its outputs")  # records job.lease_lost and raises
    if sources is not None and bundle_checksum:
        fairness.record(ctx.db, job_id, bundle_checksum, results, sources)


def _store_embeddings(
    s: Session, job_id: int, results: list[ImageResult], bundle_checksum: str, *, demo: bool
) -> None:
    """One ``embeddings`` row per analysed image and bundle (pacs_agent.retrieval), upserted:
    a re-run with the same bundle keeps the row's id, which the agent's index holds."""
    from pacs_agent.db.models import Embedding
    from pacs_agent.retrieval import encode_vector

    study_id = s.get_one(Job, job_id).study_id
    for r in results:
        cls = r.extra.get("cls")
        if cls is None:
            continue
        try:
            vector = encode_vector(cls)  # type: ignore[arg-type]
        except ValueError as exc:
            log.warning("image %s: no embedding stored: %s", r.source_sop_instance_uid, exc)
            continue
        row = s.scalar(
            select(Embedding).where(
                Embedding.sop_instance_uid == r.source_sop_instance_uid,
                Embedding.bundle_checksum == bundle_checksum,
            )
        )
        if row is None:
            s.add(
                Embedding(
                    sop_instance_uid=r.source_sop_instance_uid,
                    study_id=study_id,
                    job_id=job_id,
                    bundle_checksum=bundle_checksum,
                    is_demo=demo,
                    dim=len(vector) // 4,
                    vector=vector,
                )
            )
        else:
            row.job_id, row.vector, row.dim = job_id, vector, len(vector) // 4


@dataclass
class _Prepared:
    claim: ClaimedJob
    sources: list[Dataset] = field(default_factory=list)
    images: list[tuple[str, Any]] = field(default_factory=list)
    # SOP Instance UID -> the analysed 1-based frame of each multi-frame source.
    frames: dict[str, int] = field(default_factory=dict)
    # "<sop>: <reason>" for each image left out: not decodable (skipped), or refused by the
    # model when it ran alone (model_skipped).
    skipped: list[str] = field(default_factory=list)
    model_skipped: list[str] = field(default_factory=list)


def _prepare(ctx: WorkerContext, claim: ClaimedJob) -> _Prepared:
    from workers.imaging import ImageError, analysed_frame, decode

    prep = _Prepared(claim)
    skipped = prep.skipped
    for sop in claim.sops:
        ds = fetch_instance(ctx.settings, sop, ctx.db)
        # One image that cannot be decoded is left out with its reason; the job goes on with
        # the others. A multi-frame image gives one frame (imaging.analysed_frame).
        try:
            frame = analysed_frame(ds)
            image = decode(ds, frame)
        except ImageError as exc:
            skipped.append(f"{sop}: {exc}")
            continue
        except Exception as exc:
            skipped.append(f"{sop}: {reason_for(exc, 'decode')}")
            log.warning("image %s not decoded: %s\n%s", sop, type(exc).__name__, trace(exc))
            continue
        prep.images.append((sop, image))
        prep.sources.append(ds)
        if frame is not None:
            prep.frames[sop] = frame
    if skipped:
        with ctx.db.session() as s:
            record_event(
                s,
                "job.images_skipped",
                "; ".join(skipped),
                study_id=claim.study_id,
                job_id=claim.job_id,
                level="warning",
            )
    if not prep.images:
        raise JobError("no image could be decoded: " + "; ".join(skipped))
    return prep


def _record_output_skips(
    ctx: WorkerContext, claim: ClaimedJob, p: _Prepared, made: OutputSet
) -> int:
    """Events for the objects not made (by design for a multi-frame source: info; a writer
    that refused: warning). Returns the job's count of images skipped: left out before the
    model (``p.skipped``) or without any output at all."""
    by_design = [k for k in made.skipped if k.reason.startswith("multi-frame source")]
    refused = [k for k in made.skipped if k not in by_design]
    with ctx.db.session() as s:
        if by_design:
            record_event(
                s,
                "job.outputs_skipped",
                "; ".join(
                    f"{k.describe()} (frame {made.frames.get(k.source_sop_instance_uid or '')})"
                    for k in by_design
                ),
                study_id=claim.study_id,
                job_id=claim.job_id,
            )
        if refused:
            record_event(
                s,
                "job.outputs_skipped",
                "; ".join(k.describe() for k in refused),
                study_id=claim.study_id,
                job_id=claim.job_id,
                level="warning",
            )
        if made.images_without_outputs:
            record_event(
                s,
                "job.images_skipped",
                "no output could be made for "
                + ", ".join(made.images_without_outputs)
                + " (see job.outputs_skipped)",
                study_id=claim.study_id,
                job_id=claim.job_id,
                level="warning",
            )
    return len(p.skipped) + len(p.model_skipped) + len(made.images_without_outputs)


def _run_model(runner: Any, prepared: list[_Prepared]) -> list[ImageResult]:
    """The model over all images of the batch in one pass. If the pass fails, each image runs
    alone, so that one image the model cannot take is left out (in its job's ``skipped``) and
    the others are analysed; raises only when no image at all could be analysed."""
    images = [img for p in prepared for img in p.images]
    try:
        return list(runner.run(images))
    except Exception as exc:
        if len(images) == 1:
            raise
        log.warning("model pass failed (%s): running the images one by one", type(exc).__name__)
        first: Exception = exc
    results: list[ImageResult] = []
    for p in prepared:
        kept = []
        for (sop, image), ds in zip(p.images, p.sources, strict=True):
            try:
                results.extend(runner.run([(sop, image)]))
                kept.append(((sop, image), ds))
            except Exception as exc:
                p.model_skipped.append(f"{sop}: {reason_for(exc, 'model')}")
                log.warning("image %s not analysed: %s\n%s", sop, type(exc).__name__, trace(exc))
        p.images = [img for img, _ in kept]
        p.sources = [ds for _, ds in kept]
    if not results:
        raise first
    return results


def _quality_control(
    bundle: Any, p: _Prepared, by_uid: dict[str, ImageResult]
) -> tuple[list[ImageResult], list[Dataset], list[str]]:
    """Keep the images this bundle is meant for (its QC heads against its intended use)."""
    from workers.models.qc import qc_refusal

    results, sources, refused = [], [], []
    for (sop, _), ds in zip(p.images, p.sources, strict=True):
        result = by_uid[sop]
        reason = qc_refusal(result, getattr(bundle, "intended", {}) or {})
        if reason:
            refused.append(f"{sop}: {reason}")
        else:
            results.append(result)
            sources.append(ds)
    return results, sources, refused


_LEVEL_RANK = {"routine": 0, "urgent": 1, "critical": 2}


def _record_triage(
    s: Session,
    settings: Settings,
    job: Job,
    level: str,
    results: list[ImageResult],
    is_demo: bool | None = None,
) -> None:
    """Store the triage level; raise (never lower) the job's class by it, so that a critical
    result's deliveries and notifications go ahead of everything else; queue notifications."""
    job.triage = level
    escalated = priority.escalate(job.priority_class, level)
    if escalated != job.priority_class:
        record_event(
            s,
            "job.escalated",
            f"triage {level}: priority {job.priority_class} -> {escalated}",
            study_id=job.study_id,
            job_id=job.id,
        )
        job.priority_class = escalated
        job.priority = priority.broker_number(escalated)
    s.flush()
    try:
        from pacs_agent.dispatching import notify
    except ImportError:  # the notification package is optional for the worker
        return
    queue_notifications = getattr(notify, "queue_notifications", None)
    if queue_notifications is None:
        return
    queue_notifications(
        s,
        settings,
        job_id=job.id,
        level=level,
        findings=[
            {"label": f.label, "probability": round(f.probability, 4), "present": f.present}
            for r in results
            for f in r.findings
        ],
        random_weights=is_demo,
    )


def _more_urgent_waiting(ctx: WorkerContext, pipeline: str, than: str) -> int | None:
    """A queued job of the pipeline whose class is more urgent than ``than`` (and that this
    worker's lane may take), or None. One small query, run between the jobs of a batch."""
    classes = [c for c in priority.CLASSES if priority.rank(c) < priority.rank(than)]
    if ctx.lane == "urgent":
        classes = [c for c in classes if c in claim_rules.URGENT_LANE_CLASSES]
    if not classes:
        return None
    with ctx.db.session() as s:
        return s.scalar(
            select(Job.id)
            .where(
                Job.pipeline == pipeline,
                Job.status == JobStatus.QUEUED.value,
                Job.priority_class.in_(classes),
            )
            .limit(1)
        )


def _interject(ctx: WorkerContext, pipeline: str, claim: ClaimedJob, nested: str | None) -> None:
    """Before the next step of a batch: run a more urgent job that arrived meanwhile."""
    if nested is not None:
        return  # one level: an interjected job is not interrupted in its turn
    waiting = _more_urgent_waiting(ctx, pipeline, claim.priority_class)
    if waiting is not None:
        log.info("job %s waits: a more urgent job arrived, run first", claim.job_id)
        process(ctx, waiting, _interject_above=claim.priority_class)


def process(ctx: WorkerContext, job_id: int, *, _interject_above: str | None = None) -> str:
    """A wake-up for ``job_id``'s pipeline (see ``_process``). The jobs it claims are held (their
    heartbeat kept fresh by the worker's lease thread) until it returns."""
    before = {t.job_id for t in ctx.leases.held()}
    try:
        return _process(ctx, job_id, _interject_above=_interject_above)
    finally:
        for t in ctx.leases.held():
            if t.job_id not in before:
                ctx.leases.release(t.job_id)


def _process(ctx: WorkerContext, job_id: int, *, _interject_above: str | None = None) -> str:
    """A wake-up for ``job_id``'s pipeline: claim the most urgent jobs this worker may take
    (not necessarily ``job_id``) and run them in one model pass. Between the jobs of a batch,
    a stat or urgent job that arrived meanwhile (more urgent than the batch) is run at once,
    so it waits for at most one job's outputs, not for the whole batch."""
    settings = ctx.settings
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.error("job %s does not exist", job_id)
            return "skipped"
        pipeline = job.pipeline
    claims = claim_jobs(
        ctx.db,
        pipeline,
        lease=dt.timedelta(seconds=settings.resolved_job_lease_s),
        heartbeat_timeout=dt.timedelta(seconds=settings.job_heartbeat_timeout_s),
        lane=ctx.lane,
        aging_s=settings.priority_aging_s,
        offpeak_window=settings.offpeak_window,
        batch_size=settings.worker_batch_jobs,
        above=_interject_above,
        worker=ctx.name,
    )
    if not claims:
        if _interject_above is not None:
            return "skipped"
        log.info("job %s: nothing to claim in pipeline %s", job_id, pipeline)
        return _hand_on(ctx, job_id)
    for claim in claims:
        ctx.leases.hold(claim.token)
    try:
        runner = ctx.runner(pipeline)
        bundle = runner.bundle  # type: ignore[attr-defined]
        algorithm = AlgorithmInfo(
            name=bundle.name,
            version=bundle.version,
            checksum=bundle.checksum,
            is_demo=bundle.is_demo,
        )
    except Exception as exc:
        why = reason_for(exc, "model")
        log.error(
            "model failed to load for jobs %s: %s\n%s", [c.job_id for c in claims], why, trace(exc)
        )
        for claim in claims:
            metrics.failure("model")
            _finish(ctx.db, claim.job_id, error=why, token=claim.token)
        return "failed"
    policy = getattr(bundle, "triage_policy", None)
    size = bundle.preprocessing.size
    # Overlapped (workers/overlap.py): while the model runs a batch, the decode pool decodes
    # the next images and the writer thread writes the outputs of the jobs already through.
    # Each job is written as soon as its images are through the model (a critical result no
    # longer waits for the rest of the batch); a more urgent job that arrived meanwhile runs
    # before the next job's images are fetched.
    headers: dict[int, dict[str, Dataset]] = {}
    written: set[int] = set()
    outcome = {"status": "processed"}

    def sources(claim: ClaimedJob) -> Iterator[tuple[str, bytes]]:
        own = headers.setdefault(claim.job_id, {})
        for sop in claim.sops:
            blob = fetch_instance_bytes(settings, sop, ctx.db)
            own[sop] = dcmread(io.BytesIO(blob))  # the header for the writers; pixels stay encoded
            yield sop, blob

    def infer(images: list[Any]) -> list[Any]:
        return list(runner.run_prepared(images))  # type: ignore[attr-defined]

    def write(group: Group[ClaimedJob]) -> None:
        claim = group.key
        try:
            status = _write_group(
                ctx, group, headers.pop(claim.job_id, {}), bundle, algorithm, policy
            )
        finally:
            written.add(claim.job_id)
        if status is not None and claim.job_id == job_id:
            outcome["status"] = status

    try:
        stats = run_overlapped(
            claims,
            sources,
            ctx.decode_pool(size),
            infer,
            write,
            batch_size=settings.worker_batch_size,
            write_queue=2,
            before_group=lambda claim: _interject(ctx, pipeline, claim, _interject_above),
        )
    except Exception as exc:
        # The pool broke (a decode process died) or the model crashed outside an image: the
        # jobs not written yet fail with the reason; the next job starts a fresh pool.
        ctx.drop_decode_pool(size)
        why = reason_for(exc, "fetch or decode")
        for claim in claims:
            if claim.job_id not in written:
                log.error("job %s failed: %s\n%s", claim.job_id, why, trace(exc))
                metrics.failure("fetch_decode")
                _finish(ctx.db, claim.job_id, error=why, token=claim.token)
        return "failed"
    metrics.stage_seconds("fetch_decode", stats.read_s + stats.wait_s)
    metrics.stage_seconds("encoder", stats.model_s)
    log.info(
        "pipeline %s: %d images of %d jobs in %.2f s (model %.2f s, waiting for decode %.2f s, "
        "writers %.2f s)",
        pipeline,
        stats.images,
        stats.groups,
        stats.wall_s,
        stats.model_s,
        stats.wait_s,
        stats.write_s,
    )
    return outcome["status"]


def _write_group(
    ctx: WorkerContext,
    group: Group[ClaimedJob],
    headers: dict[str, Dataset],
    bundle: Any,
    algorithm: AlgorithmInfo,
    policy: Any,
) -> str | None:
    """One job's images through the model: its outputs, triage and deliveries (in the writer
    thread). Returns "failed" or "discarded" when the job ends so, else None."""
    claim = group.key
    settings = ctx.settings
    if group.error is not None:
        why = reason_for(group.error, "fetch or decode")
        log.error("job %s failed: %s\n%s", claim.job_id, why, trace(group.error))
        metrics.failure("fetch_decode")
        _finish(ctx.db, claim.job_id, error=why, token=claim.token)
        return "failed"
    p = _Prepared(claim)
    for d in group.decoded:
        if d.image is None:
            p.skipped.append(f"{d.sop}: {d.error}")
        elif d.sop in group.model_errors:
            exc = group.model_errors[d.sop]
            p.model_skipped.append(f"{d.sop}: {reason_for(exc, 'model')}")
            log.warning("image %s not analysed: %s\n%s", d.sop, type(exc).__name__, trace(exc))
        else:
            p.images.append((d.sop, d.image))
            p.sources.append(headers[d.sop])
            if d.frame is not None:
                p.frames[d.sop] = d.frame
    if p.skipped:
        with ctx.db.session() as s:
            record_event(
                s,
                "job.images_skipped",
                "; ".join(p.skipped),
                study_id=claim.study_id,
                job_id=claim.job_id,
                level="warning",
            )
    if len(p.skipped) == len(group.decoded):
        metrics.failure("fetch_decode")
        _finish(
            ctx.db,
            claim.job_id,
            error="no image could be decoded: " + "; ".join(p.skipped),
            token=claim.token,
        )
        return "failed"
    by_uid: dict[str, ImageResult] = group.results
    status: str | None = None
    try:
        if p.model_skipped:
            with ctx.db.session() as s:
                record_event(
                    s,
                    "job.images_skipped",
                    "; ".join(p.model_skipped),
                    study_id=claim.study_id,
                    job_id=claim.job_id,
                    level="warning",
                )
        if not p.images:  # every image of this job failed in the model pass
            _finish(
                ctx.db,
                claim.job_id,
                error="no image could be analysed: " + "; ".join(p.skipped + p.model_skipped),
                token=claim.token,
            )
            return "failed"
        results, sources, refused = _quality_control(bundle, p, by_uid)
        if refused:
            metrics.failure("quality_control")
            with ctx.db.session() as s:
                record_event(
                    s,
                    "job.qc_refused",
                    "; ".join(refused),
                    study_id=claim.study_id,
                    job_id=claim.job_id,
                    level="warning",
                )
        if not results:
            _finish(
                ctx.db,
                claim.job_id,
                error=None,
                skipped="quality control: " + "; ".join(refused),
                token=claim.token,
            )
            return None
        p.sources = sources
        triage = triage_level(results, policy)
        t_out = time.monotonic()
        priors: list[Any] = []
        if settings.sr_similar_priors:  # asked of the agent's index; best effort, never raises
            from workers.similar_priors import fetch_similar_priors

            priors = fetch_similar_priors(
                agent_client(),
                settings,
                str(p.sources[0].StudyInstanceUID),
                bundle.checksum,
                results,
            )
        made = build_output_set(
            p.sources,
            results,
            algorithm,
            claim.study_version,
            OutputOptions.from_settings(settings),
            triage=triage,
            frames=p.frames,
            similar_priors=priors,
        )
        images_skipped = _record_output_skips(ctx, claim, p, made)
        report_failed = [
            k for k in made.skipped if k.kind == "sr" and k.source_sop_instance_uid is None
        ]
        if report_failed:
            # The study's report carries the findings: without it the job is not done (an
            # operator's retry runs it again; the other objects keep their UIDs).
            metrics.failure("outputs")
            _finish(
                ctx.db,
                claim.job_id,
                error="the report (SR) could not be made: "
                + "; ".join(k.describe() for k in report_failed),
                token=claim.token,
            )
            return "failed"
        if not made.outputs:
            metrics.failure("outputs")
            _finish(
                ctx.db,
                claim.job_id,
                error="no output could be made: " + "; ".join(k.describe() for k in made.skipped),
                token=claim.token,
            )
            return "failed"
        outputs = made.outputs
        _store_outputs(
            ctx,
            claim.job_id,
            outputs,
            results,
            claim.token,
            frames=made.frames,
            sources=p.sources,
            bundle_checksum=bundle.checksum,
            bundle_is_demo=bundle.is_demo,
        )
        metrics.stage_seconds("writers", time.monotonic() - t_out)
        with ctx.db.session() as s:
            held = fence(s, claim.token)
            if held:
                j = s.get_one(Job, claim.job_id)
                j.bundle_checksum = bundle.checksum
                j.images_skipped = images_skipped or None
                _record_triage(s, settings, j, triage, results, bundle.is_demo)
        if not held:
            _fence_or_raise(ctx, claim.token, "its triage")  # records and raises
        _deliver(ctx, claim.job_id, claim.study_id, claim.destinations, claim.token)
    except LeaseLost as exc:
        # Taken back (its heartbeat went stale) and maybe run by another worker: this
        # worker's work on it is discarded; the job.lease_lost event says so.
        log.warning("%s: this worker lost its claim", exc)
        status = "discarded"
    except Exception as exc:
        why = reason_for(exc, "outputs")
        log.error("job %s failed: %s\n%s", claim.job_id, why, trace(exc))
        metrics.failure("outputs")
        _finish(ctx.db, claim.job_id, error=why, token=claim.token)
        status = "failed"
    return status
