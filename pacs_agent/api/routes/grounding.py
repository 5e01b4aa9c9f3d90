"""``POST /api/grounding``: where a phrase is on a study's images (visual grounding, XR-0).

The agent never imports torch, so it answers from what the worker persisted: the SR result's
``summary`` holds, for every image and every label (positive or not), the label's region
(``workers.localize``: a box in source pixel-edge coordinates, its basis and the map's value at
the peak) and the bundle's vocabulary (label names and the manifest's ``synonyms``, lower case).
A phrase matches case-insensitively (spaces collapsed); the answer is the label's region on the
image where its map peaks highest, plus its region on every image.

``POST`` (the issue's interface) needs an operator, as every unsafe method does here; ``GET
/api/grounding?study=...&phrase=...`` answers the same to a viewer (a pure read).

Errors: an unknown study 404; a study without localized results (not analysed yet, failed,
skipped, or analysed before localization existed) 409 with the reason; a phrase outside the
vocabulary 422 with the vocabulary listed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Operator, Viewer
from pacs_agent.db.models import Job, Result, Study

router = APIRouter(tags=["grounding"])


class GroundingIn(BaseModel):
    study: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[0-9]+(\.[0-9]+)*$",
        description="Study Instance UID",
    )
    phrase: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f]+$",
        description="a label name or synonym of the bundle's vocabulary (any case)",
    )
    pipeline: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[^\x00-\x1f]+$",
        description="only this pipeline's results (default: the latest that knows the phrase)",
    )


class RegionOut(BaseModel):
    source_sop_instance_uid: str
    label: str
    probability: float
    present: bool
    basis: str = Field(description="cam (class-activation map) or segment (matching class mask)")
    box: list[float] = Field(
        description="left, top, right, bottom in source pixel-edge coordinates (SCOORD image "
        "coordinates: (0, 0) is the top-left corner of the top-left pixel)"
    )
    polyline: list[list[float]] = Field(description="the box as a closed 5-point POLYLINE")
    point: list[float] | None = Field(description="the map's peak pixel (column, row)")
    peak: float = Field(description="the map's value at its peak (logit units)")


class GroundingOut(BaseModel):
    study: str
    phrase: str
    label: str = Field(description="the label the phrase names")
    pipeline: str
    job_id: int
    region: RegionOut = Field(description="the image where the phrase's map peaks highest")
    images: list[RegionOut] = Field(description="the label's region on every analysed image")


def normalise(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def _region(entry: dict[str, Any]) -> RegionOut | None:
    region = entry.get("region")
    if not isinstance(region, dict):
        return None
    left, top, right, bottom = (float(v) for v in region["box"])
    point = entry.get("point")
    return RegionOut(
        source_sop_instance_uid=str(entry["source"]),
        label=str(entry["label"]),
        probability=float(entry["probability"]),
        present=bool(entry["present"]),
        basis=str(region.get("basis", "cam")),
        box=[left, top, right, bottom],
        polyline=[[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
        point=[float(v) for v in point] if isinstance(point, list) else None,
        peak=float(region.get("peak", 0.0)),
    )


RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: {"description": "unknown study"},
    409: {"description": "the study has no localized results (the reason says why)"},
    422: {"description": "the phrase is not in the vocabulary (listed), or a bad request"},
}


@router.post("/api/grounding", response_model=GroundingOut, responses=RESPONSES)
def ground(body: GroundingIn, s: DbSession, _who: Operator) -> GroundingOut:
    """The region of a study's images where a phrase's map peaks (see the module notes)."""
    return answer(s, body)


@router.get("/api/grounding", response_model=GroundingOut, responses=RESPONSES)
def ground_get(query: Annotated[GroundingIn, Query()], s: DbSession, _who: Viewer) -> GroundingOut:
    """The same answer as ``POST /api/grounding``, for viewers."""
    return answer(s, query)


def answer(s: Session, body: GroundingIn) -> GroundingOut:
    """The grounding answer for ``body`` (see the module notes)."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == body.study))
    if study is None:
        raise HTTPException(status_code=404, detail="unknown study")
    stmt = (
        select(Result, Job)
        .join(Job, Result.job_id == Job.id)
        .where(Job.study_id == study.id, Result.kind == "sr")
        .order_by(Job.study_version.desc(), Result.id.desc())
    )
    if body.pipeline is not None:
        stmt = stmt.where(Job.pipeline == body.pipeline)
    localized: list[tuple[Result, Job, dict[str, str]]] = []
    for result, job in s.execute(stmt):
        summary = result.summary or {}
        vocabulary = summary.get("vocabulary")
        findings = summary.get("findings")
        if isinstance(vocabulary, dict) and isinstance(findings, list):
            if any(isinstance(f, dict) and f.get("region") for f in findings):
                localized.append((result, job, {str(k): str(v) for k, v in vocabulary.items()}))
    if not localized:
        where = f" of pipeline {body.pipeline}" if body.pipeline else ""
        raise HTTPException(
            status_code=409,
            detail=f"study {study.study_instance_uid} has no localized results{where} "
            f"(study status {study.status}"
            + (f": {study.reason}" if study.reason else "")
            + "); results are made when a job of the study is done, with a bundle that has "
            "a classifier",
        )
    phrase = normalise(body.phrase)
    for result, job, vocabulary in localized:  # the latest result that knows the phrase
        label = vocabulary.get(phrase)
        if label is None:
            continue
        regions = [
            r
            for entry in result.summary["findings"]
            if isinstance(entry, dict) and entry.get("label") == label
            for r in [_region(entry)]
            if r is not None
        ]
        if not regions:
            continue
        best = max(regions, key=lambda r: r.peak)
        return GroundingOut(
            study=study.study_instance_uid,
            phrase=body.phrase,
            label=label,
            pipeline=job.pipeline,
            job_id=job.id,
            region=best,
            images=regions,
        )
    known = sorted({p for _, _, vocabulary in localized for p in vocabulary})
    raise HTTPException(
        status_code=422,
        detail={
            "msg": f"phrase {body.phrase!r} is not in the vocabulary of this study's results "
            "(label names and their synonyms, any case)",
            "vocabulary": known,
        },
    )
