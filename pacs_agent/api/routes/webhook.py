"""``POST /webhook/orthanc``: open to the network but HMAC-signed with a timestamp and a replay
guard; the agent then pulls the stable study from Orthanc."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from pacs_agent.api.deps import get_state
from pacs_agent.receiving.pull import PullRequest
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookAuthError, verify

log = logging.getLogger(__name__)
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
        503: {"description": "the Orthanc pull is not configured"},
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
    if state.puller is None:
        raise HTTPException(status_code=503, detail="Orthanc pull is not configured")
    state.puller.submit(PullRequest(orthanc_id, payload.get("study_instance_uid")))
    log.info("webhook: stable Orthanc study %s queued for pull", orthanc_id)
    return {"accepted": True, "orthanc_study_id": orthanc_id}
