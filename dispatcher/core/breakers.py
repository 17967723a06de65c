"""What feeds a trigger's circuit breaker: which outcomes count as its target failing, and
how many of them in a row a settled batch adds.

Opening and closing the breaker is decided in SQL (``Sql.breaker_failures`` and
``Sql.complete_fenced``), where concurrent processes meet; this module only decides, purely,
what each applied outcome contributes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, TypeAlias, assert_never

from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    FailureKind,
    Outcome,
    Park,
    Release,
    Reply,
    Reschedule,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
)


def is_breaker_kind(kind: FailureKind) -> bool:
    """Whether a failure of this kind says the target (not one event) is unhealthy."""
    match kind:
        case (
            FailureKind.HANDLER_ERROR
            | FailureKind.TIMEOUT
            | FailureKind.TARGET_NOT_FOUND
            | FailureKind.PERMISSION_DENIED
        ):
            return True
        case (
            # Flow control and the library's own database: not the target's fault.
            FailureKind.RATE_LIMITED
            | FailureKind.GATE_SATURATED
            | FailureKind.UNAVAILABLE
            # One event's fault: the same target may well take the next one.
            | FailureKind.PERMANENT
        ):
            return False
        case _:
            assert_never(kind)


# The same, as a set: looked up for every failure settled.
BREAKER_KINDS = frozenset(kind for kind in FailureKind if is_breaker_kind(kind))


# What one applied outcome does to its trigger's run of consecutive failures: "reset" (a
# success: the run starts again from zero, and the breaker closes, in SQL), "failure" (a
# counted failure: the run grows by one) or "none" (the run is left as it is). Literals,
# not an Enum: this is decided for every settled row, and member lookups cost.
BreakerEffect: TypeAlias = Literal["reset", "failure", "none"]


def breaker_effect(row: ClaimedRow, outcome: Outcome) -> BreakerEffect:
    """What ``outcome`` of ``row`` does to the breaker of the row's trigger.

    Only asynchronous rows feed breakers: a sync call is answered once, whatever happens,
    and a dead-letter handler's row resolves a dead letter rather than retrying.
    """
    if row.reply_to is not None or row.dead_letter_id is not None:
        return "none"
    match outcome:
        case Complete():
            return "reset"
        case Retry(error=error) | Park(error=error):
            return "failure" if error.kind in BREAKER_KINDS else "none"
        case DeadLetter(error=error):
            # No error: expired or lease_expired, which say nothing about the target.
            return "failure" if error is not None and error.kind in BREAKER_KINDS else "none"
        case SkipDepth() | Reschedule() | Release() | Reply() | ResolveDeadLetter():
            return "none"
        case _:
            assert_never(outcome)


def trailing_failures(settled: Iterable[tuple[ClaimedRow, Outcome, bool]]) -> dict[int, int]:
    """Counted failures per trigger id after that trigger's last success, for a batch of
    ``(row, outcome, applied)`` in completion order; triggers with none are left out.

    Outcomes whose write was not applied (the lease was lost) are ignored. An applied
    success has already reset its trigger's count (in the same transaction), so only the
    failures after it count: adding every failure of the batch would let 10% random
    failures in a batch of 500 open the breaker.
    """
    trailing: dict[int, int] = {}
    for row, outcome, applied in settled:
        if not applied:
            continue
        match breaker_effect(row, outcome):
            case "reset":
                trailing[row.trigger_id] = 0
            case "failure":
                trailing[row.trigger_id] = trailing.get(row.trigger_id, 0) + 1
            case "none":
                pass
            case _ as effect:
                assert_never(effect)
    return {trigger_id: n for trigger_id, n in trailing.items() if n}
