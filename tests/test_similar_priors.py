"""Similar prior images in the SR (setting PACS_AGENT_SR_SIMILAR_PRIORS).

- the writer (``workers.dicom_out.sr``): the Similar prior images container (IMAGE per prior,
  its study's UID, the cosine distance as a NUM, the query image), the priors listed as
  Pertinent Other Evidence, private codes declared; saved, read back and judged by dciodvfy;
  bad priors refused; ``build_output_set`` passes them to a TID 1500 SR only;
- the agent's route ``POST /api/similar/priors`` on SQLite and PostgreSQL: nearest first, other
  studies only, earlier than the study's own embedding on a re-run, rows without an instance
  left out, bundles apart, service role only, 404 / 422;
- the worker's client (``workers.similar_priors``) against the real app: the priors; and none,
  with the reason logged and without raising, when the setting is 0, the agent is unreachable,
  silent past the timeout, or answers 503 because its index cannot load.

The real path (C-STORE -> agent -> worker -> SR) is in tests/test_retrieval.py. Nothing is
mocked: the app runs in-process (FastAPI's TestClient), the "silent agent" is
a real listening socket that never answers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import delete

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Embedding, Instance, Series, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.retrieval import IndexService, encode_vector
from pacs_agent.settings import Settings
from pacs_agent.uids import derive_uid
from tests.conftest import sample_path
from tests.dciodvfy import dciodvfy_errors, requires_dciodvfy
from tests.support.auth import bearer, make_user
from workers.dicom_out.outputs import OutputOptions, build_output_set
from workers.dicom_out.sr import (
    COSINE_DISTANCE,
    SIMILAR_PRIOR,
    SIMILAR_PRIOR_IMAGE,
    SIMILAR_PRIORS,
    SimilarPrior,
    build_sr,
    check_prior,
)
from workers.results import AlgorithmInfo, Finding, ImageResult, OutputIdentity
from workers.similar_priors import fetch_similar_priors

CREATED = dt.datetime(2026, 12, 1, 8, 0, 0)
DEMO = AlgorithmInfo("pacs-agent demo chest (RANDOM WEIGHTS)", "0.1.0", "c" * 64, is_demo=True)
TRAINED = dataclasses.replace(DEMO, name="chest", is_demo=False)
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
BUNDLE_A = "a" * 64
BUNDLE_B = "b" * 64
DIM = 16


# --------------------------------------------------------------------------------------------
# the writer


def _source() -> Dataset:
    return pydicom.dcmread(sample_path("RG1_J2KR.dcm"), stop_before_pixels=True)


def _identity(source: Dataset) -> OutputIdentity:
    return OutputIdentity(
        derive_uid(str(source.StudyInstanceUID), "test", "sr-series"),
        derive_uid(str(source.StudyInstanceUID), "test", "sr"),
        9001,
        1,
        "AI findings (DEMO)",
    )


def _prior(query: str, distance: float, **changes: Any) -> SimilarPrior:
    prior = SimilarPrior(
        sop_instance_uid=generate_uid(),
        sop_class_uid=CR,
        series_instance_uid=generate_uid(),
        study_instance_uid=generate_uid(),
        distance=distance,
        query_sop_instance_uid=query,
    )
    return dataclasses.replace(prior, **changes)


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _named(ds: Dataset, value: str) -> list[Dataset]:
    return [i for i in _walk(ds) if i.ConceptNameCodeSequence[0].CodeValue == value]


def _sr_with(priors: list[SimilarPrior], algorithm: AlgorithmInfo = DEMO) -> Dataset:
    source = _source()
    finding = Finding("Pleural effusion", 0.7, 0.5, str(source.SOPInstanceUID), point=(900, 800))
    sr = build_sr(
        [source], [finding], algorithm, _identity(source), created=CREATED, similar_priors=priors
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))  # what a reader gets


@requires_dciodvfy
def test_sr_references_each_prior_with_its_study_distance_and_query_image() -> None:
    source = _source()
    query = str(source.SOPInstanceUID)
    far = _prior(query, 0.25)
    near = _prior(query, 0.0012345678, sop_class_uid=DX)
    sr = _sr_with([far, near])

    [container] = _named(sr, SIMILAR_PRIORS.value)
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    assert container in list(sr.ContentSequence)  # report level, beside the draft
    comment = container.ContentSequence[0]
    assert comment.ValueType == "TEXT" and comment.ConceptNameCodeSequence[0].CodeValue == "121106"
    assert comment.TextValue.startswith("MACHINE-GENERATED, UNVERIFIED: the 2 earlier image(s)")
    assert "random weights" in comment.TextValue and "not findings" in comment.TextValue

    groups = list(container.ContentSequence[1:])
    assert [g.ConceptNameCodeSequence[0].CodeValue for g in groups] == [SIMILAR_PRIOR.value] * 2
    for group, prior in zip(groups, (near, far), strict=True):  # nearest first
        image, study, distance, own = group.ContentSequence
        assert image.ValueType == "IMAGE"
        assert image.ConceptNameCodeSequence[0].CodeValue == SIMILAR_PRIOR_IMAGE.value
        assert image.ConceptNameCodeSequence[0].CodeMeaning == "Similar prior image"
        ref = image.ReferencedSOPSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            prior.sop_class_uid,
            prior.sop_instance_uid,
        )
        assert study.ValueType == "UIDREF" and study.UID == prior.study_instance_uid
        assert study.ConceptNameCodeSequence[0].CodeValue == "110180"
        assert distance.ValueType == "NUM"
        assert distance.ConceptNameCodeSequence[0].CodeValue == COSINE_DISTANCE.value
        value = distance.MeasuredValueSequence[0]
        assert float(value.NumericValue) == pytest.approx(round(prior.distance, 6))
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert own.ValueType == "IMAGE" and own.ConceptNameCodeSequence[0].CodeValue == "121112"
        assert own.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == query

    # the priors are other studies' evidence; the private codes are declared
    other = {
        (st.StudyInstanceUID, se.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
        for st in sr.PertinentOtherEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert other == {
        (p.study_instance_uid, p.series_instance_uid, p.sop_instance_uid) for p in (near, far)
    }
    current = [st.StudyInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence]
    assert current == [source.StudyInstanceUID]
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID  # patient and study copied from the study's image
    assert "99PACSAGENT" in {
        c.CodingSchemeDesignator for c in sr.CodingSchemeIdentificationSequence
    }
    assert dciodvfy_errors(sr) == []

    # without priors nothing of it is written; a trained bundle's note has no DEMO words
    assert _named(_sr_with([]), SIMILAR_PRIORS.value) == []
    trained = _named(_sr_with([near], TRAINED), SIMILAR_PRIORS.value)[0].ContentSequence[0]
    assert "random weights" not in trained.TextValue and "the 1 earlier" in trained.TextValue


def test_bad_priors_are_refused_with_a_reason() -> None:
    source = _source()
    study, query = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    uids = {query}
    check_prior(_prior(query, 0.0), study, uids)
    check_prior(_prior(query, 2.0), study, uids)
    cases = {
        "belongs to this study": _prior(query, 0.1, study_instance_uid=study),
        "not in \\[0, 2\\]": _prior(query, -0.01),
        "query image": _prior(generate_uid(), 0.1),
        "sop_class_uid is not a UID": _prior(query, 0.1, sop_class_uid="1.2.x"),
    }
    for reason, prior in cases.items():
        with pytest.raises(ValueError, match=reason):
            check_prior(prior, study, uids)
    for bad in (float("nan"), float("inf"), 2.5):
        with pytest.raises(ValueError, match="not in"):
            check_prior(_prior(query, bad), study, uids)
    twice = _prior(query, 0.1)
    with pytest.raises(ValueError, match="same image twice"):
        _sr_with([twice, dataclasses.replace(twice, distance=0.2)])


def _result(source: Dataset) -> ImageResult:
    rows, cols = int(source.Rows), int(source.Columns)
    uid = str(source.SOPInstanceUID)
    return ImageResult(
        source_sop_instance_uid=uid,
        findings=[Finding("Nodule", 0.2, 0.5, uid, point=(10, 10))],
        masks=np.zeros((0, rows, cols), dtype=bool),
        segment_labels=[],
        heatmap=np.zeros((rows, cols), dtype=np.float32),
        display=np.zeros((rows, cols), dtype=np.float32),
    )


def test_output_set_gives_priors_to_a_tid1500_sr_only() -> None:
    source = _source()
    query = str(source.SOPInstanceUID)
    priors = [_prior(query, 0.1), _prior(generate_uid(), 0.05)]  # the second: no such image
    kinds = OutputOptions(parametric_map=False)
    made = build_output_set(
        [source], [_result(source)], DEMO, 1, kinds, "routine", similar_priors=priors
    )
    kind, sr, _ = made.outputs[0]
    assert kind == "sr" and made.skipped == []
    refs = [
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in _walk(sr)
        if i.ValueType == "IMAGE"
    ]
    assert priors[0].sop_instance_uid in refs and priors[1].sop_instance_uid not in refs
    text = build_output_set(
        [source],
        [_result(source)],
        DEMO,
        1,
        dataclasses.replace(kinds, sr_flavour="basic-text"),
        "routine",
        similar_priors=priors,
    )
    kind, basic, _ = text.outputs[0]
    assert kind == "sr" and str(basic.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.11"
    assert "PertinentOtherEvidenceSequence" not in basic


# --------------------------------------------------------------------------------------------
# the agent's route, on SQLite and PostgreSQL


@dataclass
class Agent:
    client: TestClient
    db: Database
    settings: Settings
    service: dict[str, str]
    viewer: dict[str, str]

    def priors(
        self,
        study: str,
        images: Sequence[tuple[str, np.ndarray]],
        k: int = 5,
        checksum: str = BUNDLE_A,
        who: dict[str, str] | None = None,
    ):  # type: ignore[no-untyped-def]
        return self.client.post(
            "/api/similar/priors",
            json={
                "study_instance_uid": study,
                "bundle_checksum": checksum,
                "k": k,
                "images": [{"sop_instance_uid": s, "vector": v.tolist()} for s, v in images],
            },
            headers=self.service if who is None else who,
        )


SERVICE_TOKEN = "service-token-of-the-similar-priors-test"


@pytest.fixture
def agent(tmp_path: Path, database_url: str) -> Iterator[Agent]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        min_free_disk_mb=1,
        api_token=SERVICE_TOKEN,
        retrieval_wait_s=5,
    )
    db = Database(database_url)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    viewer = bearer(make_user(database_url, "vera", "viewer"))
    with TestClient(create_app(state)) as c:
        yield Agent(c, db, settings, bearer(SERVICE_TOKEN), viewer)
    db.dispose()


@dataclass
class Stored:
    study: str
    series: str
    sops: list[str]


def _study(db: Database, vectors: list[tuple[str, np.ndarray]], sop_class: str = CR) -> Stored:
    """A study with one series, and per (bundle, vector) an instance and its embedding."""
    made = Stored(generate_uid(), generate_uid(), [])
    with db.session() as s:
        st = Study(study_instance_uid=made.study, status="done", source="dimse")
        s.add(st)
        s.flush()
        s.add(Series(study_id=st.id, series_instance_uid=made.series, modality="CR"))
    for bundle, v in vectors:
        made.sops.append(_embed(db, made, bundle, v, sop_class=sop_class))
    return made


def _embed(
    db: Database,
    stored: Stored,
    bundle: str,
    v: np.ndarray,
    sop: str | None = None,
    sop_class: str = CR,
) -> str:
    """An instance of the study's series and its embedding (as a worker stores it)."""
    sop = sop or generate_uid()
    with db.session() as s:
        st = s.query(Study).filter_by(study_instance_uid=stored.study).one()
        se = s.query(Series).filter_by(series_instance_uid=stored.series).one()
        s.add(
            Instance(
                study_id=st.id,
                series_id=se.id,
                sop_instance_uid=sop,
                sop_class_uid=sop_class,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"{sop}.dcm",
                size=1,
                sha256="0" * 64,
            )
        )
        s.add(
            Embedding(
                sop_instance_uid=sop,
                study_id=st.id,
                bundle_checksum=bundle,
                is_demo=True,
                dim=DIM,
                vector=encode_vector(v),
            )
        )
    return sop


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_route_answers_the_nearest_images_of_other_earlier_studies(agent: Agent) -> None:
    rng = np.random.default_rng(5)
    base = _unit(rng)
    near_v = base + 0.05 * _unit(rng)
    far = _study(agent.db, [(BUNDLE_A, _unit(rng))])
    near = _study(agent.db, [(BUNDLE_A, near_v)], sop_class=DX)
    other_bundle = _study(agent.db, [(BUNDLE_B, base)])  # identical vector, another bundle
    # the study the SR is written for: not embedded yet (its rows come with the results)
    current = _study(agent.db, [])
    query = generate_uid()

    r = agent.priors(current.study, [(query, 3 * base)], k=5)  # any norm
    assert r.status_code == 200, r.text
    body = r.json()
    got = [p["sop_instance_uid"] for p in body["priors"]]
    assert got == [near.sops[0], far.sops[0]]
    assert other_bundle.sops[0] not in got
    first = body["priors"][0]
    assert first["sop_class_uid"] == DX
    assert (first["series_instance_uid"], first["study_instance_uid"]) == (near.series, near.study)
    assert first["query_sop_instance_uid"] == query
    expected = 1 - float(np.dot(base, near_v / np.linalg.norm(near_v)))
    assert first["distance"] == pytest.approx(expected, abs=2e-3)  # half-precision index
    assert (
        agent.priors(current.study, [(query, base)], k=1).json()["priors"][0]["sop_instance_uid"]
        == near.sops[0]
    )

    # a re-run, once the study has its own embedding: its own image and later ones are not
    # priors (the SR references the same images as the first run)
    _embed(agent.db, current, BUNDLE_A, base, sop=query)
    later = _study(agent.db, [(BUNDLE_A, base)])  # the identical vector, embedded after
    rerun = [
        p["sop_instance_uid"] for p in agent.priors(current.study, [(query, base)]).json()["priors"]
    ]
    assert rerun == [near.sops[0], far.sops[0]]
    # ... while the later study sees the current one's image first
    after = agent.priors(later.study, [(generate_uid(), base)]).json()["priors"]
    assert after[0]["sop_instance_uid"] == query and after[0]["distance"] < 1e-3
    assert after[0]["study_instance_uid"] == current.study

    # an image whose instance row is gone (no SOP Class to name) is left out
    with agent.db.session() as s:
        s.execute(delete(Instance).where(Instance.sop_instance_uid == near.sops[0]))
    again = [
        p["sop_instance_uid"] for p in agent.priors(current.study, [(query, base)]).json()["priors"]
    ]
    assert again == [far.sops[0]]


def test_route_is_for_the_service_role_and_refuses_bad_input(agent: Agent) -> None:
    rng = np.random.default_rng(6)
    prior = _study(agent.db, [(BUNDLE_A, _unit(rng))])
    current = _study(agent.db, [])
    one = [(generate_uid(), _unit(rng))]
    assert agent.priors(current.study, one, who={}).status_code == 401
    assert agent.priors(current.study, one, who=agent.viewer).status_code == 403
    assert agent.priors("1.2.3.999", one).status_code == 404
    for bad in (
        [(generate_uid(), np.zeros(DIM, np.float32))],  # zero vector
        [(generate_uid(), np.ones(DIM + 1, np.float32))],  # another length than the bundle's
    ):
        r = agent.priors(current.study, bad)
        assert r.status_code == 422, r.text
    assert agent.priors(current.study, one, checksum="not-a-checksum").status_code == 422
    assert agent.priors(current.study, one, k=0).status_code == 422
    assert agent.priors(current.study, []).status_code == 422
    # a bundle the index has never seen: no priors, not an error
    assert agent.priors(current.study, one, checksum=BUNDLE_B).json()["priors"] == []
    ok = agent.priors(current.study, one)
    assert ok.status_code == 200 and ok.json()["priors"][0]["sop_instance_uid"] == prior.sops[0]


# --------------------------------------------------------------------------------------------
# the worker's client


def _results(uid: str, vector: np.ndarray | None) -> list[ImageResult]:
    extra: dict[str, object] = {} if vector is None else {"cls": vector}
    return [
        ImageResult(
            uid, [], np.zeros((0, 2, 2), bool), [], np.zeros((2, 2)), np.zeros((2, 2)), extra
        )
    ]


def _worker_settings(agent_url: str, k: int = 3, wait_s: float = 5.0) -> Settings:
    return Settings(
        agent_url=agent_url, api_token=SERVICE_TOKEN, sr_similar_priors=k, retrieval_wait_s=wait_s
    )


def test_worker_gets_the_priors_from_the_agent(agent: Agent) -> None:
    rng = np.random.default_rng(7)
    v = _unit(rng)
    prior = _study(agent.db, [(BUNDLE_A, v)])
    current = _study(agent.db, [])
    query = generate_uid()
    # the app in-process: TestClient posts as the worker's httpx client does
    got = fetch_similar_priors(
        agent.client,
        _worker_settings(str(agent.client.base_url)),
        current.study,
        BUNDLE_A,
        _results(query, v),
    )
    assert [(p.sop_instance_uid, p.study_instance_uid, p.query_sop_instance_uid) for p in got] == [
        (prior.sops[0], prior.study, query)
    ]
    assert got[0].distance < 1e-3 and got[0].sop_class_uid == CR
    # off by default, and nothing asked without an embedding
    assert Settings().sr_similar_priors == 0
    off = _worker_settings(str(agent.client.base_url), k=0)
    assert (
        fetch_similar_priors(agent.client, off, current.study, BUNDLE_A, _results(query, v)) == []
    )
    none = fetch_similar_priors(
        agent.client,
        _worker_settings(str(agent.client.base_url)),
        current.study,
        BUNDLE_A,
        _results(query, None),
    )
    assert none == []


def test_worker_gets_no_priors_when_the_agent_index_cannot_load(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(8)
    v = _unit(rng)
    _study(agent.db, [(BUNDLE_A, v)])
    current = _study(agent.db, [])
    caplog.set_level(logging.WARNING, logger="workers.similar_priors")
    # the index cannot load (its database is unreachable): 503, no priors, the reason logged
    broken = Database(f"sqlite:///{agent.settings.data_dir / 'missing' / 'no.db'}")
    try:
        cast(Any, agent.client.app).state.similar_index = IndexService(broken, wait_s=5)
        settings = _worker_settings(str(agent.client.base_url))
        results = _results(generate_uid(), v)
        assert fetch_similar_priors(agent.client, settings, current.study, BUNDLE_A, results) == []
    finally:
        broken.dispose()
    assert (
        f"study {current.study}: SR written without similar priors: agent answered 503"
        in caplog.text
    )


def test_worker_gets_no_priors_when_the_agent_is_down_or_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    study = generate_uid()
    results = _results(generate_uid(), _unit(np.random.default_rng(9)))
    caplog.set_level(logging.WARNING, logger="workers.similar_priors")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with httpx.Client() as client:
        settings = _worker_settings(f"http://127.0.0.1:{closed}")
        assert fetch_similar_priors(client, settings, study, BUNDLE_A, results) == []
        assert (
            f"study {study}: SR written without similar priors: agent not reached (ConnectError)"
            in caplog.text
        )

        # an agent that accepts the connection and never answers: the wait is bounded
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)
            caplog.clear()
            settings = _worker_settings(f"http://127.0.0.1:{silent.getsockname()[1]}", wait_s=0.5)
            assert fetch_similar_priors(client, settings, study, BUNDLE_A, results) == []
            assert "agent not reached (ReadTimeout)" in caplog.text
