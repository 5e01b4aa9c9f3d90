"""The routing-rule engine: CEL conditions over instance variables, validation, and the YAML
import/export (CLI) with versions and audit, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import re
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from sqlalchemy import select

from pacs_agent import cli
from pacs_agent.db.models import AuditEntry, Destination, Pipeline, Rule
from pacs_agent.db.session import Database
from pacs_agent.scheduling import rules as engine
from pacs_agent.scheduling.rules import (
    Catalog,
    CompiledRule,
    InstanceInput,
    RuleSpec,
    StudyContext,
    check_condition,
    evaluate,
    evaluate_condition,
    instance_variables,
    patient_age_years,
    tags_of,
    validate_rule,
)
from tests.conftest import REPO, sample_path

CATALOG = Catalog(
    pipelines=frozenset({"chest", "multi-anatomy"}),
    destinations=frozenset({"pacs"}),
    notify=frozenset({"ward"}),
)


def _eval(expr: str, tags: dict, **study: object) -> engine.ConditionResult:
    values = instance_variables(tags, StudyContext(**study))  # type: ignore[arg-type]
    return evaluate_condition(expr, engine._context(values), values)


def test_tags_from_a_real_header() -> None:
    ds = dcmread(sample_path("CT_small.dcm"), stop_before_pixels=True)
    tags = tags_of(dcmread(sample_path("CT_small.dcm")))
    assert tags["Modality"] == "CT"
    assert tags["ImageType"] == [str(v) for v in ds.ImageType]  # multi-valued: list of strings
    assert tags["Rows"] == 128 and isinstance(tags["Rows"], int)  # US: a number
    assert all(isinstance(v, float) for v in tags["PixelSpacing"])  # DS, VM 2: numbers
    assert "PixelData" not in tags  # binary values are left out
    assert tags["PatientName"] == str(ds.PatientName)  # a string (never logged)


def test_patient_age_and_time_variables() -> None:
    assert patient_age_years({"PatientAge": "045Y"}) == 45
    assert patient_age_years({"PatientAge": "006M"}) == 0.5
    assert patient_age_years({"PatientBirthDate": "20000101", "StudyDate": "20200101"}) == 20.0
    assert patient_age_years({"PatientAge": "", "PatientBirthDate": "junk"}) is None
    monday_3am = dt.datetime(2026, 11, 30, 3, 0).astimezone()
    values = instance_variables({}, StudyContext(source="dimse", now=monday_3am))
    assert values["now_hour"] == 3 and values["now_weekday"] == 1  # 0 is Sunday, as CEL
    assert values["calling_ae"] == "" and values["source"] == "dimse"


def test_conditions_true_false_and_reasons() -> None:
    tags = {"Modality": "CR", "ImageType": ["ORIGINAL", "PRIMARY"], "Rows": 100}
    assert _eval('tags.Modality in ["CR", "DX"]', tags).result is True
    assert _eval('"PRIMARY" in tags.ImageType && tags.Rows > 50', tags).result is True
    assert _eval('source == "dimse" && calling_ae == "MOD"', tags, source="dimse").result is False
    # A missing attribute: false, with the reason, never an error.
    missing = _eval('tags.BodyPartExamined == "CHEST"', tags)
    assert missing.result is False and "BodyPartExamined" in (missing.reason or "")
    assert _eval("has(tags.BodyPartExamined)", tags).result is False
    assert _eval("has(tags.Modality)", tags).result is True
    assert _eval('tags.SeriesDescription.lowerAscii().contains("pa")', {"SeriesDescription": "PA"})
    # Could not be evaluated: the result is None and the reason says why.
    typed = _eval("tags.Modality + 1 == 2", tags)
    assert typed.result is None and "cannot be evaluated" in (typed.reason or "")
    assert _eval("tags.Modality", tags).result is None  # not a boolean
    age = _eval("patient_age_years < 18", tags)
    assert age.result is None and "patient_age_years is unknown" in (age.reason or "")
    assert _eval("patient_age_years >= 18", {"PatientAge": "045Y"}).result is True


def test_regex_is_linear_time_and_a_bad_one_is_a_reason() -> None:
    evil = "a" * 50_000 + "!"
    start = time.perf_counter()
    r = _eval('tags.SeriesDescription.matches("(a+)+$")', {"SeriesDescription": evil})
    assert time.perf_counter() - start < 0.5  # backtracking engines take forever here
    assert r.result is False
    assert _eval('tags.Modality.matches("^C")', {"Modality": "CR"}).result is True
    bad = _eval('tags.Modality.matches("(")', {"Modality": "CR"})
    assert bad.result is None and "regex" in (bad.reason or "")


def test_check_condition() -> None:
    assert check_condition('tags.Modality == "CR"') is None
    assert check_condition('tags.ImageType.exists(t, t == "PRIMARY")') is None  # bound variable
    assert "does not compile" in (check_condition("tags.Modality ==") or "")
    assert "unknown variable 'modality'" in (check_condition("modality == 'CR'") or "")
    assert "unknown function 'lower'" in (check_condition("tags.Modality.lower() == 'cr'") or "")
    assert check_condition("  ") == "empty condition"
    assert check_condition(3) is not None


def _problems(data: dict, taken: tuple[str, ...] = ()) -> dict[str, str]:
    spec, problems = validate_rule(data, CATALOG, taken=taken)
    assert (spec is None) == bool(problems)
    return {p.field: p.reason for p in problems}


def test_every_validation_error_names_its_field() -> None:
    good = {"name": "chest", "when": ['tags.Modality == "CR"'], "action": "process"}
    assert _problems(good) == {}
    assert _problems({**good, "destinations": ["pacs", "sender"], "notify": ["ward"]}) == {}
    cases = {
        "name": {**good, "name": "bad name/"},
        "when[1]": {**good, "when": ["true", "nope == 1"]},
        "action": {**good, "action": "skip"},
        "pipeline": {**good, "pipeline": "brain"},
        "priority": {**good, "priority": "asap"},
        "destinations[0]": {**good, "destinations": ["nowhere"]},
        "notify[0]": {**good, "notify": ["pager"]},
        "colour": {**good, "colour": "red"},
        "completion.quiet_period_s": {**good, "completion": {"quiet_period_s": -1}},
        "completion.bogus": {**good, "completion": {"bogus": 1}},
        "continue": {**good, "continue": "yes"},
    }
    for where, data in cases.items():
        assert where in _problems(data), where
    assert "unknown variable" in _problems(cases["when[1]"])["when[1]"]
    assert _problems({**good, "name": "fallback"})["name"] == "'fallback' is reserved"
    assert "exists already" in _problems(good, taken=("chest",))["name"]
    assert _problems({"when": []}) == {"name": "required", "action": "required"}
    assert "discard rule runs no pipeline" in _problems(
        {**good, "action": "discard", "pipeline": "chest"}
    ).get("pipeline", "")
    # With no pipelines table rows the default pipeline is the only one.
    assert engine.Catalog(frozenset({"chest"}), frozenset(), frozenset()).pipelines == {"chest"}


def _rule(name: str, when: list[str], **kw: object) -> CompiledRule:
    return CompiledRule(name, 1, RuleSpec.model_validate({"name": name, "when": when, **kw}))


def test_first_match_wins_unless_continue_and_any_instance_suffices() -> None:
    cr = InstanceInput("1.1", {"Modality": "CR"})
    sr = InstanceInput("1.2", {"Modality": "SR"})
    rules = [
        _rule(
            "sr",
            ['tags.Modality == "SR"'],
            action="process",
            pipeline="chest",
            **{"continue": True},
        ),
        _rule("cr", ['tags.Modality == "CR"', "instance_count == 2"], action="process"),
        _rule("later", [], action="process"),
    ]
    ev = evaluate(rules, [cr, sr], StudyContext(instance_count=2))
    assert [r.name for r in ev.matched] == ["sr", "cr"]  # "sr" continues; "cr" stops
    assert [t["rule"] for t in ev.trace] == ["sr", "cr"]
    first = ev.trace[0]["instances"]
    assert first[0]["conditions"][0] == {
        "expr": 'tags.Modality == "SR"',
        "result": False,
        "reason": None,
    }
    assert first[1]["conditions"][0]["result"] is True
    broken = CompiledRule("bad", 3, rules[0].spec, error="when[0]: does not compile")
    ev = evaluate([broken, rules[2]], [cr], StudyContext())
    assert [r.name for r in ev.broken] == ["bad"] and [r.name for r in ev.matched] == ["later"]
    assert ev.trace[0]["error"].startswith("when[0]")


# YAML import / export through the CLI ----------------------------------------------------------

RULES_YAML = """\
- name: chest-pa
  when:
    - tags.Modality in ["CR", "DX"]
    - has(tags.BodyPartExamined) && tags.BodyPartExamined == "CHEST"
  action: process
  pipeline: chest
  priority: urgent
  destinations: [pacs, sender]
- name: no-mr
  when: ['tags.Modality == "MR"']
  action: discard
  reason: MR is not analysed here
  enabled: false
- name: fallback
  action: process
  pipeline: multi-anatomy
  completion:
    quiet_period_s: 10
"""


def _cli(monkeypatch: pytest.MonkeyPatch, tmp: Path, url: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("PACS_AGENT_DATABASE_URL", url)
    monkeypatch.setenv("PACS_AGENT_DATA_DIR", str(tmp))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    code = cli.main(list(argv))
    return code, out.getvalue()


def _seed(database_url: str) -> Database:
    db = Database(database_url)
    with db.session() as s:
        s.add(Pipeline(name="chest", bundle="/b/chest"))
        s.add(Pipeline(name="multi-anatomy", bundle="/b/multi"))
        s.add(Destination(name="pacs", url="dicom://PACS@pacs:104"))
    return db


def test_cli_import_export_round_trip(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _seed(database_url)
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_YAML)
    code, out = _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))
    assert code == 0, out
    assert "2 created" in out
    code, exported = _cli(monkeypatch, tmp_path, database_url, "rules", "export")
    assert code == 0
    assert yaml.safe_load(exported) == yaml.safe_load(RULES_YAML)
    with db.session() as s:
        rows = {r.name: r for r in s.scalars(select(Rule))}
        audit = list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert rows["chest-pa"].position < rows["no-mr"].position
    assert rows["no-mr"].enabled is False and rows["chest-pa"].priority == "urgent"
    assert {a.actor for a in audit} == {"cli"}
    assert [(a.action, a.target) for a in audit] == [
        ("rule.create", "chest-pa"),
        ("rule.create", "no-mr"),
        ("rule.update", "fallback"),
    ]
    # Importing the export again changes nothing: no new versions, no audit entries.
    path.write_text(exported)
    code, out = _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))
    assert code == 0 and "2 unchanged" in out
    with db.session() as s:
        assert len(list(s.scalars(select(AuditEntry)))) == 3
        assert {r.version for r in s.scalars(select(Rule))} == {1}
    db.dispose()


def test_cli_invalid_import_changes_nothing(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = _seed(database_url)
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_YAML)
    assert _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))[0] == 0
    with db.session() as s:
        before = [engine.snapshot(r) for r in engine.all_rules(s)]
        audit_count = len(list(s.scalars(select(AuditEntry))))
    bad = RULES_YAML.replace("pipeline: chest", "pipeline: nowhere").replace(
        "name: no-mr", "name: no-mr\n  colour: red"
    )
    path.write_text("- name: first\n  action: process\n" + bad)
    code, _ = _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))
    err = capsys.readouterr().err
    assert code == 1
    assert "nothing changed" in err
    assert "[1].pipeline: unknown pipeline 'nowhere'" in err
    assert "[2].colour: unknown field" in err
    path.write_text("- [not: valid")
    assert _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))[0] == 1
    path.write_text("- name: fallback\n  action: process\n- name: x\n  action: process\n")
    assert _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))[0] == 1
    with db.session() as s:
        assert [engine.snapshot(r) for r in engine.all_rules(s)] == before
        assert len(list(s.scalars(select(AuditEntry)))) == audit_count
    db.dispose()


def test_readme_example_imports_as_it_is(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The YAML example in the README's "Routing rules" section imports unchanged."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Routing rules", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    db = _seed(database_url)
    with db.session() as s:
        s.add(Destination(name="ward", url="webhook+https://ward.example/hook", purpose="notify"))
    path = tmp_path / "example.yaml"
    path.write_text(example)
    code, out = _cli(monkeypatch, tmp_path, database_url, "rules", "import", str(path))
    assert code == 0, out
    code, exported = _cli(monkeypatch, tmp_path, database_url, "rules", "export")
    assert yaml.safe_load(exported) == yaml.safe_load(example)
    db.dispose()


def test_a_header_value_cel_cannot_take_never_stops_routing() -> None:
    odd = InstanceInput("1.1", {"Modality": "CR", "StationName": "\udc80"})
    ev = evaluate(
        [
            _rule("cr", ['tags.Modality == "CR"'], action="process"),
            _rule("any", [], action="process"),
        ],
        [odd],
        StudyContext(),
    )
    assert [r.name for r in ev.matched] == ["any"]
    shown = ev.trace[0]["instances"][0]
    assert shown["error"] and shown["conditions"][0]["result"] is False
