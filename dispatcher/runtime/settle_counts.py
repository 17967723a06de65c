"""Counters and log lines for outcomes once their batch has committed: one function per
transition (chosen by its ``case`` in :mod:`dispatcher.runtime.settle`), then one summary
per batch (stale results, un-parked rows, breakers that opened or closed, triggers a rate
limit now holds)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from dispatcher.core.outcomes import ClaimedRow, DeadLetter, Park, Resolution, SkipDepth
from dispatcher.runtime.stats import Stats

log = logging.getLogger("dispatcher.settle")


def succeeded(st: Stats) -> None:
    st.succeeded += 1


def retried(st: Stats) -> None:
    st.retried += 1


def rescheduled(st: Stats) -> None:
    st.rescheduled += 1


def released(st: Stats) -> None:
    st.released += 1


def replied(st: Stats) -> None:
    """Counted once delivered (``replies``) or abandoned, after the commit."""


def depth_exceeded(st: Stats, *, row: ClaimedRow, skip: SkipDepth) -> None:
    st.depth_exceeded += 1
    log.warning(
        "trigger depth limit reached; row not run (kept in depth_cutoffs)",
        extra={
            "event": "dispatcher.depth_exceeded",
            "trigger": row.trigger_name,
            "scope": row.scope,
            "depth": row.depth,
        },
    )


def parked(st: Stats, *, row: ClaimedRow, park: Park) -> None:
    st.parked += 1
    log.warning(
        "row parked",
        extra={
            "event": "dispatcher.parked",
            "trigger": row.trigger_name,
            "scope": row.scope,
            "kind": park.kind.value,
        },
    )


def dead_lettered(st: Stats, *, row: ClaimedRow, dead: DeadLetter) -> None:
    st.dead_lettered += 1
    st.dead_letters_by_reason[dead.reason.value] += 1
    log.warning(
        "row dead-lettered",
        extra={
            "event": "dispatcher.dead_lettered",
            "trigger": row.trigger_name,
            "scope": row.scope,
            "reason": dead.reason.value,
            "attempts": dead.attempts,
        },
    )


def resolved(st: Stats, *, resolution: Resolution) -> None:
    if resolution is Resolution.HANDLED:
        st.handled += 1
    else:
        st.handler_failed += 1


def batch(
    st: Stats,
    *,
    stale: int,
    unparked: int,
    breakers_opened: Sequence[int],
    breakers_closed: Sequence[int],
    holds: Mapping[int, float],
) -> None:
    st.unparked += unparked
    for trigger_id, seconds in holds.items():
        st.rate_limit_holds += 1
        log.warning(
            "target rate limited; its trigger is held in every process",
            extra={
                "event": "dispatcher.rate_limit_hold",
                "trigger_id": trigger_id,
                "seconds": round(seconds, 3),
            },
        )
    for trigger_id in breakers_opened:
        st.breakers_opened += 1
        log.warning(
            "circuit breaker opened",
            extra={"event": "dispatcher.breaker_opened", "trigger_id": trigger_id},
        )
    for trigger_id in breakers_closed:
        st.breakers_closed += 1
        log.info(
            "circuit breaker closed",
            extra={"event": "dispatcher.breaker_closed", "trigger_id": trigger_id},
        )
    if stale:
        st.stale += stale
        log.info(
            "stale results dropped (lease lost)",
            extra={"event": "dispatcher.stale", "count": stale},
        )
