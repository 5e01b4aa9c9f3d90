"""Load and save DINOv2 encoders in the Hugging Face transformers `Dinov2Model` folder layout.

The layout RAD-DINO is published in: `config.json`, `model.safetensors`,
`preprocessor_config.json`. Weights are read from local files only, mapped by an explicit
key table, and loaded with `strict=True`. Also accepts `Dinov2WithRegistersModel` folders, and
the renamed attention/SwiGLU keys that newer transformers versions use in memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.imaging import Preprocessing
from workers.models.files import atomic_save_safetensors, atomic_write
from workers.models.vit import DinoViT, ViTConfig

log = logging.getLogger(__name__)

__all__ = [
    "HFLoadError",
    "Preprocessing",
    "config_from_hf",
    "config_to_hf",
    "hf_key_map",
    "load_hf_dinov2",
    "read_preprocessing",
    "save_hf_layout",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class HFLoadError(ValueError):
    """The folder is not a loadable Dinov2 checkpoint; the message names the file and reason."""


# --------------------------------------------------------------------------------------------
# config


def config_from_hf(data: dict[str, Any]) -> ViTConfig:
    """transformers `Dinov2Config` dict -> `ViTConfig`; rejects variants this encoder lacks."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFLoadError(
            f"{CONFIG_FILE}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        )
    act = data.get("hidden_act", "gelu")
    if act != "gelu":
        raise HFLoadError(f"{CONFIG_FILE}: hidden_act {act!r} is not supported (only 'gelu')")
    if "head_dim" in data and data["head_dim"] is not None:
        if int(data["head_dim"]) * int(data["num_attention_heads"]) != int(data["hidden_size"]):
            raise HFLoadError(f"{CONFIG_FILE}: head_dim * heads != hidden_size is not supported")
    image_size = data.get("image_size", 518)
    patch_size = data.get("patch_size", 14)
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise HFLoadError(f"{CONFIG_FILE}: non-square image_size {image_size}")
        image_size = image_size[0]
    if isinstance(patch_size, list | tuple):
        if len(set(patch_size)) != 1:
            raise HFLoadError(f"{CONFIG_FILE}: non-square patch_size {patch_size}")
        patch_size = patch_size[0]
    registers = int(data.get("num_register_tokens", 0) or 0)
    try:
        return ViTConfig(
            hidden_size=int(data["hidden_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=int(data["num_attention_heads"]),
            image_size=int(image_size),
            mlp_ratio=float(data.get("mlp_ratio", 4)),
            patch_size=int(patch_size),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-6)),
            layerscale_value=float(data.get("layerscale_value", 1.0)),
            num_register_tokens=registers,
            use_swiglu_ffn=bool(data.get("use_swiglu_ffn", False)),
            qkv_bias=bool(data.get("qkv_bias", True)),
            num_channels=int(data.get("num_channels", 3)),
            interpolate_antialias=model_type == "dinov2_with_registers",
        )
    except KeyError as exc:
        raise HFLoadError(f"{CONFIG_FILE}: missing key {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise HFLoadError(f"{CONFIG_FILE}: {exc}") from exc


def config_to_hf(cfg: ViTConfig) -> dict[str, Any]:
    """`ViTConfig` -> a `config.json` dict that transformers loads as Dinov2(WithRegisters)Model."""
    registers = cfg.num_register_tokens > 0
    if cfg.interpolate_offset:
        raise ValueError(
            "transformers resizes position embeddings by size; an "
            "interpolate_offset has no Hugging Face equivalent"
        )
    if registers != cfg.interpolate_antialias:
        raise ValueError(
            "transformers ties antialiased position interpolation to register tokens; "
            "this configuration has no Hugging Face equivalent"
        )
    data: dict[str, Any] = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        # transformers validates an integral ratio as int
        "mlp_ratio": int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "layerscale_value": cfg.layerscale_value,
        "use_swiglu_ffn": cfg.use_swiglu_ffn,
        "qkv_bias": cfg.qkv_bias,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "apply_layernorm": True,
        "reshape_hidden_states": True,
    }
    if registers:
        data["num_register_tokens"] = cfg.num_register_tokens
    else:
        data["use_mask_token"] = True
    return data


# --------------------------------------------------------------------------------------------
# keys


def hf_key_map(cfg: ViTConfig) -> dict[str, str]:
    """Explicit table: checkpoint key (HF on-disk names) -> `DinoViT` state-dict key."""
    m: dict[str, str] = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    if cfg.num_register_tokens > 0:
        m["embeddings.register_tokens"] = "register_tokens"
    qkv_params = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    for i in range(cfg.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            m[f"{src}norm1.{p}"] = f"{dst}norm1.{p}"
            m[f"{src}norm2.{p}"] = f"{dst}norm2.{p}"
            m[f"{src}attention.output.dense.{p}"] = f"{dst}attn.proj.{p}"
            if cfg.use_swiglu_ffn:
                m[f"{src}mlp.weights_in.{p}"] = f"{dst}mlp.weights_in.{p}"
                m[f"{src}mlp.weights_out.{p}"] = f"{dst}mlp.weights_out.{p}"
            else:
                m[f"{src}mlp.fc1.{p}"] = f"{dst}mlp.fc1.{p}"
                m[f"{src}mlp.fc2.{p}"] = f"{dst}mlp.fc2.{p}"
        for p in qkv_params:
            m[f"{src}attention.attention.query.{p}"] = f"{dst}attn.q.{p}"
            m[f"{src}attention.attention.key.{p}"] = f"{dst}attn.k.{p}"
            m[f"{src}attention.attention.value.{p}"] = f"{dst}attn.v.{p}"
        m[f"{src}layer_scale1.lambda1"] = f"{dst}ls1.gamma"
        m[f"{src}layer_scale2.lambda1"] = f"{dst}ls2.gamma"
    return m


# In-memory names of transformers >= 5 (in case a checkpoint was written with them).
_RENAMED = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
)


def _canonical_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring renamed keys back to the on-disk Dinov2 names; fuse split SwiGLU gate/up."""
    out: dict[str, torch.Tensor] = {}
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for new, old in _RENAMED:
            if new in key:
                key = key.replace(new, old)
                break
        if ".mlp.gate_proj." in key or ".mlp.up_proj." in key:
            part = "gate" if ".mlp.gate_proj." in key else "up"
            fused = key.replace(".mlp.gate_proj.", ".mlp.weights_in.").replace(
                ".mlp.up_proj.", ".mlp.weights_in."
            )
            split.setdefault(fused, {})[part] = value
            continue
        out[key] = value
    for fused, parts in split.items():
        if set(parts) != {"gate", "up"}:
            raise HFLoadError(f"{WEIGHTS_FILE}: incomplete SwiGLU projection for {fused}")
        out[fused] = torch.cat((parts["gate"], parts["up"]), dim=0)
    return out


# --------------------------------------------------------------------------------------------
# preprocessing


def read_preprocessing(path: Path) -> Preprocessing:
    """`preprocessor_config.json` (an HF image processor config) -> `Preprocessing` for input
    pixels scaled to 0..1. The crop size is the model input when the processor crops, else the
    resize size."""
    data = _read_json(path)
    size = _processor_size(data, path)
    mean = data.get("image_mean", [0.0, 0.0, 0.0]) if data.get("do_normalize", True) else 0.0
    std = data.get("image_std", [1.0, 1.0, 1.0]) if data.get("do_normalize", True) else 1.0
    # The processor computes (raw * rescale_factor - mean) / std on 0..255 pixels; express that
    # for 0..1 inputs.
    factor = float(data.get("rescale_factor", 1 / 255)) if data.get("do_rescale", True) else 1.0
    k = 255.0 * factor
    try:
        pre = Preprocessing.from_dict({"size": size, "mean": mean, "std": std})
        return Preprocessing(
            size=pre.size,
            mean=(pre.mean[0] / k, pre.mean[1] / k, pre.mean[2] / k),
            std=(pre.std[0] / k, pre.std[1] / k, pre.std[2] / k),
        )
    except ValueError as exc:
        raise HFLoadError(f"{path.name}: {exc}") from exc


def _processor_size(data: dict[str, Any], path: Path) -> int:
    candidates: list[object] = []
    if data.get("do_center_crop", "crop_size" in data) and "crop_size" in data:
        candidates.append(data["crop_size"])
    if "size" in data:
        candidates.append(data["size"])
    for c in candidates:
        if isinstance(c, int):
            return c
        if isinstance(c, dict):
            if "height" in c and "width" in c:
                if int(c["height"]) != int(c["width"]):
                    raise HFLoadError(f"{path.name}: non-square input size {c}")
                return int(c["height"])
            if "shortest_edge" in c:
                return int(c["shortest_edge"])
    raise HFLoadError(f"{path.name}: no crop_size or size")


# --------------------------------------------------------------------------------------------
# load / save


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HFLoadError(f"missing file {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFLoadError(f"{path.name}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HFLoadError(f"{path.name}: expected a JSON object")
    return data


def load_hf_dinov2(
    folder: str | os.PathLike[str], *, with_preprocessing: bool = True
) -> tuple[DinoViT, ViTConfig, Preprocessing | None]:
    """Load a local `Dinov2Model` folder into `DinoViT` (eval mode, float32, strict=True).

    Returns (model, config, preprocessing); preprocessing is None when `with_preprocessing` is
    False (the bundle manifest then supplies it). Raises `HFLoadError` naming a missing or
    unusable file.
    """
    root = Path(folder)
    cfg = config_from_hf(_read_json(root / CONFIG_FILE))
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        if (root / (WEIGHTS_FILE + ".index.json")).is_file():
            raise HFLoadError(f"sharded checkpoints are not supported; merge into {WEIGHTS_FILE}")
        raise HFLoadError(f"missing file {WEIGHTS_FILE} in {root}")
    pre = read_preprocessing(root / PREPROCESSOR_FILE) if with_preprocessing else None
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise HFLoadError(f"{WEIGHTS_FILE}: cannot read: {exc}") from exc
    model = DinoViT(cfg)
    model.load_state_dict(map_hf_state_dict(tensors, cfg), strict=True)
    model.eval()
    log.info(
        "loaded Dinov2 encoder: dim %d, %d layers, %d heads, patch %d, native %d px",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.patch_size,
        cfg.image_size,
    )
    return model, cfg, pre


def map_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """HF checkpoint tensors -> `DinoViT` state dict, exactly: unknown or missing keys raise."""
    tensors = _canonical_keys(tensors)
    table = hf_key_map(cfg)
    unexpected = sorted(set(tensors) - set(table))
    missing = sorted(set(table) - set(tensors))
    if cfg.num_register_tokens == 0 and missing == ["embeddings.mask_token"]:
        # Some exports drop the (inference-unused) mask token.
        tensors = {**tensors, "embeddings.mask_token": torch.zeros(1, cfg.hidden_size)}
        missing = []
    if unexpected or missing:
        raise HFLoadError(
            f"{WEIGHTS_FILE} does not match {CONFIG_FILE}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return {table[k]: v.to(torch.float32) for k, v in tensors.items()}


def save_hf_layout(
    model: DinoViT,
    cfg: ViTConfig,
    folder: str | os.PathLike[str],
    preprocessing: Preprocessing,
) -> list[Path]:
    """Write `model` as a transformers Dinov2 folder (config.json, model.safetensors with HF key
    names, preprocessor_config.json). Returns the files written."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    inverse = {dst: src for src, dst in hf_key_map(cfg).items()}
    state = model.state_dict()
    if set(state) != set(inverse):
        raise ValueError(
            f"model state dict does not match the configuration: "
            f"{sorted(set(state) ^ set(inverse))[:5]}"
        )
    tensors = {
        inverse[k]: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()
    }
    processor = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": preprocessing.size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": preprocessing.size, "width": preprocessing.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocessing.mean),
        "image_std": list(preprocessing.std),
        "do_convert_rgb": True,
    }
    written = [root / CONFIG_FILE, root / WEIGHTS_FILE, root / PREPROCESSOR_FILE]
    atomic_write(written[0], (json.dumps(config_to_hf(cfg), indent=2) + "\n").encode())
    atomic_save_safetensors(tensors, written[1])
    atomic_write(written[2], (json.dumps(processor, indent=2) + "\n").encode())
    return written
