"""Decide purely, act once: what happens to a claimed row, before and after it runs.

:func:`admit` decides whether a freshly claimed row runs at all; :func:`route` turns the
row and its execution result into one :data:`~dispatcher.core.outcomes.Outcome`. Both are
pure (the random source is an argument), so the SQL layer only applies what they return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, TypeAlias, assert_never

from dispatcher.core.models import clamp_delay
from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    ExecutionResult,
    Failure,
    FailureKind,
    Limits,
    Outcome,
    Park,
    Reply,
    Reschedule,
    Resolution,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
    Success,
)
from dispatcher.core.policy import RandomSource, backoff_delay
from dispatcher.core.sanitize import sanitize_json, sanitize_text

# A gate-saturated row is offered again after gate_retry_delay * (1 ± 50%), so the rows that
# lost the same permit do not all come back at the same instant.
GATE_JITTER = 0.5

# The shortest wait before a row rescheduled without using an attempt runs again, when the
# wait comes from the policy's backoff (a database fault under the handler, UNAVAILABLE; a
# rate limit with no usable retry-after): a policy without delays would otherwise re-run it
# as fast as the poller claims, for as long as the event's age allows (a day by default).
# Found by the property test: RateLimited(nan) under a zero-delay policy spun for its age.
UNAVAILABLE_MIN_DELAY = 0.5

SYNC_ORPHAN_MESSAGE = (
    "the lease expired before a reply was written; the execution may already have run, "
    "and a sync call runs at most once, so it is not repeated"
)
HANDLER_ORPHAN_MESSAGE = (
    "the lease expired before the dead-letter handler's result was written; "
    "a handler runs at most once, so it is not repeated"
)

# Failure kinds that end a row, each with the dead-letter reason of the same name.
_Terminal: TypeAlias = Literal[
    FailureKind.HANDLER_ERROR,
    FailureKind.TIMEOUT,
    FailureKind.TARGET_NOT_FOUND,
    FailureKind.PERMISSION_DENIED,
    FailureKind.PERMANENT,
]


def _status_of(kind: FailureKind) -> int:
    match kind:
        case FailureKind.HANDLER_ERROR:
            return 500
        case FailureKind.TIMEOUT:
            return 504
        case FailureKind.TARGET_NOT_FOUND:
            return 404
        case FailureKind.PERMISSION_DENIED:
            return 403
        case FailureKind.RATE_LIMITED:
            return 429
        case FailureKind.GATE_SATURATED:
            return 503
        case FailureKind.PERMANENT:
            return 422
        case FailureKind.UNAVAILABLE:
            return 503
        case _:
            assert_never(kind)


HTTP_STATUS: Mapping[FailureKind, int] = MappingProxyType(
    {kind: _status_of(kind) for kind in FailureKind}
)
"""The HTTP status a sync caller gets for each failure kind (the one table for the sync path)."""


def http_status(result: ExecutionResult) -> int:
    """The HTTP status a sync caller gets for ``result``: 200 on success.

    >>> http_status(Failure(FailureKind.TIMEOUT, "took too long"))
    504
    """
    match result:
        case Success():
            return 200
        case Failure(kind=kind):
            return HTTP_STATUS[kind]
        case _:
            assert_never(result)


def admit(row: ClaimedRow, limits: Limits) -> Outcome | None:
    """The outcome of a claimed row decided before it runs, or ``None`` to execute it.

    Rows past the depth limit are skipped. A sync or dead-letter-handler row whose earlier
    claim expired may already have run, so it is answered instead of run again (at most
    once). An async row that has used up its attempts (counting expired claims) or outlived
    its policy's ``max_event_age`` is dead-lettered.

    >>> admit(row, Limits()) is None  # a fresh async row runs
    True
    """
    if row.depth > limits.max_trigger_depth:
        return SkipDepth(depth=row.depth, limit=limits.max_trigger_depth)
    if row.reply_to is not None:
        if row.orphans > 0:
            failure = Failure(FailureKind.TIMEOUT, SYNC_ORPHAN_MESSAGE)
            return Reply(failure, http_status(failure))
        return None
    if row.dead_letter_id is not None:
        if row.orphans > 0:
            return ResolveDeadLetter(
                row.dead_letter_id, Resolution.HANDLER_FAILED, HANDLER_ORPHAN_MESSAGE
            )
        return None
    policy = row.policy
    if row.attempts + row.orphans >= policy.max_attempts:
        return DeadLetter(
            DeadLetterReason.LEASE_EXPIRED, attempts=row.attempts + row.orphans, error=None
        )
    if policy.max_event_age is not None and row.age >= policy.max_event_age:
        return DeadLetter(DeadLetterReason.EXPIRED, attempts=row.attempts, error=None)
    return None


def route(row: ClaimedRow, result: ExecutionResult, limits: Limits, rng: RandomSource) -> Outcome:
    """What happens to ``row`` now that it ran and produced ``result``.

    Sync rows always get a reply and dead-letter-handler rows always resolve their dead
    letter: neither is ever retried. Async rows complete on success; on failure they are
    rescheduled without consuming an attempt (gate saturated, rate limited, unavailable),
    dead-lettered at once (permanent, target not found, permission denied), or retried with
    backoff until ``max_attempts`` or ``max_event_age`` is reached (handler error, timeout).
    Delays draw from ``rng``; every message is sanitised.

    >>> route(async_row, Success(), Limits(), random.Random(1))
    Complete()
    """
    if row.depth > limits.max_trigger_depth:
        return SkipDepth(depth=row.depth, limit=limits.max_trigger_depth)
    if row.reply_to is not None:
        return Reply(_clean_result(result), http_status(result))
    if row.dead_letter_id is not None:
        match result:
            case Success():
                return ResolveDeadLetter(row.dead_letter_id, Resolution.HANDLED, None)
            case Failure(kind=kind, message=message):
                return ResolveDeadLetter(
                    row.dead_letter_id,
                    Resolution.HANDLER_FAILED,
                    sanitize_text(f"{kind.value}: {message}"),
                )
            case _:
                assert_never(result)
    match result:
        case Success():
            return Complete()
        case Failure():
            return _route_failure(row, result, limits, rng)
        case _:
            assert_never(result)


def _route_failure(row: ClaimedRow, failure: Failure, limits: Limits, rng: RandomSource) -> Outcome:
    policy = row.policy
    kind = failure.kind
    # The attempt that just failed, whether or not this kind consumes it.
    error = ErrorRecord(attempt=row.attempts + 1, kind=kind, message=sanitize_text(failure.message))
    match kind:
        case FailureKind.GATE_SATURATED:
            # The dispatcher's own back-pressure, not the target's fault: no error is kept.
            spread = 1.0 + GATE_JITTER * (2.0 * rng.random() - 1.0)
            return Reschedule(max(limits.gate_retry_delay * spread, 0.0), kind, None)
        case FailureKind.RATE_LIMITED:
            retry_after = failure.retry_after
            if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
                # Cut to the cap (a target asking for days would otherwise expire the
                # event unrun); the event-age bound below still bounds the total.
                delay = min(clamp_delay(retry_after), limits.max_retry_after)
            else:
                delay = max(backoff_delay(policy, row.attempts + 1, rng), UNAVAILABLE_MIN_DELAY)
            # Rescheduling consumes no attempt, so only the event's age bounds a target that
            # keeps rate-limiting.
            bound = (
                policy.max_event_age
                if policy.max_event_age is not None
                else limits.max_rate_limited_age
            )
            if row.age + delay > bound:
                return DeadLetter(DeadLetterReason.EXPIRED, attempts=row.attempts, error=error)
            return Reschedule(delay, kind, error)
        case FailureKind.UNAVAILABLE:
            # The dispatcher's own database failed under the handler: no attempt is used.
            # The handler may have done part of its work before the fault, so it runs again
            # no sooner than the policy would retry a failure (and never at once); only the
            # event's age bounds a database that keeps failing.
            delay = max(backoff_delay(policy, row.attempts + 1, rng), UNAVAILABLE_MIN_DELAY)
            bound = (
                policy.max_event_age
                if policy.max_event_age is not None
                else limits.max_rate_limited_age
            )
            if row.age + delay > bound:
                return DeadLetter(DeadLetterReason.EXPIRED, attempts=row.attempts, error=error)
            return Reschedule(delay, kind, error)
        case FailureKind.TARGET_NOT_FOUND | FailureKind.PERMISSION_DENIED:
            # Retrying cannot help, but deploying the target or granting the permission can:
            # the policy may park the row for that instead of dead-lettering it.
            if kind.value in policy.park_on:
                return Park(kind, error)
            return DeadLetter(_reason(kind), attempts=row.attempts + 1, error=error)
        case FailureKind.PERMANENT:
            return DeadLetter(_reason(kind), attempts=row.attempts + 1, error=error)
        case FailureKind.HANDLER_ERROR | FailureKind.TIMEOUT:
            attempts = row.attempts + 1
            # Claims that expired without a result ran the handler too (the process died or
            # hung): they count toward the budget, so the last real error is kept here
            # rather than lost to a later lease_expired dead letter.
            if attempts + row.orphans >= policy.max_attempts:
                return DeadLetter(_reason(kind), attempts=attempts + row.orphans, error=error)
            delay = backoff_delay(policy, attempts, rng)
            # A retry that could only start after the event expired would expire unseen.
            if policy.max_event_age is not None and row.age + delay >= policy.max_event_age:
                return DeadLetter(DeadLetterReason.EXPIRED, attempts=attempts, error=error)
            return Retry(delay, attempts=attempts, error=error)
        case _:
            assert_never(kind)


def retry_after_clamped(row: ClaimedRow, result: ExecutionResult, limits: Limits) -> bool:
    """Whether routing ``result`` cuts the target's Retry-After to ``max_retry_after``
    (for the runtime to log: the cut is silent otherwise)."""
    if row.reply_to is not None or row.dead_letter_id is not None:
        return False
    match result:
        case Failure(kind=FailureKind.RATE_LIMITED, retry_after=float() as retry_after):
            # Not inf or nan: those are no usable Retry-After at all (the policy's backoff).
            return math.isfinite(retry_after) and retry_after > limits.max_retry_after
        case Success() | Failure():
            return False
        case _:
            assert_never(result)


def _reason(kind: _Terminal) -> DeadLetterReason:
    match kind:
        case FailureKind.HANDLER_ERROR:
            return DeadLetterReason.HANDLER_ERROR
        case FailureKind.TIMEOUT:
            return DeadLetterReason.TIMEOUT
        case FailureKind.TARGET_NOT_FOUND:
            return DeadLetterReason.TARGET_NOT_FOUND
        case FailureKind.PERMISSION_DENIED:
            return DeadLetterReason.PERMISSION_DENIED
        case FailureKind.PERMANENT:
            return DeadLetterReason.PERMANENT
        case _:
            assert_never(kind)


def _clean_result(result: ExecutionResult) -> ExecutionResult:
    # The reply is written to Postgres as it is; a clean result comes back equal to itself.
    match result:
        case Success(result=value):
            return Success(sanitize_json(value))
        case Failure(kind=kind, message=message, retry_after=retry_after):
            return Failure(kind, sanitize_text(message), retry_after)
        case _:
            assert_never(result)
