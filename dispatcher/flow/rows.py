"""What flow control reads back: pauses, parked rows (one by one and counted by trigger),
the trigger breakers (circuit breaker and rate-limit hold) and blocked keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.validate import is_int
from dispatcher.flow.targets import _target_text

MAX_UNPARK_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Pause:
    id: int
    scope: str | None
    trigger_id: int | None
    trigger_name: str | None
    note: str | None
    paused_at: datetime

    @property
    def target(self) -> str:
        return _target_text(self.scope, self.trigger_id, self.trigger_name)


@dataclass(frozen=True, slots=True)
class ParkedRow:
    id: int
    event_id: str
    trigger_id: int
    scope: str
    trigger_name: str
    attempts: int
    parked_at: datetime
    reason: str | None
    last_error: JsonValue


@dataclass(frozen=True, slots=True)
class ParkedSummary:
    trigger_id: int
    scope: str
    trigger_name: str
    reason: str | None
    rows: int


@dataclass(frozen=True, slots=True)
class Breaker:
    """A trigger's shared flow state: its circuit breaker (``state``, ``failures``,
    ``open_until``, the half-open ``probe_id``) and, while a target's rate limit holds every
    row of the trigger, ``held_until`` (None when not held)."""

    trigger_id: int
    scope: str | None
    trigger_name: str | None
    state: str
    failures: int
    open_until: datetime | None
    probe_id: int | None
    opened_count: int
    updated_at: datetime
    held_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class BlockedKey:
    """A key of an ordered trigger whose head dead-lettered with ``on_dead_letter="block"``:
    its ``waiting`` rows run once an operator replays or discards the dead letter, or
    unblocks the key (skipping it)."""

    trigger_id: int
    key: str
    scope: str
    trigger_name: str
    dead_letter_id: int
    seq: int | None
    blocked_at: datetime
    reason: str | None
    resolution: str | None
    waiting: int


def _check_limit(limit: int) -> None:
    if not is_int(limit) or not 1 <= limit <= MAX_UNPARK_BATCH:
        raise InvalidInput("limit", limit, f"must be an integer from 1 to {MAX_UNPARK_BATCH}")
