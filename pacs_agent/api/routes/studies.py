"""``/api/studies``: what happened to each study (state, rule, jobs, results, events), and the
operator's actions on a study: force complete and re-run with a pipeline."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    DbSession,
    Operator,
    Viewer,
    get_state,
)
from pacs_agent.api.routes.jobs import reset_failed_deliveries
from pacs_agent.audit import record_audit
from pacs_agent.db.models import (
    Event,
    Instance,
    Job,
    JobStatus,
    Notification,
    Pipeline,
    PullRequestRow,
    Result,
    Study,
    StudyStatus,
)
from pacs_agent.db.session import record_event
from pacs_agent.destinations import NAME_RE, reference
from pacs_agent.dispatching.notify import notification_summary
from pacs_agent.scheduling import priority as prio
from pacs_agent.scheduling.completion import complete_study

router = APIRouter(tags=["studies"])

AUTH = AUTH_RESPONSES
BAD_BODY = BODY_RESPONSES
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown study"}}
ACTIVE = (JobStatus.PENDING.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
TRIAGE_RANK = {"routine": 0, "urgent": 1, "critical": 2}
FALLBACK = "(fallback)"  # the rule filter for studies that no rule took
UID_PREFIX = re.compile(r"^[0-9.]{1,64}$")
UidInPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
TextFilter = Annotated[str | None, Query(max_length=128, pattern=r"^[^\x00-\x1f]*$")]


# --------------------------------------------------------------------------------------------
# models


class ResultSummary(BaseModel):
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    summary: dict[str, Any]


class JobSummary(BaseModel):
    id: int
    pipeline: str
    study_version: int
    status: str
    error: str | None
    attempts: int
    priority: str = Field(description="priority class")
    triage: str | None
    rule: str | None
    rule_version: int | None
    # The lease (GET /api/jobs/{id} also says whether the worker is alive).
    worker: str | None = Field(default=None, description="worker holding or last holding it")
    heartbeat_at: dt.datetime | None = Field(default=None, description="its last heartbeat")
    results: list[ResultSummary]


class PullSummary(BaseModel):
    id: int
    orthanc_study_id: str
    status: str
    attempts: int
    reason: str | None


class StudySummary(BaseModel):
    # Room for more (e.g. the triage notifications): keys added by study_summary pass through.
    model_config = ConfigDict(extra="allow")

    study_instance_uid: str
    status: str
    reason: str | None
    version: int
    source: str
    rule: str | None
    rule_version: int | None
    incoming_priority: str | None
    priority: str = Field(description="class of the latest job, else the incoming one")
    triage: str | None = Field(description="most severe triage level of the study's jobs")
    findings: list[str] = Field(description="labels found present (from the SR results)")
    last_instance_to_result_s: float | None = Field(
        description="seconds from the last instance received to the last job done"
    )
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None
    notifications: list[dict[str, Any]] = Field(
        default_factory=list, description="triage notifications (channel URLs masked)"
    )
    pull: PullSummary | None = Field(
        default=None, description="the latest pull from Orthanc of this study (GET /api/pulls)"
    )
    instances: int
    jobs: list[JobSummary]


class EventOut(BaseModel):
    at: dt.datetime
    kind: str
    level: str
    message: str
    job_id: int | None = None


class StudyDetail(StudySummary):
    events: list[EventOut]


class ForceCompleteOut(BaseModel):
    study_instance_uid: str
    status: str
    version: int
    jobs: list[int] = Field(description="ids of the jobs of this version")


class RerunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=128, pattern=NAME_RE.pattern)


class RerunOut(BaseModel):
    job_id: int
    study_instance_uid: str
    pipeline: str
    study_version: int
    priority: str
    status: str


# --------------------------------------------------------------------------------------------
# summaries


def findings_present(results: list[Result]) -> list[str]:
    """Labels found present in the SR results, most probable first."""
    best: dict[str, float] = {}
    for r in results:
        if r.kind != "sr":
            continue
        for f in (r.summary or {}).get("findings") or []:
            if isinstance(f, dict) and f.get("present") and f.get("label"):
                label = str(f["label"])
                best[label] = max(float(f.get("probability") or 0.0), best.get(label, 0.0))
    return [label for label, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))]


def study_summary(s: Session, st: Study) -> dict[str, Any]:
    return study_summaries(s, [st])[0]


def study_summaries(s: Session, studies: list[Study]) -> list[dict[str, Any]]:
    """Summaries of a page of studies in a constant number of queries (jobs, results, instance
    counts, notifications and pulls are each loaded once for the whole page)."""
    ids = [st.id for st in studies]
    if not ids:
        return []
    jobs_of: dict[int, list[Job]] = {i: [] for i in ids}
    for j in s.scalars(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)):
        jobs_of[j.study_id].append(j)
    job_ids = [j.id for js in jobs_of.values() for j in js]
    results_of: dict[int, list[Result]] = {i: [] for i in job_ids}
    if job_ids:
        for r in s.scalars(select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id)):
            results_of[r.job_id].append(r)
    count_of: dict[int, int] = {
        sid: n
        for sid, n in s.execute(
            select(Instance.study_id, func.count(Instance.id))
            .where(Instance.study_id.in_(ids))
            .group_by(Instance.study_id)
        )
    }
    notes_of: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for n in s.scalars(
        select(Notification).where(Notification.study_id.in_(ids)).order_by(Notification.id)
    ):
        notes_of[n.study_id].append(notification_summary(n))
    pull_of: dict[str, dict[str, Any]] = {}
    uids = [st.study_instance_uid for st in studies]
    for p in s.scalars(
        select(PullRequestRow)
        .where(PullRequestRow.study_instance_uid.in_(uids))
        .order_by(PullRequestRow.id)
    ):  # the latest pull of each study wins
        pull_of[p.study_instance_uid or ""] = {
            "id": p.id,
            "orthanc_study_id": p.orthanc_study_id,
            "status": p.status,
            "attempts": p.attempts,
            "reason": p.last_error,
        }
    return [
        _summary(st, jobs_of[st.id], results_of, count_of.get(st.id, 0), notes_of[st.id])
        | {"pull": pull_of.get(st.study_instance_uid)}
        for st in studies
    ]


def _summary(
    st: Study,
    jobs: list[Job],
    results_of: dict[int, list[Result]],
    instances: int,
    notifications: list[dict[str, Any]],
) -> dict[str, Any]:
    latest = jobs[-1] if jobs else None
    triage = max(
        (j.triage for j in jobs if j.triage), key=lambda t: TRIAGE_RANK.get(t, -1), default=None
    )
    done = [j.finished_at for j in jobs if j.finished_at and j.status == "done"]
    last_in = st.last_received_at
    to_result = (
        round((max(t for t in done if t) - last_in).total_seconds(), 3)
        if done and last_in
        else None
    )
    return {
        "study_instance_uid": st.study_instance_uid,
        "status": st.status,
        "reason": st.reason,
        "version": st.version,
        "source": st.source,
        "rule": st.rule_name,
        "rule_version": st.rule_version,
        "incoming_priority": st.incoming_priority,
        "priority": (latest.priority_class if latest else None)
        or st.incoming_priority
        or prio.DEFAULT_CLASS,
        "triage": triage,
        "findings": findings_present([r for j in jobs for r in results_of[j.id]]),
        "last_instance_to_result_s": to_result,
        "first_received_at": st.first_received_at,
        "last_received_at": st.last_received_at,
        "completed_at": st.completed_at,
        # Triage notifications: status, attempts, last error (channel URLs masked).
        "notifications": notifications,
        "instances": instances,
        "jobs": [
            {
                "id": j.id,
                "pipeline": j.pipeline,
                "study_version": j.study_version,
                "status": j.status,
                "error": j.error,
                "attempts": j.attempts,
                "priority": j.priority_class,
                "triage": j.triage,
                "rule": j.rule_name,
                "rule_version": j.rule_version,
                "worker": j.worker,
                "heartbeat_at": j.heartbeat_at,
                "results": [
                    {
                        "kind": r.kind,
                        "sop_instance_uid": r.sop_instance_uid,
                        "series_instance_uid": r.series_instance_uid,
                        "summary": r.summary,
                    }
                    for r in results_of[j.id]
                ],
            }
            for j in jobs
        ],
    }


def _find(s: Session, uid: str) -> Study:
    st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
    if st is None:
        raise HTTPException(status_code=404, detail="unknown study")
    return st


# --------------------------------------------------------------------------------------------
# reads


@router.get(
    "/api/studies",
    response_model=list[StudySummary],
    responses={**AUTH, 422: {"description": "a filter is not valid"}},
)
def list_studies(
    s: DbSession,
    _who: Viewer,
    status: Annotated[StudyStatus | None, Query(description="study state")] = None,
    priority: Annotated[prio.PriorityClass | None, Query(description="priority class")] = None,
    rule: TextFilter = None,
    pipeline: TextFilter = None,
    q: Annotated[
        str | None,
        Query(description="Study Instance UID prefix (no search by patient data)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[dict[str, Any]]:
    """Studies, newest first, with their state, priority, triage, findings and rule. ``rule``:
    a rule name, or ``(fallback)`` for studies no rule took; ``pipeline``: studies with a job of
    that pipeline. A page is ``limit`` studies (at most 1000) from ``offset``, loaded in a
    constant number of queries. Pulls that failed before any instance arrived are listed by
    ``GET /api/pulls?status=failed``."""
    stmt = select(Study)
    if status:
        stmt = stmt.where(Study.status == status.value)
    if priority:
        latest_class = (
            select(Job.priority_class)
            .where(Job.study_id == Study.id)
            .order_by(Job.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        effective = func.coalesce(latest_class, Study.incoming_priority, prio.DEFAULT_CLASS)
        stmt = stmt.where(effective == priority)
    if rule == FALLBACK:
        stmt = stmt.where(Study.rule_name.is_(None))
    elif rule:
        stmt = stmt.where(Study.rule_name == rule)
    if pipeline:
        has_job = select(Job.id).where(Job.study_id == Study.id, Job.pipeline == pipeline)
        stmt = stmt.where(has_job.exists())
    if q:
        if not UID_PREFIX.match(q):
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["query", "q"],
                        "msg": "a Study Instance UID prefix: digits and dots",
                        "type": "value_error",
                    }
                ],
            )
        stmt = stmt.where(Study.study_instance_uid.startswith(q))
    stmt = stmt.order_by(Study.id.desc()).limit(limit).offset(offset)
    return study_summaries(s, list(s.scalars(stmt)))


@router.get("/api/studies/{study_uid}", response_model=StudyDetail, responses={**AUTH, **NOT_FOUND})
def get_study(study_uid: UidInPath, s: DbSession, _who: Viewer) -> dict[str, Any]:
    st = _find(s, study_uid)
    out = study_summary(s, st)
    out["events"] = [
        {
            "at": e.at,
            "kind": e.kind,
            "level": e.level,
            "message": e.message,
            "job_id": e.job_id,
        }
        for e in s.scalars(select(Event).where(Event.study_id == st.id).order_by(Event.id))
    ]
    return out


# --------------------------------------------------------------------------------------------
# operator actions


@router.post(
    "/api/studies/{study_uid}/force-complete",
    response_model=ForceCompleteOut,
    responses={**AUTH, **NOT_FOUND, 409: {"description": "the study is not receiving"}},
)
def force_complete(study_uid: UidInPath, request: Request, who: Operator) -> ForceCompleteOut:
    """Complete a receiving study now, without waiting for its quiet period: it is routed as the
    completion loop routes it (the same function), and the timeline says who forced it."""
    state = get_state(request)
    with state.db.session() as s:
        st = _find(s, study_uid)
        study_id, version, status = st.id, st.version, st.status
    if status != StudyStatus.RECEIVING.value:
        raise HTTPException(status_code=409, detail=f"the study is {status}, not receiving")
    done = complete_study(
        state.db,
        study_id,
        version,
        f"forced by {who.name}",
        default_destinations=state.settings.destination_urls,
        store=state.store,
        default_pipeline=state.settings.default_pipeline,
    )
    if not done:  # a new instance (new version) or the loop came first
        raise HTTPException(status_code=409, detail="the study changed meanwhile: try again")
    with state.db.session() as s:
        st = s.get_one(Study, study_id)
        record_audit(
            s,
            who.name,
            "study.force_complete",
            target_type="study",
            target=study_uid,
            after={"version": version, "status": st.status},
        )
        job_ids = list(
            s.scalars(select(Job.id).where(Job.study_id == study_id, Job.study_version == version))
        )
        return ForceCompleteOut(
            study_instance_uid=study_uid, status=st.status, version=version, jobs=job_ids
        )


def _known_pipeline(s: Session, name: str, default_pipeline: str) -> Pipeline | None:
    row = s.scalar(select(Pipeline).where(Pipeline.name == name))
    if row is None and name != default_pipeline:
        raise HTTPException(
            status_code=422,
            detail=[
                {"loc": ["body", "pipeline"], "msg": "unknown pipeline", "type": "value_error"}
            ],
        )
    if row is not None and not row.enabled:
        raise HTTPException(
            status_code=422,
            detail=[
                {"loc": ["body", "pipeline"], "msg": "pipeline disabled", "type": "value_error"}
            ],
        )
    return row


@router.post(
    "/api/studies/{study_uid}/rerun",
    status_code=201,
    response_model=RerunOut,
    responses={
        **BAD_BODY,
        **AUTH,
        **NOT_FOUND,
        409: {"description": "a job of this pipeline is active, or the study is receiving"},
    },
)
def rerun(
    study_uid: UidInPath, body: RerunIn, request: Request, s: DbSession, who: Operator
) -> RerunOut:
    """A job for the current study version with ``pipeline``, at the study's priority, to the
    study's destinations. A job of that pipeline for this version that exists already (done or
    failed) is sent again, since each version has one job per pipeline."""
    settings = get_state(request).settings
    st = _find(s, study_uid)
    _known_pipeline(s, body.pipeline, settings.default_pipeline)
    if st.status == StudyStatus.RECEIVING.value:
        raise HTTPException(
            status_code=409, detail="the study is still receiving: force complete it first"
        )
    jobs = list(s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)))
    busy = [j for j in jobs if j.pipeline == body.pipeline and j.status in ACTIVE]
    if busy:
        raise HTTPException(
            status_code=409, detail=f"job {busy[0].id} of {body.pipeline} is {busy[0].status}"
        )
    latest = jobs[-1] if jobs else None
    cls = (latest.priority_class if latest else None) or st.incoming_priority or prio.DEFAULT_CLASS
    job = next(
        (j for j in jobs if j.pipeline == body.pipeline and j.study_version == st.version), None
    )
    if job is None:
        job = Job(
            study_id=st.id,
            study_version=st.version,
            pipeline=body.pipeline,
            destinations=list(latest.destinations)
            if latest
            else [reference(u) for u in settings.destination_urls],
            notify=list(latest.notify or []) if latest else [],
        )
        s.add(job)
    else:
        reset_failed_deliveries(s, job.id)
    job.status = JobStatus.PENDING.value
    job.error = None
    job.priority_class = cls
    job.priority = prio.broker_number(cls)
    job.finished_at = None
    s.flush()
    if st.status != StudyStatus.QUEUED.value:
        st.status = StudyStatus.QUEUED.value
        st.reason = None
    record_event(
        s,
        "job.rerun",
        f"re-run with pipeline {body.pipeline} requested by {who.name}",
        study_id=st.id,
        job_id=job.id,
    )
    record_audit(
        s,
        who.name,
        "study.rerun",
        target_type="study",
        target=study_uid,
        after={"pipeline": body.pipeline, "job_id": job.id, "version": st.version},
    )
    return RerunOut(
        job_id=job.id,
        study_instance_uid=study_uid,
        pipeline=body.pipeline,
        study_version=st.version,
        priority=cls,
        status=job.status,
    )
