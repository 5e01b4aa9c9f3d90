"""DINOv2 vision transformer (RAD-DINO, RayDINO, XR-0 encoders). Architecture only: no files.

Numerically the same as transformers' `Dinov2Model` (and `Dinov2WithRegistersModel` when
`num_register_tokens > 0`): pre-norm blocks with LayerScale, a CLS token, learned position
embeddings interpolated bicubically for other grids, a final LayerNorm. Weights come in through
`workers.models.hf_loader`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DinoViT", "EncoderOutput", "FusedAttention", "ViTConfig", "init_weights"]


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False
    qkv_bias: bool = True
    num_channels: int = 3
    # Dinov2WithRegisters interpolates its position embeddings with antialiasing; Dinov2 does not.
    interpolate_antialias: bool = False
    # The original DINOv2 code (without registers) resizes position embeddings by a scale factor
    # (grid + 0.1) / native grid instead of to an output size; 0 means "by size" (transformers,
    # and DINOv2 with registers). Only matters when the input is not the native size.
    interpolate_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch_size {self.patch_size}")
        if not 0.0 <= self.interpolate_offset < 1.0:
            raise ValueError(f"interpolate_offset must be in [0, 1), got {self.interpolate_offset}")

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8 (DINOv2)
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ViTConfig:
        """Inverse of `to_dict`; unknown keys raise (a typo must not pass silently)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown encoder configuration keys {unknown}")
        return cls(**data)  # type: ignore[arg-type]

    def tokens(self, height: int, width: int) -> int:
        """Sequence length for an input of `height` x `width` pixels (CLS, registers, patches)."""
        return self.n_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)

    def flops_per_image(self, height: int | None = None, width: int | None = None) -> float:
        """Analytic forward FLOPs for one image (multiply-add = 2 FLOPs), biases and norms and
        softmax ignored:

            patch embedding            2 * P * (C * p^2) * D
            per layer, projections     2 * N * (4 * D^2)            q, k, v, output
            per layer, MLP             2 * N * D * H * (2, or 3 for SwiGLU)
            per layer, attention       2 * 2 * N^2 * D               QK^T and A V

        with P patches, N = P + prefix tokens, D the width, H the MLP width. For a plain MLP
        (H = 4D) a layer is 24 N D^2 + 4 N^2 D. ViT-B/14 at 518 px: about 303 GFLOP.
        """
        h = self.image_size if height is None else height
        w = self.image_size if width is None else width
        p = (h // self.patch_size) * (w // self.patch_size)
        n = p + self.n_prefix_tokens
        d = self.hidden_size
        mlp_mats = 3 if self.use_swiglu_ffn else 2
        embed = 2.0 * p * self.num_channels * self.patch_size**2 * d
        layer = 2.0 * n * 4 * d * d + 2.0 * n * d * self.mlp_hidden * mlp_mats + 4.0 * n * n * d
        return embed + self.num_hidden_layers * layer

    @classmethod
    def vit_small(cls, image_size: int = 518, **kw: Any) -> ViTConfig:
        return cls(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            image_size=image_size,
            **kw,
        )

    @classmethod
    def vit_base(cls, image_size: int = 518, **kw: Any) -> ViTConfig:
        return cls(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=image_size,
            **kw,
        )

    @classmethod
    def vit_large(cls, image_size: int = 518, **kw: Any) -> ViTConfig:
        return cls(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=image_size,
            **kw,
        )


@dataclass
class EncoderOutput:
    """Named encoder outputs, all after the final LayerNorm."""

    cls_token: torch.Tensor  # [B, D]
    patch_tokens: torch.Tensor  # [B, h*w, D], row-major over the grid
    grid: tuple[int, int]  # (h, w) patch grid
    # [B, heads, T, T] with T = n_prefix_tokens + h*w, token order CLS, registers, patches
    last_attention: torch.Tensor | None = None
    n_prefix_tokens: int = 1
    register_tokens: torch.Tensor | None = None  # [B, R, D] when the model has registers


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q(x).view(shape).transpose(1, 2)
        k = self.k(x).view(shape).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        weights: torch.Tensor | None = None
        if need_weights:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj(out), weights


class FusedAttention(nn.Module):
    """`Attention` with q, k and v in one [3D, D] projection: one matmul instead of three. On
    CUDA, q, k, v go to scaled-dot-product attention as strided views of its output; on a CPU
    one copy makes the heads contiguous (the CPU flash kernel is faster on them). Built by
    `from_attention`; the same function as the unfused module up to float rounding."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)

    @classmethod
    @torch.no_grad()
    def from_attention(cls, attn: Attention, cfg: ViTConfig) -> FusedAttention:
        fused = cls(cfg).to(device=attn.q.weight.device, dtype=attn.q.weight.dtype)
        fused.qkv.weight.copy_(torch.cat((attn.q.weight, attn.k.weight, attn.v.weight)))
        if fused.qkv.bias is not None:
            assert attn.q.bias is not None and attn.k.bias is not None and attn.v.bias is not None
            fused.qkv.bias.copy_(torch.cat((attn.q.bias, attn.k.bias, attn.v.bias)))
        fused.proj.load_state_dict(attn.proj.state_dict())
        return fused

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, d = x.shape
        # [B, T, 3, H, hd] -> [3, B, H, T, hd]
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu":
            # measured (1 thread, ViT-B/14 at 518 px): the CPU flash kernel takes 84 ms on the
            # strided views, 73 ms with this one copy included; CUDA kernels take the views
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(0)
        weights: torch.Tensor | None = None
        if need_weights:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # the CPU flash kernel returns a transposed view of a [B, T, H, hd] buffer: no copy here
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj(out), weights


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """Fused gate/up projection as stored in DINOv2 checkpoints (`weights_in`: gate then up)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.weights_in = nn.Linear(cfg.hidden_size, 2 * cfg.mlp_hidden)
        self.weights_out = nn.Linear(cfg.mlp_hidden, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn: Attention | FusedAttention = Attention(cfg)
        self.ls1: nn.Module = LayerScale(d, cfg.layerscale_value)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp: nn.Module = SwiGLUFFN(cfg) if cfg.use_swiglu_ffn else Mlp(cfg)
        self.ls2: nn.Module = LayerScale(d, cfg.layerscale_value)

    @torch.no_grad()
    def fuse_(self, cfg: ViTConfig) -> None:
        """In place: q/k/v into one projection, and each LayerScale folded into the linear layer
        before it (gamma * (W x + b) = (gamma W) x + gamma b), replaced by an identity."""
        if isinstance(self.attn, Attention):
            self.attn = FusedAttention.from_attention(self.attn, cfg)
        if isinstance(self.ls1, LayerScale):
            _scale_linear_(self.attn.proj, self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale):
            out = self.mlp.weights_out if isinstance(self.mlp, SwiGLUFFN) else self.mlp.fc2
            assert isinstance(out, nn.Linear)
            _scale_linear_(out, self.ls2.gamma)
            self.ls2 = nn.Identity()

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.attn(self.norm1(x), need_weights=need_weights)
        x = x + self.ls1(attn)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, weights


def _scale_linear_(linear: nn.Linear, gamma: torch.Tensor) -> None:
    """`linear` followed by `* gamma`, as one linear layer: rows of W and b scaled by gamma."""
    linear.weight.mul_(gamma.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.mul_(gamma.to(linear.bias.dtype))


class DinoViT(nn.Module):
    """DINOv2 ViT. `forward(pixel_values [B, 3, H, W])` -> `EncoderOutput`; H and W need not be
    the native size (position embeddings are interpolated) and are floored to the patch size."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Unused at inference; present so that DINOv2 checkpoints load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.native_grid**2 + 1, d))
        self.register_tokens: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
            if cfg.num_register_tokens > 0
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        # True on a `fused_for_inference` copy: the state dict no longer has the checkpoint layout
        self.fused = False
        # interpolated position embeddings per (grid, dtype, device), for inference only
        self._pos_cache: dict[tuple[object, ...], torch.Tensor] = {}

    def fused_for_inference(self) -> DinoViT:
        """A copy for inference (eval mode) computing the same function faster: fused QKV
        projection, LayerScale folded into the preceding linear weights. Equal to this model up
        to float rounding (tests: against transformers' Dinov2Model). Its state dict has no
        checkpoint layout: save and load the original, never the copy."""
        if self.fused:
            return self
        fused = copy.deepcopy(self).eval()
        fused._pos_cache = {}
        for block in fused.blocks:
            assert isinstance(block, Block)
            block.fuse_(self.cfg)
        fused.fused = True
        return fused

    def _pos_embedding(self, n_patches: int, height: int, width: int) -> torch.Tensor:
        """`interpolate_pos_encoding`, cached per input grid while in inference mode (the
        bicubic resize is then done once per size, not per call)."""
        if not torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
            return self.interpolate_pos_encoding(n_patches, height, width)
        p = self.cfg.patch_size
        pos = self.pos_embed
        key = (height // p, width // p, n_patches, pos.dtype, pos.device, pos._version, id(pos))
        hit = self._pos_cache.get(key)
        if hit is None:
            if len(self._pos_cache) > 16:
                self._pos_cache.clear()
            hit = self._pos_cache[key] = self.interpolate_pos_encoding(n_patches, height, width)
        return hit

    def _apply(self, fn: Any, recurse: bool = True) -> DinoViT:
        self._pos_cache = {}  # .to(device/dtype) invalidates cached embeddings
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def interpolate_pos_encoding(self, n_patches: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of `height` x `width` pixels (as HF Dinov2 does)."""
        pos = self.pos_embed
        n_pos = pos.shape[1] - 1
        if n_patches == n_pos and height == width:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        d = pos.shape[-1]
        new_h, new_w = height // self.cfg.patch_size, width // self.cfg.patch_size
        side = int(math.sqrt(n_pos))
        patch_pos = patch_pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
        target_dtype = patch_pos.dtype
        off = self.cfg.interpolate_offset
        if off:
            # original DINOv2: scale factor with a small offset (facebookresearch/dino#8)
            patch_pos = F.interpolate(
                patch_pos.to(torch.float32),
                scale_factor=((new_h + off) / side, (new_w + off) / side),
                mode="bicubic",
                antialias=self.cfg.interpolate_antialias,
            ).to(target_dtype)
            if tuple(patch_pos.shape[-2:]) != (new_h, new_w):
                raise RuntimeError(
                    f"position embeddings resized to {tuple(patch_pos.shape[-2:])}, "
                    f"expected {(new_h, new_w)}"
                )
        else:
            patch_pos = F.interpolate(
                patch_pos.to(torch.float32),
                size=(new_h, new_w),
                mode="bicubic",
                align_corners=False,
                antialias=self.cfg.interpolate_antialias,
            ).to(target_dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> EncoderOutput:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.cfg.num_channels:
            raise ValueError(
                f"pixel_values must be [B, {self.cfg.num_channels}, H, W], "
                f"got {tuple(pixel_values.shape)}"
            )
        b, _, height, width = pixel_values.shape
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self._pos_embedding(x.shape[1] - 1, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)

        last_attention: torch.Tensor | None = None
        n_blocks = len(self.blocks)
        for i, block in enumerate(self.blocks):
            need = output_attentions and i == n_blocks - 1
            x, weights = block(x, need_weights=need)
            if need:
                last_attention = weights
        x = self.norm(x)
        p = self.cfg.n_prefix_tokens
        return EncoderOutput(
            cls_token=x[:, 0],
            patch_tokens=x[:, p:],
            grid=grid,
            last_attention=last_attention,
            n_prefix_tokens=p,
            register_tokens=x[:, 1:p] if p > 1 else None,
        )


@torch.no_grad()
def init_weights(model: DinoViT, generator: torch.Generator, std: float = 0.02) -> None:
    """Deterministic random initialisation (DINOv2 style: truncated normal linear weights, zero
    biases, unit LayerNorms, LayerScale at its configured value). For DEMO bundles and tests."""

    def tn(p: torch.Tensor) -> None:
        p.copy_(torch.randn(p.shape, generator=generator).clamp_(-2.0, 2.0) * std)

    tn(model.pos_embed)
    tn(model.cls_token)
    model.mask_token.zero_()
    if model.register_tokens is not None:
        tn(model.register_tokens)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            tn(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, LayerScale):
            module.gamma.fill_(model.cfg.layerscale_value)
