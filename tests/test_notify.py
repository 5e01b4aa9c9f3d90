"""Triage notifications: queued once per study version and channel, sent by the agent's loop to
real listeners started here (an HTTP webhook receiver, an MLLP listener built on python-hl7's
asyncio server, a real Orthanc 1.10), retried with backoff, failed, and retried by hand."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import pytest
from fastapi.testclient import TestClient
from hl7.mllp import start_hl7_server
from pydicom import dcmread
from sqlalchemy import select

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import (
    Destination,
    Event,
    Instance,
    Job,
    Notification,
    Series,
    Study,
)
from pacs_agent.db.session import Database
from pacs_agent.dispatching.channels import (
    Message,
    build_oru,
    channel_kind,
    check_channel_url,
    mask_url,
    orthanc_label,
    orthanc_supports_labels,
    read_ack,
)
from pacs_agent.dispatching.notify import NotificationLoop, queue_notifications
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from pacs_agent.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.conftest import free_port, sample_path
from tests.support.auth import bearer, make_user

NOTIFY_SECRET = "notify-test-secret"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
FINDINGS = [
    {"label": "Pneumothorax", "probability": 0.93, "present": True},
    {"label": "Pleural effusion", "probability": 0.12, "present": False},
]


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


# Real listeners -------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A small HTTP server that records every POST and answers ``status``."""

    port: int
    status: int = 204
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class MllpListener:
    """An MLLP server (python-hl7's asyncio server) that parses each message with hl7.parse
    and answers an ACK with ``ack_code`` (and ``ack_text`` in MSA-3); none when it is empty."""

    port: int
    ack_code: str = "AA"
    ack_text: str = ""
    received: list[hl7.Message] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.base_events.Server | None = None
    _thread: threading.Thread | None = None

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                block = await reader.readblock()
                message = hl7.parse(block.decode("utf-8"))
                self.received.append(message)
                if not self.ack_code:
                    continue  # a RIS that never answers
                ack = str(message.create_ack(self.ack_code)).rstrip("\r")
                if self.ack_text:
                    ack += "|" + self.ack_text
                writer.writemessage(hl7.parse(ack))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def start(self) -> MllpListener:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._server = await start_hl7_server(self._client, "127.0.0.1", self.port)
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "MLLP listener did not start"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop, server = self._loop, self._server

        async def close() -> None:
            if server is not None:
                server.close()
                await server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None


@pytest.fixture
def listeners() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for listener in started:
        listener.stop()


# Database rows made directly ------------------------------------------------------------------


@dataclass
class Env:
    settings: Settings
    db: Database
    store: InstanceStore

    def loop(self, **kwargs: Any) -> NotificationLoop:
        return NotificationLoop(self.settings, self.db, self.store, **kwargs)

    def notifications(self, study_id: int) -> list[Notification]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Notification)
                    .where(Notification.study_id == study_id)
                    .order_by(Notification.id)
                )
            )

    def events(self, study_id: int, kind: str) -> list[str]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(Event.message).where(Event.study_id == study_id, Event.kind == kind)
                )
            )

    def queue(self, job_id: int, level: str = "urgent", **kwargs: Any) -> int:
        with self.db.session() as s:
            return queue_notifications(
                s, self.settings, job_id=job_id, level=level, findings=FINDINGS, **kwargs
            )


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[Env]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        notify_secret=NOTIFY_SECRET,
        notify_backoff_s=0.1,
        notify_attempts=3,
        public_url="https://pacs.example.org/agent",
    )
    db = Database(database_url)
    yield Env(settings, db, InstanceStore(settings.instance_dir))
    db.dispose()


_counter = iter(range(1, 10_000))


def make_study(
    env: Env,
    *,
    notify: list[str] | None = None,
    priority_class: str = "routine",
    with_header: bool = True,
) -> tuple[str, int, int, bytes]:
    """A study with one stored instance (accession number and description with HL7 separators
    in them, a patient name and id) and a job: (study UID, study id, job id, the file)."""
    n = next(_counter)
    uid = f"1.2.826.0.1.3680043.8.498.{int(time.time())}.{n}"
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = f"{uid}.1"
    ds.SOPInstanceUID = f"{uid}.1.1"
    ds.AccessionNumber = "ACC|7^9"
    ds.StudyDescription = "CHEST PA^LAT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    with env.db.session() as s:
        study = Study(study_instance_uid=uid, status="queued")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=f"{uid}.1", modality="CT")
        s.add(series)
        s.flush()
        if with_header:
            stored = env.store.write(uid, f"{uid}.1", f"{uid}.1.1", data)
            s.add(
                Instance(
                    study_id=study.id,
                    series_id=series.id,
                    sop_instance_uid=f"{uid}.1.1",
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=stored.relpath,
                    size=stored.size,
                    sha256=stored.sha256,
                )
            )
        job = Job(
            study_id=study.id,
            pipeline="chest",
            status="running",
            notify=list(notify or []),
            priority_class=priority_class,
        )
        s.add(job)
        s.flush()
        return uid, study.id, job.id, data


def api(env: Env) -> TestClient:
    state = AgentState(settings=env.settings, db=env.db, store=env.store, puller=None)
    return TestClient(create_app(state))


# Unit level: URLs, HL7, Orthanc feature detection ---------------------------------------------


def test_channel_urls_are_checked_and_masked() -> None:
    assert channel_kind("webhook+https://h/x") == "webhook"
    assert channel_kind("mllp://ris:2575") == "mllp"
    assert channel_kind("orthanc+http://pacs:8042") == "orthanc"
    for bad in ("http://h/x", "mllp://ris", "dicom://AE@h:104", "orthanc+http://"):
        with pytest.raises(ValueError):
            check_channel_url(bad)
    shown = mask_url("webhook+https://alice:s3cret@h:8443/hook?token=abc123")
    assert "s3cret" not in shown and "abc123" not in shown and "h:8443/hook" in shown


def test_orthanc_labels_are_feature_detected_from_system() -> None:
    # GET /system of Orthanc 1.10.1 (ApiVersion 17), 1.12.1 (20, HasLabels), and a 1.12 on a
    # database back-end without labels.
    assert not orthanc_supports_labels({"ApiVersion": 17, "Version": "1.10.1"})
    assert orthanc_supports_labels({"ApiVersion": 20, "Version": "1.12.0"})
    assert orthanc_supports_labels({"ApiVersion": 21, "HasLabels": True})
    assert not orthanc_supports_labels({"ApiVersion": 22, "HasLabels": False})
    assert not orthanc_supports_labels({})
    assert orthanc_label("critical") == "AI-CRITICAL" and orthanc_label("urgent") == "AI-URGENT"


def test_oru_escapes_dicom_text_and_parses_back() -> None:
    message = Message(
        notification_id=42,
        idempotency_key="k",
        study_instance_uid="1.2.3",
        study_version=2,
        level="critical",
        priority="stat",
        findings=[{"label": "Free|air^x", "probability": 0.7, "present": True}],
        accession_number="A|1^2&3~4\\5",
        study_description="CHEST\nPA",
        patient_id="P|1",
        random_weights=True,
    )
    text = build_oru(message)
    assert "\n" not in text
    parsed = hl7.parse(text)
    assert str(parsed.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(parsed.segment("MSH")(10)) == message.control_id == "PACSAGENT42"
    obr = parsed.segment("OBR")
    # Raw separators from DICOM text never split a field: each value comes back whole.
    assert parsed.unescape(str(obr(2))) == "A|1^2&3~4\\5" == parsed.unescape(str(obr(3)))
    pid = parsed.segment("PID")
    assert parsed.unescape(str(pid(3))) == "P|1" and str(pid(5)) == ""  # no name by default
    obx = parsed.segments("OBX")
    assert len(obx) == 2  # one finding + the triage level
    assert parsed.unescape(str(obx[0](3)(1)(2))) == "Free|air^x"
    assert str(obx[0](5)) == "0.7000" and str(obx[0](8)) == "A"
    assert str(obx[1](5)) == "critical" and str(obx[1](8)) == "AA"
    assert "random weights" in str(parsed.segment("NTE"))
    # The ACK is read from MSA; an ACK for another message is refused.
    assert read_ack(
        b"\x0bMSH|^~\\&|R|||||||1|P|2.5.1\rMSA|AE|PACSAGENT42|bad\x1c\r", "PACSAGENT42"
    ) == (
        "AE",
        "bad",
    )


# Queueing -------------------------------------------------------------------------------------


def test_queue_once_per_study_version_and_channel(env: Env) -> None:
    with env.db.session() as s:
        s.add(Destination(name="ris", url="mllp://127.0.0.1:2575", purpose="notify"))
        s.add(Destination(name="pacs", url="dicom://PACS@127.0.0.1:104"))  # not a channel
    uid, study_id, job_id, _ = make_study(
        env, notify=["ris", "webhook+http://127.0.0.1:9/hook", "pacs", "nowhere"]
    )
    assert env.queue(job_id, level="routine") == 0  # not a notifying level
    assert env.queue(job_id) == 2
    # A killed-and-rerun worker, a redelivered message: no second row.
    assert env.queue(job_id) == 0
    assert env.queue(job_id, level="critical") == 0
    rows = env.notifications(study_id)
    assert {(r.channel, r.status) for r in rows} == {
        ("mllp://127.0.0.1:2575", "pending"),
        ("webhook+http://127.0.0.1:9/hook", "pending"),
    }
    payload = rows[0].payload
    assert payload["study_instance_uid"] == uid and payload["level"] == "urgent"
    assert payload["links"]["console"] == f"https://pacs.example.org/agent/studies/{uid}"
    assert payload["links"]["api"] == f"https://pacs.example.org/agent/api/studies/{uid}"
    assert PATIENT_NAME not in json.dumps(payload) and PATIENT_ID not in json.dumps(payload)
    assert len(env.events(study_id, "notification.queued")) == 2
    problems = env.events(study_id, "notification.channel")
    assert any("'pacs'" in p for p in problems) and any("'nowhere'" in p for p in problems)
    # A new study version is a new notification.
    with env.db.session() as s:
        s.get_one(Study, study_id).version = 2
        s.add(Job(study_id=study_id, study_version=2, pipeline="chest", notify=["ris"]))
    with env.db.session() as s:
        job2 = s.scalar(select(Job.id).where(Job.study_id == study_id, Job.study_version == 2))
    assert env.queue(job2, level="critical") == 1
    critical = [r for r in env.notifications(study_id) if r.study_version == 2]
    assert critical[0].priority == 0  # critical: the broker's first number
    assert env.loop().due()[0] == critical[0].id  # sent before the older urgent ones


def test_settings_channels_when_the_job_names_none(env: Env) -> None:
    env.settings.notify = "mllp://127.0.0.1:2575, webhook+https://h.example/x"
    _, study_id, job_id, _ = make_study(env, priority_class="urgent")
    assert env.queue(job_id, level="urgent") == 2
    assert {r.priority for r in env.notifications(study_id)} == {3}


# Sending --------------------------------------------------------------------------------------


def test_webhook_and_mllp_get_exactly_one_message(env: Env, listeners: list[Any]) -> None:
    hook = WebhookReceiver(free_port()).start()
    ris = MllpListener(free_port()).start()
    listeners += [hook, ris]
    hook_url = f"webhook+http://alice:s3cret-pw@127.0.0.1:{hook.port}/triage"
    uid, study_id, job_id, _ = make_study(env, notify=[hook_url, f"mllp://127.0.0.1:{ris.port}"])
    assert env.queue(job_id, level="critical", random_weights=True) == 2
    loop = env.loop()
    assert loop.run_once() == 2
    # The worker killed after queueing runs the job again; then the job is re-processed
    # (an operator's retry): nothing new is queued and nothing is sent twice.
    assert env.queue(job_id, level="critical") == 0
    with env.db.session() as s:
        s.get_one(Job, job_id).status = "pending"
    assert env.queue(job_id, level="critical") == 0
    assert loop.run_once() == 0
    assert len(hook.received) == 1 and len(ris.received) == 1

    headers, body = hook.received[0]
    ts = verify(
        NOTIFY_SECRET,
        headers.get(TIMESTAMP_HEADER),
        headers.get(SIGNATURE_HEADER),
        body,
        max_skew_s=60,
    )
    assert ts > 0
    assert headers["Authorization"].startswith("Basic ")  # credentials from the URL
    doc = json.loads(body)
    assert doc["event"] == "triage" and doc["study_instance_uid"] == uid
    assert doc["accession_number"] == "ACC|7^9" and doc["level"] == "critical"
    assert doc["priority"] == "stat" and doc["random_weights"] is True
    assert doc["findings"] == FINDINGS
    assert doc["links"]["console"].endswith(f"/studies/{uid}")
    assert headers["Idempotency-Key"] == doc["idempotency_key"]
    # No patient data unless PACS_AGENT_NOTIFY_PATIENT_NAME allows the name.
    assert (
        "patient_name" not in doc and "Doe" not in body.decode() and PATIENT_ID not in body.decode()
    )

    oru = ris.received[0]
    assert str(oru.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    pid, obr = oru.segment("PID"), oru.segment("OBR")
    assert str(pid(3)) == PATIENT_ID and str(pid(5)) == ""
    assert oru.unescape(str(obr(2))) == "ACC|7^9" == oru.unescape(str(obr(3)))
    assert oru.unescape(str(obr(4)(1)(2))) == "CHEST PA^LAT"
    assert len(oru.segments("OBX")) == len(FINDINGS) + 1

    rows = env.notifications(study_id)
    assert {r.status for r in rows} == {"done"} and all(r.sent_at for r in rows)
    assert len(env.events(study_id, "notification.sent")) == 2
    # The study's summary shows them, credentials masked.
    token = make_user(env.settings.resolved_database_url, "viewer1", "viewer")
    with api(env) as c:
        r = c.get(f"/api/studies/{uid}", headers=bearer(token))
        assert r.status_code == 200
        shown = r.json()["notifications"]
        assert {n["status"] for n in shown} == {"done"} and len(shown) == 2
        assert "s3cret-pw" not in r.text
        listed = c.get("/api/notifications", params={"study": uid}, headers=bearer(token))
        assert listed.status_code == 200 and len(listed.json()) == 2
        assert "s3cret-pw" not in listed.text


def test_patient_name_only_when_allowed(env: Env, listeners: list[Any]) -> None:
    hook = WebhookReceiver(free_port()).start()
    listeners.append(hook)
    env.settings.notify_patient_name = True
    _, _, job_id, _ = make_study(env, notify=[f"webhook+http://127.0.0.1:{hook.port}/x"])
    env.queue(job_id)
    assert env.loop().run_once() == 1
    assert json.loads(hook.received[0][1])["patient_name"] == PATIENT_NAME


def test_a_listener_that_was_down_gets_the_message_when_it_returns(
    env: Env, listeners: list[Any]
) -> None:
    hook_port, ris_port = free_port(), free_port()
    _, study_id, job_id, _ = make_study(
        env,
        notify=[f"webhook+http://127.0.0.1:{hook_port}/x", f"mllp://127.0.0.1:{ris_port}"],
    )
    env.queue(job_id)
    env.settings.notify_attempts = 50
    loop = env.loop(timeout_s=2.0)
    assert loop.run_once() == 0  # both down: failed attempts, retried later
    rows = env.notifications(study_id)
    assert all(r.status == "pending" and r.attempts == 1 and r.last_error for r in rows)
    assert all(r.next_attempt_at is not None for r in rows)
    hook = WebhookReceiver(hook_port).start()
    ris = MllpListener(ris_port).start()
    listeners += [hook, ris]
    loop.start()
    try:
        wait_for(
            lambda: all(r.status == "done" for r in env.notifications(study_id)),
            what="both notifications sent",
        )
    finally:
        loop.stop()
    assert len(hook.received) == 1 and len(ris.received) == 1
    assert all(r.attempts >= 2 and r.last_error is None for r in env.notifications(study_id))


def test_error_ack_is_retried_then_failed_and_retried_by_hand(
    env: Env, listeners: list[Any]
) -> None:
    ris = MllpListener(free_port(), ack_code="AE", ack_text="unknown order").start()
    hook = WebhookReceiver(free_port(), status=500).start()
    listeners += [ris, hook]
    uid, study_id, job_id, _ = make_study(
        env,
        notify=[f"mllp://127.0.0.1:{ris.port}", f"webhook+http://127.0.0.1:{hook.port}/x"],
    )
    env.queue(job_id, level="urgent")
    loop = env.loop()
    loop.start()
    try:
        wait_for(
            lambda: all(r.status == "failed" for r in env.notifications(study_id)),
            what="notifications failed",
        )
    finally:
        loop.stop()
    # notify_attempts=3: three messages, all with the same control id (receivers de-duplicate).
    assert len(ris.received) == 3 and len(hook.received) == 3
    assert len({str(m.segment("MSH")(10)) for m in ris.received}) == 1
    keys = {json.loads(b)["idempotency_key"] for _, b in hook.received}
    assert len(keys) == 1
    rows = {r.channel.split(":", 1)[0]: r for r in env.notifications(study_id)}
    assert "AE" in (rows["mllp"].last_error or "") and "unknown order" in rows["mllp"].last_error
    assert "HTTP 500" in (rows["webhook+http"].last_error or "")
    assert len(env.events(study_id, "notification.failed")) == 2
    assert env.events(study_id, "notification.retry")

    viewer = make_user(env.settings.resolved_database_url, "viewer2", "viewer")
    operator = make_user(env.settings.resolved_database_url, "op1", "operator")
    ris.ack_code, ris.ack_text = "AA", ""
    nid = rows["mllp"].id
    with api(env) as c:
        shown = c.get("/api/notifications", params={"study": uid}, headers=bearer(viewer))
        assert [n["status"] for n in shown.json()] == ["failed", "failed"]
        assert c.post(f"/api/notifications/{nid}/retry", headers=bearer(viewer)).status_code == 403
        assert (
            c.post("/api/notifications/999999/retry", headers=bearer(operator)).status_code == 404
        )
        r = c.post(f"/api/notifications/{nid}/retry", headers=bearer(operator))
        assert r.status_code == 200 and r.json()["status"] == "pending"
        assert (
            c.post(f"/api/notifications/{nid}/retry", headers=bearer(operator)).status_code == 409
        )
    assert env.loop().run_once() == 1
    assert len(ris.received) == 4
    after = {r.id: r for r in env.notifications(study_id)}
    assert after[nid].status == "done" and after[rows["webhook+http"].id].status == "failed"
    with env.db.session() as s:
        from pacs_agent.db.models import AuditEntry

        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "notification.retry"))
        assert [(a.actor, a.target) for a in audit] == [("op1", str(nid))]


def test_no_ack_within_the_timeout_is_a_failed_attempt(env: Env, listeners: list[Any]) -> None:
    ris = MllpListener(free_port(), ack_code="").start()
    listeners.append(ris)
    _, study_id, job_id, _ = make_study(env, notify=[f"mllp://127.0.0.1:{ris.port}"])
    env.queue(job_id)
    assert env.loop(timeout_s=0.5).run_once() == 0
    (row,) = env.notifications(study_id)
    assert len(ris.received) == 1
    assert row.status == "pending" and row.attempts == 1 and "no ACK" in (row.last_error or "")


def test_a_leased_row_is_not_sent_twice(env: Env, listeners: list[Any]) -> None:
    hook = WebhookReceiver(free_port()).start()
    listeners.append(hook)
    _, _, job_id, _ = make_study(env, notify=[f"webhook+http://127.0.0.1:{hook.port}/x"])
    env.queue(job_id)
    first, second = env.loop(), env.loop()  # two agents on one database
    (nid,) = first.due()
    assert first._take(nid) and not second._take(nid)
    assert second.run_once() == 0 and hook.received == []
    assert first.send(nid)
    assert len(hook.received) == 1


def test_orthanc_metadata_on_a_real_orthanc(env: Env, tmp_path: Path) -> None:
    from tests.support.orthanc import orthanc_available, start_orthanc

    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    uid, study_id, job_id, data = make_study(env)
    with start_orthanc(
        tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port(), python_plugin=False
    ) as pacs:
        system = pacs.system()
        pacs.upload(data)
        orthanc_id = pacs.find_study(uid)
        with env.db.session() as s:
            s.get_one(Job, job_id).notify = [f"orthanc+http://127.0.0.1:{pacs.http_port}"]
        env.queue(job_id, level="critical")
        assert env.loop().run_once() == 1
        if orthanc_supports_labels(system):  # Orthanc 1.12 and later
            labels = pacs.get_json(f"/studies/{orthanc_id}/labels")
            assert "AI-CRITICAL" in labels
        else:  # the Debian Orthanc here (1.10.1): user-defined metadata declared in orthanc.json
            r = pacs.client.get(f"/studies/{orthanc_id}/metadata/AITriage")
            assert r.status_code == 200 and r.text == "critical"
    (row,) = env.notifications(study_id)
    assert row.status == "done"
    assert any(
        "AITriage" in m or "AI-CRITICAL" in m for m in env.events(study_id, "notification.sent")
    )


# End to end: the agent and a real worker process ----------------------------------------------


# One database here (the processes dominate the time); every database path above runs on both.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_agent_and_worker_notify_once_also_when_the_job_runs_again(
    tmp_path: Path,
    database_url: str,
    broker_url: str,
    demo_bundle: Path,
    listeners: list[Any],
) -> None:
    from pydicom.uid import generate_uid

    from tests.conftest import AgentEnv, storescu

    hook = WebhookReceiver(free_port()).start()
    ris = MllpListener(free_port()).start()
    listeners += [hook, ris]
    agent = AgentEnv(tmp_path, database_url, broker_url, demo_bundle, destinations="")
    agent.env.update(
        PACS_AGENT_NOTIFY=f"webhook+http://127.0.0.1:{hook.port}/x,mllp://127.0.0.1:{ris.port}",
        # The DEMO bundle's random weights decide the level: let every level notify here.
        PACS_AGENT_NOTIFY_LEVELS="routine,urgent,critical",
        PACS_AGENT_NOTIFY_SECRET=NOTIFY_SECRET,
    )
    ds = dcmread(sample_path("RG1_J2KR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = "E2E-1"
    path = tmp_path / "study.dcm"
    ds.save_as(path, enforce_file_format=True)
    uid = str(ds.StudyInstanceUID)
    db = Database(database_url)
    try:
        agent.start_agent()
        worker = agent.start_worker()
        assert storescu(agent.dicom_port, path).returncode == 0
        wait_for(lambda: hook.received and ris.received, timeout=180, what="both messages")
        with db.session() as s:
            job_id = s.scalar(select(Job.id).join(Study).where(Study.study_instance_uid == uid))
        # The worker is killed after the messages went out, and the job runs again.
        worker.stop("kill")
        with db.session() as s:
            job = s.get_one(Job, job_id)
            runs = job.attempts
            job.status = "pending"
        agent.start_worker()
        wait_for(
            lambda: _job(db, job_id).attempts > runs and _job(db, job_id).status == "done",
            timeout=180,
            what="the job run again",
        )
        with db.session() as s:
            rows = list(s.scalars(select(Notification).where(Notification.job_id == job_id)))
        assert len(rows) == 2 and {r.status for r in rows} == {"done"}
        assert len(hook.received) == 1 and len(ris.received) == 1
        doc = json.loads(hook.received[0][1])
        assert doc["study_instance_uid"] == uid and doc["accession_number"] == "E2E-1"
        assert doc["random_weights"] is True  # the DEMO bundle
        assert str(ris.received[0].segment("OBR")(2)) == "E2E-1"
    finally:
        agent.stop()
        db.dispose()


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        return s.get_one(Job, job_id)
