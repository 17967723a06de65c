"""What the dispatcher acknowledges survives a crash of the server.

The dispatcher's sessions commit asynchronously (a lost claim or settlement only re-runs a
row), but a synchronous reply, the handler writes behind it, a dead-letter move and a
dead-letter handler's resolution are told to someone: their commits wait for the WAL flush.
Here the server runs with a WAL writer that flushes only every 10 s, and is stopped in
immediate mode right after the acknowledgements: only a flushed commit survives that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    PermanentError,
    RetryPolicy,
    TriggerRegistry,
    emit,
)
from dispatcher.migrate import migrate
from dispatcher.postgres import ProvidedPostgres, embedded_postgres

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def crashable() -> Iterator[ProvidedPostgres]:
    """A server of this module's own: it is crashed, so it cannot be the session's."""
    pytest.importorskip("pgserver", reason="needs the embedded server (extra 'embedded')")
    with embedded_postgres() as provided:
        yield provided


async def test_acknowledged_replies_and_dead_letters_survive_an_immediate_stop(
    crashable: ProvidedPostgres,
) -> None:
    control = crashable.control
    assert control is not None
    dsn = crashable.dsn
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("DROP SCHEMA IF EXISTS dispatcher CASCADE")
    finally:
        await admin.close()
    await migrate(dsn)

    handlers = HandlerRegistry()

    @handlers.handler("record")
    async def record(ctx: HandlerContext) -> dict[str, str]:
        await ctx.kv.put("proof", f"proof/{ctx.event['value']}", {"written": True})
        return {"ok": "yes"}

    @handlers.handler("refuse")
    async def refuse(ctx: HandlerContext) -> None:
        raise PermanentError("never")

    conn = await asyncpg.connect(dsn)
    try:
        registry = TriggerRegistry()
        sync = await registry.register(
            conn,
            scope="acme",
            name="sync",
            namespace="calls",
            key_pattern="calls/*",
            target="record",
            registered_by="user:1",
        )
        await registry.register(
            conn,
            scope="acme",
            name="refuse",
            namespace="users",
            key_pattern="users/*",
            target="refuse",
            registered_by="user:1",
            retry=RetryPolicy(max_attempts=1),
        )
        # The test's own commits are synchronous: everything up to here is on disk.
        await emit(conn, Mutation("acme", "users", "users/1", Op.PUT, {"n": 1}), autocommit=True)
    finally:
        await conn.close()

    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05, listen=False))
    replies = []
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(20):
            while d.stats.dead_lettered < 1:
                with anyio.move_on_after(0.1):
                    await d.progressed()
            for n in range(3):
                replies.append(await d.invoke(sync.id, n, time_limit=10))
        d.stop()
    assert [r.status for r in replies] == [200, 200, 200]

    # A power cut, right after the acknowledgements (well inside the WAL writer's 10 s).
    await anyio.to_thread.run_sync(control.crash)
    await anyio.to_thread.run_sync(control.start)

    conn = await asyncpg.connect(dsn)
    try:
        proofs = await conn.fetch("SELECT key FROM dispatcher.kv ORDER BY key")
        assert [r["key"] for r in proofs] == ["proof/0", "proof/1", "proof/2"]
        dead = await conn.fetch("SELECT reason, payload FROM dispatcher.dead_letters")
        assert [(r["reason"], json.loads(r["payload"])["key"]) for r in dead] == [
            ("permanent", "users/1")
        ]
        # Nothing acknowledged is left to run again.
        assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    finally:
        await conn.close()
