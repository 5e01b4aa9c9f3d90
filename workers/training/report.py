"""`pacs-agent adapters train-report`: a report-generation adapter on frozen encoder features.

A folder of DICOMs and a CSV of report texts -> frozen patch tokens (extracted once and cached
by file sha256, ``features.py``) -> a :class:`~workers.models.report_adapter.ReportAdapter`
(prefix projector + a small GPT-2 with random initial weights + a word-level tokenizer built from
the training texts) trained with next-token cross-entropy, the encoder frozen -> held-out
evaluation of the untrained and the trained adapter (exact match, word accuracy) -> a new bundle
with the adapter and the evaluation in its manifest.

The CSV names each image by a key column, as for ``adapters train`` (``sop_instance_uid``,
``sop``, ``file``, ``filename``, ``path`` ...), has a ``text`` (or ``report``) column, and may
have a ``split`` column (train/test) to fix the split. Texts are training data, never logged.

:func:`synthetic_disc_set` writes the synthetic proof set: images with one bright disc at one of
nine positions (upper/middle/lower x left/centre/right), small or large, and texts that say so.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.models.bundle import load_bundle, write_derived_bundle
from workers.models.report_adapter import (
    REPORT_KIND,
    PrefixProjector,
    ReportAdapter,
    build_tokenizer,
    new_language_model,
    save_report_adapter,
)
from workers.training.data import KEY_COLUMNS, DataError, Sample, _index_dicoms, split_indices
from workers.training.features import extract_features

log = logging.getLogger(__name__)

__all__ = [
    "POSITIONS",
    "ReportTrainOptions",
    "ReportTrainReport",
    "TextSet",
    "load_text_set",
    "position_of",
    "synthetic_disc_set",
    "train_report_adapter",
]

TEXT_COLUMNS = ("text", "report", "findings")


@dataclass
class ReportTrainOptions:
    test_fraction: float = 0.25
    seed: int = 0
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    prefix_grid: int = 8
    max_new_tokens: int = 24
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    name: str | None = None
    version: str | None = None
    link_mode: str = "link"
    trained_on: str = "user data"


@dataclass
class ReportTrainReport:
    bundle: Path
    n_train: int
    n_test: int
    exact_untrained: float
    exact_trained: float
    words_untrained: float
    words_trained: float
    final_loss: float
    seconds: float
    cache_hits: int = 0
    # held-out rows: key, reference, untrained text, trained text
    held_out: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_test": self.n_test,
            "exact_match": {"untrained": self.exact_untrained, "trained": self.exact_trained},
            "word_accuracy": {"untrained": self.words_untrained, "trained": self.words_trained},
            "final_loss": self.final_loss,
            "seconds": round(self.seconds, 1),
            "held_out": self.held_out,
        }

    def table(self) -> str:
        return "\n".join(
            [
                f"held-out evaluation: {self.n_train} train / {self.n_test} test images",
                f"{'adapter':<10} {'exact match':>12} {'word accuracy':>14}",
                f"{'untrained':<10} {self.exact_untrained:>12.3f} {self.words_untrained:>14.3f}",
                f"{'trained':<10} {self.exact_trained:>12.3f} {self.words_trained:>14.3f}",
                f"final training loss {self.final_loss:.4f}, {self.seconds:.1f} s",
            ]
        )


@dataclass
class TextSet:
    samples: list[Sample]
    texts: list[str]
    keys: list[str]


def load_text_set(data_dir: str | Path, texts_csv: str | Path) -> TextSet:
    """Match each CSV row to a DICOM file under ``data_dir``; errors name the row."""
    root, csv_path = Path(data_dir), Path(texts_csv)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if not csv_path.is_file():
        raise DataError(f"texts file {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    lower = {h.lower(): h for h in header}
    key_col = next((lower[k] for k in KEY_COLUMNS if k in lower), None)
    if key_col is None:
        raise DataError(f"{csv_path.name}: no key column (one of {list(KEY_COLUMNS)})")
    text_col = next((lower[k] for k in TEXT_COLUMNS if k in lower), None)
    if text_col is None:
        raise DataError(f"{csv_path.name}: no text column (one of {list(TEXT_COLUMNS)})")
    split_col = lower.get("split")
    index = _index_dicoms(root)
    by_name: dict[str, str] = {}
    for uid, (path, _) in index.items():
        by_name.setdefault(str(path.relative_to(root)), uid)
        by_name.setdefault(path.name, uid)
        by_name.setdefault(path.stem, uid)
    out = TextSet([], [], [])
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        key = (row.get(key_col) or "").strip()
        sop = key if key in index else by_name.get(key)
        if sop is None:
            raise DataError(f"{csv_path.name} row {i}: no DICOM file for {key_col} {key!r}")
        if sop in seen:
            raise DataError(f"{csv_path.name} row {i}: image {key!r} listed twice")
        seen.add(sop)
        text = " ".join((row.get(text_col) or "").split())
        if not text:
            raise DataError(f"{csv_path.name} row {i}: empty {text_col}")
        split = (row.get(split_col) or "").strip().lower() if split_col else ""
        if split and split not in ("train", "test"):
            raise DataError(f"{csv_path.name} row {i}: split {split!r} is not train or test")
        path, _ = index[sop]
        out.samples.append(
            Sample(
                path=path,
                sop=sop,
                sha256=_sha256(path),
                labels=np.zeros(0),
                tags={},
                group=sop,
                split=split or None,
            )
        )
        out.texts.append(text)
        out.keys.append(key)
    if not out.samples:
        raise DataError(f"{csv_path.name}: no rows")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def word_accuracy(reference: str, generated: str) -> float:
    """Share of the reference's words that the generated text has at the same place."""
    ref, gen = _words(reference), _words(generated)
    if not ref:
        return float(gen == [])
    return sum(a == b for a, b in zip(ref, gen, strict=False)) / max(len(ref), len(gen))


def _evaluate(
    adapter: ReportAdapter, patches: torch.Tensor, grid: tuple[int, int], refs: list[str]
) -> tuple[list[str], float, float]:
    adapter.eval()
    texts: list[str] = []
    for start in range(0, len(refs), 64):
        texts.extend(adapter.generate(patches[start : start + 64], grid))
    exact = float(np.mean([_words(t) == _words(r) for t, r in zip(texts, refs, strict=True)]))
    words = float(np.mean([word_accuracy(r, t) for t, r in zip(texts, refs, strict=True)]))
    return texts, exact, words


def train_report_adapter(
    bundle_path: str | Path,
    data_dir: str | Path,
    texts_csv: str | Path,
    out: str | Path,
    opt: ReportTrainOptions | None = None,
) -> ReportTrainReport:
    """Train a report adapter on the bundle's frozen encoder; write the new bundle to ``out``."""
    opt = opt or ReportTrainOptions()
    if opt.epochs < 0 or opt.batch_size < 1 or opt.prefix_grid < 1 or opt.max_new_tokens < 2:
        raise DataError("epochs >= 0, batch size >= 1, prefix grid >= 1, max tokens >= 2")
    t_start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    data = load_text_set(data_dir, texts_csv)
    train_idx, test_idx = split_indices(data.samples, opt.test_fraction, opt.seed)
    feats = extract_features(
        bundle, data.samples, opt.cache_dir, device=opt.device, dtype=opt.dtype
    )
    patches = torch.from_numpy(feats.patches.astype(np.float32))
    grid = feats.grid
    device = torch.device(opt.device)

    tokenizer = build_tokenizer([data.texts[i] for i in train_idx])
    prefix_grid = min(opt.prefix_grid, grid[0], grid[1])
    lm = new_language_model(
        tokenizer.get_vocab_size(),
        prefix_grid**2 + opt.max_new_tokens + 8,
        n_embd=opt.n_embd,
        n_layer=opt.n_layer,
        n_head=opt.n_head,
        seed=opt.seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opt.seed)
        projector = PrefixProjector(patches.shape[-1], opt.n_embd, prefix_grid)
    adapter = ReportAdapter(projector, lm, tokenizer, max_new_tokens=opt.max_new_tokens).to(device)

    test_refs = [data.texts[i] for i in test_idx]
    test_patches = patches[test_idx].to(device)
    untrained, exact0, words0 = _evaluate(adapter, test_patches, grid, test_refs)

    ids, mask = adapter.encode_texts([data.texts[i] for i in train_idx])
    train_patches = patches[train_idx].to(device)
    ids, mask = ids.to(device), mask.to(device)
    n = len(train_idx)
    steps_per_epoch = max(1, math.ceil(n / opt.batch_size))
    total = max(1, opt.epochs * steps_per_epoch)
    optim = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=opt.lr, total_steps=total, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(opt.seed)
    loss_value = float("nan")
    adapter.train()
    for epoch in range(opt.epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for start in range(0, n, opt.batch_size):
            b = order[start : start + opt.batch_size].to(device)
            width = int(mask[b].sum(1).max())
            loss = adapter.loss(train_patches[b], grid, ids[b, :width], mask[b, :width])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optim.step()
            sched.step()
            running += float(loss.detach()) * len(b)
        loss_value = running / n
        if epoch % 10 == 0 or epoch == opt.epochs - 1:
            log.info("report adapter epoch %d: loss %.4f", epoch, loss_value)
    trained, exact1, words1 = _evaluate(adapter, test_patches, grid, test_refs)

    report = ReportTrainReport(
        bundle=Path(out),
        n_train=n,
        n_test=len(test_idx),
        exact_untrained=exact0,
        exact_trained=exact1,
        words_untrained=words0,
        words_trained=words1,
        final_loss=loss_value,
        seconds=0.0,
        cache_hits=feats.cache_hits,
        held_out=[
            {"key": data.keys[i], "reference": r, "untrained": u, "trained": t}
            for i, r, u, t in zip(test_idx, test_refs, untrained, trained, strict=True)
        ],
    )
    out_root = Path(out)
    out_root.mkdir(parents=True, exist_ok=True)
    adapter.to("cpu")
    evaluation = {k: v for k, v in report.to_dict().items() if k != "held_out"}
    spec = save_report_adapter(
        adapter,
        out_root,
        lm_config={"type": "gpt2", "n_layer": opt.n_layer, "n_embd": opt.n_embd},
        trained_on=opt.trained_on,
        evaluation=evaluation,
    )
    parent_name = str(bundle.manifest.get("name", bundle.name))
    write_derived_bundle(
        bundle_path,
        out_root,
        new_adapters={REPORT_KIND: spec},
        updates={
            "name": opt.name or f"{parent_name} + report adapter",
            "version": opt.version or f"{bundle.version}+report",
        },
        mode=opt.link_mode,
    )
    report.seconds = time.perf_counter() - t_start
    log.info(
        "report adapter: exact match %.3f (untrained %.3f) on %d held-out images",
        exact1,
        exact0,
        len(test_idx),
    )
    return report


# --------------------------------------------------------------------------------------------
# the synthetic proof set

ROWS = ("upper", "middle", "lower")
COLUMNS = ("left", "centre", "right")
POSITIONS = tuple(f"{r} {c}" for r in ROWS for c in COLUMNS)
SIZES = ("small", "large")


def disc_text(row: int, col: int, size: str) -> str:
    where = "centre" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"
    return f"bright disc in the {where}, {size}"


def position_of(text: str) -> str | None:
    """The position a text states ("upper left", ..., "middle centre"), or None."""
    words = _words(text)
    if "centre" in words and not any(w in words for w in (*ROWS, "left", "right")):
        return "middle centre"
    row = next((w for w in words if w in ROWS), None)
    col = next((w for w in words if w in COLUMNS), None)
    return f"{row} {col}" if row and col else None


def disc_image(
    rng: np.random.Generator, row: int, col: int, size: str, pixels: int = 112
) -> np.ndarray:
    """A 12-bit image: noisy gradient background, one bright disc at the (row, col) cell."""
    y, x = np.mgrid[0:pixels, 0:pixels]
    cell = pixels / 3
    radius = (0.09 if size == "small" else 0.15) * pixels
    jitter = 0.12 * cell
    cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
    cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
    img = 900 + 300 * (y / pixels) + rng.normal(0, 120, (pixels, pixels))
    img[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] += 1800
    return np.clip(img, 0, 4095)


def synthetic_disc_set(
    root: str | Path, n: int, *, seed: int = 0, pixels: int = 112, test_every: int = 4
) -> tuple[Path, Path]:
    """Write ``n`` disc images (DICOM) to ``root/images`` and ``root/texts.csv`` (filename,
    text, split: every ``test_every``-th image is held out). Returns (images, texts.csv)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    base = Path(root)
    images = base / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        cls = int(rng.integers(0, 9 * len(SIZES)))
        row, col, size = cls // 6, (cls // 2) % 3, SIZES[cls % 2]
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "DX"
        ds.InstanceNumber = i + 1
        ds.set_pixel_data(
            disc_image(rng, row, col, size, pixels).astype(np.uint16),
            "MONOCHROME2",
            12,
            generate_instance_uid=False,
        )
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        name = f"disc{i:04d}.dcm"
        ds.save_as(images / name, enforce_file_format=True)
        split = "test" if i % test_every == test_every - 1 else "train"
        rows.append({"filename": name, "text": disc_text(row, col, size), "split": split})
    texts = base / "texts.csv"
    with texts.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "text", "split"])
        w.writeheader()
        w.writerows(rows)
    return images, texts
