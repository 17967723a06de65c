from __future__ import annotations

import asyncpg
import pytest

pytestmark = pytest.mark.anyio


async def test_each_test_gets_a_migrated_database(conn: asyncpg.Connection) -> None:
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'dispatcher'"
    )
    assert {r["table_name"] for r in tables} >= {"triggers", "outbox", "dead_letters", "kv"}
    await conn.execute("CREATE TABLE leak_check (x int)")


async def test_databases_are_isolated(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT to_regclass('leak_check')") is None
