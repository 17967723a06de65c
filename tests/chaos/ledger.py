"""The execution ledger: one row per handler execution, written by the handler itself in its
own transaction, on its own connection (never the dispatcher's).

A row is inserted when the handler starts (with the claim's lease token and lease expiry, read
from the outbox row the dispatcher holds) and completed when it ends. A row that never gets
an ``outcome`` belongs to an execution that did not finish: its process was killed, or it is
a blocking handler whose thread was abandoned.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

TABLE = "public.chaos_ledger"
REFUSED = "public.chaos_refused_keys"
APPLICATION_NAME = "chaos-ledger"
DSN_ENV = "CHAOS_LEDGER_DSN"
# How a start that may not have been written is reported (see harness._without_phantom_starts).
LEDGER_START_FAILED = "ledger start not written"

DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    trigger_id bigint NOT NULL,
    trigger_name text NOT NULL,
    scope text NOT NULL,
    event_scope text,
    key text,
    lease_token uuid,
    lease_expires_at timestamptz,
    is_reply boolean NOT NULL DEFAULT false,
    dead_letter_id bigint,
    attempt int NOT NULL,
    depth int NOT NULL,
    principal text NOT NULL,
    pid int NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz,
    outcome text,
    note jsonb,
    -- The last error in the row's history when this execution started: why it is a retry.
    previous_error jsonb,
    -- An ordered trigger's key version (the payload's ``seq``); NULL for unordered rows.
    seq bigint
);
CREATE INDEX IF NOT EXISTS chaos_ledger_pair_idx ON {TABLE} (event_id, trigger_id);
CREATE INDEX IF NOT EXISTS chaos_ledger_started_idx ON {TABLE} (started_at);
-- Keys a ``work`` handler with ``"gate": true`` refuses (PermanentError) while listed here.
CREATE TABLE IF NOT EXISTS {REFUSED} (key text PRIMARY KEY);
"""

# The lease columns come from the outbox row this execution was claimed under: the claim set
# lease_token and made due_at the lease's expiry. A LEFT JOIN keeps the ledger row even if
# the outbox row is already gone (it cannot be while our lease holds, unless it expired).
_START = f"""
INSERT INTO {TABLE} (event_id, trigger_id, trigger_name, scope, event_scope, key,
    lease_token, lease_expires_at, is_reply, dead_letter_id, attempt, depth, principal, pid,
    previous_error, seq)
SELECT $1, $2, $3, $4, $5, $6, o.lease_token, o.due_at, coalesce(o.reply_to IS NOT NULL, false),
    o.dead_letter_id, $7, $8, $9, $10, o.errors -> -1, $11
FROM (SELECT 1) AS one
LEFT JOIN {{schema}}.outbox o ON o.event_id = $1 AND o.trigger_id = $2
RETURNING id"""

_END = f"""
UPDATE {TABLE} SET ended_at = clock_timestamp(), outcome = $2, note = $3::jsonb WHERE id = $1"""


_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class LedgerUnavailable(Exception):
    """The ledger could not be written (the database is down): the handler did nothing."""


@dataclass(frozen=True, slots=True)
class Start:
    event_id: uuid.UUID
    trigger_id: int
    trigger_name: str
    scope: str
    event_scope: str | None
    key: str | None
    attempt: int
    depth: int
    principal: str
    seq: int | None = None


class Ledger:
    """Writes ledger rows through a small pool of its own, created lazily per event loop.

    ``dsn`` defaults to ``$CHAOS_LEDGER_DSN`` (how the dispatcher subprocess gets it).
    """

    def __init__(self, dsn: str | None = None, *, schema: str = "dispatcher") -> None:
        self._dsn = dsn
        self._start_sql = _START.replace("{schema}", f'"{schema}"')
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: anyio.Lock | None = None

    @property
    def dsn(self) -> str:
        dsn = self._dsn or os.environ.get(DSN_ENV)
        if not dsn:
            raise RuntimeError(f"the chaos ledger needs a DSN: set {DSN_ENV}")
        return dsn

    async def _get_pool(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        if self._lock is None or self._loop is not loop:
            self._lock = anyio.Lock()
            self._pool = None
            self._loop = loop
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=20,
                    server_settings={"application_name": APPLICATION_NAME},
                )
        assert self._pool is not None
        return self._pool

    async def _fetchval(self, sql: str, *args: object) -> Any:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            return await conn.fetchval(sql, *args)

    async def start(self, s: Start) -> int:
        """Record the start; raises :class:`LedgerUnavailable` if the database is down."""
        try:
            value = await self._fetchval(
                self._start_sql,
                s.event_id,
                s.trigger_id,
                s.trigger_name,
                s.scope,
                s.event_scope,
                s.key,
                s.attempt,
                s.depth,
                s.principal,
                os.getpid(),
                s.seq,
            )
        except _DB_ERRORS as exc:
            raise LedgerUnavailable(f"{LEDGER_START_FAILED}: {exc!r}") from None
        return int(value)

    async def refused(self, key: str) -> bool:
        """Whether ``key`` is listed in the refused keys (see ``work``'s ``gate``)."""
        return bool(
            await self._fetchval(f"SELECT EXISTS (SELECT FROM {REFUSED} WHERE key = $1)", key)
        )

    async def end(
        self, ledger_id: int, outcome: str, note: object = None, *, patience: float = 30.0
    ) -> None:
        """Record the end, retrying through a database outage for up to ``patience`` s."""
        text = None if note is None else json.dumps(note)
        deadline = time.monotonic() + patience
        while True:
            try:
                await self._fetchval(_END, ledger_id, outcome, text)
                return
            except _DB_ERRORS:
                if time.monotonic() > deadline:
                    raise
                # Bounded retry while Postgres restarts; the pool reconnects on next use.
                await anyio.sleep(0.1)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        self._pool = None
        self._loop = None
