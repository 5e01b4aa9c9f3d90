"""``GET /api/instances/{uid}``: a stored instance for a worker (service token) or a user."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from pacs_agent.api.deps import Service, get_state
from pacs_agent.db.models import Instance

router = APIRouter(tags=["instances"])


@router.get(
    "/api/instances/{sop_uid}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/dicom": {}}},
        404: {"description": "unknown SOP Instance UID"},
        410: {"description": "instance file missing from the store"},
    },
)
def get_instance(sop_uid: str, request: Request, _who: Service) -> FileResponse:
    state = get_state(request)
    with state.db.session() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
    if inst is None:
        raise HTTPException(status_code=404, detail="unknown SOP Instance UID")
    path = state.store.path_for(inst.path)
    if not path.is_file():
        raise HTTPException(status_code=410, detail="instance file missing from the store")
    return FileResponse(path, media_type="application/dicom")
