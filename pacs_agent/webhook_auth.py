"""HMAC signatures for the Orthanc webhook (the plugin in orthanc/plugin.py signs the same way).

Signature: ``sha256=<hex HMAC-SHA256(secret, f"{timestamp}.".encode() + body)>`` in the
``X-PACS-Agent-Signature`` header, the same integer timestamp in ``X-PACS-Agent-Timestamp``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-PACS-Agent-Signature"
TIMESTAMP_HEADER = "X-PACS-Agent-Timestamp"


class WebhookAuthError(Exception):
    pass


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp_header: str | None,
    signature_header: str | None,
    body: bytes,
    *,
    max_skew_s: int,
    now: float | None = None,
) -> int:
    """Return the timestamp if the call is authentic and fresh; raise WebhookAuthError if not."""
    if not timestamp_header or not signature_header:
        raise WebhookAuthError("unsigned request")
    try:
        ts = int(timestamp_header)
    except ValueError:
        raise WebhookAuthError("malformed timestamp") from None
    now = time.time() if now is None else now
    if abs(now - ts) > max_skew_s:
        raise WebhookAuthError("timestamp outside the accepted window (replay?)")
    expected = sign(secret, ts, body)
    if not hmac.compare_digest(expected, signature_header.strip()):
        raise WebhookAuthError("bad signature")
    return ts
