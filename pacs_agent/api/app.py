"""The agent's FastAPI application: one router per resource (``api/routes/``) and the console.

``create_app`` only assembles; what each route does lives in its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pacs_agent import __version__
from pacs_agent.db.session import Database
from pacs_agent.receiving.pull import PullWorker
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings


@dataclass
class AgentState:
    settings: Settings
    db: Database
    store: InstanceStore
    puller: PullWorker | None
    dimse_running: Any = None  # callable -> bool


class RefuseNul:
    """Answer 400 to a path or query string holding a NUL character (``%00``): no identifier
    of ours contains one, and PostgreSQL refuses NUL in text, which would surface as a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode()
            query = scope.get("query_string", b"")
            if b"\x00" in scope.get("path", "").encode() or any(
                b"%00" in part.lower() or b"\x00" in part for part in (raw, query)
            ):
                response = JSONResponse({"detail": "NUL character in the request"}, 400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: AgentState) -> FastAPI:
    from pacs_agent.api.console.routes import router as console_router
    from pacs_agent.api.routes import (
        audit,
        auth,
        destinations,
        fairness,
        grounding,
        health,
        instances,
        jobs,
        metrics,
        notifications,
        pipelines,
        pulls,
        queue,
        refusals,
        rules,
        similar,
        studies,
        users,
        webhook,
    )
    from pacs_agent.receiving.stow import router as stow_router

    app = FastAPI(
        title="pacs-agent",
        version=__version__,
        # Documented once for every route: a request the agent cannot read at all.
        responses={400: {"description": "the request could not be read (bad body or NUL)"}},
    )
    app.add_middleware(RefuseNul)
    app.state.agent = state
    for module in (
        health,
        webhook,
        auth,
        instances,
        similar,
        studies,
        pulls,
        jobs,
        notifications,
        rules,
        destinations,
        pipelines,
        queue,
        users,
        audit,
        refusals,
        fairness,
        grounding,
        metrics,
    ):
        app.include_router(module.router)
    app.include_router(stow_router)
    app.include_router(console_router)
    return app
