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

    common: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        layerscale_value=0.5,
    )
    model: torch.nn.Module
    if variant == "registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        model = Dinov2Model(Dinov2Config(use_swiglu_ffn=variant == "swiglu", **common))
    _randomize(model, seed=1)
    folder = tmp / f"hf-{variant}"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "crop_size": {"height": 56, "width": 56},
                "do_center_crop": True,
                "size": {"shortest_edge": 56},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5307] * 3,
                "image_std": [0.2583] * 3,
            }
        )
    )
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
        d_fast = max(
            (o_fast.patch_tokens - hidden[:, 1 + n_reg :]).abs().max().item(),
            (o_fast.cls_token - hidden[:, 0]).abs().max().item(),
        )
        print(
            f"{variant} {h}x{w}: max |diff| cls {d_cls:.2e} patches {d_patch:.2e} "
            f"attention {d_attn:.2e} sdpa-path {d_fast:.2e}"
        )
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
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        num_register_tokens=2,
    )
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
def test_tampered_file_is_rejected_before_loading(demo_dir: Path, tmp_path: Path, rel: str) -> None:
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
            # each finding at its own activation peak, on the segmented region
            assert r.masks.any(axis=0)[int(row), int(col)]
        assert len({f.point for f in r.findings}) > 1  # not all stacked on one point
    # batching does not change results; bfloat16 autocast stays close
    single = ModelRunner(bundle, batch_size=1).run(images[1:])[0]
    assert np.allclose(
        [f.probability for f in single.findings],
        [f.probability for f in results[1].findings],
        atol=1e-4,
    )
    bf16 = ModelRunner(bundle, dtype="bfloat16").run(images[:1])[0]
    assert bf16.masks.shape == results[0].masks.shape and np.isfinite(bf16.heatmap).all()
    diff = max(
        abs(a.probability - b.probability)
        for a, b in zip(bf16.findings, results[0].findings, strict=True)
    )
    print(f"bfloat16 vs float32 max probability difference {diff:.3f}")
    assert diff < 0.2


# --------------------------------------------------------------------------------------------
# original DINOv2 layout (backbone_compatible.safetensors)


def hf_file_to_original(folder: Path) -> dict[str, torch.Tensor]:
    """The DINOv2 code's state dict from a transformers checkpoint file, written here from the
    two documented layouts (not with the code under test): q, k, v rows fused into `qkv`."""
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "mask_token": sd["embeddings.mask_token"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    for i in sorted(layers):
        hf, dn = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dn}attn.qkv.{p}"] = torch.cat(
                [sd[f"{hf}attention.attention.{n}.{p}"] for n in ("query", "key", "value")]
            )
            out[f"{dn}attn.proj.{p}"] = sd[f"{hf}attention.output.dense.{p}"]
            out[f"{dn}norm1.{p}"] = sd[f"{hf}norm1.{p}"]
            out[f"{dn}norm2.{p}"] = sd[f"{hf}norm2.{p}"]
            if f"{hf}mlp.weights_in.{p}" in sd:
                out[f"{dn}mlp.w12.{p}"] = sd[f"{hf}mlp.weights_in.{p}"]
                out[f"{dn}mlp.w3.{p}"] = sd[f"{hf}mlp.weights_out.{p}"]
            else:
                out[f"{dn}mlp.fc1.{p}"] = sd[f"{hf}mlp.fc1.{p}"]
                out[f"{dn}mlp.fc2.{p}"] = sd[f"{hf}mlp.fc2.{p}"]
        out[f"{dn}ls1.gamma"] = sd[f"{hf}layer_scale1.lambda1"]
        out[f"{dn}ls2.gamma"] = sd[f"{hf}layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("variant", ["plain", "swiglu", "registers"])
def test_original_layout_parity(tmp_path: Path, variant: str) -> None:
    from dataclasses import replace

    from safetensors.torch import save_file
    from transformers import AutoModel

    from workers.models.dinov2_loader import load_dinov2_original

    folder = _hf_folder(tmp_path, variant)
    orig = tmp_path / "orig"
    orig.mkdir()
    save_file(hf_file_to_original(folder), str(orig / "backbone_compatible.safetensors"))
    via_hf, cfg_hf, _ = load_hf_dinov2(folder)
    ours, cfg = load_dinov2_original(orig, num_heads=4)
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.image_size,
        cfg.num_register_tokens,
        cfg.use_swiglu_ffn,
    ) == (
        cfg_hf.hidden_size,
        cfg_hf.num_hidden_layers,
        cfg_hf.num_attention_heads,
        cfg_hf.image_size,
        cfg_hf.num_register_tokens,
        cfg_hf.use_swiglu_ffn,
    )
    ref = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    n_reg = cfg.num_register_tokens
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(x, output_attentions=True), via_hf(x, output_attentions=True)
        hidden = ref(pixel_values=x).last_hidden_state
    # identical to the same weights loaded from the transformers layout, and to transformers
    assert torch.equal(a.cls_token, b.cls_token) and torch.equal(a.patch_tokens, b.patch_tokens)
    assert a.last_attention is not None and b.last_attention is not None
    assert torch.equal(a.last_attention, b.last_attention)
    assert (a.patch_tokens - hidden[:, 1 + n_reg :]).abs().max().item() < TOL
    # off the native grid the original code interpolates position embeddings by a scale factor
    # with a 0.1 offset (no registers) or by size with antialiasing (registers, as transformers)
    y = torch.randn(1, 3, 70, 42)
    with torch.no_grad():
        hf_y = ref(pixel_values=y).last_hidden_state[:, 1 + n_reg :]
        by_size = DinoViT(replace(cfg, interpolate_offset=0.0)).eval()
        by_size.load_state_dict(ours.state_dict())
        assert (by_size(y).patch_tokens - hf_y).abs().max().item() < TOL
        if n_reg:
            assert cfg.interpolate_offset == 0.0 and cfg.interpolate_antialias
        else:
            assert cfg.interpolate_offset == 0.1
            assert torch.isfinite(ours(y).patch_tokens).all()


def test_original_layout_training_checkpoint_keys(tmp_path: Path) -> None:
    """teacher.backbone. prefix, FSDP block chunks, no LayerScale, no mask token, DINO heads."""

    from workers.models.dinov2_loader import Dinov2LoadError, load_dinov2_original

    folder = _hf_folder(tmp_path, "plain")
    sd = hf_file_to_original(folder)
    ref, _ = load_dinov2_original(_saved(tmp_path / "a.safetensors", sd), num_heads=4)
    ckpt = {}
    for k, v in sd.items():
        if k.endswith(("ls1.gamma", "ls2.gamma")) or k == "mask_token":
            continue
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]  # chunked: blocks.<chunk>.<i>.
        ckpt["teacher.backbone." + k] = v
    ckpt["teacher.dino_head.mlp.0.weight"] = torch.zeros(4, 4)
    model, cfg = load_dinov2_original(_saved(tmp_path / "b.safetensors", ckpt), num_heads=4)
    no_ls = {
        k: (torch.ones_like(v) if k.endswith("gamma") else v) for k, v in ref.state_dict().items()
    }
    expected = DinoViT(cfg).eval()
    expected.load_state_dict(no_ls)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x).patch_tokens, expected(x).patch_tokens)
    bad = dict(sd)
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(Dinov2LoadError, match="unexpected"):
        load_dinov2_original(_saved(tmp_path / "c.safetensors", bad), num_heads=4)
    del ckpt


def _saved(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_flops_formula() -> None:
    cfg = ViTConfig.vit_base(image_size=518)
    n, d = 37 * 37 + 1, 768
    expected = 12 * (24 * n * d * d + 4 * n * n * d) + 2 * (37 * 37) * 3 * 14 * 14 * d
    assert cfg.flops_per_image() == pytest.approx(expected)
    assert 300e9 < cfg.flops_per_image() < 306e9  # "ViT-B/14 at 518 px: about 303 GFLOP"


# --------------------------------------------------------------------------------------------
# heatmaps, QC


def test_class_activation_maps_average_to_the_logit() -> None:
    from workers.models.adapters import attention_maps, class_activation_maps

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=42)
    model = DinoViT(cfg).eval()
    init_weights(model, torch.Generator().manual_seed(0))
    head = ClassificationHead(32, 3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 42, 56), output_attentions=True)
        cam = class_activation_maps(head, out.cls_token, out.patch_tokens, out.grid)
        logits = head(out.cls_token, out.patch_tokens)
    assert cam.shape == (2, 3, 3, 4)
    assert torch.allclose(cam.mean(dim=(2, 3)), logits, atol=1e-5)
    assert out.last_attention is not None
    per_head = attention_maps(out.last_attention, out.grid)
    assert per_head.shape == (2, 2, 3, 4)
    assert torch.allclose(per_head.mean(1), cls_attention_map(out.last_attention, out.grid))


def test_runner_cam_qc_and_head_maps(demo_dir: Path) -> None:
    from workers.models.qc import QC_LABELS, qc_refusal

    bundle = load_bundle(demo_dir)
    assert set(bundle.qc_heads) == {"view", "body_part"}
    img = np.random.default_rng(1).random((300, 200)).astype(np.float32)
    runner = ModelRunner(bundle, head_maps=True)
    r = runner.run([("1.2.3", img)])[0]
    cam = r.extra["cam"]
    assert isinstance(cam, dict) and list(cam) == bundle.labels
    for m in cam.values():
        assert m.shape == (300, 200) and np.isfinite(m).all()
    heads = r.extra["attention_heads"]
    assert isinstance(heads, np.ndarray)
    assert heads.shape == (bundle.encoder_config.num_attention_heads, 300, 200)
    qc = r.extra["qc"]
    assert isinstance(qc, dict)
    view, p_view = qc["view"]
    assert view in QC_LABELS["view"] and 0.0 < p_view < 0.5  # demo QC heads: near-uniform
    assert qc["body_part"][0] in QC_LABELS["body_part"]
    assert qc_refusal(r, bundle.intended) is None  # the demo never refuses
    # run_prepared on prepared inputs gives the same results as run
    again = next(runner.run_prepared([runner.prepare("1.2.3", img)]))
    assert again.findings == r.findings


def test_qc_refusal_reasons() -> None:
    from workers.models.qc import qc_refusal
    from workers.results import ImageResult

    def result(view: tuple[str, float], part: tuple[str, float]) -> ImageResult:
        z = np.zeros((4, 4), np.float32)
        return ImageResult(
            "1.2",
            [],
            np.zeros((0, 4, 4), bool),
            [],
            z,
            z,
            extra={"qc": {"view": view, "body_part": part}},
        )

    chest_pa = {"anatomy": "chest", "views": ["PA", "AP"]}
    assert qc_refusal(result(("PA", 0.9), ("CHEST", 0.95)), chest_pa) is None
    reason = qc_refusal(result(("LATERAL", 0.8), ("CHEST", 0.9)), chest_pa)
    assert reason is not None and "LATERAL" in reason and "PA/AP" in reason
    reason = qc_refusal(result(("PA", 0.6), ("EXTREMITY", 0.97)), chest_pa)
    assert reason is not None and "EXTREMITY" in reason and "chest" in reason
    assert qc_refusal(result(("LATERAL", 0.4), ("EXTREMITY", 0.3)), chest_pa) is None  # unsure
    assert qc_refusal(result(("LATERAL", 0.9), ("CHEST", 0.9)), {}) is None  # nothing intended
