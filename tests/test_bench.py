"""`pacs-agent bench encoder|pipeline` run with tiny settings and print what they promise.
(Timing goals live in docs/benchmarks.md, not here.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers import model_cli
from workers.models.bundle import write_demo_bundle
from workers.models.vit import ViTConfig


def test_bench_encoder_prints_throughput_flops_and_random_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_json = tmp_path / "enc.json"
    rc = model_cli.main(
        [
            "bench",
            "encoder",
            "--models",
            "S",
            "--sizes",
            "56",
            "--batch",
            "1",
            "2",
            "--min-time",
            "0",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    print(out)
    assert "RANDOM weights" in out and "24*N*D^2 + 4*N^2*D" in out
    assert re.search(r"model\s+size\s+batch\s+tokens\s+GFLOP/img\s+img/s\s+ms/img\s+TFLOP/s", out)
    rows = re.findall(r"ViT-S/14\s+56\s+(\d)\s+17\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out)
    assert [r[0] for r in rows] == ["1", "2"]
    gflop = ViTConfig.vit_small(image_size=56).flops_per_image() / 1e9
    assert all(float(r[1]) == pytest.approx(gflop, abs=0.05) and float(r[2]) > 0 for r in rows)
    assert "cpu" in out and "CPU cores" in out  # the machine is named
    assert out_json.is_file()


def test_bench_pipeline_reports_stages_and_the_bound(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112)
    bundle = write_demo_bundle(tmp_path / "tiny", config=cfg)
    rc = model_cli.main(
        ["bench", "pipeline", "--n", "2", "--bundle", str(bundle), "--workers", "1", "--compare"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    print(out)
    for stage in (
        "read",
        "decode",
        "preprocess",
        "encoder+adapters",
        "maps to source",
        "DICOM writers",
    ):
        assert re.search(rf"^{re.escape(stage)}\s+[\d.]+\s+\d+%", out, re.MULTILINE), stage
    assert "RG1_J2KR.dcm" in out and "RANDOM weights" in out
    assert re.search(r"overlapped \(1 decode processes.*\): [\d.]+ images/s", out)
    assert re.search(r"old path \(serial decode.*\): [\d.]+ images/s", out)
    assert re.search(r"bounding stage: \S+", out) and "<- bound" in out
    # the bounded pipeline's high-water marks stay within their bounds
    m = re.search(r"high water: pool (\d+)/(\d+), batch (\d+)/(\d+), writer queue (\d+)/2", out)
    assert m and int(m[1]) <= int(m[2]) and int(m[3]) <= int(m[4]) and int(m[5]) <= 2
    # the last line, exactly as the issue names it
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"pipeline: [\d.]+ img/s, old path [\d.]+ img/s, speedup [\d.]+", last)
