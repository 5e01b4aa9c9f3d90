"""Refusals: every instance a door refuses is a row an admin can see (``GET /api/refusals``, the
console's Refusals page), not only a log line.

A row holds UIDs, the DIMSE status and a fixed reason text, never patient data: the UIDs are
read tolerantly (from the request, or from the file's header even when its body is broken) and
kept only when they are well-formed UIDs. Recording is best effort: a database failure is
logged and the door still answers its refusal status.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from pacs_agent import metrics
from pacs_agent.db.models import Refusal, Study
from pacs_agent.db.session import Database, record_event

log = logging.getLogger(__name__)

DOORS = ("dimse", "stow", "orthanc")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]


def clean_uid(value: object) -> str | None:
    """``value`` as a UID when it is a well-formed one, else None (it might carry anything)."""
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    if not text or len(text) > 64 or not _UID_RE.match(text):
        return None
    return text


@dataclass(frozen=True)
class RefusedUids:
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None

    def or_else(self, other: RefusedUids) -> RefusedUids:
        return RefusedUids(
            self.sop_instance_uid or other.sop_instance_uid,
            self.sop_class_uid or other.sop_class_uid,
            self.study_instance_uid or other.study_instance_uid,
        )


def uids_from_file(path: Path) -> RefusedUids:
    """The SOP Instance, SOP Class and Study UIDs of a file that may be truncated or malformed:
    only those three elements are read (pydicom ``specific_tags``, ``force``), and whatever
    cannot be read stays None. Never raises."""
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=_UID_TAGS)
        return RefusedUids(
            clean_uid(ds.get("SOPInstanceUID")),
            clean_uid(ds.get("SOPClassUID")),
            clean_uid(ds.get("StudyInstanceUID")),
        )
    except Exception:
        return RefusedUids()


def uids_from_bytes(data: bytes) -> RefusedUids:
    try:
        ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True, specific_tags=_UID_TAGS)
        return RefusedUids(
            clean_uid(ds.get("SOPInstanceUID")),
            clean_uid(ds.get("SOPClassUID")),
            clean_uid(ds.get("StudyInstanceUID")),
        )
    except Exception:
        return RefusedUids()


def record_refusal(
    db: Database,
    *,
    door: str,
    status: int,
    reason: str,
    uids: RefusedUids = RefusedUids(),
    calling_ae: str | None = None,
    sender_address: str | None = None,
) -> int | None:
    """Write one row to ``refusals`` (and an ``instance.refused`` event on the study when the
    study is known); return the row id, or None when the database write failed (logged)."""
    try:
        metrics.refused(door, status)
    except Exception:
        log.error("could not count the refusal in metrics")
    try:
        with db.session() as s:
            row = Refusal(
                door=door,
                calling_ae=(calling_ae or "")[:16] or None,
                sender_address=(sender_address or "")[:64] or None,
                sop_instance_uid=uids.sop_instance_uid,
                sop_class_uid=uids.sop_class_uid,
                study_instance_uid=uids.study_instance_uid,
                status=int(status),
                reason=reason,
            )
            s.add(row)
            if uids.study_instance_uid:
                study_id = s.scalar(
                    select(Study.id).where(Study.study_instance_uid == uids.study_instance_uid)
                )
                if study_id is not None:
                    record_event(
                        s,
                        "instance.refused",
                        f"SOP Instance {uids.sop_instance_uid or '(unreadable)'} refused via "
                        f"{door}: 0x{status:04X} {reason}",
                        study_id=study_id,
                        level="warning",
                    )
            s.flush()
            return row.id
    except Exception as exc:
        log.error(
            "could not record the refusal of sop=%s via %s (%s); the refusal stands",
            uids.sop_instance_uid,
            door,
            type(exc).__name__,
        )
        return None
