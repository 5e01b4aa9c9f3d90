"""Adapter training and subgroup audit on a small synthetic data set whose answer is known.

48 tiny radiographs (112 x 112, written with pydicom): a bright disc is present in half of them
(label `Disc`, mask = the disc). A tiny random encoder (ViT, width 64, 2 layers, 112 px) gives
features in which the disc is linearly visible, so a trained linear probe must reach a held-out
AUROC near 1 and the segmenter a real Dice. The audit flips the labels of manufacturer B and must
flag that subgroup.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from workers import model_cli
from workers.models.bundle import load_bundle, write_demo_bundle
from workers.models.runner import ModelRunner
from workers.models.vit import ViTConfig
from workers.training.metrics import auroc, auroc_estimate, bootstrap_ci, dice

N_IMAGES = 48
SIZE = 112


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    sex: str,
    age: int,
    manufacturer: str,
    view: str,
    patient: str,
) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = patient
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.Manufacturer = manufacturer
    ds.ViewPosition = view
    ds.set_pixel_data(pixels.astype(np.uint16), "MONOCHROME2", 12, generate_instance_uid=False)
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.save_as(path, enforce_file_format=True)
    return str(sop)


def make_dataset(root: Path, seed: int = 0) -> tuple[Path, Path, Path, list[dict[str, object]]]:
    """DICOMs, labels.csv and masks/ under `root`; returns the rows written."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rows: list[dict[str, object]] = []
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(N_IMAGES):
        disc = i % 2 == 0
        img = 900 + 300 * (y / SIZE) + rng.normal(0, 120, (SIZE, SIZE))
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        if disc:
            r = rng.uniform(14, 24)
            cy, cx = rng.uniform(r + 4, SIZE - r - 4, 2)
            mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
            img[mask] += 1800
        name = f"img{i:03d}"
        write_dicom(
            images / f"{name}.dcm",
            np.clip(img, 0, 4095),
            sex="MF"[(i // 8) % 2],
            age=int(rng.integers(20, 90)),
            manufacturer="AB"[(i // 2) % 2],
            view=("PA", "AP")[(i // 4) % 2],
            patient=f"P{i:03d}",
        )
        np.save(masks / f"{name}.npy", mask)
        rows.append({"filename": f"{name}.dcm", "Disc": int(disc)})
    labels = root / "labels.csv"
    _write_csv(labels, rows)
    return images, labels, masks, rows


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=14
    )
    return write_demo_bundle(tmp_path_factory.mktemp("tiny") / "bundle", seed=3, config=cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[dict]]:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(
    tiny_bundle: Path,
    dataset: tuple[Path, Path, Path, list[dict]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    images, labels, masks, _ = dataset
    tmp = tmp_path_factory.mktemp("trained")
    paths = {"bundle": tmp / "b2", "cache": tmp / "cache", "json": tmp / "report.json"}
    rc = model_cli.main(
        [
            "adapters",
            "train",
            "--bundle",
            str(tiny_bundle),
            "--data",
            str(images),
            "--labels",
            str(labels),
            "--masks",
            str(masks),
            "--classes",
            "Disc",
            "--out",
            str(paths["bundle"]),
            "--cache",
            str(paths["cache"]),
            "--bootstrap",
            "300",
            "--json",
            str(paths["json"]),
        ]
    )
    assert rc == 0
    return paths


def test_train_learns_and_writes_an_evaluated_bundle(
    trained: dict[str, Path], tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(trained["json"].read_text())
    disc = report["auroc"]["Disc"]
    print(
        f"held-out AUROC {disc['value']:.3f} [{disc['lo']:.3f}, {disc['hi']:.3f}] "
        f"n={disc['n']}; Dice {report['dice']['Disc']['value']:.3f}"
    )
    assert report["n_test"] >= 12 and disc["n"] == report["n_test"]
    assert disc["value"] > 0.9 and disc["lo"] > 0.7  # learnt, not just run
    assert report["dice"]["Disc"]["value"] > 0.7
    b = load_bundle(trained["bundle"])  # checksums verified
    parent = load_bundle(tiny_bundle)
    assert b.labels == ["Disc"] and b.seg_classes == ["Disc"]
    assert b.is_demo  # the encoder is still random: the bundle must keep saying so
    assert b.version != parent.version
    assert b.manifest["parent"]["manifest_sha256"] == parent.checksum
    assert set(b.qc_heads) == {"view", "body_part"}  # untouched adapters carried over
    assert b.manifest["evaluation"]["auroc"]["Disc"]["value"] == disc["value"]
    # the trained bundle works in the runner: a disc image scores higher than a plain one
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    plain = (900 + 300 * (y / SIZE) + rng.normal(0, 120, (SIZE, SIZE))) / 4096
    disc_img = plain.copy()
    inside = (y - 50) ** 2 + (x - 60) ** 2 < 20**2
    disc_img[inside] += 1800 / 4096
    r_plain, r_disc = ModelRunner(b).run(
        [("1", plain.astype(np.float32)), ("2", disc_img.astype(np.float32))]
    )
    assert r_disc.findings[0].probability > r_plain.findings[0].probability
    assert r_disc.findings[0].present and not r_plain.findings[0].present
    iou = (r_disc.masks[0] & inside).sum() / (r_disc.masks[0] | inside).sum()
    assert iou > 0.5, iou
    cam = r_disc.extra["cam"]["Disc"]  # type: ignore[index]
    assert cam[inside].mean() > cam[~inside].mean()  # the CAM points at the disc


def test_features_come_from_the_cache_the_second_time(
    trained: dict[str, Path],
    tiny_bundle: Path,
    dataset: tuple[Path, Path, Path, list[dict]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, labels, _, rows = dataset
    # negative control: a label independent of the image (half positive among disc images,
    # half among the others), so nothing in the features can predict it
    rng = np.random.default_rng(0)
    shuffled = [dict(r) for r in rows]
    for has_disc in (0, 1):
        idx = [i for i, r in enumerate(rows) if r["Disc"] == has_disc]
        positive = set(rng.permutation(idx)[: len(idx) // 2].tolist())
        for i in idx:
            shuffled[i]["Disc"] = int(i in positive)
    _write_csv(tmp_path / "shuffled.csv", shuffled)
    capsys.readouterr()
    rc = model_cli.main(
        [
            "adapters",
            "train",
            "--bundle",
            str(tiny_bundle),
            "--data",
            str(images),
            "--labels",
            str(tmp_path / "shuffled.csv"),
            "--out",
            str(tmp_path / "b3"),
            "--cache",
            str(trained["cache"]),
            "--bootstrap",
            "200",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert f"features: {N_IMAGES} of {N_IMAGES} from the cache" in out
    shuffled_auroc = json.loads((tmp_path / "r.json").read_text())["auroc"]["Disc"]["value"]
    print(f"independent-label held-out AUROC {shuffled_auroc:.3f}")
    assert shuffled_auroc < 0.8


def test_audit_flags_the_subgroup_with_flipped_labels(
    trained: dict[str, Path],
    dataset: tuple[Path, Path, Path, list[dict]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, _, masks, rows = dataset
    flipped = []
    for i, r in enumerate(rows):
        r = dict(r)
        if "AB"[(i // 2) % 2] == "B":  # manufacturer B: labels flipped
            r["Disc"] = 1 - int(r["Disc"])  # type: ignore[call-overload]
        flipped.append(r)
    _write_csv(tmp_path / "flipped.csv", flipped)
    out_json = tmp_path / "audit.json"
    capsys.readouterr()
    rc = model_cli.main(
        [
            "adapters",
            "audit",
            "--bundle",
            str(trained["bundle"]),
            "--data",
            str(images),
            "--labels",
            str(tmp_path / "flipped.csv"),
            "--masks",
            str(masks),
            "--cache",
            str(trained["cache"]),
            "--bootstrap",
            "300",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    print(table)
    assert "manufacturer" in table and "FLAG" in table
    report = json.loads(out_json.read_text())
    rows_by = {(r["metric"], r["attribute"], r["group"]): r for r in report["rows"]}
    b, a = rows_by[("AUROC", "manufacturer", "B")], rows_by[("AUROC", "manufacturer", "A")]
    overall = rows_by[("AUROC", "overall", "all")]
    assert b["flagged"] and b["gap"] < -0.3 and b["value"] < 0.2 and b["hi"] < overall["value"]
    assert a["value"] > 0.9 and a["gap"] > 0
    flagged = {(r["attribute"], r["group"]) for r in report["flagged"] if r["metric"] == "AUROC"}
    assert ("manufacturer", "B") in flagged
    # every other attribute mixes A and B evenly: none of its groups drops like B
    for (metric, attr, _group), r in rows_by.items():
        if metric == "AUROC" and attr not in ("manufacturer", "overall") and r["value"] is not None:
            assert r["value"] > b["value"] + 0.2
    # segmentation does not depend on labels: its Dice rows exist
    assert rows_by[("Dice", "overall", "all")]["value"] > 0.7


# --------------------------------------------------------------------------------------------
# metrics and data errors


def test_auroc_matches_pairwise_definition_and_handles_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert auroc(y, s) == pytest.approx(pairwise)
    assert auroc(np.ones(5), np.arange(5)) != auroc(np.ones(5), np.arange(5))  # nan: one class
    e = auroc_estimate(y, s, n_boot=300, seed=1)
    assert e.lo <= e.value <= e.hi and e.n == 60 and e.n_pos == int(y.sum())
    lo, hi = bootstrap_ci(lambda idx: float(s[idx].mean()), len(s), 300, 0)
    assert lo < s.mean() < hi
    assert dice(np.ones((3, 3)), np.ones((3, 3))) == 1.0
    assert dice(np.eye(3), np.ones((3, 3))) == pytest.approx(2 * 3 / (3 + 9))
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_labelled_set_errors_name_the_row(
    dataset: tuple[Path, Path, Path, list[dict]], tmp_path: Path
) -> None:
    from workers.training.data import DataError, load_labelled_set

    images, _, _, rows = dataset
    bad = [dict(r) for r in rows[:4]]
    bad[2]["filename"] = "nope.dcm"
    _write_csv(tmp_path / "a.csv", bad)
    with pytest.raises(DataError, match="row 4: no DICOM file"):
        load_labelled_set(images, tmp_path / "a.csv")
    bad = [dict(r) for r in rows[:4]]
    bad[1]["Disc"] = "maybe"
    _write_csv(tmp_path / "b.csv", bad)
    with pytest.raises(DataError, match="row 3: column 'Disc'"):
        load_labelled_set(images, tmp_path / "b.csv")
