"""The alembic side of :mod:`dispatcher.migrate`, imported only when a migration runs
(alembic and SQLAlchemy's engine cost about half a second to import)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dispatcher.names import DEFAULT_SCHEMA, VERSION_TABLE

log = logging.getLogger("dispatcher.migrate")


def migrations_dir() -> Path:
    """Where the alembic scripts are: inside the wheel, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(
        f"dispatcher's migration scripts are missing (looked in {here / '_migrations'} and "
        f"{here.parent / 'migrations'}); reinstall the package"
    )


def advisory_lock_key(schema: str) -> int:
    digest = hashlib.blake2b(f"dispatcher.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _config(schema: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["schema"] = schema
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config(DEFAULT_SCHEMA)).get_current_head()
    if head is None:
        raise RuntimeError("dispatcher's migration scripts define no head revision")
    return head


async def upgrade(dsn: str, schema: str, revision: str) -> str:
    engine = create_async_engine(
        "postgresql+asyncpg://",
        async_creator=lambda: asyncpg.connect(dsn),
        poolclass=NullPool,
    )
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(_upgrade, schema, revision)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, schema: str, revision: str) -> str:
    # Transaction-scoped: released by the commit (or rollback) that ends the migration.
    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_lock_key(schema)})
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    cfg = _config(schema)
    cfg.attributes["connection"] = connection
    before = _current(connection, schema)
    command.upgrade(cfg, revision)
    after = _current(connection, schema)
    if before != after:
        log.info(
            "schema migrated",
            extra={"event": "migrate.applied", "schema": schema, "from": before, "to": after},
        )
    return after or ""


def _current(connection: Connection, schema: str) -> str | None:
    ctx = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    return ctx.get_current_revision()
