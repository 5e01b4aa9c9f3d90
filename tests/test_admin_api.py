"""The admin API behind the console: destinations (with the test action against real peers),
pipelines and the workers serving them, the queue and its suspend switch, and the operator's
actions on studies (filters, force complete, re-run). Real database (SQLite and PostgreSQL), real
Redis, a real Orthanc, a real DICOM SCP, real sockets; nothing is mocked."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import io
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import (
    AuditEntry,
    Destination,
    Event,
    Job,
    Pipeline,
    Result,
    Rule,
    Study,
    WorkerBeat,
    utcnow,
)
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.dispatch import processing_suspended
from pacs_agent.scheduling.pipelines import beat
from pacs_agent.settings import Settings
from tests import test_tls
from tests.conftest import free_port, sample_path
from tests.support.auth import bearer, make_user
from tests.support.orthanc import OrthancServer, orthanc_available, start_orthanc

# Credentials that must never come back from the API or land in the audit.
SECRET_PW = "Pw-d3stinati0n-s3cret"
SECRET_TOKEN = "tok-9f8e7d6c5b4a"
SETTINGS_PW = "settings-Pw-77aa"
NOTIFY_TOKEN = "notify-Tok-55bb"
SECRETS = (SECRET_PW, SECRET_TOKEN, SETTINGS_PW, NOTIFY_TOKEN)
# The throw-away CA with server and client certificates of the TLS tests (a fixture).
tls_pki = test_tls.pki


@dataclass
class Api:
    client: TestClient
    state: AgentState
    db: Database
    admin: dict[str, str]
    operator: dict[str, str]
    viewer: dict[str, str]
    seen: list[str]  # every response body, to check for leaked credentials

    def call(self, method: str, url: str, who: dict[str, str] | None, **kw: Any) -> Any:
        r = self.client.request(method, url, headers=who or {}, **kw)
        self.seen.append(r.text)
        return r


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        min_free_disk_mb=1,
        destinations=f"dicomweb+http://svc:{SETTINGS_PW}@127.0.0.1:1/dicom-web",
        notify=f"webhook+https://hooks.example.org/pacs?token={NOTIFY_TOKEN}",
        broker_url="redis://127.0.0.1:1/0",  # nothing there: the broker part says unreachable
    )
    db = Database(database_url)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    tokens = {role: make_user(database_url, role, role) for role in ("admin", "operator", "viewer")}
    with TestClient(create_app(state)) as c:
        yield Api(
            c,
            state,
            db,
            bearer(tokens["admin"]),
            bearer(tokens["operator"]),
            bearer(tokens["viewer"]),
            [],
        )
    db.dispose()


def _no_secret_anywhere(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """No credential in any response, audit row or log record."""
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert logs, "nothing was logged: is the log capture working?"
    with api.db.session() as s:
        audit = json.dumps(
            [
                {"before": a.before, "after": a.after, "detail": a.detail, "target": a.target}
                for a in s.scalars(select(AuditEntry))
            ]
        )
    for text in [*api.seen, audit, logs]:
        for secret in SECRETS:
            assert secret not in text, f"credential leaked in: {text[:300]}"


def _field_error(r: Any, field: str) -> str:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    hits = [e for e in detail if e["loc"][-1] == field]
    assert hits, detail
    return str(hits[0]["msg"])


# --------------------------------------------------------------------------------------------
# destinations


def test_destinations_crud_validation_and_masking(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    url = f"dicomweb+http://alice:{SECRET_PW}@pacs.example:8080/dicom-web?token={SECRET_TOKEN}"
    r = api.call("POST", "/api/destinations", api.admin, json={"name": "pacs", "url": url})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["url"] == "dicomweb+http://alice:***@pacs.example:8080/dicom-web?token=***"
    assert out["source"] == "database" and not out["read_only"] and out["kind"] == "dicomweb+http"

    listed = {d["name"]: d for d in api.call("GET", "/api/destinations", api.viewer).json()}
    assert listed["pacs"]["url"] == out["url"]
    # PACS_AGENT_DESTINATIONS and _NOTIFY: shown masked, read-only, as the defaults.
    default = listed["settings:destinations:1"]
    assert default["read_only"] and default["source"] == "settings"
    assert default["url"] == "dicomweb+http://svc:***@127.0.0.1:1/dicom-web"
    assert listed["settings:notify:1"]["purpose"] == "notify"
    assert listed["settings:notify:1"]["url"].endswith("?token=***")
    assert (
        api.call("PUT", "/api/destinations/settings:notify:1", api.admin, json={}).status_code
        == 409
    )
    assert (
        api.call("DELETE", "/api/destinations/settings:destinations:1", api.admin).status_code
        == 409
    )
    assert api.call("DELETE", "/api/destinations/settings:nope", api.admin).status_code == 404

    # A PUT that sends the masked form back keeps the stored credentials.
    r = api.call(
        "PUT", "/api/destinations/pacs", api.admin, json={"url": out["url"], "enabled": False}
    )
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False
    with api.db.session() as s:
        assert s.scalar(select(Destination.url).where(Destination.name == "pacs")) == url
    # ... but not to another host.
    moved = out["url"].replace("pacs.example", "elsewhere.example")
    r = api.call("PUT", "/api/destinations/pacs", api.admin, json={"url": moved})
    assert "enter the credentials again" in _field_error(r, "url")
    # A new password replaces the old one; the audit says so without showing either.
    new_url = url.replace(SECRET_PW, SECRET_PW + "-2")
    r = api.call("PUT", "/api/destinations/pacs", api.admin, json={"url": new_url})
    assert r.status_code == 200 and r.json()["url"] == out["url"]

    assert api.call("GET", "/api/destinations/pacs", api.viewer).json()["url"] == out["url"]
    assert api.call("GET", "/api/destinations/nope", api.viewer).status_code == 404
    r = api.call("POST", "/api/destinations", api.admin, json={"name": "pacs", "url": url})
    assert r.status_code == 409

    bad = [
        ({"name": "x1", "url": "ftp://host/x"}, "url", "unknown scheme"),
        ({"name": "x2", "url": "dicom://pacs.example:104"}, "url", "AE title is missing"),
        ({"name": "x3", "url": "dicom://AE@pacs.example"}, "url", "port is missing"),
        ({"name": "x4", "url": "dicom://WAY_TOO_LONG_AE_TITLE@h:104"}, "url", "at most 16"),
        ({"name": "x5", "url": "dicom://A\\B@h:104"}, "url", "backslash"),
        ({"name": "x6", "url": "file://relative/dir"}, "url", "file:///absolute/path"),
        ({"name": "x7", "url": "mllp://ris:2575"}, "url", "notify scheme"),
        ({"name": "x8", "url": "dicomweb+http:///dicom-web"}, "url", "needs a host"),
        ({"name": "x9", "url": "mllp://ris", "purpose": "notify"}, "url", "port is missing"),
        ({"name": "sender", "url": "file:///tmp/x"}, "name", "reserved"),
        ({"name": "bad name!", "url": "file:///tmp/x"}, "name", "letters"),
        ({"name": "x10", "url": "orthanc+http://u:***@h:8042"}, "url", "masked form"),
    ]
    for body, field, reason in bad:
        r = api.call("POST", "/api/destinations", api.admin, json=body)
        assert reason in _field_error(r, field), (body, r.text)
    # A validation error never echoes the request (which may carry a credential).
    r = api.call("POST", "/api/destinations", api.admin, json={"url": url, "purpose": "x"})
    assert r.status_code == 422 and SECRET_PW not in r.text

    # A notify channel, and a rule naming it: deleting it is refused while the rule does.
    r = api.call(
        "POST",
        "/api/destinations",
        api.admin,
        json={"name": "ris", "url": "mllp://ris.example:2575", "purpose": "notify"},
    )
    assert r.status_code == 201, r.text
    with api.db.session() as s:
        s.add(Rule(name="chest", when=["true"], notify=["ris"], destinations=["pacs"]))
    assert api.call("GET", "/api/destinations/ris", api.viewer).json()["used_by_rules"] == ["chest"]
    r = api.call("DELETE", "/api/destinations/pacs", api.admin)
    assert r.status_code == 409 and "chest" in r.json()["detail"]
    with api.db.session() as s:
        s.delete(s.scalar(select(Rule)))
    assert api.call("DELETE", "/api/destinations/pacs", api.admin).status_code == 204
    assert api.call("DELETE", "/api/destinations/pacs", api.admin).status_code == 404

    with api.db.session() as s:
        actions = [(a.action, a.target, a.detail) for a in s.scalars(select(AuditEntry))]
    assert ("destination.create", "pacs", None) in actions
    assert ("destination.update", "pacs", "credentials changed") in actions
    assert ("destination.delete", "pacs", None) in actions
    _no_secret_anywhere(api, caplog)


class _EchoScp:
    """A real pynetdicom Verification SCP on a free port (over TLS with ``ssl_context``)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.port = free_port()
        self.ae = AE(ae_title="ECHOSCP")
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, ssl_context=ssl_context
        )

    def close(self) -> None:
        self.server.shutdown()


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """A local HTTP peer that records every request and refuses them all with 401."""

    requests: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(f"{self.command} {self.path}")
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc (DICOMweb plugin), shared by this module's tests."""
    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    with start_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        python_plugin=False,
    ) as server:
        yield server


def test_destination_test_action_against_real_peers(
    api: Api, tmp_path: Path, orthanc: OrthancServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    scp = _EchoScp()
    listener = socket.create_server(("127.0.0.1", 0))  # an MLLP peer that accepts connections
    _RecordingHandler.requests = []
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    closed = free_port()
    ohttp, hport = orthanc.http_port, web.server_address[1]
    folder = tmp_path / "out"
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    cases = {
        "echo": (f"dicom://ECHOSCP@127.0.0.1:{scp.port}", "destination", True, "C-ECHO"),
        "echo-wrong-aet": (f"dicom://WRONG@127.0.0.1:{scp.port}", "destination", False, "rejected"),
        "echo-closed": (f"dicom://ECHOSCP@127.0.0.1:{closed}", "destination", False, "refused"),
        "orthanc": (
            f"orthanc+http://alice:{SECRET_PW}@127.0.0.1:{ohttp}",
            "destination",
            True,
            "Orthanc",
        ),
        # A peer that refuses the credentials (a local HTTP server answering 401).
        "orthanc-refused": (
            f"orthanc+http://alice:{SECRET_TOKEN}@127.0.0.1:{hport}",
            "destination",
            False,
            "answered 401: credentials refused",
        ),
        "qido": (
            f"dicomweb+http://alice:{SECRET_PW}@127.0.0.1:{ohttp}/dicom-web",
            "destination",
            True,
            "QIDO-RS",
        ),
        "qido-closed": (
            f"dicomweb+http://alice:{SECRET_PW}@127.0.0.1:{closed}/dicom-web",
            "destination",
            False,
            "cannot reach",
        ),
        "folder": (folder.as_uri(), "destination", True, "wrote and removed"),
        "folder-bad": ((not_a_dir / "sub").as_uri(), "destination", False, "cannot write"),
        "mllp": (f"mllp://127.0.0.1:{listener.getsockname()[1]}", "notify", True, "accepted"),
        "mllp-closed": (f"mllp://127.0.0.1:{closed}", "notify", False, "cannot connect"),
        "hook": (
            f"webhook+http://127.0.0.1:{hport}/hook?token={SECRET_TOKEN}",
            "notify",
            True,
            "accepted",
        ),
    }
    try:
        for name, (url, purpose, _, _) in cases.items():
            r = api.call(
                "POST",
                "/api/destinations",
                api.admin,
                json={"name": name, "url": url, "purpose": purpose},
            )
            assert r.status_code == 201, r.text
        assert api.call("POST", "/api/destinations/echo/test", api.viewer).status_code == 403
        for name, (_, _, ok, words) in cases.items():
            r = api.call("POST", f"/api/destinations/{name}/test", api.operator)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["ok"] is ok, (name, out)
            assert words in out["detail"], (name, out)
            assert 0 <= out["elapsed_ms"] < 10_000
        # The settings default is testable too (nothing listens on port 1).
        r = api.call("POST", "/api/destinations/settings:destinations:1/test", api.operator)
        assert r.status_code == 200 and r.json()["ok"] is False
        assert api.call("POST", "/api/destinations/nope/test", api.operator).status_code == 404
    finally:
        scp.close()
        listener.close()
        web.shutdown()
    assert list(folder.iterdir()) == []  # the write check left nothing behind
    # The webhook test only connects: no fake notification was sent (the one request is the
    # Orthanc /system probe of the refusing peer).
    assert _RecordingHandler.requests == ["GET /system"]
    _no_secret_anywhere(api, caplog)


def test_destination_test_action_dicom_tls(api: Api, tls_pki: Path) -> None:
    """C-ECHO over TLS with the agent's CA and client certificate, as the worker delivers."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_pki / "ca.crt"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the peer wants our client certificate
    server_ctx.load_cert_chain(tls_pki / "server.crt", tls_pki / "server.key")
    scp = _EchoScp(server_ctx)
    settings = api.state.settings
    settings.tls_ca_file = tls_pki / "ca.crt"
    try:
        for name, scheme in (("tls", "dicom+tls"), ("plain", "dicom")):
            r = api.call(
                "POST",
                "/api/destinations",
                api.admin,
                json={"name": name, "url": f"{scheme}://ECHOSCP@127.0.0.1:{scp.port}"},
            )
            assert r.status_code == 201, r.text
        # Without our client certificate the peer refuses the handshake.
        out = api.call("POST", "/api/destinations/tls/test", api.operator).json()
        assert out["ok"] is False, out
        settings.tls_cert_file, settings.tls_key_file = (
            tls_pki / "client.crt",
            tls_pki / "client.key",
        )
        out = api.call("POST", "/api/destinations/tls/test", api.operator).json()
        assert out["ok"] is True and "C-ECHO answered Success" in out["detail"], out
        # Plain DICOM to a TLS port: no association.
        assert api.call("POST", "/api/destinations/plain/test", api.operator).json()["ok"] is False
    finally:
        scp.close()


# --------------------------------------------------------------------------------------------
# pipelines


def _fake_bundle(root: Path, name: str, *, demo: bool) -> Path:
    """A bundle folder as the agent reads it (manifest and checksummed files; no weights)."""
    (root / "encoder").mkdir(parents=True)
    (root / "adapters").mkdir()
    (root / "encoder" / "config.json").write_text('{"hidden_size": 8}')
    (root / "adapters" / "classifier.safetensors").write_bytes(b"\0" * 64)

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    manifest = {
        "name": name,
        "version": "0.3.1",
        "encoder": {
            "format": "hf-dinov2",
            "path": "encoder",
            "files": {"config.json": sha(root / "encoder" / "config.json")},
        },
        "adapters": {
            "classifier": {
                "path": "adapters/classifier.safetensors",
                "sha256": sha(root / "adapters" / "classifier.safetensors"),
            }
        },
        "random_weights": demo,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_pipelines_bundles_and_serving_workers(api: Api, tmp_path: Path) -> None:
    visible = _fake_bundle(tmp_path / "chest", "chest-demo", demo=True)
    for body in (
        {"name": "chest", "bundle": str(visible), "description": "chest X-ray"},
        {"name": "remote", "bundle": "/srv/bundles/remote"},  # only the workers have it
        {"name": "spare", "bundle": "/srv/bundles/spare", "enabled": False},
    ):
        r = api.call("POST", "/api/pipelines", api.admin, json=body)
        assert r.status_code == 201, r.text
    assert (
        api.call(
            "POST", "/api/pipelines", api.admin, json={"name": "chest", "bundle": "/x"}
        ).status_code
        == 409
    )
    r = api.call("POST", "/api/pipelines", api.admin, json={"name": "no way", "bundle": "/x"})
    assert "letters" in _field_error(r, "name")

    remote_checksum = "ab" * 32
    with api.db.session() as s:
        beat(
            s,
            "gpu-1",
            pipelines=["remote"],
            lane="all",
            bundles={
                "remote": {
                    "name": "remote-bundle",
                    "version": "2.0.0",
                    "checksum": remote_checksum,
                    "is_demo": False,
                }
            },
        )
        beat(s, "old-worker", pipelines=["chest"], lane="all", bundles={})
        s.flush()
        old = s.scalar(select(WorkerBeat).where(WorkerBeat.name == "old-worker"))
        old.last_seen_at = utcnow() - dt.timedelta(minutes=5)  # stopped beating: not alive

    got = {p["name"]: p for p in api.call("GET", "/api/pipelines", api.viewer).json()}
    chest = got["chest"]
    assert chest["bundle_visible"] and chest["checksum_verified"] is True and chest["is_demo"]
    assert chest["bundle_name"] == "chest-demo" and chest["version"] == "0.3.1"
    manifest_sha = hashlib.sha256((visible / "manifest.json").read_bytes()).hexdigest()
    assert chest["checksum"] == manifest_sha
    assert chest["served"] is False and chest["workers"] == []
    remote = got["remote"]
    assert not remote["bundle_visible"] and remote["served"] is True
    assert [w["name"] for w in remote["workers"]] == ["gpu-1"]
    assert remote["version"] == "2.0.0" and remote["checksum"] == remote_checksum
    assert remote["checksum_verified"] is True and remote["is_demo"] is False
    spare = got["spare"]
    assert spare["served"] is False and spare["checksum_verified"] is None and not spare["enabled"]

    # A changed weights file is caught by the agent's own verification.
    (visible / "adapters" / "classifier.safetensors").write_bytes(b"\1" * 64)
    chest = api.call("GET", "/api/pipelines/chest", api.viewer).json()
    assert chest["checksum_verified"] is False
    assert "checksum mismatch for adapters/classifier.safetensors" in chest["bundle_error"]

    r = api.call(
        "PUT", "/api/pipelines/spare", api.admin, json={"enabled": True, "description": "x"}
    )
    assert r.status_code == 200 and r.json()["enabled"] and r.json()["description"] == "x"
    assert api.call("PUT", "/api/pipelines/nope", api.admin, json={}).status_code == 404

    # DELETE is refused while a rule names it, while jobs of it wait, and for the default.
    with api.db.session() as s:
        s.add(Rule(name="r1", when=["true"], pipeline="remote"))
        study = Study(study_instance_uid="1.2.3.4.1")
        s.add(study)
        s.flush()
        s.add(Job(study_id=study.id, pipeline="spare", status="queued"))
    r = api.call("DELETE", "/api/pipelines/remote", api.admin)
    assert r.status_code == 409 and "r1" in r.json()["detail"]
    r = api.call("DELETE", "/api/pipelines/spare", api.admin)
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    r = api.call("POST", "/api/pipelines", api.admin, json={"name": "gone", "bundle": "/x"})
    assert api.call("DELETE", "/api/pipelines/gone", api.admin).status_code == 204
    assert api.call("DELETE", "/api/pipelines/chest", api.admin).status_code == 409  # default
    with api.db.session() as s:
        assert s.scalar(select(Pipeline).where(Pipeline.name == "gone")) is None
        actions = {a.action for a in s.scalars(select(AuditEntry))}
    assert {"pipeline.create", "pipeline.update", "pipeline.delete"} <= actions


# --------------------------------------------------------------------------------------------
# queue


def test_queue_depth_workers_and_suspend(api: Api, broker_url: str) -> None:
    import redis

    api.state.settings.broker_url = broker_url
    client = redis.Redis.from_url(broker_url)
    client.rpush("pipeline.chest", b"a", b"b")
    client.rpush("pipeline.chest.urgent:3", b"c")
    client.close()
    with api.db.session() as s:
        st = Study(study_instance_uid="1.2.3.5")
        s.add(st)
        s.flush()
        for i, (pipeline, cls, status) in enumerate(
            [
                ("chest", "routine", "pending"),
                ("chest", "stat", "queued"),
                ("chest", "stat", "running"),
                ("chest", "routine", "done"),
                ("multi-anatomy", "urgent", "queued"),
            ]
        ):
            s.add(
                Job(
                    study_id=st.id,
                    study_version=i + 1,
                    pipeline=pipeline,
                    priority_class=cls,
                    status=status,
                )
            )
        beat(s, "gpu-1", pipelines=["chest"], lane="urgent", bundles={})

    q = api.call("GET", "/api/queue", api.viewer).json()
    assert q["suspended"] is False
    cells = {(d["pipeline"], d["priority_class"]): d for d in q["depth"]}
    assert cells[("chest", "stat")] == {
        "pipeline": "chest",
        "priority_class": "stat",
        "pending": 0,
        "queued": 1,
        "running": 1,
    }
    assert cells[("chest", "routine")]["pending"] == 1
    assert [d["priority_class"] for d in q["depth"] if d["pipeline"] == "chest"] == [
        "stat",
        "routine",
    ]
    assert q["totals"] == {"pending": 1, "queued": 2, "running": 1}
    assert [(w["name"], w["lane"], w["pipelines"]) for w in q["workers"]] == [
        ("gpu-1", "urgent", ["chest"])
    ]
    assert q["unserved"] == [{"pipeline": "multi-anatomy", "waiting": 1}]
    assert q["broker"] == {
        "reachable": True,
        "queues": {"pipeline.chest": 2, "pipeline.chest.urgent": 1},
        "error": None,
    }

    assert api.call("POST", "/api/queue/suspend", api.viewer).status_code == 403
    r = api.call("POST", "/api/queue/suspend", api.operator)
    assert r.status_code == 200 and r.json() == {"suspended": True}
    assert api.call("GET", "/api/queue", api.viewer).json()["suspended"] is True
    with api.db.session() as s:
        assert processing_suspended(s)  # the flag the dispatch loop reads
    assert api.call("POST", "/api/queue/resume", api.operator).json() == {"suspended": False}
    with api.db.session() as s:
        assert not processing_suspended(s)
        audit = [(a.action, a.actor, a.after) for a in s.scalars(select(AuditEntry))]
    assert ("queue.suspend", "operator", {"processing_suspended": True}) in audit
    assert ("queue.resume", "operator", {"processing_suspended": False}) in audit


# --------------------------------------------------------------------------------------------
# studies


def _study(s: Any, uid: str, **kw: Any) -> Study:
    st = Study(study_instance_uid=uid, **kw)
    s.add(st)
    s.flush()
    return st


def test_study_list_filters_and_summary(api: Api) -> None:
    t0 = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    with api.db.session() as s:
        a = _study(
            s, "1.2.826.1.1", status="done", rule_name="chest", rule_version=2, last_received_at=t0
        )
        job = Job(
            study_id=a.id,
            pipeline="chest",
            priority_class="urgent",
            status="done",
            triage="critical",
            finished_at=t0 + dt.timedelta(seconds=42.5),
        )
        s.add(job)
        s.flush()
        s.add(
            Result(
                job_id=job.id,
                kind="sr",
                sop_instance_uid="1.2.826.1.1.9",
                series_instance_uid="1.2.826.1.1.8",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                path="x.dcm",
                summary={
                    "findings": [
                        {"label": "Pneumothorax", "probability": 0.91, "present": True},
                        {"label": "Nodule", "probability": 0.2, "present": False},
                        {"label": "Pleural effusion", "probability": 0.7, "present": True},
                    ]
                },
            )
        )
        _study(s, "1.2.826.2.1", status="receiving", incoming_priority="stat")
        b = _study(s, "1.3.5.1", status="queued")
        s.add(Job(study_id=b.id, pipeline="multi-anatomy", priority_class="routine"))

    def uids(**params: Any) -> list[str]:
        r = api.call("GET", "/api/studies", api.viewer, params=params)
        assert r.status_code == 200, r.text
        return [x["study_instance_uid"] for x in r.json()]

    assert uids() == ["1.3.5.1", "1.2.826.2.1", "1.2.826.1.1"]  # newest first
    assert uids(limit=1, offset=1) == ["1.2.826.2.1"]
    assert uids(status="done") == ["1.2.826.1.1"]
    assert uids(priority="stat") == ["1.2.826.2.1"]
    assert uids(priority="urgent") == ["1.2.826.1.1"]
    assert uids(priority="routine") == ["1.3.5.1"]
    assert uids(rule="chest") == ["1.2.826.1.1"]
    assert uids(rule="(fallback)") == ["1.3.5.1", "1.2.826.2.1"]
    assert uids(pipeline="multi-anatomy") == ["1.3.5.1"]
    assert uids(q="1.2.826.") == ["1.2.826.2.1", "1.2.826.1.1"]
    assert "UID prefix" in _field_error(
        api.call("GET", "/api/studies", api.viewer, params={"q": "Smith"}), "q"
    )
    summary = api.call("GET", "/api/studies/1.2.826.1.1", api.viewer).json()
    assert summary["priority"] == "urgent" and summary["triage"] == "critical"
    assert summary["findings"] == ["Pneumothorax", "Pleural effusion"]
    assert summary["rule"] == "chest" and summary["rule_version"] == 2
    assert summary["last_instance_to_result_s"] == 42.5
    assert summary["jobs"][0]["results"][0]["kind"] == "sr"
    assert "notifications" in summary and "events" in summary
    assert api.call("GET", "/api/studies/9.9", api.viewer).status_code == 404


def _ingest(ingestor: Ingestor, name: str, study_uid: str | None = None) -> str:
    data = sample_path(name).read_bytes()
    ds = parse_part10(data)
    if study_uid:
        ds.StudyInstanceUID = study_uid
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        ds = parse_part10(data)
    ingestor.ingest(data, ds, ds.file_meta.TransferSyntaxUID, source="dimse", calling_ae="MOD")
    return str(ds.StudyInstanceUID)


def test_force_complete_and_rerun(api: Api) -> None:
    uid = _ingest(Ingestor(api.db, api.state.store), "RG1_J2KR.dcm")
    with api.db.session() as s:
        s.add(Pipeline(name="chest", bundle="/srv/chest"))
        s.add(Pipeline(name="multi-anatomy", bundle="/srv/multi"))
        s.add(Pipeline(name="off", bundle="/srv/off", enabled=False))

    r = api.call("POST", f"/api/studies/{uid}/rerun", api.operator, json={"pipeline": "chest"})
    assert r.status_code == 409 and "receiving" in r.json()["detail"]
    assert api.call("POST", f"/api/studies/{uid}/force-complete", api.viewer).status_code == 403
    r = api.call("POST", f"/api/studies/{uid}/force-complete", api.operator)
    assert r.status_code == 200, r.text
    forced = r.json()
    assert forced["status"] == "queued" and len(forced["jobs"]) == 1
    r = api.call("POST", f"/api/studies/{uid}/force-complete", api.operator)
    assert r.status_code == 409 and "not receiving" in r.json()["detail"]
    assert api.call("POST", "/api/studies/9.9/force-complete", api.operator).status_code == 404

    with api.db.session() as s:
        first = s.get_one(Job, forced["jobs"][0])
        pipeline = first.pipeline
        assert pipeline == "chest"  # routed as the loop routes it: the fallback, default pipeline
        first.priority_class, first.priority = "urgent", 3
    # One job of that pipeline is still pending: no second one.
    r = api.call("POST", f"/api/studies/{uid}/rerun", api.operator, json={"pipeline": pipeline})
    assert r.status_code == 409
    for name, why in (("nope", "unknown pipeline"), ("off", "pipeline disabled")):
        r = api.call("POST", f"/api/studies/{uid}/rerun", api.operator, json={"pipeline": name})
        assert _field_error(r, "pipeline") == why
    r = api.call(
        "POST", f"/api/studies/{uid}/rerun", api.operator, json={"pipeline": "multi-anatomy"}
    )
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["priority"] == "urgent" and again["status"] == "pending"
    assert again["job_id"] != first.id and again["study_version"] == 1
    with api.db.session() as s:
        job = s.get_one(Job, again["job_id"])
        assert (job.pipeline, job.priority, job.destinations) == (
            "multi-anatomy",
            3,
            first.destinations,
        )
        # The first job finished: a re-run of its pipeline sends that job again.
        s.get_one(Job, first.id).status = "failed"
    r = api.call("POST", f"/api/studies/{uid}/rerun", api.operator, json={"pipeline": pipeline})
    assert r.status_code == 201 and r.json()["job_id"] == first.id
    assert (
        api.call(
            "POST", f"/api/studies/{uid}/rerun", api.viewer, json={"pipeline": pipeline}
        ).status_code
        == 403
    )

    with api.db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study.status == "queued"
        events = [
            (e.kind, e.message) for e in s.scalars(select(Event).where(Event.study_id == study.id))
        ]
        audit = [(a.action, a.actor) for a in s.scalars(select(AuditEntry))]
    assert any(k == "study.complete" and "forced by operator" in m for k, m in events)
    assert sum(k == "job.rerun" for k, _ in events) == 2
    assert ("study.force_complete", "operator") in audit
    assert audit.count(("study.rerun", "operator")) == 2


# --------------------------------------------------------------------------------------------
# roles


WRITES = [
    ("POST", "/api/destinations", "admin", {"name": "d", "url": "file:///tmp/d"}),
    ("PUT", "/api/destinations/d", "admin", {"enabled": False}),
    ("DELETE", "/api/destinations/d", "admin", None),
    ("POST", "/api/destinations/d/test", "operator", None),
    ("POST", "/api/pipelines", "admin", {"name": "p", "bundle": "/x"}),
    ("PUT", "/api/pipelines/p", "admin", {"enabled": False}),
    ("DELETE", "/api/pipelines/p", "admin", None),
    ("POST", "/api/queue/suspend", "operator", None),
    ("POST", "/api/queue/resume", "operator", None),
    ("POST", "/api/studies/1.2/force-complete", "operator", None),
    ("POST", "/api/studies/1.2/rerun", "operator", {"pipeline": "chest"}),
    ("POST", "/api/jobs/1/retry", "operator", None),
]


def test_roles_on_every_write(api: Api) -> None:
    for method, url, needed, body in WRITES:
        assert api.call(method, url, None, json=body).status_code == 401, url
        assert api.call(method, url, api.viewer, json=body).status_code == 403, url
        if needed == "admin":
            assert api.call(method, url, api.operator, json=body).status_code == 403, url
    for url in ("/api/destinations", "/api/pipelines", "/api/queue", "/api/studies"):
        assert api.call("GET", url, None).status_code == 401
        assert api.call("GET", url, api.viewer).status_code == 200
