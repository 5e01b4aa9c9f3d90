"""The fast encoder path (issue 12, the worker's encoder side): same function as transformers'
`Dinov2Model` with the same weights, the `bench encoder --compare-transformers` last line, and the
per-device runtime settings (bfloat16 autocast + TF32 on CUDA, float32 on a CPU).

No GPU here: the CUDA branch of the settings is resolved and applied on a CPU-only torch (it only
needs `torch.device("cuda")` and the global TF32 flags); timing goals are in docs/benchmarks.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from pacs_agent.settings import Settings
from workers import model_cli
from workers.models.hf_loader import load_hf_dinov2
from workers.models.runner import (
    ModelRunner,
    RuntimeOptions,
    apply_runtime,
    compile_encoder,
    resolve_runtime,
)
from workers.models.vit import DinoViT, FusedAttention, LayerScale


def _hf_model(swiglu: bool) -> Any:
    """transformers' Dinov2Model (SDPA), every parameter random and distinct (LayerNorm weights
    and LayerScale around 1, biases non-zero), so that a wrong fold or fusion shows."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        layerscale_value=0.5,
        use_swiglu_ffn=swiglu,
        attn_implementation="sdpa",  # type: ignore[call-arg]
    )
    model = Dinov2Model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_fused_encoder_equals_transformers_dinov2_with_the_same_weights(
    tmp_path: Path, swiglu: bool
) -> None:
    hf = _hf_model(swiglu)
    hf.save_pretrained(tmp_path / "enc")
    ours, _cfg, _ = load_hf_dinov2(tmp_path / "enc", with_preprocessing=False)  # strict=True
    fused = ours.fused_for_inference()
    # really fused: one QKV projection per block, no LayerScale left; the original untouched
    assert all(isinstance(b.attn, FusedAttention) for b in fused.blocks)
    assert not any(isinstance(m, LayerScale) for m in fused.modules())
    assert any(isinstance(m, LayerScale) for m in ours.modules()) and not ours.fused
    assert fused.fused_for_inference() is fused

    g = torch.Generator().manual_seed(5)
    # native size, and a non-square one (position embeddings interpolated, then cached)
    for shape in ((3, 3, 56, 56), (2, 3, 70, 42)):
        x = torch.randn(shape, generator=g)
        with torch.inference_mode():
            ref = hf(pixel_values=x).last_hidden_state
            a = ours(x, output_attentions=True)
            for _ in range(2):  # the second call takes the cached position embeddings
                b = fused(x, output_attentions=True)
                assert b.last_attention is not None and a.last_attention is not None
                torch.testing.assert_close(b.cls_token, ref[:, 0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(b.patch_tokens, ref[:, 1:], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(b.last_attention, a.last_attention, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.patch_tokens, ref[:, 1:], atol=1e-4, rtol=1e-4)
        assert b.patch_tokens.dtype == torch.float32
    assert len(fused._pos_cache) == 2  # one entry per input grid
    # outside inference mode nothing is cached (a cached inference tensor cannot join autograd)
    fused._pos_cache.clear()
    with torch.no_grad():
        fused(torch.randn(1, 3, 70, 42, generator=g))
    assert fused._pos_cache == {}


def test_bench_encoder_compare_transformers_ends_with_the_ratio_line(
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
            "28",
            "--batch",
            "1",
            "--min-time",
            "0",
            "--rounds",
            "3",
            "--threads",
            "1",
            "--compare-transformers",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    print("\n".join(lines))
    assert "dtype float32" in lines[0] and "torch.compile: off" in lines[1]
    m = re.fullmatch(
        r"encoder: ours ([\d.]+) img/s, transformers ([\d.]+) img/s, ratio ([\d.]+)", lines[-1]
    )
    assert m, lines[-1]
    ours, theirs, ratio = (float(v) for v in m.groups())
    assert ours > 0 and theirs > 0
    assert ratio == pytest.approx(ours / theirs, rel=0.02, abs=0.01)
    row = re.search(r"ViT-S/14\s+28\s+1\s+5\s+.*\s([\d.e+-]+)$", lines[-2])
    assert row and float(row.group(1)) < 1e-3  # both models computed the same function
    import json

    saved = json.loads(out_json.read_text())
    assert saved[0]["ratio"] == pytest.approx(ratio, abs=0.01)
    assert saved[0]["transformers_images_per_s"] > 0


# ------------------------------------------------------------------------------------ settings


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """apply_runtime sets process-wide flags: put them back for the other tests."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_runtime_resolves_per_device() -> None:
    cpu = resolve_runtime("cpu", "auto")
    assert cpu == RuntimeOptions("cpu", "float32", tf32=False, compile="off", pin_memory=False)
    cuda = resolve_runtime("cuda", "auto")
    assert cuda == RuntimeOptions("cuda", "bfloat16", tf32=True, compile="off", pin_memory=True)
    assert resolve_runtime("cuda:1", "float32", tf32=False).dtype == "float32"
    assert resolve_runtime("cuda:1", "float32", tf32=False).tf32 is False
    assert resolve_runtime("cpu", "bfloat16").dtype == "bfloat16"  # asked for, not a default
    assert resolve_runtime("cpu", "auto", tf32=True).tf32 is False  # TF32 is CUDA only
    assert resolve_runtime("cpu", compile="max-autotune").compile == "max-autotune"
    if not torch.cuda.is_available():
        assert resolve_runtime("auto", "auto").dtype == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_runtime("cpu", "float64")
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_runtime("cpu", compile="fast")


def test_tf32_switches_on_for_cuda_only(tf32_flags: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    apply_runtime(resolve_runtime("cpu", "auto"))
    assert torch.backends.cuda.matmul.allow_tf32 is False
    apply_runtime(resolve_runtime("cuda", "auto"))
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True
    apply_runtime(resolve_runtime("cuda", "auto", tf32=False))
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORKER_DTYPE", "WORKER_TF32", "TORCH_COMPILE", "WORKER_BATCH_SIZE"):
        monkeypatch.delenv(f"PACS_AGENT_{k}", raising=False)
    s = Settings()
    assert (s.worker_dtype, s.worker_tf32, s.torch_compile) == ("auto", True, "off")
    assert s.worker_batch_size >= 1
    for raw, mode in (("true", "default"), ("1", "default"), ("false", "off"), ("", "off")):
        monkeypatch.setenv("PACS_AGENT_TORCH_COMPILE", raw)
        assert Settings().torch_compile == mode
    monkeypatch.setenv("PACS_AGENT_TORCH_COMPILE", "max-autotune")
    assert Settings().torch_compile == "max-autotune"
    monkeypatch.setenv("PACS_AGENT_TORCH_COMPILE", "turbo")
    with pytest.raises(ValidationError, match="torch_compile"):
        Settings()
    monkeypatch.delenv("PACS_AGENT_TORCH_COMPILE")
    monkeypatch.setenv("PACS_AGENT_WORKER_DTYPE", "float16")
    with pytest.raises(ValidationError, match="worker_dtype"):
        Settings()
    monkeypatch.setenv("PACS_AGENT_WORKER_BATCH_SIZE", "0")
    monkeypatch.delenv("PACS_AGENT_WORKER_DTYPE")
    with pytest.raises(ValidationError, match="worker_batch_size"):
        Settings()


def test_cpu_runner_stays_float32_and_runs_the_fused_copy(demo_bundle: Path) -> None:
    from workers.models.bundle import load_bundle

    bundle = load_bundle(demo_bundle)
    runner = ModelRunner(bundle)  # dtype "auto"
    assert runner.options.dtype == "float32" and runner.dtype == "float32"
    assert not runner.options.pin_memory and runner._autocast().__class__.__name__ == (
        "nullcontext"
    )
    encoder: Any = runner.encoder
    assert isinstance(encoder, DinoViT) and encoder.fused
    assert isinstance(bundle.encoder, DinoViT) and not bundle.encoder.fused  # bundle untouched
    size = bundle.preprocessing.size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = runner.encode(x)
    with torch.inference_mode():
        ref = bundle.encoder(x)
    assert out.patch_tokens.dtype == torch.float32
    torch.testing.assert_close(out.patch_tokens, ref.patch_tokens, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelRunner(bundle, dtype="int8")


def test_compile_setting_wraps_the_encoder_lazily() -> None:
    """torch.compile itself is not run here (inductor on 2 shared cores takes minutes): the
    setting wraps the module, "off" leaves it alone."""
    from workers.models.vit import ViTConfig

    model = DinoViT(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    )
    import torch._inductor.config as inductor_config

    saved = inductor_config.freezing
    try:
        assert compile_encoder(model, "off") is model
        wrapped = compile_encoder(model, "default")
        assert wrapped is not model and getattr(wrapped, "_orig_mod", None) is model
        assert inductor_config.freezing is True  # weights as constants: prepacked, folded
    finally:
        inductor_config.freezing = saved
