"""What feeds a trigger's circuit breaker: which outcomes count as its target failing, how
many of them in a row a settled batch adds, and one process's view of its triggers ahead of
the shared breaker.

Opening and closing the breaker is decided in SQL (``Sql.breaker_failures`` and
``Sql.complete_fenced``), where concurrent processes meet; this module decides, purely,
what each applied outcome contributes. The shared breaker only learns of a failure once
its settlement commits, so each process also keeps a :class:`LocalBreakers` view, fed every
outcome as it is decided, that stops it claiming and starting a failing (or rate-limited)
trigger's rows at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


def rate_limit_holds(settled: Iterable[tuple[ClaimedRow, Outcome, bool]]) -> dict[int, float]:
    """The longest Retry-After per trigger id among a batch's applied rate-limited
    reschedules: how long each trigger (not only the row that was told) is to wait."""
    holds: dict[int, float] = {}
    for row, outcome, applied in settled:
        if applied and isinstance(outcome, Reschedule) and outcome.kind is FailureKind.RATE_LIMITED:
            holds[row.trigger_id] = max(holds.get(row.trigger_id, 0.0), outcome.delay)
    return holds


@dataclass(slots=True)
class _Local:
    """What this process knows of one trigger that has given trouble."""

    # Counted failures in a row, in the order this process saw them decided.
    failures: int = 0
    # Held (the breaker tripped here) until the settler has applied this many outcomes:
    # by then the shared breaker has counted the failures, and holds the trigger itself.
    hold_mark: int = 0
    # Held until this monotonic time: the target asked to wait (a rate limit).
    held_until: float = 0.0
    # Cautious: at most this many of its rows run at once (0: no limit).
    window: int = 0


class LocalBreakers:
    """One process's view of its triggers' health, ahead of the shared breakers in SQL.

    Fed every outcome as the executor decides it (:meth:`observe`, with the outcome's
    place in the settler's queue) and every start and end of an execution, it answers the
    poller: which triggers the next claim leaves alone (:meth:`held`) and whether a claimed
    row runs (:meth:`wait`). A trigger is held

    - from its ``threshold``-th counted failure in a row until those failures are settled
      (the shared breaker has then seen them and decides for every process), and
    - after a rate limit, until its Retry-After (the shared hold is written on settling).

    A counted failure also makes the trigger cautious, like TCP after a loss: at most
    ``window`` of its rows run at once, the window halved by each failure (one row after the
    breaker trips) and doubled by each success until it reaches ``full`` again. A success
    ends the run of failures and any hold it caused. ``threshold`` 0 turns the failure
    side off (rate limits still hold). The clock is an argument: monotonic seconds.

    >>> view = LocalBreakers(threshold=3, full=400, hold_delay=0.1)
    >>> view.wait(7, now=0.0, applied=0) is None  # a trigger it knows nothing of runs
    True
    """

    def __init__(self, threshold: int, full: int, hold_delay: float) -> None:
        self._threshold = threshold
        self._full = max(1, full)
        # How long a claimed row of a tripped trigger waits before it is due again.
        self.hold_delay = hold_delay
        self._state: dict[int, _Local] = {}
        self._running: dict[int, int] = {}

    def started(self, trigger_id: int) -> None:
        self._running[trigger_id] = self._running.get(trigger_id, 0) + 1

    def ended(self, trigger_id: int) -> None:
        n = self._running.get(trigger_id, 0)
        if n <= 1:
            self._running.pop(trigger_id, None)
        else:
            self._running[trigger_id] = n - 1

    def observe(self, row: ClaimedRow, outcome: Outcome, *, seq: int, now: float) -> None:
        """``outcome`` of ``row`` was just decided; ``seq``: how many outcomes the settler
        will have applied once it has applied this one."""
        tid = row.trigger_id
        if type(outcome) is Complete and tid not in self._state:
            return  # the common case, decided for every row: a healthy trigger's success
        if isinstance(outcome, Reschedule) and outcome.kind is FailureKind.RATE_LIMITED:
            local = self._state.setdefault(tid, _Local())
            local.held_until = max(local.held_until, now + outcome.delay)
            return
        if self._threshold <= 0:
            return
        match breaker_effect(row, outcome):
            case "failure":
                local = self._state.setdefault(tid, _Local())
                local.failures += 1
                if local.failures >= self._threshold:
                    local.hold_mark = seq
                    local.window = 1
                else:
                    local.window = max(1, (local.window or self._full) // 2)
            case "reset":
                found = self._state.get(tid)
                if found is not None:
                    found.failures = found.hold_mark = 0
                    grown = found.window * 2
                    found.window = 0 if grown >= self._full else grown
            case "none":
                pass
            case _ as effect:
                assert_never(effect)

    def wait(self, trigger_id: int, *, now: float, applied: int) -> float | None:
        """None: a claimed row of this trigger may start; otherwise give it back unrun,
        due again in that many seconds. ``applied``: outcomes the settler has applied."""
        local = self._state.get(trigger_id)
        if local is None:
            return None
        if local.held_until > now:
            return local.held_until - now
        if local.hold_mark > applied:
            return self.hold_delay
        if local.window and self._running.get(trigger_id, 0) >= local.window:
            return 0.0  # its window is full: the next claim leaves it alone until one ends
        return None

    def held(self, *, now: float, applied: int) -> list[int]:
        """The triggers none of whose rows should be claimed now (forgetting the ones that
        are healthy again)."""
        held: list[int] = []
        for tid, local in list(self._state.items()):
            if self.wait(tid, now=now, applied=applied) is not None:
                held.append(tid)
            elif not local.failures and not local.window:
                del self._state[tid]
        return held
