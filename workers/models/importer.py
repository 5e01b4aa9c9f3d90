"""`pacs-agent models import`: a bundle from a downloaded checkpoint folder, in either layout.

- transformers `Dinov2Model` layout (`config.json`, `model.safetensors`,
  `preprocessor_config.json`): the files are placed as they are.
- original DINOv2 layout (`backbone_compatible.safetensors` and the like, or a `.pth` read with
  `weights_only=True`, which is converted to safetensors): the weights file is placed and the
  full encoder configuration written into the manifest (heads from `--heads`, else from a
  `config.json` beside the weights, else 64 channels per head).

Preprocessing comes from explicit values, else the folder's `preprocessor_config.json`
(RAD-DINO's mean/std differ from ImageNet's), else ImageNet's at the native size (with a
warning). Adapters (classifier, segmenter, QC heads) are checked against the encoder width and
their label counts, then written as safetensors. Every file gets its sha256 in the manifest, and
the finished bundle is loaded once to prove it loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from workers.imaging import Preprocessing
from workers.models.adapters import ClassificationHead, LinearSegHead
from workers.models.bundle import (
    ENCODER_FORMAT,
    ORIGINAL_FORMAT,
    BundleError,
    load_bundle,
    place_file,
    save_adapter,
    sha256_file,
    write_manifest,
)
from workers.models.dinov2_loader import (
    Dinov2LoadError,
    find_dinov2_weights,
    infer_dinov2_config,
    map_dinov2_state_dict,
    normalize_dinov2_keys,
    read_dinov2_tensors,
    to_dinov2_state_dict,
)
from workers.models.hf_loader import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    HFLoadError,
    load_hf_dinov2,
    read_preprocessing,
)
from workers.models.qc import QC_TASKS
from workers.models.vit import DinoViT, ViTConfig

log = logging.getLogger(__name__)

__all__ = ["AdapterSource", "ImportOptions", "detect_layout", "import_bundle"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("auto", "hf", "dinov2")


@dataclass
class AdapterSource:
    """An adapter to import: a safetensors file and its label (or class) names."""

    path: Path
    labels: list[str]
    thresholds: list[float] | None = None


@dataclass
class ImportOptions:
    layout: str = "auto"
    weights: str | None = None  # the original-layout file name inside the folder
    num_heads: int | None = None
    name: str | None = None
    version: str | None = None
    preprocessing: Preprocessing | None = None
    classifier: AdapterSource | None = None
    segmenter: AdapterSource | None = None
    qc: dict[str, AdapterSource] = field(default_factory=dict)
    intended: dict[str, Any] | None = None
    mode: str = "copy"  # copy | link | symlink
    random_weights: bool = False
    warnings: list[str] = field(default_factory=list)


def detect_layout(src: Path) -> str:
    """ "hf" when the folder has a transformers Dinov2 checkpoint, else "dinov2" when it has an
    original-layout weights file; raises otherwise."""
    if src.is_file():
        return "dinov2"
    if (src / CONFIG_FILE).is_file() and (src / WEIGHTS_FILE).is_file():
        try:
            data = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{CONFIG_FILE}: cannot read: {exc}") from exc
        if isinstance(data, dict) and str(data.get("model_type", "")).startswith("dinov2"):
            return "hf"
    try:
        find_dinov2_weights(src)
        return "dinov2"
    except Dinov2LoadError:
        pass
    for ext in (".pth", ".pt"):
        if list(src.glob(f"*{ext}")):
            return "dinov2"
    raise BundleError(
        f"{src}: neither a transformers Dinov2 folder ({CONFIG_FILE} + "
        f"{WEIGHTS_FILE}) nor an original DINOv2 weights file"
    )


def _original_weights_file(src: Path, name: str | None) -> Path:
    if src.is_file():
        return src
    if name:
        p = src / name
        if not p.is_file():
            raise BundleError(f"missing file {name} in {src}")
        return p
    try:
        return find_dinov2_weights(src)
    except Dinov2LoadError:
        pths = sorted([*src.glob("*.pth"), *src.glob("*.pt")])
        if len(pths) == 1:
            return pths[0]
        raise


def _heads_from_hf_config(folder: Path) -> tuple[int | None, float | None]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["num_attention_heads"]), float(data.get("layer_norm_eps", 1e-6))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None, None


def import_bundle(
    src: str | os.PathLike[str], out: str | os.PathLike[str], options: ImportOptions | None = None
) -> Path:
    opt = options or ImportOptions()
    source = Path(src)
    root = Path(out)
    if not source.exists():
        raise BundleError(f"{source} does not exist")
    if opt.layout not in LAYOUTS:
        raise BundleError(f"layout must be one of {LAYOUTS}, got {opt.layout!r}")
    layout = detect_layout(source) if opt.layout == "auto" else opt.layout
    folder = source if source.is_dir() else source.parent
    (root / "encoder").mkdir(parents=True, exist_ok=True)
    enc_files: dict[str, str] = {}
    encoder_entry: dict[str, Any]

    try:
        if layout == "hf":
            _, cfg, _ = load_hf_dinov2(folder, with_preprocessing=False)
            for name in (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE):
                if (folder / name).is_file():
                    dst = place_file(folder / name, root / "encoder" / name, opt.mode)
                    enc_files[name] = sha256_file(dst)
            encoder_entry = {"format": ENCODER_FORMAT, "path": "encoder", "files": enc_files}
        else:
            weights = _original_weights_file(source, opt.weights)
            heads, eps = _heads_from_hf_config(folder)
            tensors = normalize_dinov2_keys(read_dinov2_tensors(weights))
            cfg = infer_dinov2_config(
                tensors, num_heads=opt.num_heads or heads, layer_norm_eps=eps or 1e-6
            )
            model = DinoViT(cfg)
            model.load_state_dict(
                map_dinov2_state_dict(tensors, cfg, source=weights.name), strict=True
            )
            if weights.suffix == ".safetensors":
                dst = place_file(weights, root / "encoder" / weights.name, opt.mode)
            else:  # a pickle-format checkpoint is never shipped: convert it
                from safetensors.torch import save_file

                dst = root / "encoder" / (weights.stem + ".safetensors")
                save_file(to_dinov2_state_dict(model), str(dst), metadata={"format": "pt"})
            enc_files[dst.name] = sha256_file(dst)
            if (folder / PREPROCESSOR_FILE).is_file():
                pdst = place_file(
                    folder / PREPROCESSOR_FILE, root / "encoder" / PREPROCESSOR_FILE, opt.mode
                )
                enc_files[PREPROCESSOR_FILE] = sha256_file(pdst)
            encoder_entry = {
                "format": ORIGINAL_FORMAT,
                "path": "encoder",
                "weights": dst.name,
                "config": cfg.to_dict(),
                "files": enc_files,
            }
    except (HFLoadError, Dinov2LoadError) as exc:
        raise BundleError(f"{source}: {exc}") from exc
    except RuntimeError as exc:
        raise BundleError(f"{source}: weights do not fit the configuration: {exc}") from exc

    preprocessing = _preprocessing(opt, folder, cfg)
    adapters: dict[str, Any] = {}
    if opt.classifier is not None:
        head = _load_head(
            opt.classifier.path, ClassificationHead(cfg.hidden_size, len(opt.classifier.labels))
        )
        thresholds = opt.classifier.thresholds or [0.5] * len(opt.classifier.labels)
        if len(thresholds) != len(opt.classifier.labels):
            raise BundleError("give one threshold per classifier label")
        adapters["classifier"] = save_adapter(
            head, root, "classifier", labels=opt.classifier.labels, thresholds=thresholds
        )
    if opt.segmenter is not None:
        seg = _load_head(
            opt.segmenter.path, LinearSegHead(cfg.hidden_size, len(opt.segmenter.labels))
        )
        adapters["segmenter"] = save_adapter(seg, root, "segmenter", classes=opt.segmenter.labels)
    for task, spec in opt.qc.items():
        if task not in QC_TASKS:
            raise BundleError(f"unknown QC head {task!r} (known: {list(QC_TASKS)})")
        qc = _load_head(spec.path, ClassificationHead(cfg.hidden_size, len(spec.labels)))
        adapters[task] = save_adapter(qc, root, task, labels=spec.labels)

    weights_digest = next(
        v for k, v in enc_files.items() if k != PREPROCESSOR_FILE and k != CONFIG_FILE
    )
    manifest: dict[str, Any] = {
        "name": opt.name or source.name,
        "version": opt.version or f"imported-{weights_digest[:8]}",
        "encoder": encoder_entry,
        "adapters": adapters,
        "preprocessing": preprocessing.to_dict(),
        "random_weights": bool(opt.random_weights),
        "source": {"path": str(source.resolve()), "layout": layout},
    }
    if opt.intended:
        manifest["intended"] = opt.intended
    write_manifest(root, manifest)
    load_bundle(root)  # prove it loads, checksums included
    log.info("imported %s (%s layout) into bundle %s", source, layout, root)
    return root


def _preprocessing(opt: ImportOptions, folder: Path, cfg: ViTConfig) -> Preprocessing:
    if opt.preprocessing is not None:
        return opt.preprocessing
    if (folder / PREPROCESSOR_FILE).is_file():
        try:
            return read_preprocessing(folder / PREPROCESSOR_FILE)
        except HFLoadError as exc:
            raise BundleError(str(exc)) from exc
    msg = (
        f"no {PREPROCESSOR_FILE}: using ImageNet mean/std at {cfg.image_size} px; pass "
        f"--size/--mean/--std if the encoder was trained otherwise"
    )
    log.warning(msg)
    opt.warnings.append(msg)
    return Preprocessing(size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _load_head(path: Path, head: torch.nn.Module) -> torch.nn.Module:
    """Load a head's weights (keys `linear.weight`/`linear.bias`, or a bare Linear's
    `weight`/`bias`) with strict=True; shapes are checked against the encoder and labels."""
    if not path.is_file():
        raise BundleError(f"missing file {path}")
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise BundleError(f"{path.name}: cannot read: {exc}") from exc
    if set(state) == {"weight", "bias"}:
        state = {f"linear.{k}": v for k, v in state.items()}
    try:
        head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{path.name} does not fit this encoder and label list: {exc}") from exc
    return head.eval()
