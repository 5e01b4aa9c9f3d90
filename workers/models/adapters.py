"""Task adapters on a frozen DINOv2 encoder's named outputs, and its attention maps."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "ClassificationHead",
    "LinearSegHead",
    "attention_maps",
    "class_activation_maps",
    "cls_attention_map",
]


class ClassificationHead(nn.Module):
    """Linear probe on concat(CLS token, mean of patch tokens) -> logits [B, n_labels]
    (the DINOv2 linear-evaluation recipe)."""

    def __init__(self, dim: int, n_labels: int) -> None:
        super().__init__()
        if dim < 1 or n_labels < 1:
            raise ValueError(f"invalid head size dim={dim}, n_labels={n_labels}")
        self.dim = dim
        self.n_labels = n_labels
        self.linear = nn.Linear(2 * dim, n_labels)

    def forward(self, cls_token: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        features = torch.cat((cls_token, patch_tokens.mean(dim=1)), dim=-1)
        return self.linear(features)

    def patch_logits(self, cls_token: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Per-patch logits [B, N, n_labels] whose mean over the patches is exactly `forward`'s
        logit: the patch half of the weights applied to each token, plus the CLS half and the
        bias (a class-activation map; the head is linear in the mean patch token)."""
        w_cls, w_patch = self.linear.weight[:, : self.dim], self.linear.weight[:, self.dim :]
        image_part = cls_token @ w_cls.T + self.linear.bias  # [B, L]
        return patch_tokens @ w_patch.T + image_part[:, None, :]


class LinearSegHead(nn.Module):
    """1x1 linear classifier on each patch token -> logits [B, n_classes, h, w] on the token
    grid (upsampling to source pixels is the caller's, through `imaging.Transform.to_source`)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        if dim < 1 or n_classes < 1:
            raise ValueError(f"invalid head size dim={dim}, n_classes={n_classes}")
        self.dim = dim
        self.n_classes = n_classes
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, _ = patch_tokens.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} patch tokens do not fill a {h} x {w} grid")
        logits = self.linear(patch_tokens)  # [B, N, C]
        return logits.transpose(1, 2).reshape(b, self.n_classes, h, w)


def cls_attention_map(
    last_attention: torch.Tensor, grid: tuple[int, int], n_prefix_tokens: int = 1
) -> torch.Tensor:
    """Mean over heads of the CLS token's attention to each patch -> [B, h, w] (RayDINO maps).

    `last_attention` is [B, heads, T, T] with token order CLS, registers, patches.
    """
    return attention_maps(last_attention, grid, n_prefix_tokens).mean(dim=1)


def class_activation_maps(
    head: ClassificationHead,
    cls_token: torch.Tensor,
    patch_tokens: torch.Tensor,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Per-label class-activation maps [B, n_labels, h, w] on the token grid, in logit units:
    each patch token scored by the classifier (`ClassificationHead.patch_logits`)."""
    b, n, _ = patch_tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h} x {w} grid")
    logits = head.patch_logits(cls_token, patch_tokens)  # [B, N, L]
    return logits.transpose(1, 2).reshape(b, head.n_labels, h, w)


def attention_maps(
    last_attention: torch.Tensor, grid: tuple[int, int], n_prefix_tokens: int = 1
) -> torch.Tensor:
    """The CLS token's attention to each patch, per head -> [B, heads, h, w] (DINO's per-head
    maps; `cls_attention_map` is their mean)."""
    if last_attention.ndim != 4:
        raise ValueError(f"expected [B, heads, T, T], got {tuple(last_attention.shape)}")
    b, heads, t, _ = last_attention.shape
    h, w = grid
    if t != n_prefix_tokens + h * w:
        raise ValueError(f"{t} tokens != {n_prefix_tokens} prefix + {h} x {w} patches")
    return last_attention[:, :, 0, n_prefix_tokens:].reshape(b, heads, h, w)
