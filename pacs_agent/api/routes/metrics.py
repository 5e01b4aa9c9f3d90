"""``GET /metrics``: the agent's Prometheus metrics (pacs_agent.metrics), closed like every route.

A scraper presents either the dedicated ``PACS_AGENT_METRICS_TOKEN`` (read-only, metrics only)
or the bearer token of any role. The queue depth is counted in the jobs table at scrape time.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from pacs_agent import metrics
from pacs_agent.api.deps import AUTH_RESPONSES, Principal, current_principal, get_state
from pacs_agent.security import same

router = APIRouter(tags=["metrics"])


async def metrics_reader(request: Request) -> Principal:
    """The metrics token, or a logged-in caller of any role (401 otherwise)."""
    expected = get_state(request).settings.metrics_token
    auth = request.headers.get("authorization", "")
    if expected and auth[:7].lower() == "bearer " and same(auth[7:].strip(), expected):
        return Principal("metrics", "viewer", "metrics-token")
    principal = await current_principal(request)
    if principal is None:
        raise HTTPException(
            status_code=401,
            detail="a bearer token (any role, or the metrics token) is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


# Read by tests/test_openapi_auth.py like the roles of pacs_agent.api.deps.require: every role
# may read the metrics (viewer is the least one).
metrics_reader.required_role = "viewer"  # type: ignore[attr-defined]


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **AUTH_RESPONSES,
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
    },
)
async def get_metrics(
    request: Request, _who: Annotated[Principal, Depends(metrics_reader)]
) -> Response:
    body = await run_in_threadpool(metrics.render, get_state(request).db)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
