"""Priority classes: the one convention for how urgent a study or job is.

Four classes, most urgent first: ``stat``, ``urgent``, ``routine``, ``offpeak``. They are mapped
once, here, onto the broker's numbers. Celery's Redis transport serves the *lowest* number first
(kombu pops its per-priority lists in ascending order), so ``stat`` is 0 and ``offpeak`` 9.
Nothing else in the code base may compare priority numbers by hand: use ``rank``/``more_urgent``.

A study's class comes from, in order: the routing rule that took it; otherwise what the study
says (Requested Procedure Priority (0040,1003) ``STAT`` or ``HIGH``, or a calling AE named in
``PACS_AGENT_STAT_CALLING_AES``); otherwise ``routine``. After inference the AI triage level
(routine / urgent / critical) can raise it, never lower it: ``escalate``.
"""

from __future__ import annotations

from typing import Literal, get_args

PriorityClass = Literal["stat", "urgent", "routine", "offpeak"]
TriageLevel = Literal["routine", "urgent", "critical"]

CLASSES: tuple[PriorityClass, ...] = get_args(PriorityClass)
LEVELS: tuple[TriageLevel, ...] = get_args(TriageLevel)

# Celery on Redis: 0 is served first (priority_steps 0..9).
BROKER_NUMBER: dict[str, int] = {"stat": 0, "urgent": 3, "routine": 6, "offpeak": 9}
DEFAULT_CLASS: PriorityClass = "routine"

# Requested Procedure Priority (0040,1003) values and what they mean here. ROUTINE, MEDIUM and
# LOW say nothing that would move a study ahead, so they leave the class unset.
_REQUESTED: dict[str, PriorityClass] = {"STAT": "stat", "HIGH": "urgent"}


def is_class(value: object) -> bool:
    return isinstance(value, str) and value in BROKER_NUMBER


def broker_number(cls: str | None) -> int:
    """The broker priority for a class (unknown or None: routine)."""
    return BROKER_NUMBER.get(cls or DEFAULT_CLASS, BROKER_NUMBER[DEFAULT_CLASS])


def rank(cls: str | None) -> int:
    """Smaller is more urgent (the broker's order)."""
    return broker_number(cls)


def more_urgent(a: str | None, b: str | None) -> str:
    """The more urgent of two classes (None counts as routine)."""
    a = a or DEFAULT_CLASS
    b = b or DEFAULT_CLASS
    return a if rank(a) <= rank(b) else b


def from_requested_priority(value: object) -> PriorityClass | None:
    """Map a Requested Procedure Priority value (case-insensitive) to a class, or None."""
    if value is None:
        return None
    return _REQUESTED.get(str(value).strip().upper())


def escalate(incoming: str | None, level: str | None) -> str:
    """The study's class after the AI result: a ``critical`` result makes it ``stat``, an
    ``urgent`` one at least ``urgent``; a ``routine`` result never lowers what it came with."""
    base = incoming or DEFAULT_CLASS
    if level == "critical":
        return "stat"
    if level == "urgent":
        return more_urgent(base, "urgent")
    return base
