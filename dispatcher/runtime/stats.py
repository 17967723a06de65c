"""Counters and the status snapshot of a running dispatcher."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class Phase(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    DRAINING = "draining"
    CLAIMING = "claiming"
    EXECUTING = "executing"
    BACKOFF = "backoff"
    # Outcomes are waiting to be written; claiming waits for them.
    SETTLING = "settling"
    # The poll loop caught an error of its own (not the database's) and is backing off;
    # ``StatusSnapshot.last_error`` says which.
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class Stats:
    """Monotonic counters since the dispatcher started (no ids or keys, ever)."""

    claims: int = 0
    claimed_rows: int = 0
    executed: int = 0
    succeeded: int = 0
    retried: int = 0
    rescheduled: int = 0
    dead_lettered: int = 0
    depth_exceeded: int = 0
    gate_saturated: int = 0
    stale: int = 0
    replies: int = 0
    abandoned: int = 0
    handled: int = 0
    handler_failed: int = 0
    released: int = 0
    # Executions that would not stop at shutdown: left running, their leases left to expire.
    executions_abandoned: int = 0
    parked: int = 0
    unparked: int = 0
    breakers_opened: int = 0
    breakers_closed: int = 0
    budget_exceeded: int = 0
    db_errors: int = 0
    # Claimed rows that could not be decoded (dead-lettered as undecodable).
    undecodable: int = 0
    # Outcomes Postgres refused to store (data errors): their rows dead-lettered instead.
    unstorable: int = 0
    # Claimed rows given back unrun because their trigger is held here: its breaker
    # tripped (before the shared one knew), a rate limit, or its cautious window is full.
    held: int = 0
    # Triggers a target's rate limit held (every row of the trigger, in every process).
    rate_limit_holds: int = 0
    # Retry-After values longer than max_retry_after, cut to it.
    retry_after_clamped: int = 0
    # Exceptions from the dispatcher's own code (or a component given to it) caught in the
    # poll loop or around an execution: logged with their traceback, never fatal.
    internal_errors: int = 0
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        """The scalar counters (``dead_letters_by_reason`` is separate)."""
        # getattr, not asdict: asdict deep-copies the Counter, which a metrics scrape in
        # another thread could catch mid-update.
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), int)}


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    phase: Phase
    in_flight: int
    last_error: str | None
    consecutive_failures: int
    backoff_until: datetime | None
    last_claim_at: datetime | None
    gate_capacity: int
    gate_free: int
    stats: dict[str, int]
    # time.monotonic() at the latest successful claim statement (None before the first):
    # what readiness measures, immune to wall-clock steps.
    last_claim_monotonic: float | None = None


class Recorder(Protocol):
    """Receives timings as they happen (the Prometheus extra implements it). Must not block."""

    def claim(self, seconds: float, rows: int) -> None: ...

    def execution(self, seconds: float, outcome: str) -> None:
        """``outcome`` is ``success`` or a failure kind (a closed, low-cardinality set)."""
        ...

    def backlog(self, due: int, oldest_due_seconds: float) -> None:
        """Sampled periodically by the dispatcher, so a scrape never queries the database."""
        ...

    def blocked_keys(self, count: int) -> None:
        """Keys of ordered triggers held by a dead head, sampled with the backlog."""
        ...

    def trigger_execution(self, trigger: str, outcome: str, dead_lettered: bool) -> None:
        """One execution of ``trigger`` (its name) ended in ``outcome``; ``dead_lettered``:
        its row is to be dead-lettered (decided, before the settlement commits). Names are
        not a closed set: a recorder that labels by them must cap them."""
        ...


class NullRecorder:
    def claim(self, seconds: float, rows: int) -> None:
        pass

    def execution(self, seconds: float, outcome: str) -> None:
        pass

    def backlog(self, due: int, oldest_due_seconds: float) -> None:
        pass

    def blocked_keys(self, count: int) -> None:
        pass

    def trigger_execution(self, trigger: str, outcome: str, dead_lettered: bool) -> None:
        pass
