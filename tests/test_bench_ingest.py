"""`pacs-agent bench ingest` as a user runs it, with tiny settings: a real agent process, a real
storescp, storescu senders; the printed figures are checked for shape, not for speed (timing
goals live in docs/benchmarks.md). Orthanc, the durable peer, is measured when Debian's Orthanc is
installed (as it is where the Orthanc tests run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from pacs_agent.bench_ingest import ORTHANC_BINARY
from tests.conftest import REPO

LINE = re.compile(
    r"^(?P<target>storescp|orthanc|agent)\s+(?P<workload>RG1|CT)\s+x(?P<assoc>\d+)\s+"
    r"(?P<n>\d+) inst\s+"
    r"(?P<mb>[\d.]+) MB\s+(?P<secs>[\d.]+) s\s+(?P<mbs>[\d.]+) MB/s\s+(?P<ips>[\d.]+) inst/s$",
    re.MULTILINE,
)
RATIO = re.compile(r"^ratio\s+(RG1|CT)\s+x(\d+)\s+agent/storescp (\d+\.\d+)$", re.MULTILINE)
RATIO_ORTHANC = re.compile(r"^ratio\s+(RG1|CT)\s+x(\d+)\s+agent/orthanc (\d+\.\d+)$", re.MULTILINE)
CPU = re.compile(
    r"^agent\s+(RG1|CT)\s+x(\d+)\s+CPU (\d+\.\d) ms per instance "
    r"\(user \+ system, all its threads\)$",
    re.MULTILINE,
)
PEAK = re.compile(r"^agent peak RSS \(VmHWM\): ([\d.]+) MiB$", re.MULTILINE)


def test_bench_ingest_prints_throughput_ratio_and_peak_rss(tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_agent.cli",
            "bench",
            "ingest",
            "--n-rg1",
            "2",
            "--n-ct",
            "5",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out_json),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"^machine: \d+ CPU cores, .+; Python .+; dcmtk", out, re.MULTILINE), out

    with_orthanc = Path(ORTHANC_BINARY).is_file()
    targets = ("storescp", "orthanc", "agent") if with_orthanc else ("storescp", "agent")
    rows = [m.groupdict() for m in LINE.finditer(out)]
    keys = {(r["target"], r["workload"], int(r["assoc"])) for r in rows}
    assert keys == {(t, w, a) for t in targets for w in ("RG1", "CT") for a in (1, 4)}, out
    for r in rows:
        assert int(r["n"]) == (2 if r["workload"] == "RG1" else 5)
        assert float(r["mbs"]) > 0 and float(r["ips"]) > 0
        if r["workload"] == "RG1":
            assert 14.0 < float(r["mb"]) < 15.0  # 2 x 7.2 MB

    ratios = RATIO.findall(out)
    assert {(w, int(a)) for w, a, _ in ratios} == {(w, a) for w in ("RG1", "CT") for a in (1, 4)}
    assert all(float(v) > 0 for _, _, v in ratios)
    orthanc_ratios = RATIO_ORTHANC.findall(out)
    if with_orthanc:
        assert re.search(r"^orthanc: Orthanc \d", out, re.MULTILINE), out
        assert {(w, int(a)) for w, a, _ in orthanc_ratios} == {
            (w, a) for w in ("RG1", "CT") for a in (1, 4)
        }
    else:
        assert "orthanc: not measured" in out and orthanc_ratios == []

    cpu = CPU.findall(out)
    assert {(w, int(a)) for w, a, _ in cpu} == {(w, a) for w in ("RG1", "CT") for a in (1, 4)}
    assert all(float(v) > 0 for _, _, v in cpu), cpu  # the agent did work for every round

    [peak] = PEAK.findall(out)
    assert 20 < float(peak) < 4096, peak  # the agent process itself, in MiB

    figures = json.loads(out_json.read_text())
    assert len(figures["results"]) == 4 * len(targets)
    assert figures["agent_peak_rss_kb"] > 0
    agent_rows = [r for r in figures["results"] if r["target"] == "agent"]
    assert all(r["cpu_ms_per_instance"] > 0 for r in agent_rows), agent_rows
    # Nothing left running: the agent and storescp were stopped.
    assert _processes_mentioning(str(tmp_path / "work")) == []


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment names ``text`` (the bench's work dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(proc.name))
    return found
