"""The audit log: who did what and when, with the before/after of every configuration change."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from pacs_agent.db.models import AuditEntry

log = logging.getLogger(__name__)


def record_audit(
    s: Session,
    actor: str | None,
    action: str,
    *,
    target_type: str | None = None,
    target: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    detail: str | None = None,
) -> AuditEntry:
    """Add an audit entry to the session's transaction (it commits with the change it records).

    ``before``/``after`` are JSON snapshots without secrets (mask credentials before passing).
    """
    entry = AuditEntry(
        actor=actor,
        action=action,
        target_type=target_type,
        target=target,
        before=before,
        after=after,
        detail=detail,
    )
    s.add(entry)
    log.info("audit %s by %s on %s %s", action, actor or "system", target_type or "-", target or "")
    return entry
