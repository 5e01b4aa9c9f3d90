"""orthanc/plugin.py: pure functions, then the plugin inside a real Orthanc (Debian packages)."""

from __future__ import annotations

import importlib.util
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support import free_port, wait_until
from tests.support.orthanc import (
    ORTHANC_CONFIG,
    PLUGIN_SCRIPT,
    load_json_with_comments,
    orthanc_available,
    start_orthanc,
    storescu,
    storescu_available,
    strip_json_comments,
)


def _load_plugin():
    spec = importlib.util.spec_from_file_location("pacs_agent_orthanc_plugin", PLUGIN_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plugin = _load_plugin()

SECRET = "test-webhook-secret-0123456789"


# ------------------------------------------------------------------------------------------------
# Unit tests (no Orthanc)
# ------------------------------------------------------------------------------------------------


def test_plugin_imports_without_orthanc():
    assert plugin.orthanc is None
    assert plugin._notifier is None


def test_signature_known_answer():
    body = plugin.encode_body(plugin.build_payload("abc", "1.2.3", 1700000000))
    assert body == (
        b'{"event":"StableStudy","orthanc_study_id":"abc","study_instance_uid":"1.2.3",'
        b'"timestamp":1700000000}'
    )
    # printf '1700000000.<body>' | openssl dgst -sha256 -hmac s3cret
    assert plugin.sign("s3cret", 1700000000, body) == (
        "sha256=07823d76c3f69c9209ea1b733c203198a3cae50b0112e9369e518a1669042895"
    )


def test_build_request_headers_match_body():
    body, headers = plugin.build_request(SECRET, "orth-id", "1.2.840.1", 1700000123.9)
    payload = json.loads(body)
    assert payload == {
        "event": "StableStudy",
        "orthanc_study_id": "orth-id",
        "study_instance_uid": "1.2.840.1",
        "timestamp": 1700000123,
    }
    assert headers["Content-Type"] == "application/json"
    assert headers["X-PACS-Agent-Timestamp"] == "1700000123"
    assert headers["X-PACS-Agent-Signature"] == plugin.sign(SECRET, 1700000123, body)
    assert plugin.verify_signature(
        SECRET,
        headers["X-PACS-Agent-Timestamp"],
        body,
        headers["X-PACS-Agent-Signature"],
        now=1700000130,
    )


def test_verify_signature_rejects_tampering_wrong_secret_and_stale_timestamps():
    body, headers = plugin.build_request(SECRET, "id", "1.2.3", 1000)
    ts, sig = headers["X-PACS-Agent-Timestamp"], headers["X-PACS-Agent-Signature"]
    assert plugin.verify_signature(SECRET, ts, body, sig, now=1000)
    assert not plugin.verify_signature(SECRET, ts, body + b" ", sig, now=1000)
    assert not plugin.verify_signature("other", ts, body, sig, now=1000)
    assert not plugin.verify_signature(SECRET, "1001", body, sig, now=1000)
    assert not plugin.verify_signature(SECRET, ts, body, sig, now=1000 + 301)
    assert not plugin.verify_signature(SECRET, "soon", body, sig, now=1000)
    assert not plugin.verify_signature("", ts, body, sig, now=1000)
    assert not plugin.verify_signature(SECRET, ts, body, sig.replace("sha256=", ""), now=1000)


def test_config_merge_defaults_file_and_environment():
    production = load_json_with_comments(ORTHANC_CONFIG)
    cfg = plugin.load_config(json.dumps(production), environ={})
    assert cfg["WebhookUrl"] == "http://agent:8000/webhook/orthanc"
    assert cfg["WebhookSecret"] is None
    assert cfg["IgnoreAeTitles"] == ["PACSAGENT"]
    assert cfg["Enabled"] is True

    cfg = plugin.load_config(
        production,
        environ={
            "PACS_AGENT_WEBHOOK_URL": "http://127.0.0.1:9/hook",
            "PACS_AGENT_WEBHOOK_SECRET": "from-env",
        },
    )
    assert cfg["WebhookUrl"] == "http://127.0.0.1:9/hook"
    assert cfg["WebhookSecret"] == "from-env"
    assert "from-env" not in json.dumps(plugin.redacted(cfg))

    # The secret comes from the variable the section names, and wins over one in the file.
    cfg = plugin.load_config(
        {
            "PacsAgent": {
                "WebhookSecretEnv": "MY_SECRET",
                "WebhookSecret": "in-file",
                "IgnoreAeTitles": ["pacsagent ", "OTHER"],
                "MaxAttempts": 0,
            }
        },
        environ={"MY_SECRET": "named", "PACS_AGENT_WEBHOOK_SECRET": "ignored"},
    )
    assert cfg["WebhookSecret"] == "named"
    assert cfg["IgnoreAeTitles"] == ["PACSAGENT", "OTHER"]
    assert cfg["MaxAttempts"] == 1

    assert plugin.load_config("", environ={})["WebhookUrl"] == plugin.DEFAULTS["WebhookUrl"]
    assert plugin.load_config({"PacsAgent": {"Enabled": False}}, environ={})["Enabled"] is False


def test_production_config_is_consistent():
    cfg = load_json_with_comments(ORTHANC_CONFIG)
    assert cfg["DicomAet"] == "ORTHANC" and cfg["DicomPort"] == 4242 and cfg["HttpPort"] == 8042
    assert cfg["StableAge"] == 5
    assert cfg["DicomModalities"]["pacsagent"] == ["PACSAGENT", "agent", 11112]
    assert cfg["DicomWeb"]["Enable"] is True and cfg["DicomWeb"]["Root"] == "/dicom-web/"
    assert any(p.endswith("libOrthancPython.so") for p in cfg["Plugins"])
    assert any(p.endswith("libOrthancDicomWeb.so") for p in cfg["Plugins"])
    assert cfg["PythonScript"].endswith("plugin.py")
    assert plugin.NOTIFIED_METADATA in cfg["UserMetadata"]
    assert "WebhookSecret" not in cfg["PacsAgent"]


def test_strip_json_comments_keeps_strings():
    text = '{"a": "http://x//y", /* c */ "b": "/* no */", // tail\n "c": "q\\"//"}'
    assert json.loads(strip_json_comments(text)) == {
        "a": "http://x//y",
        "b": "/* no */",
        "c": 'q"//',
    }


def test_decide_and_agent_series():
    cfg = plugin.load_config({}, environ={})
    assert plugin.is_agent_series("PACSAGENT", "", cfg)
    assert plugin.is_agent_series("pacsagent", "ACME", cfg)
    assert plugin.is_agent_series("", "pacs-agent", cfg)
    assert not plugin.is_agent_series("MODALITY", "ACME", cfg)
    assert not plugin.is_agent_series("", "", cfg)

    assert plugin.decide([], "") == (False, "only the agent's own results", "")
    fp = plugin.fingerprint(["b", "a"])
    assert fp == plugin.fingerprint(["a", "b", "a"])
    assert plugin.decide(["a", "b"], "")[0] is True
    assert plugin.decide(["a", "b"], fp)[0] is False
    assert plugin.decide(["a", "b"], fp, force=True)[0] is True
    assert plugin.decide(["a", "b", "c"], fp)[0] is True


def test_deliver_retries_connection_errors_and_5xx_but_not_4xx():
    outcomes: list[Any] = [ConnectionRefusedError("down"), 503, 200]
    calls, sleeps, stamps = [], [], iter(range(10))

    def send(body, headers):
        calls.append((body, headers))
        result = outcomes.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def build():
        return plugin.build_request(SECRET, "id", "1.2.3", 1000 + next(stamps))

    ok, attempts, error = plugin.deliver(send, build, 5, 1.0, 30.0, lambda s: sleeps.append(s))
    assert (ok, attempts, error) == (True, 3, None)
    assert sleeps == [1.0, 2.0]
    # Each attempt is signed afresh.
    assert [h["X-PACS-Agent-Timestamp"] for _, h in calls] == ["1000", "1001", "1002"]

    ok, attempts, error = plugin.deliver(lambda b, h: 401, build, 5, 1.0, 30.0, lambda s: None)
    assert (ok, attempts, error) == (False, 1, "HTTP 401")

    ok, attempts, error = plugin.deliver(lambda b, h: 500, build, 3, 1.0, 30.0, lambda s: None)
    assert (ok, attempts, error) == (False, 3, "HTTP 500")
    assert plugin.backoff_delay(10, 1.0, 30.0) == 30.0

    ok, attempts, error = plugin.deliver(lambda b, h: 502, build, 5, 1.0, 30.0, lambda s: False)
    assert not ok and attempts == 1 and "shutdown" in error


class _FakeApi:
    """The REST answers of Orthanc for one study with a modality series and an agent series."""

    def __init__(self, agent_series_manufacturer="pacs-agent"):
        self.metadata: dict[str, str] = {}
        self.series = [
            {"ID": "s1", "Instances": ["i1", "i2"], "MainDicomTags": {"Manufacturer": "ACME"}},
        ]
        self.remote_aet = {"i1": "MODALITY", "r1": "PACSAGENT", "r2": ""}
        self.agent_manufacturer = agent_series_manufacturer

    def add_results(self):
        self.series.append({"ID": "s2", "Instances": ["r1"], "MainDicomTags": {}})
        self.series.append(
            {
                "ID": "s3",
                "Instances": ["r2"],
                "MainDicomTags": {"Manufacturer": self.agent_manufacturer},
            }
        )

    def get_json(self, uri):
        if uri == "/studies/st":
            return {"ID": "st", "MainDicomTags": {"StudyInstanceUID": "1.2.3"}}
        if uri == "/studies/st/series":
            return self.series
        if uri.startswith("/instances/"):
            return {"RemoteAET": self.remote_aet[uri.split("/")[2]], "Origin": "DicomProtocol"}
        raise KeyError(uri)

    def get_text(self, uri):
        return self.metadata[uri.rsplit("/", 1)[1]]

    def put_metadata(self, study_id, name, value):
        self.metadata[name] = value


def test_notifier_skips_agent_results_added_to_an_analysed_study():
    api, posts, logs = _FakeApi(), [], []
    cfg = plugin.load_config({}, environ={"PACS_AGENT_WEBHOOK_SECRET": SECRET})
    cfg["MaxAttempts"] = 1

    def post(url, body, headers, timeout):
        posts.append((url, body, headers))
        return 202

    notifier = plugin.Notifier(cfg, api, logs.append, logs.append, post=post)
    assert notifier.process("st") is True
    assert len(posts) == 1 and json.loads(posts[0][1])["study_instance_uid"] == "1.2.3"

    api.add_results()  # SR by C-STORE from PACSAGENT + SEG by REST with Manufacturer pacs-agent
    assert notifier.process("st") is False
    assert len(posts) == 1
    assert "no new instances besides the agent's results" in logs[-1]

    api.series[0]["Instances"].append("i3")  # the modality sends one more image
    assert notifier.process("st") is True
    assert len(posts) == 2
    assert notifier.process("st", force=True) is True
    assert len(posts) == 3


def test_notifier_without_secret_logs_and_does_not_post():
    api, posts, logs = _FakeApi(), [], []
    cfg = plugin.load_config({}, environ={})
    notifier = plugin.Notifier(cfg, api, logs.append, logs.append, post=lambda *a: posts.append(a))
    assert notifier.process("st") is False
    assert posts == [] and "no webhook secret" in logs[-1]
    assert api.metadata == {}  # not marked as notified: a later event or a re-send still works


def test_notifier_failed_delivery_is_not_remembered():
    api, logs = _FakeApi(), []
    cfg = plugin.load_config({}, environ={"PACS_AGENT_WEBHOOK_SECRET": SECRET})
    cfg.update(MaxAttempts=2, BackoffSeconds=0.01)
    notifier = plugin.Notifier(cfg, api, logs.append, logs.append, post=lambda *a: 500)
    assert notifier.process("st") is False
    assert any("failed after 2 attempt(s): HTTP 500" in line for line in logs)
    assert api.metadata == {}


def test_notifier_keeps_a_failed_notification_until_delivered(tmp_path):
    """After its last attempt the notification is kept (in a file here, Orthanc's global
    property in production), survives a new Notifier (an Orthanc restart), is retried with
    backoff, and leaves the list once delivered."""
    api, logs, now = _FakeApi(), [], [1000.0]
    cfg = plugin.load_config({}, environ={"PACS_AGENT_WEBHOOK_SECRET": SECRET})
    cfg.update(MaxAttempts=2, BackoffSeconds=0.0, PendingBackoffSeconds=10.0)
    cfg.update(PendingMaxBackoffSeconds=40.0)
    store = plugin.FileStore(str(tmp_path / "pending.json"))
    answers = [ConnectionRefusedError("down")] * 3 + [503]

    def post(url, body, headers, timeout):
        answer = answers.pop(0) if answers else 202
        if isinstance(answer, Exception):
            raise answer
        return answer

    def notifier():
        return plugin.Notifier(
            cfg, api, logs.append, logs.append, post=post, store=store, clock=lambda: now[0]
        )

    first = notifier()
    assert first.process("st") is False
    [(sid, entry)] = store.load().items()
    assert sid == "st" and entry["rounds"] == 1 and entry["next"] == 1010.0
    assert entry["error"].startswith("ConnectionRefusedError")
    assert "kept pending" in logs[-1] and "1.2.3" in logs[-1]
    assert first.retry_pending() == 0  # not due yet
    now[0] = 1010.0
    assert first.retry_pending() == 1  # one attempt per round: refused again
    assert store.load()["st"]["rounds"] == 2 and store.load()["st"]["next"] == 1030.0

    # Orthanc restarts: the kept notification is loaded and due at once.
    second = notifier()
    assert set(second.kept) == {"st"}
    assert second.retry_pending() == 1  # HTTP 503: still kept
    assert store.load()["st"]["error"] == "HTTP 503"
    now[0] = 2000.0
    assert second.retry_pending() == 1
    assert store.load() == {} and api.metadata  # delivered and remembered
    assert "from the pending list" in logs[-1]


def test_notifier_drops_a_notification_only_after_the_max_age():
    api, logs, now = _FakeApi(), [], [0.0]
    cfg = plugin.load_config({}, environ={"PACS_AGENT_WEBHOOK_SECRET": SECRET})
    cfg.update(MaxAttempts=1, PendingBackoffSeconds=60.0, PendingMaxAgeSeconds=3600.0)
    store = plugin.MemoryStore()
    notifier = plugin.Notifier(
        cfg,
        api,
        logs.append,
        logs.append,
        post=lambda *a: 500,
        store=store,
        clock=lambda: now[0],
    )
    notifier.process("st")
    now[0] = 3000.0
    assert notifier.retry_pending() == 1 and "st" in store.load()
    now[0] = 3700.0
    assert notifier.retry_pending() == 1
    assert store.load() == {}
    assert "dropped after 3700 s pending (HTTP 500)" in logs[-1]
    assert "/pacs-agent/studies/st/notify" in logs[-1]


def test_global_property_store_round_trip():
    props: dict[int, str] = {}
    store = plugin.GlobalPropertyStore(
        lambda p, d: props.get(p, d), lambda p, v: props.__setitem__(p, v), 5471
    )
    assert store.load() == {}
    store.save({"a": {"rounds": 1}})
    assert json.loads(props[5471]) == {"a": {"rounds": 1}} and store.load() == {"a": {"rounds": 1}}
    props[5471] = "not json"
    assert store.load() == {}
    with pytest.raises(ValueError, match="1024"):
        plugin.load_config({"PacsAgent": {"PendingGlobalProperty": 7}}, environ={})


# ------------------------------------------------------------------------------------------------
# Integration: the plugin inside a real Orthanc
# ------------------------------------------------------------------------------------------------

STABLE_AGE = 1


class WebhookRecorder:
    """A tiny HTTP server that records POSTs and answers from a per-study plan (default 202)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.plan: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    uid = json.loads(body).get("study_instance_uid")
                except ValueError:
                    uid = None
                with recorder.lock:
                    planned = recorder.plan.get(uid) or []
                    status = planned.pop(0) if planned else 202
                    recorder.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers.items()),
                            "body": body,
                            "uid": uid,
                            "status": status,
                            "received": time.time(),
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/webhook/orthanc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_study(self, uid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["uid"] == uid]

    def wait_for(self, uid: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        wait_until(
            lambda: len(self.for_study(uid)) >= count,
            timeout,
            message=f"{count} webhook call(s) for study {uid} not received within {timeout} s",
        )
        return self.for_study(uid)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


requires_orthanc = pytest.mark.skipif(
    orthanc_available() is not None, reason=f"real Orthanc unavailable: {orthanc_available()}"
)


@pytest.fixture(scope="module")
def recorder():
    rec = WebhookRecorder()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def pacs(recorder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("orthanc")
    with start_orthanc(
        workdir,
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"agent": ("PACSAGENT", "127.0.0.1", free_port())},
        webhook_url=recorder.url,
        webhook_secret=SECRET,
        stable_age=STABLE_AGE,
        plugin_settings={"BackoffSeconds": 0.5},
    ) as server:
        yield server


def make_dicom(
    tmp_path: Path, *, study_uid: str | None = None, manufacturer: str | None = None
) -> tuple[Path, str]:
    """CT_small.dcm with fresh series and SOP instance UIDs (and a new study unless given)."""
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if manufacturer is not None:
        ds.Manufacturer = manufacturer
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def assert_valid_webhook(request: dict[str, Any], study_uid: str, orthanc_study_id: str) -> None:
    assert request["path"] == "/webhook/orthanc"
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    body = request["body"]
    payload = json.loads(body)
    assert payload == {
        "event": "StableStudy",
        "orthanc_study_id": orthanc_study_id,
        "study_instance_uid": study_uid,
        "timestamp": int(headers["x-pacs-agent-timestamp"]),
    }
    assert abs(payload["timestamp"] - request["received"]) < 5
    assert plugin.verify_signature(
        SECRET,
        headers["x-pacs-agent-timestamp"],
        body,
        headers["x-pacs-agent-signature"],
        now=request["received"],
    )
    assert not plugin.verify_signature(
        "wrong-secret",
        headers["x-pacs-agent-timestamp"],
        body,
        headers["x-pacs-agent-signature"],
        now=request["received"],
    )


def wait_for_skip(pacs, study_uid: str) -> str:
    return pacs.wait_for_log(f"StudyInstanceUID {study_uid}) skipped", timeout=STABLE_AGE + 5)


@requires_orthanc
def test_python_plugin_is_loaded(pacs):
    assert "python" in pacs.plugins()
    assert "dicom-web" in pacs.plugins()
    line = pacs.wait_for_log("pacs-agent plugin 1 loaded")
    assert '"WebhookSecret": "<set>"' in line
    assert SECRET not in pacs.log_text()
    assert pacs.client.get("/dicom-web/studies").status_code == 200


@requires_orthanc
def test_rest_upload_triggers_signed_webhook(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path)
    stored = pacs.upload(path.read_bytes())
    [request] = recorder.wait_for(study_uid, timeout=30)
    assert_valid_webhook(request, study_uid, stored["ParentStudy"])
    assert pacs.find_study(study_uid) == stored["ParentStudy"]
    [instance] = pacs.study_instances(study_uid)
    assert (
        pydicom.dcmread(io.BytesIO(pacs.get_instance_file(instance["ID"]))).StudyInstanceUID
        == study_uid
    )
    # The study is marked as notified, so a later stable event without new images is skipped.
    notified = pacs.client.get(f"/studies/{stored['ParentStudy']}/metadata/PacsAgentNotified")
    assert notified.status_code == 200 and len(notified.text) == 32


@requires_orthanc
@pytest.mark.skipif(not storescu_available(), reason="dcmtk storescu not installed")
def test_cstore_from_a_modality_triggers_webhook(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path)
    storescu([path], port=pacs.dicom_port, calling_aet="MODALITY1")
    [request] = recorder.wait_for(study_uid, timeout=30)
    study_id = pacs.find_study(study_uid)
    assert_valid_webhook(request, study_uid, study_id)
    [instance] = pacs.study_instances(study_uid)
    assert pacs.instance_metadata(instance["ID"])["RemoteAET"] == "MODALITY1"


@requires_orthanc
@pytest.mark.skipif(not storescu_available(), reason="dcmtk storescu not installed")
def test_study_sent_only_by_the_agent_does_not_trigger(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path)
    storescu([path], port=pacs.dicom_port, calling_aet="PACSAGENT")
    pacs.wait_for_instances(study_uid, 1)
    line = wait_for_skip(pacs, study_uid)
    assert "only the agent's own results" in line
    time.sleep(STABLE_AGE + 2)
    assert recorder.for_study(study_uid) == []


@requires_orthanc
@pytest.mark.skipif(not storescu_available(), reason="dcmtk storescu not installed")
def test_agent_results_in_an_analysed_study_do_not_retrigger(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path)
    storescu([path], port=pacs.dicom_port, calling_aet="CR01")
    recorder.wait_for(study_uid, 1)

    # The agent's result comes back into the same study, in a series of its own.
    result, _ = make_dicom(tmp_path, study_uid=study_uid)
    storescu([result], port=pacs.dicom_port, calling_aet="PACSAGENT")
    pacs.wait_for_instances(study_uid, 2)
    line = wait_for_skip(pacs, study_uid)
    assert "no new instances besides the agent's results" in line
    time.sleep(STABLE_AGE + 2)
    assert len(recorder.for_study(study_uid)) == 1

    # A later image from the modality is new work: notified again.
    more, _ = make_dicom(tmp_path, study_uid=study_uid)
    storescu([more], port=pacs.dicom_port, calling_aet="CR01")
    requests = recorder.wait_for(study_uid, 2)
    assert_valid_webhook(requests[1], study_uid, pacs.find_study(study_uid))


@requires_orthanc
def test_results_uploaded_over_rest_are_recognised_by_manufacturer(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path, manufacturer="pacs-agent")
    pacs.upload(path.read_bytes())
    line = wait_for_skip(pacs, study_uid)
    assert "only the agent's own results" in line
    assert recorder.for_study(study_uid) == []


@requires_orthanc
def test_webhook_is_retried_after_5xx_and_can_be_resent(pacs, recorder, tmp_path):
    path, study_uid = make_dicom(tmp_path)
    recorder.plan[study_uid] = [503, 500]
    study_id = pacs.upload(path.read_bytes())["ParentStudy"]
    requests = recorder.wait_for(study_uid, 3, timeout=30)
    assert [r["status"] for r in requests] == [503, 500, 202]
    for request in requests:
        assert_valid_webhook(request, study_uid, study_id)
    pacs.wait_for_log(
        f"notified study {study_id} (StudyInstanceUID {study_uid}, new instances) "
        "after 3 attempt(s)"
    )

    # Admin re-send, regardless of what was already notified.
    answer = pacs.client.post(f"/pacs-agent/studies/{study_id}/notify")
    assert answer.status_code == 200 and answer.json()["queued"] is True
    requests = recorder.wait_for(study_uid, 4, timeout=15)
    assert_valid_webhook(requests[3], study_uid, study_id)
    assert pacs.client.post("/pacs-agent/studies/0000-unknown/notify").status_code == 404


@requires_orthanc
def test_logs_carry_no_patient_data(pacs):
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    plugin_lines = [line for line in pacs.log_text().splitlines() if "pacs-agent" in line]
    assert plugin_lines
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value and not any(value in line for line in plugin_lines)


@requires_orthanc
def test_a_failed_notification_survives_an_orthanc_restart(recorder, tmp_path):
    """The agent is down through every attempt: the notification is kept in Orthanc's global
    property; Orthanc restarts; the agent is back; the notification arrives (no new stable
    event is needed)."""
    args = dict(
        workdir=tmp_path / "orthanc-pending",
        http_port=free_port(),
        dicom_port=free_port(),
        webhook_url=recorder.url,
        webhook_secret=SECRET,
        stable_age=STABLE_AGE,
        plugin_settings={
            "MaxAttempts": 2,
            "BackoffSeconds": 0.2,
            "PendingBackoffSeconds": 60,  # no round of its own before the restart
        },
    )
    path, study_uid = make_dicom(tmp_path)
    recorder.plan[study_uid] = [503] * 2
    server = start_orthanc(**args)
    try:
        study_id = server.upload(path.read_bytes())["ParentStudy"]
        recorder.wait_for(study_uid, 2, timeout=30)
        kept = wait_until(
            lambda: server.get_json("/pacs-agent/pending"), 10, message="nothing kept pending"
        )
        assert set(kept) == {study_id} and kept[study_id]["error"] == "HTTP 503"
        server.wait_for_log(f"webhook for study {study_id} (StudyInstanceUID {study_uid}) kept")
    finally:
        server.stop()
    assert len(recorder.for_study(study_uid)) == 2  # nothing delivered before the restart

    server = start_orthanc(**args)
    try:
        requests = recorder.wait_for(study_uid, 3, timeout=30)
        assert requests[2]["status"] == 202
        assert_valid_webhook(requests[2], study_uid, study_id)
        server.wait_for_log("from the pending list")
        wait_until(lambda: server.get_json("/pacs-agent/pending") == {}, 10)
    finally:
        server.stop()
