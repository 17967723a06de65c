"""Apply routed outcomes in SQL: batched per statement, one transaction per batch, every
write fenced by the row id and the claim's lease token. A write that changes zero rows means
the lease was lost (expired and re-claimed elsewhere): the result is dropped and counted stale.

Each kind of outcome is applied in one place, its ``case`` in :func:`_step`: the statement
(a :class:`~dispatcher.runtime.settle_writes.Write`) that applies it, its per-row values,
and what is counted once it is applied. A new transition is one ``case`` there (mypy points
at it, and at :func:`dispatcher.core.breakers.breaker_effect`), plus a ``Write`` if no
statement applies it yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from typing import NamedTuple, TypeAlias, assert_never

import asyncpg

from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    Failure,
    FailureKind,
    Outcome,
    Park,
    Release,
    Reply,
    Reschedule,
    Resolution,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
    Success,
)
from dispatcher.core.redact import Redactor
from dispatcher.core.routing import http_status
from dispatcher.core.sanitize import describe_exception, sanitize_text
from dispatcher.db import Connection
from dispatcher.runtime import settle_counts as counts
from dispatcher.runtime.inbox import InboxResolver
from dispatcher.runtime.settle_flow import BreakerSettings, feed_breakers, hold_rate_limited
from dispatcher.runtime.settle_writes import (
    COMPLETE,
    DEAD_LETTER,
    DURABLE,
    REPLY,
    RESCHEDULE,
    RESOLVE,
    SKIP_DEPTH,
    WRITES,
    Settings,
    Write,
    Written,
    error_json,
    failure_text,
    redacted_payload,
    result_json,
)
from dispatcher.runtime.stats import Stats
from dispatcher.sql import Sql

__all__ = ["Applier", "BreakerSettings", "Decision", "Release", "Settlement", "is_data_error"]

log = logging.getLogger("dispatcher.settle")

# What the settler queues: any outcome, Release included (the name predates that).
Decision: TypeAlias = Outcome


def is_data_error(exc: BaseException) -> bool:
    """A value Postgres refused (data exception, integrity violation): not an outage."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23")


class Settlement(NamedTuple):
    """One outcome queued for the settler (a tuple: one is made for every settled row)."""

    row: ClaimedRow
    decision: Outcome


class _Step(NamedTuple):
    """How one settlement is applied: the statement, the row's values for it (after its id
    and lease token, in the statement's column order), and what to count once applied.
    (A tuple, and shared where it can be: one is made for every settled row.)"""

    write: Write
    columns: tuple[object, ...]
    tally: Callable[[Stats], None]


_COMPLETED = _Step(COMPLETE, (), counts.succeeded)
_REPLIED = _Step(REPLY, (), counts.replied)


def _step(s: Settlement, redactor: Redactor) -> _Step:
    row = s.row
    columns: tuple[object, ...]
    match s.decision:
        case Complete():
            return _COMPLETED
        case SkipDepth() as skip:
            return _Step(
                SKIP_DEPTH, (skip.limit,), partial(counts.depth_exceeded, row=row, skip=skip)
            )
        case Retry() as retry:
            columns = (retry.delay, retry.attempts, None, error_json(retry.error))
            return _Step(RESCHEDULE, columns, counts.retried)
        case Reschedule() as again:
            columns = (again.delay, row.attempts, None, error_json(again.error))
            return _Step(RESCHEDULE, columns, counts.rescheduled)
        case Release(delay=delay):
            return _Step(RESCHEDULE, (delay, row.attempts, None, None), counts.released)
        case Park() as park:
            columns = (None, None, park.kind.value, error_json(park.error))
            return _Step(RESCHEDULE, columns, partial(counts.parked, row=row, park=park))
        case DeadLetter() as dead:
            payload = redacted_payload(row, redactor)
            columns = (dead.reason.value, dead.attempts, error_json(dead.error), payload)
            return _Step(DEAD_LETTER, columns, partial(counts.dead_lettered, row=row, dead=dead))
        case ResolveDeadLetter() as res:
            columns = (res.dead_letter_id, res.resolution.value, res.error)
            return _Step(RESOLVE, columns, partial(counts.resolved, resolution=res.resolution))
        case Reply():
            return _REPLIED
        case _ as other:
            assert_never(other)


@dataclass(slots=True)
class _Applied:
    # Per settlement, in batch order: did its fenced write change its row?
    applied: list[bool]
    unparked: int = 0
    breakers_closed: list[int] = field(default_factory=list)
    breakers_opened: list[int] = field(default_factory=list)
    # Triggers a rate limit now holds (that were not held already), with the hold's length.
    holds: dict[int, float] = field(default_factory=dict)


class Applier:
    def __init__(
        self,
        sql: Sql,
        inbox: InboxResolver,
        stats: Stats,
        *,
        max_error_history: int,
        breaker: BreakerSettings | None = None,
        unpark_batch: int = 100,
        redactor: Redactor | None = None,
    ) -> None:
        self._sql = sql
        self._inbox = inbox
        self._stats = stats
        self._settings = Settings(max_error_history, unpark_batch)
        self._breaker = breaker or BreakerSettings()
        self._redactor = redactor or Redactor(frozenset())

    async def apply(self, conn: Connection, items: Sequence[Settlement]) -> None:
        """Apply one batch. Raises on database errors, leaving nothing half-applied.

        A data error (a value Postgres refuses, SQLSTATE classes 22 and 23) is not an outage
        and retrying the batch would fail the same way for ever: the batch is split until
        the outcome at fault is alone, that row is dead-lettered with the error instead
        (its reply or dead-letter resolution answered as a permanent failure), and the rest
        is applied.
        """
        try:
            await self._apply(conn, items)
        except asyncpg.PostgresError as exc:
            if not is_data_error(exc):
                raise
            await self._isolate(conn, items, exc)

    async def _isolate(
        self, conn: Connection, items: Sequence[Settlement], exc: asyncpg.PostgresError
    ) -> None:
        if len(items) == 1:
            await self._unstorable(conn, items[0], exc)
            return
        mid = len(items) // 2
        for half in (items[:mid], items[mid:]):
            try:
                await self._apply(conn, half)
            except asyncpg.PostgresError as error:
                if not is_data_error(error):
                    raise
                await self._isolate(conn, half, error)

    async def _unstorable(
        self, conn: Connection, item: Settlement, exc: asyncpg.PostgresError
    ) -> None:
        row = item.row
        message = f"its outcome ({type(item.decision).__name__}) could not be stored: "
        message += describe_exception(exc, limit=2000)
        if self._redactor.enabled:
            # Postgres errors can quote the values they refused.
            secrets = self._redactor.secrets_in(row.payload)
            message = self._redactor.redact_text(message, secrets)
        message = sanitize_text(message)
        self._stats.unstorable += 1
        log.error(
            "outcome refused by Postgres; row dead-lettered instead: %s",
            message,
            extra={
                "event": "dispatcher.unstorable",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
                "error": message,
            },
        )
        failure = Failure(FailureKind.PERMANENT, message)
        decision: Outcome
        if row.reply_to is not None:
            decision = Reply(failure, http_status(failure))
        elif row.dead_letter_id is not None:
            decision = ResolveDeadLetter(
                row.dead_letter_id, Resolution.HANDLER_FAILED, f"permanent: {message}"
            )
        else:
            error = ErrorRecord(row.attempts + 1, FailureKind.PERMANENT, message)
            decision = DeadLetter(DeadLetterReason.UNSTORABLE, row.attempts, error)
        try:
            await self._apply(conn, [Settlement(row, decision)])
        except asyncpg.PostgresError as again:
            if not is_data_error(again):
                raise
            # Not even the dead letter could be written (the payload itself, say): leave
            # the lease to expire. Each expiry counts against max_attempts, so the row ends
            # as a lease_expired dead letter, or here again, once per lease: never a stall.
            log.error(
                "row cannot be settled; its lease will expire: %s",
                describe_exception(again, limit=2000),
                extra={
                    "event": "dispatcher.unsettleable",
                    "trigger": row.trigger_name,
                    "scope": row.scope,
                    "outbox_id": row.id,
                },
            )

    async def _apply(self, conn: Connection, items: Sequence[Settlement]) -> None:
        redactor = self._redactor
        steps = [_COMPLETED if type(s.decision) is Complete else _step(s, redactor) for s in items]
        # The common batch: async successes only (no reply, nothing for the breakers).
        successes = all(step is _COMPLETED for step in steps)
        heard: list[tuple[Settlement, Reply]] = []
        unheard: list[tuple[Settlement, Reply]] = []
        if successes:
            # One statement (COMPLETE deletes, un-parks and closes breakers in one), atomic
            # by itself: no BEGIN and COMMIT round trips around it.
            done = await self._write(conn, items, steps, successes=True)
            self._count(steps, done)
            return
        async with conn.transaction():
            done = await self._write(conn, items, steps)
            for s, applied in zip(items, done.applied, strict=True):
                if applied and isinstance(s.decision, Reply):
                    waited = self._inbox.is_waiting(str(s.row.reply_to))
                    (heard if waited else unheard).append((s, s.decision))
            if unheard:
                # Nobody in this process waits for these replies (the caller is another
                # process, dead, or gave up): recorded in the transaction that deletes their
                # rows, so a crash right after the commit cannot lose what the caller would
                # have been told.
                await self._insert_abandoned(conn, unheard)
        # Committed. Only now may a reply leave: the row is gone, so it is delivered at most
        # once, and only by the holder of the live lease.
        self._count(steps, done)
        if unheard:
            self._abandoned(len(unheard))
        if heard:
            await self._deliver(conn, heard)

    async def _write(
        self,
        conn: Connection,
        items: Sequence[Settlement],
        steps: Sequence[_Step],
        *,
        successes: bool = False,
    ) -> _Applied:
        groups: dict[Write, list[int]] = {}
        for i, step in enumerate(steps):
            groups.setdefault(step.write, []).append(i)
        if not DURABLE.isdisjoint(groups):
            await conn.execute(self._sql.durable_commit)
        written: dict[Write, Written] = {}
        done = _Applied([])
        for write in WRITES:  # in this order: see WRITES
            group = groups.get(write)
            if group is None:
                continue
            rows = await conn.fetch(
                write.statement(self._sql),
                [items[i].row.id for i in group],
                [items[i].row.lease_token for i in group],
                *self._columns(write, [steps[i] for i in group]),
                *write.settings(self._settings),
            )
            result = written[write] = write.read(rows)
            done.unparked += result.unparked
            done.breakers_closed += result.breakers_closed
        # A KeyError here is a Write missing from WRITES.
        done.applied = [
            s.row.id in written[step.write].ids for s, step in zip(items, steps, strict=True)
        ]
        if successes:
            # Successes only: COMPLETE has reset their breakers already, and none holds.
            return done
        settled = [(s.row, s.decision, ok) for s, ok in zip(items, done.applied, strict=True)]
        done.breakers_opened = await feed_breakers(conn, self._sql, self._breaker, settled)
        done.holds = await hold_rate_limited(conn, self._sql, settled)
        return done

    @staticmethod
    def _columns(write: Write, steps: Sequence[_Step]) -> list[list[object]]:
        """The rows' values as one array per column (rows in, columns out)."""
        if not write.columns:
            return []
        assert len(steps[0].columns) == len(write.columns), write.name
        return [list(column) for column in zip(*(step.columns for step in steps), strict=True)]

    def _count(self, steps: Sequence[_Step], done: _Applied) -> None:
        for step in compress(steps, done.applied):
            step.tally(self._stats)
        counts.batch(
            self._stats,
            stale=len(steps) - sum(done.applied),
            unparked=done.unparked,
            breakers_opened=done.breakers_opened,
            breakers_closed=done.breakers_closed,
            holds=done.holds,
        )

    async def _deliver(self, conn: Connection, replies: Sequence[tuple[Settlement, Reply]]) -> None:
        abandoned: list[tuple[Settlement, Reply]] = []
        for s, reply in replies:
            assert s.row.reply_to is not None
            if self._inbox.deliver(s.row.reply_to, reply):
                self._stats.replies += 1
            else:
                abandoned.append((s, reply))
        if not abandoned:
            return
        # The receiver gave up between the commit and now: kept for good, durable too.
        async with conn.transaction():
            await conn.execute(self._sql.durable_commit)
            await self._insert_abandoned(conn, abandoned)
        self._abandoned(len(abandoned))

    def _abandoned(self, count: int) -> None:
        self._stats.abandoned += count
        log.info(
            "sync replies abandoned (receiver gone)",
            extra={"event": "dispatcher.abandoned", "count": count},
        )

    async def _insert_abandoned(
        self, conn: Connection, abandoned: Sequence[tuple[Settlement, Reply]]
    ) -> None:
        await conn.execute(
            self._sql.insert_abandoned,
            [s.row.reply_to for s, _ in abandoned],
            [s.row.event_id for s, _ in abandoned],
            [s.row.trigger_id for s, _ in abandoned],
            [s.row.scope for s, _ in abandoned],
            [s.row.target for s, _ in abandoned],
            [r.status for _, r in abandoned],
            ["success" if isinstance(r.result, Success) else "failure" for _, r in abandoned],
            [result_json(r, self._redactor) for _, r in abandoned],
            [failure_text(r, self._redactor) for _, r in abandoned],
        )
