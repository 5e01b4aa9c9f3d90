"""Load and save DINOv2 encoders in the original DINOv2 code's state-dict layout.

The layout of `facebookresearch/dinov2` checkpoints and of RAD-DINO's
`backbone_compatible.safetensors`::

    cls_token [1, 1, D]   pos_embed [1, 1 + G*G, D]   mask_token [1, D]   register_tokens [1, R, D]
    patch_embed.proj.{weight,bias}
    blocks.N.norm1.*  blocks.N.attn.qkv.{weight,bias} [3D, D]  blocks.N.attn.proj.*
    blocks.N.ls1.gamma  blocks.N.norm2.*  blocks.N.mlp.fc1/fc2.*  (SwiGLU: mlp.w12 / mlp.w3)
    blocks.N.ls2.gamma  norm.{weight,bias}

Also accepted: FSDP block chunks (`blocks.C.N.`, N global), the `backbone.`, `teacher.backbone.`
and `module.` prefixes of training checkpoints, and checkpoints without LayerScale (`init_values`
None: the gammas are then exactly 1) or without a mask token. Everything else is mapped by an
explicit table and loaded with `strict=True`.

Shapes give every dimension but the number of attention heads; DINOv2 uses 64 channels per head
(ViT-S/B/L/g: 6/12/16/24 heads), the default here. Pass `num_heads`, or keep a transformers
`config.json` beside the weights (RAD-DINO ships both), when a model differs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workers.models.vit import DinoViT, ViTConfig

log = logging.getLogger(__name__)

__all__ = [
    "DINOV2_WEIGHT_NAMES",
    "Dinov2LoadError",
    "dinov2_key_map",
    "find_dinov2_weights",
    "infer_dinov2_config",
    "load_dinov2_original",
    "map_dinov2_state_dict",
    "normalize_dinov2_keys",
    "read_dinov2_tensors",
    "save_dinov2_original",
    "to_dinov2_state_dict",
]

# Conventional file names, most specific first.
DINOV2_WEIGHT_NAMES = (
    "backbone_compatible.safetensors",
    "backbone.safetensors",
    "teacher_checkpoint.safetensors",
)
HEAD_DIM = 64
_BACKBONE_PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.")
_CHUNK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class Dinov2LoadError(ValueError):
    """The weights are not a loadable original-layout DINOv2 checkpoint; says which and why."""


def dinov2_key_map(cfg: ViTConfig) -> dict[str, str]:
    """Explicit table: original DINOv2 key -> `DinoViT` key (q, k, v are split from `qkv`
    separately, see `map_dinov2_state_dict`)."""
    m: dict[str, str] = {
        "cls_token": "cls_token",
        "mask_token": "mask_token",
        "pos_embed": "pos_embed",
        "patch_embed.proj.weight": "patch_embed.weight",
        "patch_embed.proj.bias": "patch_embed.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    if cfg.num_register_tokens > 0:
        m["register_tokens"] = "register_tokens"
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}."
        for p in ("weight", "bias"):
            m[f"{b}norm1.{p}"] = f"{b}norm1.{p}"
            m[f"{b}norm2.{p}"] = f"{b}norm2.{p}"
            m[f"{b}attn.proj.{p}"] = f"{b}attn.proj.{p}"
            if cfg.use_swiglu_ffn:
                m[f"{b}mlp.w12.{p}"] = f"{b}mlp.weights_in.{p}"
                m[f"{b}mlp.w3.{p}"] = f"{b}mlp.weights_out.{p}"
            else:
                m[f"{b}mlp.fc1.{p}"] = f"{b}mlp.fc1.{p}"
                m[f"{b}mlp.fc2.{p}"] = f"{b}mlp.fc2.{p}"
        m[f"{b}ls1.gamma"] = f"{b}ls1.gamma"
        m[f"{b}ls2.gamma"] = f"{b}ls2.gamma"
    return m


def normalize_dinov2_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the backbone of a training checkpoint (the teacher's when both are there), strip
    its prefix and `module.`, flatten FSDP block chunks, drop projection heads."""
    stripped = {
        (k[len("module.") :] if k.startswith("module.") else k): v for k, v in tensors.items()
    }
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in stripped):
            stripped = {k[len(prefix) :]: v for k, v in stripped.items() if k.startswith(prefix)}
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        key = _CHUNK.sub(r"blocks.\2.", key)
        if key.startswith(("head.", "dino_head.", "ibot_head.")):
            continue  # projection heads, not the backbone
        if key in out:
            raise Dinov2LoadError(f"duplicate key {key} after removing prefixes")
        out[key] = value
    return out


def infer_dinov2_config(
    tensors: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
) -> ViTConfig:
    """A `ViTConfig` from the shapes of an original-layout state dict (keys normalised).

    Interpolation defaults follow the DINOv2 hub models: without registers, scale factor with a
    0.1 offset and no antialiasing; with registers, by size with antialiasing.
    """
    try:
        patch_w = tensors["patch_embed.proj.weight"]
        pos = tensors["pos_embed"]
    except KeyError as exc:
        raise Dinov2LoadError(f"not an original DINOv2 state dict: no {exc.args[0]}") from exc
    if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        raise Dinov2LoadError(f"patch_embed.proj.weight has shape {tuple(patch_w.shape)}")
    dim, channels, patch = int(patch_w.shape[0]), int(patch_w.shape[1]), int(patch_w.shape[2])
    n_pos = int(pos.shape[1]) - 1
    side = int(round(n_pos**0.5))
    if side * side != n_pos:
        raise Dinov2LoadError(f"pos_embed holds {n_pos} patch positions: not a square grid")
    layers = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise Dinov2LoadError(f"block indices are not 0..N-1: {layers[:5]}...")
    swiglu = "blocks.0.mlp.w12.weight" in tensors
    if swiglu:
        mlp_hidden = int(tensors["blocks.0.mlp.w3.weight"].shape[1])
        mlp_ratio = _swiglu_ratio(dim, mlp_hidden)
    else:
        if "blocks.0.mlp.fc1.weight" not in tensors:
            raise Dinov2LoadError("blocks.0.mlp has neither fc1/fc2 nor w12/w3 weights")
        mlp_hidden = int(tensors["blocks.0.mlp.fc1.weight"].shape[0])
        mlp_ratio = mlp_hidden / dim
    heads = num_heads if num_heads is not None else max(1, dim // HEAD_DIM)
    registers = int(tensors["register_tokens"].shape[1]) if "register_tokens" in tensors else 0
    has_ls = "blocks.0.ls1.gamma" in tensors
    try:
        cfg = ViTConfig(
            hidden_size=dim,
            num_hidden_layers=len(layers),
            num_attention_heads=heads,
            image_size=side * patch,
            mlp_ratio=mlp_ratio,
            patch_size=patch,
            layer_norm_eps=layer_norm_eps,
            layerscale_value=1.0,
            num_register_tokens=registers,
            use_swiglu_ffn=swiglu,
            qkv_bias="blocks.0.attn.qkv.bias" in tensors,
            num_channels=channels,
            interpolate_antialias=(
                registers > 0 if interpolate_antialias is None else interpolate_antialias
            ),
            interpolate_offset=(
                (0.0 if registers > 0 else 0.1)
                if interpolate_offset is None
                else interpolate_offset
            ),
        )
    except ValueError as exc:
        raise Dinov2LoadError(str(exc)) from exc
    if cfg.mlp_hidden != mlp_hidden:
        raise Dinov2LoadError(f"cannot express this MLP width (ratio {mlp_ratio})")
    log.debug("inferred DINOv2 config %s (LayerScale %s)", cfg, has_ls)
    return cfg


def _swiglu_ratio(dim: int, hidden: int) -> float:
    """The mlp_ratio whose DINOv2 SwiGLU width rounds to `hidden` (4.0 for every hub model)."""
    for ratio in (4.0, 8 / 3, 2.0, 3.0, 6.0, 8.0):
        h = int(dim * ratio)
        if (int(h * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise Dinov2LoadError(f"SwiGLU width {hidden} for dim {dim} matches no known mlp_ratio")


def map_dinov2_state_dict(
    tensors: dict[str, torch.Tensor], cfg: ViTConfig, *, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Original-layout tensors -> `DinoViT` state dict, exactly: unknown or missing keys raise.
    `qkv` is split into q, k, v (rows in that order); absent LayerScale gammas become ones and an
    absent mask token zeros (neither changes inference)."""
    tensors = normalize_dinov2_keys(tensors)
    table = dinov2_key_map(cfg)
    d = cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}."
        for p in ("weight", "bias"):
            key = f"{b}attn.qkv.{p}"
            if key not in tensors:
                continue
            qkv = tensors[key]
            if qkv.shape[0] != 3 * d:
                raise Dinov2LoadError(
                    f"{source}: {key} has shape {tuple(qkv.shape)}, expected [{3 * d}, ...]"
                )
            q_part, k_part, v_part = qkv.chunk(3, dim=0)
            out[f"{b}attn.q.{p}"] = q_part
            out[f"{b}attn.k.{p}"] = k_part
            out[f"{b}attn.v.{p}"] = v_part
            seen.add(key)
        if f"{b}attn.qkv.weight" not in tensors:
            raise Dinov2LoadError(f"{source}: missing {b}attn.qkv.weight")
        for ls in ("ls1.gamma", "ls2.gamma"):
            if f"{b}{ls}" not in tensors:
                tensors = {**tensors, f"{b}{ls}": torch.ones(d)}
    if "mask_token" not in tensors:
        tensors = {**tensors, "mask_token": torch.zeros(1, d)}
    rest = {k: v for k, v in tensors.items() if k not in seen}
    unexpected = sorted(set(rest) - set(table))
    missing = sorted(set(table) - set(rest))
    if unexpected or missing:
        raise Dinov2LoadError(
            f"{source} does not match the encoder configuration: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in rest.items():
        out[table[key]] = tensor
    return {key: tensor.to(torch.float32) for key, tensor in out.items()}


def find_dinov2_weights(folder: Path) -> Path:
    """The original-layout weights file in `folder` (a conventional name, else the only
    `.safetensors` file that is not the transformers `model.safetensors`)."""
    for name in DINOV2_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.glob("*.safetensors") if p.name != "model.safetensors")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise Dinov2LoadError(f"no original-layout DINOv2 .safetensors file in {folder}")
    raise Dinov2LoadError(
        f"several .safetensors files in {folder}: {[c.name for c in candidates]}; name one"
    )


def read_dinov2_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.pth`/`.pt` read with `weights_only=True`
    (no code from the file runs); a training checkpoint's `teacher`/`model` entry is unwrapped."""
    if not path.is_file():
        raise Dinov2LoadError(f"missing file {path.name} in {path.parent}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / torch raise many kinds
        raise Dinov2LoadError(f"{path.name}: cannot read: {exc}") from exc
    for key in ("teacher", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Dinov2LoadError(f"{path.name}: not a state dict of tensors")
    return obj


def load_dinov2_original(
    path: str | os.PathLike[str],
    cfg: ViTConfig | None = None,
    *,
    num_heads: int | None = None,
) -> tuple[DinoViT, ViTConfig]:
    """Load original-layout weights (a file, or a folder holding one) into `DinoViT` (eval mode,
    float32, strict=True). `cfg` pins the configuration (a bundle's manifest does); otherwise it
    is inferred from the shapes and `num_heads`."""
    p = Path(path)
    file = find_dinov2_weights(p) if p.is_dir() else p
    tensors = normalize_dinov2_keys(read_dinov2_tensors(file))
    if cfg is None:
        cfg = infer_dinov2_config(tensors, num_heads=num_heads)
    model = DinoViT(cfg)
    try:
        model.load_state_dict(map_dinov2_state_dict(tensors, cfg, source=file.name), strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise Dinov2LoadError(f"{file.name}: {exc}") from exc
    model.eval()
    log.info(
        "loaded original-layout DINOv2 encoder %s: dim %d, %d layers, %d heads, %d registers",
        file.name,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_register_tokens,
    )
    return model, cfg


def to_dinov2_state_dict(model: DinoViT) -> dict[str, torch.Tensor]:
    """`DinoViT` -> original-layout tensors (q, k, v fused into `qkv`)."""
    cfg = model.cfg
    inverse = {dst: src for src, dst in dinov2_key_map(cfg).items()}
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        b = f"blocks.{i}."
        for p in ("weight", "bias"):
            parts = [state.pop(f"{b}attn.{n}.{p}", None) for n in ("q", "k", "v")]
            if all(t is not None for t in parts):
                out[f"{b}attn.qkv.{p}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    for k, v in state.items():
        out[inverse[k]] = v
    return {k: v.contiguous() for k, v in out.items()}


def save_dinov2_original(model: DinoViT, path: str | os.PathLike[str]) -> Path:
    """Write `model` as an original-layout `.safetensors` file (tests, conversions)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_dinov2_state_dict(model), str(p), metadata={"format": "pt"})
    return p
