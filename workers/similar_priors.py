"""The similar prior images a study's SR references (setting ``PACS_AGENT_SR_SIMILAR_PRIORS``).

The index is the agent's (pacs_agent.retrieval); a worker holds none. Before it writes the SR,
the worker sends its images' CLS embeddings to ``POST /api/similar/priors`` (service token) and
gets back the nearest earlier images of other studies of the same bundle, with the UIDs an SR
reference needs. The embeddings cannot be looked up by the agent instead: their rows are
written with the job's results, after the SR is made.

Best effort by design: the SR is the job's result, the priors are an aid. An agent that is
unreachable, slow (one attempt, bounded by the index's own wait plus a margin), still loading
its index (503) or answering anything unexpected gives no priors, a warning with the reason
(UIDs only), and the SR is written without them; the job never fails for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import numpy as np

from pacs_agent.settings import Settings
from workers.dicom_out.sr import SimilarPrior, check_prior
from workers.results import ImageResult

log = logging.getLogger(__name__)

__all__ = ["PRIORS_PATH", "AgentClient", "fetch_similar_priors"]

PRIORS_PATH = "/api/similar/priors"
# Beyond the agent's own wait for its index (retrieval_wait_s): the request and the search.
MARGIN_S = 5.0


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


class AgentClient(Protocol):
    """What is used of the worker's HTTP client (an ``httpx.Client``; in tests, the app's own
    TestClient)."""

    def post(
        self, url: str, *, json: Any, headers: dict[str, str], timeout: float
    ) -> _Response: ...


def fetch_similar_priors(
    client: AgentClient,
    settings: Settings,
    study_uid: str,
    bundle_checksum: str,
    results: Sequence[ImageResult],
) -> list[SimilarPrior]:
    """Up to ``settings.sr_similar_priors`` similar prior images for the SR of ``study_uid``,
    nearest first; empty when the setting is 0, when no image has an embedding, or when the
    agent cannot answer (logged with the reason). ``client``: the worker's HTTP client to the
    agent (``workers.pipeline.agent_client``). Never raises."""
    try:
        return _fetch(client, settings, study_uid, bundle_checksum, results)
    except Exception as exc:  # an aid to the SR, never the reason a job fails
        log.warning(
            "study %s: SR written without similar priors: %s", study_uid, type(exc).__name__
        )
        return []


def _fetch(
    client: AgentClient,
    settings: Settings,
    study_uid: str,
    bundle_checksum: str,
    results: Sequence[ImageResult],
) -> list[SimilarPrior]:
    k = settings.sr_similar_priors
    if k <= 0:
        return []
    images = [
        {
            "sop_instance_uid": r.source_sop_instance_uid,
            "vector": np.asarray(r.extra["cls"], dtype=np.float32).reshape(-1).tolist(),
        }
        for r in results
        if r.extra.get("cls") is not None
    ]
    if not images:
        log.info("study %s: SR without similar priors: no image embedding", study_uid)
        return []
    url = settings.resolved_agent_url.rstrip("/") + PRIORS_PATH
    headers = {"authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    body = {
        "study_instance_uid": study_uid,
        "bundle_checksum": bundle_checksum,
        "k": k,
        "images": images,
    }
    t0 = time.monotonic()
    try:
        r = client.post(
            url, json=body, headers=headers, timeout=settings.retrieval_wait_s + MARGIN_S
        )
    except httpx.HTTPError as exc:
        return _without(study_uid, f"agent not reached ({type(exc).__name__})")
    if r.status_code != 200:
        return _without(study_uid, f"agent answered {r.status_code}")
    try:
        priors = _parse(r.json(), study_uid, {str(i["sop_instance_uid"]) for i in images}, k)
    except (ValueError, KeyError, TypeError) as exc:
        return _without(study_uid, f"unexpected answer ({type(exc).__name__})")
    log.info(
        "study %s: %d similar prior image(s) for the SR in %.2f s",
        study_uid,
        len(priors),
        time.monotonic() - t0,
    )
    return priors


def _without(study_uid: str, reason: str) -> list[SimilarPrior]:
    log.warning("study %s: SR written without similar priors: %s", study_uid, reason)
    return []


def _parse(answer: Any, study_uid: str, queries: set[str], k: int) -> list[SimilarPrior]:
    """The answer's priors, each checked as the SR writer will (``check_prior``); one that
    fails is left out with a warning rather than let the SR fail."""
    priors: list[SimilarPrior] = []
    for item in answer["priors"]:
        prior = SimilarPrior(
            sop_instance_uid=str(item["sop_instance_uid"]),
            sop_class_uid=str(item["sop_class_uid"]),
            series_instance_uid=str(item["series_instance_uid"]),
            study_instance_uid=str(item["study_instance_uid"]),
            distance=float(item["distance"]),
            query_sop_instance_uid=str(item["query_sop_instance_uid"]),
        )
        try:
            check_prior(prior, study_uid, queries)
        except ValueError as exc:
            log.warning("study %s: a similar prior left out: %s", study_uid, exc)
            continue
        if all(p.sop_instance_uid != prior.sop_instance_uid for p in priors):
            priors.append(prior)
    return sorted(priors, key=lambda p: (p.distance, p.sop_instance_uid))[:k]
