"""Localization regions (``workers.localize``), the bundle's grounding vocabulary, and
``POST /api/grounding`` on SQLite and PostgreSQL; once through a real agent and worker process.

Nothing is mocked. The route tests run the worker's own code to make the rows they read
(``ModelRunner`` on the DEMO bundle, ``build_outputs``, ``workers.pipeline._store_outputs``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from pacs_agent import users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Job, JobStatus, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from pacs_agent.uids import derive_uid
from tests.conftest import AgentEnv, sample_path, storescu
from workers.imaging import letterbox_transform
from workers.localize import component, label_regions
from workers.models.bundle import (
    DEMO_LABELS,
    DEMO_SYNONYMS,
    BundleError,
    load_bundle,
    read_synonyms,
    write_manifest,
)

# --------------------------------------------------------------------------- localize


def test_component_is_the_connected_part_holding_the_seed() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True  # the seed's blob
    mask[4:6, 4:6] = True  # another blob, not connected
    mask[3, 3] = True  # diagonal only: not 4-connected
    got = component(mask, (1, 1))
    assert got.sum() == 4 and got[1:3, 1:3].all() and not got[4:, 4:].any()
    assert not component(mask, (0, 0)).any()


def _grid_case() -> tuple[Any, np.ndarray]:
    """A 16 x 16 token grid (14 px patches, 224 px input) over a 224 x 224 image, and a CAM
    that is high on the cells of rows 3..6, columns 8..11 and on a weaker blob elsewhere."""
    transform = letterbox_transform((224, 224), 224)
    cam = np.full((2, 16, 16), -1.0, np.float32)
    cam[:, 3:7, 8:12] = 2.0
    cam[:, 12:14, 1:3] = 1.5  # above half maximum, but not connected to the peak
    return transform, cam


def test_cam_region_is_the_half_maximum_box_around_the_peak() -> None:
    transform, cam = _grid_case()
    regions = label_regions(cam, None, ["A", "B"], [], transform, 14)
    for region in regions:
        assert region is not None and region.basis == "cam"
        # cells 3..6 x 8..11 are source pixels 42..98 x 112..168; the bilinear map crosses
        # the threshold half a cell out, within a pixel of the cells' edges
        left, top, right, bottom = region.box
        assert (top, bottom) == pytest.approx((42, 98), abs=8)
        assert (left, right) == pytest.approx((112, 168), abs=8)
        assert region.polyline[0] == region.polyline[-1] and len(region.polyline) == 5


def test_segment_of_the_same_name_gives_the_region() -> None:
    transform, cam = _grid_case()
    seg = np.full((1, 16, 16), -3.0, np.float32)
    seg[0, 10:15, 0:4] = 3.0  # the segment lies elsewhere than the CAM's peak
    regions = label_regions(cam, seg, ["Lung field", "Other"], [" lung  FIELD"], transform, 14)
    lung, other = regions
    assert lung is not None and lung.basis == "segment"
    assert lung.top >= 10 * 14 - 14 and lung.right <= 4 * 14 + 14
    # the other label keeps its CAM, seeded on the segmented cells (where the finding is)
    assert other is not None and other.basis == "cam"
    assert other.top >= 10 * 14 - 14


# --------------------------------------------------------------------------- vocabulary


def test_synonyms_checked_and_vocabulary_case_insensitive(demo_bundle: Path) -> None:
    bundle = load_bundle(demo_bundle)
    assert bundle.synonyms == DEMO_SYNONYMS
    vocab = bundle.vocabulary
    assert vocab["pleural effusion"] == "Pleural effusion" and vocab["ptx"] == "Pneumothorax"
    assert set(vocab.values()) == set(DEMO_LABELS)
    with pytest.raises(BundleError, match="names both"):
        read_synonyms({"Pneumothorax": ["air"], "Nodule": ["AIR"]}, DEMO_LABELS)
    with pytest.raises(BundleError, match="list of non-empty strings"):
        read_synonyms({"Nodule": "spot"}, DEMO_LABELS)
    with pytest.raises(BundleError, match="must be an object"):
        read_synonyms(["x"], DEMO_LABELS)
    assert read_synonyms({"Unknown": ["x"]}, DEMO_LABELS) == {}  # ignored, logged


def test_a_manifest_with_conflicting_synonyms_is_refused(demo_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy_root = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy_root)
    manifest = json.loads((copy_root / "manifest.json").read_text())
    manifest["synonyms"] = {"Nodule": ["Pleural  Effusion"]}  # another label's name
    write_manifest(copy_root, manifest)
    with pytest.raises(BundleError, match="names both"):
        load_bundle(copy_root)


# --------------------------------------------------------------------------- the route

TOKEN = "grounding-test-service-token"


def _store_study(url: str, tmp: Path, demo_bundle: Path) -> str:
    """The worker's own path for one job, minus the broker: model, writers, result rows."""
    from workers.dicom_out.outputs import build_outputs
    from workers.imaging import decode
    from workers.models.runner import ModelRunner
    from workers.pipeline import _store_outputs
    from workers.results import AlgorithmInfo

    source = pydicom.dcmread(sample_path("RG3_UNCR.dcm"))
    second = copy.deepcopy(source)
    second.SOPInstanceUID = derive_uid(str(source.SOPInstanceUID), "grounding second")
    sources = [source, second]
    bundle = load_bundle(demo_bundle)
    runner = ModelRunner(bundle, cam=False)  # as the worker builds it
    image = decode(source)
    results = runner.run([(str(ds.SOPInstanceUID), image) for ds in sources])
    algorithm = AlgorithmInfo(bundle.name, bundle.version, bundle.checksum, is_demo=True)
    outputs = build_outputs(sources, results, algorithm, 1)
    db = Database(url)
    with db.session() as s:
        study = Study(study_instance_uid=str(source.StudyInstanceUID), status="done")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="chest", status=JobStatus.DONE.value)
        s.add(job)
        s.flush()
        job_id = job.id
    ctx = SimpleNamespace(settings=SimpleNamespace(results_dir=tmp / "results"), db=db)
    _store_outputs(ctx, job_id, outputs, results)  # type: ignore[arg-type]
    db.dispose()
    return str(source.StudyInstanceUID)


def _operator_token(db: Database) -> str:
    with db.session() as s:
        users.create_user(s, "grounding-operator", "operator", None, actor="test")
        return users.issue_token(s, "grounding-operator", actor="test").token


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Database]]:
    """The agent's app; requests carry an operator's token (POST needs one)."""
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, api_token=TOKEN, min_free_disk_mb=1
    )
    db = Database(database_url)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    with TestClient(create_app(state)) as c:
        c.headers["authorization"] = f"Bearer {_operator_token(db)}"
        yield c, db
    db.dispose()


def test_grounding_route(
    client: tuple[TestClient, Database], database_url: str, tmp_path: Path, demo_bundle: Path
) -> None:
    c, db = client
    study_uid = _store_study(database_url, tmp_path, demo_bundle)
    source = pydicom.dcmread(sample_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    rows, cols = int(source.Rows), int(source.Columns)

    for phrase in ("Pleural effusion", "  EFFUSION ", "pleural fluid"):  # label, synonyms
        r = c.post("/api/grounding", json={"study": study_uid, "phrase": phrase})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == "Pleural effusion" and body["pipeline"] == "chest"
        assert len(body["images"]) == 2
        best = body["region"]
        assert best["peak"] == max(i["peak"] for i in body["images"])
        left, top, right, bottom = best["box"]
        assert 0 <= left < right <= cols and 0 <= top < bottom <= rows
        assert best["polyline"][0] == best["polyline"][-1] == [left, top]
        col, row = best["point"]
        assert left <= col + 0.5 <= right and top <= row + 0.5 <= bottom  # the peak is inside

    r = c.post("/api/grounding", json={"study": study_uid, "phrase": "broken heart"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "not in the vocabulary" in detail["msg"]
    assert "ptx" in detail["vocabulary"] and "pleural effusion" in detail["vocabulary"]

    r = c.post("/api/grounding", json={"study": "1.2.3.999", "phrase": "effusion"})
    assert r.status_code == 404 and r.json()["detail"] == "unknown study"

    with db.session() as s:  # a study the worker has not analysed yet
        s.add(Study(study_instance_uid="1.2.3.4", status="receiving"))
    r = c.post("/api/grounding", json={"study": "1.2.3.4", "phrase": "effusion"})
    assert r.status_code == 409 and "no localized results" in r.json()["detail"]
    assert "receiving" in r.json()["detail"]

    r = c.post("/api/grounding", json={"study": "not a uid", "phrase": "effusion"})
    assert r.status_code == 422
    r = c.post("/api/grounding", json={"study": study_uid, "phrase": ""})
    assert r.status_code == 422
    # the service keeps serving after each refusal
    r = c.post("/api/grounding", json={"study": study_uid, "phrase": "PTX"})
    assert r.status_code == 200 and r.json()["label"] == "Pneumothorax"
    # GET: the same answer for a viewer-level credential (the service token); POST needs more
    viewer = {"authorization": f"Bearer {TOKEN}"}
    got = c.get("/api/grounding", params={"study": study_uid, "phrase": "ptx"}, headers=viewer)
    assert got.status_code == 200 and got.json() == {**r.json(), "phrase": "ptx"}
    got = c.get("/api/grounding", params={"study": study_uid, "phrase": "x"}, headers=viewer)
    assert got.status_code == 422 and "ptx" in got.json()["detail"]["vocabulary"]
    body = {"study": study_uid, "phrase": "ptx"}
    assert c.post("/api/grounding", json=body, headers=viewer).status_code == 403
    c.headers.pop("authorization")
    assert c.post("/api/grounding", json=body).status_code == 401


@pytest.mark.e2e
def test_grounding_through_agent_and_worker(
    tmp_path: Path, broker_url: str, demo_bundle: Path
) -> None:
    """A real agent and Celery worker process: storescu sends a study, the worker analyses it,
    the agent answers the grounding query over HTTP from what the worker stored."""
    import httpx

    from pacs_agent.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'agent.db'}"
    upgrade(url)
    out = tmp_path / "delivered"
    out.mkdir()
    db = Database(url)
    operator = {"authorization": f"Bearer {_operator_token(db)}"}
    db.dispose()
    agent = AgentEnv(tmp_path, url, broker_url, demo_bundle, destinations=f"file://{out}")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "1"
    try:
        agent.start_agent()
        agent.start_worker()
        path = sample_path("RG3_UNCR.dcm")
        assert storescu(agent.dicom_port, path).returncode == 0
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        agent.wait_study(study_uid, {"done", "failed"})
        post = {"headers": operator, "timeout": 10}
        r = httpx.post(
            f"{agent.url}/api/grounding",
            json={"study": study_uid, "phrase": "Collapsed Lung"},
            **post,  # type: ignore[arg-type]
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == "Pneumothorax" and len(body["images"]) == 1
        left, top, right, bottom = body["region"]["box"]
        assert left < right and top < bottom
        r = httpx.post(
            f"{agent.url}/api/grounding",
            json={"study": study_uid, "phrase": "unicorn"},
            **post,  # type: ignore[arg-type]
        )
        assert r.status_code == 422 and "collapsed lung" in r.json()["detail"]["vocabulary"]
    finally:
        agent.stop()
