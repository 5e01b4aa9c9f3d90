"""``POST /webhook/orthanc``: open to the network but HMAC-signed with a timestamp and a replay
guard. The pull request is persisted (``pull_requests``) before the 202, in the same request, so
an agent restart loses nothing; the agent's pull loop pulls it (``receiving/pull.py``)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from pacs_agent.api.deps import get_state
from pacs_agent.db.session import Database
from pacs_agent.receiving.pull import enqueue_pull
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookAuthError, verify

log = logging.getLogger(__name__)
ORTHANC_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UID = re.compile(r"^[0-9.]{1,64}$")
router = APIRouter(tags=["webhook"])


class _ReplayGuard:
    """Remembers recent signatures so that a captured call cannot be replayed in the window."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def check_and_add(self, signature: str) -> bool:
        with self._lock:
            if signature in self._seen:
                return False
            self._seen[signature] = None
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


def _replay_guard(request: Request) -> _ReplayGuard:
    guard = getattr(request.app.state, "webhook_replay", None)
    if guard is None:
        guard = request.app.state.webhook_replay = _ReplayGuard()
    return guard  # type: ignore[no-any-return]


@router.post(
    "/webhook/orthanc",
    status_code=202,
    responses={
        400: {"description": "body is not JSON with orthanc_study_id"},
        401: {"description": "missing, wrong, stale or replayed HMAC signature"},
        503: {"description": "the pull request could not be persisted (database down)"},
    },
)
async def orthanc_webhook(request: Request) -> dict[str, Any]:
    state = get_state(request)
    body = await request.body()
    sig = request.headers.get(SIGNATURE_HEADER)
    try:
        verify(
            state.settings.webhook_secret,
            request.headers.get(TIMESTAMP_HEADER),
            sig,
            body,
            max_skew_s=state.settings.webhook_max_skew_s,
        )
    except WebhookAuthError as exc:
        log.warning("webhook refused: %s", exc)
        raise HTTPException(status_code=401, detail=str(exc)) from None
    if not _replay_guard(request).check_and_add(sig or ""):
        raise HTTPException(status_code=401, detail="replayed request")
    try:
        payload = json.loads(body)
        orthanc_id = str(payload["orthanc_study_id"])
    except (ValueError, KeyError, TypeError):
        raise HTTPException(
            status_code=400, detail="body must be JSON with orthanc_study_id"
        ) from None
    study_uid = payload.get("study_instance_uid")
    study_uid = str(study_uid) if study_uid else None
    if not ORTHANC_ID.fullmatch(orthanc_id):
        raise HTTPException(status_code=400, detail="orthanc_study_id is not an Orthanc id")
    if study_uid is not None and not UID.fullmatch(study_uid):
        raise HTTPException(status_code=400, detail="study_instance_uid is not a UID")
    try:
        pull_id, coalesced = await run_in_threadpool(_persist, state.db, orthanc_id, study_uid)
    except SQLAlchemyError as exc:
        log.error(
            "webhook: pull of Orthanc study %s not persisted: %s", orthanc_id, type(exc).__name__
        )
        raise HTTPException(
            status_code=503, detail="the pull request could not be persisted: try again"
        ) from None
    if state.puller is not None:
        state.puller.wake()
    log.info(
        "webhook: stable Orthanc study %s persisted as pull %d%s",
        orthanc_id,
        pull_id,
        " (coalesced with a pending one)" if coalesced else "",
    )
    return {
        "accepted": True,
        "orthanc_study_id": orthanc_id,
        "pull_id": pull_id,
        "coalesced": coalesced,
    }


def _persist(db: Database, orthanc_id: str, study_uid: str | None) -> tuple[int, bool]:
    with db.session() as s:
        return enqueue_pull(s, orthanc_id, study_uid)
