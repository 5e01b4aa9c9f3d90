"""Which queued job a worker takes next: pure functions over candidates, no database.

The database is the queue of record and a broker message only wakes a worker up; the worker then
claims the most urgent job of the message's pipeline, which need not be the message's own job.
"Most urgent" is the *effective rank*: the class's broker number (stat 0, urgent 3, routine 6,
offpeak 9) minus three per ``priority_aging_s`` waited, so that a routine job gains one class per
aging period and is never starved by a steady stream of urgent work. Offpeak work is taken only
inside the offpeak window; a worker on the reserved ``urgent`` lane takes only stat and urgent
jobs. A batch shares one model pass: it is the head job plus queued jobs of the head's class, and
a stat job runs alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pacs_agent.scheduling import priority

# One class step in broker numbers (stat 0, urgent 3, routine 6, offpeak 9).
CLASS_STEP = 3
URGENT_LANE_CLASSES = frozenset({"stat", "urgent"})
LANES = ("all", "urgent")


@dataclass(frozen=True)
class Candidate:
    """A job that may be claimed: queued, or running with an expired lease."""

    job_id: int
    priority_class: str
    queued_at: dt.datetime  # when it was sent to the broker (or created)


def parse_window(window: str) -> tuple[dt.time, dt.time]:
    """``"HH:MM-HH:MM"`` (local time; may wrap past midnight) -> (start, end)."""
    try:
        start_s, end_s = (p.strip() for p in window.split("-", 1))
        start = dt.time.fromisoformat(start_s)
        end = dt.time.fromisoformat(end_s)
    except ValueError as exc:
        raise ValueError(f"offpeak window must be HH:MM-HH:MM, got {window!r}") from exc
    return start, end


def in_window(window: str, now: dt.datetime | dt.time) -> bool:
    """Whether ``now`` (local wall-clock time) falls in ``window``; start included, end not.
    A window whose end is before its start wraps past midnight (``20:00-06:00``); an empty
    window (start == end) is always open."""
    start, end = parse_window(window)
    t = now.time() if isinstance(now, dt.datetime) else now
    t = t.replace(tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= t < end
    return t >= start or t < end


def offpeak_open(window: str, now: dt.datetime | None = None) -> bool:
    """Whether offpeak work may run now (local time of this host)."""
    return in_window(window, now or dt.datetime.now())


def effective_rank(priority_class: str, waited_s: float, aging_s: float) -> float:
    """Smaller runs first: the broker number less one class per ``aging_s`` waited."""
    base = priority.broker_number(priority_class)
    if aging_s <= 0:
        return float(base)
    return base - max(waited_s, 0.0) / aging_s * CLASS_STEP


def claimable(c: Candidate, *, lane: str, offpeak_is_open: bool) -> bool:
    if lane == "urgent" and c.priority_class not in URGENT_LANE_CLASSES:
        return False
    if c.priority_class == "offpeak" and not offpeak_is_open:
        return False
    return True


def order(
    candidates: Iterable[Candidate],
    *,
    now: dt.datetime,
    aging_s: float,
    lane: str = "all",
    offpeak_is_open: bool = True,
) -> list[Candidate]:
    """The claimable candidates, most urgent first (ties: the one that waited longest)."""
    keep = [c for c in candidates if claimable(c, lane=lane, offpeak_is_open=offpeak_is_open)]
    return sorted(
        keep,
        key=lambda c: (
            effective_rank(c.priority_class, (now - c.queued_at).total_seconds(), aging_s),
            c.queued_at,
            c.job_id,
        ),
    )


def batch(ordered: Sequence[Candidate], size: int) -> list[Candidate]:
    """The head job and up to ``size - 1`` more of its class, in order; a stat job runs alone."""
    if not ordered:
        return []
    head = ordered[0]
    if head.priority_class == "stat" or size <= 1:
        return [head]
    same = [c for c in ordered[1:] if c.priority_class == head.priority_class]
    return [head, *same[: size - 1]]
