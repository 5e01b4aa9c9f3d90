"""``/api/notifications``: triage notifications (status, attempts, last error) and their retry.

Channel URLs are shown without credentials. A ``failed`` notification (out of attempts) is sent
again after an operator's retry, which is audited.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select

from pacs_agent.api.deps import DbSession, Operator, Viewer
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Notification, NotificationStatus, Study
from pacs_agent.dispatching.channels import mask_url
from pacs_agent.dispatching.notify import (
    notification_summary,
    retry_notification,
    study_notifications,
)

router = APIRouter(tags=["notifications"])

_STATUSES = tuple(s.value for s in NotificationStatus)


@router.get(
    "/api/notifications",
    responses={
        404: {"description": "unknown study"},
        422: {"description": "invalid status or limit"},
    },
)
def list_notifications(
    s: DbSession,
    _who: Viewer,
    study: str | None = Query(default=None, max_length=64, description="Study Instance UID"),
    status: str | None = Query(default=None, description="pending | done | failed"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    """A study's notifications (``?study=UID``), or the latest ones of every study."""
    if status is not None and status not in _STATUSES:
        raise HTTPException(status_code=422, detail=f"status must be one of {', '.join(_STATUSES)}")
    if study is not None:
        st = s.scalar(select(Study).where(Study.study_instance_uid == study))
        if st is None:
            raise HTTPException(status_code=404, detail="unknown study")
        rows = [
            dict(r, study_instance_uid=st.study_instance_uid) for r in study_notifications(s, st.id)
        ]
        return [r for r in rows if status is None or r["status"] == status][:limit]
    q = (
        select(Notification, Study.study_instance_uid)
        .join(Study, Study.id == Notification.study_id)
        .order_by(Notification.id.desc())
        .limit(limit)
    )
    if status is not None:
        q = q.where(Notification.status == status)
    return [dict(notification_summary(n), study_instance_uid=uid) for n, uid in s.execute(q)]


@router.post(
    "/api/notifications/{notification_id}/retry",
    responses={
        404: {"description": "unknown notification"},
        409: {"description": "the notification is not failed (pending or already sent)"},
    },
)
def retry(notification_id: int, s: DbSession, who: Operator) -> dict[str, Any]:
    """Send a failed notification again (a fresh set of attempts, due now)."""
    n = s.get(Notification, notification_id)
    if n is None:
        raise HTTPException(status_code=404, detail="unknown notification")
    if n.status != NotificationStatus.FAILED.value:
        raise HTTPException(status_code=409, detail=f"notification is {n.status}")
    before = {"status": n.status, "attempts": n.attempts, "last_error": n.last_error}
    retry_notification(s, n, who.name)
    record_audit(
        s,
        who.name,
        "notification.retry",
        target_type="notification",
        target=str(n.id),
        before=before,
        after={"status": n.status, "attempts": n.attempts},
        detail=f"{n.level} to {mask_url(n.channel)}",
    )
    return notification_summary(n)
