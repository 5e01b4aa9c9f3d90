"""Linear heads on frozen features (the DINOv2 / RAD-DINO / RayDINO linear-probe recipe).

Features are standardised for the fit (better-conditioned optimisation) and the scaling is folded
back into the weights, so a head applies to raw encoder features exactly like
`ClassificationHead` / `LinearSegHead` do at inference. Loss: binary cross-entropy per label,
unknown labels (nan) masked out, plus `weight_decay` * ||W||^2 on the standardised weights.
Optimiser: full-batch L-BFGS (strong Wolfe line search) or Adam.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from workers.imaging import letterbox_transform
from workers.models.adapters import ClassificationHead, LinearSegHead

log = logging.getLogger(__name__)

__all__ = ["fit_linear", "mask_targets", "train_classifier", "train_segmenter"]

OPTIMIZERS = ("lbfgs", "adam")


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    *,
    weight_decay: float = 1e-3,
    optimizer: str = "lbfgs",
    max_iter: int = 300,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label logistic regression: x [N, F], y [N, L] in 0..1 (soft targets allowed) or nan
    -> (weight [L, F], bias [L]) for raw x."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    torch.manual_seed(seed)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
    valid = ~torch.isnan(yt)
    target = torch.nan_to_num(yt, nan=0.0)
    mu = xt.mean(0)
    sigma = xt.std(0).clamp_min(1e-6)
    z = (xt - mu) / sigma
    n_valid = valid.sum(0).clamp_min(1).float()
    w = torch.zeros(yt.shape[1], xt.shape[1], requires_grad=True)
    prior = (target * valid).sum(0) / n_valid
    b = torch.logit(prior.clamp(1e-3, 1 - 1e-3)).clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        logits = z @ w.T + b
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_label = (bce * valid).sum(0) / n_valid
        return per_label.sum() + weight_decay * (w * w).sum()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        adam = torch.optim.Adam([w, b], lr=0.01)
        for _ in range(max_iter * 5):
            adam.zero_grad()
            loss = loss_fn()
            loss.backward()
            adam.step()
    with torch.no_grad():
        final = float(loss_fn())
        weight = w / sigma  # fold the standardisation back in
        bias = b - (w * (mu / sigma)).sum(1)
    log.info(
        "linear head fitted (%s): %d samples, %d features, %d outputs, loss %.4f",
        optimizer,
        xt.shape[0],
        xt.shape[1],
        yt.shape[1],
        final,
    )
    return weight.numpy(), bias.numpy()


def train_classifier(
    image_features: np.ndarray, y: np.ndarray, dim: int, **kw: object
) -> ClassificationHead:
    """`ClassificationHead` on [N, 2*dim] features (CLS, mean patch) for labels y [N, L]."""
    weight, bias = fit_linear(image_features, y, **kw)  # type: ignore[arg-type]
    head = ClassificationHead(dim, y.shape[1])
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    return head.eval()


def mask_targets(mask: np.ndarray, size: int, grid: tuple[int, int], patch: int) -> np.ndarray:
    """bool [C, rows, columns] in source geometry -> fraction of each patch covered [C, h*w],
    placed exactly as `imaging.letterbox` places the image."""
    c, rows, cols = mask.shape
    t = letterbox_transform((rows, cols), size)
    new_h, new_w = t.resized_shape
    m = torch.from_numpy(mask.astype(np.float32))[None]
    resized = F.interpolate(m, size=(new_h, new_w), mode="area")[0]
    boxed = torch.zeros(c, size, size)
    boxed[:, t.pad_top : t.pad_top + new_h, t.pad_left : t.pad_left + new_w] = resized
    h, w = grid
    boxed = boxed[:, : h * patch, : w * patch]
    pooled = F.avg_pool2d(boxed[None], kernel_size=patch)[0]  # [C, h, w]
    return pooled.reshape(c, h * w).numpy()


def train_segmenter(
    patches: np.ndarray,
    targets: np.ndarray,
    dim: int,
    *,
    max_patches: int = 200_000,
    seed: int = 0,
    **kw: object,
) -> LinearSegHead:
    """`LinearSegHead` from patch tokens [N, P, D] and soft targets [N, C, P] (patch coverage);
    at most `max_patches` token samples (seeded subsample) go into the full-batch fit."""
    n, p, d = patches.shape
    c = targets.shape[1]
    x = patches.reshape(n * p, d)
    y = targets.transpose(0, 2, 1).reshape(n * p, c)
    if len(x) > max_patches:
        keep = np.random.default_rng(seed).choice(len(x), max_patches, replace=False)
        x, y = x[keep], y[keep]
    weight, bias = fit_linear(x.astype(np.float32), y, seed=seed, **kw)  # type: ignore[arg-type]
    head = LinearSegHead(dim, c)
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    return head.eval()
