"""Run a real Orthanc (Debian packages orthanc, orthanc-dicomweb, orthanc-python) for tests.

The configuration is derived from the production ``orthanc/orthanc.json`` (so the tests exercise
it), with ports, storage, plugin paths, peers, StableAge and the pacs-agent plugin section
overridden. The webhook secret reaches the plugin through the environment, as in production.

    with start_orthanc(tmp_path, http_port=free_port(), dicom_port=free_port(),
                       webhook_url=url, webhook_secret="s") as pacs:
        pacs.upload(Path(file).read_bytes())
        pacs.study_instances(study_uid)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
ORTHANC_CONFIG = REPO_ROOT / "orthanc" / "orthanc.json"
PLUGIN_SCRIPT = REPO_ROOT / "orthanc" / "plugin.py"

ORTHANC_BINARY = os.environ.get("PACS_AGENT_TEST_ORTHANC", "/usr/sbin/Orthanc")
PLUGIN_DIR = Path(os.environ.get("PACS_AGENT_TEST_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins"))
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments outside JSON strings (the dialect Orthanc accepts)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment in JSON")
            out.append(" ")
            i = j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_json_with_comments(path: Path) -> dict[str, Any]:
    return json.loads(strip_json_comments(Path(path).read_text(encoding="utf-8")))


def orthanc_available() -> str | None:
    """None when a real Orthanc with both plugins can run here, else the reason it cannot."""
    if not Path(ORTHANC_BINARY).is_file():
        return f"{ORTHANC_BINARY} not found (Debian package orthanc)"
    for plugin in (DICOMWEB_PLUGIN, PYTHON_PLUGIN):
        if not plugin.is_file():
            return f"{plugin} not found (Debian packages orthanc-dicomweb, orthanc-python)"
    return None


def build_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    webhook_url: str | None = None,
    stable_age: int = 2,
    python_plugin: bool = True,
    ignore_ae_titles: list[str] | None = None,
    plugin_settings: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The production configuration with everything environment-specific replaced."""
    cfg = copy.deepcopy(load_json_with_comments(ORTHANC_CONFIG))
    storage = workdir / "storage"
    cfg.update(
        {
            "Name": f"test-{aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": aet,
            "DicomPort": int(dicom_port),
            "HttpPort": int(http_port),
            # Tests listen on loopback only; Orthanc has no bind address option.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": int(stable_age),
            "DicomModalities": {
                name: [peer_aet, host, int(port)]
                for name, (peer_aet, host, port) in (modalities or {}).items()
            },
            "Plugins": [str(DICOMWEB_PLUGIN)] + ([str(PYTHON_PLUGIN)] if python_plugin else []),
            "DicomScpTimeout": 10,
        }
    )
    if python_plugin:
        cfg["PythonScript"] = str(PLUGIN_SCRIPT)
        section = dict(cfg.get("PacsAgent") or {})
        section.update(
            {
                "WebhookUrl": webhook_url or "",
                "Enabled": webhook_url is not None,
                "TimeoutSeconds": 5,
            }
        )
        if ignore_ae_titles is not None:
            section["IgnoreAeTitles"] = list(ignore_ae_titles)
        section.update(plugin_settings or {})
        cfg["PacsAgent"] = section
    else:
        cfg.pop("PythonScript", None)
        cfg.pop("PythonVerbose", None)
    cfg.update(copy.deepcopy(extra_config or {}))
    return cfg


class OrthancServer:
    """A running Orthanc subprocess. Also a context manager that stops it on exit."""

    def __init__(
        self,
        *,
        workdir: Path,
        process: subprocess.Popen[bytes],
        http_port: int,
        dicom_port: int,
        aet: str,
        config_path: Path,
        log_path: Path,
    ) -> None:
        self.workdir = workdir
        self.process = process
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.aet = aet
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{http_port}"
        self.config_path = config_path
        self.log_path = log_path
        self.client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)

    # lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Orthanc and wait for it (kill after ``timeout``). Idempotent."""
        try:
            self.client.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until ``needle`` appears in the log; return the first line holding it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{needle!r} not in the Orthanc log after {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    # REST helpers ---------------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def post_json(self, path: str, payload: Any) -> Any:
        response = self.client.post(path, content=json.dumps(payload))
        response.raise_for_status()
        return response.json()

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def plugins(self) -> list[str]:
        return self.get_json("/plugins")

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        """Store one DICOM file via POST /instances; returns Orthanc's answer (ID, ParentStudy)."""
        response = self.client.post(
            "/instances", content=dicom_bytes, headers={"Content-Type": "application/dicom"}
        )
        response.raise_for_status()
        return response.json()

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc id of a study, or None."""
        response = self.client.post("/tools/lookup", content=study_instance_uid)
        response.raise_for_status()
        for hit in response.json():
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study, as Orthanc's expanded instance dicts (ID, MainDicomTags)."""
        return self.post_json(
            "/tools/find",
            {
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_instance_uid},
                "Expand": True,
            },
        )

    def instance_metadata(self, orthanc_instance_id: str) -> dict[str, str]:
        return self.get_json(f"/instances/{orthanc_instance_id}/metadata?expand")

    def get_instance_file(self, orthanc_instance_id: str) -> bytes:
        response = self.client.get(f"/instances/{orthanc_instance_id}/file")
        response.raise_for_status()
        return response.content

    def wait_for_instances(
        self, study_instance_uid: str, count: int, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until the study holds at least ``count`` instances."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.study_instances(study_instance_uid)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"study {study_instance_uid} has {len(found)} of {count} instances "
                    f"after {timeout} s"
                )
            time.sleep(0.2)


def start_orthanc(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    stable_age: int = 2,
    python_plugin: bool = True,
    ignore_ae_titles: list[str] | None = None,
    plugin_settings: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    startup_timeout: float = 30.0,
    auth: tuple[str, str] | None = None,
) -> OrthancServer:
    """Start a real Orthanc and wait until its REST API answers.

    ``modalities``: name -> (AET, host, port) of the peers Orthanc may send to.
    ``webhook_url`` None loads the pacs-agent plugin with its webhook disabled (Orthanc as a
    plain PACS); ``python_plugin=False`` does not load the Python plugin at all.
    ``webhook_secret`` goes to the plugin through PACS_AGENT_WEBHOOK_SECRET, as in production.
    ``extra_config`` is merged last, at the top level of the configuration.
    ``auth``: a registered (user, password) for the helper's own REST calls, when
    ``extra_config`` turns authentication on.
    """
    reason = orthanc_available()
    if reason:
        raise RuntimeError(f"cannot start Orthanc: {reason}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = build_config(
        workdir,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        modalities=modalities,
        webhook_url=webhook_url,
        stable_age=stable_age,
        python_plugin=python_plugin,
        ignore_ae_titles=ignore_ae_titles,
        plugin_settings=plugin_settings,
        extra_config=extra_config,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    log_path = workdir / "orthanc.log"

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    if webhook_secret is not None:
        env["PACS_AGENT_WEBHOOK_SECRET"] = webhook_secret

    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [ORTHANC_BINARY, str(config_path)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = OrthancServer(
        workdir=workdir,
        process=process,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        config_path=config_path,
        log_path=log_path,
    )
    if auth is not None:
        server.client.auth = httpx.BasicAuth(*auth)
    deadline = time.monotonic() + startup_timeout
    last_error: Exception | None = None
    while True:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(
                f"Orthanc exited with status {process.returncode} during startup; log tail:\n"
                f"{server.log_tail()}"
            )
        try:
            server.system()
            return server
        except (httpx.HTTPError, ValueError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            server.stop()
            raise RuntimeError(
                f"Orthanc did not answer GET /system within {startup_timeout} s "
                f"({last_error!r}); log tail:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def storescu_available() -> bool:
    return shutil.which("storescu") is not None


def storescu(
    files: list[Path],
    *,
    port: int,
    calling_aet: str,
    called_aet: str = "ORTHANC",
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu; raises CalledProcessError on failure."""
    return subprocess.run(
        ["storescu", "-aet", calling_aet, "-aec", called_aet, host, str(port), *map(str, files)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
