"""Flow control an operator drives: pause and resume, parked rows, circuit breakers, backlog
caps.

Pauses and breakers live in Postgres, so every dispatcher process honours them. Nothing is
dropped: paused, held and parked rows stay in the outbox with their attempt counts. A backlog
cap refuses new rows for a scope (every producer's emit raises
:class:`~dispatcher.BacklogFull`) while the scope's pending rows are at the cap; it never
touches rows already queued.

>>> flow = FlowControl()
>>> await flow.pause(conn, scope="acme", note="upstream maintenance")
>>> await flow.resume(conn, scope="acme")
>>> await flow.unpark(conn, trigger_id=7, limit=500)
>>> await flow.set_backlog_cap(conn, "acme", 50_000)

An operator names a trigger by id or as ``SCOPE/NAME``: :func:`parse_trigger_ref` reads that,
:meth:`FlowControl.trigger_id` resolves it.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerNotFound
from dispatcher.core.models import JsonValue, check_name
from dispatcher.core.validate import is_int, is_number
from dispatcher.db import Connection
from dispatcher.names import DEFAULT_SCHEMA, MAX_RECOUNT_INTERVAL
from dispatcher.records import from_columns
from dispatcher.sql import queries
from dispatcher.triggers import TriggerRegistry

MAX_UNPARK_BATCH = 10_000
# The largest backlog cap (the column is a bigint).
MAX_BACKLOG_CAP = 2**63 - 1
DEFAULT_RECOUNT_INTERVAL = 1.0

# A trigger as an operator names it: its id, or (scope, name).
TriggerRef: TypeAlias = int | tuple[str, str]

_BIGINT_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")


class NotPaused(DispatcherError, LookupError):
    """:meth:`FlowControl.resume_target` found no pause on its target."""


class NoBreaker(DispatcherError, LookupError):
    """:meth:`FlowControl.reset_breaker_of` found no breaker for the trigger."""


def parse_trigger_ref(text: str) -> TriggerRef:
    """A trigger id (``7``) or ``SCOPE/NAME`` (split at the first ``/``).

    >>> parse_trigger_ref("acme/welcome")
    ('acme', 'welcome')
    """
    stripped = text.strip()
    if _DIGITS.fullmatch(stripped):
        # Length first: int() of thousands of digits raises, and no id has over 19.
        if len(stripped.lstrip("0")) <= 19 and 1 <= int(stripped) <= _BIGINT_MAX:
            return int(stripped)
    else:
        scope, _, name = stripped.partition("/")
        if scope and name:
            return scope, name
    raise InvalidInput(
        "trigger", text, "expected a trigger id (e.g. 7) or SCOPE/NAME (e.g. acme/welcome)"
    )


def _target_text(scope: str | None, trigger_id: int | None, trigger_name: str | None) -> str:
    if trigger_id is not None:
        return f"trigger {trigger_id}" + (f" ({trigger_name})" if trigger_name else "")
    if scope is not None:
        return f"scope {scope}"
    return "everything"


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
class BacklogCap:
    """A scope's cap on its pending outbox rows.

    ``pending`` is the scope's rows as counted at ``counted_at`` (None: not counted yet);
    an emit counts again once that is older than ``recount_interval`` seconds, and so do
    the dispatchers after they settle rows. An emit is refused while ``pending`` plus its
    rows would pass ``max_pending``.
    """

    scope: str
    max_pending: int
    pending: int
    counted_at: datetime | None
    recount_interval: float
    updated_at: datetime


def check_backlog_cap(max_pending: object, recount_interval: object) -> tuple[int, float]:
    """``max_pending`` and ``recount_interval`` as a cap takes them, or
    :class:`~dispatcher.InvalidInput` naming the one out of bounds."""
    if not is_int(max_pending) or not 1 <= max_pending <= MAX_BACKLOG_CAP:
        raise InvalidInput(
            "max_pending", max_pending, f"must be an integer from 1 to {MAX_BACKLOG_CAP}"
        )
    # The comparison is false for NaN, so NaN is refused too.
    if not is_number(recount_interval) or not 0 < recount_interval <= MAX_RECOUNT_INTERVAL:
        raise InvalidInput(
            "recount_interval",
            recount_interval,
            f"must be a number of seconds above 0 and at most {MAX_RECOUNT_INTERVAL:.0f}",
        )
    return max_pending, float(recount_interval)


def parse_max_pending(text: str) -> int:
    """A backlog cap as an operator types it: a positive integer (``_`` separators allowed).

    >>> parse_max_pending("50_000")
    50000
    """
    stripped = text.strip()
    # Length first: int() of thousands of digits raises.
    if len(stripped) > 40 or not re.fullmatch(r"[0-9][0-9_]*", stripped):
        raise InvalidInput(
            "max_pending", text, f"expected an integer from 1 to {MAX_BACKLOG_CAP}, e.g. 50000"
        )
    return check_backlog_cap(int(stripped), DEFAULT_RECOUNT_INTERVAL)[0]


def parse_recount_interval(text: str) -> float:
    """A recount interval as an operator types it: seconds, a number above 0.

    >>> parse_recount_interval("0.5")
    0.5
    """
    try:
        seconds = float(text)
    except ValueError:
        raise InvalidInput(
            "recount_interval", text, "expected a number of seconds, e.g. 1 or 0.5"
        ) from None
    return check_backlog_cap(1, seconds)[1]


def _check_target(scope: str | None, trigger_id: int | None, *, everything: bool) -> None:
    if scope is not None:
        check_name("scope", scope)
    if trigger_id is not None and (not is_int(trigger_id)):
        raise InvalidInput("trigger_id", trigger_id, "must be an integer trigger id")
    if scope is not None and trigger_id is not None:
        raise InvalidInput("scope", scope, "give a scope or a trigger, not both")
    if scope is None and trigger_id is None and not everything:
        raise InvalidInput("target", None, "give a scope or a trigger (or everything=True)")


@dataclass(frozen=True, slots=True)
class FlowControl:
    schema: str = DEFAULT_SCHEMA

    async def trigger_id(self, conn: Connection, ref: TriggerRef) -> int:
        """The id of a trigger named by id (taken as it is: a deleted trigger may still have
        pauses, parked rows or a breaker) or by scope and name (looked up; unknown raises
        :class:`~dispatcher.core.errors.TriggerNotFound`).

        >>> await FlowControl().trigger_id(conn, ("acme", "welcome"))
        1
        """
        if isinstance(ref, int):
            return ref
        scope, name = ref
        return (await TriggerRegistry(self.schema).get_by_name(conn, scope, name)).id

    async def pause(
        self,
        conn: Connection,
        *,
        scope: str | None = None,
        trigger_id: int | None = None,
        everything: bool = False,
        note: str | None = None,
    ) -> Pause:
        """Hold rows of one trigger, one scope, or everything; rows keep accumulating.

        Pausing a trigger id that does not exist raises
        :class:`~dispatcher.core.errors.TriggerNotFound` (a typo would otherwise hold
        nothing, silently).
        """
        _check_target(scope, trigger_id, everything=everything)
        name = None
        if trigger_id is not None:
            name = (await TriggerRegistry(self.schema).get(conn, trigger_id)).name
        row = await conn.fetchrow(queries(self.schema).pause, scope, trigger_id, note)
        assert row is not None
        return Pause(
            row["id"], row["scope"], row["trigger_id"], name, row["note"], row["paused_at"]
        )

    async def resume(
        self,
        conn: Connection,
        *,
        scope: str | None = None,
        trigger_id: int | None = None,
        everything: bool = False,
    ) -> bool:
        """Lift the pause on exactly that target; returns whether there was one."""
        _check_target(scope, trigger_id, everything=everything)
        row = await conn.fetchrow(queries(self.schema).resume, scope, trigger_id)
        assert row is not None
        return bool(row["resumed"])

    async def resume_target(
        self,
        conn: Connection,
        *,
        scope: str | None = None,
        trigger: TriggerRef | None = None,
        everything: bool = False,
    ) -> str:
        """:meth:`resume` with the trigger named by id or (scope, name); returns what was
        resumed, worded as :attr:`Pause.target` words it. Raises :class:`NotPaused`, naming
        what is paused now, when that target was not paused.

        >>> await FlowControl().resume_target(conn, trigger=("acme", "welcome"))
        'trigger 1 (welcome)'
        """
        tid = None if trigger is None else await self.trigger_id(conn, trigger)
        target = await self._describe(conn, scope, tid, trigger)
        if await self.resume(conn, scope=scope, trigger_id=tid, everything=everything):
            return target
        active = [p.target for p in await self.pauses(conn)]
        now = f"paused now: {', '.join(active)}" if active else "nothing is paused"
        raise NotPaused(f"{target} is not paused ({now})")

    async def pauses(self, conn: Connection) -> list[Pause]:
        rows = await conn.fetch(queries(self.schema).list_pauses)
        return [
            Pause(
                r["id"], r["scope"], r["trigger_id"], r["trigger_name"], r["note"], r["paused_at"]
            )
            for r in rows
        ]

    async def parked(
        self,
        conn: Connection,
        *,
        trigger_id: int | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[ParkedRow]:
        _check_limit(limit)
        rows = await conn.fetch(queries(self.schema).list_parked, trigger_id, scope, limit)
        return [
            ParkedRow(
                r["id"],
                str(r["event_id"]),
                r["trigger_id"],
                r["scope"],
                r["trigger_name"],
                r["attempts"],
                r["parked_at"],
                r["parked_reason"],
                None if r["last_error"] is None else json.loads(r["last_error"]),
            )
            for r in rows
        ]

    async def parked_summary(self, conn: Connection) -> list[ParkedSummary]:
        rows = await conn.fetch(queries(self.schema).count_parked)
        return [
            ParkedSummary(
                r["trigger_id"], r["scope"], r["trigger_name"], r["parked_reason"], r["rows"]
            )
            for r in rows
        ]

    async def unpark(
        self,
        conn: Connection,
        *,
        trigger_id: int | None = None,
        scope: str | None = None,
        limit: int = 1000,
        dry_run: bool = False,
    ) -> int:
        """Make up to ``limit`` parked rows due again (oldest first); returns how many.

        With neither ``trigger_id`` nor ``scope``, any trigger's parked rows. ``dry_run``
        counts what would be un-parked and changes nothing.
        """
        _check_limit(limit)
        if dry_run:
            n = await conn.fetchval(queries(self.schema).count_unparkable, trigger_id, scope, limit)
            return int(n)
        row = await conn.fetchrow(queries(self.schema).unpark, trigger_id, scope, limit)
        assert row is not None
        return int(row["unparked"])

    async def breakers(self, conn: Connection) -> list[Breaker]:
        """Breakers that are open, half-open, counting failures, or holding their trigger
        for a rate limit (``held_until``)."""
        rows = await conn.fetch(queries(self.schema).list_breakers)
        return [
            Breaker(
                r["trigger_id"],
                r["scope"],
                r["trigger_name"],
                r["state"],
                r["failures"],
                r["open_until"],
                r["probe_id"],
                r["opened_count"],
                r["updated_at"],
                r["held_until"],
            )
            for r in rows
        ]

    async def reset_breaker(self, conn: Connection, trigger_id: int) -> bool:
        """Close a breaker by hand and make the rows it held due now (retries backing off
        keep their time); returns whether the trigger had a breaker."""
        row = await conn.fetchrow(queries(self.schema).reset_breaker, trigger_id)
        assert row is not None  # an aggregate query always returns one row
        return bool(row["reset"])

    async def reset_breaker_of(self, conn: Connection, trigger: TriggerRef) -> str:
        """:meth:`reset_breaker` with the trigger named by id or (scope, name); returns it,
        worded as :attr:`Pause.target` words it. Raises :class:`NoBreaker` when it has none.

        >>> await FlowControl().reset_breaker_of(conn, 2)
        'trigger 2 (crm-sync)'
        """
        tid = await self.trigger_id(conn, trigger)
        target = await self._describe(conn, None, tid, trigger)
        if not await self.reset_breaker(conn, tid):
            raise NoBreaker(f"{target} has no breaker (it never counted a failure)")
        return target

    async def set_backlog_cap(
        self,
        conn: Connection,
        scope: str,
        max_pending: int,
        *,
        recount_interval: float = DEFAULT_RECOUNT_INTERVAL,
    ) -> BacklogCap:
        """Cap the pending outbox rows of ``scope`` at ``max_pending``, or change its cap;
        its pending rows are counted now (a scan of the outbox). From then on an emit that
        would take the scope past the cap raises :class:`~dispatcher.BacklogFull` in its
        caller's transaction, and enqueues nothing; rows already queued are never dropped.

        A soft cap: the count is taken again every ``recount_interval`` seconds (by an emit
        that enqueued for the scope, or a dispatcher that settled rows), and rows enqueued
        in between are not in it (docs/guarantees.md gives the bound).

        >>> cap = await FlowControl().set_backlog_cap(conn, "acme", 50_000)
        >>> cap.pending
        1234
        """
        check_name("scope", scope)
        cap, interval = check_backlog_cap(max_pending, recount_interval)
        row = await conn.fetchrow(queries(self.schema).set_backlog_cap, scope, cap, interval)
        assert row is not None
        return from_columns(BacklogCap, row)

    async def remove_backlog_cap(self, conn: Connection, scope: str) -> bool:
        """Lift the backlog cap of ``scope``; returns whether it had one."""
        check_name("scope", scope)
        return await conn.fetchval(queries(self.schema).remove_backlog_cap, scope) is not None

    async def backlog_caps(self, conn: Connection) -> list[BacklogCap]:
        """Every backlog cap, by scope, with the pending rows as last counted."""
        rows = await conn.fetch(queries(self.schema).list_backlog_caps)
        return [from_columns(BacklogCap, r) for r in rows]

    async def _describe(
        self,
        conn: Connection,
        scope: str | None,
        trigger_id: int | None,
        ref: TriggerRef | None,
    ) -> str:
        """What an action named, worded as :attr:`Pause.target` words it."""
        name = None
        if isinstance(ref, tuple):
            name = ref[1]
        elif trigger_id is not None:
            # A deleted trigger's pause or breaker may outlive it: then it has no name.
            with contextlib.suppress(TriggerNotFound):
                name = (await TriggerRegistry(self.schema).get(conn, trigger_id)).name
        return _target_text(scope, trigger_id, name)


def _check_limit(limit: int) -> None:
    if not is_int(limit) or not 1 <= limit <= MAX_UNPARK_BATCH:
        raise InvalidInput("limit", limit, f"must be an integer from 1 to {MAX_UNPARK_BATCH}")
