"""Values the rest of the library passes around: operations, policies, triggers, mutations."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TypeAlias

from dispatcher.core.errors import InvalidInput
from dispatcher.core.validate import is_int, is_number

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None"
)

# Names (scopes, trigger names, namespaces, targets, principals) are identifiers an operator
# reads in logs and tables; keep them printable and bounded.
MAX_NAME_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Op(StrEnum):
    PUT = "put"
    DELETE = "delete"


class Ordering(StrEnum):
    """How a trigger's rows of one key run: ``NONE``, concurrently in any order; ``KEY``, one
    at a time in the commit order of the key's mutations."""

    NONE = "none"
    KEY = "key"


class OnDeadLetter(StrEnum):
    """What an ordered trigger does with a key whose head dead-letters: ``BLOCK`` holds the
    key's later rows until an operator replays, discards or skips it; ``SKIP`` lets them
    run."""

    BLOCK = "block"
    SKIP = "skip"


class Delivery(StrEnum):
    """``ALL``: a row per matching mutation. ``LATEST``: while a key's newest row has not
    started, a newer mutation replaces its payload instead of adding a row."""

    ALL = "all"
    LATEST = "latest"


# The longest delay (backoff, rate-limit wait, event age) the library stores: far past any
# sensible retry, and far inside what a Postgres timestamp can hold (a delay of 1e13 s
# overflows it, which would fail the whole settlement batch). Longer delays are clamped.
MAX_DELAY_SECONDS = 10 * 365 * 86_400.0


def clamp_delay(seconds: float) -> float:
    """``seconds`` within ``[0, MAX_DELAY_SECONDS]`` (NaN counts as the maximum)."""
    if not seconds >= 0.0:  # negative, or NaN
        return MAX_DELAY_SECONDS if seconds != seconds else 0.0
    return min(seconds, MAX_DELAY_SECONDS)


# Failure kinds an operator action can clear (grant the permission, deploy the target).
PARKABLE_KINDS = frozenset({"permission_denied", "target_not_found"})


class BackoffKind(StrEnum):
    EXPONENTIAL = "exponential"
    LINEAR = "linear"
    CONSTANT = "constant"


def check_name(field_name: str, value: object, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Validate an identifier-like string: non-empty, bounded, no control characters."""
    if not isinstance(value, str):
        raise InvalidInput(field_name, value, "must be a string")
    if not value:
        raise InvalidInput(field_name, value, "must not be empty")
    if len(value) > max_length:
        raise InvalidInput(field_name, value, f"must be at most {max_length} characters")
    if _CONTROL.search(value):
        raise InvalidInput(field_name, value, "must not contain control characters")
    return value


def _finite_number(field_name: str, value: object) -> float:
    if not is_number(value):
        raise InvalidInput(field_name, value, "must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(field_name, value, "must be a finite number")
    return number


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a trigger's failed executions are retried.

    Delays are in seconds. ``jitter`` is a ratio in [0, 1]: each delay is spread uniformly
    over ``delay * (1 ± jitter)``, then capped at ``max_delay``. ``max_event_age`` (seconds,
    optional) bounds an event's total age across all retries and rate-limited reschedules.

    >>> RetryPolicy(kind=BackoffKind.LINEAR, base_delay=2.0, max_attempts=3)
    RetryPolicy(kind=<BackoffKind.LINEAR: 'linear'>, base_delay=2.0, ...)
    """

    kind: BackoffKind = BackoffKind.EXPONENTIAL
    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    max_attempts: int = 5
    max_event_age: float | None = None
    # Failure kinds that park a row (kept, not claimed, until un-parked) instead of
    # dead-lettering it: those an operator can clear without changing the event.
    park_on: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        try:
            kind = BackoffKind(self.kind)
        except ValueError:
            raise InvalidInput(
                "retry.kind", self.kind, f"must be one of {[k.value for k in BackoffKind]}"
            ) from None
        object.__setattr__(self, "kind", kind)
        base = _finite_number("retry.base_delay", self.base_delay)
        if base < 0:
            raise InvalidInput("retry.base_delay", self.base_delay, "must not be negative")
        factor = _finite_number("retry.factor", self.factor)
        if factor < 0:
            raise InvalidInput("retry.factor", self.factor, "must not be negative")
        if kind is BackoffKind.EXPONENTIAL and factor < 1:
            raise InvalidInput(
                "retry.factor", self.factor, "must be at least 1 for exponential backoff"
            )
        max_delay = _finite_number("retry.max_delay", self.max_delay)
        if max_delay < 0:
            raise InvalidInput("retry.max_delay", self.max_delay, "must not be negative")
        if max_delay < base:
            raise InvalidInput(
                "retry.max_delay", self.max_delay, f"must be at least base_delay ({base})"
            )
        jitter = _finite_number("retry.jitter", self.jitter)
        if not 0.0 <= jitter <= 1.0:
            raise InvalidInput("retry.jitter", self.jitter, "must be between 0 and 1")
        if not is_int(self.max_attempts):
            raise InvalidInput("retry.max_attempts", self.max_attempts, "must be an integer")
        if self.max_attempts < 1:
            raise InvalidInput("retry.max_attempts", self.max_attempts, "must be at least 1")
        if self.max_attempts > 1000:
            raise InvalidInput("retry.max_attempts", self.max_attempts, "must be at most 1000")
        if self.max_event_age is not None:
            age = _finite_number("retry.max_event_age", self.max_event_age)
            if age <= 0:
                raise InvalidInput("retry.max_event_age", self.max_event_age, "must be positive")
            object.__setattr__(self, "max_event_age", clamp_delay(age))
        raw: object = self.park_on
        if isinstance(raw, str) or not isinstance(raw, Iterable):
            raise InvalidInput("retry.park_on", raw, "must be a collection of failure kinds")
        park_on = frozenset(str(k) for k in raw)
        unknown = park_on - PARKABLE_KINDS
        if unknown:
            raise InvalidInput(
                "retry.park_on", sorted(unknown), f"only {sorted(PARKABLE_KINDS)} can park a row"
            )
        object.__setattr__(self, "park_on", park_on)
        # Clamped, not refused: "retry for ever, at most every 1e13 s" is a valid wish that
        # Postgres cannot store; the clamp keeps its meaning.
        object.__setattr__(self, "base_delay", clamp_delay(base))
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "max_delay", clamp_delay(max_delay))
        object.__setattr__(self, "jitter", jitter)


@dataclass(frozen=True, slots=True)
class Mutation:
    """One put or delete of a key in a namespace, within a scope (a tenant or an app).

    ``value`` is the new value for a put (any JSON value), ``None`` for a delete. ``old`` is
    the value the key held before, when the writer knows it (``None``: unknown, or no value);
    handlers see it as the event's ``old``.
    ``event_id`` makes emitting idempotent: the same event id never enqueues a trigger twice.
    ``depth`` is how many trigger executions led to this mutation (0 for a user's write).

    >>> Mutation(scope="acme", namespace="users", key="users/42", op=Op.PUT, value={"n": 1})
    """

    scope: str
    namespace: str
    key: str
    op: Op
    value: JsonValue = None
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    depth: int = 0
    # The user mutation this one descends from (through handler writes); None: itself.
    root_id: uuid.UUID | None = None
    old: JsonValue = None

    def __post_init__(self) -> None:
        check_name("scope", self.scope)
        check_name("namespace", self.namespace)
        check_key("key", self.key)
        try:
            object.__setattr__(self, "op", Op(self.op))
        except ValueError:
            raise InvalidInput("op", self.op, f"must be one of {[o.value for o in Op]}") from None
        if not isinstance(self.event_id, uuid.UUID):
            raise InvalidInput("event_id", self.event_id, "must be a uuid.UUID")
        if not is_int(self.depth) or self.depth < 0:
            raise InvalidInput("depth", self.depth, "must be a non-negative integer")
        if self.root_id is not None and not isinstance(self.root_id, uuid.UUID):
            raise InvalidInput("root_id", self.root_id, "must be a uuid.UUID or None")

    @property
    def root(self) -> uuid.UUID:
        return self.root_id or self.event_id


MAX_KEY_LENGTH = 1024


def check_key(field_name: str, value: object) -> str:
    """Keys are arbitrary printable text (``%``, ``_`` and ``\\`` included), bounded."""
    return check_name(field_name, value, max_length=MAX_KEY_LENGTH)


@dataclass(frozen=True, slots=True)
class Trigger:
    """A registered trigger, as stored."""

    id: int
    scope: str
    name: str
    namespace: str
    key_pattern: str
    ops: frozenset[Op]
    target: str
    retry: RetryPolicy
    timeout: float
    enabled: bool
    is_dead_letter_handler: bool
    registered_by: str
    created_at: datetime
    updated_at: datetime
    # The condition a mutation must meet (dispatcher.core.conditions), normalised; None: all.
    condition: str | None = None
    # The top-level fields of the value and the old value delivered; None: all of them.
    fields: tuple[str, ...] | None = None
    # Per-key order and coalescing (on_dead_letter: None for an unordered trigger).
    ordering: Ordering = Ordering.NONE
    on_dead_letter: OnDeadLetter | None = None
    delivery: Delivery = Delivery.ALL
