"""Tuning for one dispatcher process, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import MAX_DELAY_SECONDS
from dispatcher.core.outcomes import Limits
from dispatcher.core.redact import DEFAULT_REDACT_KEYS, Redactor
from dispatcher.core.validate import is_int, is_number
from dispatcher.names import DEFAULT_SCHEMA


def positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = is_number(value) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise InvalidInput(name, value, "must be a positive number")
    # Durations reach SQL interval arithmetic: past this, a timestamp overflows.
    if value > MAX_DELAY_SECONDS:
        raise InvalidInput(name, value, f"must be at most {MAX_DELAY_SECONDS:.0f} seconds")


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    """Tuning for one dispatcher process. Durations are in seconds."""

    schema: str = DEFAULT_SCHEMA
    poll_interval: float = 0.1
    # Twice the batch in permits: the next claim is already on the wire while the rows of
    # the last one execute (measured: 11.2k rows/s at 100/100, 15.3k at 200/400, no-op
    # handler, docs/benchmarks.md).
    batch_size: int = 200
    concurrency: int = 400
    lease_margin: float = 5.0
    max_trigger_depth: int = 8
    grace_period: float = 10.0
    # Past the grace period (at once on an abort), how long cancelled executions get to
    # stop. One that is still running then (its handler swallowed the cancellation, or is
    # a thread) is abandoned: its lease is left to expire, since it may still be running,
    # and its result is never written. Bounds a stop by grace_period + abandon_after.
    abandon_after: float = 2.0
    listen: bool = True
    max_error_history: int = 20
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    gate_retry_delay: float = 0.05
    max_rate_limited_age: float = 86_400.0
    # The longest Retry-After honoured (a rate-limited target asking for longer is tried
    # again after this; each time is logged as dispatcher.retry_after_clamped). The event's
    # age (max_event_age, else max_rate_limited_age) still bounds the total.
    max_retry_after: float = 300.0
    application_name: str = "dispatcher"
    pool_size: int = 4
    # How often the backlog (due rows, oldest due age) is sampled for metrics; 0 disables.
    backlog_interval: float = 5.0
    # Consecutive counted failures (handler error, timeout, target not found, permission
    # denied) of one trigger that open its circuit breaker; 0 disables breakers.
    breaker_threshold: int = 3
    breaker_cooldown: float = 60.0
    # Parked rows of a trigger released by each success of that trigger.
    unpark_batch: int = 100
    # Name fragments: the value of a key containing one never reaches dead_letters,
    # abandoned_executions or error histories (compared in lower case, '-' and '_' left out:
    # "password" covers "db_password", "api_key" covers "X-Api-Key"); the same goes for
    # key=value pairs in error text, and URL passwords are masked whenever this is not empty.
    # () turns redaction off. A replayed dead letter runs with its redacted payload: keep
    # credentials out of events.
    redact_keys: tuple[str, ...] = tuple(sorted(DEFAULT_REDACT_KEYS))
    # Rows that handler writes descending from one user mutation may enqueue, all depths
    # together: stops fan-out recursion that stays under the depth limit. None: no limit.
    max_executions_per_root: int | None = 10_000
    # How long a root's count is kept (it only matters while its tree still runs).
    root_budget_ttl: float = 86_400.0
    # How long rows stopped by the depth limit stay in depth_cutoffs.
    depth_cutoff_retention: float = 7 * 86_400.0
    # Outcomes waiting to be written beyond which the poller stops claiming (settlements
    # that stall, on locks or a slow disk, must not let memory and leases grow without
    # bound). Executions already running may still add theirs.
    max_pending_settlements: int = 2_000

    def __post_init__(self) -> None:
        for name in (
            "poll_interval",
            "lease_margin",
            "reconnect_min",
            "reconnect_max",
            "abandon_after",
        ):
            positive(name, getattr(self, name))
        for name in ("grace_period", "gate_retry_delay", "backlog_interval"):
            positive(name, getattr(self, name), allow_zero=True)
        positive("max_rate_limited_age", self.max_rate_limited_age)
        positive("max_retry_after", self.max_retry_after)
        positive("breaker_cooldown", self.breaker_cooldown)
        positive("root_budget_ttl", self.root_budget_ttl)
        positive("depth_cutoff_retention", self.depth_cutoff_retention)
        budget = self.max_executions_per_root
        if budget is not None and (not is_int(budget) or budget < 1):
            raise InvalidInput("max_executions_per_root", budget, "must be a positive int or None")
        if not isinstance(self.breaker_threshold, int) or self.breaker_threshold < 0:
            raise InvalidInput("breaker_threshold", self.breaker_threshold, "must be >= 0")
        for name in (
            "batch_size",
            "concurrency",
            "max_error_history",
            "pool_size",
            "unpark_batch",
            "max_pending_settlements",
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise InvalidInput(name, value, "must be a positive integer")
        Redactor(frozenset(self.redact_keys))  # refuses a fragment too short to be one
        if self.pool_size < 2:
            raise InvalidInput("pool_size", self.pool_size, "must be at least 2")
        if not isinstance(self.max_trigger_depth, int) or self.max_trigger_depth < 0:
            raise InvalidInput("max_trigger_depth", self.max_trigger_depth, "must be >= 0")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_trigger_depth=self.max_trigger_depth,
            gate_retry_delay=self.gate_retry_delay,
            max_rate_limited_age=self.max_rate_limited_age,
            max_retry_after=self.max_retry_after,
        )
