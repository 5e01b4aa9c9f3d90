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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

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
from pacs_agent.dispatching.delivery import deliver_job_results
from pacs_agent.dispatching.senders import client_tls_context
from pacs_agent.receiving.store import fsync_dir
from pacs_agent.scheduling import claims as claim_rules
from pacs_agent.scheduling import priority
from pacs_agent.scheduling.pipelines import queue_name
from pacs_agent.settings import Settings
from workers.dicom_out.outputs import OutputOptions, build_outputs
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
                    bundle, device=device, dtype=self.settings.worker_dtype, cam=False
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
        _CONTEXT = WorkerContext(settings, Database(settings.resolved_database_url))
    return _CONTEXT


class JobError(Exception):
    pass


def fetch_instance(settings: Settings, sop_uid: str) -> Dataset:
    headers = {"authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    url = f"{settings.resolved_agent_url}/api/instances/{sop_uid}"
    last: Exception | None = None
    for attempt in range(3):
        try:
            r = httpx.get(url, headers=headers, timeout=60)
            if r.status_code == 200:
                return dcmread(io.BytesIO(r.content))
            last = JobError(f"agent answered {r.status_code} for instance {sop_uid}")
            if r.status_code in (404, 410):
                break
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1.0 + attempt)
    raise JobError(f"cannot fetch instance {sop_uid}: {last}")


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
    )


def _claimable_filter(pipeline: str, cutoff: dt.datetime) -> Any:
    """Queued jobs of the pipeline, and running ones whose lease ran out (their worker died)."""
    return and_(
        Job.pipeline == pipeline,
        or_(
            Job.status == JobStatus.QUEUED.value,
            and_(Job.status == JobStatus.RUNNING.value, Job.started_at < cutoff),
        ),
    )


def claim_jobs(
    db: Database,
    pipeline: str,
    *,
    lease: dt.timedelta,
    lane: str = "all",
    aging_s: float = 600.0,
    offpeak_window: str | None = None,
    batch_size: int = 1,
    now: dt.datetime | None = None,
    above: str | None = None,
    worker: str | None = None,
) -> list[ClaimedJob]:
    """Claim the most urgent claimable job of ``pipeline`` and up to ``batch_size - 1`` more of
    its class (pacs_agent.scheduling.claims), each with a guarded UPDATE so that two workers
    never take the same job. ``above``: only jobs of a class more urgent than this one (an
    interjection between the jobs of a batch). Empty when there is nothing this worker may take."""
    is_open = offpeak_window is None or claim_rules.offpeak_open(offpeak_window)
    for _ in range(5):  # another worker may take the head first: look again
        at = now or utcnow()
        cutoff = at - lease
        with db.session() as s:
            rows = s.execute(
                select(Job.id, Job.priority_class, Job.enqueued_at, Job.created_at).where(
                    _claimable_filter(pipeline, cutoff)
                )
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
        chosen = claim_rules.batch(ordered, batch_size)
        if not chosen:
            return []
        claimed: list[ClaimedJob] = []
        head_id = chosen[0].job_id
        for c in chosen:
            with db.session() as s:
                taken = s.execute(  # type: ignore[attr-defined]
                    update(Job)
                    .where(Job.id == c.job_id, _claimable_filter(pipeline, cutoff))
                    .values(
                        status=JobStatus.RUNNING.value,
                        attempts=Job.attempts + 1,
                        started_at=utcnow(),
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount
                if taken != 1:
                    continue
                note = "" if c.job_id == head_id else f", batched with job {head_id}"
                if worker:
                    note += f", worker {worker} ({lane} lane)"
                claimed.append(
                    _load_claimed(s, s.get_one(Job, c.job_id), f", {c.priority_class}{note}")
                )
        if claimed:
            return claimed
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


def _finish(
    db: Database,
    job_id: int,
    *,
    error: str | None,
    delivering: bool = False,
    skipped: str | None = None,
) -> None:
    with db.session() as s:
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
            if settle:
                study.status = StudyStatus.DONE.value
                study.reason = None
            record_event(s, "job.done", f"triage {job.triage}", study_id=study.id, job_id=job.id)


def _deliver(ctx: WorkerContext, job_id: int, study_id: int, destinations: list[str]) -> None:
    settings = ctx.settings
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
    )
    if outcome.failed:
        _finish(ctx.db, job_id, error="delivery failed: " + "; ".join(outcome.failed))
    else:
        _finish(ctx.db, job_id, error=None, delivering=bool(outcome.pending))


def deliver(ctx: WorkerContext, job_id: int) -> str:
    """A delivery retry: send what is not delivered yet. Results made on another worker host are
    not here; the job then runs again, which makes the same objects under the same UIDs."""
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
) -> None:
    root = ctx.settings.results_dir
    with ctx.db.session() as s:
        for kind, ds, source_uid in outputs:
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
                    }
                    for r in results
                    for f in r.findings
                ]
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
                        path=relpath,
                        summary=summary,
                    )
                )
            else:
                existing.path = relpath
                existing.summary = summary


@dataclass
class _Prepared:
    claim: ClaimedJob
    sources: list[Dataset] = field(default_factory=list)
    images: list[tuple[str, Any]] = field(default_factory=list)


def _prepare(ctx: WorkerContext, claim: ClaimedJob) -> _Prepared:
    from workers.imaging import ImageError, decode

    prep = _Prepared(claim)
    skipped: list[str] = []
    for sop in claim.sops:
        ds = fetch_instance(ctx.settings, sop)
        try:
            prep.images.append((sop, decode(ds)))
            prep.sources.append(ds)
        except ImageError as exc:
            skipped.append(f"{sop}: {exc}")
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
    prepared: list[_Prepared] = []
    for claim in claims:
        _interject(ctx, pipeline, claim, _interject_above)
        try:
            prepared.append(_prepare(ctx, claim))
        except Exception as exc:
            log.exception("job %s failed while fetching or decoding", claim.job_id)
            _finish(ctx.db, claim.job_id, error=f"{type(exc).__name__}: {exc}")
    if not prepared:
        return "failed"
    try:
        runner = ctx.runner(pipeline)
        bundle = runner.bundle  # type: ignore[attr-defined]
        algorithm = AlgorithmInfo(
            name=bundle.name,
            version=bundle.version,
            checksum=bundle.checksum,
            is_demo=bundle.is_demo,
        )
        t0 = time.monotonic()
        all_results = runner.run([img for p in prepared for img in p.images])  # type: ignore[attr-defined]
        log.info(
            "pipeline %s: model ran on %d images of %d jobs in %.2f s",
            pipeline,
            sum(len(p.images) for p in prepared),
            len(prepared),
            time.monotonic() - t0,
        )
    except Exception as exc:
        log.exception("model run failed for jobs %s", [p.claim.job_id for p in prepared])
        for p in prepared:
            _finish(ctx.db, p.claim.job_id, error=f"{type(exc).__name__}: {exc}")
        return "failed"
    by_uid = {r.source_sop_instance_uid: r for r in all_results}
    policy = getattr(bundle, "triage_policy", None)
    levels = {
        p.claim.job_id: triage_level([by_uid[sop] for sop, _ in p.images if sop in by_uid], policy)
        for p in prepared
    }
    # A critical result's outputs and deliveries go first within the batch.
    prepared.sort(key=lambda p: -_LEVEL_RANK.get(levels[p.claim.job_id], 0))
    status = "processed"
    for p in prepared:
        claim = p.claim
        _interject(ctx, pipeline, claim, _interject_above)
        try:
            results, sources, refused = _quality_control(bundle, p, by_uid)
            if refused:
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
                )
                continue
            p.sources = sources
            triage = triage_level(results, policy)
            outputs = build_outputs(
                p.sources,
                results,
                algorithm,
                claim.study_version,
                OutputOptions.from_settings(settings),
                triage=triage,
            )
            _store_outputs(ctx, claim.job_id, outputs, results)
            with ctx.db.session() as s:
                j = s.get_one(Job, claim.job_id)
                j.bundle_checksum = bundle.checksum
                _record_triage(s, settings, j, triage, results, bundle.is_demo)
            _deliver(ctx, claim.job_id, claim.study_id, claim.destinations)
        except Exception as exc:
            log.exception("job %s failed", claim.job_id)
            _finish(ctx.db, claim.job_id, error=f"{type(exc).__name__}: {exc}")
            if claim.job_id == job_id:
                status = "failed"
    return status
