"""What the console's pages show, read from the database: plain dicts for the templates.

The pages render server-side from these (Jinja2 autoescapes every value, DICOM text included);
actions go through the JSON API. Nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import exists, false, func, or_, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import (
    ApiToken,
    AuditEntry,
    Delivery,
    Destination,
    Event,
    Instance,
    Job,
    Notification,
    Pipeline,
    Result,
    Rule,
    Series,
    Study,
    StudyStatus,
    User,
    WorkerBeat,
)
from pacs_agent.scheduling.leases import lease_view
from pacs_agent.scheduling.priority import CLASSES

TRIAGE_ORDER = {"critical": 3, "urgent": 2, "routine": 1}
LIST_LIMIT = 200
FALLBACK = "fallback"  # the fallback rule's name, as studies record it


def duration(seconds: float | None) -> str:
    """A short human duration: ``4.2 s``, ``3 min 10 s``, ``2 h 5 min``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def when(t: dt.datetime | None) -> str:
    """UTC timestamp as the console shows it (ISO, to the second)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def mask_url(url: str) -> str:
    """A destination URL without anything that may be a credential: user info, query and
    fragment are dropped (the API masks too; the console never shows them either)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(unparsable URL hidden)"
    if not parts.scheme:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if "@" in parts.netloc:
        # dicom://AET@host: the user part is an AE title, not a secret; elsewhere it may be.
        user = parts.username or ""
        shown = user if parts.scheme.split("+")[0] == "dicom" and parts.password is None else "***"
        host = f"{shown}@{host}"
    hidden = " (query hidden)" if parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{parts.path}{hidden}"


# studies ---------------------------------------------------------------------------------------


def _findings(results: list[Result]) -> str:
    present: list[tuple[float, str]] = []
    seen_sr = False
    for r in results:
        if r.kind != "sr":
            continue
        seen_sr = True
        for f in (r.summary or {}).get("findings") or []:
            if f.get("present"):
                present.append((float(f.get("probability") or 0), str(f.get("label"))))
    if not seen_sr:
        return ""
    if not present:
        return "no finding above threshold"
    best: dict[str, float] = {}
    for p, label in present:
        best[label] = max(p, best.get(label, 0.0))
    ordered = sorted(best.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{label} {p:.2f}" for label, p in ordered[:4]) + (
        f" (+{len(ordered) - 4})" if len(ordered) > 4 else ""
    )


def study_row(s: Session, st: Study) -> dict[str, Any]:
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    results = (
        s.scalars(select(Result).where(Result.job_id.in_([j.id for j in jobs]))).all()
        if jobs
        else []
    )
    series = s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.id)).all()
    latest = jobs[-1] if jobs else None
    triage = max(
        (j.triage for j in jobs if j.triage), key=lambda t: TRIAGE_ORDER.get(t, 0), default=None
    )
    finished = [j.finished_at for j in jobs if j.finished_at and j.status == "done"]
    last_in = st.last_received_at
    to_result = (
        (max(f for f in finished if f) - last_in).total_seconds() if finished and last_in else None
    )
    return {
        "uid": st.study_instance_uid,
        "status": st.status,
        "reason": st.reason or "",
        "version": st.version,
        "received": when(st.first_received_at),
        "source": st.source,
        "calling_ae": st.calling_ae or "",
        "modalities": sorted({x.modality for x in series if x.modality}),
        "descriptions": [x.description for x in series if x.description],
        "body_parts": sorted({x.body_part for x in series if x.body_part}),
        "priority": (latest.priority_class if latest else None) or st.incoming_priority or "",
        "triage": triage or "",
        "findings": _findings(list(results)),
        "rule": st.rule_name or "",
        "rule_version": st.rule_version,
        "pipelines": sorted({j.pipeline for j in jobs}),
        "to_result": duration(to_result),
        "error": next((j.error for j in reversed(jobs) if j.error), "") or "",
    }


def list_studies(
    s: Session,
    *,
    status: str = "",
    priority: str = "",
    rule: str = "",
    pipeline: str = "",
    q: str = "",
    limit: int = LIST_LIMIT,
) -> list[dict[str, Any]]:
    stmt = select(Study).order_by(Study.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(Study.status == status)
    if rule == FALLBACK:  # recorded by name, or (older rows) as no rule
        stmt = stmt.where(or_(Study.rule_name.is_(None), Study.rule_name == FALLBACK))
    elif rule:
        stmt = stmt.where(Study.rule_name == rule)
    if pipeline:
        stmt = stmt.where(exists().where(Job.study_id == Study.id, Job.pipeline == pipeline))
    if priority:
        stmt = stmt.where(
            or_(
                exists().where(Job.study_id == Study.id, Job.priority_class == priority),
                Study.incoming_priority == priority,
            )
        )
    if q:
        stmt = stmt.where(Study.study_instance_uid.contains(q))
    return [study_row(s, st) for st in s.scalars(stmt)]


def study_filters(s: Session) -> dict[str, list[str]]:
    rules = [r for r in s.scalars(select(Rule.name).order_by(Rule.position, Rule.name))]
    pipes = set(s.scalars(select(Pipeline.name))) | set(s.scalars(select(Job.pipeline).distinct()))
    return {
        "status": [x.value for x in StudyStatus],
        "priority": list(CLASSES),
        "rule": [*[r for r in rules if r != FALLBACK], FALLBACK],
        "pipeline": sorted(pipes),
    }


def _tl(at: dt.datetime | None, kind: str, text: str, level: str = "info", **extra: Any) -> dict:
    return {"t": at, "at": when(at), "kind": kind, "text": text, "level": level, **extra}


# Header attributes the study page shows (none identifies the patient).
HEADER_KEYWORDS = (
    "StudyDescription",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
)


def study_header(s: Session, study_id: int, path_for: Callable[[str], Path]) -> dict[str, str]:
    """A few study-level attributes from the first stored instance ({} once it is purged)."""
    from pydicom import dcmread

    rel = s.scalar(
        select(Instance.path).where(Instance.study_id == study_id).order_by(Instance.id).limit(1)
    )
    if rel is None:
        return {}
    try:
        ds = dcmread(path_for(rel), stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
    except Exception:  # purged, unreadable or outside the store: the page shows without it
        return {}
    return {k: str(ds.get(k, "") or "") for k in HEADER_KEYWORDS if ds.get(k, None)}


def study_detail(
    s: Session,
    uid: str,
    path_for: Callable[[str], Path] | None = None,
    *,
    heartbeat_timeout_s: float = 60.0,
) -> dict[str, Any] | None:
    st = s.scalar(select(Study).where(Study.study_instance_uid == uid))
    if st is None:
        return None
    row = study_row(s, st)
    jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
    job_ids = [j.id for j in jobs]
    series = []
    for x in s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.id)):
        n = s.scalar(select(func.count(Instance.id)).where(Instance.series_id == x.id))
        series.append(
            {
                "uid": x.series_instance_uid,
                "modality": x.modality or "",
                "body_part": x.body_part or "",
                "description": x.description or "",
                "instances": n,
            }
        )
    not_analysable = [
        r
        for r in s.scalars(
            select(Instance.reason).where(
                Instance.study_id == st.id, Instance.analysable.is_(False)
            )
        )
        if r
    ]
    n_instances = s.scalar(select(func.count(Instance.id)).where(Instance.study_id == st.id)) or 0

    events = s.scalars(
        select(Event)
        .where(or_(Event.study_id == st.id, Event.job_id.in_(job_ids) if job_ids else false()))
        .order_by(Event.id)
    ).all()
    recorded = {e.kind for e in events}
    timeline: list[dict[str, Any]] = []
    # What the study's row says, where no event recorded it already.
    if "study.receiving" not in recorded:
        timeline.append(
            _tl(
                st.first_received_at,
                "received",
                f"first instance received via {st.source}"
                + (f" from {st.calling_ae}" if st.calling_ae else ""),
            )
        )
    if n_instances > 1 and st.last_received_at:
        timeline.append(
            _tl(st.last_received_at, "received", f"last instance received ({n_instances} in all)")
        )
    if st.completed_at and "study.complete" not in recorded:
        timeline.append(_tl(st.completed_at, "complete", f"study complete (version {st.version})"))
    event_kinds = {(e.job_id, e.kind) for e in events}
    for e in events:
        if e.kind == "job.created":  # shown as the routing decision below
            continue
        timeline.append(_tl(e.at, e.kind, e.message, e.level, job=e.job_id))
    job_views = []
    for j in jobs:
        tag = f"job {j.id} ({j.pipeline})"
        lease = lease_view(s, j, heartbeat_timeout_s)
        routed = (
            f"routed by rule {j.rule_name} v{j.rule_version}"
            if j.rule_name
            else "routed by the fallback rule"
        )
        timeline.append(
            _tl(j.created_at, "routed", f"{routed}: {tag}, priority {j.priority_class}", job=j.id)
        )
        if j.enqueued_at and (j.id, "job.queued") not in event_kinds:
            timeline.append(_tl(j.enqueued_at, "queued", f"{tag} queued", job=j.id))
        if j.started_at and (j.id, "job.running") not in event_kinds:
            timeline.append(_tl(j.started_at, "started", f"{tag} started", job=j.id))
        if j.finished_at and not {(j.id, "job.done"), (j.id, "job.failed")} & event_kinds:
            timeline.append(
                _tl(
                    j.finished_at,
                    "failed" if j.status == "failed" else "finished",
                    f"{tag} {j.status}" + (f": {j.error}" if j.error else ""),
                    "error" if j.status == "failed" else "info",
                    job=j.id,
                )
            )
        results = s.scalars(select(Result).where(Result.job_id == j.id).order_by(Result.id)).all()
        result_views = []
        for r in results:
            summary = r.summary or {}
            timeline.append(
                _tl(
                    r.created_at,
                    "output",
                    f"{r.kind.upper()} {summary.get('series_description') or ''}".strip(),
                    job=j.id,
                    sop=r.sop_instance_uid,
                )
            )
            deliveries = s.scalars(
                select(Delivery).where(Delivery.result_id == r.id).order_by(Delivery.id)
            ).all()
            for d in deliveries:
                target = mask_url(d.destination)
                if d.status == "done":
                    timeline.append(
                        _tl(d.delivered_at, "delivered", f"{r.kind.upper()} to {target}", job=j.id)
                    )
                elif d.status == "failed" or d.last_error:
                    timeline.append(
                        _tl(
                            d.next_attempt_at or d.delivered_at or r.created_at,
                            "delivery " + d.status,
                            f"{r.kind.upper()} to {target}: attempt {d.attempts}: "
                            f"{d.last_error or ''}",
                            "error" if d.status == "failed" else "warning",
                            job=j.id,
                        )
                    )
            result_views.append(
                {
                    "kind": r.kind,
                    "sop": r.sop_instance_uid,
                    "series": r.series_instance_uid,
                    "description": summary.get("series_description") or "",
                    "deliveries": [
                        {
                            "to": mask_url(d.destination),
                            "status": d.status,
                            "attempts": d.attempts,
                            "error": d.last_error or "",
                        }
                        for d in deliveries
                    ],
                }
            )
        job_views.append(
            {
                "id": j.id,
                "pipeline": j.pipeline,
                "status": j.status,
                "version": j.study_version,
                "priority": j.priority_class,
                "triage": j.triage or "",
                "rule": j.rule_name or "",
                "rule_version": j.rule_version,
                "attempts": j.attempts,
                "error": j.error or "",
                "retryable": j.status in ("failed", "done"),
                # A running job's lease: its worker, last heartbeat, and whether the worker is
                # alive; one whose worker is gone can be taken back (the retry action).
                "worker": j.worker or "",
                "heartbeat": when(j.heartbeat_at),
                "worker_alive": lease["worker_alive"],
                "take_back": lease["worker_alive"] is False,
                "results": result_views,
            }
        )
    for note in s.scalars(
        select(Notification).where(Notification.study_id == st.id).order_by(Notification.id)
    ):
        target = mask_url(note.channel)
        if note.status == "done":
            timeline.append(_tl(note.sent_at, "notified", f"{note.level} notification to {target}"))
        else:
            timeline.append(
                _tl(
                    note.next_attempt_at or note.created_at,
                    "notification " + note.status,
                    f"{note.level} notification to {target}: attempt {note.attempts}"
                    + (f": {note.last_error}" if note.last_error else ""),
                    "error" if note.status == "failed" else "warning",
                )
            )
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    timeline.sort(key=lambda e: e["t"] or epoch)
    return {
        **row,
        "header": study_header(s, st.id, path_for) if path_for is not None else {},
        "instances": n_instances,
        "called_ae": st.called_ae or "",
        "sender_address": st.sender_address or "",
        "incoming_priority": st.incoming_priority or "",
        "completed": when(st.completed_at),
        "series": series,
        "not_analysable": sorted(set(not_analysable)),
        "jobs": job_views,
        "timeline": timeline,
    }


def result_path(s: Session, study_uid: str, sop_uid: str) -> str | None:
    """The stored path (relative to the results folder) of a result object of this study."""
    return s.scalar(
        select(Result.path)
        .join(Job, Job.id == Result.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == study_uid, Result.sop_instance_uid == sop_uid)
    )


def recent_study_uids(s: Session, limit: int = 50) -> list[dict[str, str]]:
    out = []
    for st in s.scalars(select(Study).order_by(Study.id.desc()).limit(limit)):
        desc = s.scalar(
            select(Series.description).where(
                Series.study_id == st.id, Series.description.is_not(None)
            )
        )
        out.append(
            {"uid": st.study_instance_uid, "label": desc or "", "at": when(st.first_received_at)}
        )
    return out


# rules -----------------------------------------------------------------------------------------


def rule_dict(r: Rule) -> dict[str, Any]:
    """A rule in the API's shape (what POST /api/rules takes, plus version and state)."""
    return {
        "name": r.name,
        "enabled": bool(r.enabled),
        "position": r.position,
        "when": list(r.when or []),
        "action": r.action,
        "reason": r.reason,
        "pipeline": r.pipeline,
        "priority": r.priority,
        "destinations": list(r.destinations or []),
        "completion": r.completion,
        "notify": list(r.notify or []),
        "continue": bool(r.continue_),
        "version": r.version,
        "error": r.error,
        "updated_at": when(r.updated_at),
        "updated_by": r.updated_by or "",
    }


def list_rules(s: Session) -> list[dict[str, Any]]:
    return [rule_dict(r) for r in s.scalars(select(Rule).order_by(Rule.position, Rule.id))]


def get_rule(s: Session, name: str) -> dict[str, Any] | None:
    r = s.scalar(select(Rule).where(Rule.name == name))
    return rule_dict(r) if r else None


def choices(s: Session) -> dict[str, list[str]]:
    """What a rule may name: pipelines, destinations (plus ``sender``), channels, classes."""
    pipes = set(s.scalars(select(Pipeline.name)))
    for beat in s.scalars(select(WorkerBeat)):
        pipes.update(beat.pipelines or [])
    dests = s.scalars(select(Destination).order_by(Destination.name)).all()
    return {
        "pipelines": sorted(pipes),
        "destinations": [d.name for d in dests if d.purpose != "notify"] + ["sender"],
        "channels": [d.name for d in dests if d.purpose == "notify"],
        "priorities": list(CLASSES),
    }


# destinations, users, audit -------------------------------------------------------------------


def list_destinations(s: Session) -> list[dict[str, Any]]:
    return [
        {
            "name": d.name,
            "url": mask_url(d.url),
            "purpose": d.purpose,
            "enabled": bool(d.enabled),
            "updated": when(d.updated_at),
        }
        for d in s.scalars(select(Destination).order_by(Destination.purpose, Destination.name))
    ]


def list_users(s: Session) -> list[dict[str, Any]]:
    out = []
    for u in s.scalars(select(User).order_by(User.name)):
        tokens = s.scalars(
            select(ApiToken)
            .where(ApiToken.user_id == u.id, ApiToken.revoked_at.is_(None))
            .order_by(ApiToken.id)
        ).all()
        out.append(
            {
                "name": u.name,
                "role": u.role,
                "enabled": bool(u.enabled),
                "has_password": bool(u.password_hash),
                "created": when(u.created_at),
                "last_login": when(u.last_login_at),
                "tokens": [
                    {
                        "id": k.id,
                        "prefix": k.prefix,
                        "created": when(k.created_at),
                        "last_used": when(k.last_used_at),
                    }
                    for k in tokens
                ],
            }
        )
    return out


def _dump(value: dict[str, Any] | None) -> list[str]:
    if value is None:
        return []
    return json.dumps(value, indent=2, sort_keys=True, default=str).splitlines()


def list_audit(
    s: Session, *, actor: str = "", action: str = "", target: str = "", limit: int = LIST_LIMIT
) -> list[dict[str, Any]]:
    stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor:
        stmt = stmt.where(AuditEntry.actor == actor)
    if action:
        stmt = stmt.where(AuditEntry.action.startswith(action))
    if target:
        stmt = stmt.where(AuditEntry.target.contains(target))
    out = []
    for a in s.scalars(stmt):
        diff = []
        if a.before is not None or a.after is not None:
            diff = list(
                difflib.unified_diff(
                    _dump(a.before), _dump(a.after), "before", "after", lineterm=""
                )
            )
        out.append(
            {
                "at": when(a.at),
                "actor": a.actor or "system",
                "action": a.action,
                "target_type": a.target_type or "",
                "target": a.target or "",
                "detail": a.detail or "",
                "diff": diff,
            }
        )
    return out
