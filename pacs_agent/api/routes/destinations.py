"""``/api/destinations``: named result destinations and notification channels, with a test action.

Credentials inside a URL are never shown back: every answer carries the masked URL
(``pacs_agent.destinations.mask``), a PUT that sends the masked form keeps the stored secret, and
validation errors do not echo the request body. ``PACS_AGENT_DESTINATIONS`` (and the output
folder) and ``PACS_AGENT_NOTIFY`` appear as read-only entries named ``settings:...``: they are the
defaults used when no rule names any.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent import destinations as dest
from pacs_agent.api.deps import (
    AUTH_RESPONSES,
    BODY_RESPONSES,
    Admin,
    DbSession,
    Operator,
    Viewer,
    get_state,
)
from pacs_agent.audit import record_audit
from pacs_agent.db.models import Destination, Rule, utcnow

log = logging.getLogger(__name__)


class NoEchoRoute(APIRoute):
    """A route whose 422 answers never echo the request body back (a URL in it may hold a
    credential): pydantic's ``input`` and ``ctx`` are dropped from each error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = [
                    {k: v for k, v in e.items() if k not in ("input", "ctx", "url")}
                    for e in exc.errors()
                ]
                raise RequestValidationError(errors) from None

        return route


router = APIRouter(tags=["destinations"], route_class=NoEchoRoute)

# A stored name, or a read-only settings entry (settings:destinations:1).
NameInPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]

AUTH = AUTH_RESPONSES
BAD_BODY = BODY_RESPONSES
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown destination"}}


def unprocessable(field: str, reason: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors: the field and the reason."""
    return HTTPException(
        status_code=422, detail=[{"loc": ["body", field], "msg": reason, "type": "value_error"}]
    )


class DestinationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="letters, digits, . _ -")
    url: str = Field(min_length=1, max_length=2048)
    enabled: bool = True
    purpose: Literal["destination", "notify"] = "destination"


class DestinationUpdate(BaseModel):
    """Every field optional: what is sent changes. ``url`` may carry ``***`` where the stored
    credential is to be kept (same scheme, host and port only)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="must equal the path's name if sent")
    url: str | None = Field(default=None, min_length=1, max_length=2048)
    enabled: bool | None = None
    purpose: Literal["destination", "notify"] | None = None


class DestinationOut(BaseModel):
    name: str
    url: str = Field(description="credentials replaced by ***")
    kind: str = Field(description="the URL scheme, e.g. dicom, dicomweb+http, file")
    enabled: bool
    purpose: Literal["destination", "notify"]
    source: Literal["database", "settings"]
    read_only: bool
    updated_at: dt.datetime | None = None
    used_by_rules: list[str] = Field(default_factory=list)


class TestResult(BaseModel):
    ok: bool
    detail: str
    elapsed_ms: int


TestResult.__test__ = False  # type: ignore[attr-defined]  # not a pytest class


def _kind(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _rules_naming(s: Session) -> dict[str, list[str]]:
    """Destination or channel name -> the rules that name it (as a destination or to notify)."""
    out: dict[str, list[str]] = {}
    for rule in s.scalars(select(Rule).order_by(Rule.position, Rule.id)):
        for name in {*(rule.destinations or []), *(rule.notify or [])}:
            out.setdefault(str(name), []).append(rule.name)
    return out


def _out(d: Destination, used: dict[str, list[str]]) -> DestinationOut:
    return DestinationOut(
        name=d.name,
        url=dest.mask(d.url),
        kind=_kind(d.url),
        enabled=d.enabled,
        purpose=d.purpose,  # type: ignore[arg-type]
        source="database",
        read_only=False,
        updated_at=d.updated_at,
        used_by_rules=used.get(d.name, []),
    )


def _settings_out(e: dest.SettingsEntry) -> DestinationOut:
    return DestinationOut(
        name=e.name,
        url=dest.mask(e.url),
        kind=_kind(e.url),
        enabled=True,
        purpose=e.purpose,
        source="settings",
        read_only=True,
    )


def _snapshot(d: Destination) -> dict[str, Any]:
    """What the audit keeps: never the credential."""
    return {"name": d.name, "url": dest.mask(d.url), "enabled": d.enabled, "purpose": d.purpose}


def _find(s: Session, name: str) -> Destination | None:
    return s.scalar(select(Destination).where(Destination.name == name))


def _check(url: str, purpose: str) -> None:
    try:
        dest.check_url(url, purpose)
    except dest.DestinationError as exc:
        raise unprocessable(exc.field, exc.reason) from None


@router.get("/api/destinations", response_model=list[DestinationOut], responses=AUTH)
def list_destinations(request: Request, s: DbSession, _who: Viewer) -> list[DestinationOut]:
    used = _rules_naming(s)
    rows = [_out(d, used) for d in s.scalars(select(Destination).order_by(Destination.name))]
    return rows + [_settings_out(e) for e in dest.settings_entries(get_state(request).settings)]


@router.post(
    "/api/destinations",
    status_code=201,
    response_model=DestinationOut,
    responses={**BAD_BODY, **AUTH, 409: {"description": "the name exists"}},
)
def create_destination(body: DestinationIn, s: DbSession, who: Admin) -> DestinationOut:
    try:
        dest.check_name(body.name)
    except dest.DestinationError as exc:
        raise unprocessable(exc.field, exc.reason) from None
    if dest.MASK in body.url:
        raise unprocessable("url", "'***' is the masked form of a credential: enter the real one")
    _check(body.url, body.purpose)
    if _find(s, body.name) is not None:
        raise HTTPException(status_code=409, detail=f"destination {body.name!r} exists")
    row = Destination(
        name=body.name,
        url=body.url,
        enabled=body.enabled,
        purpose=body.purpose,
        updated_at=utcnow(),
    )
    s.add(row)
    s.flush()
    record_audit(
        s,
        who.name,
        "destination.create",
        target_type="destination",
        target=row.name,
        after=_snapshot(row),
    )
    return _out(row, _rules_naming(s))


@router.get(
    "/api/destinations/{name}",
    response_model=DestinationOut,
    responses={**AUTH, **NOT_FOUND},
)
def get_destination(
    name: NameInPath, request: Request, s: DbSession, _who: Viewer
) -> DestinationOut:
    row = _find(s, name)
    if row is not None:
        return _out(row, _rules_naming(s))
    for e in dest.settings_entries(get_state(request).settings):
        if e.name == name:
            return _settings_out(e)
    raise HTTPException(status_code=404, detail="unknown destination")


def _refuse_settings_entry(request: Request, name: str) -> None:
    if any(e.name == name for e in dest.settings_entries(get_state(request).settings)):
        raise HTTPException(
            status_code=409,
            detail="defined by the agent's settings (PACS_AGENT_DESTINATIONS, _OUTPUT_DIR or "
            "_NOTIFY): change it there",
        )


@router.put(
    "/api/destinations/{name}",
    response_model=DestinationOut,
    responses={
        **BAD_BODY,
        **AUTH,
        **NOT_FOUND,
        409: {"description": "a read-only entry from the settings"},
    },
)
def update_destination(
    name: NameInPath, body: DestinationUpdate, request: Request, s: DbSession, who: Admin
) -> DestinationOut:
    _refuse_settings_entry(request, name)
    row = _find(s, name)
    if row is None:
        raise HTTPException(status_code=404, detail="unknown destination")
    if body.name is not None and body.name != name:
        raise unprocessable("name", "renaming is not supported: create a new destination")
    before = _snapshot(row)
    purpose = body.purpose or row.purpose
    url = row.url
    if body.url is not None:
        try:
            url = dest.unmask(body.url, row.url)
        except dest.DestinationError as exc:
            raise unprocessable(exc.field, exc.reason) from None
    _check(url, purpose)
    credentials_changed = dest.secrets_in(url) != dest.secrets_in(row.url)
    row.url = url
    row.purpose = purpose
    if body.enabled is not None:
        row.enabled = body.enabled
    row.updated_at = utcnow()
    after = _snapshot(row)
    if after != before or credentials_changed:
        record_audit(
            s,
            who.name,
            "destination.update",
            target_type="destination",
            target=name,
            before=before,
            after=after,
            detail="credentials changed" if credentials_changed else None,
        )
    return _out(row, _rules_naming(s))


@router.delete(
    "/api/destinations/{name}",
    status_code=204,
    response_class=Response,
    responses={
        **AUTH,
        **NOT_FOUND,
        409: {"description": "a rule names it, or a read-only entry from the settings"},
    },
)
def delete_destination(name: NameInPath, request: Request, s: DbSession, who: Admin) -> Response:
    _refuse_settings_entry(request, name)
    row = _find(s, name)
    if row is None:
        raise HTTPException(status_code=404, detail="unknown destination")
    rules = _rules_naming(s).get(name)
    if rules:
        raise HTTPException(
            status_code=409, detail=f"named by rules {', '.join(rules)}: change them first"
        )
    record_audit(
        s,
        who.name,
        "destination.delete",
        target_type="destination",
        target=name,
        before=_snapshot(row),
    )
    s.delete(row)
    return Response(status_code=204)


@router.post(
    "/api/destinations/{name}/test",
    response_model=TestResult,
    responses={**AUTH, **NOT_FOUND},
)
def test_destination(name: NameInPath, request: Request, who: Operator) -> TestResult:
    """Whether the destination answers now (C-ECHO, QIDO-RS, ``GET /system``, a write check, a
    TCP or TLS connect), with short timeouts. Sends no data and changes nothing stored."""
    state = get_state(request)
    with state.db.session() as s:  # closed before the network call
        row = _find(s, name)
        url = row.url if row is not None else None
    if url is None:
        url = next((e.url for e in dest.settings_entries(state.settings) if e.name == name), None)
    if url is None:
        raise HTTPException(status_code=404, detail="unknown destination")
    outcome = dest.test_url(url, state.settings)
    log.info(
        "destination %s tested by %s: %s in %d ms",
        name,
        who.name,
        "ok" if outcome.ok else "failed",
        outcome.elapsed_ms,
    )
    return TestResult(ok=outcome.ok, detail=outcome.detail, elapsed_ms=outcome.elapsed_ms)
