"""Routing: which studies go to which pipeline, with which priority, and where results go.

The rules engine (CEL conditions, validation, versions) is ``pacs_agent.scheduling.rules``; this
module applies it to a study: it reads the study's instance headers from the instance store,
evaluates the rules, falls back to the fallback rule, and turns the outcome into a ``Decision``
(one ``JobPlan`` per pipeline) that ``pacs_agent.completion`` writes as jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Destination, Instance, Rule, Series, Study
from pacs_agent.destinations import reference
from pacs_agent.receiving.store import InstanceStore
from pacs_agent.scheduling.priority import more_urgent
from pacs_agent.scheduling.rules import (
    FALLBACK,
    HEADERS,
    SENDER,
    SENDER_PORT,
    CompiledRule,
    Completion,
    Evaluation,
    FallbackSpec,
    HeaderCache,
    InstanceInput,
    StudyContext,
    evaluate,
    get_fallback,
    load_rules,
    record_rule_errors,
)

log = logging.getLogger(__name__)

__all__ = ["Completion", "Decision", "JobPlan", "Router", "StudyFacts", "study_facts"]


@dataclass(frozen=True)
class StudyFacts:
    modalities: set[str]
    body_parts: set[str]
    sop_classes: set[str]
    calling_ae: str | None
    source: str
    analysable_count: int
    not_analysable_reasons: list[str]
    instance_count: int = 0
    series_descriptions: frozenset[str] = frozenset()
    # True when every acquisition that states Images in Acquisition holds that many images.
    acquisitions_complete: bool = False


@dataclass(frozen=True)
class JobPlan:
    """One job to create: a pipeline, the rule's priority class (None: the study's own or
    routine), destination and notification-channel names (empty destinations: the defaults)."""

    pipeline: str
    priority: str | None
    destinations: tuple[str, ...]
    notify: tuple[str, ...]
    rule_name: str
    rule_version: int


@dataclass(frozen=True)
class Decision:
    action: Literal["process", "skip"]
    reason: str
    jobs: tuple[JobPlan, ...] = ()
    rule_name: str | None = None  # the rule that routed the study ("fallback" for the fallback)
    rule_version: int | None = None
    discarded: bool = False
    warnings: tuple[str, ...] = ()  # broken rules that were skipped
    evaluation: Evaluation = field(default_factory=Evaluation)


def study_facts(s: Session, study: Study) -> StudyFacts:
    rows = s.execute(
        select(
            Series.modality,
            Series.body_part,
            Instance.sop_class_uid,
            Instance.analysable,
            Instance.reason,
            Series.series_instance_uid,
            Instance.acquisition_number,
            Instance.images_in_acquisition,
            Series.description,
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.study_id == study.id, Instance.study_version == study.version)
    ).all()
    counts: dict[tuple[str, int | None], int] = {}
    expected: dict[tuple[str, int | None], int] = {}
    for r in rows:
        key = (r[5], r[6])
        counts[key] = counts.get(key, 0) + 1
        if r[7]:
            expected[key] = max(expected.get(key, 0), int(r[7]))
    return StudyFacts(
        modalities={r[0] for r in rows if r[0]},
        body_parts={r[1] for r in rows if r[1]},
        sop_classes={r[2] for r in rows},
        calling_ae=study.calling_ae,
        source=study.source,
        analysable_count=sum(1 for r in rows if r[3]),
        not_analysable_reasons=sorted({r[4] for r in rows if not r[3] and r[4]}),
        instance_count=len(rows),
        series_descriptions=frozenset(r[8] for r in rows if r[8]),
        acquisitions_complete=bool(expected)
        and all(counts.get(k, 0) >= n for k, n in expected.items()),
    )


def complete_early(c: Completion, facts: StudyFacts) -> str | None:
    """The reason a study is complete before its quiet period ends, or None."""
    if c.expected_instances and facts.instance_count >= c.expected_instances:
        return f"expected count reached ({facts.instance_count})"
    if c.required_series and {x.upper() for x in c.required_series} <= {
        d.upper() for d in facts.series_descriptions
    }:
        return "required series arrived"
    if c.images_in_acquisition and facts.acquisitions_complete:
        return "Images in Acquisition reached"
    return None


def study_context(study: Study, instance_count: int) -> StudyContext:
    return StudyContext(
        source=study.source or "",
        calling_ae=study.calling_ae or "",
        called_ae=study.called_ae or "",
        sender_address=study.sender_address or "",
        instance_count=instance_count,
    )


def fallback_rule(spec: FallbackSpec, version: int) -> CompiledRule:
    return CompiledRule(FALLBACK, version, spec)


def decide_from(
    ev: Evaluation,
    fallback: CompiledRule,
    facts: StudyFacts | None,
    default_pipeline: str,
) -> Decision:
    """The decision for an evaluation: the matched rules' jobs, else the fallback's.
    ``facts`` None: do not check for analysable instances (the tester on a dropped file)."""
    warnings = tuple(f"rule '{r.name}' v{r.version} skipped: {r.error}" for r in ev.broken)
    chosen = ev.matched or [fallback]
    processing = [r for r in chosen if r.spec.action == "process"]
    if not processing:
        first = chosen[0]
        return Decision(
            "skip",
            first.spec.reason or f"discarded by rule '{first.name}'",
            rule_name=first.name,
            rule_version=first.version,
            discarded=True,
            warnings=warnings,
            evaluation=ev,
        )
    first = processing[0]
    if facts is not None and facts.analysable_count == 0:
        why = "; ".join(facts.not_analysable_reasons) or "no instances"
        return Decision(
            "skip",
            f"no analysable images ({why})",
            rule_name=first.name,
            rule_version=first.version,
            warnings=warnings,
            evaluation=ev,
        )
    plans: dict[str, JobPlan] = {}
    for r in processing:
        pipeline = r.spec.pipeline or default_pipeline
        plan = JobPlan(
            pipeline,
            r.spec.priority,
            tuple(r.spec.destinations),
            tuple(r.spec.notify),
            r.name,
            r.version,
        )
        old = plans.get(pipeline)
        if old is not None:  # one job per pipeline: both rules' destinations, the more urgent
            a, b = old.priority, plan.priority
            plan = JobPlan(
                pipeline,
                a if b is None else b if a is None else more_urgent(a, b),
                tuple(dict.fromkeys(old.destinations + plan.destinations)),
                tuple(dict.fromkeys(old.notify + plan.notify)),
                old.rule_name,
                old.rule_version,
            )
        plans[pipeline] = plan
    names = ", ".join(f"'{r.name}' v{r.version}" for r in processing)
    reason = f"rule {names}" if ev.matched else f"fallback rule v{first.version} (no rule matched)"
    return Decision(
        "process",
        reason,
        jobs=tuple(plans.values()),
        rule_name=first.name,
        rule_version=first.version,
        warnings=warnings,
        evaluation=ev,
    )


def sender_url(calling_ae: str, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"dicom://{calling_ae}@{host}:{SENDER_PORT}"


def resolve_destinations(
    s: Session, names: Sequence[str], ctx: StudyContext, defaults: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Destination names to the references a job stores (no names: ``defaults``), and warnings
    for those that cannot be resolved. ``sender`` is the Destination named after the calling AE
    if there is one, else ``dicom://CALLING_AE@sender_address:104``.

    A reference is the URL with its credentials masked (``pacs_agent.destinations.reference``):
    no secret is copied into a job row; the worker looks it up when it delivers."""
    if not names:
        return list(dict.fromkeys(reference(u) for u in defaults)), []
    rows = {
        d.name: d
        for d in s.scalars(select(Destination).where(Destination.purpose == "destination"))
    }
    urls: list[str] = []
    warnings: list[str] = []
    for name in names:
        if name == SENDER:
            row = rows.get(ctx.calling_ae) if ctx.calling_ae else None
            if row is not None and row.enabled:
                urls.append(reference(row.url))
            elif ctx.calling_ae and ctx.sender_address:
                urls.append(sender_url(ctx.calling_ae, ctx.sender_address))
            else:
                warnings.append(
                    "destination 'sender' left out: the study did not come over DIMSE "
                    "(no calling AE and address)"
                )
            continue
        row = rows.get(name)
        if row is None or not row.enabled:
            warnings.append(f"destination {name!r} left out: unknown or disabled")
            continue
        urls.append(reference(row.url))
    return list(dict.fromkeys(urls)), warnings


class Router:
    """Routing for the completion loop: reads headers (cached), evaluates, decides."""

    def __init__(
        self,
        store: InstanceStore | None,
        *,
        default_pipeline: str = "chest",
        headers: HeaderCache | None = None,
    ) -> None:
        self.store = store
        self.default_pipeline = default_pipeline
        self.headers = headers or HEADERS
        self._completion: dict[tuple[object, ...], Completion] = {}

    def instances(self, s: Session, study: Study) -> list[InstanceInput]:
        rows = s.execute(
            select(Instance.sop_instance_uid, Instance.sha256, Instance.path)
            .where(Instance.study_id == study.id, Instance.study_version == study.version)
            .order_by(Instance.id)
        ).all()
        return [self.instance(uid, sha, path) for uid, sha, path in rows]

    def instance(self, uid: str, sha256: str, relpath: str) -> InstanceInput:
        if self.store is None:
            return InstanceInput(uid, None, "the instance store is not available here")
        try:
            return InstanceInput(uid, self.headers.tags(uid, sha256, self.store.path_for(relpath)))
        except Exception as exc:
            log.warning("cannot read the header of sop=%s: %s", uid, type(exc).__name__)
            return InstanceInput(uid, None, "the instance's header could not be read")

    def evaluate(
        self, s: Session, study: Study, rules: Sequence[CompiledRule] | None = None
    ) -> Evaluation:
        instances = self.instances(s, study)
        return evaluate(
            load_rules(s) if rules is None else rules,
            instances,
            study_context(study, len(instances)),
        )

    def decide(self, s: Session, study: Study, facts: StudyFacts) -> Decision:
        """Route a complete study; broken rules get their error recorded on the rule."""
        spec, version = get_fallback(s)
        decision = decide_from(
            self.evaluate(s, study), fallback_rule(spec, version), facts, self.default_pipeline
        )
        record_rule_errors(s, decision.evaluation.broken)
        return decision

    def completion(self, s: Session, study: Study, facts: StudyFacts) -> Completion:
        """How the rule that would take this study (as it is now) says it is complete."""
        rows = s.execute(
            select(Rule.id, Rule.version, Rule.completion).where(Rule.enabled.is_(True))
        ).all()
        spec, version = get_fallback(s)
        if not any(c for _, _, c in rows) and spec.completion is None:
            return Completion()  # no rule says anything about completion: skip the headers
        key = (
            study.id,
            study.version,
            facts.instance_count,
            tuple(sorted((i, v) for i, v, _ in rows)),
            version,
        )
        hit = self._completion.get(key)
        if hit is not None:
            return hit
        ev = self.evaluate(s, study)
        chosen = ev.matched or [fallback_rule(spec, version)]
        found = next((r.spec.completion for r in chosen if r.spec.completion), None)
        result = found or Completion()
        if len(self._completion) > 1000:
            self._completion.clear()
        self._completion[key] = result
        return result
