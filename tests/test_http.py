"""The agent's HTTP side: health, the signed Orthanc webhook, and the admin/worker API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.pull import PullRequest
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.conftest import sample_path

SECRET = "test-secret-for-webhook"
SERVICE_TOKEN = "service-token-for-the-http-tests"
SERVICE = {"authorization": f"Bearer {SERVICE_TOKEN}"}


class RecordingPuller:
    """Records what the webhook hands to the puller, so these tests see the HTTP contract alone.
    The real puller pulling from a real Orthanc is tested end to end in test_e2e.py."""

    def __init__(self) -> None:
        self.requests: list[PullRequest] = []

    def submit(self, req: PullRequest) -> None:
        self.requests.append(req)


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
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=puller
    )  # type: ignore[arg-type]
    with TestClient(create_app(state)) as c:
        yield c, state, puller
    db.dispose()


def _signed(body: dict, ts: int | None = None, secret: str = SECRET) -> tuple[bytes, dict]:
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
    c, _, puller = client
    raw, headers = _signed(
        {"event": "StableStudy", "orthanc_study_id": "abc-123", "study_instance_uid": "1.2.3"}
    )
    r = c.post("/webhook/orthanc", content=raw, headers=headers)
    assert r.status_code == 202, r.text
    assert puller.requests == [PullRequest("abc-123", "1.2.3")]


@pytest.mark.parametrize("case", ["unsigned", "wrong-secret", "tampered", "stale", "garbage-ts"])
def test_webhook_refuses_bad_signatures(client: tuple, case: str) -> None:
    c, _, puller = client
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
    assert puller.requests == []


def test_webhook_refuses_replay(client: tuple) -> None:
    c, _, puller = client
    raw, headers = _signed({"orthanc_study_id": "same"})
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 202
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 401
    assert len(puller.requests) == 1


def test_webhook_signed_but_malformed_body(client: tuple) -> None:
    c, _, puller = client
    raw, headers = _signed({"no_id": True})
    assert c.post("/webhook/orthanc", content=raw, headers=headers).status_code == 400
    assert puller.requests == []


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
