"""Issue 12: safety valves that hold at the default settings — a breaker that stops a
fast-failing target within a batch, a rate limit that holds its whole trigger, a huge
Retry-After clamped, and a poll loop that survives its own bugs."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
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
from dispatcher.admin import Admin
from dispatcher.core.outcomes import ExecutionResult
from dispatcher.flow import FlowControl
from dispatcher.runtime.connections import Connections
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import NullRecorder, Phase, Stats

pytestmark = pytest.mark.anyio


async def trigger(conn: asyncpg.Connection, name: str, target: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "users",
        "key_pattern": f"{name}/*",
        "target": target,
        "registered_by": "user:1",
        "retry": RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=5),
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


async def put(conn: asyncpg.Connection, prefix: str, n: int) -> None:
    async with conn.transaction():
        await emit_many(
            conn, [Mutation("acme", "users", f"{prefix}/{i}", Op.PUT, i) for i in range(n)]
        )


async def wait_for(dispatchers: list[Dispatcher], condition: Any, limit: float = 30) -> None:
    """Wait, on the dispatchers' progress signals, until ``condition()`` holds."""
    with anyio.fail_after(limit):
        while not condition():
            with anyio.move_on_after(0.2):
                await dispatchers[0].progressed()


async def _calls_until_held(
    dsn: str, conn: asyncpg.Connection, config: DispatcherConfig, processes: int
) -> int:
    """Calls a target failing on every call gets from 1,000 due rows before the breaker
    holds the rest."""
    handlers = HandlerRegistry()
    calls = 0

    @handlers.handler("down")
    async def down(ctx: HandlerContext) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("upstream down")

    tid = await trigger(conn, "down", "down")
    await put(conn, "down", 1000)
    ds = [Dispatcher(dsn, handlers, config=config) for _ in range(processes)]

    def opened() -> bool:
        return sum(d.stats.breakers_opened for d in ds) >= 1

    def quiet() -> bool:
        return all(d.status().in_flight == 0 and not d._busy() for d in ds)

    async with anyio.create_task_group() as tg:
        for d in ds:
            await tg.start(d.run)
        await wait_for(ds, opened)
        # The breaker is open in Postgres: a few more claims (on the poll ticks) find nothing
        # of this trigger, and nothing of it runs any more.
        claims = [d.stats.claims for d in ds]
        await wait_for(
            ds,
            lambda: (
                quiet() and all(d.stats.claims > c + 2 for d, c in zip(ds, claims, strict=True))
            ),
        )
        held_at = calls
        claims = [d.stats.claims for d in ds]
        await wait_for(
            ds, lambda: all(d.stats.claims > c + 2 for d, c in zip(ds, claims, strict=True))
        )
        for d in ds:
            d.stop()
    assert calls == held_at  # held: no call after the breaker opened and settled
    state = await conn.fetchval("SELECT state FROM dispatcher.breakers WHERE trigger_id = $1", tid)
    assert state == "open"
    # Nothing was lost: every row not run is still in the outbox.
    assert (
        await conn.fetchval("SELECT count(*) FROM dispatcher.outbox")
        + (await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters"))
        == 1000
    )
    return calls


async def test_breaker_holds_a_fast_failing_target_at_the_defaults(
    dsn: str, conn: asyncpg.Connection
) -> None:
    config = DispatcherConfig()
    calls = await _calls_until_held(dsn, conn, config, processes=1)
    assert calls <= config.breaker_threshold + config.batch_size, calls


async def test_breaker_holds_a_fast_failing_target_at_concurrency_10(
    dsn: str, conn: asyncpg.Connection
) -> None:
    config = DispatcherConfig(concurrency=10, batch_size=10)
    calls = await _calls_until_held(dsn, conn, config, processes=1)
    assert calls <= 2 * (config.breaker_threshold + 10), calls


@pytest.mark.parametrize(
    "config",
    [DispatcherConfig(), DispatcherConfig(concurrency=10, batch_size=10)],
    ids=["defaults", "concurrency-10"],
)
async def test_two_processes_share_the_breaker_bound(
    dsn: str, conn: asyncpg.Connection, config: DispatcherConfig
) -> None:
    calls = await _calls_until_held(dsn, conn, config, processes=2)
    one = config.breaker_threshold + config.batch_size
    bound = one if config.batch_size == 200 else 2 * one
    assert calls <= 2 * bound, calls


# --- A rate limit holds the target, not one row ---


async def test_a_rate_limit_holds_every_row_of_the_trigger_in_every_process(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    calls: list[datetime] = []
    limited_until: datetime | None = None

    @handlers.handler("api")
    async def api(ctx: HandlerContext) -> None:
        # The target answers "rate limited, retry after 1.5 s" for 1.5 s after its first call.
        nonlocal limited_until
        now = datetime.now(UTC)
        calls.append(now)
        if limited_until is None:
            limited_until = now + timedelta(seconds=1.5)
        if now < limited_until:
            raise RateLimited(1.5)

    tid = await trigger(conn, "api", "api", retry=RetryPolicy(max_attempts=1))
    await put(conn, "api", 20)
    config = DispatcherConfig(poll_interval=0.05, concurrency=1)
    ds = [Dispatcher(dsn, handlers, config=config) for _ in range(2)]
    async with anyio.create_task_group() as tg:
        for d in ds:
            await tg.start(d.run)
        await wait_for(ds, lambda: sum(d.stats.rate_limit_holds for d in ds) >= 1)
        # The hold is shared: in Postgres, and visible to an operator.
        held_until = await conn.fetchval(
            "SELECT held_until FROM dispatcher.breakers WHERE trigger_id = $1", tid
        )
        assert held_until is not None
        # (A second process's own limited call may lengthen it: a hold only grows.)
        [breaker] = await FlowControl().breakers(conn)
        assert breaker.trigger_id == tid
        assert breaker.held_until is not None
        assert breaker.held_until >= held_until
        [reported] = (await Admin().status(conn)).breakers
        assert reported.trigger_id == tid
        assert reported.held_until is not None
        assert reported.held_until >= held_until
        # A process that never saw the limit (a fresh one) leaves the trigger alone too.
        late = Dispatcher(dsn, handlers, config=config)
        await tg.start(late.run)
        ds.append(late)
        await wait_for(ds, lambda: sum(d.stats.succeeded for d in ds) == 20)
        for d in ds:
            d.stop()
    assert limited_until is not None
    during = [c for c in calls if c < limited_until]
    # One call per process already running when the limit came; none after, until it ended.
    assert 1 <= len(during) <= 2, during
    assert all(c >= held_until for c in calls[len(during) :])
    assert len(calls) == 20 + len(during)
    stats = [d.stats for d in ds]
    assert sum(st.rescheduled for st in stats) == len(during)
    assert sum(st.retried for st in stats) == sum(st.dead_lettered for st in stats) == 0
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


# --- A huge Retry-After is clamped, not fatal ---


async def test_a_huge_retry_after_is_clamped_and_the_row_kept(
    dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = HandlerRegistry()
    calls = 0

    @handlers.handler("slow_api")
    async def slow_api(ctx: HandlerContext) -> None:
        nonlocal calls
        calls += 1
        raise RateLimited(10 * 86_400.0)

    await trigger(conn, "slow", "slow_api", retry=RetryPolicy(max_attempts=5))
    await put(conn, "slow", 1)
    config = DispatcherConfig(poll_interval=0.05, max_retry_after=60.0)
    caplog.set_level(logging.WARNING, logger="dispatcher")
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle()
    assert calls == 1
    assert (stats.rescheduled, stats.dead_lettered, stats.retry_after_clamped) == (1, 0, 1)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0
    row = await conn.fetchrow(
        "SELECT attempts, extract(epoch FROM due_at - clock_timestamp()) AS due_in"
        " FROM dispatcher.outbox"
    )
    assert row["attempts"] == 0
    assert 50.0 < row["due_in"] <= 60.0
    [record] = [
        r for r in caplog.records if getattr(r, "event", "") == "dispatcher.retry_after_clamped"
    ]
    assert (record.retry_after, record.max_retry_after) == (10 * 86_400.0, 60.0)


# --- The poll loop survives its own bugs; reconnects back off with jitter ---


class RecorderFailingOnce(NullRecorder):
    """A recorder with a bug: its first report of a claim that returned rows raises."""

    def __init__(self) -> None:
        self.raised = anyio.Event()

    def claim(self, seconds: float, rows: int) -> None:
        if rows and not self.raised.is_set():
            self.raised.set()
            raise RuntimeError("injected recorder bug")


async def test_a_bug_in_a_poll_cycle_degrades_backs_off_and_goes_on(
    dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = HandlerRegistry()
    calls = 0

    @handlers.handler("work")
    async def work(ctx: HandlerContext) -> None:
        nonlocal calls
        calls += 1

    await trigger(conn, "work", "work")
    await put(conn, "work", 5)
    recorder = RecorderFailingOnce()
    # A long first backoff (0.5 to 1.5 s with jitter): the degraded status can be seen.
    config = DispatcherConfig(poll_interval=0.05, reconnect_min=1.0)
    d = Dispatcher(dsn, handlers, config=config, recorder=recorder)
    caplog.set_level(logging.ERROR, logger="dispatcher")
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(10):
            await recorder.raised.wait()
        status = d.status()
        assert status.phase is Phase.DEGRADED
        assert status.last_error == "RuntimeError: injected recorder bug"
        await wait_for([d], lambda: d.stats.succeeded == 5)
        assert d.status().phase is not Phase.DEGRADED
        assert d.status().last_error is None
        d.stop()
    # The rows the failed cycle had claimed were given back, not left to expire: each ran
    # exactly once, no attempt or expired claim counted against it.
    assert calls == 5
    assert (d.stats.internal_errors, d.stats.released, d.stats.retried) == (1, 5, 0)
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "dispatcher.poll_error"]
    assert record.exc_info is not None
    assert "injected recorder bug" in str(record.exc_info[1])


class RegistryFailingOnce(HandlerRegistry):
    """An executor with a bug: its first execute raises instead of returning a failure."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def execute(self, target: str, ctx: HandlerContext, time_limit: float) -> ExecutionResult:
        if not self.failed:
            self.failed = True
            raise KeyError("injected registry bug")
        return await super().execute(target, ctx, time_limit)


async def test_an_executor_that_raises_fails_the_attempt_not_the_dispatcher(
    dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = RegistryFailingOnce()
    calls = 0

    @handlers.handler("work")
    async def work(ctx: HandlerContext) -> None:
        nonlocal calls
        calls += 1

    await trigger(conn, "work", "work")
    await put(conn, "work", 1)
    caplog.set_level(logging.ERROR, logger="dispatcher")
    config = DispatcherConfig(poll_interval=0.05)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(time_limit=20)
    assert calls == 1
    assert (stats.internal_errors, stats.retried, stats.succeeded) == (1, 1, 1)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "dispatcher.executor_error"]
    assert record.exc_info is not None


class FixedRandom(random.Random):
    def __init__(self, u: float) -> None:
        super().__init__()
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize(("u", "factor"), [(0.0, 0.5), (0.5, 1.0), (0.999, 1.499)])
async def test_reconnect_backoff_is_jittered(u: float, factor: float) -> None:
    config = DispatcherConfig(reconnect_min=1.0, reconnect_max=8.0)
    signals = Signals()
    signals.stopping = True  # the backoff's sleep returns at once
    c = Connections(
        "postgresql://nobody@127.0.0.1:1/none", config, signals, Stats(), FixedRandom(u)
    )
    before = datetime.now(UTC)
    assert await c.failed(OSError("connection refused"), 2.0) == 4.0
    assert c.backoff_until is not None
    waited = (c.backoff_until - before).total_seconds()
    assert 2.0 * factor <= waited < 2.0 * factor + 0.5
    # Never past reconnect_max, jitter or not.
    await c.failed(OSError("connection refused"), 8.0)
    assert (c.backoff_until - datetime.now(UTC)).total_seconds() <= 8.0
