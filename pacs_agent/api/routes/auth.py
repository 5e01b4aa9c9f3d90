"""``/api/auth``: console login and logout with a session cookie, and who am I.

``POST /api/auth/login`` is open (it is how one gets a credential); it is rate limited per user
name and client address (429 with ``Retry-After``). The session cookie is HttpOnly,
SameSite=Strict, and Secure when ``PACS_AGENT_SECURE_COOKIES`` is set; unsafe requests made with
it must carry the returned ``csrf_token`` in the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from pacs_agent import users
from pacs_agent.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    SESSION_COOKIE,
    Viewer,
    get_state,
)
from pacs_agent.security import MAX_PASSWORD

router = APIRouter(tags=["auth"])


class LoginBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD)


class LoginAnswer(BaseModel):
    name: str
    role: str
    csrf_token: str


class Me(BaseModel):
    name: str
    role: str
    via: str  # session | token | service-token
    csrf_token: str | None = None


@router.post(
    "/api/auth/login",
    responses={
        **BODY_RESPONSES,
        401: {"description": "wrong user name or password, or a disabled account"},
        429: {"description": "too many failed logins for this name or address (Retry-After)"},
    },
)
def login(body: LoginBody, request: Request, response: Response) -> LoginAnswer:
    state = get_state(request)
    address = request.client.host if request.client else ""
    try:
        cookie, csrf, who = users.login(state.db, state.settings, body.name, body.password, address)
    except users.RateLimited as exc:
        raise HTTPException(
            status_code=429, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    except users.LoginRefused as exc:
        raise HTTPException(status_code=401, detail=str(exc)) from None
    set_session_cookie(
        response, cookie, state.settings.session_ttl_s, state.settings.secure_cookies
    )
    return LoginAnswer(name=who.name, role=who.role, csrf_token=csrf)


def set_session_cookie(response: Response, cookie: str, ttl_s: int, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=ttl_s,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )


@router.post("/api/auth/logout", responses={**AUTH_RESPONSES})
def logout(request: Request, response: Response, who: Viewer) -> dict[str, Any]:
    """End this console session (a bearer token stays valid: revoke it to end it)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    ended = False
    if who.via == "session" and cookie:
        ended = users.logout(get_state(request).db, cookie)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"logged_out": ended}


@router.get("/api/auth/me", responses={**AUTH_RESPONSES})
def me(who: Viewer) -> Me:
    return Me(name=who.name, role=who.role, via=who.via, csrf_token=who.csrf_token)
