"""Process one job: fetch the study's images from the agent, run the model, write and deliver
DICOM SR, SEG and heatmap Secondary Captures. Called by the thin Celery task.

Idempotent: output UIDs derive from (source, bundle version, kind), results are upserted by SOP
Instance UID, and deliveries already done are not repeated.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select, update
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
from pacs_agent.delivery.senders import client_tls_context
from pacs_agent.delivery.service import deliver_job_results
from pacs_agent.settings import Settings
from pacs_agent.store import fsync_dir
from workers.dicom_out.outputs import OutputOptions, build_outputs
from workers.results import AlgorithmInfo, ImageResult

log = logging.getLogger(__name__)

# Findings whose presence makes a study critical; any other positive finding makes it urgent.
CRITICAL_LABELS = {"pneumothorax"}


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    _runner: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def runner(self):  # type: ignore[no-untyped-def]
        """The model, loaded lazily once per worker process (never at import)."""
        with self._lock:
            if self._runner is None:
                from workers.models.bundle import load_bundle
                from workers.models.runner import ModelRunner

                bundle = load_bundle(self.settings.resolved_bundle)
                device = self.settings.worker_device
                if device == "auto":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                # Per-label activation maps are not written anywhere yet: leave them off
                # (full-size float maps, about 72 MB per radiograph for five labels).
                self._runner = ModelRunner(
                    bundle, device=device, dtype=self.settings.worker_dtype, cam=False
                )
                log.info("model bundle %s %s loaded on %s", bundle.name, bundle.version, device)
            return self._runner


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


def triage_level(results: list[ImageResult]) -> str:
    present = [f for r in results for f in r.findings if f.present]
    if any(f.label.lower() in CRITICAL_LABELS for f in present):
        return "critical"
    return "urgent" if present else "routine"


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
    return ClaimedJob(job.id, job.study_id, job.study_version, list(job.destinations), sops)


def _claim(db: Database, job_id: int, lease: dt.timedelta) -> ClaimedJob | None:
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            log.error("job %s does not exist", job_id)
            return None
        if job.status in (JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.DELIVERING.value):
            log.info("job %s already %s: nothing to do", job_id, job.status)
            return None
        started = job.started_at
        if started is not None and started.tzinfo is None:
            started = started.replace(tzinfo=dt.UTC)
        if job.status == JobStatus.RUNNING.value and started and started > utcnow() - lease:
            # Another worker holds it (e.g. batched with its own job); a worker that died
            # loses the lease, and the job is taken over by the next delivery of its message.
            log.info("job %s is being processed elsewhere (lease held)", job_id)
            return None
        job.status = JobStatus.RUNNING.value
        job.attempts += 1
        job.started_at = utcnow()
        return _load_claimed(s, job, "")


def _claim_more(db: Database, exclude: int, limit: int) -> list[ClaimedJob]:
    """Take up to ``limit`` other queued jobs, so that one model pass serves several studies."""
    if limit <= 0:
        return []
    with db.session() as s:
        ids = list(
            s.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.QUEUED.value, Job.id != exclude)
                .order_by(Job.priority.desc(), Job.id)
                .limit(limit)
            )
        )
    claimed = []
    for jid in ids:
        with db.session() as s:
            taken = s.execute(  # type: ignore[attr-defined]
                update(Job)
                .where(Job.id == jid, Job.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.RUNNING.value, attempts=Job.attempts + 1, started_at=utcnow()
                )
            ).rowcount
            if taken == 1:
                claimed.append(
                    _load_claimed(s, s.get_one(Job, jid), f", batched with job {exclude}")
                )
    return claimed


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
        s.get_one(Job, job_id).status = JobStatus.QUEUED.value  # claimable by process()
    return process(ctx, job_id)


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


def process(ctx: WorkerContext, job_id: int) -> str:
    """Run a job, together with other queued jobs (one model pass for all their images)."""
    settings = ctx.settings
    lease = dt.timedelta(seconds=settings.resolved_job_lease_s)
    first = _claim(ctx.db, job_id, lease)
    if first is None:
        return "skipped"
    claims = [first, *_claim_more(ctx.db, job_id, settings.worker_batch_jobs - 1)]
    prepared: list[_Prepared] = []
    for claim in claims:
        try:
            prepared.append(_prepare(ctx, claim))
        except Exception as exc:
            log.exception("job %s failed while fetching or decoding", claim.job_id)
            _finish(ctx.db, claim.job_id, error=f"{type(exc).__name__}: {exc}")
    if not prepared:
        return "failed"
    try:
        runner = ctx.runner()
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
            "model ran on %d images of %d jobs in %.2f s",
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
    status = "processed"
    for p in prepared:
        claim = p.claim
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
            triage = triage_level(results)
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
                j.triage = triage
                j.bundle_checksum = bundle.checksum
            _deliver(ctx, claim.job_id, claim.study_id, claim.destinations)
        except Exception as exc:
            log.exception("job %s failed", claim.job_id)
            _finish(ctx.db, claim.job_id, error=f"{type(exc).__name__}: {exc}")
            if claim.job_id == job_id:
                status = "failed"
    return status
