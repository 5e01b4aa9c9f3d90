"""Similar-case retrieval (pacs_agent.retrieval, GET /api/studies/{uid}/similar, the console's
study page, ``pacs-agent bench retrieval``).

- the index over the embeddings table on SQLite and PostgreSQL: nearest earlier images first,
  bundles never compared, rows committed late still found, a snapshot reused only when it
  matches the database;
- the route: auth like every /api route, 404 unknown study, 422 bad k, DEMO note;
- the real path: studies in by dcmtk's storescu -> a real agent and Celery worker (DEMO bundle)
  -> one embeddings row per image -> /similar names the earlier copy of the same image first,
  and the console's study page shows the section (Debian chromium, Playwright);
- the bench's small run: last line's format and recall@10 >= 0.95.

Nothing is mocked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Embedding, Job, Result, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.retrieval import SimilarityIndex, decode_vector, encode_vector
from pacs_agent.settings import Settings
from tests.conftest import REPO, AgentEnv, sample_path, storescu
from tests.support.auth import bearer, make_user

BUNDLE_A = "a" * 64
BUNDLE_B = "b" * 64
DIM = 32


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _add_study(
    db: Database,
    vectors: list[tuple[str, np.ndarray]],
    *,
    findings: list[str] = (),  # type: ignore[assignment]
    demo: bool = False,
) -> str:
    """A study with a done job, an SR result naming ``findings`` and one embedding per
    (bundle, vector). Returns its Study Instance UID."""
    uid = generate_uid()
    with db.session() as s:
        st = Study(study_instance_uid=uid, status="done", source="dimse")
        s.add(st)
        s.flush()
        job = Job(study_id=st.id, pipeline="chest", status="done", triage="routine")
        s.add(job)
        s.flush()
        s.add(
            Result(
                job_id=job.id,
                kind="sr",
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                path="x.dcm",
                summary={
                    "findings": [
                        {"label": f, "probability": 0.9, "present": True} for f in findings
                    ]
                },
            )
        )
        for bundle, v in vectors:
            s.add(
                Embedding(
                    sop_instance_uid=generate_uid(),
                    study_id=st.id,
                    job_id=job.id,
                    bundle_checksum=bundle,
                    is_demo=demo,
                    dim=DIM,
                    vector=encode_vector(v),
                )
            )
    return uid


@dataclass
class Api:
    client: TestClient
    db: Database
    viewer: dict[str, str]

    def similar(self, uid: str, k: int | str = 10, who: dict[str, str] | None = None) -> Any:
        return self.client.get(
            f"/api/studies/{uid}/similar",
            params={"k": k},
            headers=self.viewer if who is None else who,
        )


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, min_free_disk_mb=1)
    db = Database(database_url)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    token = make_user(database_url, "vic", "viewer")
    with TestClient(create_app(state)) as c:
        yield Api(c, db, bearer(token))
    db.dispose()


# --------------------------------------------------------------------------------------------
# the index and the route, on SQLite and PostgreSQL


def test_vector_encoding_refuses_bad_vectors() -> None:
    v = np.array([3.0, 4.0], dtype=np.float32)
    assert np.allclose(decode_vector(encode_vector(v), 2), [0.6, 0.8])
    for bad in ([], [0.0, 0.0], [1.0, float("nan")], [float("inf"), 1.0]):
        with pytest.raises(ValueError):
            encode_vector(bad)
    with pytest.raises(ValueError, match="3 values"):
        decode_vector(encode_vector([1.0, 2.0, 3.0]), 4)


def test_nearest_earlier_study_first_with_findings(api: Api) -> None:
    rng = np.random.default_rng(1)
    base = _unit(rng)[0]
    near = base + 0.05 * _unit(rng)[0]
    far = _unit(rng)[0]
    far_uid = _add_study(api.db, [(BUNDLE_A, far)], findings=["effusion"])
    near_uid = _add_study(api.db, [(BUNDLE_A, near)], findings=["pneumothorax"])
    query_uid = _add_study(api.db, [(BUNDLE_A, base)])
    later_uid = _add_study(api.db, [(BUNDLE_A, base)])  # analysed after: not "earlier"

    r = api.similar(query_uid)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_checksum"] == BUNDLE_A and body["demo"] is False
    got = [c["study_instance_uid"] for c in body["similar"]]
    assert got == [near_uid, far_uid], got
    assert later_uid not in got and query_uid not in got
    first = body["similar"][0]
    assert first["findings"] == ["pneumothorax"]
    assert first["triage"] == "routine"
    assert 0 <= first["distance"] < body["similar"][1]["distance"]
    expected = 1 - float(np.dot(base, near / np.linalg.norm(near)))
    assert first["distance"] == pytest.approx(expected, abs=2e-3)  # f16 index
    assert api.similar(query_uid, k=1).json()["similar"][0]["study_instance_uid"] == near_uid
    # the latest study sees the query study (identical vector) first
    later = api.similar(later_uid).json()["similar"]
    assert later[0]["study_instance_uid"] == query_uid
    assert later[0]["distance"] == pytest.approx(0.0, abs=1e-3)


def test_bundles_are_never_compared(api: Api) -> None:
    rng = np.random.default_rng(2)
    v = _unit(rng)[0]
    other_bundle = _add_study(api.db, [(BUNDLE_B, v)])  # the identical vector, another bundle
    same_bundle = _add_study(api.db, [(BUNDLE_A, -v)])  # the farthest vector, same bundle
    query = _add_study(api.db, [(BUNDLE_A, v)])
    got = [c["study_instance_uid"] for c in api.similar(query).json()["similar"]]
    assert got == [same_bundle]
    assert other_bundle not in got
    # and from the other side: the B study's only earlier neighbour would be in A
    later_b = _add_study(api.db, [(BUNDLE_B, v)])
    body = api.similar(later_b).json()
    assert body["bundle_checksum"] == BUNDLE_B
    assert [c["study_instance_uid"] for c in body["similar"]] == [other_bundle]


def test_route_errors_auth_and_demo_note(api: Api) -> None:
    rng = np.random.default_rng(3)
    _add_study(api.db, [(BUNDLE_A, _unit(rng)[0])], demo=True)
    uid = _add_study(api.db, [(BUNDLE_A, _unit(rng)[0])], demo=True)
    assert api.similar(uid, who={}).status_code == 401
    assert api.similar(uid, who=bearer("not-a-token")).status_code == 401
    assert api.similar("1.2.3.4.999").status_code == 404
    for bad in (0, 101, "ten"):
        r = api.similar(uid, k=bad)
        assert r.status_code == 422, (bad, r.text)
    body = api.similar(uid).json()
    assert body["demo"] is True
    assert "random weights" in body["note"] and "not findings" in body["note"]
    # a study with no embedding: an empty answer that says why
    with api.db.session() as s:
        s.add(Study(study_instance_uid="1.2.3.4.5", status="receiving"))
    body = api.similar("1.2.3.4.5").json()
    assert body["similar"] == [] and "no embedding" in body["note"]
    # the service keeps serving after the bad requests
    assert api.similar(uid).status_code == 200


def test_index_catches_up_late_commits_and_rebuilds_from_snapshot(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    rng = np.random.default_rng(4)
    try:
        for _ in range(3):
            _add_study(db, [(BUNDLE_A, _unit(rng)[0]), (BUNDLE_B, _unit(rng)[0])])
        index = SimilarityIndex(db, tmp_path / "snap")
        assert index.refresh() == 6
        assert index.refresh() == 0
        assert index.bundles() == [BUNDLE_A, BUNDLE_B]
        # a row whose id is below the last one seen (a transaction that committed late)
        with db.session() as s:
            ids = list(s.scalars(select(Embedding.id).order_by(Embedding.id)))
            late = s.get_one(Embedding, ids[1])
            payload = (late.sop_instance_uid, late.study_id, late.bundle_checksum, late.vector)
            s.delete(late)
        fresh = SimilarityIndex(db)
        assert fresh.refresh() == 5
        with db.session() as s:
            s.add(
                Embedding(
                    id=ids[1],
                    sop_instance_uid=payload[0],
                    study_id=payload[1],
                    bundle_checksum=payload[2],
                    is_demo=False,
                    dim=DIM,
                    vector=payload[3],
                )
            )
        assert fresh.refresh() == 1
        hit = fresh.search(payload[2], decode_vector(payload[3], DIM), 1)
        assert hit[0].embedding_id == ids[1]

        # snapshot: reused when it matches, with the rows after it caught up
        index.save_snapshot()
        _add_study(db, [(BUNDLE_A, _unit(rng)[0])])
        again = SimilarityIndex(db, tmp_path / "snap")
        assert again.refresh() == 1
        assert len(again) == 7
        # a snapshot of another database (the anchor row differs) is not used: rebuilt
        with db.session() as s:
            last = s.get_one(Embedding, index.last_id)
            last.sop_instance_uid = generate_uid()
        rebuilt = SimilarityIndex(db, tmp_path / "snap")
        assert rebuilt.refresh() == 7
        # a damaged snapshot file: rebuilt too
        for f in (tmp_path / "snap").glob("*.faiss"):
            f.write_bytes(b"garbage")
        with db.session() as s:
            s.get_one(Embedding, index.last_id).sop_instance_uid = last.sop_instance_uid
        assert SimilarityIndex(db, tmp_path / "snap").refresh() == 7
    finally:
        db.dispose()


def test_large_bundle_moves_to_inverted_lists_retrains_and_survives_a_snapshot(
    tmp_path: Path,
) -> None:
    """Past EXACT_MAX vectors a bundle becomes an IVF index, retrained when it has doubled; it
    keeps finding each vector's own row, honours the accept filter and round-trips a snapshot."""
    from pacs_agent import retrieval

    rng = np.random.default_rng(7)
    centres = _unit(rng, 50)
    n_first = retrieval.EXACT_MAX + 1000

    def draw(n: int) -> np.ndarray:
        v = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, DIM))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    index = SimilarityIndex(None)
    first = draw(n_first)
    assert index.add_vectors(BUNDLE_A, np.arange(1, n_first + 1), first) == n_first
    bundle = index._bundles[BUNDLE_A]
    assert not bundle.exact and bundle.trained_on == n_first
    lists = bundle.nlist
    # ids already held are skipped; a doubling retrains with more lists
    assert index.add_vectors(BUNDLE_A, np.arange(1, 11), first[:10]) == 0
    second = draw(n_first)
    ids2 = np.arange(n_first + 1, 2 * n_first + 1)
    assert index.add_vectors(BUNDLE_A, ids2, second) == n_first
    assert bundle.trained_on == 2 * n_first and bundle.nlist > lists
    assert len(index) == 2 * n_first
    for row in (0, 7, n_first - 1):
        assert index.search(BUNDLE_A, first[row], 1)[0].embedding_id == row + 1
    assert index.search(BUNDLE_A, second[3], 1)[0].embedding_id == n_first + 4
    # a filter that lets only odd ids through still yields k answers, all odd
    hits = index.search(BUNDLE_A, first[0], 10, accept=lambda i: i % 2 == 1)
    assert len(hits) == 10 and all(h.embedding_id % 2 == 1 for h in hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)

    bundle.save(tmp_path / BUNDLE_A)
    loaded = type(bundle).load(tmp_path / BUNDLE_A, DIM)
    assert len(loaded) == len(bundle) and loaded.trained_on == bundle.trained_on
    ids, _ = loaded.search(second[3], 1)
    assert ids.tolist() == [n_first + 4]
    # a loaded IVF can grow again (its vectors reconstruct by id)
    loaded.add(np.array([10**9]), draw(1))
    assert 10**9 in loaded and len(loaded) == 2 * n_first + 1


# --------------------------------------------------------------------------------------------
# the bench


def test_bench_retrieval_small_run() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_agent.cli",
            "bench",
            "retrieval",
            "--n",
            "30000",
            "--queries",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"retrieval: 30000 vectors, recall@10 (\d\.\d{3}), p50 (\d+\.\d\d) ms, p95 (\d+\.\d\d) ms",
        last,
    )
    assert m, last
    assert float(m.group(1)) >= 0.95, out.stdout
    assert "build:" in out.stdout and "index memory" in out.stdout
    assert "index: IVF" in out.stdout  # past the exact size: the inverted lists answered


def test_bench_refuses_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "bench", "retrieval", "--n", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2 and "--n must be at least 10" in out.stderr


# --------------------------------------------------------------------------------------------
# the real path: C-STORE -> agent -> worker -> embeddings -> /similar and the console


def _copy(tmp: Path, name: str, source: str) -> tuple[Path, str, str]:
    ds = dcmread(sample_path(source))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path, redis_server: str
) -> Iterator[AgentEnv]:
    import redis

    from pacs_agent.db.migrate import upgrade

    tmp = tmp_path_factory.mktemp("retrieval")
    database_url = f"sqlite:///{tmp / 'agent.db'}"
    upgrade(database_url)
    broker_url = f"{redis_server}/{1 + (os.getpid() + int(time.time() * 1000) + 11) % 14}"
    client = redis.Redis.from_url(broker_url)
    client.flushdb()
    out = tmp / "output"
    out.mkdir()
    agent = AgentEnv(tmp, database_url, broker_url, demo_bundle, destinations=f"file://{out}")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "1"
    agent.env["PACS_AGENT_DATABASE_URL"] = database_url
    agent.env["PACS_AGENT_SR_SIMILAR_PRIORS"] = "2"  # each SR references 2 similar priors
    try:
        agent.start_agent()
        agent.start_worker()
        yield agent
    finally:
        agent.stop()
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def three_studies(deployment: AgentEnv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """RG1 (chest) as study A, RG3 (extremity) as C, then RG1 again as B: one at a time."""
    tmp = tmp_path_factory.mktemp("retrieval-files")
    made: dict[str, Any] = {}
    for name, source in (("a", "RG1_UNCR.dcm"), ("c", "RG3_UNCR.dcm"), ("b", "RG1_UNCR.dcm")):
        path, study, sop = _copy(tmp, name, source)
        res = storescu(deployment.dicom_port, path)
        assert res.returncode == 0, res.stdout + res.stderr
        deployment.wait_study(study, {"done"})
        made[name] = (study, sop)
    return made


def test_stored_study_finds_the_earlier_copy_first(
    deployment: AgentEnv, three_studies: dict[str, Any]
) -> None:
    db = Database(deployment.env["PACS_AGENT_DATABASE_URL"])
    try:
        with db.session() as s:
            rows = list(s.scalars(select(Embedding).order_by(Embedding.id)))
            checksums = {j.bundle_checksum for j in s.scalars(select(Job))}
    finally:
        db.dispose()
    assert [r.sop_instance_uid for r in rows] == [three_studies[n][1] for n in "acb"]
    assert {r.bundle_checksum for r in rows} == checksums and len(checksums) == 1
    assert all(r.is_demo and r.dim > 0 and len(r.vector) == 4 * r.dim for r in rows)

    r = httpx.get(
        f"{deployment.url}/api/studies/{three_studies['b'][0]}/similar",
        headers=deployment.auth(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    got = [c["study_instance_uid"] for c in body["similar"]]
    assert got == [three_studies["a"][0], three_studies["c"][0]], body
    assert body["similar"][0]["distance"] < 1e-3  # the same pixels, the same bundle
    assert body["similar"][0]["distance"] < body["similar"][1]["distance"]
    assert body["similar"][0]["images"][0]["sop_instance_uid"] == three_studies["a"][1]
    assert body["demo"] is True and "not findings" in body["note"]
    # the first study has no earlier study
    first = httpx.get(
        f"{deployment.url}/api/studies/{three_studies['a'][0]}/similar",
        headers=deployment.auth(),
        timeout=60,
    ).json()
    assert first["similar"] == []


def test_sr_references_the_similar_prior_images(
    deployment: AgentEnv, three_studies: dict[str, Any], tmp_path: Path
) -> None:
    """PACS_AGENT_SR_SIMILAR_PRIORS=2: before writing a study's SR the worker asked the agent's
    index (POST /api/similar/priors); the SR delivered names the earlier images of other
    studies, nearest first (tests/test_similar_priors.py has the structure in detail)."""
    from tests.dciodvfy import dciodvfy_errors
    from workers.dicom_out.sr import COSINE_DISTANCE, SIMILAR_PRIOR_IMAGE, SIMILAR_PRIORS

    out = Path(deployment.env["PACS_AGENT_DESTINATIONS"].removeprefix("file://"))

    def priors(name: str) -> tuple[Any, list[tuple[str, str, float]]]:
        study = three_studies[name][0]
        [sr] = [
            ds
            for ds in (dcmread(f) for f in (out / study).glob("*/*.dcm"))
            if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        ]
        found = []
        for item in sr.ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue != SIMILAR_PRIORS.value:
                continue
            for group in item.ContentSequence[1:]:
                by_code = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
                image = by_code[SIMILAR_PRIOR_IMAGE.value].ReferencedSOPSequence[0]
                distance = by_code[COSINE_DISTANCE.value].MeasuredValueSequence[0].NumericValue
                found.append(
                    (image.ReferencedSOPInstanceUID, by_code["110180"].UID, float(distance))
                )
        return sr, found

    assert priors("a")[1] == []  # the first study has no earlier one
    _, of_c = priors("c")
    assert [(sop, study) for sop, study, _ in of_c] == [three_studies["a"][::-1]]
    sr, of_b = priors("b")
    assert [(sop, study) for sop, study, _ in of_b] == [
        three_studies["a"][::-1],  # the same pixels first
        three_studies["c"][::-1],
    ]
    assert of_b[0][2] < 1e-3 < of_b[1][2]
    evidence = {
        i.ReferencedSOPInstanceUID
        for st in sr.PertinentOtherEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert evidence == {three_studies["a"][1], three_studies["c"][1]}
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.console
def test_console_study_page_shows_similar_cases(
    deployment: AgentEnv, three_studies: dict[str, Any], tmp_path: Path
) -> None:
    from tests.support.ohif import CHROMIUM, CHROMIUM_ARGS

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console test needs Python playwright (scripts/install-viewer-deps.sh)")
    password = "retrieval-pw-1"
    make_user(deployment.env["PACS_AGENT_DATABASE_URL"], "rita", "viewer", password)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{deployment.url}/login")
            page.fill("input[name=name]", "rita")
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(f"{deployment.url}/")
            page.goto(f"{deployment.url}/studies/{three_studies['b'][0]}")
            section = page.locator("#similar-cases")
            section.wait_for(timeout=30_000)
            rows = section.locator("tr[data-similar-study]")
            assert rows.count() == 2, section.inner_text()
            assert rows.nth(0).get_attribute("data-similar-study") == three_studies["a"][0]
            assert rows.nth(1).get_attribute("data-similar-study") == three_studies["c"][0]
            assert "not findings" in section.locator("[data-similar-note]").inner_text()
            page.screenshot(path=str(tmp_path / "similar.png"), full_page=True)
            # the link opens the similar study's page
            rows.nth(0).locator("a").click()
            page.wait_for_url(re.compile(re.escape(three_studies["a"][0])))
            assert "No similar earlier study" in page.locator("#similar-cases").inner_text()
            assert errors == []
        finally:
            browser.close()
