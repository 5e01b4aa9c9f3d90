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


@dataclass(frozen=True)
class StudyFacts:
    modalities: set[str]
    body_parts: set[str]
    sop_classes: set[str]
    calling_ae: str | None
    source: str
    analysable_count: int
    not_analysable_reasons: list[str]


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
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.study_id == study.id, Instance.study_version == study.version)
    ).all()
    return StudyFacts(
        modalities={r[0] for r in rows if r[0]},
        body_parts={r[1] for r in rows if r[1]},
        sop_classes={r[2] for r in rows},
        calling_ae=study.calling_ae,
        source=study.source,
        analysable_count=sum(1 for r in rows if r[3]),
        not_analysable_reasons=sorted({r[4] for r in rows if not r[3] and r[4]}),
    )


def decide(
    rules: Sequence[Rule], facts: StudyFacts, default_destinations: Sequence[str]
) -> Decision:
    if facts.analysable_count == 0:
        why = "; ".join(facts.not_analysable_reasons) or "no instances"
        return Decision("skip", f"no analysable images ({why})")
    for rule in sorted(rules, key=lambda r: (r.priority, r.id or 0)):
        if not rule.enabled:
            continue
        conditions = RuleConditions.model_validate(rule.conditions or {})
        if not conditions.matches(facts):
            continue
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
