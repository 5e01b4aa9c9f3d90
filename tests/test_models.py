"""Encoder parity with transformers' Dinov2, checkpoint loading, bundles and the runner."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.imaging import Preprocessing
from workers.models.adapters import ClassificationHead, LinearSegHead, cls_attention_map
from workers.models.bundle import BundleError, load_bundle, write_demo_bundle
from workers.models.hf_loader import HFLoadError, load_hf_dinov2, save_hf_layout
from workers.models.runner import ModelRunner
from workers.models.vit import DinoViT, ViTConfig, init_weights

TOL = 1e-4

# --------------------------------------------------------------------------------------------
# parity with transformers


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and distinct, so that any mis-mapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _hf_folder(tmp: Path, variant: str) -> Path:
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56, patch_size=14, layerscale_value=0.5)
    model: torch.nn.Module
    if variant == "registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                   **common))
    else:
        model = Dinov2Model(Dinov2Config(use_swiglu_ffn=variant == "swiglu", **common))
    _randomize(model, seed=1)
    folder = tmp / f"hf-{variant}"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor",
        "crop_size": {"height": 56, "width": 56}, "do_center_crop": True,
        "size": {"shortest_edge": 56}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3,
    }))
    return folder


@pytest.mark.parametrize("variant", ["plain", "swiglu", "registers"])
def test_parity_with_transformers(tmp_path: Path, variant: str) -> None:
    from transformers import AutoModel

    folder = _hf_folder(tmp_path, variant)
    ours, cfg, pre = load_hf_dinov2(folder)
    assert pre == Preprocessing(size=56, mean=(0.5307,) * 3, std=(0.2583,) * 3)
    ref = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    n_reg = cfg.num_register_tokens
    g = torch.Generator().manual_seed(2)
    # native grid; non-square grid (interpolated position embeddings); size not a patch multiple
    for h, w in ((56, 56), (70, 42), (60, 45)):
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            r = ref(pixel_values=x, output_attentions=True)
            o = ours(x, output_attentions=True)
            o_fast = ours(x)  # scaled_dot_product_attention path
        hidden = r.last_hidden_state
        assert o.grid == (h // 14, w // 14)
        assert o.last_attention is not None and o_fast.last_attention is None
        d_cls = (o.cls_token - hidden[:, 0]).abs().max().item()
        d_patch = (o.patch_tokens - hidden[:, 1 + n_reg :]).abs().max().item()
        d_attn = (o.last_attention - r.attentions[-1]).abs().max().item()
        d_fast = max((o_fast.patch_tokens - hidden[:, 1 + n_reg :]).abs().max().item(),
                     (o_fast.cls_token - hidden[:, 0]).abs().max().item())
        print(f"{variant} {h}x{w}: max |diff| cls {d_cls:.2e} patches {d_patch:.2e} "
              f"attention {d_attn:.2e} sdpa-path {d_fast:.2e}")
        assert max(d_cls, d_patch, d_attn, d_fast) < TOL
        if n_reg:
            assert o.register_tokens is not None
            assert (o.register_tokens - hidden[:, 1 : 1 + n_reg]).abs().max().item() < TOL


def test_save_hf_layout_round_trips_through_transformers(tmp_path: Path) -> None:
    from transformers import Dinov2Model

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    model = DinoViT(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    pre = Preprocessing(size=28, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    save_hf_layout(model, cfg, tmp_path / "enc", pre)
    ref = Dinov2Model.from_pretrained(tmp_path / "enc").eval()  # transformers reads it
    again, cfg2, pre2 = load_hf_dinov2(tmp_path / "enc")
    assert cfg2 == cfg and pre2 == pre
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a, b = model.eval()(x), again(x)
        hf = ref(pixel_values=x).last_hidden_state
    assert torch.equal(a.patch_tokens, b.patch_tokens)
    assert (a.patch_tokens - hf[:, 1:]).abs().max().item() < TOL


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "preprocessor_config.json"]
)
def test_hf_loader_names_missing_file(tmp_path: Path, missing: str) -> None:
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    pre = Preprocessing(size=28, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    save_hf_layout(DinoViT(cfg), cfg, tmp_path, pre)
    (tmp_path / missing).unlink()
    with pytest.raises(HFLoadError, match=missing.replace(".", r"\.")):
        load_hf_dinov2(tmp_path)


# --------------------------------------------------------------------------------------------
# adapters


def test_adapters_shapes_and_attention_map() -> None:
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                    num_register_tokens=2)
    model = DinoViT(cfg).eval()
    init_weights(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 42, 56), output_attentions=True)
    assert out.grid == (3, 4) and out.patch_tokens.shape == (3, 12, 32)
    assert ClassificationHead(32, 5)(out.cls_token, out.patch_tokens).shape == (3, 5)
    assert LinearSegHead(32, 2)(out.patch_tokens, out.grid).shape == (3, 2, 3, 4)
    assert out.last_attention is not None
    amap = cls_attention_map(out.last_attention, out.grid, out.n_prefix_tokens)
    assert amap.shape == (3, 3, 4)
    expected = out.last_attention[1, :, 0, 3 + 4 * 1 + 2].mean()  # row 1, col 2
    assert torch.isclose(amap[1, 1, 2], expected)


# --------------------------------------------------------------------------------------------
# bundles


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo", seed=0)


def test_demo_bundle_loads(demo_dir: Path) -> None:
    b = load_bundle(demo_dir)
    assert "DEMO (random weights)" in b.name and b.is_demo
    assert b.checksum == hashlib.sha256((demo_dir / "manifest.json").read_bytes()).hexdigest()
    assert b.labels and len(b.thresholds) == len(b.labels) and b.seg_classes
    assert b.preprocessing.size == 224 and b.encoder_config.hidden_size == 384
    assert b.classifier is not None and b.segmenter is not None
    assert load_bundle(demo_dir / "manifest.json").checksum == b.checksum


def test_demo_bundle_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    again = write_demo_bundle(tmp_path / "again", seed=0)
    assert (again / "manifest.json").read_bytes() == (demo_dir / "manifest.json").read_bytes()


@pytest.mark.parametrize(
    "rel", ["encoder/model.safetensors", "encoder/config.json", "adapters/segmenter.safetensors"]
)
def test_tampered_file_is_rejected_before_loading(demo_dir: Path, tmp_path: Path,
                                                  rel: str) -> None:
    copy = Path(shutil.copytree(demo_dir, tmp_path / "b"))
    target = copy / rel
    data = bytearray(target.read_bytes())
    data[:8] = b"\xff" * 8  # also breaks the file's header: only the checksum check names it
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"checksum mismatch for {rel}"):
        load_bundle(copy)


@pytest.mark.parametrize("rel", ["encoder/config.json", "adapters/classifier.safetensors"])
def test_missing_file_is_named(demo_dir: Path, tmp_path: Path, rel: str) -> None:
    copy = Path(shutil.copytree(demo_dir, tmp_path / "b"))
    (copy / rel).unlink()
    with pytest.raises(BundleError, match=f"missing file {rel}"):
        load_bundle(copy)


def test_path_escaping_the_bundle_is_rejected(demo_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(demo_dir, tmp_path / "b"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["adapters"]["classifier"]["path"] = "../elsewhere.safetensors"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="leaves the folder"):
        load_bundle(copy)


# --------------------------------------------------------------------------------------------
# runner


def test_runner_results_in_source_geometry(demo_dir: Path) -> None:
    bundle = load_bundle(demo_dir)
    rng = np.random.default_rng(0)
    shapes = [(300, 500), (640, 360)]
    images = [(f"1.2.3.{i}", rng.random(s).astype(np.float32)) for i, s in enumerate(shapes)]
    results = ModelRunner(bundle).run(images)
    assert [r.source_sop_instance_uid for r in results] == ["1.2.3.0", "1.2.3.1"]
    for (_, img), r in zip(images, results, strict=True):
        rows, cols = img.shape
        assert r.masks.shape == (len(bundle.seg_classes), rows, cols) and r.masks.dtype == bool
        assert 0.0 < r.masks.mean() < 1.0  # the demo heads give non-trivial masks
        assert r.heatmap.shape == (rows, cols) and np.isfinite(r.heatmap).all()
        assert r.heatmap.min() == 0.0 and r.heatmap.max() == 1.0
        assert np.array_equal(r.display, img)
        assert r.segment_labels == bundle.seg_classes
        assert [f.label for f in r.findings] == bundle.labels
        for f in r.findings:
            assert 0.0 <= f.probability <= 1.0 and np.isfinite(f.probability)
            assert f.source_sop_instance_uid == r.source_sop_instance_uid
            assert f.point is not None
            col, row = f.point
            assert 0 <= col < cols and 0 <= row < rows
            assert r.heatmap[int(row), int(col)] == 1.0
    # batching does not change results; bfloat16 autocast stays close
    single = ModelRunner(bundle, batch_size=1).run(images[1:])[0]
    assert np.allclose([f.probability for f in single.findings],
                       [f.probability for f in results[1].findings], atol=1e-4)
    bf16 = ModelRunner(bundle, dtype="bfloat16").run(images[:1])[0]
    assert bf16.masks.shape == results[0].masks.shape and np.isfinite(bf16.heatmap).all()
    diff = max(abs(a.probability - b.probability)
               for a, b in zip(bf16.findings, results[0].findings, strict=True))
    print(f"bfloat16 vs float32 max probability difference {diff:.3f}")
    assert diff < 0.2
