"""Real Postgres for every test: one server per session, one database per test.

The server comes from DISPATCHER_TEST_DSN, else testcontainers, else the embedded server
(DESIGN.md §6). A template database is migrated once per session; each test gets a fresh
clone of it, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import asyncpg
import pytest

from dispatcher.migrate import migrate
from dispatcher.postgres import ProvidedPostgres, provide_postgres, with_database

TEMPLATE = f"dispatcher_tpl_{os.getpid()}"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # asyncpg runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def postgres() -> Iterator[ProvidedPostgres]:
    with provide_postgres("DISPATCHER_TEST_DSN") as provided:
        if provided.source == "embedded":
            # A throw-away server: trade durability for speed. Never done to a server we
            # were handed.
            anyio.run(_relax_durability, provided.dsn)
        yield provided


async def _relax_durability(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            await conn.execute(f"ALTER SYSTEM SET {setting} = off")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_dsn(postgres: ProvidedPostgres) -> Iterator[str]:
    anyio.run(_create_database, postgres.dsn, TEMPLATE, None)
    dsn = with_database(postgres.dsn, TEMPLATE)
    anyio.run(_migrate, dsn)
    yield dsn
    anyio.run(_drop_database, postgres.dsn, TEMPLATE)


async def _migrate(dsn: str) -> None:
    await migrate(dsn)


async def _create_database(admin_dsn: str, name: str, template: str | None) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def dsn(postgres: ProvidedPostgres, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"dispatcher_t_{uuid.uuid4().hex[:12]}"
    await _create_database(postgres.dsn, name, TEMPLATE)
    yield with_database(postgres.dsn, name)
    await _drop_database(postgres.dsn, name)


@pytest.fixture
async def empty_dsn(postgres: ProvidedPostgres) -> AsyncIterator[str]:
    """A fresh database with nothing in it (for migration tests)."""
    name = f"dispatcher_e_{uuid.uuid4().hex[:12]}"
    await _create_database(postgres.dsn, name, None)
    yield with_database(postgres.dsn, name)
    await _drop_database(postgres.dsn, name)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()
