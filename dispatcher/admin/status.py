"""The status snapshot: backlog, lag, parked rows, dead letters, abandoned executions, pauses
and breakers, read in one statement; and the progress verdict the tables give (a second one).

>>> (await read_status(conn, "dispatcher")).outbox.due_now
0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dispatcher.core.health import DEFAULT_READY_WINDOW, Readiness, table_readiness
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.db import Connection
from dispatcher.flow import Breaker, Pause
from dispatcher.sql.admin import admin_queries
from dispatcher.sql.health import health_queries

TOP_BACKLOG = 10
# Claimable rows counted for the progress verdict, at most (the count stays cheap).
PROGRESS_COUNT_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """Outbox rows by state, and how long the oldest due row has waited (seconds).

    The states partition the outbox: ``parked`` rows (waiting for an operator or a sibling's
    success, see :class:`dispatcher.flow.FlowControl`) are in no other count.
    """

    due_now: int
    scheduled: int
    leased: int
    parked: int
    oldest_due_seconds: float | None

    @property
    def total(self) -> int:
        return self.due_now + self.scheduled + self.leased + self.parked


@dataclass(frozen=True, slots=True)
class TriggerBacklog:
    """Outbox rows waiting for one trigger (``total`` includes the ``parked`` ones)."""

    trigger_id: int
    scope: str
    trigger_name: str
    total: int
    due_now: int
    parked: int


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The state of the tables at one instant of the database clock (``at``).

    ``dead_letters_by_resolution`` has every resolution (zero when none);
    ``unresolved_by_reason`` counts the letters still needing action (open or
    handler_failed) by why they died, zeros left out. ``pauses`` are the active pauses,
    oldest first (a pause with neither scope nor trigger holds everything); ``breakers``
    are the circuit breakers open, half-open or counting failures, most recently changed
    first (as :meth:`dispatcher.flow.FlowControl.pauses` and ``breakers`` list them).
    ``progress`` is the verdict of :func:`dispatcher.core.health.table_readiness`: not
    ready when a claimable row (due, not parked, paused or held by a breaker) has waited
    longer than the window, i.e. no dispatcher claimed it.
    """

    at: datetime
    outbox: OutboxCounts
    dead_letters_by_resolution: Mapping[Resolution, int]
    unresolved_by_reason: Mapping[DeadLetterReason, int]
    top_backlog: tuple[TriggerBacklog, ...]
    abandoned_executions: int
    pauses: tuple[Pause, ...]
    breakers: tuple[Breaker, ...]
    progress: Readiness
    # Keys of ordered triggers held by a dead head (dispatcher.flow.FlowControl.blocked_keys).
    blocked_keys: int = 0


async def read_status(
    conn: Connection, schema: str, *, ready_window: float = DEFAULT_READY_WINDOW
) -> StatusReport:
    """See :meth:`dispatcher.admin.Admin.status`."""
    r = await conn.fetchrow(admin_queries(schema).status, TOP_BACKLOG)
    assert r is not None  # FROM c, ob: always exactly one row
    p = await conn.fetchrow(health_queries(schema).progress, PROGRESS_COUNT_LIMIT)
    assert p is not None  # no FROM: one row
    progress = table_readiness(
        claimable=p["claimable"],
        oldest_claimable=p["oldest_claimable_seconds"],
        window=ready_window,
    )
    by_resolution = dict.fromkeys(Resolution, 0)
    for name, n in zip(r["resolutions"], r["resolution_counts"], strict=True):
        by_resolution[Resolution(name)] = n
    return StatusReport(
        at=r["now"],
        outbox=OutboxCounts(
            due_now=r["due_now"],
            scheduled=r["scheduled"],
            leased=r["leased"],
            parked=r["parked"],
            oldest_due_seconds=r["oldest_due_seconds"],
        ),
        dead_letters_by_resolution=by_resolution,
        unresolved_by_reason={
            DeadLetterReason(name): n
            for name, n in zip(r["reasons"], r["reason_counts"], strict=True)
        },
        top_backlog=tuple(
            TriggerBacklog(
                trigger_id=t, scope=s, trigger_name=n, total=total, due_now=due, parked=pk
            )
            for t, s, n, total, due, pk in zip(
                r["top_trigger_ids"],
                r["top_scopes"],
                r["top_names"],
                r["top_totals"],
                r["top_due"],
                r["top_parked"],
                strict=True,
            )
        ),
        abandoned_executions=r["abandoned"],
        pauses=tuple(Pause(*p) for p in r["pauses"]),
        breakers=tuple(Breaker(*b) for b in r["breakers"]),
        progress=progress,
        blocked_keys=r["blocked_keys"],
    )
