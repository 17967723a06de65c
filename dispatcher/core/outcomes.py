"""What an execution returned, what a claimed row is, and what happens to it next.

``route`` (in :mod:`dispatcher.core.routing`) turns a claimed row and an execution result
into one of the ``Outcome`` values below (the runtime adds ``Release`` for rows it gives
back unrun); :mod:`dispatcher.runtime.settle` applies outcomes, fenced by the row's lease
token.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, TypeAlias

from dispatcher.core.models import JsonValue, RetryPolicy


class FailureKind(StrEnum):
    """Why an execution failed: a closed set shared by the async and the sync paths."""

    HANDLER_ERROR = "handler_error"
    TIMEOUT = "timeout"
    TARGET_NOT_FOUND = "target_not_found"
    PERMISSION_DENIED = "permission_denied"
    RATE_LIMITED = "rate_limited"
    GATE_SATURATED = "gate_saturated"
    PERMANENT = "permanent"
    # The library's own database failed under the handler (a ctx.kv write or read): not the
    # target's fault, so no attempt is used and no breaker counts it.
    UNAVAILABLE = "unavailable"


class DeadLetterReason(StrEnum):
    """Why a row became a dead letter. The failure kinds that can end a row, plus two more."""

    HANDLER_ERROR = "handler_error"
    TIMEOUT = "timeout"
    TARGET_NOT_FOUND = "target_not_found"
    PERMISSION_DENIED = "permission_denied"
    PERMANENT = "permanent"
    # The event outlived its policy's max_event_age.
    EXPIRED = "expired"
    # Its claims kept expiring without a result (the process died or hung each time).
    LEASE_EXPIRED = "lease_expired"
    # The stored row could not be read back (written by another client with values this
    # library never writes, or nested deeper than the decoder follows).
    UNDECODABLE = "undecodable"
    # Its outcome could not be written: Postgres rejected a value of it (a data error).
    UNSTORABLE = "unstorable"


class Resolution(StrEnum):
    """Lifecycle of a dead letter: ``open`` until a handler or an operator acts on it."""

    OPEN = "open"
    HANDLED = "handled"
    HANDLER_FAILED = "handler_failed"
    REPLAYED = "replayed"
    DISCARDED = "discarded"


@dataclass(frozen=True, slots=True)
class Success:
    result: JsonValue = None


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    message: str
    # Seconds to wait before the next try; only meaningful for RATE_LIMITED.
    retry_after: float | None = None


ExecutionResult: TypeAlias = Success | Failure


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One failed attempt, as kept in a row's error history (text already sanitised)."""

    attempt: int
    kind: FailureKind
    message: str


class ClaimedRow(NamedTuple):
    """An outbox row as the claim returned it: everything routing and execution need.

    A named tuple, not a dataclass: one is built for every claimed row, and a tuple is built
    in a fraction of a frozen dataclass's time (:func:`dispatcher.records.claimed_row`)."""

    id: int
    lease_token: uuid.UUID
    event_id: uuid.UUID
    trigger_id: int
    scope: str
    trigger_name: str
    target: str
    registered_by: str
    payload: JsonValue
    # Attempts consumed before this claim (failures that counted).
    attempts: int
    # Earlier claims of this row whose lease expired without any result being written.
    orphans: int
    depth: int
    reply_to: str | None
    dead_letter_id: int | None
    policy: RetryPolicy
    timeout: float
    # Seconds since the event was enqueued, by the database clock at claim time.
    age: float
    # The emitter's W3C trace context (dispatcher.tracing), when it traced.
    traceparent: str | None = None

    @property
    def idempotency_key(self) -> str:
        return f"{self.event_id}:{self.trigger_id}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Dispatcher-wide bounds that routing applies to every row."""

    max_trigger_depth: int = 8
    # Delay before a row that lost its gate permit is offered again.
    gate_retry_delay: float = 0.05
    # Rate-limited reschedules never push an event past this age, even without a policy age.
    max_rate_limited_age: float = 86_400.0
    # The longest a target's Retry-After is honoured; a longer one is cut to this.
    max_retry_after: float = 300.0


# --- Outcomes: each names one state change of the claimed row. ---


@dataclass(frozen=True, slots=True)
class Complete:
    """Async success: delete the row."""


@dataclass(frozen=True, slots=True)
class SkipDepth:
    """Depth limit hit: delete the row without executing; counted, never dead-lettered."""

    depth: int
    limit: int


@dataclass(frozen=True, slots=True)
class Retry:
    """A counted failure below max attempts: reschedule after ``delay``."""

    delay: float
    attempts: int
    error: ErrorRecord


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Offer the row again after ``delay`` without consuming an attempt."""

    delay: float
    kind: FailureKind  # GATE_SATURATED, RATE_LIMITED or UNAVAILABLE
    error: ErrorRecord | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the row to dead_letters (and enqueue the scope's dead-letter handlers)."""

    reason: DeadLetterReason
    attempts: int
    error: ErrorRecord | None


@dataclass(frozen=True, slots=True)
class Reply:
    """Sync row: delete it and hand the result to the inbox (never retried)."""

    result: ExecutionResult
    status: int


@dataclass(frozen=True, slots=True)
class ResolveDeadLetter:
    """Dead-letter-handler row: delete it and record its outcome on the original dead letter
    (any handler's failure leaves the letter ``handler_failed``, whatever the order)."""

    dead_letter_id: int
    resolution: Resolution  # HANDLED or HANDLER_FAILED
    error: str | None


@dataclass(frozen=True, slots=True)
class Park:
    """Keep the row, unclaimed and with its attempt count, until an operator action or a
    success of the same trigger un-parks it."""

    kind: FailureKind
    error: ErrorRecord


@dataclass(frozen=True, slots=True)
class Release:
    """Give the lease back without consuming an attempt: the row is due again after
    ``delay`` seconds (at once by default). Never routed; the runtime releases rows it will
    not run (shutdown, cancellation, a trigger this process holds back)."""

    delay: float = 0.0


Outcome: TypeAlias = (
    Complete
    | SkipDepth
    | Retry
    | Reschedule
    | DeadLetter
    | Reply
    | ResolveDeadLetter
    | Park
    | Release
)
