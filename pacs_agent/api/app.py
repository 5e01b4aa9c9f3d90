"""The agent's FastAPI application: one router per resource (``api/routes/``) and the console.

``create_app`` only assembles; what each route does lives in its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from pacs_agent import __version__
from pacs_agent.db.session import Database
from pacs_agent.pull import PullWorker
from pacs_agent.settings import Settings
from pacs_agent.store import InstanceStore


@dataclass
class AgentState:
    settings: Settings
    db: Database
    store: InstanceStore
    puller: PullWorker | None
    dimse_running: Any = None  # callable -> bool


def create_app(state: AgentState) -> FastAPI:
    from pacs_agent.api.console.routes import router as console_router
    from pacs_agent.api.routes import (
        audit,
        auth,
        destinations,
        health,
        instances,
        jobs,
        notifications,
        pipelines,
        queue,
        rules,
        studies,
        users,
        webhook,
    )
    from pacs_agent.http.stow import router as stow_router

    app = FastAPI(title="pacs-agent", version=__version__)
    app.state.agent = state
    for module in (
        health,
        webhook,
        auth,
        instances,
        studies,
        jobs,
        rules,
        destinations,
        pipelines,
        queue,
        users,
        audit,
    ):
        app.include_router(module.router)
    app.include_router(stow_router)
    app.include_router(console_router)
    return app
