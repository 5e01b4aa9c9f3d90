"""``/api/pulls``: the persisted pull requests of the Orthanc door (webhook and /changes
backstop) with their state and reason, and the operator's retry of one that failed.

A pull that failed before any instance arrived has no study row: it is visible here (and the
console's studies page lists the failed ones); a pull whose study exists links to it
(``study_url``) and ``GET /api/studies`` carries the study's latest pull in ``pull``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator, Viewer, get_state
from pacs_agent.audit import record_audit
from pacs_agent.db.models import PullRequestRow, PullStatus, Study
from pacs_agent.db.session import record_event
from pacs_agent.receiving.pull import updated

router = APIRouter(tags=["pulls"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown pull request"}}
PullId = Annotated[int, Path(ge=1, le=2**31 - 1)]


class PullOut(BaseModel):
    id: int
    orthanc_study_id: str
    study_instance_uid: str | None
    status: str = Field(description="pending | running | done | failed")
    attempts: int
    reason: str | None = Field(description="the last error (no patient data)")
    next_attempt_at: dt.datetime | None
    lease_until: dt.datetime | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    study_status: str | None = Field(description="the study's state, when a study row exists")
    study_url: str | None = Field(description="the study in this API, when a study row exists")


def pull_out(row: PullRequestRow, study_status: str | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "orthanc_study_id": row.orthanc_study_id,
        "study_instance_uid": row.study_instance_uid,
        "status": row.status,
        "attempts": row.attempts,
        "reason": row.last_error,
        "next_attempt_at": row.next_attempt_at,
        "lease_until": row.lease_until,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "study_status": study_status,
        "study_url": f"/api/studies/{row.study_instance_uid}" if study_status else None,
    }


def _with_studies(s: Session, rows: list[PullRequestRow]) -> list[dict[str, Any]]:
    uids = {r.study_instance_uid for r in rows if r.study_instance_uid}
    status_of: dict[str, str] = {}
    if uids:
        query = select(Study.study_instance_uid, Study.status)
        status_of = {
            uid: st for uid, st in s.execute(query.where(Study.study_instance_uid.in_(uids)))
        }
    return [pull_out(r, status_of.get(r.study_instance_uid or "")) for r in rows]


@router.get(
    "/api/pulls",
    response_model=list[PullOut],
    responses={**AUTH_RESPONSES, 422: {"description": "a filter is not valid"}},
)
def list_pulls(
    s: DbSession,
    _who: Viewer,
    status: Annotated[PullStatus | None, Query(description="pull state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[dict[str, Any]]:
    """Pull requests, newest first."""
    stmt = select(PullRequestRow)
    if status:
        stmt = stmt.where(PullRequestRow.status == status.value)
    rows = list(s.scalars(stmt.order_by(PullRequestRow.id.desc()).limit(limit).offset(offset)))
    return _with_studies(s, rows)


@router.get(
    "/api/pulls/{pull_id}",
    response_model=PullOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND},
)
def get_pull(pull_id: PullId, s: DbSession, _who: Viewer) -> dict[str, Any]:
    row = s.get(PullRequestRow, pull_id)
    if row is None:
        raise HTTPException(status_code=404, detail="unknown pull request")
    return _with_studies(s, [row])[0]


def retry_pull(s: Session, pull_id: int, actor: str) -> PullRequestRow:
    """A failed or done pull gets a fresh set of attempts, due now (guarded UPDATE: a pull that
    is pending or running is left alone, 409)."""
    row = s.get(PullRequestRow, pull_id)
    if row is None:
        raise HTTPException(status_code=404, detail="unknown pull request")
    before = {"status": row.status, "attempts": row.attempts, "reason": row.last_error}
    retried = updated(
        s,
        update(PullRequestRow)
        .where(
            PullRequestRow.id == pull_id,
            PullRequestRow.status.in_((PullStatus.FAILED.value, PullStatus.DONE.value)),
        )
        .values(
            status=PullStatus.PENDING.value,
            attempts=0,
            next_attempt_at=None,
            lease_until=None,
            finished_at=None,
        ),
    )
    s.refresh(row)
    if not retried:
        raise HTTPException(status_code=409, detail=f"the pull is {row.status}")
    record_audit(
        s,
        actor,
        "pull.retry",
        target_type="pull",
        target=str(pull_id),
        before=before,
        after={"status": row.status},
    )
    if row.study_instance_uid:
        sid = s.scalar(select(Study.id).where(Study.study_instance_uid == row.study_instance_uid))
        if sid is not None:
            record_event(s, "study.pull_retry", f"pull {pull_id} retried by {actor}", study_id=sid)
    return row


@router.post(
    "/api/pulls/{pull_id}/retry",
    response_model=PullOut,
    responses={
        **AUTH_RESPONSES,
        **NOT_FOUND,
        409: {"description": "the pull is pending or running"},
    },
)
def retry(pull_id: PullId, request: Request, s: DbSession, who: Operator) -> dict[str, Any]:
    """Pull again from Orthanc (e.g. once it is back): fresh attempts, due now."""
    row = retry_pull(s, pull_id, who.name)
    s.commit()
    puller = get_state(request).puller
    if puller is not None:
        puller.wake()
    return _with_studies(s, [row])[0]
