"""``GET /api/refusals``: instances the doors refused (C-STORE failure status, STOW-RS failed
SOP, Orthanc pull refusal), newest first (viewers and up).

Filters: ``door`` (dimse, stow or orthanc), ``calling_ae`` (exact), ``before_id`` (paging: rows
older than that id) and ``limit``. Rows hold UIDs, the status and a fixed reason, no patient data.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Viewer
from pacs_agent.db.models import Refusal

router = APIRouter(tags=["refusals"])
NO_NUL = r"^[^\x00]*$"  # PostgreSQL cannot compare with a string holding NUL: 422, not 500
Door = Literal["dimse", "stow", "orthanc"]


class RefusalItem(BaseModel):
    id: int
    at: dt.datetime
    door: str
    calling_ae: str | None
    sender_address: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    study_instance_uid: str | None
    status: int
    status_hex: str  # e.g. "0xA900", as DIMSE tools print it
    reason: str


def query_refusals(
    s: Session,
    *,
    door: str | None = None,
    calling_ae: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[RefusalItem]:
    """Refusals newest first (by id, which follows insertion), filtered; shared with the
    console's Refusals page."""
    stmt = select(Refusal).order_by(Refusal.id.desc()).limit(limit)
    if door:
        stmt = stmt.where(Refusal.door == door)
    if calling_ae:
        stmt = stmt.where(Refusal.calling_ae == calling_ae)
    if before_id is not None:
        stmt = stmt.where(Refusal.id < before_id)
    return [
        RefusalItem(
            id=r.id,
            at=r.at,
            door=r.door,
            calling_ae=r.calling_ae,
            sender_address=r.sender_address,
            sop_instance_uid=r.sop_instance_uid,
            sop_class_uid=r.sop_class_uid,
            study_instance_uid=r.study_instance_uid,
            status=r.status,
            status_hex=f"0x{r.status:04X}",
            reason=r.reason,
        )
        for r in s.scalars(stmt)
    ]


@router.get("/api/refusals", responses={**AUTH_RESPONSES})
def list_refusals(
    s: DbSession,
    _who: Viewer,
    door: Door | None = None,
    calling_ae: Annotated[str | None, Query(max_length=16, pattern=NO_NUL)] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RefusalItem]:
    return query_refusals(s, door=door, calling_ae=calling_ae, before_id=before_id, limit=limit)
