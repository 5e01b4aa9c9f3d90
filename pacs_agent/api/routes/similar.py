"""``GET /api/studies/{uid}/similar``: the earlier studies whose images are nearest to this
study's images (cosine distance of the encoder's CLS embeddings, pacs_agent.retrieval), with
their findings. Only embeddings of the same bundle are compared.

``POST /api/similar/priors`` (service role: the workers' token): the same index asked by a worker
that is about to write a study's SR (setting ``PACS_AGENT_SR_SIMILAR_PRIORS``). The worker sends
its images' vectors, since their ``embeddings`` rows are written only with the job's results,
after the SR; the agent answers the nearest earlier images of other studies with what an SR
reference needs (SOP Class, series and study UIDs). Workers hold no index of their own."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    DbSession,
    Service,
    Viewer,
    get_state,
)
from pacs_agent.api.routes.studies import UidInPath, findings_present
from pacs_agent.db.models import Embedding, Instance, Job, Result, Series, Study
from pacs_agent.retrieval import (
    IndexService,
    IndexUnavailable,
    SimilarityIndex,
    decode_vector,
    encode_vector,
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


# --------------------------------------------------------------------------------------------
# for workers: the similar prior images an SR references


Uid = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]


class PriorQuery(BaseModel):
    sop_instance_uid: Uid = Field(description="an image of the study the SR is written for")
    vector: list[float] = Field(
        min_length=1, max_length=8192, description="its CLS embedding (any norm)"
    )


class PriorsIn(BaseModel):
    study_instance_uid: Uid = Field(description="the study the SR is written for")
    bundle_checksum: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="the bundle that made the vectors"
    )
    k: int = Field(ge=1, le=100, description="how many prior images at most")
    images: list[PriorQuery] = Field(min_length=1, max_length=256)


class PriorImage(BaseModel):
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    distance: float = Field(description="cosine distance, 1 - cos: 0 is identical")
    query_sop_instance_uid: str = Field(description="the image of the study it is nearest to")


class PriorsOut(BaseModel):
    study_instance_uid: str
    bundle_checksum: str
    priors: list[PriorImage] = Field(description="nearest first, at most k")


def similar_priors(
    s: Session,
    index: SimilarityIndex,
    study: Study,
    checksum: str,
    queries: list[tuple[str, list[float]]],
    k: int,
) -> list[dict[str, Any]]:
    """The k images nearest to any of ``queries`` (SOP Instance UID, vector) among the
    embeddings of bundle ``checksum`` of other studies, each with its smallest distance and the
    query image it is nearest to. "Prior": embedded before this study's first embedding of the
    bundle when it has one (a re-run of the job then references the same images), else any
    embedded so far. Images whose instance row is gone are left out (no SOP Class to name).
    Raises ValueError for a vector that is zero, not finite, or of another length than the
    bundle's."""
    own = dict(
        s.execute(
            select(Embedding.id, Embedding.bundle_checksum).where(Embedding.study_id == study.id)
        ).all()
    )
    first_own = min((i for i, c in own.items() if c == checksum), default=None)

    def accept(embedding_id: int) -> bool:
        return embedding_id not in own and (first_own is None or embedding_id < first_own)

    best: dict[int, tuple[float, str]] = {}  # embedding id -> (distance, query SOP)
    for sop, vector in queries:
        unit = decode_vector(encode_vector(vector), len(vector))
        # twice k: some may have lost their instance row since
        for hit in index.search(checksum, unit, 2 * k, accept=accept):
            d = min(2.0, max(0.0, float(hit.distance)))  # half-precision rounding near 0 and 2
            if hit.embedding_id not in best or d < best[hit.embedding_id][0]:
                best[hit.embedding_id] = (d, sop)
    if not best:
        return []
    rows = s.execute(
        select(
            Embedding.id,
            Embedding.sop_instance_uid,
            Instance.sop_class_uid,
            Series.series_instance_uid,
            Study.study_instance_uid,
        )
        .join(Instance, Instance.sop_instance_uid == Embedding.sop_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Embedding.study_id)
        .where(Embedding.id.in_(list(best)), Embedding.bundle_checksum == checksum)
    ).all()
    priors = [
        {
            "sop_instance_uid": sop,
            "sop_class_uid": sop_class,
            "series_instance_uid": series,
            "study_instance_uid": study_uid,
            "distance": round(best[emb_id][0], 6),
            "query_sop_instance_uid": best[emb_id][1],
        }
        for emb_id, sop, sop_class, series, study_uid in rows
        if study_uid != study.study_instance_uid
    ]
    return sorted(priors, key=lambda p: (p["distance"], p["sop_instance_uid"]))[:k]


@router.post(
    "/api/similar/priors",
    response_model=PriorsOut,
    responses={
        **AUTH_RESPONSES,
        **BODY_RESPONSES,
        404: {"description": "unknown study"},
        422: {"description": "a vector that is zero, not finite or of the wrong length"},
        503: {"description": "the similarity index is still loading: write the SR without"},
    },
)
def post_similar_priors(
    body: PriorsIn, request: Request, s: DbSession, _who: Service
) -> dict[str, Any]:
    """For a worker about to write a study's SR: the k earlier images of other studies nearest
    to the study's image vectors (same bundle only), nearest first, with their SOP Class,
    series and study UIDs. Answers 503 rather than wait longer than the index's usual wait
    (``PACS_AGENT_RETRIEVAL_WAIT_S``): the worker then writes the SR without them."""
    study = s.scalar(select(Study).where(Study.study_instance_uid == body.study_instance_uid))
    if study is None:
        raise HTTPException(status_code=404, detail="unknown study")
    try:
        index = get_index(request).current()
    except IndexUnavailable as exc:
        raise HTTPException(
            status_code=503, detail=str(exc), headers={"Retry-After": "30"}
        ) from None
    try:
        priors = similar_priors(
            s,
            index,
            study,
            body.bundle_checksum,
            [(q.sop_instance_uid, q.vector) for q in body.images],
            body.k,
        )
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return {
        "study_instance_uid": study.study_instance_uid,
        "bundle_checksum": body.bundle_checksum,
        "priors": priors,
    }
