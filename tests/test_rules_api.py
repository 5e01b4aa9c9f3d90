"""`/api/rules`: CRUD with validation (422), versions (409/428), history with diffs, the fallback
rule and the tester (a DICOM file, a received study, draft rules), on SQLite and PostgreSQL.
The app runs in-process with FastAPI's TestClient against a real database."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.models import Destination, Pipeline, Rule
from pacs_agent.db.session import Database
from pacs_agent.receiving.ingest import Ingestor, parse_part10
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import sample_path
from tests.support.auth import bearer, make_user


@dataclass
class Api:
    c: TestClient
    db: Database
    state: AgentState
    admin: dict[str, str]
    viewer: dict[str, str]


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path, database_url=database_url, min_free_disk_mb=1)
    db = Database(database_url)
    with db.session() as s:
        s.add(Pipeline(name="chest", bundle="/b/chest"))
        s.add(Pipeline(name="multi-anatomy", bundle="/b/multi"))
        s.add(Destination(name="pacs", url="dicomweb+https://user:secret@pacs.example/dicom-web"))
        s.add(Destination(name="ward", url="mllp://ward.example:2575", purpose="notify"))
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    admin = bearer(make_user(database_url, "admin", "admin"))
    viewer = bearer(make_user(database_url, "vera", "viewer"))
    with TestClient(create_app(state)) as c:
        yield Api(c, db, state, admin, viewer)
    db.dispose()


CHEST = {
    "name": "chest",
    "when": ['tags.Modality in ["CR", "DX"]', 'tags.BodyPartExamined == "CHEST"'],
    "action": "process",
    "pipeline": "chest",
    "priority": "urgent",
    "destinations": ["pacs", "sender"],
    "notify": ["ward"],
}
EXTREMITY = {
    "name": "extremity",
    "when": ['tags.Modality == "CR"', 'tags.BodyPartExamined != "CHEST"'],
    "action": "process",
    "pipeline": "multi-anatomy",
}
NO_CT = {
    "name": "no-ct",
    "when": ['tags.Modality == "CT"'],
    "action": "discard",
    "reason": "CT is not read here",
}


def test_crud_versions_and_history(api: Api) -> None:
    c, admin = api.c, api.admin
    r = c.post("/api/rules", json=CHEST, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["continue"] is False
    assert r.headers["etag"] == '"1"'
    assert c.post("/api/rules", json=NO_CT, headers=admin).status_code == 201
    assert [x["name"] for x in c.get("/api/rules", headers=api.viewer).json()] == [
        "chest",
        "no-ct",
    ]
    # Viewers read, only admins write.
    assert c.get("/api/rules/chest", headers=api.viewer).status_code == 200
    assert c.post("/api/rules", json=EXTREMITY, headers=api.viewer).status_code == 403
    assert c.get("/api/rules").status_code == 401

    changed = {**CHEST, "priority": "stat", "version": 1}
    r = c.put("/api/rules/chest", json=changed, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2 and r.json()["priority"] == "stat"
    # The same edit again, from a client that still has version 1: refused, not lost.
    r = c.put("/api/rules/chest", json={**changed, "priority": "routine"}, headers=admin)
    assert r.status_code == 409
    r = c.put("/api/rules/chest", json={**CHEST, "priority": "routine"}, headers=admin)
    assert r.status_code == 428  # no version at all
    r = c.post("/api/rules/chest/disable", headers={**admin, "If-Match": '"1"'})
    assert r.status_code == 409
    r = c.post("/api/rules/chest/disable", headers={**admin, "If-Match": '"2"'})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["version"] == 3
    r = c.post("/api/rules/chest/enable", json={"version": 3}, headers=admin)
    assert r.status_code == 200 and r.json()["enabled"] is True
    r = c.post("/api/rules/reorder", json={"names": ["no-ct", "chest"]}, headers=admin)
    assert r.status_code == 200 and [x["name"] for x in r.json()] == ["no-ct", "chest"]
    assert c.post("/api/rules/reorder", json={"names": ["chest"]}, headers=admin).status_code == 422
    chest = c.get("/api/rules/chest", headers=admin).json()
    assert chest["version"] == 5

    history = c.get("/api/rules/chest/history", headers=api.viewer).json()
    assert [h["action"] for h in history] == [
        "rule.create",
        "rule.update",
        "rule.disable",
        "rule.enable",
        "rule.reorder",
    ]
    assert all(h["actor"] == "admin" for h in history)
    diff = history[1]["diff"]
    assert "--- chest v1" in diff and "+++ chest v2" in diff
    assert "-priority: urgent" in diff and "+priority: stat" in diff
    assert "+enabled: false" in history[2]["diff"]

    # Rename: the history follows the rule.
    renamed = {**CHEST, "name": "chest-pa", "version": 5}
    r = c.put("/api/rules/chest", json=renamed, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "chest-pa"
    assert len(c.get("/api/rules/chest-pa/history", headers=admin).json()) == 6

    assert c.delete("/api/rules/chest-pa", headers=admin).status_code == 428
    assert c.delete("/api/rules/chest-pa?version=1", headers=admin).status_code == 409
    assert c.delete("/api/rules/chest-pa?version=6", headers=admin).status_code == 204
    assert c.get("/api/rules/chest-pa", headers=admin).status_code == 404
    history = c.get("/api/rules/chest-pa/history", headers=admin).json()
    assert history[-1]["action"] == "rule.delete" and history[-1]["after"] is None
    assert c.get("/api/rules/nothing/history", headers=admin).status_code == 404


def test_validation_answers_422_with_field_and_reason(api: Api) -> None:
    c, admin = api.c, api.admin
    assert c.post("/api/rules", json=CHEST, headers=admin).status_code == 201
    cases = [
        ({**EXTREMITY, "when": ["true", "tags.Modality =="]}, "when[1]", "does not compile"),
        ({**EXTREMITY, "when": ["modality == 'CR'"]}, "when[0]", "unknown variable 'modality'"),
        ({**EXTREMITY, "pipeline": "brain"}, "pipeline", "unknown pipeline 'brain'"),
        ({**EXTREMITY, "destinations": ["ward"]}, "destinations[0]", "unknown destination"),
        ({**EXTREMITY, "notify": ["pacs"]}, "notify[0]", "unknown notification channel"),
        ({**EXTREMITY, "priority": "asap"}, "priority", ""),
        ({**EXTREMITY, "action": "skip"}, "action", ""),
        ({**EXTREMITY, "name": "chest"}, "name", "exists already"),
        ({**EXTREMITY, "name": "fallback"}, "name", "reserved"),
        ({**EXTREMITY, "colour": "red"}, "colour", "unknown field"),
        ({"name": "x"}, "action", "required"),
    ]
    for body, field, reason in cases:
        for url in ("/api/rules", "/api/rules/validate"):
            r = c.post(url, json=body, headers=admin)
            assert r.status_code == 422, (url, body, r.text)
            detail = r.json()["detail"]
            assert any(d["field"] == field and reason in d["reason"] for d in detail), detail
    ok = c.post("/api/rules/validate", json=EXTREMITY, headers=admin)
    assert ok.status_code == 200 and ok.json() == {"valid": True}
    editing = c.post("/api/rules/validate?editing=chest", json=CHEST, headers=admin)
    assert editing.status_code == 200
    assert [r["name"] for r in c.get("/api/rules", headers=admin).json()] == ["chest"]
    # Garbage bodies: 400 / 415, never 500.
    assert (
        c.post(
            "/api/rules",
            content=b"{not json",
            headers={**admin, "content-type": "application/json"},
        ).status_code
        == 400
    )
    assert (
        c.post(
            "/api/rules", content=b"name: x", headers={**admin, "content-type": "text/yaml"}
        ).status_code
        == 415
    )
    assert c.post("/api/rules", json=[1, 2], headers=admin).status_code == 422
    bad_etag = c.post("/api/rules/chest/disable", headers={**admin, "If-Match": "abc"})
    assert bad_etag.status_code == 400


def test_fallback_rule(api: Api) -> None:
    c, admin = api.c, api.admin
    r = c.get("/api/rules/fallback", headers=api.viewer)
    assert r.status_code == 200
    assert r.json() == {
        "name": "fallback",
        "action": "process",
        "reason": None,
        "pipeline": None,
        "priority": None,
        "destinations": [],
        "completion": None,
        "notify": [],
        "version": 1,
    }
    new = {"action": "discard", "reason": "no rule for it"}
    assert c.put("/api/rules/fallback", json=new, headers=admin).status_code == 428
    assert (
        c.put("/api/rules/fallback", json={**new, "version": 1}, headers=api.viewer).status_code
        == 403
    )
    r = c.put("/api/rules/fallback", json={**new, "version": 1}, headers=admin)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert (
        c.put("/api/rules/fallback", json={**new, "version": 1}, headers=admin).status_code == 409
    )
    r = c.put("/api/rules/fallback", json={"pipeline": "nope", "version": 2}, headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "pipeline"
    history = c.get("/api/rules/fallback/history", headers=admin).json()
    assert "+action: discard" in history[0]["diff"]


def _post_file(c: TestClient, headers: dict[str, str], name: str, **params: str) -> dict:
    r = c.post(
        "/api/rules/test",
        params=params,
        content=sample_path(name).read_bytes(),
        headers={**headers, "content-type": "application/dicom"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_tester_with_dicom_files(api: Api) -> None:
    c, admin = api.c, api.admin
    for body in (CHEST, EXTREMITY, NO_CT):
        assert c.post("/api/rules", json=body, headers=admin).status_code == 201
    chest = _post_file(c, admin, "RG1_UNCR.dcm")  # NEMA WG04 CR chest PA
    assert chest["rule"] == "chest" and chest["action"] == "process"
    assert chest["pipeline"] == "chest" and chest["priority"] == "urgent"
    assert chest["destinations"] == ["pacs", "sender"] and chest["notify"] == ["ward"]
    [trace] = chest["trace"]
    assert trace["matched"] is True and trace["version"] == 1
    conds = trace["instances"][0]["conditions"]
    assert [x["result"] for x in conds] == [True, True]

    hand = _post_file(c, admin, "RG3_UNCR.dcm")  # NEMA WG04 CR extremity
    assert hand["rule"] == "extremity" and hand["pipeline"] == "multi-anatomy"
    assert [t["matched"] for t in hand["trace"]] == [False, True]
    assert hand["trace"][0]["instances"][0]["conditions"][1]["result"] is False

    ct = _post_file(c, admin, "CT_small.dcm")
    assert ct["rule"] == "no-ct" and ct["action"] == "discard"
    assert "CT is not read here" in ct["reason"]
    # CT_small has no Body Part Examined: false, with the reason, and routing goes on.
    miss = ct["trace"][1]["instances"][0]["conditions"][1]
    assert miss["result"] is False and "BodyPartExamined" in miss["reason"]

    mr = _post_file(c, admin, "MR_small.dcm", calling_ae="MRI1", source="dimse")
    assert mr["rule"] is None and mr["fallback"] is True and mr["action"] == "skip"
    assert "no analysable images" in mr["reason"]

    # Drafts instead of the saved rules, with a dropped file (multipart).
    drafts = [
        {
            "name": "all-to-multi",
            "when": ['calling_ae == "MOD"'],
            "action": "process",
            "pipeline": "multi-anatomy",
            "priority": "stat",
        },
        {"name": "fallback", "action": "discard", "reason": "draft fallback"},
    ]
    files = {"file": ("x.dcm", sample_path("RG1_UNCR.dcm").read_bytes(), "application/dicom")}
    r = c.post(
        "/api/rules/test?calling_ae=MOD",
        files=files,
        data={"rules": json.dumps(drafts)},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["rule"] == "all-to-multi" and r.json()["priority"] == "stat"
    assert r.json()["trace"][0]["version"] == 0  # a draft
    r = c.post("/api/rules/test", files=files, data={"rules": json.dumps(drafts)}, headers=admin)
    assert r.json()["rule"] is None and r.json()["action"] == "discard"
    bad = [{**drafts[0], "when": ["nope"]}]
    r = c.post("/api/rules/test", files=files, data={"rules": json.dumps(bad)}, headers=admin)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "rules[0].when[0]"

    # Garbage: 400 / 415, never 500.
    def post(body: bytes, ctype: str) -> int:
        return c.post(
            "/api/rules/test", content=body, headers={**admin, "content-type": ctype}
        ).status_code

    assert post(b"not dicom at all", "application/dicom") == 400
    assert post(b"\x00" * 200, "application/dicom") == 400
    assert post(b"{", "application/json") == 400
    assert post(b"hello", "text/plain") == 415
    assert post(b"--x\r\n", "multipart/form-data; boundary=x") in (400, 422)
    assert post(json.dumps({"study": None}).encode(), "application/json") == 422
    assert c.post("/api/rules/test", json={"study": "1.2.3"}, headers=api.viewer).status_code == 403


def test_tester_with_a_received_study(api: Api) -> None:
    c, admin = api.c, api.admin
    ingestor = Ingestor(api.db, api.state.store)
    uid = generate_uid()
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        ds = parse_part10(sample_path(name).read_bytes())
        ds.StudyInstanceUID = uid
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ingestor.ingest(
            buf.getvalue(), ds, ds.file_meta.TransferSyntaxUID, source="dimse", calling_ae="MOD"
        )
    for body in (EXTREMITY, CHEST):
        assert c.post("/api/rules", json=body, headers=admin).status_code == 201
    r = c.post("/api/rules/test", json={"study": uid}, headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rule"] == "extremity"
    [trace] = out["trace"]
    # The first instance (the chest) fails the rule, the second (the extremity) takes it.
    assert [i["conditions"][1]["result"] for i in trace["instances"]] == [False, True]
    drafts = [
        {**CHEST, "when": ['source == "dimse"', 'calling_ae == "MOD"', "instance_count == 2"]}
    ]
    r = c.post("/api/rules/test", json={"study": uid, "rules": drafts}, headers=admin)
    assert r.status_code == 200 and r.json()["rule"] == "chest"
    assert c.post("/api/rules/test", json={"study": "1.2.3"}, headers=admin).status_code == 404


def test_a_corrupted_row_is_listed_with_its_error_and_fixed_by_saving(api: Api) -> None:
    c, admin = api.c, api.admin
    with api.db.session() as s:
        s.add(Rule(name="broken", position=1, when=["tags.Modality =="], pipeline="chest"))
        # The kind of typo the old conditions invited: a mapping where a list belongs.
        s.add(Rule(name="typo", position=2, when={"modality": ["CR"]}, action="skip"))
    out = _post_file(c, admin, "RG1_UNCR.dcm")
    assert out["rule"] is None and out["fallback"] is True
    assert out["trace"][0]["error"].startswith("when[0]: does not compile")
    assert "'broken' v1 skipped" in out["warnings"][0]
    assert "'typo' v1 skipped" in out["warnings"][1]
    listed = {r["name"]: r for r in c.get("/api/rules", headers=api.viewer).json()}
    assert listed["typo"]["when"] == ['{"modality": ["CR"]}']
    assert "action" in listed["typo"]["error"] and "when" in listed["typo"]["error"]
    fixed = {**CHEST, "name": "broken", "destinations": [], "version": 1}
    r = c.put("/api/rules/broken", json=fixed, headers=admin)
    assert r.status_code == 200 and r.json()["error"] is None
    assert _post_file(c, admin, "RG1_UNCR.dcm")["rule"] == "broken"


def test_dimse_variables_and_the_sender_destination(api: Api) -> None:
    """A study sent with dcmtk's storescu records the called AE and the sender's address; the
    rules see them, and `sender` resolves to the calling AE at that address (port 104) unless a
    destination is named after the calling AE."""
    from sqlalchemy import select

    from pacs_agent.db.models import Job, Study
    from pacs_agent.receiving.dimse import start_scp
    from pacs_agent.scheduling.completion import complete_study
    from tests.conftest import free_port, storescu

    settings = Settings(
        data_dir=api.state.settings.data_dir, dicom_port=free_port(), dicom_host="127.0.0.1"
    )
    server = start_scp(settings, Ingestor(api.db, api.state.store))
    try:
        for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
            # Called as "ED_ROUTER": the study records the title the sender called, not ours.
            sent = storescu(settings.dicom_port, sample_path(name), aet="MOD", aec="ED_ROUTER")
            assert sent.returncode == 0
    finally:
        server.shutdown()
    with api.db.session() as s:
        studies = list(s.scalars(select(Study).order_by(Study.id)))
    assert len(studies) == 2
    assert {(st.calling_ae, st.called_ae, st.sender_address) for st in studies} == {
        ("MOD", "ED_ROUTER", "127.0.0.1")
    }
    rule = {
        "name": "from-mod",
        "when": [
            'source == "dimse" && calling_ae == "MOD"',
            'called_ae == "ED_ROUTER" && sender_address == "127.0.0.1"',
        ],
        "action": "process",
        "destinations": ["sender"],
    }
    assert api.c.post("/api/rules", json=rule, headers=api.admin).status_code == 201
    uid = studies[0].study_instance_uid
    r = api.c.post("/api/rules/test", json={"study": uid}, headers=api.admin)
    assert r.status_code == 200 and r.json()["rule"] == "from-mod", r.text

    store = api.state.store
    assert complete_study(api.db, studies[0].id, 1, "test", default_destinations=[], store=store)
    with api.db.session() as s:
        s.add(Destination(name="MOD", url="dicom://MOD@modality.example:11112"))
    assert complete_study(api.db, studies[1].id, 1, "test", default_destinations=[], store=store)
    with api.db.session() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
    assert [j.destinations for j in jobs] == [
        ["dicom://MOD@127.0.0.1:104"],
        ["dicom://MOD@modality.example:11112"],
    ]
    assert {j.rule_name for j in jobs} == {"from-mod"}
