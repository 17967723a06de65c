"""Moving a test database's dispatcher schema down to an earlier revision (alembic's
downgrade, which the library itself never runs), for the migration round-trip tests."""

from __future__ import annotations

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
