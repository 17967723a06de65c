"""Apply routed outcomes in SQL: batched per kind, one transaction per batch, every write
fenced by the row id and the claim's lease token. A write that changes zero rows means the
lease was lost (expired and re-claimed elsewhere): the result is dropped and counted stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, assert_never

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
from dispatcher.core.sanitize import describe_exception, sanitize_json, sanitize_text
from dispatcher.db import Connection
from dispatcher.runtime.inbox import InboxResolver
from dispatcher.runtime.stats import Stats
from dispatcher.sql import Sql

log = logging.getLogger("dispatcher.settle")

# Failures that say the target (not one event) is unhealthy: they feed the circuit breaker.
BREAKER_KINDS = frozenset(
    {
        FailureKind.HANDLER_ERROR,
        FailureKind.TIMEOUT,
        FailureKind.TARGET_NOT_FOUND,
        FailureKind.PERMISSION_DENIED,
    }
)


def is_data_error(exc: BaseException) -> bool:
    """A value Postgres refused (data exception, integrity violation): not an outage."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state[:2] in ("22", "23")


@dataclass(frozen=True, slots=True)
class Release:
    """Give the lease back without consuming an attempt (shutdown, cancellation)."""


Decision: TypeAlias = Outcome | Release


@dataclass(frozen=True, slots=True)
class Settlement:
    row: ClaimedRow
    decision: Decision


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Consecutive counted failures that open a trigger's breaker (0: never), and for how
    long it stays open before one probe is let through."""

    threshold: int = 3
    cooldown: float = 60.0


def _error_json(error: ErrorRecord | None) -> str | None:
    if error is None:
        return None
    return json.dumps(
        {"attempt": error.attempt, "kind": error.kind.value, "message": error.message},
        ensure_ascii=False,
    )


@dataclass(slots=True)
class _Batch:
    complete: list[Settlement] = field(default_factory=list)
    skip: list[tuple[Settlement, SkipDepth]] = field(default_factory=list)
    reschedule: list[tuple[Settlement, float, int, str | None]] = field(default_factory=list)
    park: list[tuple[Settlement, Park]] = field(default_factory=list)
    dead: list[tuple[Settlement, DeadLetter]] = field(default_factory=list)
    resolve: list[tuple[Settlement, ResolveDeadLetter]] = field(default_factory=list)
    reply: list[tuple[Settlement, Reply]] = field(default_factory=list)


def _group(items: Sequence[Settlement]) -> _Batch:
    b = _Batch()
    for item in items:
        d = item.decision
        match d:
            case Complete():
                b.complete.append(item)
            case SkipDepth():
                b.skip.append((item, d))
            case Retry(delay=delay, attempts=attempts, error=error):
                b.reschedule.append((item, delay, attempts, _error_json(error)))
            case Reschedule(delay=delay, error=error):
                b.reschedule.append((item, delay, item.row.attempts, _error_json(error)))
            case Release():
                b.reschedule.append((item, 0.0, item.row.attempts, None))
            case Park():
                b.park.append((item, d))
            case DeadLetter():
                b.dead.append((item, d))
            case ResolveDeadLetter():
                b.resolve.append((item, d))
            case Reply():
                b.reply.append((item, d))
            case _:
                assert_never(d)
    return b


def _breaker_failure(d: Decision) -> bool:
    match d:
        case Retry(error=error) | Park(error=error):
            return error.kind in BREAKER_KINDS
        case DeadLetter(error=error):
            return error is not None and error.kind in BREAKER_KINDS
        case _:
            return False


@dataclass(slots=True)
class _Applied:
    completed: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)
    rescheduled: set[int] = field(default_factory=set)
    parked: set[int] = field(default_factory=set)
    moved: set[int] = field(default_factory=set)
    resolved: set[int] = field(default_factory=set)
    replied: set[int] = field(default_factory=set)
    unparked: int = 0
    breakers_closed: list[int] = field(default_factory=list)
    breakers_opened: list[int] = field(default_factory=list)


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
        self._max_errors = max_error_history
        self._breaker = breaker or BreakerSettings()
        self._unpark_batch = unpark_batch
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
        decision: Decision
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
        b = _group(items)
        async with conn.transaction():
            done = await self._write(conn, b, items)
        # Committed. Only now may a reply leave: the row is gone, so it is delivered at most
        # once, and only by the holder of the live lease.
        self._count(b, done)
        await self._deliver(conn, [(s, r) for s, r in b.reply if s.row.id in done.replied])

    async def _write(self, conn: Connection, b: _Batch, items: Sequence[Settlement]) -> _Applied:
        q = self._sql
        done = _Applied()
        if b.reply or b.dead or b.resolve:
            await conn.execute(q.durable_commit)
        if b.complete:
            row = await conn.fetchrow(
                q.complete_fenced,
                [s.row.id for s in b.complete],
                [s.row.lease_token for s in b.complete],
                self._unpark_batch,
            )
            assert row is not None
            done.completed = set(row["deleted"])
            done.unparked = int(row["unparked"])
            done.breakers_closed = list(row["breakers_closed"])
        if b.skip:
            rows = await conn.fetch(
                q.skip_depth_fenced,
                [s.row.id for s, _ in b.skip],
                [s.row.lease_token for s, _ in b.skip],
                [d.limit for _, d in b.skip],
            )
            done.skipped = {r["id"] for r in rows}
        if b.reschedule:
            rows = await conn.fetch(
                q.reschedule_fenced,
                [s.row.id for s, *_ in b.reschedule],
                [s.row.lease_token for s, *_ in b.reschedule],
                [delay for _, delay, _, _ in b.reschedule],
                [attempts for _, _, attempts, _ in b.reschedule],
                [error for *_, error in b.reschedule],
                self._max_errors,
            )
            done.rescheduled = {r["id"] for r in rows}
        if b.park:
            rows = await conn.fetch(
                q.park_fenced,
                [s.row.id for s, _ in b.park],
                [s.row.lease_token for s, _ in b.park],
                [p.kind.value for _, p in b.park],
                [_error_json(p.error) for _, p in b.park],
                self._max_errors,
            )
            done.parked = {r["id"] for r in rows}
        if b.dead:
            row = await conn.fetchrow(
                q.dead_letter_fenced,
                [s.row.id for s, _ in b.dead],
                [s.row.lease_token for s, _ in b.dead],
                [d.reason.value for _, d in b.dead],
                [d.attempts for _, d in b.dead],
                [_error_json(d.error) for _, d in b.dead],
                [self._redacted_payload(s.row) for s, _ in b.dead],
            )
            assert row is not None
            done.moved = set(row["moved"])
        if b.resolve:
            row = await conn.fetchrow(
                q.resolve_dead_letter_fenced,
                [s.row.id for s, _ in b.resolve],
                [s.row.lease_token for s, _ in b.resolve],
                [d.dead_letter_id for _, d in b.resolve],
                [d.resolution.value for _, d in b.resolve],
                [d.error for _, d in b.resolve],
            )
            assert row is not None
            done.resolved = set(row["deleted"])
        done.replied = await self._fenced(conn, q.delete_fenced, [s for s, _ in b.reply])
        await self._feed_breakers(conn, items, done)
        return done

    def _redacted_payload(self, row: ClaimedRow) -> str | None:
        if not self._redactor.enabled:
            return None  # the statement keeps the stored payload
        return json.dumps(self._redactor.redact_json(row.payload), ensure_ascii=False)

    async def _feed_breakers(
        self, conn: Connection, items: Sequence[Settlement], done: _Applied
    ) -> None:
        if self._breaker.threshold <= 0:
            return
        # Consecutive failures, in completion order: a success in this batch has already
        # reset the trigger's count (complete_fenced), so only the failures after its last
        # success count. Adding all of them would let 10% random failures in a batch of
        # 500 open the breaker.
        trailing: dict[int, int] = {}
        applied = done.rescheduled | done.parked | done.moved
        for s in items:
            if s.row.reply_to is not None or s.row.dead_letter_id is not None:
                continue
            if isinstance(s.decision, Complete):
                if s.row.id in done.completed:
                    trailing[s.row.trigger_id] = 0
            elif s.row.id in applied and _breaker_failure(s.decision):
                trailing[s.row.trigger_id] = trailing.get(s.row.trigger_id, 0) + 1
        failures = {t: n for t, n in trailing.items() if n}
        if not failures:
            return
        rows = await conn.fetch(
            self._sql.breaker_failures,
            list(failures),
            list(failures.values()),
            self._breaker.threshold,
            self._breaker.cooldown,
        )
        done.breakers_opened = [r["trigger_id"] for r in rows if r["just_opened"]]
        held = [r["trigger_id"] for r in rows if r["is_open"]]
        if held:
            await conn.execute(self._sql.hold_behind_breaker, held)

    async def _fenced(self, conn: Connection, sql: str, items: Sequence[Settlement]) -> set[int]:
        if not items:
            return set()
        rows = await conn.fetch(sql, [s.row.id for s in items], [s.row.lease_token for s in items])
        return {r["id"] for r in rows}

    def _count(self, b: _Batch, done: _Applied) -> None:
        st = self._stats
        stale = 0
        for s in b.complete:
            if s.row.id in done.completed:
                st.succeeded += 1
            else:
                stale += 1
        for s, _ in b.skip:
            if s.row.id not in done.skipped:
                stale += 1
                continue
            st.depth_exceeded += 1
            log.warning(
                "trigger depth limit reached; row not run (kept in depth_cutoffs)",
                extra={
                    "event": "dispatcher.depth_exceeded",
                    "trigger": s.row.trigger_name,
                    "scope": s.row.scope,
                    "depth": s.row.depth,
                },
            )
        for s, *_ in b.reschedule:
            if s.row.id not in done.rescheduled:
                stale += 1
                continue
            match s.decision:
                case Retry():
                    st.retried += 1
                case Reschedule():
                    st.rescheduled += 1
                case Release():
                    st.released += 1
                case _:
                    pass
        for s, p in b.park:
            if s.row.id not in done.parked:
                stale += 1
                continue
            st.parked += 1
            log.warning(
                "row parked",
                extra={
                    "event": "dispatcher.parked",
                    "trigger": s.row.trigger_name,
                    "scope": s.row.scope,
                    "kind": p.kind.value,
                },
            )
        for s, d in b.dead:
            if s.row.id not in done.moved:
                stale += 1
                continue
            st.dead_lettered += 1
            st.dead_letters_by_reason[d.reason.value] += 1
            log.warning(
                "row dead-lettered",
                extra={
                    "event": "dispatcher.dead_lettered",
                    "trigger": s.row.trigger_name,
                    "scope": s.row.scope,
                    "reason": d.reason.value,
                    "attempts": d.attempts,
                },
            )
        for s, r in b.resolve:
            if s.row.id not in done.resolved:
                stale += 1
            elif r.resolution is Resolution.HANDLED:
                st.handled += 1
            else:
                st.handler_failed += 1
        stale += sum(1 for s, _ in b.reply if s.row.id not in done.replied)
        st.unparked += done.unparked
        for trigger_id in done.breakers_opened:
            st.breakers_opened += 1
            log.warning(
                "circuit breaker opened",
                extra={"event": "dispatcher.breaker_opened", "trigger_id": trigger_id},
            )
        for trigger_id in done.breakers_closed:
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
        async with conn.transaction():
            # What a gone caller would have been told is kept for good: durable too.
            await conn.execute(self._sql.durable_commit)
            await self._insert_abandoned(conn, abandoned)
        self._stats.abandoned += len(abandoned)
        log.info(
            "sync replies abandoned (receiver gone)",
            extra={"event": "dispatcher.abandoned", "count": len(abandoned)},
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
            [_result_json(r, self._redactor) for _, r in abandoned],
            [_failure_text(r, self._redactor) for _, r in abandoned],
        )


def _result_json(reply: Reply, redactor: Redactor) -> str | None:
    if isinstance(reply.result, Success):
        # Redact first: sanitize_json cuts long strings, and a secret cut in half is no
        # longer found whole (the result is already clean JSON, so nothing else changes).
        value = sanitize_json(redactor.redact_json(reply.result.result))
        return json.dumps(value, ensure_ascii=False)
    return None


def _failure_text(reply: Reply, redactor: Redactor) -> str | None:
    if isinstance(reply.result, Failure):
        return redactor.redact_text(f"{reply.result.kind.value}: {reply.result.message}")
    return None
