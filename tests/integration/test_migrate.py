from __future__ import annotations

import subprocess
import sys

import anyio
import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from dispatcher.migrate import current_revision, head_revision, migrate
from dispatcher.schema import VERSION_TABLE, build_metadata

pytestmark = pytest.mark.anyio


def _diff(connection: Connection, schema: str) -> list[object]:
    ctx = MigrationContext.configure(
        connection,
        opts={
            "include_schemas": True,
            "include_name": lambda name, type_, parent: (
                name == schema if type_ == "schema" else name != VERSION_TABLE
            ),
        },
    )
    return list(compare_metadata(ctx, build_metadata(schema)))


async def _compare(dsn: str, schema: str) -> list[object]:
    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=lambda: asyncpg.connect(dsn), poolclass=NullPool
    )
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff, schema)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("schema", ["dispatcher", "custom_events"])
async def test_migrated_schema_matches_metadata(empty_dsn: str, schema: str) -> None:
    assert await migrate(empty_dsn, schema=schema) == head_revision()
    assert await _compare(empty_dsn, schema) == []


async def test_drift_is_detected(empty_dsn: str) -> None:
    await migrate(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("ALTER TABLE dispatcher.outbox ADD COLUMN extra int")
    finally:
        await conn.close()
    assert await _compare(empty_dsn, "dispatcher") != []


async def test_library_version_table_and_no_host_alembic_version(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        # A host's own alembic history must be left alone.
        await conn.execute("CREATE TABLE public.alembic_version (version_num text primary key)")
        await conn.execute("INSERT INTO public.alembic_version VALUES ('host_rev')")
        assert await current_revision(empty_dsn) is None
        await migrate(empty_dsn)
        assert await current_revision(empty_dsn) == head_revision()
        assert await conn.fetchval("SELECT version_num FROM public.alembic_version") == "host_rev"
        assert await conn.fetchval(f"SELECT to_regclass('dispatcher.{VERSION_TABLE}')")
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'dispatcher.outbox'::regclass"
        )
        assert "autovacuum_vacuum_scale_factor=0.01" in options
    finally:
        await conn.close()


async def test_migrate_is_idempotent(empty_dsn: str) -> None:
    assert await migrate(empty_dsn) == await migrate(empty_dsn) == head_revision()


async def test_concurrent_migrate_from_two_processes(empty_dsn: str) -> None:
    cmd = [sys.executable, "-m", "dispatcher.cli", "migrate", "--dsn", empty_dsn]
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def one() -> None:
        results.append(await anyio.run_process(cmd, check=False))

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    for proc in results:
        assert proc.returncode == 0, proc.stderr.decode()
        assert f"at revision {head_revision()}" in proc.stdout.decode()
    assert await _compare(empty_dsn, "dispatcher") == []


def test_cli_reports_a_bad_dsn_in_one_line() -> None:
    bad = "postgresql://nobody@127.0.0.1:1/x"
    cmd = [sys.executable, "-m", "dispatcher.cli", "migrate", "--dsn", bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error:")
    assert len(proc.stderr.strip().splitlines()) == 1
