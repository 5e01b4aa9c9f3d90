"""End to end with real parts: rules imported from YAML with `pacs-agent rules import` route a
chest PA (RG1) to the `chest` pipeline, an extremity (RG3) to `multi-anatomy`, and discard an MR
with the rule's reason. Real agent and worker processes, Redis, PostgreSQL, dcmtk's storescu.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_agent.db.models import Pipeline
from pacs_agent.db.session import Database
from tests.conftest import REPO, AgentEnv, sample_path, storescu

pytestmark = pytest.mark.e2e

RULES_YAML = """\
- name: chest-pa
  when:
    - tags.Modality in ["CR", "DX"]
    - has(tags.BodyPartExamined) && tags.BodyPartExamined == "CHEST"
  action: process
  pipeline: chest
- name: extremities
  when:
    - tags.Modality in ["CR", "DX"]
    - tags.BodyPartExamined in ["EXTREMITY", "HAND", "FOOT", "KNEE"]
  action: process
  pipeline: multi-anatomy
  priority: urgent
- name: no-mr
  when:
    - tags.Modality == "MR"
  action: discard
  reason: MR is not analysed by this product
"""


@pytest.fixture
def agent(
    tmp_path: Path, database_url: str, broker_url: str, demo_bundle: Path
) -> Iterator[AgentEnv]:
    env = AgentEnv(tmp_path, database_url, broker_url, demo_bundle, destinations="")
    db = Database(database_url)
    with db.session() as s:
        s.add(Pipeline(name="chest", bundle=str(demo_bundle), description="chest PA/AP"))
        s.add(Pipeline(name="multi-anatomy", bundle=str(demo_bundle), description="any X-ray"))
    db.dispose()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML)
    imported = subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "rules", "import", str(rules)],
        env=env.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    try:
        env.start_agent()
        env.start_worker()
        yield env
    finally:
        env.stop()


def _created_with(study: dict, cls: str) -> bool:
    created = [e["message"] for e in study["events"] if e["kind"] == "job.created"]
    return len(created) == 1 and f"priority {cls}," in created[0]


def test_yaml_rules_route_each_study_to_its_pipeline(agent: AgentEnv) -> None:
    files = {
        "chest": sample_path("RG1_UNCR.dcm"),
        "extremity": sample_path("RG3_UNCR.dcm"),
        "mr": sample_path("MR_small.dcm"),
    }
    uids = {k: str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for k, p in files.items()}
    sent = storescu(agent.dicom_port, *files.values())
    assert sent.returncode == 0, sent.stderr

    chest = agent.wait_study(uids["chest"], {"done", "failed"})
    extremity = agent.wait_study(uids["extremity"], {"done", "failed"})
    mr = agent.wait_study(uids["mr"], {"skipped", "done", "failed"})

    assert chest["status"] == "done", chest
    assert (chest["rule"], chest["rule_version"]) == ("chest-pa", 1)
    assert [j["pipeline"] for j in chest["jobs"]] == ["chest"]
    # The class the rule gave at job creation (the AI result may raise it later, never lower).
    assert _created_with(chest, "routine")

    assert extremity["status"] == "done", extremity
    assert (extremity["rule"], extremity["rule_version"]) == ("extremities", 1)
    assert [j["pipeline"] for j in extremity["jobs"]] == ["multi-anatomy"]
    assert _created_with(extremity, "urgent")
    assert extremity["jobs"][0]["priority"] in ("urgent", "stat")

    assert mr["status"] == "skipped", mr
    assert mr["rule"] == "no-mr"
    assert mr["rule_version"] == 1
    assert mr["reason"] == "MR is not analysed by this product"
    assert mr["jobs"] == []
