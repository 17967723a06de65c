"""Moving a test database's dispatcher schema down to an earlier revision (alembic's
downgrade, which the library itself never runs), for the migration round-trip tests."""

from __future__ import annotations

from typing import Any

import asyncpg
from alembic import command
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dispatcher._alembic import _config


def _downgrade(connection: Connection, schema: str, revision: str) -> None:
    cfg = _config(schema)
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


async def downgrade(dsn: str, revision: str, *, schema: str = "dispatcher") -> None:
    """Bring ``schema`` of the database at ``dsn`` down to ``revision``."""
    engine = create_async_engine(
        "postgresql+asyncpg://",
        async_creator=lambda: asyncpg.connect(dsn),
        poolclass=NullPool,
    )
    try:
        async with engine.begin() as sa_conn:
            await sa_conn.run_sync(_downgrade, schema, revision)
    finally:
        await engine.dispose()


_FUNCTIONS = """
    SELECT p.oid::regprocedure::text AS signature, pg_get_functiondef(p.oid) AS definition,
        p.proacl::text AS acl, obj_description(p.oid, 'pg_proc') AS comment
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'dispatcher' ORDER BY p.proname"""


async def functions(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """The library's functions as a revision leaves them: signature, definition, grants
    and comment, to compare across an upgrade and a downgrade."""
    return [tuple(r) for r in await conn.fetch(_FUNCTIONS)]


async def add_trigger_row(
    conn: asyncpg.Connection, *, scope: str, name: str, namespace: str, prefix: str
) -> int:
    """A trigger matching ``prefix*``, written as SQL: the library's registry writes the
    newest revision's columns, which an earlier revision's table may not have."""
    return int(
        await conn.fetchval(
            """INSERT INTO dispatcher.triggers (scope, name, namespace, key_pattern,
                   pattern_kind, match_prefix, ops, target, registered_by, retry_kind,
                   retry_base_delay, retry_factor, retry_max_delay, retry_jitter,
                   max_attempts, timeout, park_on)
               VALUES ($1, $2, $3, $4 || '*', 'prefix', $4, '{put,delete}', $2, 'user:1',
                   'exponential', 1, 2, 300, 0.1, 5, 30, '{}')
               RETURNING id""",
            scope,
            name,
            namespace,
            prefix,
        )
    )
