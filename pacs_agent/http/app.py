"""HTTP side of the agent: health, the Orthanc webhook, and the admin/worker API."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import func, select, text, update

from pacs_agent import __version__
from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Instance,
    Job,
    JobStatus,
    Result,
    Study,
)
from pacs_agent.db.session import Database, record_event
from pacs_agent.http.stow import router as stow_router
from pacs_agent.pull import PullRequest, PullWorker
from pacs_agent.settings import Settings
from pacs_agent.store import InstanceStore
from pacs_agent.webhook_auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookAuthError,
    verify,
)

log = logging.getLogger(__name__)


@dataclass
class AgentState:
    settings: Settings
    db: Database
    store: InstanceStore
    puller: PullWorker | None
    dimse_running: Any = None  # callable -> bool


class _ReplayGuard:
    """Remembers recent signatures so that a captured call cannot be replayed in the window."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def check_and_add(self, signature: str) -> bool:
        with self._lock:
            if signature in self._seen:
                return False
            self._seen[signature] = None
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


def create_app(state: AgentState) -> FastAPI:
    app = FastAPI(title="pacs-agent", version=__version__)
    app.state.agent = state  # routers in other modules (e.g. STOW-RS) reach the state here
    app.include_router(stow_router)
    replay = _ReplayGuard()

    def require_token(request: Request) -> None:
        token = state.settings.api_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(status_code=401, detail="missing or wrong API token")

    @app.get("/health")
    def health() -> JSONResponse:
        st = state
        problems = []
        try:
            with st.db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception:
            problems.append("database unreachable")
        if st.dimse_running is not None and not st.dimse_running():
            problems.append("DICOM listener not running")
        if st.store.free_bytes() < st.settings.min_free_disk_mb * 1024 * 1024:
            problems.append("disk nearly full")
        body = {
            "status": "ok" if not problems else "unavailable",
            "problems": problems,
            "version": __version__,
        }
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.post("/webhook/orthanc", status_code=202)
    async def orthanc_webhook(request: Request) -> dict[str, Any]:
        body = await request.body()
        sig = request.headers.get(SIGNATURE_HEADER)
        try:
            verify(
                state.settings.webhook_secret,
                request.headers.get(TIMESTAMP_HEADER),
                sig,
                body,
                max_skew_s=state.settings.webhook_max_skew_s,
            )
        except WebhookAuthError as exc:
            log.warning("webhook refused: %s", exc)
            raise HTTPException(status_code=401, detail=str(exc)) from None
        if not replay.check_and_add(sig or ""):
            raise HTTPException(status_code=401, detail="replayed request")
        try:
            payload = json.loads(body)
            orthanc_id = str(payload["orthanc_study_id"])
        except (ValueError, KeyError, TypeError):
            raise HTTPException(
                status_code=400, detail="body must be JSON with orthanc_study_id"
            ) from None
        if state.puller is None:
            raise HTTPException(status_code=503, detail="Orthanc pull is not configured")
        state.puller.submit(PullRequest(orthanc_id, payload.get("study_instance_uid")))
        log.info("webhook: stable Orthanc study %s queued for pull", orthanc_id)
        return {"accepted": True, "orthanc_study_id": orthanc_id}

    @app.get("/api/instances/{sop_uid}", dependencies=[Depends(require_token)])
    def get_instance(sop_uid: str) -> FileResponse:
        with state.db.session() as s:
            inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        if inst is None:
            raise HTTPException(status_code=404, detail="unknown SOP Instance UID")
        path = state.store.path_for(inst.path)
        if not path.is_file():
            raise HTTPException(status_code=410, detail="instance file missing from the store")
        return FileResponse(path, media_type="application/dicom")

    @app.get("/api/studies", dependencies=[Depends(require_token)])
    def list_studies(limit: int = 100) -> list[dict[str, Any]]:
        with state.db.session() as s:
            studies = s.scalars(select(Study).order_by(Study.id.desc()).limit(limit)).all()
            return [_study_summary(s, st) for st in studies]

    @app.get("/api/studies/{study_uid}", dependencies=[Depends(require_token)])
    def get_study(study_uid: str) -> dict[str, Any]:
        with state.db.session() as s:
            st = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if st is None:
                raise HTTPException(status_code=404, detail="unknown study")
            out = _study_summary(s, st)
            out["events"] = [
                {"at": e.at.isoformat(), "kind": e.kind, "level": e.level, "message": e.message}
                for e in s.scalars(select(Event).where(Event.study_id == st.id).order_by(Event.id))
            ]
            return out

    @app.post("/api/jobs/{job_id}/retry", dependencies=[Depends(require_token)])
    def retry_job(job_id: int) -> dict[str, Any]:
        with state.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise HTTPException(status_code=404, detail="unknown job")
            if job.status not in (JobStatus.FAILED.value, JobStatus.DONE.value):
                raise HTTPException(status_code=409, detail=f"job is {job.status}")
            job.status = JobStatus.PENDING.value
            job.error = None
            # Failed deliveries get a fresh set of attempts.
            s.execute(
                update(Delivery)
                .where(
                    Delivery.result_id.in_(select(Result.id).where(Result.job_id == job.id)),
                    Delivery.status == DeliveryStatus.FAILED.value,
                )
                .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=None)
            )
            record_event(
                s, "job.retry", "retry requested by an admin", study_id=job.study_id, job_id=job.id
            )
        return {"job_id": job_id, "status": "pending"}

    return app


def _study_summary(s: Any, st: Study) -> dict[str, Any]:
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    return {
        "study_instance_uid": st.study_instance_uid,
        "status": st.status,
        "reason": st.reason,
        "version": st.version,
        "source": st.source,
        "instances": s.scalar(select(func.count(Instance.id)).where(Instance.study_id == st.id)),
        "jobs": [
            {
                "id": j.id,
                "pipeline": j.pipeline,
                "status": j.status,
                "error": j.error,
                "attempts": j.attempts,
                "triage": j.triage,
                "results": [
                    {
                        "kind": r.kind,
                        "sop_instance_uid": r.sop_instance_uid,
                        "series_instance_uid": r.series_instance_uid,
                        "summary": r.summary,
                    }
                    for r in s.scalars(select(Result).where(Result.job_id == j.id))
                ],
            }
            for j in jobs
        ],
    }
