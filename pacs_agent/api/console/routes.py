"""The admin console: server-rendered pages (Jinja2, autoescaped) over the same database and
JSON API as scripts use.

Pages read what they list from the database (``views``); every change goes through the JSON API
from ``static/console.js`` with the session's CSRF token (``<meta name="csrf-token">``), so the
API's role checks, validation, versioning and audit apply to the console exactly as to scripts.
A visitor who is not logged in is sent to ``/login`` (303). Responses carry a strict Content
Security Policy (no inline script, nothing from another origin) on top of the escaping.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from pacs_agent import __version__
from pacs_agent.api.console import views
from pacs_agent.api.deps import SESSION_COOKIE, Principal, current_principal, get_state
from pacs_agent.api.routes.similar import similar_for_page
from pacs_agent.receiving.refusals import DOORS

router = APIRouter(include_in_schema=False)

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
STATIC_FILES = {"console.css": "text/css", "console.js": "text/javascript"}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value, DICOM text included, is HTML-escaped
    trim_blocks=True,
    lstrip_blocks=True,
)


def short_uid(uid: str, keep: int = 26) -> str:
    """A long UID with its middle elided (the full UID is in the link and its title)."""
    return uid if len(uid) <= keep else f"{uid[:10]}…{uid[-(keep - 11) :]}"


_env.filters["short_uid"] = short_uid

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NAV = [
    ("studies", "/", "Studies", "viewer"),
    ("rules", "/rules", "Rules", "viewer"),
    ("destinations", "/destinations", "Destinations", "viewer"),
    ("pipelines", "/pipelines", "Pipelines", "viewer"),
    ("queue", "/queue", "Queue", "viewer"),
    ("refusals", "/refusals", "Refusals", "viewer"),
    ("fairness", "/fairness", "Fairness", "viewer"),
    ("users", "/users", "Users", "admin"),
    ("audit", "/audit", "Audit", "operator"),
]

Who = Annotated[Principal | None, Depends(current_principal)]
REFUSALS_PAGE = 200


def render(
    template: str,
    who: Principal | None,
    page: str = "",
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    html = _env.get_template(template).render(
        who=who,
        page=page,
        nav=[n for n in NAV if who is not None and who.may(n[3])],
        can_operate=bool(who and who.may("operator")),
        is_admin=bool(who and who.may("admin")),
        csrf=(who.csrf_token or "") if who else "",
        version=__version__,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={urllib.parse.quote(target, safe='')}", status_code=303)


def _safe_next(value: str | None) -> str:
    """Only a local path (no scheme, no ``//host``) may be a redirect target after login."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _gate(request: Request, who: Principal | None, role: str = "viewer") -> Response | None:
    """None when ``who`` may see the page, else the redirect (not logged in) or a 403 page."""
    if who is None:
        return to_login(request)
    if not who.may(role):
        return render(
            "error.html",
            who,
            status_code=403,
            title="Not allowed",
            message=f"This page needs the {role} role; you are logged in as {who.role}.",
        )
    return None


# login / logout ---------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, who: Who, next: str = "/") -> Response:
    if who is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render("login.html", None, next=_safe_next(next), error="", name="")


@router.post("/login")
def login_submit(
    request: Request,
    name: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    from pacs_agent import users

    state = get_state(request)
    address = request.client.host if request.client else ""
    target = _safe_next(next)
    try:
        cookie, _csrf, _principal = users.login(state.db, state.settings, name, password, address)
    except users.RateLimited:
        return render(
            "login.html",
            None,
            status_code=429,
            next=target,
            name=name,
            error="Too many failed logins: wait a few minutes and try again.",
        )
    except users.LoginRefused:
        return render(
            "login.html",
            None,
            status_code=401,
            next=target,
            name=name,
            error="Wrong user name or password, or the account is disabled.",
        )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=state.settings.session_ttl_s,
        httponly=True,
        samesite="strict",
        secure=state.settings.secure_cookies,
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, who: Who) -> Response:
    """End this browser's session (the form carries the CSRF token; checked by
    ``current_principal``)."""
    from pacs_agent import users

    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and who is not None and who.via == "session":
        users.logout(get_state(request).db, cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# pages ------------------------------------------------------------------------------------------


@router.get("/")
def studies_page(
    request: Request,
    who: Who,
    status: str = "",
    priority: str = "",
    rule: str = "",
    pipeline: str = "",
    q: str = "",
) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    filters = {"status": status, "priority": priority, "rule": rule, "pipeline": pipeline, "q": q}
    with get_state(request).db.session() as s:
        studies = views.list_studies(
            s, status=status, priority=priority, rule=rule, pipeline=pipeline, q=q
        )
        options = views.study_filters(s)
    return render(
        "studies.html",
        who,
        "studies",
        studies=studies,
        filters=filters,
        options=options,
        limit=views.LIST_LIMIT,
    )


@router.get("/studies/{study_uid}")
def study_page(request: Request, who: Who, study_uid: str) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    state = get_state(request)
    with state.db.session() as s:
        study = views.study_detail(
            s,
            study_uid,
            state.store.path_for,
            heartbeat_timeout_s=state.settings.job_heartbeat_timeout_s,
        )
        pipelines = views.choices(s)["pipelines"]
        similar = similar_for_page(request, s, study_uid) if study is not None else None
    if study is None:
        return render(
            "error.html",
            who,
            "studies",
            404,
            title="Unknown study",
            message="No study with this Study Instance UID has been received.",
        )
    return render("study.html", who, "studies", study=study, pipelines=pipelines, similar=similar)


@router.get("/studies/{study_uid}/results/{sop_uid}")
def result_file(request: Request, who: Who, study_uid: str, sop_uid: str) -> Response:
    """A result object of the study as a DICOM file (download)."""
    if (refused := _gate(request, who)) is not None:
        return refused
    state = get_state(request)
    with state.db.session() as s:
        rel = views.result_path(s, study_uid, sop_uid)
    root = state.settings.results_dir.resolve()
    path = (root / rel).resolve() if rel else None
    if path is None or not path.is_file() or not path.is_relative_to(root):
        return render(
            "error.html",
            who,
            "studies",
            404,
            title="No such result",
            message="This result object is not stored (removed by retention, or unknown).",
        )
    return FileResponse(
        path,
        media_type="application/dicom",
        filename=f"{sop_uid}.dcm",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@router.get("/rules")
def rules_page(request: Request, who: Who) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    state = get_state(request)
    with state.db.session() as s:
        rules = views.list_rules(s)
    return render(
        "rules.html", who, "rules", rules=rules, default_pipeline=state.settings.default_pipeline
    )


@router.get("/rules/edit")
def rule_edit_page(request: Request, who: Who, name: str = "") -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    state = get_state(request)
    with state.db.session() as s:
        rule = views.get_rule(s, name) if name else None
        rules = views.list_rules(s)
        options = views.choices(s)
        studies = views.recent_study_uids(s)
    if name and rule is None:
        return render(
            "error.html",
            who,
            "rules",
            404,
            title="Unknown rule",
            message="There is no rule with this name (deleted, or renamed).",
        )
    return render(
        "rule_edit.html",
        who,
        "rules",
        rule=rule,
        rules=rules,
        options=options,
        studies=studies,
        default_pipeline=state.settings.default_pipeline,
    )


@router.get("/destinations")
def destinations_page(request: Request, who: Who) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    with get_state(request).db.session() as s:
        destinations = views.list_destinations(s)
    return render("destinations.html", who, "destinations", destinations=destinations)


@router.get("/pipelines")
def pipelines_page(request: Request, who: Who) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    return render("pipelines.html", who, "pipelines")


@router.get("/queue")
def queue_page(request: Request, who: Who) -> Response:
    if (refused := _gate(request, who)) is not None:
        return refused
    return render("queue.html", who, "queue")


@router.get("/users")
def users_page(request: Request, who: Who) -> Response:
    if (refused := _gate(request, who, "admin")) is not None:
        return refused
    with get_state(request).db.session() as s:
        users = views.list_users(s)
    return render("users.html", who, "users", users=users)


@router.get("/audit")
def audit_page(
    request: Request, who: Who, actor: str = "", action: str = "", target: str = ""
) -> Response:
    if (refused := _gate(request, who, "operator")) is not None:
        return refused
    filters = {"actor": actor, "action": action, "target": target}
    with get_state(request).db.session() as s:
        entries = views.list_audit(s, actor=actor, action=action, target=target)
    return render("audit.html", who, "audit", entries=entries, filters=filters)


@router.get("/refusals")
def refusals_page(
    request: Request, who: Who, door: str = "", calling_ae: str = "", before_id: int | None = None
) -> Response:
    """Instances the doors refused, newest first, 200 a page (``GET /api/refusals`` for more)."""
    from pacs_agent.api.routes.refusals import query_refusals

    if (refused := _gate(request, who, "viewer")) is not None:
        return refused
    door = door if door in DOORS else ""
    calling_ae = calling_ae.replace("\x00", "")[:16]
    with get_state(request).db.session() as s:
        rows = query_refusals(
            s, door=door, calling_ae=calling_ae, before_id=before_id, limit=REFUSALS_PAGE
        )
    filters = {"door": door, "calling_ae": calling_ae}
    older = (
        urllib.parse.urlencode({**filters, "before_id": rows[-1].id})
        if len(rows) == REFUSALS_PAGE
        else ""
    )
    return render(
        "refusals.html", who, "refusals", rows=rows, filters=filters, doors=DOORS, older=older
    )


@router.get("/fairness")
def fairness_page(
    request: Request,
    who: Who,
    pipeline: str = "",
    finding: str = "",
    dimension: str = "",
    flagged: str = "",
) -> Response:
    """Positive prediction rates per subgroup with the drifted ones flagged (pacs_agent.fairness);
    admins get the export links (``GET /api/fairness/export``)."""
    from sqlalchemy import select

    from pacs_agent.db.models import WorkerBeat
    from pacs_agent.fairness import DIMENSIONS, Rule, evaluate

    if (refused := _gate(request, who, "viewer")) is not None:
        return refused
    state = get_state(request)
    pipeline = pipeline.replace("\x00", "")[:128]
    finding = finding.replace("\x00", "")[:128]
    dimension = dimension if dimension in DIMENSIONS else ""
    only = flagged in ("1", "on", "true")
    with state.db.session() as s:
        report = evaluate(
            s,
            Rule.from_settings(state.settings),
            pipeline=pipeline or None,
            finding=finding or None,
            dimension=dimension or None,
            flagged_only=only,
        )
        demo = {
            str(b.get("checksum"))
            for beats in s.scalars(select(WorkerBeat.bundles))
            for b in (beats or {}).values()
            if isinstance(b, dict) and b.get("is_demo")
        }
    filters = {"pipeline": pipeline, "finding": finding, "dimension": dimension}
    query = urllib.parse.urlencode(
        {k: v for k, v in {**filters, "flagged": "true" if only else ""}.items() if v}
    )
    return render(
        "fairness.html",
        who,
        "fairness",
        report=report,
        filters=filters,
        flagged=only,
        dimensions=DIMENSIONS,
        demo=demo,
        export_query=("&" + query) if query else "",
    )


@router.get("/console/static/{name}")
def static_file(name: str) -> Response:
    """The console's own CSS and JS (open: the login page needs them; nothing secret)."""
    if name not in STATIC_FILES:
        return Response(status_code=404)
    return FileResponse(
        STATIC / name,
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
