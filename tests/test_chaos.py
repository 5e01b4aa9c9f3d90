"""`pacs-agent bench chaos`: nothing lost, duplicated or stuck while the parts are SIGKILLed.

The small run starts the real parts (Debian's Orthanc, redis-server, a fresh PostgreSQL
database, `pacs-agent serve`, two `pacs-agent worker` processes), sends 20 synthetic studies with
dcmtk's storescu and kills each part at least once. Nothing is mocked. It is sized to take at most
about 2 minutes on a 2-core machine when nothing is stuck (a short job heartbeat timeout, so that
a killed worker's job comes back within seconds); --wait bounds a failing run.

The counting itself is checked on hand-made inputs first, so that a zero from the run means
something: each kind of loss, duplicate and stuck study is found.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_agent.bench_chaos import (
    PER_IMAGE_KINDS,
    OrthancOutput,
    count,
    kill_schedule,
    make_studies,
    output_kind,
    referenced_uids,
)

REPO = Path(__file__).resolve().parents[1]
STUDY, SRC1, SRC2 = "1.2.3", "1.2.3.1", "1.2.3.2"


def _complete_outputs() -> list[OrthancOutput]:
    outs = [OrthancOutput("o-sr", STUDY, "9.0", "sr", {SRC1, SRC2})]
    for i, src in enumerate((SRC1, SRC2)):
        for j, kind in enumerate(PER_IMAGE_KINDS):
            outs.append(OrthancOutput(f"o{i}{j}", STUDY, f"9.{i + 1}.{j}", kind, {src}))
    return outs


def test_count_is_zero_for_a_complete_study() -> None:
    c = count({STUDY: {SRC1, SRC2}}, {STUDY: "done"}, {SRC1, SRC2}, _complete_outputs())
    assert (c.lost, c.duplicated, c.stuck) == ([], [], [])


def test_count_finds_a_missing_output_and_a_missing_instance() -> None:
    outs = [o for o in _complete_outputs() if not (o.kind == "pm" and o.refs == {SRC2})]
    c = count({STUDY: {SRC1, SRC2}}, {STUDY: "done"}, {SRC1}, outs)
    assert len(c.lost) == 2, c.lost
    assert any("instance 1.2.3.2 not in the agent's database" in x for x in c.lost)
    assert any("no pm output in Orthanc for source 1.2.3.2" in x for x in c.lost)
    assert c.problem_studies == {STUDY}


def test_count_finds_duplicates_by_uid_by_kind_and_unattributed() -> None:
    outs = _complete_outputs()
    outs.append(OrthancOutput("again", STUDY, "9.0", "sr", {SRC1, SRC2}))  # same SOP UID twice
    outs.append(OrthancOutput("v2", STUDY, "8.1", "sc", {SRC1}))  # a second heatmap of SRC1
    outs.append(OrthancOutput("x", STUDY, "8.2", "seg", {SRC1, SRC2}))  # names no single source
    c = count({STUDY: {SRC1, SRC2}}, {STUDY: "done"}, {SRC1, SRC2}, outs)
    assert len(c.duplicated) == 4, c.duplicated  # UID 9.0 twice, 2 SRs, 2 SCs of SRC1, the SEG
    assert c.lost == []


def test_count_finds_stuck_studies_and_spares_skipped_ones() -> None:
    other = "1.2.4"
    c = count(
        {STUDY: {SRC1}, other: {"1.2.4.1"}},
        {STUDY: "queued", other: "skipped"},
        {SRC1, "1.2.4.1"},
        [],
    )
    assert c.stuck == ["study 1.2.3: queued"]
    assert c.lost == []  # a stuck study's outputs are not counted twice; skipped expects none


def test_output_kinds_and_references(tmp_path: Path) -> None:
    from pydicom import dcmread

    assert output_kind("1.2.840.10008.5.1.4.1.1.88.34") == "sr"
    assert output_kind("1.2.840.10008.5.1.4.1.1.66.4") == "seg"
    assert output_kind("1.2.840.10008.5.1.4.1.1.7") == "sc"
    assert output_kind("1.2.840.10008.5.1.4.1.1.7.4") == "sc"
    assert output_kind("1.2.840.10008.5.1.4.1.1.30") == "pm"
    assert output_kind("1.2.840.10008.5.1.4.1.1.1") == "other"
    plans = make_studies(5, tmp_path, seed=7)
    again = make_studies(5, tmp_path / "again", seed=7)
    assert [p.study_uid for p in plans] == [p.study_uid for p in again]  # seeded
    sops = [sop for p in plans for sop, _ in p.files]
    assert len(set(sops)) == len(sops) and all(1 <= len(p.files) <= 3 for p in plans)
    ds = dcmread(plans[0].files[0][1])
    assert ds.SOPClassUID.name in (
        "Computed Radiography Image Storage",
        "Digital X-Ray Image Storage - For Presentation",
    )
    assert referenced_uids(ds) == set()


def test_kill_schedule_kills_every_part() -> None:
    import random

    s = kill_schedule(random.Random(3), 4, 2.0, 60.0)
    assert [t for t, _ in s] == sorted(t for t, _ in s)
    assert {t.split("-")[0] for _, t in s} == {"agent", "worker", "redis", "orthanc"}


def test_chaos_run_loses_nothing(postgres_server: str, tmp_path: Path) -> None:
    """20 studies, 4 SIGKILLs (agent, a worker, Redis, Orthanc): lost, duplicated, stuck all 0."""
    for exe in ("/usr/sbin/Orthanc", "/usr/bin/storescu", "/usr/bin/redis-server"):
        if not Path(exe).exists():
            pytest.fail(f"{exe} is missing (make system-deps installs it)")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_agent.cli",
            "bench",
            "chaos",
            "--studies",
            "20",
            "--kills",
            "4",
            "--seed",
            "1",
            "--quiet-period",
            "5",
            "--kill-tail",
            "15",
            "--wait",
            "90",
            # A killed worker's job comes back after the heartbeat timeout: the product's 60 s
            # would be most of the run's wall time; 15 s (heartbeats every 3.75 s) shows the same.
            "--heartbeat-timeout",
            "15",
            "--postgres-admin-url",
            postgres_server,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    lines = r.stdout.strip().splitlines()
    assert lines, r.stderr[-3000:]
    m = re.fullmatch(
        r"chaos: 20 studies, (\d+) kills, lost (\d+), duplicated (\d+), stuck (\d+)", lines[-1]
    )
    assert m, r.stdout[-3000:] + r.stderr[-3000:]
    assert int(m[1]) == 4
    assert (m[2], m[3], m[4]) == ("0", "0", "0"), r.stdout[-6000:]
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(line.startswith("recovery") for line in lines)
    assert any(line.startswith("wall time: ") for line in lines)
