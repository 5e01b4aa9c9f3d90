"""The report-generation adapter learns, loads from local files only, and reaches the SR.

Synthetic proof (the right text is known): tiny radiographs (112 x 112, written with pydicom) with
one bright disc at one of nine positions (upper/middle/lower x left/centre/right), small or large,
and texts such as "bright disc in the upper left, large". A tiny random encoder (ViT, width 64,
2 layers) stays frozen; `pacs-agent adapters train-report` trains the projector and a 2-layer
GPT-2 with random initial weights (built from a config, no download) on the training split. On
the held-out split the trained adapter must state the right position for at least 90% of the
images, where the untrained one is near chance (1/9).

The same path through the real parts (storescu -> agent -> Celery worker -> the SR in Orthanc,
with an untrained adapter) is in tests/test_e2e.py (``_check_generated_text``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.dciodvfy import dciodvfy_errors, requires_dciodvfy
from workers import model_cli
from workers.dicom_out.outputs import OutputOptions, build_output_set
from workers.imaging import decode
from workers.models.bundle import BundleError, load_bundle, write_demo_bundle, write_derived_bundle
from workers.models.runner import ModelRunner
from workers.models.vit import ViTConfig
from workers.report_draft import GENERATED_NOTE, GENERATED_TEXT_KEY
from workers.results import AlgorithmInfo
from workers.training.report import POSITIONS, position_of, synthetic_disc_set

N_IMAGES = 480  # 360 train, 120 held out
SIZE = 112
CHANCE = 1 / len(POSITIONS)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=14
    )
    return write_demo_bundle(tmp_path_factory.mktemp("tiny") / "bundle", seed=3, config=cfg)


@pytest.fixture(scope="module")
def discs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return synthetic_disc_set(tmp_path_factory.mktemp("discs"), N_IMAGES, seed=1, pixels=SIZE)


@pytest.fixture(scope="module")
def trained(
    tiny_bundle: Path, discs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    import torch

    images, texts = discs
    tmp = tmp_path_factory.mktemp("report")
    paths = {"bundle": tmp / "b2", "json": tmp / "report.json", "cache": tmp / "cache"}
    # One intra-op thread: the tiny LM's operations are too small to share, and on the shared
    # 2-core test machine (load 5-7) two threads spent 130 s wall / 80 s CPU where one spent
    # 20 s / 12 s, with the same held-out accuracy (0.992). Restored for the other tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = _train(tiny_bundle, images, texts, paths)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return paths


def _train(bundle: Path, images: Path, texts: Path, paths: dict[str, Path]) -> int:
    return model_cli.main(
        [
            "adapters",
            "train-report",
            "--bundle",
            str(bundle),
            "--data",
            str(images),
            "--texts",
            str(texts),
            "--out",
            str(paths["bundle"]),
            "--cache",
            str(paths["cache"]),
            "--json",
            str(paths["json"]),
            "--trained-on",
            "synthetic bright-disc images",
            "--prefix-grid",
            "4",  # 16 prefix tokens: the 3 x 3 positions stay apart, training is 2-3x faster
            # Held-out position accuracy measured here (same data and seeds): 10 epochs 0.875,
            # 12: 0.983, 15: 0.992, 30: 0.983-0.992. 15 keeps a margin over the 0.9 asserted
            # below at about 60% of the time of 30. (A 64-wide LM at 15 epochs: 0.867.)
            "--epochs",
            "15",
        ]
    )


def _position_accuracy(rows: list[dict[str, str]], column: str) -> float:
    hits = [position_of(r[column]) == position_of(r["reference"]) for r in rows]
    return float(np.mean(hits))


def test_train_report_learns_the_disc_position(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(trained["json"].read_text())
    rows = report["held_out"]
    assert report["n_test"] == len(rows) == N_IMAGES // 4
    assert all(position_of(r["reference"]) in POSITIONS for r in rows)
    untrained = _position_accuracy(rows, "untrained")
    accuracy = _position_accuracy(rows, "trained")
    with capsys.disabled():
        print(
            f"\nheld-out position accuracy: untrained {untrained:.3f}, trained {accuracy:.3f} "
            f"(chance {CHANCE:.3f}, {len(rows)} images); exact match "
            f"{report['exact_match']['untrained']:.3f} -> {report['exact_match']['trained']:.3f}; "
            f"{report['seconds']} s"
        )
    assert accuracy >= 0.9
    assert untrained <= 0.35  # about chance: the untrained adapter does not know
    sizes = np.mean([r["trained"].endswith(r["reference"].split(",")[-1]) for r in rows])
    assert sizes >= 0.8  # small / large too


def test_the_bundle_pins_every_adapter_file_and_refuses_a_changed_one(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    manifest = json.loads((trained["bundle"] / "manifest.json").read_text())
    spec = manifest["adapters"]["report"]
    assert set(spec["files"]) >= {
        "lm/config.json",
        "lm/model.safetensors",
        "tokenizer.json",
        "projector.safetensors",
    }
    assert spec["trained_on"] == "synthetic bright-disc images"
    assert manifest["random_weights"] is True  # the encoder is still the DEMO one
    assert load_bundle(trained["bundle"]).report is not None

    # a derived bundle (e.g. `adapters train` on top) keeps the report adapter, re-pinned
    kept = write_derived_bundle(
        trained["bundle"], tmp_path / "kept", new_adapters={}, updates={}, mode="copy"
    )
    assert load_bundle(kept).report is not None
    tokenizer = kept / "adapters" / "report" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("disc", "dics"))
    with pytest.raises(BundleError, match="checksum mismatch for adapters/report/tokenizer.json"):
        load_bundle(kept)


def test_train_report_refuses_bad_texts_with_the_row(
    tiny_bundle: Path, discs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, texts = discs
    with texts.open() as f:
        rows = list(csv.DictReader(f))[:6]
    cases = {
        "empty.csv": [*rows[:3], {**rows[3], "text": "  "}],
        "unknown.csv": [*rows[:3], {**rows[3], "filename": "nothere.dcm"}],
        "twice.csv": [*rows[:3], rows[0]],
    }
    expected = {
        "empty.csv": "row 5: empty text",
        "unknown.csv": "row 5: no DICOM file",
        "twice.csv": "row 5: image",
    }
    for name, content in cases.items():
        path = tmp_path / name
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["filename", "text", "split"])
            w.writeheader()
            w.writerows(content)
        rc = model_cli.main(
            [
                "adapters",
                "train-report",
                "--bundle",
                str(tiny_bundle),
                "--data",
                str(images),
                "--texts",
                str(path),
                "--out",
                str(tmp_path / f"out-{name}"),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 1 and expected[name] in err, err
        assert not (tmp_path / f"out-{name}" / "manifest.json").exists()


@requires_dciodvfy
def test_worker_runner_writes_the_generated_text_into_the_sr(
    trained: dict[str, Path], discs: tuple[Path, Path]
) -> None:
    """The worker's path from a loaded bundle: ModelRunner.run (as `workers.pipeline` calls it)
    generates the text per image, build_output_set puts it into the SR next to the draft."""
    images, texts = discs
    report = json.loads(trained["json"].read_text())
    rows = report["held_out"][:4]
    bundle = load_bundle(trained["bundle"])
    runner = ModelRunner(bundle, batch_size=4, cam=False)
    sources = [dcmread(images / r["key"]) for r in rows]
    results = runner.run([(str(ds.SOPInstanceUID), decode(ds)) for ds in sources])
    for r, result in zip(rows, results, strict=True):
        text = result.extra[GENERATED_TEXT_KEY]
        assert isinstance(text, str)
        assert position_of(text) == position_of(r["trained"])  # the same adapter as trained
    algorithm = AlgorithmInfo(bundle.name, bundle.version, bundle.checksum, is_demo=True)
    made = build_output_set(
        sources, results, algorithm, 1, OutputOptions(parametric_map=False), triage="routine"
    )
    kind, sr, _ = made.outputs[0]
    assert kind == "sr"
    narratives = [
        item.TextValue
        for item in _walk(sr)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111412"
    ]
    assert len(narratives) == len(rows)
    for n, (text, result) in enumerate(zip(narratives, results, strict=True), start=1):
        assert text.startswith(f"{GENERATED_NOTE} (report adapter, image {n}")
        assert text.endswith(str(result.extra[GENERATED_TEXT_KEY]))
    assert dciodvfy_errors(sr) == []


def _walk(ds):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
