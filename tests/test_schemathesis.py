"""Schemathesis against the agent's own OpenAPI document, as an admin: no route answers with a
server error, and every status a route returns is one its documentation lists.

Every operation of the document is exercised (so a route added tomorrow is covered), with a few
generated requests each, on a real PostgreSQL database (it is stricter than SQLite: bounded
strings, no NUL characters). All problems are collected and reported together, one line per
route and status, rather than stopping at the first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from pacs_agent import users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.settings import Settings
from tests.conftest import _create_pg_database, _drop_pg_database

SERVICE_TOKEN = "service-token-of-the-schemathesis-test"
# Requests per operation and generation mode (positive: valid by the schema; negative: not).
MAX_EXAMPLES = int(os.environ.get("PACS_AGENT_SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance]


class RecordingPuller:
    """Takes the webhook's pull requests (the Orthanc puller is tested end to end elsewhere)."""

    def submit(self, _req: Any) -> None:
        pass


@pytest.fixture
def app_and_token(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Any, dict[str, str]]]:
    from pacs_agent.db.migrate import upgrade

    admin_url = request.getfixturevalue("postgres_server")
    name, url = _create_pg_database(admin_url)
    db = Database(url)
    try:
        upgrade(url)
        with db.session() as s:
            users.create_user(s, "fuzz-admin", "admin", None, actor="test")
            token = users.issue_token(s, "fuzz-admin", actor="test").token
        settings = Settings(
            data_dir=tmp_path, database_url=url, api_token=SERVICE_TOKEN, min_free_disk_mb=1
        )
        state = AgentState(
            settings=settings,
            db=db,
            store=InstanceStore(settings.instance_dir),
            puller=RecordingPuller(),  # type: ignore[arg-type]
        )
        yield create_app(state), {"Authorization": f"Bearer {token}"}
    finally:
        db.dispose()
        _drop_pg_database(admin_url, name)


def _describe(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def _exercise(
    operation: Any, mode: GenerationMode, auth: dict[str, str], problems: dict[str, str]
) -> None:
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if label in problems:
            return
        try:
            case.call_and_validate(headers=dict(auth), checks=CHECKS)
        # Every failure is recorded, not only the first (schemathesis raises a group).
        except (Exception, BaseExceptionGroup) as exc:
            problems[label] = _describe(exc)

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to make invalid (negative mode on an operation without inputs)


def test_no_server_error_and_only_documented_statuses(
    app_and_token: tuple[Any, dict[str, str]],
) -> None:
    app, auth = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    problems: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _exercise(result.ok(), mode, auth, problems)
    assert operations > 10, "the OpenAPI document lists (almost) no operations"
    report = "\n".join(f"- {label}: {text}" for label, text in sorted(problems.items()))
    assert not problems, f"{len(problems)} operations failed schemathesis checks:\n{report}"


def test_nul_characters_in_paths_and_queries_are_no_server_error(
    app_and_token: tuple[Any, dict[str, str]],
) -> None:
    """Generated strings rarely hold NUL, which PostgreSQL cannot store or compare: every path
    parameter and every string query parameter of every operation gets one, deterministically."""
    import re

    from fastapi.testclient import TestClient

    app, auth = app_and_token
    client = TestClient(app, raise_server_exceptions=False)
    doc = app.openapi()
    errors = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            if "{" in path:
                url = re.sub(r"\{[^}]+\}", "a%00b", path)
                r = client.request(method.upper(), url, headers=auth)
                if r.status_code >= 500:
                    errors.append(f"{method.upper()} {url}: {r.status_code}")
            plain = re.sub(r"\{[^}]+\}", "1", path)
            for p in params:
                schema = p.get("schema", {})
                types = {schema.get("type")} | {s.get("type") for s in schema.get("anyOf", [])}
                if p["in"] != "query" or "string" not in types:
                    continue
                r = client.request(
                    method.upper(), plain, params={p["name"]: "a\x00b"}, headers=auth
                )
                if r.status_code >= 500:
                    errors.append(f"{method.upper()} {path}?{p['name']}=<NUL>: {r.status_code}")
    assert errors == [], "server errors on NUL input:\n" + "\n".join(errors)
