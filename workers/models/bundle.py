"""Model bundles: an encoder checkpoint, task adapters and their preprocessing, with checksums.

A bundle is a folder with `manifest.json`::

    {
      "name": "...", "version": "0.1.0",
      "encoder": {"format": "hf-dinov2", "path": "encoder",
                  "files": {"config.json": "<sha256>", "model.safetensors": "<sha256>", ...}},
      "adapters": {
        "classifier": {"path": "adapters/classifier.safetensors", "sha256": "...",
                       "labels": [...], "thresholds": [...]},
        "segmenter": {"path": "adapters/segmenter.safetensors", "sha256": "...", "classes": [...]},
        "view": {"path": "adapters/view.safetensors", "sha256": "...",
                 "labels": ["PA", "AP", "LATERAL"]},
        "body_part": {"path": "adapters/body_part.safetensors", "sha256": "...",
                      "labels": ["CHEST", "EXTREMITY", ...]}
      },
      "preprocessing": {"size": 518, "mean": [...], "std": [...]},
      "random_weights": false,
      "intended": {"anatomy": "chest", "views": ["PA", "AP"]},
      "synonyms": {"Pleural effusion": ["effusion", "pleural fluid"], ...}
    }

Encoder formats: `hf-dinov2` (transformers `Dinov2Model` folder) and `dinov2-original` (the
original DINOv2 code's state dict, e.g. RAD-DINO's `backbone_compatible.safetensors`; the entry
then names its `weights` file and carries the full encoder `config`, since shapes do not give
the number of heads). Every adapter is optional; `view` and `body_part` are quality-control heads
(`workers.models.qc`).

`load_bundle` checks every file's sha256 before it reads any weights, and loads local
safetensors files only, with `strict=True`. The encoder path may be absolute (an installation
that downloaded RAD-DINO once points the bundle at that folder); adapter paths stay inside the
bundle. The bundle's checksum is the sha256 of the manifest bytes, which pin every file.

`synonyms` (optional) maps a classifier label to other phrases for it; with the label names
they make the bundle's grounding vocabulary (`Bundle.vocabulary`, matched case-insensitively,
`POST /api/grounding`). A synonym naming two labels is refused; synonyms of a label the
classifier does not have are ignored (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from workers.imaging import Preprocessing
from workers.models.adapters import ClassificationHead, LinearSegHead
from workers.models.dinov2_loader import Dinov2LoadError, load_dinov2_original
from workers.models.files import atomic_save_safetensors, atomic_write, replace_atomically
from workers.models.hf_loader import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    HFLoadError,
    load_hf_dinov2,
    read_preprocessing,
    save_hf_layout,
)
from workers.models.qc import QC_LABELS, QC_TASKS
from workers.models.vit import DinoViT, ViTConfig, init_weights

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_LABELS",
    "DEMO_SEG_CLASSES",
    "ENCODER_FORMATS",
    "MANIFEST",
    "Bundle",
    "BundleError",
    "QCHead",
    "load_bundle",
    "place_file",
    "read_manifest",
    "save_adapter",
    "sha256_file",
    "write_demo_bundle",
    "write_derived_bundle",
    "write_manifest",
]

MANIFEST = "manifest.json"
ENCODER_FORMAT = "hf-dinov2"
ORIGINAL_FORMAT = "dinov2-original"
ENCODER_FORMATS = (ENCODER_FORMAT, ORIGINAL_FORMAT)
DEMO_LABELS = ["Cardiomegaly", "Pleural effusion", "Pneumothorax", "Consolidation", "Nodule"]
# The multi-anatomy DEMO pipeline (any body part): as many labels as the chest demo.
DEMO_MULTI_LABELS = ["Fracture", "Dislocation", "Foreign body", "Pneumothorax", "Free air"]
# Triage policies written into the DEMO bundles (the format is TriagePolicy's).
DEMO_TRIAGE_POLICY: dict[str, Any] = {
    "labels": {
        "Pneumothorax": {"urgent": 0.3, "critical": 0.6},
        "Pleural effusion": {"urgent": 0.5, "critical": 0.85},
        "Consolidation": {"urgent": 0.6},
        "Cardiomegaly": {"urgent": 0.75},
        "Nodule": {"urgent": 0.8},
    }
}
DEMO_MULTI_TRIAGE_POLICY: dict[str, Any] = {
    "labels": {
        "Pneumothorax": {"urgent": 0.3, "critical": 0.6},
        "Free air": {"urgent": 0.3, "critical": 0.6},
        "Foreign body": {"urgent": 0.5},
        "Fracture": {"urgent": 0.6},
        "Dislocation": {"urgent": 0.6},
    }
}
DEMO_SEG_CLASSES = ["Lung field"]
# Grounding phrases written into the DEMO bundles (the manifest's optional `synonyms`).
DEMO_SYNONYMS: dict[str, list[str]] = {
    "Cardiomegaly": ["enlarged heart", "cardiac enlargement"],
    "Pleural effusion": ["effusion", "pleural fluid"],
    "Pneumothorax": ["collapsed lung", "PTX"],
    "Consolidation": ["airspace opacity", "airspace consolidation"],
    "Nodule": ["lung nodule", "pulmonary nodule"],
}
DEMO_MULTI_SYNONYMS: dict[str, list[str]] = {
    "Fracture": ["broken bone", "bone fracture"],
    "Dislocation": ["joint dislocation", "luxation"],
    "Foreign body": ["foreign object"],
    "Pneumothorax": ["collapsed lung", "PTX"],
    "Free air": ["pneumoperitoneum", "free gas"],
}
# RAD-DINO's published normalisation (grey X-rays replicated to 3 channels).
DEMO_MEAN = (0.5307, 0.5307, 0.5307)
DEMO_STD = (0.2583, 0.2583, 0.2583)


class BundleError(ValueError):
    """The bundle cannot be used; the message names the file or field at fault."""


@dataclass
class QCHead:
    """A quality-control head: softmax over `labels` from the same features as the classifier."""

    task: str  # "view" or "body_part"
    head: ClassificationHead
    labels: list[str]


@dataclass(frozen=True)
class TriagePolicy:
    """How a bundle's findings become the study's triage level (routine / urgent / critical).

    In ``manifest.json`` as ``"triage_policy"``::

        {"labels": {"Pneumothorax": {"urgent": 0.3, "critical": 0.5}},
         "default": {"urgent": 0.7}}

    A finding whose probability reaches its label's ``critical`` threshold makes the study
    critical, one that reaches ``urgent`` makes it at least urgent. Labels match without regard
    to case; a label absent from ``labels`` uses ``default``; with no default it never raises the
    level. A bundle without a policy: a present finding (the classifier's own threshold) is
    urgent, nothing is critical.
    """

    labels: dict[str, dict[str, float]] = field(default_factory=dict)
    default: dict[str, float] | None = None

    @classmethod
    def from_manifest(cls, raw: Any) -> TriagePolicy | None:
        if raw is None:
            return None
        where = "triage_policy"
        if not isinstance(raw, dict):
            raise BundleError(f"{MANIFEST}: {where} must be an object")
        unknown = sorted(set(raw) - {"labels", "default"})
        if unknown:
            raise BundleError(f"{MANIFEST}: {where}: unknown keys {unknown}")

        def levels(v: Any, at: str) -> dict[str, float]:
            if not isinstance(v, dict) or not v:
                raise BundleError(f"{MANIFEST}: {at} must be an object with urgent/critical")
            out: dict[str, float] = {}
            for k, x in v.items():
                if k not in ("urgent", "critical"):
                    raise BundleError(f"{MANIFEST}: {at}: unknown level {k!r}")
                if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= 1:
                    raise BundleError(f"{MANIFEST}: {at}.{k} must be a probability in 0..1")
                out[k] = float(x)
            return out

        labels_raw = raw.get("labels") or {}
        if not isinstance(labels_raw, dict):
            raise BundleError(f"{MANIFEST}: {where}.labels must be an object")
        labels = {str(k).lower(): levels(v, f"{where}.labels.{k}") for k, v in labels_raw.items()}
        default = raw.get("default")
        return cls(labels, levels(default, f"{where}.default") if default is not None else None)

    def level_of(self, label: str, probability: float) -> str:
        spec = self.labels.get(label.lower(), self.default)
        if not spec:
            return "routine"
        if "critical" in spec and probability >= spec["critical"]:
            return "critical"
        if "urgent" in spec and probability >= spec["urgent"]:
            return "urgent"
        return "routine"


_LEVEL_ORDER = {"routine": 0, "urgent": 1, "critical": 2}


def triage_level(findings: list[tuple[str, float, bool]], policy: TriagePolicy | None) -> str:
    """The study's triage level from its findings ``(label, probability, present)``."""
    level = "routine"
    for label, p, present in findings:
        if policy is None:
            this = "urgent" if present else "routine"
        else:
            this = policy.level_of(label, p)
        if _LEVEL_ORDER[this] > _LEVEL_ORDER[level]:
            level = this
    return level


@dataclass
class Bundle:
    root: Path
    name: str
    version: str
    encoder: DinoViT
    encoder_config: ViTConfig
    classifier: ClassificationHead | None
    segmenter: LinearSegHead | None
    labels: list[str]
    thresholds: list[float]
    seg_classes: list[str]
    preprocessing: Preprocessing
    is_demo: bool
    checksum: str  # sha256 of manifest.json bytes
    intended: dict[str, Any] = field(default_factory=dict)
    qc_heads: dict[str, QCHead] = field(default_factory=dict)
    encoder_format: str = ENCODER_FORMAT
    manifest: dict[str, Any] = field(default_factory=dict)
    triage_policy: TriagePolicy | None = None
    # label -> other phrases for it (manifest `synonyms`)
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    # Report-generation adapter (workers.models.report_adapter.ReportAdapter), when present.
    report: Any = None

    @property
    def vocabulary(self) -> dict[str, str]:
        """Grounding phrases (lower case, single spaces) -> label: every label's own name and
        its synonyms."""
        return vocabulary(self.labels, self.synonyms)

    @property
    def encoder_fingerprint(self) -> str:
        """sha256 over what determines the encoder's features: its files' checksums, its
        configuration and the preprocessing (the key of cached training features)."""
        enc = self.manifest.get("encoder", {})
        key = json.dumps(
            {
                "files": enc.get("files", {}),
                "config": self.encoder_config.to_dict(),
                "preprocessing": self.preprocessing.to_dict(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()


def _norm_phrase(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def vocabulary(labels: list[str], synonyms: dict[str, list[str]]) -> dict[str, str]:
    """Phrase (lower case, single spaces) -> label, from the labels and their synonyms."""
    out = {_norm_phrase(label): label for label in labels}
    for label, phrases in synonyms.items():
        for phrase in phrases:
            out.setdefault(_norm_phrase(phrase), label)
    return out


def read_synonyms(raw: Any, labels: list[str]) -> dict[str, list[str]]:
    """The manifest's optional `synonyms`: {label: [phrase, ...]}, checked."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BundleError(f"{MANIFEST}: synonyms must be an object (label -> list of phrases)")
    owner = {_norm_phrase(label): label for label in labels}
    out: dict[str, list[str]] = {}
    for label, phrases in raw.items():
        if label not in labels:  # e.g. a derived bundle whose classifier has other labels
            log.warning("%s: synonyms of %r ignored: not a classifier label", MANIFEST, label)
            continue
        if not isinstance(phrases, list) or not all(
            isinstance(p, str) and p.strip() for p in phrases
        ):
            raise BundleError(f"{MANIFEST}: synonyms.{label} must be a list of non-empty strings")
        for phrase in phrases:
            taken = owner.setdefault(_norm_phrase(phrase), label)
            if taken != label:
                raise BundleError(
                    f"{MANIFEST}: synonym {phrase!r} names both {taken!r} and {label!r}"
                )
        out[label] = [str(p) for p in phrases]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# load


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], str]:
    """(bundle root, manifest dict, sha256 of the manifest bytes) for a bundle folder or its
    manifest.json; checks only that the manifest is a JSON object."""
    p = Path(path)
    manifest_path = p if p.name == MANIFEST and p.is_file() else p / MANIFEST
    root = manifest_path.parent
    if not manifest_path.is_file():
        raise BundleError(f"missing file {MANIFEST} in {root}")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object")
    return root, manifest, hashlib.sha256(raw).hexdigest()


def encoder_dir(root: Path, manifest: dict[str, Any]) -> Path:
    enc_rel = _str(_obj(manifest, "encoder"), "path", where="encoder")
    return Path(enc_rel) if Path(enc_rel).is_absolute() else _inside(root, enc_rel)


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Verify and load the bundle at `path` (its folder, or its manifest.json)."""
    root, manifest, checksum = read_manifest(path)

    name = _str(manifest, "name")
    version = _str(manifest, "version")
    enc = _obj(manifest, "encoder")
    fmt = enc.get("format")
    if fmt not in ENCODER_FORMATS:
        raise BundleError(f"{MANIFEST}: encoder.format {fmt!r} is not one of {ENCODER_FORMATS}")
    enc_rel = _str(enc, "path", where="encoder")
    enc_dir = encoder_dir(root, manifest)
    enc_files = _obj(enc, "files", where="encoder")
    if fmt == ENCODER_FORMAT:
        required: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)
    else:
        required = (_str(enc, "weights", where="encoder"),)
    for req in required:
        if req not in enc_files:
            raise BundleError(f"{MANIFEST}: encoder.files does not list {req}")

    adapters = manifest.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise BundleError(f"{MANIFEST}: adapters must be an object")
    known = ("classifier", "segmenter", *QC_TASKS, "report")
    unknown = sorted(set(adapters) - set(known))
    if unknown:
        raise BundleError(f"{MANIFEST}: unknown adapters {unknown} (known: {list(known)})")

    # 1. every checksum, before any weights are read
    to_check: list[tuple[str, Path, str]] = []
    for rel, digest in enc_files.items():
        to_check.append((f"{enc_rel}/{rel}", _inside(enc_dir, rel), str(digest)))
    for kind in known:
        spec = adapters.get(kind)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise BundleError(f"{MANIFEST}: adapters.{kind} must be an object")
        if kind == "report":  # a folder of files (workers.models.report_adapter)
            from workers.models.report_adapter import report_files

            to_check.extend(report_files(root, spec))
            continue
        rel = _str(spec, "path", where=f"adapters.{kind}")
        if Path(rel).is_absolute():
            raise BundleError(f"{MANIFEST}: adapters.{kind}.path must be relative: {rel}")
        to_check.append((rel, _inside(root, rel), _str(spec, "sha256", where=f"adapters.{kind}")))
    for label, file, expected in to_check:
        if not file.is_file():
            raise BundleError(f"missing file {label} (bundle {root})")
        actual = sha256_file(file)
        if actual != expected.lower():
            raise BundleError(
                f"checksum mismatch for {label}: manifest says {expected}, file has {actual}"
            )

    # 2. preprocessing: the manifest's (the adapters were trained with it), else the encoder's
    pre_file = _inside(enc_dir, PREPROCESSOR_FILE) if PREPROCESSOR_FILE in enc_files else None
    try:
        from_encoder = read_preprocessing(pre_file) if pre_file is not None else None
    except HFLoadError as exc:
        raise BundleError(f"{enc_rel}/{exc}") from exc
    if manifest.get("preprocessing") is not None:
        try:
            preprocessing = Preprocessing.from_dict(_obj(manifest, "preprocessing"))
        except ValueError as exc:
            raise BundleError(f"{MANIFEST}: preprocessing: {exc}") from exc
        if from_encoder is not None and from_encoder != preprocessing:
            log.warning("bundle %s: manifest preprocessing overrides %s", name, PREPROCESSOR_FILE)
    elif from_encoder is not None:
        preprocessing = from_encoder
    else:
        raise BundleError(f"{MANIFEST}: no preprocessing and no {PREPROCESSOR_FILE} listed")

    # 3. weights
    encoder, cfg = _load_encoder(enc, enc_dir, enc_rel, str(fmt))
    if preprocessing.size % cfg.patch_size:
        log.warning(
            "bundle %s: input size %d is not a multiple of the patch size %d; the border is unused",
            name,
            preprocessing.size,
            cfg.patch_size,
        )

    classifier: ClassificationHead | None = None
    labels: list[str] = []
    thresholds: list[float] = []
    cls_spec = adapters.get("classifier")
    if cls_spec is not None:
        labels = _str_list(cls_spec, "labels", "adapters.classifier")
        thresholds = [float(t) for t in _list(cls_spec, "thresholds", "adapters.classifier")]
        if not labels or len(thresholds) != len(labels):
            raise BundleError(
                f"{MANIFEST}: adapters.classifier needs one threshold per label "
                f"({len(labels)} labels, {len(thresholds)} thresholds)"
            )
        if any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise BundleError(f"{MANIFEST}: adapters.classifier thresholds must be in 0..1")
        classifier = ClassificationHead(cfg.hidden_size, len(labels))
        _load_adapter(classifier, root, cls_spec["path"])

    segmenter: LinearSegHead | None = None
    seg_classes: list[str] = []
    seg_spec = adapters.get("segmenter")
    if seg_spec is not None:
        seg_classes = _str_list(seg_spec, "classes", "adapters.segmenter")
        if not seg_classes:
            raise BundleError(f"{MANIFEST}: adapters.segmenter.classes is empty")
        segmenter = LinearSegHead(cfg.hidden_size, len(seg_classes))
        _load_adapter(segmenter, root, seg_spec["path"])

    qc_heads: dict[str, QCHead] = {}
    for task in QC_TASKS:
        spec = adapters.get(task)
        if spec is None:
            continue
        qc_labels = _str_list(spec, "labels", f"adapters.{task}")
        if len(qc_labels) < 2:
            raise BundleError(f"{MANIFEST}: adapters.{task}.labels needs at least 2 labels")
        head = ClassificationHead(cfg.hidden_size, len(qc_labels))
        _load_adapter(head, root, spec["path"])
        qc_heads[task] = QCHead(task=task, head=head, labels=qc_labels)

    report = None
    if adapters.get("report") is not None:
        from workers.models.report_adapter import ReportAdapterError, load_report_adapter

        try:
            report = load_report_adapter(root, adapters["report"], cfg.hidden_size)
        except ReportAdapterError as exc:
            raise BundleError(str(exc)) from exc

    is_demo = bool(manifest.get("random_weights", False))
    intended = manifest.get("intended") or {}
    triage_policy = TriagePolicy.from_manifest(manifest.get("triage_policy"))
    synonyms = read_synonyms(manifest.get("synonyms"), labels)
    log.info(
        "bundle %s %s verified (manifest sha256 %s)%s",
        name,
        version,
        checksum[:12],
        " DEMO random weights" if is_demo else "",
    )
    return Bundle(
        root=root,
        name=name,
        version=version,
        encoder=encoder,
        encoder_config=cfg,
        classifier=classifier,
        segmenter=segmenter,
        labels=labels,
        thresholds=thresholds,
        seg_classes=seg_classes,
        preprocessing=preprocessing,
        is_demo=is_demo,
        checksum=checksum,
        intended=intended if isinstance(intended, dict) else {},
        qc_heads=qc_heads,
        encoder_format=str(fmt),
        manifest=manifest,
        triage_policy=triage_policy,
        synonyms=synonyms,
        report=report,
    )


def _load_encoder(
    enc: dict[str, Any], enc_dir: Path, enc_rel: str, fmt: str
) -> tuple[DinoViT, ViTConfig]:
    try:
        if fmt == ENCODER_FORMAT:
            encoder, cfg, _ = load_hf_dinov2(enc_dir, with_preprocessing=False)
            return encoder, cfg
        try:
            cfg = ViTConfig.from_dict(_obj(enc, "config", where="encoder"))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{MANIFEST}: encoder.config: {exc}") from exc
        weights = _inside(enc_dir, _str(enc, "weights", where="encoder"))
        return load_dinov2_original(weights, cfg)
    except (HFLoadError, Dinov2LoadError) as exc:
        raise BundleError(f"encoder {enc_rel}: {exc}") from exc
    except RuntimeError as exc:  # load_state_dict shape mismatches
        raise BundleError(f"encoder {enc_rel}: {exc}") from exc


def _load_adapter(module: torch.nn.Module, root: Path, rel: str) -> None:
    try:
        state = load_file(str(_inside(root, rel)), device="cpu")
        module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except Exception as exc:  # safetensors errors, or missing/unexpected/mis-shaped keys
        raise BundleError(f"adapter {rel}: cannot load: {exc}") from exc
    module.eval()


def _inside(base: Path, rel: str) -> Path:
    """`base / rel`, refusing paths that leave `base`."""
    target = (base / rel).resolve()
    if not target.is_relative_to(base.resolve()):
        raise BundleError(f"{MANIFEST}: path {rel!r} leaves the folder {base}")
    return target


def _obj(d: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise BundleError(f"{MANIFEST}: {where + '.' if where else ''}{key} must be an object")
    return v


def _str(d: dict[str, Any], key: str, where: str = "") -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise BundleError(f"{MANIFEST}: {where + '.' if where else ''}{key} must be a string")
    return v


def _list(d: dict[str, Any], key: str, where: str) -> list[Any]:
    v = d.get(key)
    if not isinstance(v, list):
        raise BundleError(f"{MANIFEST}: {where}.{key} must be a list")
    return v


def _str_list(d: dict[str, Any], key: str, where: str) -> list[str]:
    v = _list(d, key, where)
    if not all(isinstance(x, str) and x for x in v):
        raise BundleError(f"{MANIFEST}: {where}.{key} must be a list of strings")
    return list(v)


# --------------------------------------------------------------------------------------------
# writing bundles (import, training, demo)


def save_adapter(module: torch.nn.Module, root: Path, kind: str, **meta: Any) -> dict[str, Any]:
    """Write `module` to `root/adapters/<kind>.safetensors`; returns its manifest entry
    (`path`, `sha256` and `meta`)."""
    rel = f"adapters/{kind}.safetensors"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_module(module, path)
    return {"path": rel, "sha256": sha256_file(path), **meta}


def place_file(src: Path, dst: Path, mode: str = "copy") -> Path:
    """Put `src` at `dst`: `copy`, `link` (hard link, a copy across file systems) or `symlink`
    (absolute). Checksums are taken of the result, so any mode is verified at load time."""
    if mode not in ("copy", "link", "symlink"):
        raise ValueError(f"mode must be copy, link or symlink, got {mode!r}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve():
            return dst
        dst.unlink()
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return dst
    if mode == "link":
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    return replace_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (last: a bundle is complete once it exists)."""
    path = root / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


# --------------------------------------------------------------------------------------------
# the DEMO bundle


def write_demo_bundle(
    path: str | os.PathLike[str],
    seed: int = 0,
    *,
    config: ViTConfig | None = None,
    kind: str = "chest",
) -> Path:
    """Write a DEMO bundle with seeded random weights (ViT-S/14 at 224 px, or `config` at its
    native size: tests use tiny encoders) to `path`.

    Deterministic for a given seed. The heads' scales and biases are set from the encoder's
    outputs on a few seeded synthetic images, so that probabilities spread around the thresholds
    and masks are neither empty nor full: the outputs exercise every downstream path but mean
    nothing. The quality-control heads are near-uniform (no class above 0.5), so they never
    refuse an image. ``kind`` "multi-anatomy" writes the second demo pipeline (other labels,
    any body part). Both carry a triage policy. Returns the bundle folder.
    """
    if kind not in ("chest", "multi-anatomy"):
        raise ValueError(f"unknown demo bundle kind {kind!r}")
    multi = kind == "multi-anatomy"
    labels = DEMO_MULTI_LABELS if multi else DEMO_LABELS
    root = Path(path)
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    cfg = config or ViTConfig.vit_small(image_size=224)
    encoder = DinoViT(cfg)
    init_weights(encoder, gen)
    encoder.eval()
    pre = Preprocessing(size=cfg.image_size, mean=DEMO_MEAN, std=DEMO_STD)

    classifier = ClassificationHead(cfg.hidden_size, len(DEMO_LABELS))
    segmenter = LinearSegHead(cfg.hidden_size, len(DEMO_SEG_CLASSES))
    _calibrate_demo_heads(encoder, classifier, segmenter, pre, gen, seed)
    qc_modules: dict[str, ClassificationHead] = {}
    for task, qc_labels in QC_LABELS.items():
        head = ClassificationHead(cfg.hidden_size, len(qc_labels))
        with torch.no_grad():
            # logits of std about 0.2: near-uniform probabilities
            scale = 0.2 / float(np.sqrt(2 * cfg.hidden_size))
            head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=gen) * scale)
            head.linear.bias.zero_()
        qc_modules[task] = head

    enc_files = save_hf_layout(encoder, cfg, root / "encoder", pre)
    adapters: dict[str, Any] = {
        "classifier": save_adapter(
            classifier, root, "classifier", labels=labels, thresholds=[0.5] * len(labels)
        ),
        "segmenter": save_adapter(segmenter, root, "segmenter", classes=DEMO_SEG_CLASSES),
    }
    for task, head in qc_modules.items():
        adapters[task] = save_adapter(head, root, task, labels=QC_LABELS[task])

    manifest = {
        "name": f"pacs-agent {kind} demo - DEMO (random weights)",
        "version": "0.1.0-demo",
        "description": "Seeded random weights for testing the plumbing. Not for clinical use: "
        "its outputs mean nothing.",
        "encoder": {
            "format": ENCODER_FORMAT,
            "path": "encoder",
            "files": {f.name: sha256_file(f) for f in enc_files},
        },
        "adapters": adapters,
        "preprocessing": pre.to_dict(),
        "random_weights": True,
        "seed": seed,
        "intended": {} if multi else {"anatomy": "chest", "views": ["PA", "AP"]},
        "triage_policy": DEMO_MULTI_TRIAGE_POLICY if multi else DEMO_TRIAGE_POLICY,
        "synonyms": DEMO_MULTI_SYNONYMS if multi else DEMO_SYNONYMS,
    }
    write_manifest(root, manifest)
    log.info("DEMO bundle (random weights, seed %d) written to %s", seed, root)
    return root


@torch.no_grad()
def _calibrate_demo_heads(
    encoder: DinoViT,
    classifier: ClassificationHead,
    segmenter: LinearSegHead,
    pre: Preprocessing,
    gen: torch.Generator,
    seed: int,
) -> None:
    """Random head directions, made to respond to structure rather than overall brightness.

    A random ViT's tokens mostly encode whether a patch is brighter than the normalisation
    mean, so a plain random head gives all-or-nothing masks on real radiographs. The
    directions taken by flat grey images (and the mean token) are projected out of the random
    weights, then scale and bias are set from a few seeded synthetic images.
    """
    from workers.imaging import letterbox, normalize

    def encode(imgs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([normalize(letterbox(i, pre.size)[0], pre) for i in imgs])
        out = encoder(batch)
        feats = torch.cat((out.cls_token, out.patch_tokens.mean(1)), dim=-1)
        return feats, out.patch_tokens.reshape(-1, out.patch_tokens.shape[-1])

    flat_feats, flat_tokens = encode(
        [np.full((pre.size, pre.size), v, dtype=np.float32) for v in np.linspace(0, 1, 6)]
    )
    feats, tokens = encode(_calibration_images(seed))

    def structural(w: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        q, _ = torch.linalg.qr(span.T)  # orthonormal basis of the brightness directions
        return w - (w @ q) @ q.T

    # classifier: logits with std 1.5 across the images, centred on a per-label offset in [-1, 1]
    span = torch.cat((flat_feats, feats.mean(0, keepdim=True)))
    w = structural(torch.randn(len(DEMO_LABELS), feats.shape[1], generator=gen), span)
    w = w * (1.5 / (feats @ w.T).std(0).clamp_min(1e-6))[:, None]
    offsets = torch.rand(len(DEMO_LABELS), generator=gen) * 2 - 1
    bias = offsets - (feats @ w.T).mean(0)
    classifier.linear.weight.copy_(_round(w))
    classifier.linear.bias.copy_(_round(bias))

    # segmenter: token logits with std 3 and median 0, so masks cover part of the image
    span = torch.cat(
        (flat_tokens.reshape(6, -1, tokens.shape[1]).mean(1), tokens.mean(0, keepdim=True))
    )
    w = structural(torch.randn(len(DEMO_SEG_CLASSES), tokens.shape[1], generator=gen), span)
    w = w * (3.0 / (tokens @ w.T).std(0).clamp_min(1e-6))[:, None]
    bias = -(tokens @ w.T).median(0).values
    segmenter.linear.weight.copy_(_round(w))
    segmenter.linear.bias.copy_(_round(bias))


def _calibration_images(seed: int) -> list[np.ndarray]:
    """Varied synthetic inputs: chest-like phantoms of several shapes, noise, a ramp."""
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    for rows, cols in ((320, 280), (260, 340), (300, 300), (360, 220), (240, 240)):
        y, x = np.mgrid[0:rows, 0:cols]
        u, v = (x + 0.5) / cols - 0.5, (y + 0.5) / rows - 0.5
        img = np.full((rows, cols), 0.1)
        img[(u / 0.45) ** 2 + (v / 0.48) ** 2 < 1] = 0.7  # body
        for side in (-1, 1):  # lungs
            img[((u - side * 0.2) / 0.15) ** 2 + ((v + 0.05) / 0.33) ** 2 < 1] = 0.3
        img += 0.05 * rng.standard_normal((rows, cols))
        images.append(np.clip(img, 0, 1).astype(np.float32))
    images.append(rng.random((280, 360)).astype(np.float32))
    images.append(np.tile(np.linspace(0, 1, 300, dtype=np.float32), (240, 1)))
    return images


def _round(t: torch.Tensor) -> torch.Tensor:
    # Calibration runs float math whose last bits may differ between machines; rounding keeps
    # the written weights (and the manifest checksum) the same everywhere for a seed.
    return torch.round(t * 1e4) / 1e4


def _save_module(module: torch.nn.Module, path: Path) -> None:
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()
    }
    atomic_save_safetensors(tensors, path)


def write_derived_bundle(
    parent: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    new_adapters: dict[str, dict[str, Any]],
    updates: dict[str, Any],
    mode: str = "link",
) -> Path:
    """A new bundle at `out` from the bundle `parent`: the same encoder (files linked or copied;
    an absolute encoder path stays as it is), the parent's adapters except those in
    `new_adapters` (entries from `save_adapter(..., out, ...)`, already written), manifest keys
    from `updates`, and a `parent` record. Every checksum is recomputed. Returns `out`."""
    p_root, manifest, p_checksum = read_manifest(parent)
    root = Path(out)
    if root.resolve() == p_root.resolve():
        raise BundleError("the new bundle must go to another folder than its parent")
    root.mkdir(parents=True, exist_ok=True)
    enc = dict(_obj(manifest, "encoder"))
    enc_rel = _str(enc, "path", where="encoder")
    if not Path(enc_rel).is_absolute():
        src_dir = encoder_dir(p_root, manifest)
        files: dict[str, str] = {}
        for rel in _obj(enc, "files", where="encoder"):
            dst = place_file(_inside(src_dir, rel), root / enc_rel / rel, mode)
            files[rel] = sha256_file(dst)
            if files[rel] != enc["files"][rel]:
                raise BundleError(f"checksum mismatch for {enc_rel}/{rel} in the parent bundle")
        enc["files"] = files
    adapters: dict[str, Any] = {}
    for kind, spec in (manifest.get("adapters") or {}).items():
        if kind in new_adapters:
            continue
        rel = _str(spec, "path", where=f"adapters.{kind}")
        if isinstance(spec.get("files"), dict):  # a folder adapter (report)
            copied = {
                name: sha256_file(
                    place_file(
                        _inside(p_root, f"{rel}/{name}"), _inside(root, f"{rel}/{name}"), mode
                    )
                )
                for name in spec["files"]
            }
            adapters[kind] = {**spec, "files": copied}
            continue
        dst = place_file(_inside(p_root, rel), _inside(root, rel), mode)
        adapters[kind] = {**spec, "sha256": sha256_file(dst)}
    adapters.update(new_adapters)
    derived = {
        **manifest,
        "encoder": enc,
        "adapters": adapters,
        "parent": {
            "name": manifest.get("name"),
            "version": manifest.get("version"),
            "manifest_sha256": p_checksum,
        },
        **updates,
    }
    write_manifest(root, derived)
    return root
