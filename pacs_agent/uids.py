"""Deterministic DICOM UIDs.

Output objects take UIDs derived from (source, pipeline version, kind), so a retried or
redelivered job produces the same SOP Instance UIDs and the PACS never receives duplicates.
"""

from __future__ import annotations

import hashlib

# "2.25." + a decimal integer is the UUID-derived UID root of PS3.5 B.2; it needs no registered
# organisation root. 2**128 has 39 digits, so the UID stays within 64 characters.
_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """Return a valid UID that depends only on ``parts`` (order matters)."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    value = int.from_bytes(digest[:16], "big")
    uid = f"{_ROOT}{value}"
    assert len(uid) <= 64
    return uid
