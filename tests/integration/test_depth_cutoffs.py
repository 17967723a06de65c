"""Rows stopped by the trigger-depth limit are never run and never dead-lettered, but they
do not vanish: each is kept in ``depth_cutoffs`` (event, trigger, depth, root) for the
configured retention."""

from __future__ import annotations

import uuid

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
    TriggerRegistry,
    emit,
)

pytestmark = pytest.mark.anyio


async def test_a_row_past_the_depth_limit_is_recorded(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    depths: list[int] = []

    @handlers.handler("loop")
    async def loop(ctx: HandlerContext) -> None:
        depths.append(ctx.depth)
        await ctx.kv.put("users", "users/loop", {"depth": ctx.depth})

    t = await TriggerRegistry().register(
        conn,
        scope="acme",
        name="loop",
        namespace="users",
        key_pattern="users/*",
        target="loop",
        registered_by="user:1",
    )
    root = uuid.uuid4()
    await emit(
        conn, Mutation("acme", "users", "users/loop", Op.PUT, {}, event_id=root), autocommit=True
    )
    config = DispatcherConfig(poll_interval=0.05, max_trigger_depth=2)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(time_limit=30)
    assert depths == [0, 1, 2]
    assert stats.depth_exceeded == 1
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    cut = await conn.fetch("SELECT * FROM dispatcher.depth_cutoffs")
    assert len(cut) == 1
    row = cut[0]
    assert (row["trigger_id"], row["trigger_name"], row["scope"]) == (t.id, "loop", "acme")
    assert (row["depth"], row["max_depth"]) == (3, 2)
    assert (row["namespace"], row["key"]) == ("users", "users/loop")
    assert row["root"] == str(root)
    assert row["event_id"] != root, "the event of the handler write that went too deep"


async def test_depth_cutoffs_are_kept_for_the_retention_only(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """INSERT INTO dispatcher.depth_cutoffs (outbox_id, event_id, trigger_id, scope,
               trigger_name, target, depth, max_depth, cut_at)
           SELECT n, gen_random_uuid(), 1, 'acme', 't', 'x', 9, 8,
               clock_timestamp() - make_interval(days => n)
           FROM generate_series(1, 4) AS n"""
    )
    config = DispatcherConfig(poll_interval=0.05, depth_cutoff_retention=2.5 * 86_400)
    d = Dispatcher(dsn, HandlerRegistry(), config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(10):
            while await conn.fetchval("SELECT count(*) FROM dispatcher.depth_cutoffs") > 2:
                with anyio.move_on_after(0.05):
                    await d.progressed()
        d.stop()
    left = await conn.fetch("SELECT outbox_id FROM dispatcher.depth_cutoffs ORDER BY 1")
    assert [r["outbox_id"] for r in left] == [1, 2]
