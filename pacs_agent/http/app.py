"""Kept for imports that predate ``pacs_agent.api``: the application factory lives there."""

from pacs_agent.api.app import AgentState, create_app

__all__ = ["AgentState", "create_app"]
