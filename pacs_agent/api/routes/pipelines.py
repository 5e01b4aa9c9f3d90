"""``/api/pipelines``: named model bundles, what each bundle is, and which live workers serve it.

The agent never imports torch: where a pipeline's bundle folder is visible on the agent's host it
reads ``manifest.json`` itself (name, version, DEMO flag, the checksum = sha256 of the manifest
bytes) and verifies the files' sha256 against it (cached by file size and modification time);
otherwise it relies on what the workers report in their heartbeat rows (a worker loads a bundle
only after verifying every checksum).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, BODY_RESPONSES, Admin, DbSession, Viewer, get_state
from pacs_agent.api.routes.destinations import NoEchoRoute, unprocessable
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Job, JobStatus, Pipeline, Rule, utcnow
from pacs_agent.destinations import NAME_RE
from pacs_agent.scheduling.pipelines import MANIFEST, served_pipelines

router = APIRouter(tags=["pipelines"], route_class=NoEchoRoute)

ALIVE_WITHIN_S = 60.0
ACTIVE = (JobStatus.PENDING.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
AUTH = AUTH_RESPONSES
BAD_BODY = BODY_RESPONSES
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown pipeline"}}
NAME_PATTERN = NAME_RE.pattern
NameInPath = Annotated[str, PathParam(min_length=1, max_length=128, pattern=NAME_PATTERN)]


def _check_text(field: str, value: str | None, *, multiline: bool = False) -> None:
    allowed = "\n\r\t" if multiline else ""
    if value is not None and any(
        (ord(c) < 0x20 and c not in allowed) or ord(c) == 0x7F for c in value
    ):
        raise unprocessable(field, "control characters are not allowed")


# --------------------------------------------------------------------------------------------
# models


class PipelineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="letters, digits, . _ -")
    bundle: str = Field(min_length=1, max_length=4096, description="bundle folder on the workers")
    description: str | None = Field(default=None, max_length=2000)
    enabled: bool = True


class PipelineUpdate(BaseModel):
    """Every field optional: what is sent changes."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="must equal the path's name if sent")
    bundle: str | None = Field(default=None, min_length=1, max_length=4096)
    description: str | None = Field(default=None, max_length=2000)
    enabled: bool | None = None


class WorkerBundle(BaseModel):
    name: str | None = None
    version: str | None = None
    checksum: str | None = None
    is_demo: bool | None = None


class ServingWorker(BaseModel):
    name: str
    lane: str
    last_seen_at: dt.datetime
    bundle: WorkerBundle | None = Field(description="the bundle as this worker loaded it")


class PipelineOut(BaseModel):
    name: str
    bundle: str = Field(description="bundle folder as the workers see it")
    description: str | None
    enabled: bool
    updated_at: dt.datetime | None
    bundle_name: str | None
    version: str | None
    checksum: str | None = Field(description="sha256 of the bundle's manifest.json")
    checksum_verified: bool | None = Field(
        description="every file matches the manifest (by the agent where it sees the folder, "
        "else by a live worker that loaded it); null: nobody could check"
    )
    is_demo: bool | None = Field(description="random weights: a DEMO, not for clinical use")
    bundle_visible: bool = Field(description="the agent sees the bundle folder")
    bundle_error: str | None = None
    served: bool = Field(description="at least one live worker serves it")
    workers: list[ServingWorker]
    used_by_rules: list[str]
    active_jobs: int


# --------------------------------------------------------------------------------------------
# reading a bundle without torch


class _Verifier:
    """sha256 of bundle files, remembered by (path, size, mtime) so a page view does not hash a
    model's weights again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int], str] = {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._known.get(key)
        if hit is not None:
            return hit
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            if len(self._known) > 4096:
                self._known.clear()
            self._known[key] = digest
        return digest


_verifier = _Verifier()


def _inside(base: Path, rel: str) -> Path:
    p = (base / rel).resolve()
    if not p.is_relative_to(base.resolve()):
        raise ValueError(f"{rel} points outside the bundle")
    return p


def read_bundle(folder: str) -> dict[str, Any]:
    """What the agent can tell of a bundle folder: ``visible``, and when it is, ``name``,
    ``version``, ``checksum``, ``is_demo``, ``verified`` and ``error``."""
    root = Path(folder).expanduser()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return {"visible": False}
    out: dict[str, Any] = {"visible": True, "verified": False, "error": None}
    try:
        raw = manifest_path.read_bytes()
        out["checksum"] = hashlib.sha256(raw).hexdigest()
        manifest = json.loads(raw.decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not a JSON object")
        out["name"] = str(manifest.get("name") or "") or None
        out["version"] = str(manifest.get("version") or "") or None
        out["is_demo"] = bool(manifest.get("random_weights", False))
        files: list[tuple[str, Path, str]] = []
        enc = manifest.get("encoder") or {}
        enc_rel = str(enc.get("path") or "encoder")
        enc_dir = Path(enc_rel) if Path(enc_rel).is_absolute() else _inside(root, enc_rel)
        for rel, digest in (enc.get("files") or {}).items():
            files.append((f"{enc_rel}/{rel}", _inside(enc_dir, str(rel)), str(digest)))
        for spec in (manifest.get("adapters") or {}).values():
            if isinstance(spec, dict) and spec.get("path"):
                files.append(
                    (str(spec["path"]), _inside(root, str(spec["path"])), str(spec.get("sha256")))
                )
        if not files:
            raise ValueError("the manifest lists no files")
        for label, path, expected in files:
            if not path.is_file():
                raise ValueError(f"missing file {label}")
            if _verifier.sha256(path) != expected.lower():
                raise ValueError(f"checksum mismatch for {label}")
        out["verified"] = True
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        out["error"] = str(exc)
    return out


# --------------------------------------------------------------------------------------------
# helpers


def _rules_naming(s: Session) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rule in s.scalars(select(Rule).order_by(Rule.position, Rule.id)):
        if rule.pipeline:
            out.setdefault(rule.pipeline, []).append(rule.name)
    return out


def _active_jobs(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(Job.pipeline, func.count(Job.id))
        .where(Job.status.in_(ACTIVE))
        .group_by(Job.pipeline)
    ).all()
    return {str(p): int(n) for p, n in rows}


def _out(
    p: Pipeline,
    served: dict[str, list[dict[str, Any]]],
    rules: dict[str, list[str]],
    active: dict[str, int],
) -> PipelineOut:
    info = read_bundle(p.bundle)
    workers = [
        ServingWorker(
            name=w["name"],
            lane=w["lane"],
            last_seen_at=w["last_seen_at"],
            bundle=WorkerBundle.model_validate(w["bundle"])
            if isinstance(w.get("bundle"), dict)
            else None,
        )
        for w in served.get(p.name, [])
    ]
    reported = next((w.bundle for w in workers if w.bundle is not None), None)
    error = info.get("error")
    if info["visible"]:
        name, version = info.get("name"), info.get("version")
        checksum, is_demo = info.get("checksum"), info.get("is_demo")
        verified: bool | None = bool(info.get("verified"))
        differs = sorted(
            w.name for w in workers if w.bundle and w.bundle.checksum not in (None, checksum)
        )
        if differs and not error:
            error = f"workers {', '.join(differs)} loaded a different bundle (checksum)"
    elif reported is not None:
        name, version = reported.name, reported.version
        checksum, is_demo = reported.checksum, reported.is_demo
        verified = True  # a worker loads a bundle only after verifying every file
    else:
        name = version = checksum = None
        is_demo = verified = None
    return PipelineOut(
        name=p.name,
        bundle=p.bundle,
        description=p.description,
        enabled=p.enabled,
        updated_at=p.updated_at,
        bundle_name=name,
        version=version,
        checksum=checksum,
        checksum_verified=verified,
        is_demo=is_demo,
        bundle_visible=bool(info["visible"]),
        bundle_error=error,
        served=bool(workers),
        workers=workers,
        used_by_rules=rules.get(p.name, []),
        active_jobs=active.get(p.name, 0),
    )


def _snapshot(p: Pipeline) -> dict[str, Any]:
    return {
        "name": p.name,
        "bundle": p.bundle,
        "description": p.description,
        "enabled": p.enabled,
    }


def _find(s: Session, name: str) -> Pipeline | None:
    return s.scalar(select(Pipeline).where(Pipeline.name == name))


def _one_out(s: Session, p: Pipeline) -> PipelineOut:
    return _out(p, served_pipelines(s, ALIVE_WITHIN_S), _rules_naming(s), _active_jobs(s))


# --------------------------------------------------------------------------------------------
# routes


@router.get("/api/pipelines", response_model=list[PipelineOut], responses=AUTH)
def list_pipelines(s: DbSession, _who: Viewer) -> list[PipelineOut]:
    served = served_pipelines(s, ALIVE_WITHIN_S)
    rules, active = _rules_naming(s), _active_jobs(s)
    return [
        _out(p, served, rules, active) for p in s.scalars(select(Pipeline).order_by(Pipeline.name))
    ]


@router.get("/api/pipelines/{name}", response_model=PipelineOut, responses={**AUTH, **NOT_FOUND})
def get_pipeline(name: NameInPath, s: DbSession, _who: Viewer) -> PipelineOut:
    p = _find(s, name)
    if p is None:
        raise HTTPException(status_code=404, detail="unknown pipeline")
    return _one_out(s, p)


@router.post(
    "/api/pipelines",
    status_code=201,
    response_model=PipelineOut,
    responses={**BAD_BODY, **AUTH, 409: {"description": "the name exists"}},
)
def create_pipeline(body: PipelineIn, s: DbSession, who: Admin) -> PipelineOut:
    if not NAME_RE.match(body.name):
        raise unprocessable(
            "name", "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if not body.bundle.strip():
        raise unprocessable("bundle", "the bundle folder is required")
    _check_text("bundle", body.bundle)
    _check_text("description", body.description, multiline=True)
    if _find(s, body.name) is not None:
        raise HTTPException(status_code=409, detail=f"pipeline {body.name!r} exists")
    p = Pipeline(
        name=body.name,
        bundle=body.bundle.strip(),
        description=body.description,
        enabled=body.enabled,
        updated_at=utcnow(),
    )
    s.add(p)
    s.flush()
    record_audit(
        s, who.name, "pipeline.create", target_type="pipeline", target=p.name, after=_snapshot(p)
    )
    return _one_out(s, p)


@router.put(
    "/api/pipelines/{name}",
    response_model=PipelineOut,
    responses={**BAD_BODY, **AUTH, **NOT_FOUND},
)
def update_pipeline(
    name: NameInPath, body: PipelineUpdate, s: DbSession, who: Admin
) -> PipelineOut:
    p = _find(s, name)
    if p is None:
        raise HTTPException(status_code=404, detail="unknown pipeline")
    if body.name is not None and body.name != name:
        raise unprocessable("name", "renaming is not supported: create a new pipeline")
    _check_text("bundle", body.bundle)
    _check_text("description", body.description, multiline=True)
    before = _snapshot(p)
    if body.bundle is not None:
        if not body.bundle.strip():
            raise unprocessable("bundle", "the bundle folder is required")
        p.bundle = body.bundle.strip()
    if "description" in body.model_fields_set:
        p.description = body.description
    if body.enabled is not None:
        p.enabled = body.enabled
    after = _snapshot(p)
    if after != before:
        p.updated_at = utcnow()
        record_audit(
            s,
            who.name,
            "pipeline.update",
            target_type="pipeline",
            target=name,
            before=before,
            after=after,
        )
    return _one_out(s, p)


@router.delete(
    "/api/pipelines/{name}",
    status_code=204,
    response_class=Response,
    responses={
        **AUTH,
        **NOT_FOUND,
        409: {"description": "a rule names it, jobs of it are queued, or it is the default"},
    },
)
def delete_pipeline(name: NameInPath, request: Request, s: DbSession, who: Admin) -> Response:
    p = _find(s, name)
    if p is None:
        raise HTTPException(status_code=404, detail="unknown pipeline")
    rules = _rules_naming(s).get(name)
    if rules:
        raise HTTPException(
            status_code=409, detail=f"named by rules {', '.join(rules)}: change them first"
        )
    active = _active_jobs(s).get(name, 0)
    if active:
        raise HTTPException(
            status_code=409, detail=f"{active} jobs of this pipeline are pending, queued or running"
        )
    if name == get_state(request).settings.default_pipeline:
        raise HTTPException(
            status_code=409,
            detail="the default pipeline (PACS_AGENT_DEFAULT_PIPELINE) takes studies no rule "
            "takes: change that setting first",
        )
    record_audit(
        s, who.name, "pipeline.delete", target_type="pipeline", target=name, before=_snapshot(p)
    )
    s.delete(p)
    return Response(status_code=204)
