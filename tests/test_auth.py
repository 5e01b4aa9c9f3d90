"""Users, roles, tokens, console sessions and the audit log, against a real database (SQLite and
PostgreSQL) through the real application (FastAPI's TestClient: in-process HTTP)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from pacs_agent import users
from pacs_agent.api.app import AgentState, create_app
from pacs_agent.api.deps import CSRF_HEADER, SESSION_COOKIE
from pacs_agent.db.models import ApiToken, AuditEntry, User, UserSession
from pacs_agent.db.session import Database
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.security import verify_password
from pacs_agent.settings import Settings
from tests.conftest import REPO

SERVICE_TOKEN = "service-token-of-the-auth-tests"
PASSWORD = "correct horse battery staple"


@dataclass
class Api:
    client: TestClient
    state: AgentState

    @property
    def db(self) -> Database:
        return self.state.db

    def user(self, name: str, role: str, password: str | None = PASSWORD) -> None:
        with self.db.session() as s:
            users.create_user(s, name, role, password, actor="test")

    def token(self, name: str) -> dict[str, str]:
        with self.db.session() as s:
            issued = users.issue_token(s, name, actor="test")
        return {"authorization": f"Bearer {issued.token}"}

    def login(self, name: str, password: str = PASSWORD) -> str:
        """Log in with the client's cookie jar; returns the CSRF token."""
        r = self.client.post("/api/auth/login", json={"name": name, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["csrf_token"])

    def audit(self, action: str) -> list[AuditEntry]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
                )
            )


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        api_token=SERVICE_TOKEN,
        login_attempts=3,
        login_window_s=600,
        min_free_disk_mb=1,
    )
    db = Database(database_url)
    state = AgentState(
        settings=settings, db=db, store=InstanceStore(settings.instance_dir), puller=None
    )
    with TestClient(create_app(state)) as c:
        yield Api(c, state)
    db.dispose()


def test_passwords_are_stored_as_argon2id_hashes_only(api: Api) -> None:
    api.user("alice", "admin")
    with api.db.session() as s:
        stored = s.scalar(select(User.password_hash).where(User.name == "alice"))
        audit_rows = [
            json.dumps([a.before, a.after, a.detail]) for a in s.scalars(select(AuditEntry))
        ]
    assert stored is not None and stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert verify_password(stored, PASSWORD) and not verify_password(stored, PASSWORD + "x")
    assert audit_rows and all(PASSWORD not in row and "argon2" not in row for row in audit_rows)
    # Too short: refused, nothing stored.
    with pytest.raises(users.UserError), api.db.session() as s:
        users.create_user(s, "bob", "viewer", "short", actor="test")
    with api.db.session() as s:
        assert s.scalar(select(User).where(User.name == "bob")) is None


def test_login_sets_a_strict_cookie_and_every_outcome_is_audited(api: Api) -> None:
    api.user("alice", "operator")
    c = api.client
    assert (
        c.post("/api/auth/login", json={"name": "alice", "password": "wrong-one"}).status_code
        == 401
    )
    r = c.post("/api/auth/login", json={"name": "nobody", "password": PASSWORD})
    assert r.status_code == 401
    # The same answer for an unknown user as for a wrong password.
    assert (
        r.json()
        == c.post("/api/auth/login", json={"name": "alice", "password": "wrong-two"}).json()
    )
    r = c.post("/api/auth/login", json={"name": "alice", "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "alice" and body["role"] == "operator" and len(body["csrf_token"]) > 20
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    me = c.get("/api/auth/me").json()
    assert me == {
        "name": "alice",
        "role": "operator",
        "via": "session",
        "csrf_token": body["csrf_token"],
    }

    failures = api.audit(users.LOGIN_FAILURE)
    assert [(a.actor, a.detail) for a in failures] == [
        ("alice", "wrong password"),
        ("nobody", "unknown user"),
        ("alice", "wrong password"),
    ]
    assert [a.actor for a in api.audit(users.LOGIN_SUCCESS)] == ["alice"]
    with api.db.session() as s:
        everything = json.dumps(
            [
                [a.actor, a.target, a.before, a.after, a.detail]
                for a in s.scalars(select(AuditEntry))
            ]
        )
        assert s.scalar(select(User.last_login_at).where(User.name == "alice")) is not None
    for secret in (PASSWORD, "wrong-one", "wrong-two"):
        assert secret not in everything

    # Behind HTTPS the cookie is Secure.
    api.state.settings = api.state.settings.model_copy(update={"secure_cookies": True})
    r = c.post("/api/auth/login", json={"name": "alice", "password": PASSWORD})
    assert "Secure" in r.headers["set-cookie"]


def test_login_is_rate_limited_per_user_and_per_address(api: Api) -> None:
    api.user("alice", "admin")
    settings = api.state.settings
    for _ in range(3):  # login_attempts=3 in the fixture
        with pytest.raises(users.LoginRefused):
            users.login(api.db, settings, "alice", "wrong-password", "10.0.0.1")
    # Per user: the right password from another address is refused too, without a check.
    with pytest.raises(users.RateLimited) as limited:
        users.login(api.db, settings, "alice", PASSWORD, "10.0.0.2")
    assert 0 < limited.value.retry_after_s <= settings.login_window_s
    # Over HTTP: 429 with Retry-After.
    r = api.client.post("/api/auth/login", json={"name": "alice", "password": PASSWORD})
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 600
    assert [a.actor for a in api.audit(users.LOGIN_LIMITED)] == ["alice", "alice"]
    # Sliding window: once the failures are older than the window, alice may log in again.
    with api.db.session() as s:
        s.execute(
            update(AuditEntry)
            .where(AuditEntry.action == users.LOGIN_FAILURE)
            .values(at=AuditEntry.at - dt.timedelta(seconds=settings.login_window_s + 1))
        )
    users.login(api.db, settings, "alice", PASSWORD, "10.0.0.2")

    # Per address (ADDRESS_FACTOR times as many, for people behind one NAT or proxy): failures
    # for many names from one address stop a further name there, not elsewhere.
    api.user("bob", "viewer")
    settings = settings.model_copy(update={"login_attempts": 1})  # fewer slow Argon2 checks
    for name in [f"x{i}" for i in range(settings.login_attempts * users.ADDRESS_FACTOR)]:
        with pytest.raises(users.LoginRefused):
            users.login(api.db, settings, name, "wrong-password", "10.9.9.9")
    with pytest.raises(users.RateLimited):
        users.login(api.db, settings, "bob", PASSWORD, "10.9.9.9")
    users.login(api.db, settings, "bob", PASSWORD, "10.9.9.10")


def test_logout_ends_the_session_and_expired_sessions_are_refused(api: Api) -> None:
    api.user("alice", "viewer")
    c = api.client
    csrf = api.login("alice")
    cookie = c.cookies[SESSION_COOKIE]
    # Logout is an unsafe method: without the CSRF token it is refused.
    assert c.post("/api/auth/logout").status_code == 403
    assert c.get("/api/auth/me").status_code == 200
    r = c.post("/api/auth/logout", headers={CSRF_HEADER: csrf})
    assert r.status_code == 200 and r.json() == {"logged_out": True}
    assert [a.actor for a in api.audit("logout")] == ["alice"]
    # The old cookie is worth nothing now, even if a client kept it.
    c.cookies.set(SESSION_COOKIE, cookie)
    assert c.get("/api/auth/me").status_code == 401

    api.login("alice")
    assert c.get("/api/studies").status_code == 200
    with api.db.session() as s:
        s.execute(
            update(UserSession).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    assert c.get("/api/studies").status_code == 401
    assert c.get("/api/auth/me").status_code == 401


def test_unsafe_methods_with_a_cookie_need_the_csrf_token(api: Api) -> None:
    api.user("root", "admin")
    c = api.client
    csrf = api.login("root")
    new = {"name": "carol", "role": "viewer", "password": PASSWORD}
    assert c.post("/api/users", json=new).status_code == 403
    assert c.post("/api/users", json=new, headers={CSRF_HEADER: "guess"}).status_code == 403
    r = c.post("/api/users", json=new, headers={CSRF_HEADER: csrf})
    assert r.status_code == 201, r.text
    assert c.get("/api/users").status_code == 200  # safe methods need no CSRF token
    # Another user's session does not know this CSRF token.
    api.user("dave", "admin")
    other = TestClient(c.app)
    other_csrf = Api(other, api.state).login("dave")
    assert other_csrf != csrf
    assert (
        other.post(
            "/api/users", json={**new, "name": "erin"}, headers={CSRF_HEADER: csrf}
        ).status_code
        == 403
    )


def test_bearer_tokens_work_until_revoked_and_never_show_again(api: Api) -> None:
    api.user("root", "admin")
    api.user("script", "operator", password=None)  # API-token-only user
    c = api.client
    admin = api.token("root")
    r = c.post("/api/users/script/tokens", headers=admin)
    assert r.status_code == 201, r.text
    issued = r.json()
    token = {"authorization": f"Bearer {issued['token']}"}
    assert issued["token"].startswith(issued["prefix"])
    assert c.get("/api/studies", headers=token).status_code == 200
    assert c.get("/api/auth/me", headers=token).json()["via"] == "token"
    # Only a digest and a prefix are kept; the listing never shows the token.
    listing = c.get("/api/users/script", headers=admin).json()
    assert issued["token"] not in json.dumps(listing)
    assert [t["prefix"] for t in listing["tokens"]] == [issued["prefix"]]
    with api.db.session() as s:
        assert issued["token"] not in json.dumps(
            [[t.token_sha256, t.prefix] for t in s.scalars(select(ApiToken))]
        )
    # A user without a password cannot log in to the console.
    assert (
        c.post("/api/auth/login", json={"name": "script", "password": PASSWORD}).status_code == 401
    )

    r = c.delete(f"/api/users/script/tokens/{issued['id']}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert c.get("/api/studies", headers=token).status_code == 401
    assert c.delete("/api/users/script/tokens/999999", headers=admin).status_code == 404
    actions = [(a.actor, a.action, a.target) for a in api.audit("token.issue")]
    actions += [(a.actor, a.action, a.target) for a in api.audit("token.revoke")]
    assert ("root", "token.issue", "script") in actions
    assert ("root", "token.revoke", "script") in actions

    # A disabled user's tokens stop working; enabling brings them back.
    second = api.token("script")
    assert c.patch("/api/users/script", json={"enabled": False}, headers=admin).status_code == 200
    assert c.get("/api/studies", headers=second).status_code == 401
    assert c.patch("/api/users/script", json={"enabled": True}, headers=admin).status_code == 200
    assert c.get("/api/studies", headers=second).status_code == 200


def test_roles_and_the_service_token(api: Api) -> None:
    for name, role in (("vic", "viewer"), ("olga", "operator"), ("ada", "admin")):
        api.user(name, role)
    c = api.client
    viewer, operator, admin = api.token("vic"), api.token("olga"), api.token("ada")
    service = {"authorization": f"Bearer {SERVICE_TOKEN}"}
    assert c.get("/api/studies", headers=viewer).status_code == 200
    assert c.get("/api/audit", headers=viewer).status_code == 403
    assert c.get("/api/audit", headers=operator).status_code == 200
    assert c.get("/api/users", headers=operator).status_code == 403
    assert c.get("/api/users", headers=admin).status_code == 200
    # The service token reads as a viewer and fetches instances, but changes nothing.
    assert c.get("/api/studies", headers=service).status_code == 200
    assert c.get("/api/instances/1.2.3", headers=service).status_code == 404
    assert c.get("/api/instances/1.2.3", headers=viewer).status_code == 403
    assert c.get("/api/users", headers=service).status_code == 403
    assert c.get("/api/auth/me", headers=service).json() == {
        "name": "service",
        "role": "service",
        "via": "service-token",
        "csrf_token": None,
    }
    # No credential, a wrong one, or a malformed header: 401 with a Bearer challenge.
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic eDp5"}):
        r = c.get("/api/studies", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_user_changes_are_audited_and_the_last_admin_is_kept(api: Api) -> None:
    api.user("root", "admin")
    c = api.client
    admin = api.token("root")
    r = c.post(
        "/api/users", json={"name": "eve", "role": "viewer", "password": PASSWORD}, headers=admin
    )
    assert r.status_code == 201 and "password" not in r.json() and r.json()["has_password"]
    assert (
        c.post("/api/users", json={"name": "eve", "role": "viewer"}, headers=admin).status_code
        == 409
    )
    assert (
        c.post("/api/users", json={"name": "service", "role": "viewer"}, headers=admin).status_code
        == 422
    )
    bad = c.post("/api/users", json={"name": "x", "role": "root"}, headers=admin)
    assert bad.status_code == 422
    assert (
        c.patch("/api/users/eve", json={"role": "operator"}, headers=admin).json()["role"]
        == "operator"
    )
    assert c.patch("/api/users/nobody", json={"role": "viewer"}, headers=admin).status_code == 404

    # A new password ends eve's console sessions.
    eve = TestClient(c.app)
    assert (
        eve.post("/api/auth/login", json={"name": "eve", "password": PASSWORD}).status_code == 200
    )
    assert eve.get("/api/auth/me").status_code == 200
    new_password = "another long passphrase"
    assert (
        c.patch("/api/users/eve", json={"password": new_password}, headers=admin).status_code == 200
    )
    assert eve.get("/api/auth/me").status_code == 401
    assert (
        eve.post("/api/auth/login", json={"name": "eve", "password": new_password}).status_code
        == 200
    )

    # The only enabled admin can be neither demoted nor disabled.
    assert c.patch("/api/users/root", json={"role": "viewer"}, headers=admin).status_code == 409
    assert c.patch("/api/users/root", json={"enabled": False}, headers=admin).status_code == 409
    assert c.get("/api/users/root", headers=admin).json()["role"] == "admin"

    entries = c.get("/api/audit", params={"target": "eve"}, headers=admin).json()
    assert [e["action"] for e in entries] == ["user.password", "user.update", "user.create"]
    assert all(e["actor"] == "root" for e in entries)
    assert entries[1]["before"]["role"] == "viewer" and entries[1]["after"]["role"] == "operator"
    assert new_password not in json.dumps(entries) and PASSWORD not in json.dumps(entries)


def test_audit_api_filters_newest_first(api: Api) -> None:
    api.user("root", "admin")
    admin = api.token("root")
    c = api.client
    with api.db.session() as s:
        for i in range(5):
            s.add(
                AuditEntry(
                    actor=f"a{i % 2}",
                    action=f"rule.{'update' if i else 'create'}",
                    target_type="rule",
                    target=f"r{i}",
                )
            )
    every = c.get("/api/audit", headers=admin).json()
    assert [e["id"] for e in every] == sorted((e["id"] for e in every), reverse=True)
    rules = c.get("/api/audit", params={"action": "rule."}, headers=admin).json()
    assert [e["target"] for e in rules] == ["r4", "r3", "r2", "r1", "r0"]
    assert [
        e["target"]
        for e in c.get("/api/audit", params={"action": "rule.create"}, headers=admin).json()
    ] == ["r0"]
    assert [
        e["target"] for e in c.get("/api/audit", params={"actor": "a1"}, headers=admin).json()
    ] == ["r3", "r1"]
    assert (
        len(c.get("/api/audit", params={"target_type": "rule", "limit": 2}, headers=admin).json())
        == 2
    )
    older = c.get(
        "/api/audit", params={"action": "rule.", "before_id": rules[1]["id"]}, headers=admin
    )
    assert [e["target"] for e in older.json()] == ["r2", "r1", "r0"]
    assert c.get("/api/audit", params={"limit": 0}, headers=admin).status_code == 422


def test_nul_characters_are_refused_not_a_server_error(api: Api) -> None:
    """PostgreSQL cannot hold or compare a string with NUL: such input is refused (4xx), it
    never reaches the database as a 500."""
    api.user("root", "admin")
    admin = api.token("root")
    c = api.client
    for field in ("actor", "action", "target", "target_type"):
        r = c.get("/api/audit", params={field: "a\x00b"}, headers=admin)
        assert r.status_code == 400, (field, r.text)  # refused by the app's NUL guard
    assert c.get("/api/users/a%00b", headers=admin).status_code == 400
    r = c.post("/api/users", json={"name": "a\x00b", "role": "viewer"}, headers=admin)
    assert r.status_code == 422
    r = c.post("/api/auth/login", json={"name": "root\x00", "password": PASSWORD})
    assert r.status_code == 401
    assert [a.actor for a in api.audit(users.LOGIN_FAILURE)] == ["root?"]


def _cli(database_url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`pacs-agent users ...` as an admin runs it: a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    env["PACS_AGENT_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent.cli", "users", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def _cli_here(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    """The same command in this process (faster, for the cases after the first)."""
    from pacs_agent import cli

    monkeypatch.setenv("PACS_AGENT_DATABASE_URL", database_url)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = cli.main(["users", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_users_add_token_list_passwd(
    api: Api,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    res = _cli(
        database_url, "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert res.returncode == 0, res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    api.login("alice")

    res = _cli(database_url, "token", "alice")
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip().splitlines()[-1]
    assert token and " " not in token
    # Usable at once, with alice's role.
    r = api.client.get("/api/users", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200 and [u["name"] for u in r.json()] == ["alice"]

    def here(*args: str, stdin: str = "") -> tuple[int, str, str]:
        return _cli_here(database_url, monkeypatch, capsys, *args, stdin=stdin)

    code, out, _ = here("list")
    assert code == 0 and "alice" in out and "admin" in out and token not in out

    new_password = "a brand new passphrase"
    code, out, err = here("passwd", "alice", "--password-stdin", stdin=new_password + "\n")
    assert code == 0, err
    assert api.client.get("/api/auth/me").status_code == 401  # the password change ended it
    api.login("alice", new_password)

    assert here("add", "alice", "--password-stdin", stdin=PASSWORD)[0] == 1  # exists
    assert here("token", "nobody")[0] == 1
    code, _, err = here("add", "bob", "--password-stdin", stdin="short\n")
    assert code == 1 and "8 characters" in err
    # Without a password: a user for API tokens only.
    code, out, _ = here("add", "robot", "--role", "operator")
    assert code == 0 and "API tokens only" in out
    with api.db.session() as s:
        created = s.scalar(select(AuditEntry).where(AuditEntry.action == "user.create"))
        assert created is not None and created.actor is None and created.target == "alice"
        assert s.scalar(select(User.password_hash).where(User.name == "robot")) is None


def test_first_start_creates_admin_and_service_token(api: Api, tmp_path: Path) -> None:
    settings = api.state.settings.model_copy(update={"api_token": None, "http_port": 8123})
    out = io.StringIO()
    token = users.first_start(settings, out)
    text = out.getvalue()
    password = next(
        line.split(":", 1)[1].strip() for line in text.splitlines() if "password:" in line
    )
    assert len(password) >= 16 and "http://localhost:8123/" in text
    api.login("admin", password)
    assert api.client.get("/api/auth/me").json()["role"] == "admin"
    # The service token: kept in the data folder, readable by its owner only, reused.
    path = tmp_path / users.SERVICE_TOKEN_FILE
    assert path.read_text().strip() == token and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = io.StringIO()
    assert users.first_start(settings, again) == token
    assert again.getvalue() == ""  # users exist: no new admin, nothing printed
    with api.db.session() as s:
        assert s.scalar(select(User.name)) == "admin"
    # A configured PACS_AGENT_API_TOKEN wins.
    assert users.first_start(api.state.settings, io.StringIO()) == SERVICE_TOKEN
