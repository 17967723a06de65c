"""Apply dispatcher's alembic migrations to a database, from a checkout or an installed wheel.

Several processes may start at once: each takes a transaction-scoped advisory lock derived from
the schema name before touching anything, so exactly one migrates and the others then find
the schema current.
"""

from __future__ import annotations

from dispatcher.names import DEFAULT_SCHEMA, VERSION_TABLE, check_schema_name


def head_revision() -> str:
    """The newest revision the migration scripts define."""
    from dispatcher import _alembic

    return _alembic.head_revision()


async def migrate(dsn: str, *, schema: str = DEFAULT_SCHEMA, revision: str = "head") -> str:
    """Bring ``schema`` up to ``revision`` (default: the newest); return the revision reached.

    Safe to call from several processes at once, and a no-op when already current.

    >>> await dispatcher.migrate("postgresql://app@db/app")
    '0001'
    """
    schema = check_schema_name(schema)
    from dispatcher import _alembic

    return await _alembic.upgrade(dsn, schema, revision)


async def current_revision(dsn: str, *, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The revision the database is at, or None when dispatcher was never migrated there."""
    schema = check_schema_name(schema)
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".{VERSION_TABLE}')
        if exists is None:
            return None
        value = await conn.fetchval(f'SELECT version_num FROM "{schema}".{VERSION_TABLE}')
        return None if value is None else str(value)
    finally:
        await conn.close()
