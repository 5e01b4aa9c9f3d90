"""``GET /health``: open, so that load balancers and installers can ask without a credential."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from pacs_agent import __version__
from pacs_agent.api.deps import get_state

router = APIRouter(tags=["health"])


@router.get("/health")
def health(request: Request) -> JSONResponse:
    st = get_state(request)
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
