"""What the operator console's overview reads, narrowed to the scopes an operator may see:
backlog and lag per trigger, dead letters opened per hour, and the counts it refreshes live.

>>> [b.oldest_due_seconds for b in await backlog_by_trigger(conn, "dispatcher", None, 20)]
[12.5, None]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dispatcher.admin.filters import check_limit
from dispatcher.core.models import check_name
from dispatcher.db import Connection
from dispatcher.sql.admin import admin_queries

MAX_HOURS = 24 * 14


@dataclass(frozen=True, slots=True)
class TriggerLag:
    """A trigger's outbox rows by state (as :class:`~dispatcher.admin.OutboxCounts` counts
    them) and how long its oldest due row has waited, in seconds (None when none is due)."""

    trigger_id: int
    scope: str
    trigger_name: str
    total: int
    due_now: int
    scheduled: int
    leased: int
    parked: int
    oldest_due_seconds: float | None


@dataclass(frozen=True, slots=True)
class HourCount:
    hour: datetime
    letters: int


@dataclass(frozen=True, slots=True)
class LiveCounts:
    """The counts the console refreshes: due and parked outbox rows, dead letters needing
    action (``open``, ``handler_failed``), abandoned executions; at ``at``."""

    at: datetime
    due_now: int
    parked: int
    open: int
    handler_failed: int
    abandoned: int


def _scopes(scopes: Sequence[str] | None) -> list[str] | None:
    return None if scopes is None else [check_name("scopes", s) for s in scopes]


async def backlog_by_trigger(
    conn: Connection, schema: str, scopes: Sequence[str] | None, limit: int
) -> list[TriggerLag]:
    """The triggers with outbox rows (of ``scopes``; None: all), the most rows first."""
    check_limit("limit", limit, 1000)
    rows = await conn.fetch(admin_queries(schema).backlog_by_trigger, _scopes(scopes), limit)
    return [
        TriggerLag(
            r["trigger_id"],
            r["scope"],
            r["trigger_name"],
            r["total"],
            r["due_now"],
            r["scheduled"],
            r["leased"],
            r["parked"],
            r["oldest_due_seconds"],
        )
        for r in rows
    ]


async def dead_letters_per_hour(
    conn: Connection, schema: str, scopes: Sequence[str] | None, hours: int, now: datetime
) -> list[HourCount]:
    """Dead letters opened in each of the last ``hours`` hours up to ``now`` (the database
    clock, e.g. :attr:`LiveCounts.at`), oldest first, hours without any included as zero."""
    check_limit("hours", hours, MAX_HOURS)
    rows = await conn.fetch(admin_queries(schema).dead_letters_per_hour, _scopes(scopes), hours)
    counts = {r["hour"]: r["letters"] for r in rows}
    top = now.replace(minute=0, second=0, microsecond=0)
    slots = [top - timedelta(hours=n) for n in range(hours - 1, -1, -1)]
    return [HourCount(h, counts.get(h, 0)) for h in slots]


async def live_counts(conn: Connection, schema: str, scopes: Sequence[str] | None) -> LiveCounts:
    r = await conn.fetchrow(admin_queries(schema).console_counts, _scopes(scopes))
    assert r is not None  # FROM c: always one row
    return LiveCounts(
        r["now"], r["due_now"], r["parked"], r["open"], r["handler_failed"], r["abandoned"]
    )
