"""Dependencies shared by every route: the agent's state, the database session, and who is asking.

Closed by default: a route gets a principal only from a bearer token (a user's API token or the
service token) or from a console session cookie; unsafe methods with a cookie also need the
session's CSRF token in the ``X-CSRF-Token`` header (or the ``csrf_token`` form field, which the
console's forms carry). Without a credential: 401; with a role that may not: 403.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import ApiToken, User, UserSession, utcnow
from pacs_agent.security import SERVICE_ROLE, role_allows, same, sha256_hex

if TYPE_CHECKING:
    from pacs_agent.api.app import AgentState

SESSION_COOKIE = "pacs_agent_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # admin | operator | viewer | service
    via: str  # token | session | service-token
    csrf_token: str | None = None  # set for console sessions

    def may(self, needed: str) -> bool:
        return role_allows(self.role, needed)


def get_state(request: Request) -> AgentState:
    return request.app.state.agent  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    with get_state(request).db.session() as s:
        yield s


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _from_bearer(request: Request, token: str) -> Principal | None:
    state = get_state(request)
    if same(token, state.settings.api_token):
        return Principal("service", SERVICE_ROLE, "service-token")
    digest = sha256_hex(token)
    with state.db.session() as s:
        row = s.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
        ).first()
        if row is None:
            return None
        tok, user = row
        if not user.enabled:
            return None
        tok.last_used_at = utcnow()
        return Principal(user.name, user.role, "token")


def _from_cookie(request: Request, cookie: str) -> Principal | None:
    state = get_state(request)
    digest = sha256_hex(cookie)
    with state.db.session() as s:
        row = s.execute(
            select(UserSession, User)
            .join(User, User.id == UserSession.user_id)
            .where(UserSession.session_sha256 == digest)
        ).first()
        if row is None:
            return None
        sess, user = row
        if not user.enabled or _aware(sess.expires_at) <= utcnow():
            return None
        return Principal(user.name, user.role, "session", csrf_token=sess.csrf_token)


async def current_principal(request: Request) -> Principal | None:
    """Who is asking, or None. Checks CSRF for cookie sessions on unsafe methods."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return _from_bearer(request, auth[7:].strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    principal = _from_cookie(request, cookie)
    if principal is None or request.method in SAFE_METHODS:
        return principal
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf_token")
        sent = value if isinstance(value, str) else None
    if not same(sent, principal.csrf_token):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return principal


def require(role: str) -> Callable[..., Principal]:
    """A dependency: the caller must be logged in (401) with a role that allows ``role`` (403).

    Roles: ``viewer`` (read), ``operator`` (retry, re-run, force complete, suspend),
    ``admin`` (everything), ``service`` (the workers' token: fetch instances, STOW-RS).
    """

    def dependency(
        principal: Annotated[Principal | None, Depends(current_principal)],
    ) -> Principal:
        if principal is None:
            raise HTTPException(
                status_code=401,
                detail="login or a bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.may(role):
            raise HTTPException(status_code=403, detail=f"the {role} role is required")
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Service = Annotated[Principal, Depends(require(SERVICE_ROLE))]
DbSession = Annotated[Session, Depends(get_session)]
