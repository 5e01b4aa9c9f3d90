"""A training or audit data set: a folder of DICOM files, a CSV of 0/1 labels, optional masks.

The CSV names each image by a key column, the first of `sop_instance_uid`, `sop`,
`SOPInstanceUID`, `file`, `filename`, `path` (a path relative to the data folder, or a file
name); every other column is a label with values 0/1 (empty = unknown), except `split`
(train/test, to fix the split) and `patient_id`. Masks, when given, are files in the masks folder
named after the DICOM file's stem or its SOP Instance UID: `.npy`/`.npz` arrays ([rows, columns]
binary or integer class indices 1..C, or [C, rows, columns]) or `.png` (non-zero = class 1).

Subgroup tags come from the DICOM header: Patient's Sex, an age band (Patient's Age, else Birth
Date vs Study Date), Manufacturer and View Position. Patient identifiers are only hashed (for a
patient-level split) and never logged.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

__all__ = [
    "AGE_BANDS",
    "DataError",
    "LabelledSet",
    "Sample",
    "age_band",
    "load_labelled_set",
    "read_mask",
    "subgroup_tags",
]

KEY_COLUMNS = ("sop_instance_uid", "sop", "sopinstanceuid", "file", "filename", "path")
META_COLUMNS = ("split", "patient_id", "patientid")
AGE_BANDS = (
    (0, 18, "<18"),
    (18, 40, "18-39"),
    (40, 60, "40-59"),
    (60, 80, "60-79"),
    (80, 200, "80+"),
)
SUBGROUP_ATTRIBUTES = ("sex", "age_band", "manufacturer", "view")
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


class DataError(ValueError):
    """The data set cannot be used; the message names the file, row or column."""


@dataclass
class Sample:
    path: Path
    sop: str
    sha256: str
    labels: np.ndarray  # float [L]: 1, 0, nan (unknown)
    tags: dict[str, str]
    group: str  # hashed patient id (or the SOP UID) for a patient-level split
    split: str | None = None
    mask_path: Path | None = None


@dataclass
class LabelledSet:
    samples: list[Sample]
    labels: list[str]
    classes: list[str] = field(default_factory=list)  # segmentation classes when masks given

    @property
    def y(self) -> np.ndarray:
        return np.stack([s.labels for s in self.samples]) if self.samples else np.zeros((0, 0))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def age_band(ds: Dataset) -> str:
    years = _age_years(ds)
    if years is None:
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= years < hi:
            return name
    return "unknown"


def _age_years(ds: Dataset) -> float | None:
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        n = int(age[:3])
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[3]]
    birth = _date(ds.get("PatientBirthDate"))
    study = _date(ds.get("StudyDate")) or _date(ds.get("AcquisitionDate"))
    if birth is None or study is None or study < birth:
        return None
    return (study - birth).days / 365.25


def _date(value: object) -> date | None:
    s = str(value or "").strip()
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return None


def subgroup_tags(ds: Dataset) -> dict[str, str]:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {
        "sex": sex if sex in ("M", "F", "O") else "unknown",
        "age_band": age_band(ds),
        "manufacturer": str(ds.get("Manufacturer", "") or "").strip() or "unknown",
        "view": str(ds.get("ViewPosition", "") or "").strip().upper() or "unknown",
    }


def _index_dicoms(root: Path) -> dict[str, tuple[Path, Dataset]]:
    """SOP Instance UID -> (path, header) for every DICOM file under `root`."""
    out: dict[str, tuple[Path, Dataset]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if not sop:
            continue
        if sop in out:
            raise DataError(f"SOP Instance UID {sop} appears twice: {out[sop][0]} and {path}")
        out[sop] = (path, ds)
    return out


def _parse_label(value: str, row: int, column: str, csv_path: Path) -> float:
    v = value.strip().lower()
    if v == "" or v in ("nan", "na", "-1"):
        return float("nan")
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    raise DataError(f"{csv_path.name} row {row}: column {column!r} has {value!r}, expected 0 or 1")


def load_labelled_set(
    data_dir: str | Path,
    labels_csv: str | Path,
    masks_dir: str | Path | None = None,
    *,
    label_columns: list[str] | None = None,
    classes: list[str] | None = None,
) -> LabelledSet:
    """Read the CSV, match each row to a DICOM file under `data_dir` and its mask."""
    root = Path(data_dir)
    csv_path = Path(labels_csv)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if not csv_path.is_file():
        raise DataError(f"labels file {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    lower = {h.lower(): h for h in header}
    key_col = next((lower[k] for k in KEY_COLUMNS if k in lower), None)
    if key_col is None:
        raise DataError(f"{csv_path.name}: no key column (one of {list(KEY_COLUMNS)})")
    split_col = lower.get("split")
    patient_col = lower.get("patient_id") or lower.get("patientid")
    if label_columns is None:
        label_columns = [h for h in header if h != key_col and h.lower() not in META_COLUMNS]
    else:
        missing = [c for c in label_columns if c not in header]
        if missing:
            raise DataError(f"{csv_path.name}: no column(s) {missing}")
    if not label_columns:
        raise DataError(f"{csv_path.name}: no label columns")

    index = _index_dicoms(root)
    by_name: dict[str, str] = {}
    for uid, (path, _) in index.items():
        by_name.setdefault(str(path.relative_to(root)), uid)
        by_name.setdefault(path.name, uid)
        by_name.setdefault(path.stem, uid)

    samples: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        key = (row.get(key_col) or "").strip()
        sop = key if key in index else by_name.get(key)
        if sop is None:
            raise DataError(f"{csv_path.name} row {i}: no DICOM file for {key_col} {key!r}")
        if sop in seen:
            raise DataError(f"{csv_path.name} row {i}: image {key!r} listed twice")
        seen.add(sop)
        path, ds = index[sop]
        labels = np.array([_parse_label(row.get(c) or "", i, c, csv_path) for c in label_columns])
        patient = (row.get(patient_col) if patient_col else None) or str(ds.get("PatientID", ""))
        group = hashlib.sha256(patient.encode()).hexdigest()[:16] if patient else sop
        split = (row.get(split_col) or "").strip().lower() if split_col else ""
        if split and split not in ("train", "test"):
            raise DataError(f"{csv_path.name} row {i}: split {split!r} is not train or test")
        samples.append(
            Sample(
                path=path,
                sop=sop,
                sha256=_sha256(path),
                labels=labels,
                tags=subgroup_tags(ds),
                group=group,
                split=split or None,
            )
        )
    if not samples:
        raise DataError(f"{csv_path.name}: no rows")

    found_classes: list[str] = []
    if masks_dir is not None:
        mroot = Path(masks_dir)
        if not mroot.is_dir():
            raise DataError(f"masks folder {mroot} does not exist")
        n_classes = 0
        for s in samples:
            s.mask_path = _find_mask(mroot, s)
            if s.mask_path is not None:
                rows_, cols_ = int(index[s.sop][1].Rows), int(index[s.sop][1].Columns)
                n_classes = max(n_classes, read_mask(s.mask_path, (rows_, cols_)).shape[0])
        if n_classes == 0:
            raise DataError(f"no mask in {mroot} matches an image")
        if classes is not None and len(classes) < n_classes:
            raise DataError(f"masks hold {n_classes} classes but {len(classes)} names are given")
        found_classes = list(classes) if classes else [f"class {k + 1}" for k in range(n_classes)]
    log.info(
        "data set: %d images, labels %s, %d with masks",
        len(samples),
        label_columns,
        sum(s.mask_path is not None for s in samples),
    )
    return LabelledSet(samples=samples, labels=list(label_columns), classes=found_classes)


def _find_mask(mroot: Path, s: Sample) -> Path | None:
    for stem in (s.path.stem, s.sop, s.path.name):
        for ext in (".npy", ".npz", ".png"):
            p = mroot / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def read_mask(path: Path, shape: tuple[int, int], n_classes: int | None = None) -> np.ndarray:
    """A mask file -> bool [C, rows, columns]."""
    try:
        if path.suffix == ".png":
            from PIL import Image

            arr = np.asarray(Image.open(path)) != 0
            if arr.ndim == 3:
                arr = arr.any(axis=-1)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                arr = z["mask"] if "mask" in z.files else z[z.files[0]]
        else:
            arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"mask {path.name}: cannot read: {exc}") from exc
    arr = np.asarray(arr)
    if arr.ndim == 2:
        if arr.dtype == bool or arr.max(initial=0) <= 1:
            stack = arr.astype(bool)[None]
        else:
            k = int(arr.max())
            stack = np.stack([arr == c for c in range(1, k + 1)])
    elif arr.ndim == 3:
        stack = arr.astype(bool)
    else:
        raise DataError(
            f"mask {path.name}: shape {arr.shape} is not [rows, cols] or [C, rows, cols]"
        )
    if tuple(stack.shape[1:]) != tuple(shape):
        raise DataError(f"mask {path.name}: {stack.shape[1:]} does not match the image {shape}")
    if n_classes is not None and stack.shape[0] < n_classes:
        pad = np.zeros((n_classes - stack.shape[0], *stack.shape[1:]), dtype=bool)
        stack = np.concatenate([stack, pad])
    return stack


def split_indices(
    samples: list[Sample], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: the CSV's `split` column when every row has one, else a seeded
    patient-level split stratified by whether a patient has any positive label."""
    if all(s.split for s in samples):
        train = np.array([i for i, s in enumerate(samples) if s.split == "train"], dtype=int)
        test = np.array([i for i, s in enumerate(samples) if s.split == "test"], dtype=int)
        return train, test
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group, []).append(i)
    strata: dict[bool, list[str]] = {True: [], False: []}
    for g, idx in sorted(groups.items()):
        positive = any(np.nan_to_num(samples[i].labels, nan=0.0).max(initial=0) > 0 for i in idx)
        strata[positive].append(g)
    rng = np.random.default_rng(seed)
    test_groups: set[str] = set()
    for members in strata.values():
        order = rng.permutation(len(members))
        k = int(math.floor(test_fraction * len(members) + 0.5))
        test_groups.update(members[j] for j in order[:k])
    test = np.array(sorted(i for g in test_groups for i in groups[g]), dtype=int)
    train = np.array(sorted(set(range(len(samples))) - set(test.tolist())), dtype=int)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{len(samples)} images are too few for a train/test split")
    return train, test
