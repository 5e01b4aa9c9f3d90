"""The fairness monitor (pacs_agent.fairness): positive prediction rates per subgroup and
finding, with the subgroups that drifted flagged.

``GET /api/fairness`` (viewers and up): the report, filtered by ``pipeline``, ``finding``,
``dimension`` and ``flagged`` (only flagged subgroups). ``GET /api/fairness/export`` (admins):
the same as a CSV or JSON download, recorded in the audit log. Coarse bins only (sex, age band,
manufacturer, view, calling AE), never patient data.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from pacs_agent.api.deps import AUTH_RESPONSES, Admin, DbSession, Viewer, get_state
from pacs_agent.audit import record_audit
from pacs_agent.fairness import Dimension, FairnessReport, Rule, evaluate, to_csv

router = APIRouter(tags=["fairness"])
TEXT = r"^[^\x00]*$"  # PostgreSQL cannot compare with a string holding NUL: 422, not 500
Pipeline = Annotated[str | None, Query(max_length=128, pattern=TEXT)]
Finding = Annotated[str | None, Query(max_length=128, pattern=TEXT)]


def _report(
    request: Request,
    s: DbSession,
    pipeline: str | None,
    finding: str | None,
    dimension: str | None,
    flagged: bool,
) -> FairnessReport:
    rule = Rule.from_settings(get_state(request).settings)
    return evaluate(
        s, rule, pipeline=pipeline, finding=finding, dimension=dimension, flagged_only=flagged
    )


@router.get("/api/fairness", responses={**AUTH_RESPONSES})
def get_fairness(
    request: Request,
    s: DbSession,
    _who: Viewer,
    pipeline: Pipeline = None,
    finding: Finding = None,
    dimension: Dimension | None = None,
    flagged: bool = False,
) -> FairnessReport:
    return _report(request, s, pipeline, finding, dimension, flagged)


@router.get(
    "/api/fairness/export",
    response_class=Response,
    responses={
        **AUTH_RESPONSES,
        200: {
            "content": {"text/csv": {}, "application/json": {}},
            "description": "the report as a download (one row per subgroup in CSV)",
        },
    },
)
def export_fairness(
    request: Request,
    s: DbSession,
    who: Admin,
    format: Literal["csv", "json"] = "csv",
    pipeline: Pipeline = None,
    finding: Finding = None,
    dimension: Dimension | None = None,
    flagged: bool = False,
) -> Response:
    report = _report(request, s, pipeline, finding, dimension, flagged)
    record_audit(
        s,
        who.name,
        "fairness.export",
        target_type="fairness",
        detail=f"{format}, {len(report.rates)} rows, {report.flagged} flagged",
    )
    name = f"fairness-{report.window_end:%Y%m%d}.{format}"
    if format == "csv":
        body, media = to_csv(report), "text/csv; charset=utf-8"
    else:
        body, media = report.model_dump_json(indent=1), "application/json"
    return Response(
        content=body,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
