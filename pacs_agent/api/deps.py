"""Dependencies shared by every route: the agent's state, the database session, and who is asking.

Closed by default: a route gets a principal only from a bearer token (a user's API token or the
service token) or from a console session cookie; unsafe methods with a cookie also need the
session's CSRF token in the ``X-CSRF-Token`` header (or the ``csrf_token`` form field, which the
console's forms carry). Without a credential: 401; with a role that may not: 403.

Every ``/api/*`` and ``/dicomweb/*`` route depends on one of ``Viewer``, ``Operator``, ``Admin``
or ``Service``; tests/test_openapi_auth.py reads the role each route needs from the dependency's
``required_role`` attribute and checks every route of the OpenAPI document.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from pacs_agent.db.models import ApiToken, User, UserSession, utcnow
from pacs_agent.security import SERVICE_ROLE, role_allows, same, sha256_hex

if TYPE_CHECKING:
    from pacs_agent.api.app import AgentState

SESSION_COOKIE = "pacs_agent_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# A token's last use is written at most this often (not one database write per request).
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
# The longest credential looked at; anything longer is refused without a database query.
MAX_CREDENTIAL = 512

# What route documentation adds for the dependency's refusals (schemathesis checks that every
# status returned is documented).
AUTH_RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": "no credential, or an unknown, revoked or expired one"},
    403: {"description": "the caller's role may not do this, or the CSRF token is missing"},
}
# FastAPI answers 400 (not 422) to a body it cannot parse at all, e.g. bytes that are not UTF-8.
BODY_RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "the body could not be parsed (not JSON, or not UTF-8)"},
}


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


def principal_from_token(state: AgentState, token: str) -> Principal | None:
    """The principal of a bearer token: the service token, or a user's unrevoked API token."""
    if not token or len(token) > MAX_CREDENTIAL:
        return None
    if same(token, state.settings.api_token):
        return Principal("service", SERVICE_ROLE, "service-token")
    digest = sha256_hex(token)  # looked up by digest: the token itself is never stored
    with state.db.session() as s:
        row = s.execute(
            select(ApiToken.id, ApiToken.last_used_at, User.name, User.role, User.enabled)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
        ).first()
        if row is None or not row.enabled:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            s.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        return Principal(row.name, row.role, "token")


def principal_from_cookie(state: AgentState, cookie: str) -> Principal | None:
    """The principal of a console session cookie that is known, unexpired, of an enabled user."""
    if not cookie or len(cookie) > MAX_CREDENTIAL:
        return None
    with state.db.session() as s:
        row = s.execute(
            select(UserSession.expires_at, UserSession.csrf_token, User.name, User.role)
            .join(User, User.id == UserSession.user_id)
            .where(UserSession.session_sha256 == sha256_hex(cookie), User.enabled.is_(True))
        ).first()
    if row is None or row.expires_at <= utcnow():
        return None
    return Principal(row.name, row.role, "session", csrf_token=row.csrf_token)


async def current_principal(request: Request) -> Principal | None:
    """Who is asking, or None. Checks CSRF for cookie sessions on unsafe methods (403)."""
    state = get_state(request)
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return await run_in_threadpool(principal_from_token, state, auth[7:].strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    principal = await run_in_threadpool(principal_from_cookie, state, cookie)
    if principal is None or request.method in SAFE_METHODS:
        return principal
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not same(sent, principal.csrf_token):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")
    return principal


def require(role: str) -> Callable[..., Principal]:
    """A dependency: the caller must be logged in (401) with a role that allows ``role`` (403).

    Roles: ``viewer`` (read), ``operator`` (retry, re-run, force complete, suspend),
    ``admin`` (everything), ``service`` (the service token, operators and admins: fetch
    instances, STOW-RS).
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
    dependency.required_role = role  # type: ignore[attr-defined]
    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Service = Annotated[Principal, Depends(require(SERVICE_ROLE))]
DbSession = Annotated[Session, Depends(get_session)]
