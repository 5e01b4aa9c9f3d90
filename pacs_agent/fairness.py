"""Fairness in operation: positive prediction rates per subgroup and finding, and the monitor
that flags a subgroup whose rate drifts from the others or from its own baseline.

Recording (a worker, when a job's results are stored): for each analysed image, one row per
finding in ``fairness_observations`` with whether it was positive and the image's coarse
subgroup bins, each from a small fixed set (:func:`subgroups`): sex M/F/O/unknown, age band
0-17/18-39/40-64/65+/unknown (from Patient's Age, else birth date and study date; neither is
stored), manufacturer normalised to a fixed vendor list/other/unknown, view PA/AP/LAT/other/
unknown (View Position) and the study's calling AE. No names, ids or dates of the patient. An
image is counted once per bundle (unique on bundle checksum, SOP Instance UID, finding): a
retried or re-run job does not count it twice.

The rule (:func:`evaluate`), per pipeline, bundle, finding and dimension: the window is the last
``fairness_window_days`` days (UTC), the baseline the ``fairness_baseline_days`` before it. Each
subgroup's window rate is compared with

- the rest: every other subgroup of the same dimension pooled, same window ("vs_rest");
- its own baseline rate ("vs_baseline").

A comparison flags when both sides have at least ``fairness_min_images`` images, the absolute
rate difference is at least ``fairness_margin``, and the ``fairness_confidence`` interval of the
difference (Newcombe's hybrid score interval, built from the two Wilson score intervals) does
not contain 0. A small subgroup therefore cannot flag on noise: at 30 images a difference of
0.1 is far inside its interval. These are prediction rates, not accuracy: accuracy per subgroup
needs labels (``pacs-agent adapters audit``).

The monitor's pass (:func:`check`, with the agent's housekeeping): evaluates, sets the gauge
``pacs_agent_fairness_flags`` (finding, dimension), records a ``fairness.flag`` event and a log
line for each newly flagged subgroup, and removes rows older than window + baseline.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal, Protocol

from pydantic import BaseModel
from sqlalchemy import case, delete, func, insert, select
from sqlalchemy.orm import Session

from pacs_agent import metrics
from pacs_agent.db.models import AgentFlag, FairnessObservation, Job, Study, utcnow
from pacs_agent.db.session import Database, record_event

log = logging.getLogger(__name__)

Dimension = Literal["sex", "age_band", "manufacturer", "view", "calling_ae"]
DIMENSIONS: tuple[Dimension, ...] = ("sex", "age_band", "manufacturer", "view", "calling_ae")
UNKNOWN = "unknown"
OTHER = "other"
SEXES = ("M", "F", "O")
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 65, "40-64"), (65, 200, "65+"))
VIEWS = {"PA": "PA", "AP": "AP", "LL": "LAT", "RL": "LAT", "LAT": "LAT", "LATERAL": "LAT"}
# Vendor names as modalities write them (lower case, word-bounded) -> one name per vendor.
MANUFACTURERS: tuple[tuple[str, str], ...] = (
    (r"\bagfa\b", "Agfa"),
    (r"\b(carestream|kodak)\b", "Carestream"),
    (r"\bfuji(film)?\b", "Fujifilm"),
    (r"\b(ge|general electric)\b", "GE"),
    (r"\bsiemens\b", "Siemens"),
    (r"\bphilips\b", "Philips"),
    (r"\b(canon|toshiba)\b", "Canon"),
    (r"\bkonica\b", "Konica Minolta"),
    (r"\bsamsung\b", "Samsung"),
    (r"\bshimadzu\b", "Shimadzu"),
    (r"\bhologic\b", "Hologic"),
    (r"\bdrgem\b", "DRGEM"),
)
_VENDOR_RES = tuple((re.compile(p), name) for p, name in MANUFACTURERS)
FLAG_STATE_KEY = "fairness.flags"  # agent_flags row: the flags of the last pass


# Subgroup bins from an instance header ---------------------------------------------------------


def _date(value: object) -> dt.date | None:
    s = str(value or "").strip()
    if len(s) != 8 or not s.isdigit():
        return None
    try:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:
        return None


def _age_years(ds: Any) -> float | None:
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        return int(age[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[3]]
    birth = _date(ds.get("PatientBirthDate"))
    when = _date(ds.get("StudyDate")) or _date(ds.get("AcquisitionDate"))
    if birth is None or when is None or when < birth:
        return None
    return (when - birth).days / 365.25


def age_band(ds: Any) -> str:
    years = _age_years(ds)
    if years is None or not math.isfinite(years):
        return UNKNOWN
    for lo, hi, name in AGE_BANDS:
        if lo <= years < hi:
            return name
    return UNKNOWN


def manufacturer(value: object) -> str:
    text = str(value or "").strip().lower()
    if not text:
        return UNKNOWN
    for pattern, name in _VENDOR_RES:
        if pattern.search(text):
            return name
    return OTHER


def view(value: object) -> str:
    text = str(value or "").strip().upper()
    return VIEWS.get(text, OTHER) if text else UNKNOWN


def calling_ae(value: str | None) -> str:
    text = (value or "").strip()[:16]
    return text if text and text.isprintable() else UNKNOWN


def subgroups(ds: Any, study_calling_ae: str | None) -> dict[str, str]:
    """The image's bin in each dimension; every value from a small fixed set (the calling AE:
    the AE titles the site's modalities use). Nothing else of the header is kept."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {
        "sex": sex if sex in SEXES else UNKNOWN,
        "age_band": age_band(ds),
        "manufacturer": manufacturer(ds.get("Manufacturer")),
        "view": view(ds.get("ViewPosition")),
        "calling_ae": calling_ae(study_calling_ae),
    }


# Recording (workers) ---------------------------------------------------------------------------


class _Finding(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def present(self) -> bool: ...


class _ImageResult(Protocol):
    @property
    def source_sop_instance_uid(self) -> str: ...

    @property
    def findings(self) -> Sequence[_Finding]: ...


def record(
    db: Database,
    job_id: int,
    bundle_checksum: str,
    results: Iterable[_ImageResult],
    sources: Iterable[Any],
) -> int:
    """Count each analysed image's findings under its subgroups (once per image and bundle).

    Best effort and in its own transaction: the job's results are already stored; a failure
    here is logged (no patient data) and never fails the job. Returns the rows added."""
    headers = {str(ds.get("SOPInstanceUID", "")): ds for ds in sources}
    try:
        with db.session() as s:
            row = s.execute(
                select(Job.pipeline, Study.calling_ae)
                .join(Study, Study.id == Job.study_id)
                .where(Job.id == job_id)
            ).first()
            if row is None:
                return 0
            pipeline, ae = row
            day = utcnow().date()
            values: list[dict[str, Any]] = []
            for result in results:
                ds = headers.get(result.source_sop_instance_uid)
                if ds is None:
                    continue
                bins = subgroups(ds, ae)
                for finding in result.findings:
                    values.append(
                        {
                            "day": day,
                            "pipeline": pipeline,
                            "bundle_checksum": bundle_checksum,
                            "sop_instance_uid": result.source_sop_instance_uid,
                            "finding": finding.label[:128],
                            "positive": bool(finding.present),
                            **bins,
                        }
                    )
            if not values:
                return 0
            return _insert_new(s, values)
    except Exception as exc:
        log.warning("job %s: fairness counts not recorded: %s", job_id, type(exc).__name__)
        return 0


def _insert_new(s: Session, values: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING on (bundle, image, finding): a re-run, or two workers
    on the same image, count it once."""
    dialect = s.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(FairnessObservation).on_conflict_do_nothing()
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(FairnessObservation).on_conflict_do_nothing()
    else:  # another database: skip what is there, accept a rare duplicate-key failure
        known = set(
            s.execute(
                select(FairnessObservation.sop_instance_uid, FairnessObservation.finding).where(
                    FairnessObservation.bundle_checksum == values[0]["bundle_checksum"],
                    FairnessObservation.sop_instance_uid.in_(
                        {v["sop_instance_uid"] for v in values}
                    ),
                )
            ).all()
        )
        values = [v for v in values if (v["sop_instance_uid"], v["finding"]) not in known]
        stmt = insert(FairnessObservation)
        if not values:
            return 0
    result = s.execute(stmt, values)
    count = getattr(result, "rowcount", -1)
    return int(count) if isinstance(count, int) and count >= 0 else len(values)


# Statistics ------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2 (method 10, Newcombe 1998)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


# The monitor -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    margin: float = 0.1
    min_images: int = 30
    confidence: float = 0.99
    window_days: int = 7
    baseline_days: int = 28

    @classmethod
    def from_settings(cls, settings: Any) -> Rule:
        return cls(
            margin=settings.fairness_margin,
            min_images=settings.fairness_min_images,
            confidence=settings.fairness_confidence,
            window_days=settings.fairness_window_days,
            baseline_days=settings.fairness_baseline_days,
        )

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(0.5 + self.confidence / 2)


class Comparison(BaseModel):
    images: int
    positives: int
    rate: float | None
    difference: float | None = None  # subgroup rate minus this rate
    ci_low: float | None = None  # the difference's interval (Newcombe)
    ci_high: float | None = None
    flagged: bool = False


class SubgroupRate(BaseModel):
    pipeline: str
    bundle_checksum: str
    finding: str
    dimension: str
    subgroup: str
    images: int  # in the window
    positives: int
    rate: float | None
    ci_low: float | None  # Wilson interval of the rate
    ci_high: float | None
    rest: Comparison  # the other subgroups of the dimension, pooled, same window
    baseline: Comparison  # the same subgroup before the window
    flagged: bool
    reasons: list[str]


class FairnessReport(BaseModel):
    generated_at: dt.datetime
    window_start: dt.date
    window_end: dt.date
    baseline_start: dt.date | None
    margin: float
    min_images: int
    confidence: float
    rule: str
    flagged: int
    rates: list[SubgroupRate]


RULE_TEXT = (
    "flag when both sides have >= min_images images, |rate difference| >= margin and the "
    "Newcombe (Wilson score) interval of the difference at the given confidence excludes 0; "
    "compared with the rest of the dimension (same window) and with the subgroup's own baseline"
)


def _compare(k: int, n: int, k2: int, n2: int, rule: Rule) -> Comparison:
    out = Comparison(images=n2, positives=k2, rate=k2 / n2 if n2 else None)
    if n == 0 or n2 == 0:
        return out
    out.difference = k / n - k2 / n2
    out.ci_low, out.ci_high = newcombe(k, n, k2, n2, rule.z)
    out.flagged = (
        n >= rule.min_images
        and n2 >= rule.min_images
        and abs(out.difference) >= rule.margin - 1e-12
        and (out.ci_low > 0 or out.ci_high < 0)
    )
    return out


def evaluate(
    s: Session,
    rule: Rule,
    *,
    today: dt.date | None = None,
    pipeline: str | None = None,
    finding: str | None = None,
    dimension: str | None = None,
    flagged_only: bool = False,
) -> FairnessReport:
    """Rates and flags per (pipeline, bundle, finding, dimension, subgroup); see the module."""
    today = today or utcnow().date()
    window_start = today - dt.timedelta(days=rule.window_days - 1)
    baseline_start = window_start - dt.timedelta(days=rule.baseline_days)
    FO = FairnessObservation
    recent = case((FO.day >= window_start, 1), else_=0)
    pos = func.sum(case((FO.positive.is_(True), 1), else_=0))
    rates: list[SubgroupRate] = []
    for dim in DIMENSIONS if dimension is None else (dimension,):
        col = getattr(FO, dim)
        stmt = (
            select(FO.pipeline, FO.bundle_checksum, FO.finding, col, recent, func.count(), pos)
            .where(FO.day >= baseline_start, FO.day <= today)
            .group_by(FO.pipeline, FO.bundle_checksum, FO.finding, col, recent)
        )
        if pipeline:
            stmt = stmt.where(FO.pipeline == pipeline)
        if finding:
            stmt = stmt.where(FO.finding == finding)
        # (pipeline, bundle, finding) -> subgroup -> [window n, k, baseline n, k]
        groups: dict[tuple[str, str, str], dict[str, list[int]]] = {}
        for pl, checksum, fnd, value, is_recent, n, k in s.execute(stmt).all():
            cell = groups.setdefault((pl, checksum, fnd), {}).setdefault(str(value), [0, 0, 0, 0])
            at = 0 if is_recent else 2
            cell[at] += int(n)
            cell[at + 1] += int(k or 0)
        for (pl, checksum, fnd), subs in sorted(groups.items()):
            total_n = sum(c[0] for c in subs.values())
            total_k = sum(c[1] for c in subs.values())
            for value, (n, k, bn, bk) in sorted(subs.items()):
                if n == 0:
                    continue  # seen only in the baseline: nothing to say about the window
                rest = _compare(k, n, total_k - k, total_n - n, rule)
                base = _compare(k, n, bk, bn, rule)
                reasons = []
                if rest.flagged:
                    reasons.append(
                        f"rate {k / n:.3f} vs {rest.rate:.3f} for the rest of {dim}"
                        f" (difference {rest.difference:+.3f}, margin {rule.margin})"
                    )
                if base.flagged:
                    reasons.append(
                        f"rate {k / n:.3f} vs its baseline {base.rate:.3f}"
                        f" (difference {base.difference:+.3f}, margin {rule.margin})"
                    )
                lo, hi = wilson(k, n, rule.z)
                item = SubgroupRate(
                    pipeline=pl,
                    bundle_checksum=checksum,
                    finding=fnd,
                    dimension=dim,
                    subgroup=value,
                    images=n,
                    positives=k,
                    rate=k / n,
                    ci_low=lo,
                    ci_high=hi,
                    rest=rest,
                    baseline=base,
                    flagged=bool(reasons),
                    reasons=reasons,
                )
                if item.flagged or not flagged_only:
                    rates.append(item)
    return FairnessReport(
        generated_at=utcnow(),
        window_start=window_start,
        window_end=today,
        baseline_start=baseline_start if rule.baseline_days else None,
        margin=rule.margin,
        min_images=rule.min_images,
        confidence=rule.confidence,
        rule=RULE_TEXT,
        flagged=sum(1 for r in rates if r.flagged),
        rates=rates,
    )


def flag_key(r: SubgroupRate) -> str:
    return f"{r.pipeline}|{r.bundle_checksum}|{r.finding}|{r.dimension}|{r.subgroup}"


def check(db: Database, settings: Any, *, today: dt.date | None = None) -> FairnessReport | None:
    """The monitor's pass (agent housekeeping): evaluate, publish the gauge, record an event and
    a log line per newly flagged subgroup, and remove rows older than window + baseline."""
    rule = Rule.from_settings(settings)
    try:
        with db.session() as s:
            report = evaluate(s, rule, today=today)
            counts: dict[tuple[str, str], int] = {}
            for r in report.rates:
                pair = (r.finding, r.dimension)
                counts[pair] = counts.get(pair, 0) + int(r.flagged)
            metrics.fairness_flags(counts)
            state = s.get(AgentFlag, FLAG_STATE_KEY)
            before = set(state.value or []) if state is not None else set()
            now = {flag_key(r): r for r in report.rates if r.flagged}
            for key in sorted(set(now) - before):
                r = now[key]
                record_event(
                    s,
                    "fairness.flag",
                    f"pipeline {r.pipeline} finding {r.finding!r}: {r.dimension} {r.subgroup}, "
                    f"{r.images} images in the window: " + "; ".join(r.reasons),
                    level="warning",
                )
            for key in sorted(before - set(now)):
                log.info("fairness flag cleared: %s", key)
            if state is None:
                s.add(AgentFlag(key=FLAG_STATE_KEY, value=sorted(now), updated_at=utcnow()))
            elif set(now) != before:
                state.value = sorted(now)
                state.updated_at = utcnow()
            oldest = report.baseline_start or report.window_start
            s.execute(delete(FairnessObservation).where(FairnessObservation.day < oldest))
        return report
    except Exception as exc:
        log.error("fairness check failed: %s; retried at the next pass", type(exc).__name__)
        return None


# Export ----------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "window_start",
    "window_end",
    "pipeline",
    "bundle_checksum",
    "finding",
    "dimension",
    "subgroup",
    "images",
    "positives",
    "rate",
    "ci_low",
    "ci_high",
    "rest_images",
    "rest_positives",
    "rest_rate",
    "difference_vs_rest",
    "flag_vs_rest",
    "baseline_images",
    "baseline_positives",
    "baseline_rate",
    "difference_vs_baseline",
    "flag_vs_baseline",
    "flagged",
)


def _cell(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def to_csv(report: FairnessReport) -> str:
    """One row per subgroup rate. Text cells that a spreadsheet would run as a formula (a calling
    AE or a label starting with = + - @) are quoted with a leading apostrophe."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in report.rates:
        w.writerow(
            [
                _cell(v) if isinstance(v, str) else v
                for v in (
                    str(report.window_start),
                    str(report.window_end),
                    r.pipeline,
                    r.bundle_checksum,
                    r.finding,
                    r.dimension,
                    r.subgroup,
                    r.images,
                    r.positives,
                    _num(r.rate),
                    _num(r.ci_low),
                    _num(r.ci_high),
                    r.rest.images,
                    r.rest.positives,
                    _num(r.rest.rate),
                    _num(r.rest.difference),
                    int(r.rest.flagged),
                    r.baseline.images,
                    r.baseline.positives,
                    _num(r.baseline.rate),
                    _num(r.baseline.difference),
                    int(r.baseline.flagged),
                    int(r.flagged),
                )
            ]
        )
    return out.getvalue()
