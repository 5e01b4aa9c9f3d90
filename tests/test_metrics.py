"""Prometheus metrics (issue 10, "Observable"): the agent's ``GET /metrics`` is closed like every
route (any role's token or the metrics token), counts what the doors store and reads the queue
depth from the jobs table at scrape time; a worker serves its own registry on its metrics port;
label values stay in bounded sets; the Grafana dashboard only queries metrics that exist.

The end-to-end counts from real agent and worker processes are checked in
tests/test_no_phi_logs.py (same run that greps every metric for patient data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pacs_agent import metrics, users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Job, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import REPO, free_port, sample_path

METRICS_TOKEN = "metrics-token-of-the-metrics-test-0123"
DASHBOARD = REPO / "docs" / "grafana" / "pacs-agent.json"


@pytest.fixture
def agent(tmp_path: Path, database_url: str) -> Iterator[tuple[TestClient, AgentState, str]]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        metrics_token=METRICS_TOKEN,
        min_free_disk_mb=1,
    )
    db = Database(database_url)
    with db.session() as s:
        users.create_user(s, "viewer-1", "viewer", None, actor="test")
        token = users.issue_token(s, "viewer-1", actor="test").token
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    with TestClient(create_app(state)) as client:
        yield client, state, token
    db.dispose()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_are_closed_without_a_credential(
    agent: tuple[TestClient, AgentState, str],
) -> None:
    client, _, viewer = agent
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
    basic = {"authorization": f"Basic {METRICS_TOKEN}"}
    assert client.get("/metrics", headers=basic).status_code == 401
    for token in (METRICS_TOKEN, viewer):
        r = client.get("/metrics", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        assert "pacs_agent_instances_received_total" in r.text
    # The metrics token opens /metrics only, nothing else.
    r = client.get("/api/studies", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 401


def test_ingest_counts_per_door_and_queue_depth_comes_from_the_jobs_table(
    agent: tuple[TestClient, AgentState, str],
) -> None:
    client, state, _ = agent
    before_n = REGISTRY.get_sample_value("pacs_agent_instances_received_total", {"door": "stow"})
    before_b = REGISTRY.get_sample_value("pacs_agent_received_bytes_total", {"door": "stow"})
    data = sample_path("CT_small.dcm").read_bytes()
    ds = parse_part10(data)
    Ingestor(state.db, state.store).ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="stow")
    after_n = REGISTRY.get_sample_value("pacs_agent_instances_received_total", {"door": "stow"})
    after_b = REGISTRY.get_sample_value("pacs_agent_received_bytes_total", {"door": "stow"})
    assert after_n == (before_n or 0) + 1
    assert after_b == (before_b or 0) + len(data)

    with state.db.session() as s:
        study_id = s.query(Study.id).scalar()
        for version, (cls, number, status) in enumerate(
            [("stat", 0, "queued"), ("routine", 6, "pending"), ("routine", 6, "pending")]
        ):
            s.add(
                Job(
                    study_id=study_id,
                    study_version=version + 1,
                    pipeline="chest",
                    priority=number,
                    priority_class=cls,
                    status=status,
                )
            )
        s.add(Job(study_id=study_id, study_version=9, pipeline="chest", status="done"))
    auth = {"authorization": f"Bearer {METRICS_TOKEN}"}
    samples = _samples(client.get("/metrics", headers=auth).text)
    depth = {
        dict(labels)["queue"]
        + "/"
        + dict(labels)["priority_class"]
        + "/"
        + dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "pacs_agent_queue_depth"
    }
    assert depth == {
        "pipeline.chest.urgent/stat/queued": 1.0,
        "pipeline.chest/routine/pending": 2.0,
    }


def test_label_values_are_bounded_and_never_a_url_or_uid() -> None:
    """Destinations and channels are labelled by their scheme only; unknown values are 'other'."""
    metrics.delivery("dicom+tls://PACS@pacs.example:2762", "done")
    metrics.delivery("orthanc+http://user:secret@10.0.0.5:8042", "retry")
    metrics.delivery("gopher://1.2.840.113619.2.1/DOE^JOHN", "weird outcome")
    metrics.notification("webhook+https://ward.example/hook?patient=DOE", "sent")
    metrics.refused("dimse", 0xC210)
    metrics.refused("fax", 0x1234)
    metrics.failure("Invalid value for VR DA: '19400305x'")
    metrics.job_finished("done")
    text = metrics.render().decode()
    for leaked in ("example", "secret", "10.0.0.5", "1.2.840", "DOE", "19400305", "Invalid"):
        assert leaked not in text, leaked
    samples = _samples(text)
    labels_seen = {
        (name, key, value)
        for (name, labels), _ in samples.items()
        if name.startswith("pacs_agent_")
        for key, value in labels
    }
    assert ("pacs_agent_deliveries_total", "kind", "dicom") in labels_seen
    assert ("pacs_agent_deliveries_total", "kind", "orthanc") in labels_seen
    assert ("pacs_agent_deliveries_total", "kind", "other") in labels_seen
    assert ("pacs_agent_notifications_total", "kind", "webhook") in labels_seen
    assert ("pacs_agent_refusals_total", "category", "cannot_understand") in labels_seen
    assert ("pacs_agent_refusals_total", "door", "other") in labels_seen
    assert ("pacs_agent_failures_total", "category", "other") in labels_seen
    allowed = (
        set(metrics.DOORS)
        | set(metrics.STAGES)
        | set(metrics.DELIVERY_OUTCOMES)
        | set(metrics.NOTIFY_OUTCOMES)
        | set(metrics.DESTINATION_KINDS)
        | set(metrics.CHANNEL_KINDS)
        | set(metrics.REFUSAL_CATEGORIES.values())
        | set(metrics.FAILURE_CATEGORIES)
        | set(metrics.JOB_OUTCOMES)
        | {"process", "skip", metrics.OTHER}
    )
    from pacs_agent.fairness import DIMENSIONS

    for name, key, value in labels_seen:
        if key == "le":
            continue
        if name == "pacs_agent_fairness_flags" and key == "finding":
            # a label of the bundle's vocabulary (bounded by the bundle), never a UID or URL
            assert not any(c in value for c in "/:@") and not value[:1].isdigit(), value
            continue
        if name == "pacs_agent_fairness_flags" and key == "dimension":
            assert value in DIMENSIONS, value
            continue
        assert value in allowed, (name, key, value)


def test_a_worker_serves_its_metrics_on_its_port() -> None:
    from workers.celery_app import start_metrics_server

    port = free_port()
    assert not start_metrics_server(Settings(worker_metrics_port=0))  # 0: not served
    s = Settings(worker_metrics_port=port)
    metrics.stage_seconds("encoder", 0.25)
    assert start_metrics_server(s)
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200
    count = _samples(r.text)[("pacs_agent_job_stage_seconds_count", (("stage", "encoder"),))]
    assert count >= 1
    # A second worker on the same host: the port is taken; logged, not fatal.
    assert not start_metrics_server(s)


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(dashboard["panels"]) >= 8 and all(p.get("targets") for p in dashboard["panels"])
    used = {m for e in exprs for m in re.findall(r"\bpacs_agent_[a-z0-9_]+", e)}
    known = metrics.metric_names()
    assert used - known == set(), f"the dashboard queries unknown metrics: {used - known}"
    # Every metric the module defines is on the dashboard in some form.
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    families |= {n.removesuffix("_sum").removesuffix("_count") for n in used}
    for name in (
        "pacs_agent_instances_received",
        "pacs_agent_received_bytes",
        "pacs_agent_refusals",
        "pacs_agent_study_completion_seconds",
        "pacs_agent_queue_depth",
        "pacs_agent_job_stage_seconds",
        "pacs_agent_deliveries",
        "pacs_agent_notifications",
        "pacs_agent_failures",
    ):
        assert name in families, name
    # Names that exist in a live registry, not only in metric_names().
    live = {s.name for f in REGISTRY.collect() for s in f.samples}
    assert {u for u in used if u != metrics.QUEUE_DEPTH} <= live | known
