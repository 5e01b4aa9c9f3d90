"""Closed by default, checked on every route of the agent's own OpenAPI document (so a route added
tomorrow is covered without editing this file): without a credential or with a wrong one, 401;
with a role that may not, 403. The role each route needs is read from its dependencies (the
``required_role`` of ``pacs_agent.api.deps.require``), not from a list kept here.

Also: every ``/api/*`` and ``/dicomweb/*`` route of the application (in the document or not) has a
role dependency, and every console page sends a visitor who is not logged in to the login form.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from pacs_agent import users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.security import ROLE_RANK, SERVICE_ROLE, role_allows
from pacs_agent.settings import Settings

SERVICE_TOKEN = "service-token-of-the-openapi-auth-test"
# The only routes open without a credential (issue 8): health, the HMAC-signed webhook, and the
# login that hands out a credential. /metrics is closed (issue 10): any role's token, or the
# metrics token.
OPEN = {
    ("GET", "/health"),
    ("POST", "/webhook/orthanc"),
    ("POST", "/api/auth/login"),
}
# Console routes that must stay open: the login form and its POST, and the static files.
CONSOLE_OPEN = re.compile(r"^/(login|logout|console/static/.*)$")
CLOSED_PREFIXES = ("/api/", "/dicomweb/")


def required_roles(dependant: Dependant) -> set[str]:
    """Every role a route's dependency tree asks for (``require(role)`` marks its callable)."""
    found = set()
    role = getattr(dependant.call, "required_role", None)
    if role is not None:
        found.add(role)
    for sub in dependant.dependencies:
        found |= required_roles(sub)
    return found


def strictest(roles: set[str]) -> str:
    """The role a caller needs for all of ``roles`` (service routes rank with operators)."""
    rank = {**ROLE_RANK, SERVICE_ROLE: ROLE_RANK["operator"]}
    return max(roles, key=lambda r: rank[r])


def _allowed(principal_role: str, roles: set[str]) -> bool:
    return all(role_allows(principal_role, r) for r in roles)


def api_routes(app: FastAPI) -> list[Any]:
    """Every API route of the app as served (FastAPI >= 0.16x wraps included routers: their
    routes, with the dependencies added at inclusion, come from ``iter_route_contexts``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: included routes are plain APIRoutes
        return [r for r in app.routes if isinstance(r, APIRoute)]
    return [c for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def routes_by_operation(app: FastAPI) -> dict[tuple[str, str], Any]:
    out = {}
    for route in api_routes(app):
        for method in route.methods:
            out[(method, route.path_format)] = route
    return out


def fill_path(path: str, operation: dict[str, Any]) -> str:
    """A concrete URL for a templated path: integers for integer parameters, else a value that
    is a valid UID and a valid name."""
    kinds = {
        p["name"]: p.get("schema", {}).get("type")
        for p in operation.get("parameters", [])
        if p.get("in") == "path"
    }
    return re.sub(
        r"\{([^}]+)\}", lambda m: "1" if kinds.get(m.group(1)) == "integer" else "1.2.3", path
    )


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict]]:
    """One app on a migrated SQLite database (the roles do not depend on the database kind) with
    a user and a token for each role."""
    from pacs_agent.db.migrate import upgrade

    tmp: Path = tmp_path_factory.mktemp("openapi-auth")
    url = f"sqlite:///{tmp / 'agent.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp, database_url=url, api_token=SERVICE_TOKEN, min_free_disk_mb=1)
    db = Database(url)
    tokens = {SERVICE_ROLE: SERVICE_TOKEN}
    with db.session() as s:
        for role in ROLE_RANK:
            users.create_user(s, f"user-{role}", role, None, actor="test")
            tokens[role] = users.issue_token(s, f"user-{role}", actor="test").token
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    with TestClient(create_app(state), follow_redirects=False) as client:
        yield client, tokens
    db.dispose()


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    doc = client.app.openapi()  # type: ignore[attr-defined]
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    ]


def test_the_open_routes_are_only_the_allowed_ones(agent: tuple[TestClient, dict]) -> None:
    client, _ = agent
    by_op = routes_by_operation(client.app)  # type: ignore[arg-type]
    ops = operations(client)
    assert len(ops) > 10, "the OpenAPI document lists (almost) no routes"
    unguarded = [
        (m, p)
        for m, p, _ in ops
        if (m, p) not in OPEN and not required_roles(by_op[(m, p)].dependant)
    ]
    assert unguarded == [], (
        f"routes without a Viewer/Operator/Admin/Service dependency: {unguarded}"
    )
    # Routes left out of the document are checked too.
    hidden = [
        (sorted(r.methods), r.path_format)
        for r in api_routes(client.app)  # type: ignore[arg-type]
        if r.path_format.startswith(CLOSED_PREFIXES)
        and not required_roles(r.dependant)
        and not any((m, r.path_format) in OPEN for m in r.methods)
    ]
    assert hidden == [], f"/api or /dicomweb routes without a role dependency: {hidden}"


def test_every_route_refuses_missing_wrong_and_insufficient_credentials(
    agent: tuple[TestClient, dict],
) -> None:
    client, tokens = agent
    by_op = routes_by_operation(client.app)  # type: ignore[arg-type]
    problems: list[str] = []
    checked = 0
    for method, path, op in operations(client):
        if (method, path) in OPEN:
            continue
        roles = required_roles(by_op[(method, path)].dependant)
        url = fill_path(path, op)
        for label, headers in (
            ("no credential", {}),
            ("a wrong token", {"authorization": "Bearer not-a-token"}),
            ("a wrong scheme", {"authorization": f"Basic {SERVICE_TOKEN}"}),
            ("a session cookie nobody issued", {"cookie": "pacs_agent_session=forged"}),
        ):
            r = client.request(method, url, headers=headers)
            if r.status_code != 401:
                problems.append(f"{method} {path} with {label}: {r.status_code}, expected 401")
        for who, token in tokens.items():
            r = client.request(method, url, headers={"authorization": f"Bearer {token}"})
            if not _allowed(who, roles):
                if r.status_code != 403:
                    problems.append(
                        f"{method} {path} as {who} (needs {strictest(roles)}): "
                        f"{r.status_code}, expected 403"
                    )
            elif method == "GET" and r.status_code in (401, 403):
                problems.append(f"{method} {path} as {who} (allowed): {r.status_code}")
        checked += 1
    assert checked > 10
    assert problems == [], "\n".join(problems)


def test_a_viewer_is_refused_every_change(agent: tuple[TestClient, dict]) -> None:
    """The issue's example in one line each: a viewer token on every unsafe route that needs
    more than a viewer gets 403 (and no unsafe route except logout is open to viewers)."""
    client, tokens = agent
    by_op = routes_by_operation(client.app)  # type: ignore[arg-type]
    viewer_writes = []
    for method, path, op in operations(client):
        if method == "GET" or (method, path) in OPEN:
            continue
        roles = required_roles(by_op[(method, path)].dependant)
        if _allowed("viewer", roles):
            viewer_writes.append(path)
            continue
        r = client.request(
            method, fill_path(path, op), headers={"authorization": f"Bearer {tokens['viewer']}"}
        )
        assert r.status_code == 403, f"{method} {path} as viewer: {r.status_code}"
    assert viewer_writes == ["/api/auth/logout"]


def console_pages(app: FastAPI) -> list[str]:
    """GET routes of the console (outside the document): everything not under the API prefixes,
    not open, not /health."""
    pages = []
    for r in api_routes(app):
        if "GET" not in r.methods:
            continue
        path = r.path_format
        if path.startswith(CLOSED_PREFIXES) or ("GET", path) in OPEN or CONSOLE_OPEN.match(path):
            continue
        if r.include_in_schema:
            continue
        pages.append(path)
    return pages


def test_console_pages_send_visitors_to_the_login_form(agent: tuple[TestClient, dict]) -> None:
    client, tokens = agent
    pages = console_pages(client.app)  # type: ignore[arg-type]
    # Read from the router: whatever pages the console has, each is covered; "/" must be one.
    assert "/" in pages, f"the console has no page at / (pages: {pages})"
    for path in pages:
        url = re.sub(r"\{[^}]+\}", "1.2.3", path)
        for headers in ({}, {"authorization": "Bearer not-a-token"}):
            r = client.get(url, headers=headers)
            assert r.status_code in (302, 303, 307), f"GET {path}: {r.status_code}"
            assert r.headers["location"].startswith("/login"), f"GET {path}: {r.headers}"
    # The login form itself is open.
    assert client.get("/login").status_code == 200
    # A logged-in viewer is not sent to the login form from "/".
    r = client.get("/", headers={"authorization": f"Bearer {tokens['viewer']}"})
    assert r.status_code == 200
