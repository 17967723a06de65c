"""Issue 7: circuit breakers, pause and resume, drain mode, parked rows, max event age —
against real Postgres with real dispatchers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

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
    RateLimited,
    RetryPolicy,
    TriggerRegistry,
    emit_many,
)
from dispatcher.flow import FlowControl

pytestmark = pytest.mark.anyio

FLOW = FlowControl()


async def trigger(conn: asyncpg.Connection, name: str, target: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "users",
        "key_pattern": f"{name}/*",
        "target": target,
        "registered_by": "user:1",
        "retry": RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=50),
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


async def put(conn: asyncpg.Connection, prefix: str, n: int, scope: str = "acme") -> None:
    await emit_many(
        conn,
        [Mutation(scope, "users", f"{prefix}/{i}", Op.PUT, i) for i in range(n)],
        autocommit=True,
    )


async def wait_until(d: Dispatcher, condition: Any, limit: float = 20) -> None:
    with anyio.fail_after(limit):
        while not condition():
            with anyio.move_on_after(0.2):
                await d.progressed()


async def test_breaker_opens_holds_rows_then_lets_one_probe_through(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    runs: list[datetime] = []

    @handlers.handler("down")
    async def down(ctx: HandlerContext) -> None:
        runs.append(datetime.now(UTC))
        raise ConnectionError("upstream down")

    tid = await trigger(conn, "down", "down")
    await put(conn, "down", 5)
    config = DispatcherConfig(
        poll_interval=0.05, concurrency=1, breaker_threshold=3, breaker_cooldown=1.0
    )
    d = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        await wait_until(d, lambda: d.stats.breakers_opened >= 1)
        # Rows claimed before the breaker opened may still run; wait for them to settle and
        # for one claim that started after the opening.
        claims = d.stats.claims
        await wait_until(d, lambda: d.stats.claims > claims + 1 and d.status().in_flight == 0)
        await wait_until(d, lambda: not d._busy())
        opened = await conn.fetchrow("SELECT * FROM dispatcher.breakers WHERE trigger_id = $1", tid)
        assert opened["state"] == "open"
        attempts_at_open = await conn.fetchval(
            "SELECT sum(attempts) FROM dispatcher.outbox WHERE trigger_id = $1", tid
        )
        runs_at_open = len(runs)
        # The probe: exactly one execution after the cool-down, which fails and re-opens.
        await wait_until(d, lambda: d.stats.breakers_opened >= 2)
        d.stop()
    assert len(runs) == runs_at_open + 1
    assert runs[-1] >= opened["open_until"]
    attempts_after = await conn.fetchval(
        "SELECT sum(attempts) FROM dispatcher.outbox WHERE trigger_id = $1", tid
    )
    assert attempts_after == attempts_at_open + 1
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 5
    [b] = await FLOW.breakers(conn)
    assert (b.trigger_id, b.state, b.opened_count) == (tid, "open", 2)


async def test_probe_success_closes_the_breaker_and_the_rest_drains(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    healthy = False

    @handlers.handler("flappy")
    async def flappy(ctx: HandlerContext) -> None:
        if not healthy:
            raise ConnectionError("down for now")

    tid = await trigger(conn, "flappy", "flappy")
    await put(conn, "flappy", 6)
    config = DispatcherConfig(
        poll_interval=0.05, concurrency=1, breaker_threshold=3, breaker_cooldown=0.5
    )
    d = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        await wait_until(d, lambda: d.stats.breakers_opened >= 1)
        healthy = True
        await wait_until(d, lambda: d.stats.succeeded == 6)
        d.stop()
    assert d.stats.breakers_closed == 1
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    assert (await conn.fetchrow("SELECT * FROM dispatcher.breakers WHERE trigger_id = $1", tid))[
        "state"
    ] == "closed"


async def test_two_dispatchers_honour_the_same_breaker(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    runs: list[datetime] = []

    @handlers.handler("down")
    async def down(ctx: HandlerContext) -> None:
        runs.append(datetime.now(UTC))
        raise ConnectionError("upstream down")

    tid = await trigger(conn, "down", "down")
    await put(conn, "down", 20)
    config = DispatcherConfig(
        poll_interval=0.05, concurrency=2, breaker_threshold=3, breaker_cooldown=1.0
    )
    a = Dispatcher(dsn, handlers, config=config)
    b = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await wait_until(a, lambda: a.stats.breakers_opened + b.stats.breakers_opened >= 1)
        # Let anything claimed before the breaker opened finish.
        await wait_until(a, lambda: a.status().in_flight == 0 and b.status().in_flight == 0)
        opened = await conn.fetchrow("SELECT * FROM dispatcher.breakers WHERE trigger_id = $1", tid)
        before = len([r for r in runs if r < opened["open_until"]])
        await wait_until(a, lambda: a.stats.breakers_opened + b.stats.breakers_opened >= 2)
        a.stop()
        b.stop()
    assert len(runs) == before + 1  # one probe between both processes
    assert runs[-1] >= opened["open_until"]


async def test_paused_trigger_accumulates_and_drains_after_resume(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    seen: list[str] = []

    @handlers.handler("work")
    async def work(ctx: HandlerContext) -> None:
        seen.append(str(ctx.event["key"]))

    tid = await trigger(conn, "held", "work")
    await trigger(conn, "free", "work")
    await FLOW.pause(conn, trigger_id=tid, note="maintenance")
    await put(conn, "held", 30)
    await put(conn, "free", 5)
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        await wait_until(d, lambda: d.stats.succeeded == 5)
        claims = d.stats.claims
        await wait_until(d, lambda: d.stats.claims >= claims + 3)  # it keeps polling …
        assert all(k.startswith("free/") for k in seen)  # … and never takes a paused row
        assert [p.target for p in await FLOW.pauses(conn)] == [f"trigger {tid} (held)"]
        assert await FLOW.resume(conn, trigger_id=tid)
        await wait_until(d, lambda: d.stats.succeeded == 35)
        d.stop()
    assert sorted(seen) == sorted(
        [f"held/{i}" for i in range(30)] + [f"free/{i}" for i in range(5)]
    )
    assert await FLOW.pauses(conn) == []


async def test_pausing_a_scope_or_everything(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    seen: list[str] = []

    @handlers.handler("work")
    async def work(ctx: HandlerContext) -> None:
        seen.append(f"{ctx.scope}:{ctx.event['key']}")

    await trigger(conn, "a", "work", scope="one")
    await trigger(conn, "a", "work", scope="two")
    await FLOW.pause(conn, scope="one")
    await put(conn, "a", 2, scope="one")
    await put(conn, "a", 2, scope="two")
    await Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05)).run_until_idle(
        include_scheduled=True
    )
    assert sorted(seen) == ["two:a/0", "two:a/1"]
    await FLOW.pause(conn, everything=True)
    await FLOW.resume(conn, scope="one")
    await put(conn, "a", 1, scope="two")
    await Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05)).run_until_idle()
    assert len(seen) == 2
    await FLOW.resume(conn, everything=True)
    await Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05)).run_until_idle()
    assert sorted(seen) == ["one:a/0", "one:a/1", "two:a/0", "two:a/0", "two:a/1"]


async def test_drain_mode_claims_nothing_until_resumed(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    seen: list[str] = []

    @handlers.handler("work")
    async def work(ctx: HandlerContext) -> None:
        seen.append(str(ctx.event["key"]))

    await trigger(conn, "w", "work")
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        d.drain()
        claims = d.stats.claims
        await put(conn, "w", 10)  # the wake-up hint arrives, and is ignored
        with anyio.move_on_after(0.5):
            await wait_until(d, lambda: d.stats.claims > claims + 1)
        assert d.stats.claims <= claims + 1  # at most a claim already under way
        assert seen == []
        assert d.status().phase == "draining"
        d.resume()
        await wait_until(d, lambda: len(seen) == 10)
        d.stop()


async def test_parked_rows_survive_restarts_and_are_unparked(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    policy = RetryPolicy(max_attempts=3, park_on={"target_not_found"})
    tid = await trigger(conn, "later", "not.deployed.yet", retry=policy)
    await put(conn, "later", 5)
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    assert stats.parked == 5
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0
    parked = await FLOW.parked(conn, trigger_id=tid)
    assert len(parked) == 5
    assert {p.reason for p in parked} == {"target_not_found"}
    assert {p.attempts for p in parked} == {0}
    # A restart does not wake them.
    again = await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    assert again.executed == 0
    # Deploy the target, un-park one by command; its success un-parks its siblings.
    done: list[str] = []

    @handlers.handler("not.deployed.yet")
    async def deployed(ctx: HandlerContext) -> None:
        done.append(str(ctx.event["key"]))

    assert await FLOW.unpark(conn, trigger_id=tid, limit=1) == 1
    final = await Dispatcher(
        dsn, handlers, config=DispatcherConfig(poll_interval=0.05, unpark_batch=2)
    ).run_until_idle(include_scheduled=True)
    assert sorted(done) == [f"later/{i}" for i in range(5)]
    assert final.unparked == 4
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


async def test_expired_event_dead_letters_with_reason_expired(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("slow_api")
    async def slow_api(ctx: HandlerContext) -> None:
        raise RateLimited(5.0)

    policy = RetryPolicy(max_attempts=10, max_event_age=1.0)
    await trigger(conn, "old", "slow_api", retry=policy)
    await put(conn, "old", 1)
    await Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05)).run_until_idle(
        include_scheduled=True
    )
    [dead] = await conn.fetch("SELECT * FROM dispatcher.dead_letters")
    assert (dead["reason"], dead["attempts"]) == ("expired", 0)


async def test_scattered_failures_among_successes_do_not_open_the_breaker(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("mostly_ok")
    async def mostly_ok(ctx: HandlerContext) -> None:
        # Every tenth event fails once: many failures per settle batch, never three in a row.
        value = ctx.event["value"]
        assert isinstance(value, int)
        if value % 10 == 0 and ctx.attempt == 1:
            raise ConnectionError("blip")

    await trigger(conn, "mostly", "mostly_ok")
    await put(conn, "mostly", 300)
    config = DispatcherConfig(poll_interval=0.05, batch_size=300, concurrency=300)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(
        include_scheduled=True, time_limit=30
    )
    assert stats.succeeded == 300
    assert stats.retried == 30
    assert stats.breakers_opened == 0
