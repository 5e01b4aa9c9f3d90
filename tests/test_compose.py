"""docker-compose.yml describes the production layout and is accepted by `docker-compose config`
(there is no Docker engine on the test machine; config validates without one)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

SECRETS = {"PACS_AGENT_WEBHOOK_SECRET": "s", "POSTGRES_PASSWORD": "p", "PACS_AGENT_API_TOKEN": "t"}


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (make system-deps installs it)")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [exe, "config"], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_compose_layout_is_valid() -> None:
    res = _config(SECRETS)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    services = cfg["services"]
    assert {"orthanc", "redis", "postgres", "migrate", "agent", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["pacs-agent", "db", "upgrade"]
    assert services["agent"]["command"] == ["pacs-agent", "serve"]
    assert services["worker"]["command"] == ["pacs-agent", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["agent"]["environment"]["PACS_AGENT_ENVIRONMENT"] == "production"


def test_compose_refuses_missing_secret() -> None:
    env = dict(SECRETS)
    del env["PACS_AGENT_WEBHOOK_SECRET"]
    res = _config(env)
    assert res.returncode != 0
    assert "PACS_AGENT_WEBHOOK_SECRET" in res.stderr
