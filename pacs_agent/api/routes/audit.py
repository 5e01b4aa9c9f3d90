"""``GET /api/audit``: the audit log, newest first (operators and admins).

Filters: ``action`` (a prefix: ``login`` gives every login outcome, ``rule.update`` one action),
``target_type``, ``target``, ``actor`` (exact), ``before_id`` (paging: entries older than that
id) and ``limit``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator
from pacs_agent.db.models import AuditEntry

router = APIRouter(tags=["audit"])
NO_NUL = r"^[^\x00]*$"  # PostgreSQL cannot compare with a string holding NUL: 422, not 500


class AuditItem(BaseModel):
    id: int
    at: dt.datetime
    actor: str | None
    action: str
    target_type: str | None
    target: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    detail: str | None


@router.get("/api/audit", responses={**AUTH_RESPONSES})
def list_audit(
    s: DbSession,
    _who: Operator,
    action: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    target_type: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    target: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
    actor: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditItem]:
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        stmt = stmt.where(AuditEntry.action.startswith(action, autoescape=True))
    if target_type:
        stmt = stmt.where(AuditEntry.target_type == target_type)
    if target:
        stmt = stmt.where(AuditEntry.target == target)
    if actor:
        stmt = stmt.where(AuditEntry.actor == actor)
    if before_id is not None:
        stmt = stmt.where(AuditEntry.id < before_id)
    return [
        AuditItem(
            id=a.id,
            at=a.at,
            actor=a.actor,
            action=a.action,
            target_type=a.target_type,
            target=a.target,
            before=a.before,
            after=a.after,
            detail=a.detail,
        )
        for a in s.scalars(stmt)
    ]
