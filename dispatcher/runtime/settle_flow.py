"""What a settled batch does to its triggers' shared flow state, in the batch's transaction:
counted failures feed the circuit breakers (rows behind an open one move out of the claim's
way), and rate limits hold their whole trigger, in every process, until the Retry-After.

Which outcomes count, and for how long a trigger is held, is decided purely in
:mod:`dispatcher.core.breakers`; opening, closing and holding happen in SQL, where
concurrent processes meet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.core.breakers import rate_limit_holds, trailing_failures
from dispatcher.core.outcomes import ClaimedRow, Outcome, Release
from dispatcher.db import Connection
from dispatcher.sql import Sql

# (row, outcome, applied): one settled row, in batch order.
Settled = tuple[ClaimedRow, Outcome, bool]


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Consecutive counted failures that open a trigger's breaker (0: never), and for how
    long it stays open before one probe is let through."""

    threshold: int = 3
    cooldown: float = 60.0


async def feed_breakers(
    conn: Connection, sql: Sql, breaker: BreakerSettings, settled: Sequence[Settled]
) -> list[int]:
    """Add each trigger's trailing failures to its breaker; returns the triggers whose
    breaker this opened."""
    if breaker.threshold <= 0:
        return []
    failures = trailing_failures(settled)
    # Rows a process held back for its local view of the breaker come back unrun: behind
    # an open breaker they move to its reopen time, as its waiting rows did.
    held = {
        row.trigger_id
        for row, outcome, ok in settled
        if ok and isinstance(outcome, Release) and outcome.delay > 0
    }
    opened: list[int] = []
    if failures:
        rows = await conn.fetch(
            sql.breaker_failures,
            list(failures),
            list(failures.values()),
            breaker.threshold,
            breaker.cooldown,
        )
        held.update(r["trigger_id"] for r in rows if r["is_open"])
        opened = [r["trigger_id"] for r in rows if r["just_opened"]]
    if held:
        await conn.execute(sql.hold_behind_breaker, list(held))
    return opened


async def hold_rate_limited(
    conn: Connection, sql: Sql, settled: Sequence[Settled]
) -> dict[int, float]:
    """Hold each rate-limited trigger, in every process, for its longest Retry-After in the
    batch; returns the triggers that were not held already, with the hold's length."""
    holds = rate_limit_holds(settled)
    if not holds:
        return {}
    rows = await conn.fetch(sql.hold_rate_limited, list(holds), list(holds.values()))
    return {r["trigger_id"]: holds[r["trigger_id"]] for r in rows if r["new_hold"]}
