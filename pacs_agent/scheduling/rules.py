"""Routing rules: CEL conditions over each instance of a study, validated, versioned and audited.

A rule is a list of conditions in CEL (Common Expression Language: no side effects, no loops
beyond its macros, always terminates), evaluated with ``common-expression-language`` (the Rust
``cel`` crate), never Python ``eval``. All conditions must hold for one instance; a rule takes a
study when any instance satisfies it. Rules are tried in ``position`` order (then id); the first
match wins unless it says ``continue``. A study that no rule takes goes to the fallback rule.

Variables (``VARIABLES``): ``tags`` (every DICOM keyword of the instance's header: strings, lists
of strings for multi-valued text, numbers for IS/DS/US/UL/SS/SL/FL/FD and their lists),
``patient_age_years``, ``source``, ``calling_ae``, ``called_ae``, ``sender_address``,
``instance_count``, ``now_hour`` and ``now_weekday`` (local time; 0 is Sunday, as CEL's
``getDayOfWeek``). Functions: CEL's own plus the cel-go ``core`` and ``strings`` extensions
(``lowerAscii``, ``split``, ``min``, ...).

Safety of evaluation:

- A condition that reads a missing attribute is false, with the reason in the trace; a condition
  that cannot be evaluated (a type error, a bad regular expression) has the result ``None`` and
  its reason. Neither stops routing: routing never raises because of a rule.
- ``matches`` runs on Rust's ``regex`` crate, which guarantees linear time in the input (the
  design of RE2: no backtracking), so no pattern can hang the agent:
  ``"aaaa…!".matches("(a+)+$")`` returns in well under a millisecond.
- Every rule is validated when saved (``validate_rule``): unknown variables and functions, CEL
  that does not compile, unknown pipelines, destinations and notification channels, bad
  priorities. A row that fails anyway at run time (written by hand) is skipped, with its error
  on the rule and a warning event on the study.

Tag values are patient data: they are never logged.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cel
import yaml
from cel.stdlib import add_stdlib_to_context
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from pacs_agent.audit import record_audit
from pacs_agent.db.models import AgentFlag, AuditEntry, Destination, Pipeline, Rule, utcnow
from pacs_agent.scheduling.priority import PriorityClass

log = logging.getLogger(__name__)

VARIABLES: tuple[str, ...] = (
    "tags",
    "patient_age_years",
    "source",
    "calling_ae",
    "called_ae",
    "sender_address",
    "instance_count",
    "now_hour",
    "now_weekday",
)
ACTIONS = ("process", "discard")
FALLBACK = "fallback"
FALLBACK_FLAG = "fallback_rule"
SENDER = "sender"  # destination name: back to the AE that sent the study
SENDER_PORT = 104
# Names that are routes under /api/rules/ (and the fallback's own name).
RESERVED_NAMES = frozenset({FALLBACK, "reorder", "validate", "test"})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONDITION = 4096
TRACE_INSTANCES = 50  # instances shown per rule in a trace; the rest are counted

_EXTENSIONS = ["core", "strings"]
_CEL_NATIVE = frozenset(
    "size matches contains startsWith endsWith int uint double string bytes timestamp duration "
    "type dyn has getFullYear getMonth getDate getDayOfMonth getDayOfYear getDayOfWeek getHours "
    "getMinutes getSeconds getMilliseconds of none ofNonZeroValue hasValue value or orValue "
    "all exists exists_one map filter".split()
)
_EXTENSION_FUNCTIONS = frozenset(
    "bool min max sum charAt indexOf lastIndexOf substring replace split join lowerAscii "
    "upperAscii trim reverse quote".split()
)
# Variables bound by CEL's comprehension macros: ``list.exists(x, ...)`` binds ``x``.
_BOUND_RE = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


# Models ---------------------------------------------------------------------------------------


class Completion(BaseModel):
    """When a study that a rule takes counts as complete (all optional; any met condition wins).

    - ``quiet_period_s``: seconds without a new instance (else the calling AE's or the default);
    - ``expected_instances``: complete as soon as the study version holds this many instances;
    - ``required_series``: complete as soon as series with these Series Descriptions arrived;
    - ``images_in_acquisition``: complete when every acquisition that states Images in
      Acquisition (0020,1002) holds that many images;
    - ``on_association_release``: complete when the association that sent it is released.
    """

    model_config = ConfigDict(extra="forbid")

    quiet_period_s: float | None = Field(default=None, ge=0)
    expected_instances: int | None = Field(default=None, ge=1)
    required_series: list[str] | None = None
    images_in_acquisition: bool = False
    on_association_release: bool = False


class FallbackSpec(BaseModel):
    """What happens to a study that no rule takes (default: the default pipeline)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    action: Literal["process", "discard"] = "process"
    reason: str | None = None
    pipeline: str | None = Field(default=None, max_length=128)
    priority: PriorityClass | None = None
    destinations: list[str] = Field(default_factory=list)
    completion: Completion | None = None
    notify: list[str] = Field(default_factory=list)


class RuleSpec(FallbackSpec):
    """One rule as it is written in YAML (``pacs-agent rules import``) and sent to the API."""

    name: str = Field(max_length=128)
    when: list[str] = Field(default_factory=list)
    action: Literal["process", "discard"]  # type: ignore[assignment]  # required here
    continue_: StrictBool = Field(default=False, alias="continue")
    enabled: StrictBool = True


# The YAML/JSON keys of a rule, in the order they are written.
RULE_KEYS = (
    "name",
    "when",
    "action",
    "reason",
    "pipeline",
    "priority",
    "destinations",
    "completion",
    "notify",
    "continue",
    "enabled",
)
FALLBACK_KEYS = ("action", "reason", "pipeline", "priority", "destinations", "completion", "notify")


@dataclass(frozen=True)
class Problem:
    """Why a rule cannot be saved: the field (``when[1]``, ``completion.quiet_period_s``)."""

    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


class RuleInvalid(Exception):
    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))
        self.problems = list(problems)


class RuleNotFound(LookupError):
    pass


class RuleConflict(Exception):
    """The client's version is not the current one (a concurrent edit): HTTP 409."""


@dataclass(frozen=True)
class Catalog:
    """What a rule may name: pipelines, result destinations, notification channels."""

    pipelines: frozenset[str]
    destinations: frozenset[str]
    notify: frozenset[str]


def load_catalog(s: Session, default_pipeline: str) -> Catalog:
    pipelines = frozenset(s.scalars(select(Pipeline.name)))
    rows = s.execute(select(Destination.name, Destination.purpose)).all()
    return Catalog(
        pipelines=pipelines or frozenset({default_pipeline}),
        destinations=frozenset(n for n, p in rows if p == "destination"),
        notify=frozenset(n for n, p in rows if p == "notify"),
    )


# Conditions ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2048)
def _compile(expr: str) -> tuple[Any, str | None]:
    """The compiled program of a condition, or None and why not (cached per expression)."""
    if not expr.strip():
        return None, "empty condition"
    if len(expr) > MAX_CONDITION:
        return None, f"longer than {MAX_CONDITION} characters"
    try:
        program = cel.compile(expr)
    except Exception as exc:  # ValueError on a syntax error
        return None, f"does not compile: {exc}"
    bound = set(_BOUND_RE.findall(expr))
    unknown = sorted(set(program.variables()) - set(VARIABLES) - bound)
    if unknown:
        return None, (f"unknown variable {unknown[0]!r} (the variables are {', '.join(VARIABLES)})")
    bad = sorted(
        f
        for f in program.functions()
        if f[:1] not in ("_", "@", "!") and f not in _CEL_NATIVE | _EXTENSION_FUNCTIONS
    )
    if bad:
        return None, f"unknown function {bad[0]!r}"
    return program, None


def check_condition(expr: object) -> str | None:
    """Why a condition cannot be saved, or None when it is fine."""
    if not isinstance(expr, str):
        return "a condition is a string of CEL"
    return _compile(expr)[1]


@dataclass(frozen=True)
class ConditionResult:
    expr: str
    result: bool | None  # None: could not be evaluated
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"expr": self.expr, "result": self.result, "reason": self.reason}


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def evaluate_condition(expr: str, ctx: Any, values: dict[str, Any]) -> ConditionResult:
    program, why = _compile(expr)
    if program is None:
        return ConditionResult(expr, None, why)
    try:
        out = program.execute(ctx)
    except KeyError as exc:
        key = exc.args[0] if exc.args else "?"
        return ConditionResult(
            expr, False, f"attribute {key!r} is not present (a missing attribute reads as false)"
        )
    except Exception as exc:  # TypeError, RuntimeError (bad regex, undefined), ...
        unknown = [v for v in program.variables() if v in values and values[v] is None]
        if unknown:
            return ConditionResult(expr, None, f"{unknown[0]} is unknown for this instance")
        return ConditionResult(expr, None, f"cannot be evaluated: {_first_line(exc)}")
    if not isinstance(out, bool):
        return ConditionResult(expr, None, f"gives a {type(out).__name__} value, not true or false")
    return ConditionResult(expr, out)


# Instance variables ----------------------------------------------------------------------------


def _number(value: Any, vr: str) -> Any:
    if value is None or value == "":
        return None
    try:
        return int(value) if vr in _INT_VRS else float(value)
    except (TypeError, ValueError):
        return _text(value)


def _text(value: Any) -> str:
    """A value as text CEL can take (undecodable characters replaced)."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def tags_of(ds: Dataset) -> dict[str, Any]:
    """Every keyword of the dataset's top level: text as strings (lists when multi-valued),
    numbers for numeric VRs; sequences, binary values and private tags are left out."""
    out: dict[str, Any] = {}
    for elem in ds:  # top level only
        try:
            keyword = elem.keyword
            vr = str(elem.VR)
            if not keyword or vr in _BINARY_VRS or "or" in vr:
                continue
            value = elem.value
            if vr in _INT_VRS or vr in _FLOAT_VRS:
                if isinstance(value, (list, MultiValue)):
                    out[keyword] = [_number(v, vr) for v in value]
                else:
                    out[keyword] = _number(value, vr)
            elif isinstance(value, (list, MultiValue)):
                out[keyword] = [_text(v) for v in value]
            elif isinstance(value, bytes):
                continue
            else:
                out[keyword] = "" if value is None else _text(value)
        except Exception:  # an unreadable value is left out, never fatal
            continue
    return out


_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT = {"D": 1 / 365.2425, "W": 7 / 365.2425, "M": 1 / 12, "Y": 1.0}


def _date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except (TypeError, ValueError):
        return None


def patient_age_years(tags: dict[str, Any]) -> float | None:
    """From Patient's Age (``045Y``, ``006M``, ``003W``, ``010D``), else from the birth date and
    the study (or series, acquisition, content) date; None when neither says."""
    m = _AGE_RE.match(str(tags.get("PatientAge") or ""))
    if m:
        return round(int(m.group(1)) * _AGE_UNIT[m.group(2).upper()], 3)
    born = _date(tags.get("PatientBirthDate"))
    if born is None:
        return None
    for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        at = _date(tags.get(key))
        if at is not None and at >= born:
            return round((at - born).days / 365.2425, 3)
    return None


class HeaderCache:
    """A small LRU of instance headers as ``tags`` maps, keyed by SOP Instance UID and sha256
    (a re-sent file with other content is read again)."""

    def __init__(self, maxsize: int = 2048) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def tags(self, sop_uid: str, sha256: str, path: Path) -> dict[str, Any]:
        key = (sop_uid, sha256)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        tags = tags_of(dcmread(path, stop_before_pixels=True, force=True))
        with self._lock:
            self._items[key] = tags
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return tags


HEADERS = HeaderCache()


@dataclass(frozen=True)
class StudyContext:
    """What the rules know about the study as a whole (strings are "" when unknown)."""

    source: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    sender_address: str = ""
    instance_count: int = 1
    now: dt.datetime | None = None


@dataclass
class InstanceInput:
    sop_instance_uid: str
    tags: dict[str, Any] | None  # None: the header could not be read
    error: str | None = None


def instance_variables(tags: dict[str, Any], study: StudyContext) -> dict[str, Any]:
    now = (study.now or dt.datetime.now()).astimezone()
    return {
        "tags": tags,
        "patient_age_years": patient_age_years(tags),
        "source": study.source,
        "calling_ae": study.calling_ae,
        "called_ae": study.called_ae,
        "sender_address": study.sender_address,
        "instance_count": study.instance_count,
        "now_hour": now.hour,
        "now_weekday": (now.weekday() + 1) % 7,  # 0 Sunday .. 6 Saturday, as CEL
    }


def _context(values: dict[str, Any]) -> Any:
    ctx = cel.Context()
    add_stdlib_to_context(ctx, _EXTENSIONS)
    ctx.update(values)
    return ctx


# Compiled rules and evaluation -----------------------------------------------------------------


@dataclass
class CompiledRule:
    name: str
    version: int
    spec: RuleSpec | FallbackSpec
    id: int | None = None
    error: str | None = None  # set: the rule is broken and skipped

    @property
    def when(self) -> list[str]:
        return getattr(self.spec, "when", [])

    @property
    def continue_(self) -> bool:
        return bool(getattr(self.spec, "continue_", False))


def rule_dict(row: Rule) -> dict[str, Any]:
    """A rule row in the YAML/JSON shape (every key)."""
    return {
        "name": row.name,
        "when": list(row.when or []),
        "action": row.action,
        "reason": row.reason,
        "pipeline": row.pipeline,
        "priority": row.priority,
        "destinations": list(row.destinations or []),
        "completion": row.completion,
        "notify": list(row.notify or []),
        "continue": bool(row.continue_),
        "enabled": bool(row.enabled),
    }


def compile_row(row: Rule) -> CompiledRule:
    """A rule row ready to evaluate, or marked broken (a row written by hand) with the reason."""
    data = rule_dict(row)
    spec, problems = validate_rule(data, None)
    if spec is None or problems:
        why = "; ".join(f"{p.field}: {p.reason}" for p in problems) or "invalid rule"
        return CompiledRule(row.name, row.version, _broken_spec(row), id=row.id, error=why)
    return CompiledRule(row.name, row.version, spec, id=row.id)


def _broken_spec(row: Rule) -> RuleSpec:
    return RuleSpec.model_construct(name=row.name, action="process", when=[])


def load_rules(s: Session) -> list[CompiledRule]:
    """Enabled rules in order, each compiled or marked broken."""
    rows = s.scalars(
        select(Rule).where(Rule.enabled.is_(True)).order_by(Rule.position, Rule.id)
    ).all()
    return [compile_row(r) for r in rows]


@dataclass
class Evaluation:
    matched: list[CompiledRule] = field(default_factory=list)
    broken: list[CompiledRule] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    rules: Sequence[CompiledRule], instances: Sequence[InstanceInput], study: StudyContext
) -> Evaluation:
    """Try the rules in order against the instances; first match wins unless ``continue``."""
    out = Evaluation()
    contexts: dict[int, tuple[Any, dict[str, Any]]] = {}

    def context_of(i: int) -> tuple[Any, dict[str, Any]]:
        if i not in contexts:
            values = instance_variables(instances[i].tags or {}, study)
            try:
                contexts[i] = (_context(values), values)
            except Exception:  # a value CEL cannot take: the instance is seen without tags
                values = instance_variables({}, study)
                instances[i].error = instances[i].error or "the header has values CEL cannot read"
                contexts[i] = (_context(values), values)
        return contexts[i]

    for rule in rules:
        entry: dict[str, Any] = {
            "rule": rule.name,
            "version": rule.version,
            "matched": False,
            "instances": [],
        }
        out.trace.append(entry)
        if rule.error is not None:
            entry["error"] = rule.error
            out.broken.append(rule)
            continue
        matched = False
        for i, inst in enumerate(instances):
            ctx, values = context_of(i)
            results = [evaluate_condition(expr, ctx, values) for expr in rule.when]
            if len(entry["instances"]) < TRACE_INSTANCES:
                shown: dict[str, Any] = {
                    "sop_instance_uid": inst.sop_instance_uid,
                    "conditions": [r.as_dict() for r in results],
                }
                if inst.error:
                    shown["error"] = inst.error
                entry["instances"].append(shown)
            else:
                entry["instances_not_shown"] = entry.get("instances_not_shown", 0) + 1
            if all(r.result is True for r in results):
                matched = True
                break
        entry["matched"] = matched
        if matched:
            out.matched.append(rule)
            if not rule.continue_:
                break
    return out


# Validation -----------------------------------------------------------------------------------


def field_path(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = "continue" if part == "continue_" else str(part)
            text += f".{name}" if text else name
    return text or "body"


def pydantic_problems(exc: ValidationError, prefix: str) -> list[Problem]:
    problems = []
    for err in exc.errors():
        where = field_path(err["loc"])
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required"
        else:
            reason = err["msg"]
        problems.append(Problem(join_field(prefix, where), reason))
    return problems


def join_field(prefix: str, where: str) -> str:
    if not prefix:
        return where
    if where == "body":
        return prefix
    return f"{prefix}{where}" if where.startswith("[") else f"{prefix}.{where}"


def _names_problems(
    data: dict[str, Any], key: str, known: frozenset[str], what: str, extra: Iterable[str] = ()
) -> list[Problem]:
    value = data.get(key)
    if not isinstance(value, list):
        return []
    allowed = set(known) | set(extra)
    return [
        Problem(f"{key}[{i}]", f"unknown {what} {name!r}")
        for i, name in enumerate(value)
        if isinstance(name, str) and name not in allowed
    ]


def validate_rule(
    data: Any,
    catalog: Catalog | None,
    *,
    taken: Iterable[str] = (),
    fallback: bool = False,
) -> tuple[RuleSpec | FallbackSpec | None, list[Problem]]:
    """Check a rule (or the fallback) as a whole; ``catalog`` None skips the name look-ups
    (run time). ``taken``: names other rules already have. Returns the spec or the problems."""
    if not isinstance(data, dict):
        return None, [Problem("body", "a rule is a mapping of its fields")]
    model: type[FallbackSpec] = FallbackSpec if fallback else RuleSpec
    spec: RuleSpec | FallbackSpec | None = None
    problems: list[Problem] = []
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        problems += pydantic_problems(exc, "")
    if not fallback:
        name = data.get("name")
        if isinstance(name, str):
            if not NAME_RE.match(name):
                problems.append(
                    Problem(
                        "name",
                        "1 to 128 letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit",
                    )
                )
            elif name in RESERVED_NAMES:
                problems.append(Problem("name", f"{name!r} is reserved"))
            elif name in set(taken):
                problems.append(Problem("name", f"a rule named {name!r} exists already"))
        when = data.get("when")
        if isinstance(when, list):
            for i, expr in enumerate(when):
                why = check_condition(expr)
                if why and isinstance(expr, str):
                    problems.append(Problem(f"when[{i}]", why))
    if catalog is not None:
        pipeline = data.get("pipeline")
        if isinstance(pipeline, str) and pipeline not in catalog.pipelines:
            known = ", ".join(sorted(catalog.pipelines)) or "none"
            problems.append(Problem("pipeline", f"unknown pipeline {pipeline!r} (known: {known})"))
        problems += _names_problems(
            data, "destinations", catalog.destinations, "destination", [SENDER]
        )
        problems += _names_problems(data, "notify", catalog.notify, "notification channel")
    if data.get("action") == "discard" and data.get("pipeline"):
        problems.append(Problem("pipeline", "a discard rule runs no pipeline"))
    unique: dict[str, Problem] = {}
    for p in problems:
        unique.setdefault(f"{p.field}\0{p.reason}", p)
    problems = list(unique.values())
    return (None if problems else spec), problems


def validate_rules(
    entries: Any, catalog: Catalog
) -> tuple[list[RuleSpec], FallbackSpec | None, list[Problem]]:
    """A whole rule list (YAML import, tester drafts): each rule, unique names, and an optional
    last entry named ``fallback`` (no ``when``). Problem fields are ``[i].field``."""
    if not isinstance(entries, list):
        return [], None, [Problem("body", "a YAML list of rules")]
    specs: list[RuleSpec] = []
    fallback: FallbackSpec | None = None
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        prefix = f"[{i}]"
        if isinstance(entry, dict) and entry.get("name") == FALLBACK:
            if i != len(entries) - 1:
                problems.append(Problem(f"{prefix}.name", "the fallback must be the last entry"))
                continue
            body = {k: v for k, v in entry.items() if k != "name"}
            spec, found = validate_rule(body, catalog, fallback=True)
            problems += [Problem(join_field(prefix, p.field), p.reason) for p in found]
            fallback = spec if isinstance(spec, FallbackSpec) else None
            continue
        spec, found = validate_rule(entry, catalog, taken=seen)
        problems += [Problem(join_field(prefix, p.field), p.reason) for p in found]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            seen.add(entry["name"])
        if isinstance(spec, RuleSpec):
            specs.append(spec)
    return specs, fallback, problems


# Persistence: versioned, audited ---------------------------------------------------------------


def spec_dict(spec: RuleSpec | FallbackSpec) -> dict[str, Any]:
    data = spec.model_dump(by_alias=True, mode="json")
    if spec.completion is not None:
        data["completion"] = spec.completion.model_dump(mode="json", exclude_defaults=True)
    keys = RULE_KEYS if isinstance(spec, RuleSpec) else FALLBACK_KEYS
    return {k: data.get(k) for k in keys}


def snapshot(row: Rule) -> dict[str, Any]:
    """A rule as the audit keeps it (no secrets: names only)."""
    return {**rule_dict(row), "position": row.position, "version": row.version}


def _strings(value: Any) -> list[str]:
    if isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v) for v in value]
    return [] if value is None else [json.dumps(value)]


def rule_out(row: Rule) -> dict[str, Any]:
    """A rule as the API shows it; a row written by hand with values of the wrong type is shown
    as well as it can be, with the reason it is skipped in ``error``."""

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return {
        "name": row.name,
        "when": _strings(row.when),
        "action": str(row.action),
        "reason": text(row.reason),
        "pipeline": text(row.pipeline),
        "priority": text(row.priority),
        "destinations": _strings(row.destinations),
        "completion": row.completion if isinstance(row.completion, dict) else None,
        "notify": _strings(row.notify),
        "continue": bool(row.continue_),
        "enabled": bool(row.enabled),
        "position": row.position,
        "version": row.version,
        "error": row.error or compile_row(row).error,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
        "updated_by": row.updated_by,
    }


def _apply(row: Rule, spec: RuleSpec) -> None:
    row.name = spec.name
    row.when = list(spec.when)
    row.action = spec.action
    row.reason = spec.reason
    row.pipeline = spec.pipeline
    row.priority = spec.priority
    row.destinations = list(spec.destinations)
    row.completion = spec.completion.model_dump(exclude_defaults=True) if spec.completion else None
    row.notify = list(spec.notify)
    row.continue_ = spec.continue_
    row.enabled = spec.enabled


def _values(spec: RuleSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "when": list(spec.when),
        "action": spec.action,
        "reason": spec.reason,
        "pipeline": spec.pipeline,
        "priority": spec.priority,
        "destinations": list(spec.destinations),
        "completion": (
            spec.completion.model_dump(exclude_defaults=True) if spec.completion else None
        ),
        "notify": list(spec.notify),
        "continue_": spec.continue_,
        "enabled": spec.enabled,
    }


def all_rules(s: Session) -> list[Rule]:
    return list(s.scalars(select(Rule).order_by(Rule.position, Rule.id)))


def get_rule(s: Session, name: str) -> Rule:
    row = s.scalar(select(Rule).where(Rule.name == name))
    if row is None:
        raise RuleNotFound(name)
    return row


def _guarded(s: Session, row: Rule, expected: int, actor: str, **values: Any) -> Rule:
    """Write a new version only if nobody wrote one since ``expected`` (409 otherwise)."""
    done = s.execute(  # type: ignore[attr-defined]
        update(Rule)
        .where(Rule.id == row.id, Rule.version == expected)
        .values(version=expected + 1, updated_at=utcnow(), updated_by=actor, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if done != 1:
        raise RuleConflict(f"rule {row.name!r} changed meanwhile (version {expected} is old)")
    s.refresh(row)
    return row


def _check_version(row: Rule, expected: int | None) -> int:
    if expected is None:
        raise RuleConflict("the rule's current version is required (field version or If-Match)")
    if expected != row.version:
        raise RuleConflict(
            f"rule {row.name!r} is at version {row.version}, not {expected}: reload and retry"
        )
    return expected


def create_rule(s: Session, data: Any, actor: str, catalog: Catalog) -> Rule:
    taken = set(s.scalars(select(Rule.name)))
    spec, problems = validate_rule(data, catalog, taken=taken)
    if problems or not isinstance(spec, RuleSpec):
        raise RuleInvalid(problems)
    last = max((r.position for r in all_rules(s)), default=0)
    row = Rule(position=last + 10, version=1, updated_at=utcnow(), updated_by=actor)
    _apply(row, spec)
    s.add(row)
    s.flush()
    record_audit(s, actor, "rule.create", target_type="rule", target=row.name, after=snapshot(row))
    return row


def update_rule(
    s: Session, name: str, data: Any, expected: int | None, actor: str, catalog: Catalog
) -> Rule:
    row = get_rule(s, name)
    taken = set(s.scalars(select(Rule.name).where(Rule.id != row.id)))
    spec, problems = validate_rule(data, catalog, taken=taken)
    if problems or not isinstance(spec, RuleSpec):
        raise RuleInvalid(problems)
    _check_version(row, expected)
    before = snapshot(row)
    _guarded(s, row, row.version, actor, error=None, **_values(spec))
    detail = f"renamed from {name!r}" if spec.name != name else None
    record_audit(
        s,
        actor,
        "rule.update",
        target_type="rule",
        target=row.name,
        before=before,
        after=snapshot(row),
        detail=detail,
    )
    return row


def set_enabled(s: Session, name: str, enabled: bool, expected: int | None, actor: str) -> Rule:
    row = get_rule(s, name)
    _check_version(row, expected)
    before = snapshot(row)
    _guarded(s, row, row.version, actor, enabled=enabled)
    action = "rule.enable" if enabled else "rule.disable"
    record_audit(
        s, actor, action, target_type="rule", target=name, before=before, after=snapshot(row)
    )
    return row


def delete_rule(s: Session, name: str, expected: int | None, actor: str) -> None:
    row = get_rule(s, name)
    _check_version(row, expected)
    before = snapshot(row)
    done = s.execute(  # type: ignore[attr-defined]
        delete(Rule)
        .where(Rule.id == row.id, Rule.version == row.version)
        .execution_options(synchronize_session=False)
    ).rowcount
    if done != 1:
        raise RuleConflict(f"rule {name!r} changed meanwhile")
    s.expunge(row)
    record_audit(s, actor, "rule.delete", target_type="rule", target=name, before=before)


def reorder_rules(s: Session, names: Sequence[str], actor: str) -> list[Rule]:
    rows = all_rules(s)
    current = [r.name for r in rows]
    if sorted(names) != sorted(current) or len(set(names)) != len(names):
        raise RuleInvalid(
            [Problem("names", "name every rule exactly once (" + ", ".join(current) + ")")]
        )
    by_name = {r.name: r for r in rows}
    for i, name in enumerate(names):
        row = by_name[name]
        position = (i + 1) * 10
        if row.position == position:
            continue
        before = snapshot(row)
        _guarded(s, row, row.version, actor, position=position)
        record_audit(
            s,
            actor,
            "rule.reorder",
            target_type="rule",
            target=name,
            before=before,
            after=snapshot(row),
        )
    return all_rules(s)


def get_fallback(s: Session) -> tuple[FallbackSpec, int]:
    flag = s.get(AgentFlag, FALLBACK_FLAG)
    if flag is None or not isinstance(flag.value, dict):
        return FallbackSpec(), 1
    value = dict(flag.value)
    version = int(value.pop("version", 1) or 1)
    try:
        return FallbackSpec.model_validate(value), version
    except ValidationError:
        log.warning("stored fallback rule is invalid; using the default (process)")
        return FallbackSpec(), version


def fallback_out(spec: FallbackSpec, version: int) -> dict[str, Any]:
    return {"name": FALLBACK, **spec_dict(spec), "version": version}


def put_fallback(
    s: Session, data: Any, expected: int | None, actor: str, catalog: Catalog | None
) -> tuple[FallbackSpec, int]:
    spec, problems = validate_rule(data, catalog, fallback=True)
    if problems or spec is None:
        raise RuleInvalid(problems)
    # Lock the row (PostgreSQL) so two concurrent PUTs of one version cannot both win; two first
    # inserts collide on the key (IntegrityError: the API answers 409).
    s.get(AgentFlag, FALLBACK_FLAG, with_for_update=True)
    current, version = get_fallback(s)
    if expected is None:
        raise RuleConflict("the fallback's current version is required (version or If-Match)")
    if expected != version:
        raise RuleConflict(f"the fallback is at version {version}, not {expected}")
    return _store_fallback(s, current, version, spec, actor), version + 1


def _store_fallback(
    s: Session, current: FallbackSpec, version: int, spec: FallbackSpec, actor: str
) -> FallbackSpec:
    value = {**spec.model_dump(mode="json", exclude_defaults=True), "version": version + 1}
    flag = s.get(AgentFlag, FALLBACK_FLAG)
    if flag is None:
        s.add(AgentFlag(key=FALLBACK_FLAG, value=value, updated_at=utcnow(), updated_by=actor))
        s.flush()
    else:
        flag.value = value
        flag.updated_at = utcnow()
        flag.updated_by = actor
    record_audit(
        s,
        actor,
        "rule.update",
        target_type="rule",
        target=FALLBACK,
        before={**fallback_out(current, version)},
        after={**fallback_out(spec, version + 1)},
    )
    return spec


# YAML export / import --------------------------------------------------------------------------


def _compact(entry: dict[str, Any]) -> dict[str, Any]:
    """Leave out what says nothing (defaults), so exported files read like hand-written ones."""
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if v is None or v == [] or v == {}:
            continue
        if (k == "continue" and v is False) or (k == "enabled" and v is True):
            continue
        out[k] = v
    return out


def export_entries(s: Session) -> list[dict[str, Any]]:
    entries = [_compact(rule_dict(r)) for r in all_rules(s)]
    spec, _ = get_fallback(s)
    entries.append({"name": FALLBACK, **_compact(spec_dict(spec))})
    return entries


def dump_yaml(entries: Any) -> str:
    return yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, default_flow_style=False)


def import_entries(s: Session, entries: Any, actor: str, catalog: Catalog) -> dict[str, int]:
    """Replace every rule (and the fallback) with ``entries``, validated as a whole first: if any
    entry is invalid, RuleInvalid is raised and nothing changes. Unchanged rules keep their
    version; the fallback goes back to the default when the file has none."""
    specs, fallback, problems = validate_rules(entries, catalog)
    if problems:
        raise RuleInvalid(problems)
    counts = {"created": 0, "updated": 0, "deleted": 0, "unchanged": 0}
    existing = {r.name: r for r in all_rules(s)}
    wanted = {spec.name for spec in specs}
    for name, row in existing.items():
        if name not in wanted:
            before = snapshot(row)
            s.delete(row)
            record_audit(
                s,
                actor,
                "rule.delete",
                target_type="rule",
                target=name,
                before=before,
                detail="import",
            )
            counts["deleted"] += 1
    s.flush()
    for i, spec in enumerate(specs):
        position = (i + 1) * 10
        found = existing.get(spec.name)
        if found is None:
            row = Rule(position=position, version=1, updated_at=utcnow(), updated_by=actor)
            _apply(row, spec)
            s.add(row)
            s.flush()
            record_audit(
                s,
                actor,
                "rule.create",
                target_type="rule",
                target=row.name,
                after=snapshot(row),
                detail="import",
            )
            counts["created"] += 1
            continue
        row = found
        new = {**_values(spec), "position": position}
        old = {**_values_of_row(row), "position": row.position}
        if new == old and row.error is None:
            counts["unchanged"] += 1
            continue
        before = snapshot(row)
        _guarded(s, row, row.version, actor, error=None, **new)
        record_audit(
            s,
            actor,
            "rule.update",
            target_type="rule",
            target=row.name,
            before=before,
            after=snapshot(row),
            detail="import",
        )
        counts["updated"] += 1
    current, version = get_fallback(s)
    target = fallback or FallbackSpec()
    if target.model_dump() != current.model_dump():
        _store_fallback(s, current, version, target, actor)
    return counts


def _values_of_row(row: Rule) -> dict[str, Any]:
    return {
        "name": row.name,
        "when": list(row.when or []),
        "action": row.action,
        "reason": row.reason,
        "pipeline": row.pipeline,
        "priority": row.priority,
        "destinations": list(row.destinations or []),
        "completion": row.completion or None,
        "notify": list(row.notify or []),
        "continue_": bool(row.continue_),
        "enabled": bool(row.enabled),
    }


# History ---------------------------------------------------------------------------------------


def _yaml_lines(snap: dict[str, Any] | None) -> list[str]:
    if not snap:
        return []
    body = {k: v for k, v in snap.items() if k != "version"}
    return dump_yaml(_compact(body)).splitlines(keepends=True)


def diff_text(name: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    def label(snap: dict[str, Any] | None) -> str:
        return f"{name} v{snap.get('version')}" if snap else "/dev/null"

    return "".join(
        difflib.unified_diff(
            _yaml_lines(before), _yaml_lines(after), fromfile=label(before), tofile=label(after)
        )
    )


def history(s: Session, name: str) -> list[dict[str, Any]]:
    """Every audited change of a rule (following renames back), oldest first, with a diff."""
    entries: list[AuditEntry] = []
    names: list[tuple[str, int | None]] = [(name, None)]
    seen: set[str] = set()
    while names:
        current, before_id = names.pop()
        if current in seen:
            continue
        seen.add(current)
        q = select(AuditEntry).where(AuditEntry.target_type == "rule", AuditEntry.target == current)
        if before_id is not None:
            q = q.where(AuditEntry.id < before_id)
        found = list(s.scalars(q))
        entries += found
        for e in found:
            m = re.match(r"renamed from '(.+)'$", e.detail or "")
            if m:
                names.append((m.group(1), e.id))
    entries.sort(key=lambda e: e.id)
    return [
        {
            "at": e.at.isoformat(),
            "actor": e.actor,
            "action": e.action,
            "version": (e.after or e.before or {}).get("version"),
            "detail": e.detail,
            "before": e.before,
            "after": e.after,
            "diff": diff_text((e.after or e.before or {}).get("name", name), e.before, e.after),
        }
        for e in entries
    ]


def record_rule_errors(s: Session, broken: Iterable[CompiledRule]) -> None:
    """Show a run-time failure on the rule (unless it was saved again meanwhile)."""
    for rule in broken:
        if rule.id is None or rule.error is None:
            continue
        s.execute(
            update(Rule)
            .where(Rule.id == rule.id, Rule.version == rule.version)
            .where((Rule.error.is_(None)) | (Rule.error != rule.error))
            .values(error=rule.error)
            .execution_options(synchronize_session=False)
        )
