"""The scrape-time half of :mod:`dispatcher.metrics`: the watched dispatchers' counters and
status, read in memory (never from the database) when Prometheus scrapes."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dispatcher.core.outcomes import DeadLetterReason, FailureKind
from dispatcher.runtime.stats import Phase, Stats, StatusSnapshot

NAMESPACE = "dispatcher"

# Execution outcomes: ``success`` or a failure kind. Anything else (a bug) is counted as
# ``other`` so that a label value can never come from outside this set.
OUTCOMES: tuple[str, ...] = ("success", *(kind.value for kind in FailureKind))
REASONS: tuple[str, ...] = tuple(reason.value for reason in DeadLetterReason)
OTHER = "other"


@dataclass(frozen=True, slots=True)
class _Counter:
    field: str  # the Stats field
    name: str  # without the namespace and the ``_total`` suffix
    help: str


# Every Stats field, exported under a stable name (a unit test checks none is missing).
# handled and handler_failed share one family, labelled by resolution.
_COUNTERS: tuple[_Counter, ...] = (
    _Counter("claims", "claims", "Claim statements run."),
    _Counter("claimed_rows", "claimed_rows", "Outbox rows claimed (leased)."),
    _Counter("executed", "executions_started", "Executions started (after admission)."),
    _Counter("succeeded", "completed", "Async rows completed successfully and removed."),
    _Counter("retried", "retries", "Failed attempts rescheduled with backoff (attempt used)."),
    _Counter(
        "rescheduled",
        "rescheduled",
        "Rows offered again without using an attempt (rate limited, gate saturated).",
    ),
    _Counter(
        "depth_exceeded",
        "depth_exceeded",
        "Rows stopped at the trigger depth limit (kept in depth_cutoffs).",
    ),
    _Counter(
        "gate_saturated", "gate_saturated", "Claimed rows that found the execution gate full."
    ),
    _Counter("stale", "stale_results", "Results dropped because the lease was lost (fenced)."),
    _Counter("replies", "sync_replies", "Synchronous replies delivered to a waiting caller."),
    _Counter(
        "abandoned",
        "abandoned_executions",
        "Synchronous results written to abandoned_executions (caller gone).",
    ),
    _Counter(
        "released",
        "leases_released",
        "Leases given back unexecuted (shutdown, a trigger held back by this process).",
    ),
    _Counter(
        "executions_abandoned",
        "executions_abandoned",
        "Executions that would not stop at shutdown: left running, leases left to expire.",
    ),
    _Counter("parked", "parked", "Rows parked (kept, unclaimed) instead of dead-lettered."),
    _Counter("unparked", "unparked", "Parked rows released to run again."),
    _Counter("breakers_opened", "breakers_opened", "Trigger circuit breakers opened."),
    _Counter("breakers_closed", "breakers_closed", "Trigger circuit breakers closed again."),
    _Counter(
        "budget_exceeded",
        "budget_exceeded",
        "Rows not enqueued because their root event's execution budget was spent.",
    ),
    _Counter("db_errors", "db_errors", "Database or connection errors (never handler failures)."),
    _Counter(
        "undecodable",
        "undecodable_rows",
        "Claimed rows that could not be decoded (dead-lettered as undecodable).",
    ),
    _Counter(
        "unstorable",
        "unstorable_outcomes",
        "Outcomes Postgres refused to store (their rows dead-lettered as unstorable).",
    ),
    _Counter(
        "held",
        "held_rows",
        "Claimed rows given back unrun: their trigger was held by this process (breaker "
        "tripped, rate limit, cautious window full).",
    ),
    _Counter(
        "rate_limit_holds",
        "rate_limit_holds",
        "Triggers held by a target's rate limit (all their rows, in every process).",
    ),
    _Counter(
        "retry_after_clamped",
        "retry_after_clamped",
        "Retry-After values longer than max_retry_after, cut to it.",
    ),
    _Counter(
        "internal_errors",
        "internal_errors",
        "Errors of the dispatcher's own code caught in the poll loop or an execution.",
    ),
)
_RESOLUTIONS: tuple[tuple[str, str], ...] = (
    ("handled", "handled"),
    ("handler_failed", "handler_failed"),
)

EXPORTED_STATS: frozenset[str] = frozenset(
    [c.field for c in _COUNTERS]
    + [f for f, _ in _RESOLUTIONS]
    # dispatcher_dead_letters_total{reason}: by reason, summing to dead_lettered.
    + ["dead_lettered", "dead_letters_by_reason"]
)
"""The :class:`~dispatcher.runtime.stats.Stats` fields the collector exports."""


class _Observable(Protocol):
    stats: Stats

    def status(self) -> StatusSnapshot: ...


@dataclass(frozen=True, slots=True)
class _Reading:
    status: StatusSnapshot
    dead_letters_by_reason: dict[str, int]


def _read(target: _Observable) -> _Reading:
    # A scrape runs in the HTTP server's thread while the event loop updates the counters.
    # Reading an int is atomic and dict() copies the reason counter in one C-level step, but
    # status() deep-copies the stats in Python: an insert racing it (the first dead letter
    # of a reason) can make it raise once; the next read sees the settled dictionary.
    try:
        status = target.status()
    except RuntimeError:  # "dictionary changed size during iteration"
        status = target.status()
    return _Reading(status, dict(target.stats.dead_letters_by_reason))


def _families(include: Sequence[_Reading] | None) -> Iterator[Metric]:
    """The scrape-time families; values summed over ``include`` (None: names only)."""
    readings = include or ()
    snaps = [r.status for r in readings]
    listed = include is not None
    yield from _counter_families(snaps, listed)
    yield _dead_letter_family(readings, listed)
    yield _resolution_family(snaps, listed)
    yield from _gauge_families(snaps, listed)
    yield _phase_family(snaps, listed)


def _counter_families(snaps: Sequence[StatusSnapshot], listed: bool) -> Iterator[Metric]:
    """One counter family per exported :class:`Stats` field (``_COUNTERS``)."""
    for c in _COUNTERS:
        family = CounterMetricFamily(f"{NAMESPACE}_{c.name}", c.help)
        if listed:
            family.add_metric([], sum(s.stats.get(c.field, 0) for s in snaps))
        yield family


def _dead_letter_family(readings: Sequence[_Reading], listed: bool) -> Metric:
    """``dead_letters_total{reason}``: every known reason, anything else as ``other``."""
    dead = CounterMetricFamily(
        f"{NAMESPACE}_dead_letters",
        "Rows moved to dead_letters, by reason.",
        labels=["reason"],
    )
    if listed:
        by_reason = dict.fromkeys(REASONS, 0)
        for r in readings:
            for reason, n in r.dead_letters_by_reason.items():
                label = reason if reason in by_reason else OTHER
                by_reason[label] = by_reason.get(label, 0) + n
        for reason, n in by_reason.items():
            dead.add_metric([reason], n)
    return dead


def _resolution_family(snaps: Sequence[StatusSnapshot], listed: bool) -> Metric:
    resolved = CounterMetricFamily(
        f"{NAMESPACE}_dead_letter_handler_results",
        "Dead-letter handler runs by the resolution they wrote.",
        labels=["resolution"],
    )
    if listed:
        for stat, label in _RESOLUTIONS:
            resolved.add_metric([label], sum(s.stats.get(stat, 0) for s in snaps))
    return resolved


def _gauge_families(snaps: Sequence[StatusSnapshot], listed: bool) -> Iterator[Metric]:
    """The unlabelled status gauges: executions, the gate, database health, last claim."""

    def gauge(name: str, help: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{NAMESPACE}_{name}", help)
        if listed and value is not None:
            family.add_metric([], value)
        return family

    in_flight = sum(s.in_flight for s in snaps)
    capacity = sum(s.gate_capacity for s in snaps)
    free = sum(s.gate_free for s in snaps)
    yield gauge("in_flight_executions", "Executions running now.", in_flight)
    yield gauge("gate_capacity_permits", "Execution gate permits in total.", capacity)
    yield gauge("gate_free_permits", "Execution gate permits free now.", free)
    # The names before units were added to them; kept so that existing dashboards and
    # alerts go on working (docs/operations.md: deprecated).
    yield gauge("in_flight", "Deprecated: dispatcher_in_flight_executions.", in_flight)
    yield gauge("gate_capacity", "Deprecated: dispatcher_gate_capacity_permits.", capacity)
    yield gauge("gate_free", "Deprecated: dispatcher_gate_free_permits.", free)
    yield gauge(
        "consecutive_db_failures",
        "Database errors since the last success (0 when healthy).",
        max((s.consecutive_failures for s in snaps), default=0),
    )
    claims = [s.last_claim_at.timestamp() for s in snaps if s.last_claim_at is not None]
    yield gauge(
        "last_claim_timestamp_seconds",
        "Unix time of the latest successful claim statement (absent before the first).",
        max(claims) if claims else None,
    )


def _phase_family(snaps: Sequence[StatusSnapshot], listed: bool) -> Metric:
    phase = GaugeMetricFamily(
        f"{NAMESPACE}_phase",
        "Dispatchers in each phase (1 for the current phase of a single dispatcher).",
        labels=["phase"],
    )
    if listed:
        for p in Phase:
            phase.add_metric([p.value], sum(1 for s in snaps if s.phase is p))
    return phase


class _StatusCollector:
    """Exports the watched dispatchers' counters and status; in memory, no database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[_Observable] = []

    def add(self, target: _Observable) -> None:
        with self._lock:
            if not any(w is target for w in self._watched):
                self._watched.append(target)

    def remove(self, target: _Observable) -> None:
        with self._lock:
            self._watched = [w for w in self._watched if w is not target]

    def watched(self) -> list[_Observable]:
        with self._lock:
            return list(self._watched)

    def describe(self) -> Iterable[Metric]:
        return list(_families(None))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            watched = list(self._watched)
        if not watched:
            return []
        return list(_families([_read(w) for w in watched]))
