"""Run dicom3tools' ``dciodvfy`` on a Dataset, encoded bytes or a file.

    from tests.dciodvfy import dciodvfy_errors
    assert dciodvfy_errors(ds) == []

``dciodvfy`` (Debian package dicom3tools) writes its findings as lines starting with "Error",
"Warning" or the IOD name. When it is not installed, the helpers skip the calling test.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

DCIODVFY = shutil.which("dciodvfy")

requires_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) missing")


def run_dciodvfy(obj: Dataset | bytes | str | os.PathLike[str]) -> list[str]:
    """All output lines of ``dciodvfy`` for ``obj`` (a Dataset is written as a Part 10 file)."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    if isinstance(obj, str | os.PathLike):
        return _run(Path(obj))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, obj, enforce_file_format=True)
            path.write_bytes(buffer.getvalue())
        return _run(path)


def _run(path: Path) -> list[str]:
    assert DCIODVFY is not None
    done = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [line.rstrip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def dciodvfy_errors(obj: Dataset | bytes | str | os.PathLike[str]) -> list[str]:
    """Lines of ``dciodvfy`` output that start with "Error"."""
    return [line for line in run_dciodvfy(obj) if line.startswith("Error")]


def dciodvfy_warnings(obj: Dataset | bytes | str | os.PathLike[str]) -> list[str]:
    """Lines of ``dciodvfy`` output that start with "Warning"."""
    return [line for line in run_dciodvfy(obj) if line.startswith("Warning")]


def split_findings(lines: list[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) from the lines of one run."""
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )
