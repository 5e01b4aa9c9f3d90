"""Users, API tokens and console logins: create and change users, issue and revoke tokens, log in
(rate limited) and out, and the first admin of a fresh installation.

Every change is audited in the same transaction as the change (``pacs_agent.audit``); a login
records its outcome with the name tried as the actor, never the password. Only digests of
tokens and session ids are stored; a token is shown once, when it is issued.

The login rate limit counts failed logins in the audit log, so it holds across restarts and
across several agent processes behind one database: at most ``settings.login_attempts`` failures
per user name, and ``ADDRESS_FACTOR`` times as many per client address (several people share an
address behind NAT or a reverse proxy), within ``settings.login_window_s`` (sliding window); the
next attempt is refused with :class:`RateLimited` (HTTP 429 with ``Retry-After``) without
checking the password.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from pacs_agent.api.deps import Principal
from pacs_agent.audit import record_audit
from pacs_agent.db.models import ApiToken, AuditEntry, User, UserSession, utcnow
from pacs_agent.db.session import Database
from pacs_agent.security import (
    ROLES,
    hash_password,
    needs_rehash,
    new_secret,
    sha256_hex,
    verify_password,
)
from pacs_agent.settings import Settings

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# Names the audit log uses for principals that are not users.
RESERVED_NAMES = {"service", "system"}
TOKEN_PREFIX = "pa_"  # recognisable by secret scanners; the rest is 256 random bits
SERVICE_TOKEN_FILE = "service-token"
FIRST_ADMIN = "admin"

LOGIN_SUCCESS = "login.success"
LOGIN_FAILURE = "login.failure"
LOGIN_LIMITED = "login.limited"
# Audit columns are bounded; a name tried at login is cut to fit (it is only recorded).
_ACTOR_MAX = 64
_TARGET_MAX = 128
# Failed logins allowed per client address: this many times settings.login_attempts.
ADDRESS_FACTOR = 4
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UserError(ValueError):
    """An invalid name, role or password (HTTP 422)."""


class UnknownUser(LookupError):
    """No user (or token) with that name or id (HTTP 404)."""


class Conflict(Exception):
    """The change conflicts with what exists: a taken name, or the last admin (HTTP 409)."""


class LoginRefused(Exception):
    """Wrong name or password, no password set, or a disabled account (HTTP 401). The message
    is the same for all, so that it does not tell which."""


class RateLimited(Exception):
    """Too many failed logins for this name or address (HTTP 429)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed logins; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class IssuedToken:
    id: int
    user: str
    prefix: str
    token: str  # shown once; only its SHA-256 is stored


# users ------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(
            "a user name is 1 to 64 letters, digits and . _ @ -, starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise UserError(f"the name {name!r} is reserved")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    return role


def _hash(password: str) -> str:
    try:
        return hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def get_user(s: Session, name: str) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        raise UnknownUser(f"no user named {name!r}")
    return user


def snapshot(user: User) -> dict[str, Any]:
    """What the audit keeps of a user (never the hash)."""
    return {
        "name": user.name,
        "role": user.role,
        "enabled": bool(user.enabled),
        "password": user.password_hash is not None,
    }


def _tokens(s: Session, user: User) -> list[ApiToken]:
    return list(
        s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
    )


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def token_view(tok: ApiToken) -> dict[str, Any]:
    return {
        "id": tok.id,
        "prefix": tok.prefix,
        "created_at": _iso(tok.created_at),
        "last_used_at": _iso(tok.last_used_at),
        "revoked_at": _iso(tok.revoked_at),
    }


def user_view(s: Session, user: User) -> dict[str, Any]:
    """A user as the API shows it: no hash, token prefixes only."""
    return {
        "name": user.name,
        "role": user.role,
        "enabled": bool(user.enabled),
        "has_password": user.password_hash is not None,
        "created_at": _iso(user.created_at),
        "last_login_at": _iso(user.last_login_at),
        "tokens": [token_view(t) for t in _tokens(s, user)],
    }


def list_users(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.name)))


def create_user(
    s: Session, name: str, role: str, password: str | None = None, *, actor: str | None
) -> User:
    """A new user (``password`` None: a user for API tokens only, who cannot log in)."""
    check_name(name)
    check_role(role)
    if s.scalar(select(User.id).where(func.lower(User.name) == name.lower())) is not None:
        raise Conflict(f"a user named {name!r} exists")
    user = User(
        name=name, role=role, password_hash=_hash(password) if password else None, enabled=True
    )
    s.add(user)
    s.flush()
    record_audit(s, actor, "user.create", target_type="user", target=name, after=snapshot(user))
    return user


def _enabled_admins(s: Session) -> int:
    return int(
        s.scalar(select(func.count(User.id)).where(User.role == "admin", User.enabled.is_(True)))
        or 0
    )


def _end_sessions(s: Session, user: User) -> None:
    s.execute(delete(UserSession).where(UserSession.user_id == user.id))


def update_user(
    s: Session,
    name: str,
    *,
    actor: str | None,
    role: str | None = None,
    enabled: bool | None = None,
    password: str | None = None,
) -> User:
    """Change a user's role, enabled flag and/or password, in one audited change.

    Refused (Conflict) when it would leave no enabled admin. A new password or disabling ends
    the user's console sessions; a role change applies at the user's next request.
    """
    user = get_user(s, name)
    before = snapshot(user)
    if role is not None:
        user.role = check_role(role)
    if enabled is not None:
        user.enabled = enabled
    if password is not None:
        user.password_hash = _hash(password)
    was_admin = before["role"] == "admin" and before["enabled"]
    if was_admin and not (user.role == "admin" and user.enabled):
        s.flush()
        if _enabled_admins(s) == 0:
            raise Conflict("this is the last enabled admin: make another admin first")
    if password is not None or enabled is False:
        _end_sessions(s, user)
    after = snapshot(user)
    action = "user.password" if password is not None and after == before else "user.update"
    record_audit(
        s,
        actor,
        action,
        target_type="user",
        target=name,
        before=before,
        after=after,
        detail="password changed" if password is not None else None,
    )
    return user


def set_password(s: Session, name: str, password: str, *, actor: str | None) -> User:
    return update_user(s, name, actor=actor, password=password)


def set_role(s: Session, name: str, role: str, *, actor: str | None) -> User:
    return update_user(s, name, actor=actor, role=role)


def set_enabled(s: Session, name: str, enabled: bool, *, actor: str | None) -> User:
    return update_user(s, name, actor=actor, enabled=enabled)


# tokens -----------------------------------------------------------------------------------------


def issue_token(s: Session, name: str, *, actor: str | None) -> IssuedToken:
    """A new API token for user ``name``: returned once, stored as SHA-256 and a prefix."""
    user = get_user(s, name)
    token = TOKEN_PREFIX + new_secret(32)
    row = ApiToken(user_id=user.id, token_sha256=sha256_hex(token), prefix=token[:10])
    s.add(row)
    s.flush()
    record_audit(
        s, actor, "token.issue", target_type="user", target=name, detail=f"token {row.prefix}…"
    )
    return IssuedToken(id=row.id, user=name, prefix=row.prefix, token=token)


def revoke_token(s: Session, name: str, token_id: int, *, actor: str | None) -> ApiToken:
    """Revoke one of user ``name``'s tokens (idempotent: a revoked token stays revoked)."""
    user = get_user(s, name)
    row = s.scalar(select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id))
    if row is None:
        raise UnknownUser(f"user {name!r} has no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_audit(
            s, actor, "token.revoke", target_type="user", target=name, detail=f"token {row.prefix}…"
        )
    return row


# login ------------------------------------------------------------------------------------------


def _retry_after(s: Session, where: Any, attempts: int, window_s: int, now: dt.datetime) -> int:
    """0 when fewer than ``attempts`` failures match ``where`` in the window; else the seconds
    until enough of them have left the window for one more attempt."""
    since = now - dt.timedelta(seconds=window_s)
    times = list(
        s.scalars(
            select(AuditEntry.at)
            .where(AuditEntry.action == LOGIN_FAILURE, AuditEntry.at > since, where)
            .order_by(AuditEntry.at.desc())
            .limit(attempts)
        )
    )
    if len(times) < attempts:
        return 0
    # The oldest of the newest ``attempts`` failures must leave the window.
    return max(1, int((times[-1] - since).total_seconds()) + 1)


def login(
    db: Database, settings: Settings, name: str, password: str, address: str
) -> tuple[str, str, Principal]:
    """Check a console login; on success open a session.

    Returns (the session cookie's value, the session's CSRF token, the principal). Raises
    RateLimited before looking at the password when this name or address has too many recent
    failures, and LoginRefused for a wrong name or password or a disabled account.
    """
    # Recorded as tried, cut to fit and without control characters (no NUL reaches the
    # database; a name that is not a valid user name is not even looked up).
    actor = _CONTROL.sub("?", name)[:_ACTOR_MAX]
    client = _CONTROL.sub("?", address)[:_TARGET_MAX] or None
    now = utcnow()
    with db.session() as s:
        wait = max(
            _retry_after(
                s, AuditEntry.actor == actor, settings.login_attempts, settings.login_window_s, now
            ),
            _retry_after(
                s,
                (AuditEntry.target_type == "client") & (AuditEntry.target == client),
                settings.login_attempts * ADDRESS_FACTOR,
                settings.login_window_s,
                now,
            )
            if client
            else 0,
        )
        if wait:
            record_audit(
                s,
                actor,
                LOGIN_LIMITED,
                target_type="client",
                target=client,
                detail="refused: too many failed logins",
            )
    if wait:
        raise RateLimited(wait)

    principal: Principal | None = None
    cookie = csrf = ""
    with db.session() as s:
        user = s.scalar(select(User).where(User.name == name)) if NAME_RE.match(name) else None
        ok = verify_password(user.password_hash if user is not None else None, password)
        if user is None:
            reason = "unknown user"
        elif not ok:
            reason = "wrong password" if user.password_hash else "no password set"
        elif not user.enabled:
            reason = "account disabled"
        else:
            reason = ""
        if user is None or reason:
            record_audit(
                s, actor, LOGIN_FAILURE, target_type="client", target=client, detail=reason
            )
        else:
            if needs_rehash(user.password_hash or ""):
                user.password_hash = hash_password(password)
            user.last_login_at = now
            s.execute(delete(UserSession).where(UserSession.expires_at < now))
            cookie, csrf = new_secret(32), new_secret(32)
            s.add(
                UserSession(
                    user_id=user.id,
                    session_sha256=sha256_hex(cookie),
                    csrf_token=csrf,
                    expires_at=now + dt.timedelta(seconds=settings.session_ttl_s),
                )
            )
            record_audit(s, user.name, LOGIN_SUCCESS, target_type="client", target=client)
            principal = Principal(user.name, user.role, "session", csrf_token=csrf)
    if principal is None:
        raise LoginRefused("wrong user name or password, or the account is disabled")
    return cookie, csrf, principal


def logout(db: Database, cookie: str) -> bool:
    """End the console session of ``cookie``; audited. False when there was none."""
    with db.session() as s:
        row = s.execute(
            select(UserSession.id, User.name)
            .join(User, User.id == UserSession.user_id)
            .where(UserSession.session_sha256 == sha256_hex(cookie))
        ).first()
        if row is None:
            return False
        s.execute(delete(UserSession).where(UserSession.id == row.id))
        record_audit(s, row.name, "logout", target_type="user", target=row.name)
    return True


# first start ------------------------------------------------------------------------------------


def ensure_first_admin(db: Database) -> str | None:
    """On a database without users, create ``admin`` with a random password and return the
    password (to be shown once); None when users exist."""
    with db.session() as s:
        if s.scalar(select(func.count(User.id))):
            return None
        password = new_secret(18)
        create_user(s, FIRST_ADMIN, "admin", password, actor=None)
    log.info("created the first admin user %r", FIRST_ADMIN)
    return password


def ensure_service_token(data_dir: Path) -> str:
    """The service token kept in ``data_dir`` (mode 0600), made on first use."""
    path = data_dir / SERVICE_TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    token = new_secret(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


def first_start(settings: Settings, out: TextIO) -> str:
    """What `pacs-agent run` does before it starts: on a database without users, create
    ``admin`` with a random password and write it once to ``out``; and return the service token
    for the agent and its worker (PACS_AGENT_API_TOKEN, or one kept in the data folder)."""
    db = Database(settings.resolved_database_url)
    try:
        password = ensure_first_admin(db)
    finally:
        db.dispose()
    if password is not None:
        url = (settings.public_url or f"http://localhost:{settings.http_port}").rstrip("/")
        rule = "=" * 72
        out.write(
            f"\n{rule}\n"
            f"First start: created the console user {FIRST_ADMIN!r} (role admin).\n"
            f"  user:     {FIRST_ADMIN}\n"
            f"  password: {password}\n"
            f"Log in at {url}/ . This password is shown only now; change it with\n"
            f"`pacs-agent users passwd {FIRST_ADMIN} --password-stdin` or on the Users page.\n"
            f"{rule}\n\n"
        )
        out.flush()
    return settings.api_token or ensure_service_token(settings.resolved_data_dir)


# `pacs-agent users ...` -------------------------------------------------------------------------


def _read_password(from_stdin: bool, *, required: bool) -> str | None:
    """The password: the first line of stdin (--password-stdin), a prompt on a terminal, or
    None (no password) when neither and not required."""
    import getpass
    import sys

    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise UserError("the two passwords differ")
        return first
    if required:
        raise UserError("give the password on stdin with --password-stdin")
    return None


def run_command(
    settings: Settings,
    command: str,
    name: str | None = None,
    *,
    role: str = "viewer",
    password_stdin: bool = False,
) -> int:
    """`pacs-agent users add|token|list|passwd` (changes are audited with the actor "system")."""
    import sys

    from sqlalchemy import text

    from pacs_agent.db import migrate

    db = Database(settings.resolved_database_url)
    try:
        try:
            with db.session() as s:
                current = s.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception:
            current = None
        if current != migrate.current_head():
            print(
                "pacs-agent: the database is not migrated: run `pacs-agent db upgrade`",
                file=sys.stderr,
            )
            return 2
        if command == "add":
            assert name is not None
            password = _read_password(password_stdin, required=False)
            with db.session() as s:
                user = create_user(s, name, role, password, actor=None)
                print(
                    f"created user {user.name} ({user.role})"
                    + ("" if password else "; no password: it can use API tokens only")
                )
        elif command == "passwd":
            assert name is not None
            password = _read_password(password_stdin, required=True)
            with db.session() as s:
                set_password(s, name, password or "", actor=None)
            print(f"password of {name} changed; its console sessions are ended")
        elif command == "token":
            assert name is not None
            with db.session() as s:
                issued = issue_token(s, name, actor=None)
            print(
                f"API token for {name} (id {issued.id}), shown only now; send it as "
                "'Authorization: Bearer <token>':"
            )
            print(issued.token)
        elif command == "list":
            with db.session() as s:
                print(f"{'NAME':<24} {'ROLE':<9} {'ENABLED':<8} {'TOKENS':<7} LAST LOGIN")
                for u in list_users(s):
                    active = sum(1 for t in _tokens(s, u) if t.revoked_at is None)
                    last = _iso(u.last_login_at) or "never"
                    print(
                        f"{u.name:<24} {u.role:<9} {'yes' if u.enabled else 'no':<8} "
                        f"{active:<7} {last}"
                    )
        else:
            raise ValueError(command)
    except (UserError, Conflict, UnknownUser) as exc:
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0
