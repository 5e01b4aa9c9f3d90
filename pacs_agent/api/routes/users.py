"""``/api/users``: users, roles and API tokens (admins only; every change audited).

A token is returned once, by ``POST /api/users/{name}/tokens``; afterwards only its prefix is
shown. Passwords are never returned. A change that would leave no enabled admin is refused (409).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from pacs_agent import users
from pacs_agent.api.deps import AUTH_RESPONSES, BODY_RESPONSES, Admin, DbSession
from pacs_agent.security import MAX_PASSWORD, MIN_PASSWORD

router = APIRouter(tags=["users"], responses={**AUTH_RESPONSES})

NAME_PATTERN = users.NAME_RE.pattern
UserName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64)]
Role = Literal["viewer", "operator", "admin"]
Password = Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


class TokenOut(BaseModel):
    id: int
    prefix: str
    created_at: str | None
    last_used_at: str | None
    revoked_at: str | None


class UserOut(BaseModel):
    name: str
    role: str
    enabled: bool
    has_password: bool
    created_at: str | None
    last_login_at: str | None
    tokens: list[TokenOut]


class UserCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    role: Role
    # None: a user for API tokens only (scripts), who cannot log in to the console.
    password: Password | None = None


class UserChange(BaseModel):
    role: Role | None = None
    enabled: bool | None = None
    password: Password | None = None


class NewToken(BaseModel):
    id: int
    user: str
    prefix: str
    token: str  # shown this once


def _http(exc: Exception) -> HTTPException:
    if isinstance(exc, users.UnknownUser):
        return HTTPException(status_code=404, detail=str(exc))
    if isinstance(exc, users.Conflict):
        return HTTPException(status_code=409, detail=str(exc))
    return HTTPException(status_code=422, detail=str(exc))


_ERRORS = (users.UnknownUser, users.Conflict, users.UserError)


@router.get("/api/users")
def list_users(s: DbSession, _who: Admin) -> list[UserOut]:
    return [UserOut(**users.user_view(s, u)) for u in users.list_users(s)]


@router.post(
    "/api/users",
    status_code=201,
    responses={
        **BODY_RESPONSES,
        409: {"description": "a user with this name exists"},
        422: {"description": "invalid name, role or password"},
    },
)
def create_user(body: UserCreate, s: DbSession, who: Admin) -> UserOut:
    try:
        user = users.create_user(s, body.name, body.role, body.password, actor=who.name)
    except _ERRORS as exc:
        raise _http(exc) from None
    return UserOut(**users.user_view(s, user))


@router.get("/api/users/{name}", responses={404: {"description": "unknown user"}})
def get_user(name: UserName, s: DbSession, _who: Admin) -> UserOut:
    try:
        return UserOut(**users.user_view(s, users.get_user(s, name)))
    except _ERRORS as exc:
        raise _http(exc) from None


@router.patch(
    "/api/users/{name}",
    responses={
        **BODY_RESPONSES,
        404: {"description": "unknown user"},
        409: {"description": "it would leave no enabled admin"},
        422: {"description": "invalid role or password"},
    },
)
def change_user(name: UserName, body: UserChange, s: DbSession, who: Admin) -> UserOut:
    """Change role, enabled and/or password. A new password or disabling ends the user's console
    sessions; the user's API tokens stay valid while the user is enabled."""
    try:
        user = users.update_user(
            s, name, actor=who.name, role=body.role, enabled=body.enabled, password=body.password
        )
    except _ERRORS as exc:
        raise _http(exc) from None
    return UserOut(**users.user_view(s, user))


@router.post(
    "/api/users/{name}/tokens", status_code=201, responses={404: {"description": "unknown user"}}
)
def issue_token(name: UserName, s: DbSession, who: Admin) -> NewToken:
    try:
        issued = users.issue_token(s, name, actor=who.name)
    except _ERRORS as exc:
        raise _http(exc) from None
    return NewToken(id=issued.id, user=issued.user, prefix=issued.prefix, token=issued.token)


@router.delete(
    "/api/users/{name}/tokens/{token_id}",
    responses={404: {"description": "unknown user or token"}},
)
def revoke_token(
    name: UserName,
    token_id: Annotated[int, Path(ge=1, le=2**62)],
    s: DbSession,
    who: Admin,
) -> dict[str, Any]:
    try:
        row = users.revoke_token(s, name, token_id, actor=who.name)
    except _ERRORS as exc:
        raise _http(exc) from None
    return {"id": row.id, "prefix": row.prefix, "revoked": True}
