"""``FlowControl``: the operator's flow-control actions, each one statement of
:mod:`dispatcher.sql.flow` (pauses, parked rows, circuit breakers, backlog caps)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from dispatcher.core.errors import TriggerNotFound
from dispatcher.core.models import check_key, check_name
from dispatcher.db import Connection
from dispatcher.flow.backlog_caps import DEFAULT_RECOUNT_INTERVAL, BacklogCap, check_backlog_cap
from dispatcher.flow.rows import (
    BlockedKey,
    Breaker,
    ParkedRow,
    ParkedSummary,
    Pause,
    _check_limit,
)
from dispatcher.flow.targets import (
    NoBreaker,
    NotPaused,
    TriggerRef,
    _check_target,
    _target_text,
)
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.records import from_columns
from dispatcher.sql import queries
from dispatcher.triggers import TriggerRegistry


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

    async def blocked_keys(
        self,
        conn: Connection,
        *,
        trigger: TriggerRef | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[BlockedKey]:
        """Keys of ordered triggers held by a dead head (``on_dead_letter="block"``), oldest
        first, each with its dead letter and how many rows wait behind it.

        >>> [k.key for k in await FlowControl().blocked_keys(conn, trigger=("acme", "sync"))]
        ['orders/17']
        """
        _check_limit(limit)
        if scope is not None:
            check_name("scope", scope)
        tid = None if trigger is None else await self.trigger_id(conn, trigger)
        rows = await conn.fetch(queries(self.schema).list_blocked_keys, tid, scope, limit)
        return [
            BlockedKey(
                r["trigger_id"],
                r["order_key"],
                r["scope"],
                r["trigger_name"],
                r["dead_letter_id"],
                r["key_seq"],
                r["blocked_at"],
                r["reason"],
                r["resolution"],
                int(r["waiting"]),
            )
            for r in rows
        ]

    async def unblock(self, conn: Connection, trigger: TriggerRef, key: str | None) -> int:
        """Skip the dead head of ``key`` (every blocked key of the trigger when None): the
        key's later rows run, in order; the dead letter stays as it is (replay or discard it
        apart). Returns how many keys were unblocked. Replaying or discarding the dead letter
        unblocks its key too.

        >>> await FlowControl().unblock(conn, ("acme", "sync"), "orders/17")
        1
        """
        if key is not None:
            check_key("key", key)
        tid = await self.trigger_id(conn, trigger)
        row = await conn.fetchrow(queries(self.schema).unblock_keys, tid, key)
        assert row is not None  # an aggregate query always returns one row
        return int(row["unblocked"])

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
