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
    r"(?P<mb>[\d.]+) MB\s+(?P<secs>[\d.]+) s\s+(?P<mbs>[\d.]+) MB/s\s+(?P<ips>[\d.]+) inst/s"
    r"(?:  processes (?P<procs>\d+))?$",
    re.MULTILINE,
)
RATIO = re.compile(
    r"^ratio\s+(RG1|CT)\s+x(\d+)\s+agent/storescp (\d+\.\d+)  processes (\d+)$", re.MULTILINE
)
RATIO_ORTHANC = re.compile(
    r"^ratio\s+(RG1|CT)\s+x(\d+)\s+agent/orthanc (\d+\.\d+)  processes (\d+)$", re.MULTILINE
)
CPU = re.compile(
    r"^agent\s+(RG1|CT)\s+x(\d+)\s+CPU (\d+\.\d) ms per instance "
    r"\(user \+ system, all its processes and threads\)  processes (\d+)$",
    re.MULTILINE,
)
PEAK = re.compile(r"^agent peak RSS \(VmHWM\): ([\d.]+) MiB  processes (\d+)$", re.MULTILINE)
PROCS = (1, 2)  # the single-process agent and one receiving in two processes
ROUNDS = {(w, a, p) for w in ("RG1", "CT") for a in (1, 4) for p in PROCS}


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
            "--dicom-processes",
            ",".join(map(str, PROCS)),
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
    keys = {(r["target"], r["workload"], int(r["assoc"]), r["procs"]) for r in rows}
    expected = {(t, w, a, None) for t in targets[:-1] for w in ("RG1", "CT") for a in (1, 4)}
    expected |= {("agent", w, a, str(p)) for w, a, p in ROUNDS}
    assert keys == expected, out
    assert len(rows) == len(expected), out
    for r in rows:
        assert int(r["n"]) == (2 if r["workload"] == "RG1" else 5)
        assert float(r["mbs"]) > 0 and float(r["ips"]) > 0
        if r["workload"] == "RG1":
            assert 14.0 < float(r["mb"]) < 15.0  # 2 x 7.2 MB

    ratios = RATIO.findall(out)
    assert {(w, int(a), int(p)) for w, a, _, p in ratios} == ROUNDS
    assert len(ratios) == len(ROUNDS) and all(float(v) > 0 for _, _, v, _ in ratios)
    orthanc_ratios = RATIO_ORTHANC.findall(out)
    if with_orthanc:
        assert re.search(r"^orthanc: Orthanc \d", out, re.MULTILINE), out
        assert {(w, int(a), int(p)) for w, a, _, p in orthanc_ratios} == ROUNDS
    else:
        assert "orthanc: not measured" in out and orthanc_ratios == []

    cpu = CPU.findall(out)
    assert {(w, int(a), int(p)) for w, a, _, p in cpu} == ROUNDS
    assert all(float(v) > 0 for _, _, v, _ in cpu), cpu  # the agent did work for every round

    peaks = {int(p): float(mib) for mib, p in PEAK.findall(out)}
    assert set(peaks) == set(PROCS), out
    assert all(20 < mib < 4096 for mib in peaks.values()), peaks  # the agent's processes, MiB
    # Two receiving processes: the child's memory is counted too.
    assert peaks[2] > peaks[1] + 20, peaks

    figures = json.loads(out_json.read_text())
    assert len(figures["results"]) == 4 * (len(targets) - 1 + len(PROCS))
    assert figures["agent_peak_rss_kb"] > 0
    assert [a["processes"] for a in figures["agents"]] == list(PROCS)
    agent_rows = [r for r in figures["results"] if r["target"] == "agent"]
    assert {r["processes"] for r in agent_rows} == set(PROCS)
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
