"""``/api/studies``: what happened to each study (state, rule, jobs, results, events)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import DbSession, Viewer
from pacs_agent.db.models import Event, Instance, Job, Result, Study

router = APIRouter(tags=["studies"])


@router.get("/api/studies")
def list_studies(s: DbSession, _who: Viewer, limit: int = 100) -> list[dict[str, Any]]:
    studies = s.scalars(select(Study).order_by(Study.id.desc()).limit(limit)).all()
    return [study_summary(s, st) for st in studies]


@router.get("/api/studies/{study_uid}", responses={404: {"description": "unknown study"}})
def get_study(study_uid: str, s: DbSession, _who: Viewer) -> dict[str, Any]:
    st = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if st is None:
        raise HTTPException(status_code=404, detail="unknown study")
    out = study_summary(s, st)
    out["events"] = [
        {"at": e.at.isoformat(), "kind": e.kind, "level": e.level, "message": e.message}
        for e in s.scalars(select(Event).where(Event.study_id == st.id).order_by(Event.id))
    ]
    return out


def study_summary(s: Session, st: Study) -> dict[str, Any]:
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    return {
        "study_instance_uid": st.study_instance_uid,
        "status": st.status,
        "reason": st.reason,
        "version": st.version,
        "source": st.source,
        "rule": st.rule_name,
        "rule_version": st.rule_version,
        "incoming_priority": st.incoming_priority,
        "instances": s.scalar(select(func.count(Instance.id)).where(Instance.study_id == st.id)),
        "jobs": [
            {
                "id": j.id,
                "pipeline": j.pipeline,
                "status": j.status,
                "error": j.error,
                "attempts": j.attempts,
                "priority": j.priority_class,
                "triage": j.triage,
                "rule": j.rule_name,
                "rule_version": j.rule_version,
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
