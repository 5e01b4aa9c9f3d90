"""Routing rules: which studies go to which pipeline, with which priority, and where results go.

Conditions are typed data, evaluated field by field; no user text is ever evaluated as code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Instance, Rule, Series, Study

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "default"


class RuleConditions(BaseModel):
    """All given conditions must hold (AND); each list matches any of its values (OR)."""

    model_config = ConfigDict(extra="forbid")

    modalities: list[str] | None = None
    body_parts: list[str] | None = None
    calling_aes: list[str] | None = None
    sop_classes: list[str] | None = None
    sources: list[Literal["dimse", "orthanc", "stow"]] | None = None

    def matches(self, facts: StudyFacts) -> bool:
        def any_in(wanted: list[str] | None, have: set[str]) -> bool:
            if wanted is None:
                return True
            w = {x.upper() for x in wanted}
            return bool(w & {h.upper() for h in have})

        return (
            any_in(self.modalities, facts.modalities)
            and any_in(self.body_parts, facts.body_parts)
            and any_in(self.calling_aes, {facts.calling_ae} if facts.calling_ae else set())
            and any_in(self.sop_classes, facts.sop_classes)
            and any_in(self.sources, {facts.source})  # type: ignore[arg-type]
        )


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

    quiet_period_s: float | None = None
    expected_instances: int | None = None
    required_series: list[str] | None = None
    images_in_acquisition: bool = False
    on_association_release: bool = False


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
class Decision:
    action: Literal["process", "skip"]
    reason: str
    pipeline: str = DEFAULT_PIPELINE
    priority: int = 5
    destinations: tuple[str, ...] = ()
    rule_name: str | None = None


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


def matching_rule(rules: Sequence[Rule], facts: StudyFacts) -> Rule | None:
    for rule in sorted(rules, key=lambda r: (r.priority, r.id or 0)):
        if rule.enabled and RuleConditions.model_validate(rule.conditions or {}).matches(facts):
            return rule
    return None


def completion_for(rule: Rule | None) -> Completion:
    return Completion.model_validate((rule.completion if rule else None) or {})


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


def decide(
    rules: Sequence[Rule], facts: StudyFacts, default_destinations: Sequence[str]
) -> Decision:
    if facts.analysable_count == 0:
        why = "; ".join(facts.not_analysable_reasons) or "no instances"
        return Decision("skip", f"no analysable images ({why})")
    rule = matching_rule(rules, facts)
    if rule is not None:
        if rule.action == "skip":
            return Decision("skip", f"rule '{rule.name}' skips it", rule_name=rule.name)
        return Decision(
            "process",
            f"rule '{rule.name}'",
            pipeline=rule.pipeline or DEFAULT_PIPELINE,
            priority=rule.triage_priority,
            destinations=tuple(rule.destinations or default_destinations),
            rule_name=rule.name,
        )
    if rules:
        return Decision("skip", "no routing rule matched")
    return Decision(
        "process",
        "default pipeline (no rules configured)",
        destinations=tuple(default_destinations),
    )
