"""``GET /api/studies/{uid}/similar``: the earlier studies whose images are nearest to this
study's images (cosine distance of the encoder's CLS embeddings, pacs_agent.retrieval), with
their findings. Only embeddings of the same bundle are compared."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import AUTH_RESPONSES, DbSession, Viewer, get_state
from pacs_agent.api.routes.studies import UidInPath, findings_present
from pacs_agent.db.models import Embedding, Job, Result, Study
from pacs_agent.retrieval import (
    IndexService,
    IndexUnavailable,
    SimilarityIndex,
    decode_vector,
)

router = APIRouter(tags=["studies"])

DEMO_NOTE = (
    "DEMO bundle (random weights): these neighbours reflect image statistics (exposure, size, "
    "collimation), not findings"
)
NO_EMBEDDING_NOTE = "no embedding for this study yet (not analysed, or analysed before 0005)"


class SimilarImage(BaseModel):
    sop_instance_uid: str = Field(description="the similar earlier image")
    query_sop_instance_uid: str = Field(description="the image of this study it is similar to")
    distance: float = Field(description="cosine distance, 1 - cos: 0 is identical")


class SimilarStudy(BaseModel):
    study_instance_uid: str
    distance: float = Field(description="the smallest cosine distance of its images")
    status: str
    triage: str | None = Field(description="triage of the job that analysed the similar image")
    findings: list[str] = Field(description="labels found present by that job (SR results)")
    images: list[SimilarImage]


class SimilarOut(BaseModel):
    study_instance_uid: str
    k: int
    bundle_checksum: str | None = Field(description="the bundle whose embeddings are compared")
    demo: bool = Field(description="the bundle has random weights (DEMO)")
    note: str | None = None
    similar: list[SimilarStudy]


def get_index(request: Request) -> IndexService:
    """The agent's index, made on first use (one per app)."""
    app_state = request.app.state
    service: IndexService | None = getattr(app_state, "similar_index", None)
    if service is None:
        settings = get_state(request).settings
        snapshot = settings.retrieval_snapshot_dir or settings.resolved_data_dir / "retrieval"
        service = IndexService(
            get_state(request).db,
            snapshot,
            wait_s=settings.retrieval_wait_s,
            snapshot_every_s=settings.retrieval_snapshot_every_s,
        )
        app_state.similar_index = service
    return service


def similar_studies(
    s: Session, index: SimilarityIndex, study: Study, k: int, *, per_image: int | None = None
) -> dict[str, Any]:
    """The k earlier studies nearest to ``study``: for each of its embedded images (the bundle
    of its latest embedding), the nearest earlier images of other studies, grouped by study,
    nearest first."""
    own = list(
        s.scalars(select(Embedding).where(Embedding.study_id == study.id).order_by(Embedding.id))
    )
    out: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "k": k,
        "bundle_checksum": None,
        "demo": False,
        "note": None,
        "similar": [],
    }
    if not own:
        out["note"] = NO_EMBEDDING_NOTE
        return out
    checksum = own[-1].bundle_checksum
    queries = [e for e in own if e.bundle_checksum == checksum]
    out["bundle_checksum"] = checksum
    out["demo"] = any(e.is_demo for e in queries)
    own_ids = {e.id for e in own}
    per_image = per_image or 4 * k
    best: dict[int, tuple[float, list[tuple[int, str, float]]]] = {}  # embedding id -> ...
    for q in queries:
        hits = index.search(
            checksum,
            decode_vector(q.vector, q.dim),
            per_image,
            accept=lambda i, q_id=q.id: i < q_id and i not in own_ids,  # earlier, another study
        )
        for h in hits:
            d, pairs = best.get(h.embedding_id, (h.distance, []))
            pairs.append((h.embedding_id, q.sop_instance_uid, h.distance))
            best[h.embedding_id] = (min(d, h.distance), pairs)
    if not best:
        if out["demo"]:
            out["note"] = DEMO_NOTE
        return out
    rows = s.execute(
        select(Embedding.id, Embedding.sop_instance_uid, Embedding.job_id, Study)
        .join(Study, Study.id == Embedding.study_id)
        .where(Embedding.id.in_(list(best)), Embedding.bundle_checksum == checksum)
    ).all()
    by_study: dict[int, dict[str, Any]] = {}
    for emb_id, sop, job_id, st in rows:  # rows removed since (retention) drop out here
        entry = by_study.setdefault(
            st.id, {"study": st, "distance": float("inf"), "images": [], "jobs": set()}
        )
        for _, query_sop, dist in best[emb_id][1]:
            entry["images"].append(
                {"sop_instance_uid": sop, "query_sop_instance_uid": query_sop, "distance": dist}
            )
            entry["distance"] = min(entry["distance"], dist)
        if job_id is not None:
            entry["jobs"].add(job_id)
    ranked = sorted(by_study.values(), key=lambda e: (e["distance"], e["study"].id))[:k]
    job_ids = {j for e in ranked for j in e["jobs"]}
    jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))} if job_ids else {}
    results: dict[int, list[Result]] = {}
    if job_ids:
        for r in s.scalars(select(Result).where(Result.job_id.in_(job_ids))):
            results.setdefault(r.job_id, []).append(r)
    for e in ranked:
        st = e["study"]
        triages = [jobs[j].triage for j in e["jobs"] if j in jobs and jobs[j].triage]
        out["similar"].append(
            {
                "study_instance_uid": st.study_instance_uid,
                "distance": round(e["distance"], 6),
                "status": st.status,
                "triage": triages[0] if triages else None,
                "findings": findings_present([r for j in e["jobs"] for r in results.get(j, [])]),
                "images": sorted(e["images"], key=lambda i: i["distance"]),
            }
        )
    if out["demo"]:
        out["note"] = DEMO_NOTE
    return out


@router.get(
    "/api/studies/{study_uid}/similar",
    response_model=SimilarOut,
    responses={
        **AUTH_RESPONSES,
        404: {"description": "unknown study"},
        503: {"description": "the similarity index is still loading: retry later"},
    },
)
def get_similar(
    study_uid: UidInPath,
    request: Request,
    s: DbSession,
    _who: Viewer,
    k: Annotated[int, Query(ge=1, le=100, description="how many similar studies")] = 10,
) -> dict[str, Any]:
    """The k earlier studies most similar to this one (same bundle only), nearest first, with
    their findings and cosine distances. With a DEMO bundle ``note`` says the neighbours
    reflect image statistics, not findings."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise HTTPException(status_code=404, detail="unknown study")
    try:
        index = get_index(request).current()
    except IndexUnavailable as exc:
        raise HTTPException(
            status_code=503, detail=str(exc), headers={"Retry-After": "30"}
        ) from None
    return similar_studies(s, index, study, k)


def similar_for_page(request: Request, s: Session, study_uid: str, k: int = 5) -> dict[str, Any]:
    """What the console's study page shows: the similar studies, or why there are none yet
    (``unavailable``: the index is loading)."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return {"similar": [], "note": None, "unavailable": None}
    try:
        index = get_index(request).current(wait_s=2.0)
    except IndexUnavailable as exc:
        return {"similar": [], "note": None, "unavailable": str(exc)}
    out = similar_studies(s, index, study, k)
    out["unavailable"] = None
    return out
