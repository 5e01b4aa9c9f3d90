"""`pacs-agent models import|verify|embed`: bundles from checkpoint folders in both layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO
from tests.test_models import _hf_folder, hf_file_to_original
from tests.test_training import write_dicom
from workers import model_cli
from workers.models.bundle import load_bundle, sha256_file

RAD_DINO_MEAN = 0.5307
RAD_DINO_STD = 0.2583


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A transformers-layout folder (with a RAD-DINO-style preprocessor_config.json) and the same
    weights in the original DINOv2 layout, with config.json beside them (as RAD-DINO ships)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    hf = _hf_folder(tmp, "registers")
    orig = tmp / "original"
    orig.mkdir()
    save_file(hf_file_to_original(hf), str(orig / "backbone_compatible.safetensors"))
    shutil.copy(hf / "config.json", orig / "config.json")  # gives the number of heads
    shutil.copy(hf / "preprocessor_config.json", orig / "preprocessor_config.json")
    return {"hf": hf, "original": orig}


def _heads(tmp: Path, dim: int = 64) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    files = {
        "classifier": {
            "linear.weight": torch.randn(2, 2 * dim, generator=g),
            "linear.bias": torch.zeros(2),
        },
        "segmenter": {"weight": torch.randn(1, dim, generator=g), "bias": torch.zeros(1)},
        "view": {
            "linear.weight": torch.randn(3, 2 * dim, generator=g),
            "linear.bias": torch.zeros(3),
        },
    }
    out = {}
    for name, tensors in files.items():
        out[name] = tmp / f"{name}.safetensors"
        save_file(tensors, str(out[name]))
    return out


def test_import_both_layouts_give_the_same_encoder(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heads = _heads(tmp_path)
    for layout in ("hf", "original"):
        rc = model_cli.main(
            [
                "models",
                "import",
                str(checkpoints[layout]),
                "--out",
                str(tmp_path / layout),
                "--classifier",
                str(heads["classifier"]),
                "--labels",
                "Effusion,Nodule",
                "--thresholds",
                "0.4",
                "0.6",
                "--segmenter",
                str(heads["segmenter"]),
                "--classes",
                "Lung",
                "--view-head",
                str(heads["view"]),
                "--anatomy",
                "chest",
                "--views",
                "PA",
                "AP",
                "--name",
                "test import",
            ]
        )
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "bundle written to" in out
    a, b = load_bundle(tmp_path / "hf"), load_bundle(tmp_path / "original")
    assert a.encoder_format == "hf-dinov2" and b.encoder_format == "dinov2-original"
    assert b.encoder_config.num_attention_heads == 4 and b.encoder_config.num_register_tokens == 4
    # preprocessing from preprocessor_config.json (RAD-DINO's own mean/std), for both layouts
    for bundle in (a, b):
        assert bundle.preprocessing.size == 56
        assert bundle.preprocessing.mean == pytest.approx((RAD_DINO_MEAN,) * 3)
        assert bundle.preprocessing.std == pytest.approx((RAD_DINO_STD,) * 3)
        assert bundle.labels == ["Effusion", "Nodule"] and bundle.thresholds == [0.4, 0.6]
        assert bundle.seg_classes == ["Lung"] and set(bundle.qc_heads) == {"view"}
        assert bundle.intended == {"anatomy": "chest", "views": ["PA", "AP"]}
    # every file has its sha256 in the manifest
    manifest = json.loads((tmp_path / "original" / "manifest.json").read_text())
    enc = manifest["encoder"]
    assert enc["weights"] == "backbone_compatible.safetensors"
    for rel, digest in enc["files"].items():
        assert sha256_file(tmp_path / "original" / "encoder" / rel) == digest
    for spec in manifest["adapters"].values():
        assert sha256_file(tmp_path / "original" / spec["path"]) == spec["sha256"]
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(a.encoder(x).patch_tokens, b.encoder(x).patch_tokens)


def test_import_refuses_mismatched_adapter(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heads = _heads(tmp_path, dim=32)  # wrong width for this encoder
    rc = model_cli.main(
        [
            "models",
            "import",
            str(checkpoints["hf"]),
            "--out",
            str(tmp_path / "b"),
            "--classifier",
            str(heads["classifier"]),
            "--labels",
            "A",
            "B",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "classifier.safetensors" in err and "does not fit" in err


def test_verify_names_the_bad_file(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    assert (
        model_cli.main(
            ["models", "import", str(checkpoints["original"]), "--out", str(out), "--link"]
        )
        == 0
    )
    assert model_cli.main(["models", "verify", str(out)]) == 0
    assert "bundle OK" in capsys.readouterr().out
    copy = Path(shutil.copytree(out, tmp_path / "tampered"))
    target = copy / "encoder" / "backbone_compatible.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.unlink()  # a hard link: write a new file, leave the original alone
    target.write_bytes(bytes(data))
    assert model_cli.main(["models", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch for encoder/backbone_compatible.safetensors" in err
    (copy / "encoder" / "preprocessor_config.json").unlink()
    shutil.copy(out / "encoder" / "backbone_compatible.safetensors", target)
    assert model_cli.main(["models", "verify", str(copy)]) == 1
    assert "missing file encoder/preprocessor_config.json" in capsys.readouterr().err


def test_embed_writes_tokens_grid_and_uids(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "b"
    assert model_cli.main(["models", "import", str(checkpoints["hf"]), "--out", str(bundle)]) == 0
    rng = np.random.default_rng(0)
    files, uids = [], []
    for i, shape in enumerate([(80, 60), (64, 100)]):
        f = tmp_path / f"{i}.dcm"
        uids.append(
            write_dicom(
                f,
                rng.integers(0, 4000, shape),
                sex="F",
                age=50,
                manufacturer="A",
                view="PA",
                patient=f"P{i}",
            )
        )
        files.append(str(f))
    out = tmp_path / "emb.npz"
    assert model_cli.main(["models", "embed", str(bundle), *files, "--out", str(out)]) == 0
    assert "embedded 2 images" in capsys.readouterr().out
    z = np.load(out)
    assert z["cls"].shape == (2, 64) and z["patch_tokens"].shape == (2, 16, 64)
    assert tuple(z["grid"]) == (4, 4) and list(z["sop_uids"]) == uids
    assert str(z["bundle_sha256"]) == load_bundle(bundle).checksum
    assert np.isfinite(z["patch_tokens"]).all()


def test_pacs_agent_cli_hands_models_commands_over(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The real entry point: `pacs-agent models import` then `verify`, as processes."""
    out = tmp_path / "b"
    for args in (
        ["models", "import", str(checkpoints["original"]), "--out", str(out)],
        ["models", "verify", str(out)],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "pacs_agent.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    assert "bundle OK" in res.stdout


def test_import_converts_a_pth_training_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A DINOv2 training checkpoint (`teacher.backbone.` keys, pickle format, read with
    weights_only=True) becomes a safetensors file in the bundle with the same encoder."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoints["original"] / "backbone_compatible.safetensors"))
    src = tmp_path / "ckpt"
    src.mkdir()
    torch.save(
        {"teacher": {f"teacher.backbone.{k}": v for k, v in tensors.items()}},
        src / "teacher_checkpoint.pth",
    )
    shutil.copy(checkpoints["original"] / "config.json", src / "config.json")
    out = tmp_path / "b"
    assert (
        model_cli.main(
            [
                "models",
                "import",
                str(src),
                "--out",
                str(out),
                "--size",
                "56",
                "--mean",
                "0.5",
                "--std",
                "0.25",
            ]
        )
        == 0
    )
    b = load_bundle(out)
    assert (out / "encoder" / "teacher_checkpoint.safetensors").is_file()
    assert not list((out / "encoder").glob("*.pth"))
    ref = load_bundle(_import(checkpoints["original"], tmp_path / "ref"))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(b.encoder(x).cls_token, ref.encoder(x).cls_token)
    assert b.preprocessing.mean == (0.5, 0.5, 0.5)


def _import(src: Path, out: Path) -> Path:
    assert model_cli.main(["models", "import", str(src), "--out", str(out)]) == 0
    return out
