"""``/api/rules``: routing rules (CEL), their order, the fallback rule, history and the tester.

Reads need the viewer role, changes the admin role. Every change bumps the rule's ``version`` and
writes an audit entry with the before and after; PUT, DELETE, enable and disable must name the
version the client saw (body field ``version``, query ``?version=`` or an ``If-Match`` header):
a missing one is refused with 428, a stale one with 409. Validation problems answer 422 with
``{"detail": [{"field": "when[1]", "reason": "..."}]}``; a body that is not JSON answers 400, a
content type the route does not take 415.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from pacs_agent.api.deps import AUTH_RESPONSES, Admin, Viewer, get_state
from pacs_agent.db.models import Rule, Study
from pacs_agent.destinations import mask
from pacs_agent.dicom_facts import RejectedDataset, examine
from pacs_agent.receiving.ingest import parse_part10
from pacs_agent.scheduling import rules as engine
from pacs_agent.scheduling.routing import (
    Decision,
    Router,
    StudyFacts,
    decide_from,
    fallback_rule,
    study_facts,
)
from pacs_agent.scheduling.rules import (
    CompiledRule,
    FallbackSpec,
    InstanceInput,
    RuleConflict,
    RuleInvalid,
    RuleNotFound,
    RuleSpec,
    StudyContext,
)

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "header", "path"):
        kind = parts.pop(0)
        if kind != "body" and parts:
            return str(parts[0])
    return engine.field_path(parts)


class RulesRoute(APIRoute):
    """Answers FastAPI's own validation errors in the rules API's shape: 400 for a body that is
    not JSON, 415 for a content type the route does not take, else 422 with field and reason."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RecursionError:  # JSON nested deeper than the parser goes
                return JSONResponse({"detail": "the body is nested too deeply"}, status_code=400)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                if any(e.get("type") == "json_invalid" for e in errors):
                    return JSONResponse({"detail": "the body is not valid JSON"}, status_code=400)
                ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
                body_error = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
                if body_error and ctype and not ctype.endswith("json"):
                    return JSONResponse(
                        {"detail": "send the body as application/json"}, status_code=415
                    )
                problems = []
                for e in errors:
                    kind = e.get("type")
                    reason = {"missing": "required", "extra_forbidden": "unknown field"}.get(
                        str(kind), str(e.get("msg", "invalid"))
                    )
                    problems.append({"field": _field_of(tuple(e.get("loc", ()))), "reason": reason})
                return JSONResponse({"detail": problems}, status_code=422)

        return route


router = APIRouter(tags=["rules"], route_class=RulesRoute)

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown rule"}}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"description": "the rule is not valid: a list of {field, reason}"},
}
BODY: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not valid JSON"},
    415: {"description": "the content type is not application/json"},
}
VERSIONED: dict[int | str, dict[str, Any]] = {
    400: {"description": "If-Match is not a version"},
    409: {"description": "the rule changed meanwhile (the version sent is not the current one)"},
    428: {"description": "the rule's current version is required (version or If-Match)"},
}


# Models ---------------------------------------------------------------------------------------


class RuleIn(RuleSpec):
    """One rule, the same shape as an entry of the YAML file; ``version`` for an update."""

    version: int | None = None


class FallbackIn(FallbackSpec):
    version: int | None = None


class VersionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = None


class ReorderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: list[str]


class TestIn(BaseModel):
    """A received study to test, and optionally draft rules (a list in the YAML shape, with an
    optional last entry named ``fallback``) to test instead of the saved ones."""

    model_config = ConfigDict(extra="forbid")

    study: str | None = Field(default=None, max_length=64)
    rules: list[dict[str, Any]] | None = None


class RuleOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    when: list[str]
    action: str
    reason: str | None
    pipeline: str | None
    priority: str | None
    destinations: list[str]
    completion: dict[str, Any] | None
    notify: list[str]
    continue_: bool = Field(alias="continue")
    enabled: bool
    position: int
    version: int
    error: str | None
    updated_at: str | None
    updated_by: str | None


class FallbackOut(BaseModel):
    name: str
    action: str
    reason: str | None
    pipeline: str | None
    priority: str | None
    destinations: list[str]
    completion: dict[str, Any] | None
    notify: list[str]
    version: int


class HistoryEntry(BaseModel):
    at: str
    actor: str | None
    action: str
    version: int | None
    detail: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    diff: str


class ValidOut(BaseModel):
    valid: bool


class JobOut(BaseModel):
    pipeline: str
    priority: str
    destinations: list[str]
    notify: list[str]
    rule: str
    rule_version: int


class TestOut(BaseModel):
    rule: str | None
    rule_version: int | None
    action: str
    reason: str
    pipeline: str | None
    priority: str | None
    destinations: list[str]
    notify: list[str]
    matched: list[str]
    fallback: bool
    jobs: list[JobOut]
    warnings: list[str]
    trace: list[dict[str, Any]]


# Helpers --------------------------------------------------------------------------------------


def _out(row: Rule) -> RuleOut:
    return RuleOut.model_validate(engine.rule_out(row))


def _invalid(exc: RuleInvalid, prefix: str = "") -> HTTPException:
    return HTTPException(
        status_code=422,
        detail=[
            {"field": engine.join_field(prefix, p.field) if prefix else p.field, "reason": p.reason}
            for p in exc.problems
        ],
    )


def _version(body_version: int | None, query: int | None, if_match: str | None) -> int | None:
    if body_version is not None:
        return body_version
    if query is not None:
        return query
    if if_match:
        tag = if_match.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag.strip().strip('"')
        try:
            return int(tag)
        except ValueError:
            raise HTTPException(status_code=400, detail="If-Match must be a rule version") from None
    return None


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuleNotFound:
        raise HTTPException(status_code=404, detail="unknown rule") from None
    except RuleInvalid as exc:
        raise _invalid(exc) from None
    except RuleConflict as exc:
        code = 428 if "is required" in str(exc) else 409
        raise HTTPException(status_code=code, detail=str(exc)) from None
    except IntegrityError:
        raise HTTPException(
            status_code=409, detail="a concurrent change to the rules: reload and retry"
        ) from None


def _catalog(request: Request, s: Session) -> engine.Catalog:
    return engine.load_catalog(s, get_state(request).settings.default_pipeline)


def _etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


IfMatch = Annotated[str | None, Header(alias="If-Match")]
VersionQuery = Annotated[int | None, Query(alias="version")]


# Routes: the fixed paths first (they would otherwise be taken for rule names) ------------------


@router.get("/api/rules", response_model=list[RuleOut], responses=AUTH_RESPONSES)
def list_rules(request: Request, _who: Viewer) -> list[RuleOut]:
    """All rules in order (the fallback is at ``/api/rules/fallback``)."""
    with get_state(request).db.session() as s:
        return [_out(r) for r in engine.all_rules(s)]


@router.post(
    "/api/rules",
    response_model=RuleOut,
    status_code=201,
    responses={**AUTH_RESPONSES, **BODY, **INVALID, 409: {"description": "a concurrent change"}},
)
def create_rule(body: RuleIn, request: Request, response: Response, who: Admin) -> RuleOut:
    """Add a rule at the end of the order."""
    data = body.model_dump(by_alias=True, exclude={"version"})

    def go() -> RuleOut:
        with get_state(request).db.session() as s:
            row = engine.create_rule(s, data, who.name, _catalog(request, s))
            _etag(response, row.version)
            return _out(row)

    return _run(go)  # type: ignore[no-any-return]


@router.post(
    "/api/rules/validate",
    response_model=ValidOut,
    responses={**AUTH_RESPONSES, **BODY, **INVALID},
)
def validate_rule(
    body: RuleIn,
    request: Request,
    _who: Admin,
    editing: Annotated[str | None, Query(max_length=128)] = None,
) -> ValidOut:
    """Validate a draft without saving it (``editing``: the name of the rule being edited, whose
    own name is then not a duplicate)."""
    data = body.model_dump(by_alias=True, exclude={"version"})
    with get_state(request).db.session() as s:
        taken = set(s.scalars(select(Rule.name))) - {editing or ""}
        _, problems = engine.validate_rule(data, _catalog(request, s), taken=taken)
    if problems:
        raise _invalid(RuleInvalid(problems))
    return ValidOut(valid=True)


@router.post(
    "/api/rules/reorder",
    response_model=list[RuleOut],
    responses={**AUTH_RESPONSES, **BODY, **INVALID, 409: {"description": "a concurrent change"}},
)
def reorder(body: ReorderIn, request: Request, who: Admin) -> list[RuleOut]:
    """Set the order: ``names`` lists every rule exactly once, first rule first."""

    def go() -> list[RuleOut]:
        with get_state(request).db.session() as s:
            return [_out(r) for r in engine.reorder_rules(s, body.names, who.name)]

    return _run(go)  # type: ignore[no-any-return]


@router.get("/api/rules/fallback", response_model=FallbackOut, responses=AUTH_RESPONSES)
def get_fallback(request: Request, response: Response, _who: Viewer) -> FallbackOut:
    """What happens to a study that no rule takes."""
    with get_state(request).db.session() as s:
        spec, version = engine.get_fallback(s)
    _etag(response, version)
    return FallbackOut.model_validate(engine.fallback_out(spec, version))


@router.put(
    "/api/rules/fallback",
    response_model=FallbackOut,
    responses={**AUTH_RESPONSES, **BODY, **INVALID, **VERSIONED},
)
def put_fallback(
    body: FallbackIn,
    request: Request,
    response: Response,
    who: Admin,
    if_match: IfMatch = None,
    version: VersionQuery = None,
) -> FallbackOut:
    expected = _version(body.version, version, if_match)
    data = body.model_dump(exclude={"version"})

    def go() -> FallbackOut:
        with get_state(request).db.session() as s:
            spec, new = engine.put_fallback(s, data, expected, who.name, _catalog(request, s))
        _etag(response, new)
        return FallbackOut.model_validate(engine.fallback_out(spec, new))

    return _run(go)  # type: ignore[no-any-return]


_TEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": TestIn.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "rules": {"type": "string", "description": "draft rules as JSON"},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


@router.post(
    "/api/rules/test",
    response_model=TestOut,
    openapi_extra=_TEST_BODY,
    responses={
        **AUTH_RESPONSES,
        400: {"description": "not a DICOM file, or not JSON"},
        404: {"description": "unknown study"},
        413: {"description": "the file is too large"},
        415: {"description": "send application/dicom, application/json or multipart/form-data"},
        **INVALID,
    },
)
async def test_rules(
    request: Request,
    _who: Admin,
    source: Annotated[str, Query(max_length=16)] = "",
    calling_ae: Annotated[str, Query(max_length=16)] = "",
    called_ae: Annotated[str, Query(max_length=16)] = "",
    sender_address: Annotated[str, Query(max_length=64)] = "",
) -> TestOut:
    """Which rule would take a DICOM file (``application/dicom``, or ``multipart/form-data``
    with parts ``file`` and optionally ``rules``) or a received study (JSON ``{"study": UID}``),
    with a trace of every rule evaluated and each condition's result. ``rules``: draft rules to
    test instead of the saved ones. For a file, the query parameters stand for the association
    it would come on (``source``, ``calling_ae``, ...)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    drafts: Any = None
    data: bytes | None = None
    study_uid: str | None = None
    if ctype in ("application/dicom", "application/octet-stream"):
        data = await _limited_body(request)
    elif ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=1 << 20)
        except Exception:
            raise HTTPException(status_code=400, detail="not a valid multipart body") from None
        part = form.get("file")
        if part is None or isinstance(part, str):
            raise HTTPException(
                status_code=422, detail=[{"field": "file", "reason": "a DICOM file is required"}]
            )
        data = await part.read(MAX_TEST_FILE + 1)
        if len(data) > MAX_TEST_FILE:
            raise HTTPException(status_code=413, detail="the file is too large")
        raw = form.get("rules")
        if isinstance(raw, str) and raw.strip():
            try:
                drafts = json.loads(raw)
            except (ValueError, RecursionError):
                raise HTTPException(status_code=400, detail="rules is not valid JSON") from None
            if not isinstance(drafts, list):
                raise HTTPException(
                    status_code=422, detail=[{"field": "rules", "reason": "a list of rules"}]
                )
    elif ctype in JSON_TYPES or ctype.endswith("+json"):
        try:
            payload = json.loads(await _limited_body(request))
        except (ValueError, RecursionError):
            raise HTTPException(status_code=400, detail="the body is not valid JSON") from None
        try:
            body = TestIn.model_validate(payload)
        except ValidationError as exc:
            raise _invalid(RuleInvalid(engine.pydantic_problems(exc, ""))) from None
        if not body.study:
            raise HTTPException(
                status_code=422,
                detail=[{"field": "study", "reason": "required (or send a DICOM file)"}],
            )
        study_uid, drafts = body.study, body.rules
    else:
        raise HTTPException(
            status_code=415,
            detail="send application/dicom, application/json or multipart/form-data",
        )
    ctx = StudyContext(source, calling_ae, called_ae, sender_address, 1)
    # Parsing, database and CEL work: off the event loop.
    return await run_in_threadpool(_test, request, data, study_uid, drafts, ctx)


MAX_TEST_FILE = 512 * 1024 * 1024


async def _limited_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_TEST_FILE:
            raise HTTPException(status_code=413, detail="the file is too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _file_input(data: bytes) -> tuple[InstanceInput, StudyFacts]:
    try:
        ds = parse_part10(data)
        facts = examine(ds, ds.file_meta.TransferSyntaxUID)
    except RejectedDataset as exc:
        raise HTTPException(
            status_code=400, detail=f"not a usable DICOM file: {exc.reason}"
        ) from None
    except Exception:
        raise HTTPException(status_code=400, detail="not a usable DICOM file") from None
    inst = InstanceInput(facts.sop_uid, engine.tags_of(ds))
    study = StudyFacts(
        modalities={facts.modality} if facts.modality else set(),
        body_parts={facts.body_part} if facts.body_part else set(),
        sop_classes={facts.sop_class_uid},
        calling_ae=None,
        source="",
        analysable_count=1 if facts.analysable else 0,
        not_analysable_reasons=[facts.reason] if facts.reason else [],
        instance_count=1,
    )
    return inst, study


def _test(
    request: Request,
    data: bytes | None,
    study_uid: str | None,
    drafts: Any,
    ctx: StudyContext,
) -> TestOut:
    state = get_state(request)
    default_pipeline = state.settings.default_pipeline
    with state.db.session() as s:
        catalog = engine.load_catalog(s, default_pipeline)
        spec, version = engine.get_fallback(s)
        fallback = fallback_rule(spec, version)
        if drafts is not None:
            specs, draft_fallback, problems = engine.validate_rules(drafts, catalog)
            if problems:
                raise _invalid(RuleInvalid(problems), "rules")
            rules = [CompiledRule(d.name, 0, d) for d in specs if d.enabled]
            if draft_fallback is not None:
                fallback = fallback_rule(draft_fallback, 0)
        else:
            rules = engine.load_rules(s)
        incoming: str | None = None
        if data is not None:
            inst, facts = _file_input(data)
            ev = engine.evaluate(rules, [inst], ctx)
        else:
            study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                raise HTTPException(status_code=404, detail="unknown study")
            incoming = study.incoming_priority
            facts = study_facts(s, study)
            router = Router(state.store, default_pipeline=default_pipeline)
            ev = router.evaluate(s, study, rules)
        decision = decide_from(ev, fallback, facts, default_pipeline)
        return _answer(decision, incoming, state.settings.destination_urls)


def _answer(decision: Decision, incoming: str | None, defaults: list[str]) -> TestOut:
    ev = decision.evaluation
    jobs = [
        JobOut(
            pipeline=p.pipeline,
            priority=p.priority or incoming or "routine",
            destinations=list(p.destinations) or [mask(u) for u in defaults],
            notify=list(p.notify),
            rule=p.rule_name,
            rule_version=p.rule_version,
        )
        for p in decision.jobs
    ]
    if decision.discarded:
        action = "discard"
    elif decision.action == "skip":
        action = "skip"
    else:
        action = "process"
    first = jobs[0] if jobs else None
    return TestOut(
        rule=ev.matched[0].name if ev.matched else None,
        rule_version=ev.matched[0].version if ev.matched else None,
        action=action,
        reason=decision.reason,
        pipeline=first.pipeline if first else None,
        priority=first.priority if first else None,
        destinations=first.destinations if first else [],
        notify=first.notify if first else [],
        matched=[r.name for r in ev.matched],
        fallback=not ev.matched,
        jobs=jobs,
        warnings=list(decision.warnings),
        trace=ev.trace,
    )


# Routes on one rule -----------------------------------------------------------------------------


@router.get("/api/rules/{name}", response_model=RuleOut, responses={**AUTH_RESPONSES, **NOT_FOUND})
def get_rule(name: str, request: Request, response: Response, _who: Viewer) -> RuleOut:
    def go() -> RuleOut:
        with get_state(request).db.session() as s:
            row = engine.get_rule(s, name)
            _etag(response, row.version)
            return _out(row)

    return _run(go)  # type: ignore[no-any-return]


@router.put(
    "/api/rules/{name}",
    response_model=RuleOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **BODY, **INVALID, **VERSIONED},
)
def put_rule(
    name: str,
    body: RuleIn,
    request: Request,
    response: Response,
    who: Admin,
    if_match: IfMatch = None,
    version: VersionQuery = None,
) -> RuleOut:
    """Replace a rule (a new version); renaming is allowed, the history follows the rule."""
    expected = _version(body.version, version, if_match)
    data = body.model_dump(by_alias=True, exclude={"version"})

    def go() -> RuleOut:
        with get_state(request).db.session() as s:
            row = engine.update_rule(s, name, data, expected, who.name, _catalog(request, s))
            _etag(response, row.version)
            return _out(row)

    return _run(go)  # type: ignore[no-any-return]


@router.delete(
    "/api/rules/{name}",
    status_code=204,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **BODY, **INVALID, **VERSIONED},
)
def delete_rule(
    name: str,
    request: Request,
    who: Admin,
    body: VersionIn | None = None,
    if_match: IfMatch = None,
    version: VersionQuery = None,
) -> Response:
    expected = _version(body.version if body else None, version, if_match)

    def go() -> None:
        with get_state(request).db.session() as s:
            engine.delete_rule(s, name, expected, who.name)

    _run(go)
    return Response(status_code=204)


def _toggle(
    name: str,
    enabled: bool,
    request: Request,
    response: Response,
    who: str,
    expected: int | None,
) -> RuleOut:
    def go() -> RuleOut:
        with get_state(request).db.session() as s:
            row = engine.set_enabled(s, name, enabled, expected, who)
            _etag(response, row.version)
            return _out(row)

    return _run(go)  # type: ignore[no-any-return]


@router.post(
    "/api/rules/{name}/enable",
    response_model=RuleOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **BODY, **INVALID, **VERSIONED},
)
def enable_rule(
    name: str,
    request: Request,
    response: Response,
    who: Admin,
    body: VersionIn | None = None,
    if_match: IfMatch = None,
    version: VersionQuery = None,
) -> RuleOut:
    expected = _version(body.version if body else None, version, if_match)
    return _toggle(name, True, request, response, who.name, expected)


@router.post(
    "/api/rules/{name}/disable",
    response_model=RuleOut,
    responses={**AUTH_RESPONSES, **NOT_FOUND, **BODY, **INVALID, **VERSIONED},
)
def disable_rule(
    name: str,
    request: Request,
    response: Response,
    who: Admin,
    body: VersionIn | None = None,
    if_match: IfMatch = None,
    version: VersionQuery = None,
) -> RuleOut:
    expected = _version(body.version if body else None, version, if_match)
    return _toggle(name, False, request, response, who.name, expected)


@router.get(
    "/api/rules/{name}/history",
    response_model=list[HistoryEntry],
    responses={**AUTH_RESPONSES, 404: {"description": "no rule of that name, now or before"}},
)
def rule_history(name: str, request: Request, _who: Viewer) -> list[HistoryEntry]:
    """Every change of the rule (also before a rename), oldest first, with a unified diff of its
    YAML. A deleted rule's history stays readable."""
    with get_state(request).db.session() as s:
        entries = engine.history(s, name)
    if not entries and name != engine.FALLBACK:
        raise HTTPException(status_code=404, detail="no rule of that name, now or before")
    return [HistoryEntry.model_validate(e) for e in entries]
