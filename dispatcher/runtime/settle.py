"""Apply routed outcomes in SQL: batched per kind, one transaction per batch, every write
fenced by the row id and the claim's lease token. A write that changes zero rows means the
lease was lost (expired and re-claimed elsewhere): the result is dropped and counted stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, assert_never

from dispatcher.core.outcomes import (
    ClaimedRow,
    Complete,
    DeadLetter,
    ErrorRecord,
    Failure,
    Outcome,
    Reply,
    Reschedule,
    Resolution,
    ResolveDeadLetter,
    Retry,
    SkipDepth,
    Success,
)
from dispatcher.core.sanitize import sanitize_json
from dispatcher.db import Connection
from dispatcher.runtime.inbox import InboxResolver
from dispatcher.runtime.stats import Stats
from dispatcher.sql import Sql

log = logging.getLogger("dispatcher.settle")


@dataclass(frozen=True, slots=True)
class Release:
    """Give the lease back without consuming an attempt (shutdown, cancellation)."""


Decision: TypeAlias = Outcome | Release


@dataclass(frozen=True, slots=True)
class Settlement:
    row: ClaimedRow
    decision: Decision


def _error_json(error: ErrorRecord | None) -> str | None:
    if error is None:
        return None
    return json.dumps(
        {"attempt": error.attempt, "kind": error.kind.value, "message": error.message},
        ensure_ascii=False,
    )


@dataclass(slots=True)
class _Batch:
    delete: list[Settlement]
    reschedule: list[tuple[Settlement, float, int, str | None]]
    dead: list[tuple[Settlement, DeadLetter]]
    resolve: list[tuple[Settlement, ResolveDeadLetter]]
    reply: list[tuple[Settlement, Reply]]


def _group(items: Sequence[Settlement]) -> _Batch:
    b = _Batch([], [], [], [], [])
    for item in items:
        d = item.decision
        match d:
            case Complete() | SkipDepth():
                b.delete.append(item)
            case Retry(delay=delay, attempts=attempts, error=error):
                b.reschedule.append((item, delay, attempts, _error_json(error)))
            case Reschedule(delay=delay, error=error):
                b.reschedule.append((item, delay, item.row.attempts, _error_json(error)))
            case Release():
                b.reschedule.append((item, 0.0, item.row.attempts, None))
            case DeadLetter():
                b.dead.append((item, d))
            case ResolveDeadLetter():
                b.resolve.append((item, d))
            case Reply():
                b.reply.append((item, d))
            case _:
                assert_never(d)
    return b


class Applier:
    def __init__(
        self, sql: Sql, inbox: InboxResolver, stats: Stats, *, max_error_history: int
    ) -> None:
        self._sql = sql
        self._inbox = inbox
        self._stats = stats
        self._max_errors = max_error_history

    async def apply(self, conn: Connection, items: Sequence[Settlement]) -> None:
        """Apply one batch. Raises on database errors, leaving nothing half-applied."""
        b = _group(items)
        q = self._sql
        async with conn.transaction():
            deleted = await self._fenced(conn, q.delete_fenced, b.delete)
            rescheduled: set[int] = set()
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
                rescheduled = {r["id"] for r in rows}
            moved: set[int] = set()
            if b.dead:
                row = await conn.fetchrow(
                    q.dead_letter_fenced,
                    [s.row.id for s, _ in b.dead],
                    [s.row.lease_token for s, _ in b.dead],
                    [d.reason.value for _, d in b.dead],
                    [d.attempts for _, d in b.dead],
                    [_error_json(d.error) for _, d in b.dead],
                )
                assert row is not None
                moved = set(row["moved"])
            resolved: set[int] = set()
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
                resolved = set(row["deleted"])
            replied = await self._fenced(conn, q.delete_fenced, [s for s, _ in b.reply])
        # Committed. Only now may a reply leave: the row is gone, so it is delivered at most
        # once, and only by the holder of the live lease.
        self._count(b, deleted, rescheduled, moved, resolved)
        await self._deliver(conn, [(s, r) for s, r in b.reply if s.row.id in replied])
        self._stats.stale += sum(1 for s, _ in b.reply if s.row.id not in replied)

    async def _fenced(self, conn: Connection, sql: str, items: Sequence[Settlement]) -> set[int]:
        if not items:
            return set()
        rows = await conn.fetch(sql, [s.row.id for s in items], [s.row.lease_token for s in items])
        return {r["id"] for r in rows}

    def _count(
        self,
        b: _Batch,
        deleted: set[int],
        rescheduled: set[int],
        moved: set[int],
        resolved: set[int],
    ) -> None:
        st = self._stats
        stale = 0
        for s in b.delete:
            if s.row.id not in deleted:
                stale += 1
            elif isinstance(s.decision, SkipDepth):
                st.depth_exceeded += 1
                log.warning(
                    "trigger depth limit reached; row dropped",
                    extra={
                        "event": "dispatcher.depth_exceeded",
                        "trigger": s.row.trigger_name,
                        "scope": s.row.scope,
                        "depth": s.row.depth,
                    },
                )
            else:
                st.succeeded += 1
        for s, *_ in b.reschedule:
            if s.row.id not in rescheduled:
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
        for s, d in b.dead:
            if s.row.id not in moved:
                stale += 1
                continue
            st.dead_lettered += 1
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
            if s.row.id not in resolved:
                stale += 1
            elif r.resolution is Resolution.HANDLED:
                st.handled += 1
            else:
                st.handler_failed += 1
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
        await conn.execute(
            self._sql.insert_abandoned,
            [s.row.reply_to for s, _ in abandoned],
            [s.row.event_id for s, _ in abandoned],
            [s.row.trigger_id for s, _ in abandoned],
            [s.row.scope for s, _ in abandoned],
            [s.row.target for s, _ in abandoned],
            [r.status for _, r in abandoned],
            ["success" if isinstance(r.result, Success) else "failure" for _, r in abandoned],
            [_result_json(r) for _, r in abandoned],
            [_failure_text(r) for _, r in abandoned],
        )
        self._stats.abandoned += len(abandoned)
        log.info(
            "sync replies abandoned (receiver gone)",
            extra={"event": "dispatcher.abandoned", "count": len(abandoned)},
        )


def _result_json(reply: Reply) -> str | None:
    if isinstance(reply.result, Success):
        return json.dumps(sanitize_json(reply.result.result), ensure_ascii=False)
    return None


def _failure_text(reply: Reply) -> str | None:
    if isinstance(reply.result, Failure):
        return f"{reply.result.kind.value}: {reply.result.message}"
    return None
