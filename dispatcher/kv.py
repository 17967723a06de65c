"""A reference key/value store whose writes emit trigger events in the same transaction.

Each event carries the value the key held before the write as ``old`` (none for a new key).

>>> kv = KvStore()
>>> async with conn.transaction():
...     await kv.put(conn, "acme", "users", "users/42", {"plan": "pro"})

Like :func:`~dispatcher.emit`, a write refuses a connection outside a transaction
(:class:`~dispatcher.TransactionRequired`) unless it passes ``autocommit=True``, which lets
the write and its event commit together in a transaction of their own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from dispatcher.core.models import JsonValue, Mutation, Op
from dispatcher.db import Connection
from dispatcher.emit import Emitter, Enqueued, encode_event, require_transaction
from dispatcher.sql import Sql, queries


@dataclass(frozen=True, slots=True)
class KvWrite:
    """What a put or delete did: the key's new version (None: delete of a missing key) and
    the outbox rows its event enqueued."""

    version: int | None
    event_id: uuid.UUID
    enqueued: Sequence[Enqueued]


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    value: JsonValue
    version: int


# Decides, inside a savepoint after the emit, whether the enqueued rows stay (True) or are
# rolled back while the KV write itself is kept (False). Used for per-root budgets.
EmitGuard = Callable[[Connection, Mutation, Sequence[Enqueued]], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class KvStore:
    """Put, get and delete over the ``kv`` table; every write emits with its trigger depth.

    A write runs in the caller's transaction (in a savepoint, so a failed write leaves the
    transaction usable); ``autocommit=True`` allows a connection outside one, and the write
    then commits with its event in a transaction of its own.
    """

    emitter: Emitter = field(default_factory=Emitter)

    async def put(
        self,
        conn: Connection,
        scope: str,
        namespace: str,
        key: str,
        value: JsonValue,
        *,
        depth: int = 0,
        event_id: uuid.UUID | None = None,
        root_id: uuid.UUID | None = None,
        guard: EmitGuard | None = None,
        autocommit: bool = False,
    ) -> KvWrite:
        require_transaction(conn, "KvStore.put", autocommit=autocommit)
        mutation = Mutation(
            scope,
            namespace,
            key,
            Op.PUT,
            value,
            event_id=event_id or uuid.uuid4(),
            depth=depth,
            root_id=root_id,
        )
        q = self._q()
        # Validate size and encodability before anything is written; the event, with the
        # value replaced as its old value, is checked again when emitted (a payload too
        # large with it undoes the write: the savepoint below).
        encode_event(mutation, max_bytes=self.emitter.max_payload_bytes)
        stored = json.dumps(value, ensure_ascii=False)
        async with conn.transaction():
            row = await conn.fetchrow(q.kv_put, scope, namespace, key, stored)
            assert row is not None  # an upsert returns its row
            mutation = _with_old(mutation, row["old"])
            enqueued = await self._emit(conn, mutation, guard)
        return KvWrite(row["version"], mutation.event_id, enqueued)

    async def delete(
        self,
        conn: Connection,
        scope: str,
        namespace: str,
        key: str,
        *,
        depth: int = 0,
        event_id: uuid.UUID | None = None,
        root_id: uuid.UUID | None = None,
        guard: EmitGuard | None = None,
        autocommit: bool = False,
    ) -> KvWrite:
        """Delete the key. The event is emitted only when a value was actually removed."""
        require_transaction(conn, "KvStore.delete", autocommit=autocommit)
        mutation = Mutation(
            scope,
            namespace,
            key,
            Op.DELETE,
            None,
            event_id=event_id or uuid.uuid4(),
            depth=depth,
            root_id=root_id,
        )
        q = self._q()
        async with conn.transaction():
            row = await conn.fetchrow(q.kv_delete, scope, namespace, key)
            if row is None:
                return KvWrite(None, mutation.event_id, [])
            mutation = _with_old(mutation, row["old"])
            enqueued = await self._emit(conn, mutation, guard)
        return KvWrite(row["version"], mutation.event_id, enqueued)

    async def _emit(
        self, conn: Connection, mutation: Mutation, guard: EmitGuard | None
    ) -> Sequence[Enqueued]:
        if guard is None:
            return await self.emitter.emit(conn, mutation)
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            enqueued = await self.emitter.emit(conn, mutation)
            keep = await guard(conn, mutation, enqueued)
        except BaseException:
            await savepoint.rollback()
            raise
        if keep:
            await savepoint.commit()
            return enqueued
        await savepoint.rollback()
        return []

    async def get(self, conn: Connection, scope: str, namespace: str, key: str) -> KvEntry | None:
        row = await conn.fetchrow(self._q().kv_get, scope, namespace, key)
        if row is None:
            return None
        return KvEntry(key, json.loads(row["value"]), row["version"])

    async def list(
        self, conn: Connection, scope: str, namespace: str, *, prefix: str = "", limit: int = 1000
    ) -> list[KvEntry]:
        rows = await conn.fetch(self._q().kv_list, scope, namespace, prefix, limit)
        return [KvEntry(r["key"], json.loads(r["value"]), r["version"]) for r in rows]

    def _q(self) -> Sql:
        return queries(self.emitter.schema)


def _with_old(mutation: Mutation, old: str | None) -> Mutation:
    """``mutation`` with the value its key held before (JSON text; None: no value)."""
    return mutation if old is None else replace(mutation, old=json.loads(old))
