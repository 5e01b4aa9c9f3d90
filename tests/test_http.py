"""The agent's HTTP side: health, the signed Orthanc webhook, and the admin/worker API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from pacs_agent import users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Job, PullRequestRow, PullStatus, Result, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.conftest import sample_path

SECRET = "test-secret-for-webhook"
SERVICE_TOKEN = "service-token-for-the-http-tests"
SERVICE = {"authorization": f"Bearer {SERVICE_TOKEN}"}


class RecordingPuller:
    """Stands in for the agent's pull loop (which pulls from a real Orthanc in
    test_pull_durability.py and test_e2e.py): counts the wake-ups the routes give it. What the
    webhook accepted is read from the database, the queue of record."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def _pulls(state: AgentState) -> list[PullRequestRow]:
    with state.db.session() as s:
        return list(s.scalars(select(PullRequestRow).order_by(PullRequestRow.id)))


@pytest.fixture
def client(
    tmp_path: Path, database_url: str
) -> Iterator[tuple[TestClient, AgentState, RecordingPuller]]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        webhook_secret=SECRET,
        min_free_disk_mb=1,
        api_token=SERVICE_TOKEN,
    )
    db = Database(database_url)
    puller = RecordingPuller()
    state = AgentState(
        settings=settings,
        db=db,
        store=InstanceStore(settings.instance_dir),
        puller=puller,  # type: ignore[arg-type]
    )
    with TestClient(create_app(state)) as c:
        yield c, state, puller
    db.dispose()


def _signed(body: object, ts: int | None = None, secret: str = SECRET) -> tuple[bytes, dict]:
    raw = json.dumps(body).encode()
    ts = int(time.time()) if ts is None else ts
    return raw, {
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, raw),
        "content-type": "application/json",
    }


def test_health(client: tuple) -> None:
    c, _, _ = client
    r = c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_webhook_accepts_signed_call(client: tuple) -> None:
    c, state, puller = client
    raw, headers = _signed(
        {"event": "StableStudy", "orthanc_study_id": "abc-123", "study_instance_uid": "1.2.3"}
    )
    r = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert r.status_code == 202, r.text
    # Persisted before the 202, in the same request: the answer names the row.
    [row] = _pulls(state)
    assert r.json() == {
        "accepted": True,
        "orthanc_study_id": "abc-123",
        "pull_id": row.id,
        "coalesced": False,
    }
    assert (row.orthanc_study_id, row.study_instance_uid) == ("abc-123", "1.2.3")
    assert row.status == PullStatus.PENDING.value and row.attempts == 0
    assert puller.wakes == 1


def test_webhook_coalesces_while_pending(client: tuple) -> None:
    c, state, _ = client
    first = c.post(
        "/webhook/orthanc", content=(b := _signed({"orthanc_study_id": "st-1"}))[0], headers=b[1]
    )
    raw, headers = _signed(
        {"orthanc_study_id": "st-1", "study_instance_uid": "1.2.9"}, ts=int(time.time()) - 1
    )  # another call: another signature
    second = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["coalesced"] is True
    assert second.json()["pull_id"] == first.json()["pull_id"]
    [row] = _pulls(state)
    assert row.study_instance_uid == "1.2.9"  # learnt from the second call
    # Once that pull runs, a new stable event means new instances: a new pending row.
    with state.db.session() as s:
        s.get_one(PullRequestRow, row.id).status = PullStatus.RUNNING.value
    raw, headers = _signed({"orthanc_study_id": "st-1"}, ts=int(time.time()) - 2)
    third = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert third.status_code == 202 and third.json()["coalesced"] is False
    assert [p.status for p in _pulls(state)] == ["running", "pending"]


def test_webhook_answers_503_when_it_cannot_persist(client: tuple, tmp_path: Path) -> None:
    """A database outage (here: the agent's database URL points at a closed port): 503, so the
    plugin keeps the notification and retries; nothing is acknowledged that was not stored."""
    from tests.conftest import free_port

    c, state, puller = client
    real = state.db
    state.db = Database(f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none")
    try:
        raw, headers = _signed({"orthanc_study_id": "down-1"})
        r = c.post("/webhook/orthanc", content=raw, headers=headers)
        assert r.status_code == 503, r.text
        assert "could not be persisted" in r.json()["detail"]
        assert puller.wakes == 0
    finally:
        state.db.dispose()
        state.db = real
    assert _pulls(state) == []
    # The service keeps serving: the plugin's retry (a fresh signature) is accepted.
    raw, headers = _signed({"orthanc_study_id": "down-1"}, ts=int(time.time()) - 1)
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 202
    assert [p.orthanc_study_id for p in _pulls(state)] == ["down-1"]


@pytest.mark.parametrize(
    "body",
    [
        {"orthanc_study_id": ""},
        {"orthanc_study_id": "x" * 65},
        {"orthanc_study_id": "a/../b"},
        {"orthanc_study_id": "ok-id", "study_instance_uid": "not a uid"},
        ["orthanc_study_id"],
    ],
)
def test_webhook_refuses_bad_ids(client: tuple, body: object) -> None:
    c, state, _ = client
    raw, headers = _signed(body)  # type: ignore[arg-type]
    r = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert r.status_code == 400, r.text
    assert _pulls(state) == []


@pytest.mark.parametrize("case", ["unsigned", "wrong-secret", "tampered", "stale", "garbage-ts"])
def test_webhook_refuses_bad_signatures(client: tuple, case: str) -> None:
    c, state, puller = client
    raw, headers = _signed({"orthanc_study_id": "x"})
    if case == "unsigned":
        headers = {"content-type": "application/json"}
    elif case == "wrong-secret":
        raw, headers = _signed({"orthanc_study_id": "x"}, secret="not-the-secret")
    elif case == "tampered":
        raw = raw.replace(b'"x"', b'"y"')
    elif case == "stale":
        raw, headers = _signed({"orthanc_study_id": "x"}, ts=int(time.time()) - 3600)
    elif case == "garbage-ts":
        headers[TIMESTAMP_HEADER] = "yesterday"
    r = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert r.status_code == 401
    assert _pulls(state) == [] and puller.wakes == 0


def test_webhook_refuses_replay(client: tuple) -> None:
    c, state, puller = client
    raw, headers = _signed({"orthanc_study_id": "same"})
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 202
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 401
    assert len(_pulls(state)) == 1 and puller.wakes == 1


def test_webhook_signed_but_malformed_body(client: tuple) -> None:
    c, state, _ = client
    raw, headers = _signed({"no_id": True})
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 400
    assert _pulls(state) == []


def test_instance_download_and_study_api(client: tuple) -> None:
    c, state, _ = client
    data = sample_path("RG3_J2KR.dcm").read_bytes()
    ds = parse_part10(data)
    Ingestor(state.db, state.store).ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="stow")
    r = c.get(f"/api/instances/{ds.SOPInstanceUID}", headers=SERVICE)
    assert r.status_code == 200 and r.content == data
    assert c.get("/api/instances/1.2.3.4", headers=SERVICE).status_code == 404
    st = c.get(f"/api/studies/{ds.StudyInstanceUID}", headers=SERVICE).json()
    assert st["status"] == "receiving" and st["instances"] == 1
    assert st["events"][0]["kind"] == "study.receiving"
    # No patient data in the admin view.
    assert str(ds.PatientName) not in json.dumps(st)


def test_api_is_closed_by_default(client: tuple) -> None:
    c, state, _ = client
    assert c.get("/api/studies").status_code == 401
    assert c.get("/api/studies", headers={"authorization": "Bearer tok"}).status_code == 401
    assert c.get("/api/studies", headers=SERVICE).status_code == 200
    # Without a configured service token, no bearer token is the service token.
    state.settings = state.settings.model_copy(update={"api_token": None})
    assert c.get("/api/studies", headers=SERVICE).status_code == 401
    assert c.get("/health").status_code == 200  # open


def test_production_refuses_default_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("PACS_AGENT_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings()
    monkeypatch.setenv("PACS_AGENT_WEBHOOK_SECRET", "a-real-secret")
    # Closed by default: workers fetch instances with the service token, so it must be set.
    with pytest.raises(ValidationError, match="API_TOKEN"):
        Settings()
    monkeypatch.setenv("PACS_AGENT_API_TOKEN", "short")
    with pytest.raises(ValidationError, match="API_TOKEN"):
        Settings()
    monkeypatch.setenv("PACS_AGENT_API_TOKEN", "a-service-token-of-32-characters")
    assert Settings().environment == "production"


def test_settings_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('ae_title = "FROMFILE"\nquiet_period_s = 7.5\n')
    monkeypatch.setenv("PACS_AGENT_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("PACS_AGENT_DICOM_PORT", "11999")
    monkeypatch.setenv("PACS_AGENT_ALLOWED_CALLING_AES", "MODA, MODB")
    monkeypatch.setenv("PACS_AGENT_DESTINATIONS", "dicom://ORTHANC@pacs:4242, file:///srv/out")
    s = Settings()
    assert s.ae_title == "FROMFILE" and s.quiet_period_s == 7.5 and s.dicom_port == 11999
    assert s.allowed_calling_aes == ["MODA", "MODB"]
    assert s.destination_urls == ["dicom://ORTHANC@pacs:4242", "file:///srv/out"]
    assert s.resolved_broker_url.startswith("redis+socket://")
    monkeypatch.setenv("PACS_AGENT_AE_TITLE", "FROMENV")
    assert Settings().ae_title == "FROMENV"  # the environment wins over the file


def _token(state: AgentState, role: str) -> dict[str, str]:
    with state.db.session() as s:
        users.create_user(s, f"user-{role}", role, None, actor="test")
        return {
            "authorization": f"Bearer {users.issue_token(s, f'user-{role}', actor='test').token}"
        }


def test_failed_pull_is_listed_and_retried_by_an_operator(client: tuple) -> None:
    c, state, puller = client
    raw, headers = _signed({"orthanc_study_id": "gone-1", "study_instance_uid": "1.2.77"})
    pull_id = c.post("/webhook/orthanc", content=raw, headers=headers).json()["pull_id"]
    # Pending: nothing to retry yet.
    operator, viewer = _token(state, "operator"), _token(state, "viewer")
    assert c.post(f"/api/pulls/{pull_id}/retry", headers=operator).status_code == 409
    with state.db.session() as s:  # what the pull loop writes after its last attempt
        row = s.get_one(PullRequestRow, pull_id)
        row.status, row.attempts = PullStatus.FAILED.value, 3
        row.last_error = "ConnectionError (Orthanc) pulling Orthanc study gone-1"
    [listed] = c.get("/api/pulls?status=failed", headers=viewer).json()
    assert listed["id"] == pull_id and listed["reason"].startswith("ConnectionError")
    assert listed["study_instance_uid"] == "1.2.77"
    assert listed["study_url"] is None  # no instance ever arrived: no study row
    assert c.get("/api/pulls?status=done", headers=viewer).json() == []
    assert c.get(f"/api/pulls/{pull_id}", headers=viewer).json()["status"] == "failed"
    assert c.get("/api/pulls/999999", headers=viewer).status_code == 404
    assert c.get("/api/pulls?status=lost", headers=viewer).status_code == 422

    assert c.post(f"/api/pulls/{pull_id}/retry", headers=viewer).status_code == 403
    assert c.post(f"/api/pulls/{pull_id}/retry").status_code == 401
    wakes = puller.wakes
    r = c.post(f"/api/pulls/{pull_id}/retry", headers=operator)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "pending" and r.json()["attempts"] == 0
    assert puller.wakes == wakes + 1
    assert c.post("/api/pulls/999999/retry", headers=operator).status_code == 404


def test_studies_page_is_capped_and_loaded_in_constant_queries(client: tuple) -> None:
    c, state, _ = client

    def add_studies(n: int, start: int) -> None:
        with state.db.session() as s:
            for i in range(start, start + n):
                st = Study(study_instance_uid=f"1.2.826.99.{i}", source="orthanc")
                s.add(st)
                s.flush()
                job = Job(study_id=st.id, pipeline="chest", status="done")
                s.add(job)
                s.flush()
                s.add(
                    Result(
                        job_id=job.id,
                        kind="sr",
                        sop_instance_uid=f"1.2.826.98.{i}",
                        series_instance_uid=f"1.2.826.97.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                        path=f"r/{i}.dcm",
                        summary={"findings": [{"label": "x", "present": True, "probability": 1}]},
                    )
                )
                s.add(
                    PullRequestRow(
                        orthanc_study_id=f"o-{i}",
                        study_instance_uid=f"1.2.826.99.{i}",
                        status="done",
                    )
                )

    statements: list[str] = []
    event.listen(state.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    def count(url: str) -> tuple[int, list[dict]]:
        statements.clear()
        r = c.get(url, headers=SERVICE)
        assert r.status_code == 200, r.text
        return len(statements), r.json()

    add_studies(3, 0)
    few, page = count("/api/studies?limit=50")
    assert len(page) == 3 and page[0]["jobs"][0]["results"][0]["kind"] == "sr"
    assert page[0]["findings"] == ["x"] and page[0]["pull"]["status"] == "done"
    add_studies(40, 3)
    many, page = count("/api/studies?limit=50")
    assert len(page) == 43
    assert many == few, "queries grow with the number of studies on the page"

    add_studies(70, 43)
    _, page = count("/api/studies")
    assert len(page) == 100  # the default cap
    assert page[0]["study_instance_uid"] == "1.2.826.99.112"  # newest first
    _, rest = count("/api/studies?offset=100&limit=1000")
    assert [p["study_instance_uid"] for p in rest][-1] == "1.2.826.99.0" and len(rest) == 13
    for bad in ("limit=0", "limit=1001", "offset=-1"):
        assert c.get(f"/api/studies?{bad}", headers=SERVICE).status_code == 422
