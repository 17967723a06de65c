"""Handler KV access: writes through the dispatcher's pool, database faults reported as
:class:`StoreUnavailable`, and the per-root budget that bounds fan-out recursion."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence

import asyncpg

from dispatcher.core.models import JsonValue, Mutation
from dispatcher.core.sanitize import describe_exception
from dispatcher.db import Connection
from dispatcher.emit import Enqueued
from dispatcher.kv import EmitGuard, KvEntry, KvStore, KvWrite
from dispatcher.runtime.connections import DB_ERRORS
from dispatcher.runtime.handlers import StoreUnavailable
from dispatcher.runtime.stats import Stats
from dispatcher.sql import Sql

log = logging.getLogger("dispatcher")


# SQLSTATE classes of errors a handler's own values cause (data exception, integrity
# constraint violation, program limit exceeded: a value the kv table cannot store, a key
# too long for its index). Those stay the handler's errors; every other database error
# under ctx.kv is the dispatcher's database failing.
_HANDLER_DATA_CLASSES = frozenset({"22", "23", "54"})


@contextlib.contextmanager
def _store_faults() -> Iterator[None]:
    """Raise a database fault under a handler's KV call as :class:`StoreUnavailable`, so
    that it is classified as the dispatcher's (no attempt used, no breaker fed), not the
    handler's."""
    try:
        yield
    except DB_ERRORS as exc:
        state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
        if isinstance(state, str) and state[:2] in _HANDLER_DATA_CLASSES:
            raise
        raise StoreUnavailable(
            f"the dispatcher's database failed: {describe_exception(exc, limit=500)}"
        ) from exc


class PoolKv:
    """Handler KV writes through the dispatcher's pool; never exposed to handlers."""

    __slots__ = ("_guard", "_kv", "_pool")

    def __init__(self, pool: asyncpg.Pool, kv: KvStore, guard: EmitGuard | None) -> None:
        self._pool = pool
        self._kv = kv
        self._guard = guard

    async def put(
        self,
        scope: str,
        namespace: str,
        key: str,
        value: JsonValue,
        depth: int,
        event: uuid.UUID,
        root: uuid.UUID,
    ) -> KvWrite:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.put(
                    conn,
                    scope,
                    namespace,
                    key,
                    value,
                    depth=depth,
                    event_id=event,
                    root_id=root,
                    guard=self._guard,
                    autocommit=True,  # the write and its event: one transaction of their own
                )

    async def delete(
        self, scope: str, namespace: str, key: str, depth: int, event: uuid.UUID, root: uuid.UUID
    ) -> KvWrite:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.delete(
                    conn,
                    scope,
                    namespace,
                    key,
                    depth=depth,
                    event_id=event,
                    root_id=root,
                    guard=self._guard,
                    autocommit=True,
                )

    async def get(self, scope: str, namespace: str, key: str) -> KvEntry | None:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.get(conn, scope, namespace, key)


class RootBudget:
    """The guard of handler writes: inside the write's savepoint, keep its rows while the
    root's tree is within budget; past it, roll the rows back (the KV write itself stays)."""

    __slots__ = ("_budget", "_sql", "_stats")

    def __init__(self, sql: Sql, stats: Stats, budget: int) -> None:
        self._sql = sql
        self._stats = stats
        self._budget = budget

    async def __call__(
        self, conn: Connection, mutation: Mutation, enqueued: Sequence[Enqueued]
    ) -> bool:
        if not enqueued:
            return True
        total = await conn.fetchval(self._sql.root_budget_add, mutation.root, len(enqueued))
        if total <= self._budget:
            return True
        self._stats.budget_exceeded += len(enqueued)
        log.warning(
            "per-root execution budget exhausted; rows not enqueued",
            extra={
                "event": "dispatcher.budget_exceeded",
                "scope": mutation.scope,
                "rows": len(enqueued),
                "budget": self._budget,
            },
        )
        return False


def root_of(payload: Mapping[str, JsonValue], event_id: uuid.UUID) -> uuid.UUID | str:
    """The root event of a row's payload, for its handler's writes."""
    root = payload.get("root")
    # Left as text: the handle parses it on the first write, and most executions write nothing.
    return root if isinstance(root, str) else event_id


def guard_for(sql: Sql, stats: Stats, budget: int | None) -> EmitGuard | None:
    return None if budget is None else RootBudget(sql, stats, budget)
