"""The dispatcher end to end against real Postgres: every routing branch through a real
poller, fencing, multiple dispatchers, shutdown."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    InvokeTimeout,
    Mutation,
    Op,
    PermanentError,
    PrincipalDirectory,
    RateLimited,
    RetryPolicy,
    TriggerRegistry,
    emit_many,
)
from dispatcher.kv import KvStore
from dispatcher.runtime.settle import Applier
from dispatcher.sql import queries

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=3)
# Breakers are exercised in test_flow_control.py; here failures must not pause triggers.
CONFIG = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)


async def trigger(conn: asyncpg.Connection, name: str, target: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "users",
        "key_pattern": "users/*",
        "target": target,
        "registered_by": "user:1",
        "retry": FAST,
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


async def put(conn: asyncpg.Connection, *keys: str, scope: str = "acme") -> None:
    await emit_many(
        conn, [Mutation(scope, "users", k, Op.PUT, {"k": k}) for k in keys], autocommit=True
    )


async def table(conn: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT * FROM dispatcher.{name} ORDER BY id")


async def test_flaky_handler_succeeds_on_attempt_three(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    seen: list[tuple[int, str]] = []

    @handlers.handler("flaky")
    async def flaky(ctx: HandlerContext) -> None:
        seen.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt < 3:
            raise RuntimeError(f"transient {ctx.attempt}")

    tid = await trigger(conn, "flaky", "flaky")
    await put(conn, "users/1")
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    assert [a for a, _ in seen] == [1, 2, 3]
    assert len({k for _, k in seen}) == 1
    assert seen[0][1].endswith(f":{tid}")
    assert (stats.retried, stats.succeeded, stats.dead_lettered) == (2, 1, 0)
    assert await table(conn, "outbox") == []
    assert await table(conn, "dead_letters") == []


async def test_always_failing_ends_as_one_dead_letter(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    calls = Counter[str]()

    @handlers.handler("broken")
    async def broken(ctx: HandlerContext) -> None:
        calls[str(ctx.event["key"])] += 1
        raise ValueError(f"nope #{ctx.attempt}")

    await trigger(conn, "broken", "broken")
    await put(conn, "users/1", "users/2")
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    dead = await table(conn, "dead_letters")
    assert len(dead) == 2
    assert calls == {"users/1": 3, "users/2": 3}
    for d in dead:
        assert d["reason"] == "handler_error"
        assert d["attempts"] == 3
        assert d["resolution"] == "open"
        errors = json.loads(d["errors"])
        assert [e["attempt"] for e in errors] == [1, 2, 3]
        assert all("ValueError: nope #" in e["message"] for e in errors)
        assert json.loads(d["policy"])["max_attempts"] == 3
    assert await table(conn, "outbox") == []


async def test_permanent_error_dead_letters_on_attempt_one(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    calls: list[int] = []

    @handlers.handler("perm")
    async def perm(ctx: HandlerContext) -> None:
        calls.append(ctx.attempt)
        raise PermanentError("bad payload")

    await trigger(conn, "perm", "perm", retry=RetryPolicy(max_attempts=10))
    await put(conn, "users/1")
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    [dead] = await table(conn, "dead_letters")
    assert (dead["reason"], dead["attempts"]) == ("permanent", 1)
    assert calls == [1]


async def test_missing_target_dead_letters_at_once(dsn: str, conn: asyncpg.Connection) -> None:
    await trigger(conn, "ghost", "not-deployed", retry=RetryPolicy(max_attempts=10))
    await put(conn, "users/1")
    await Dispatcher(dsn, HandlerRegistry(), config=CONFIG).run_until_idle()
    [dead] = await table(conn, "dead_letters")
    assert (dead["reason"], dead["attempts"]) == ("target_not_found", 1)


async def test_dead_letter_handler_marks_handled_once(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()
    handled: list[Any] = []

    @handlers.handler("broken")
    async def broken(ctx: HandlerContext) -> None:
        raise RuntimeError("always")

    @handlers.handler("on_dead")
    async def on_dead(ctx: HandlerContext) -> None:
        handled.append((ctx.event["dead_letter_id"], ctx.event["reason"], ctx.event["event"]))

    await trigger(conn, "broken", "broken")
    await trigger(conn, "dlh", "on_dead", is_dead_letter_handler=True)
    await trigger(conn, "dlh-other-ns", "on_dead", is_dead_letter_handler=True, namespace="x")
    await put(conn, "users/1", "users/2")
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    dead = await table(conn, "dead_letters")
    assert [d["resolution"] for d in dead] == ["handled", "handled"]
    assert sorted(h[0] for h in handled) == [d["id"] for d in dead]
    assert {h[1] for h in handled} == {"handler_error"}
    assert {h[2]["key"] for h in handled} == {"users/1", "users/2"}


async def test_failing_dead_letter_handler_is_not_retried(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    runs: list[int] = []

    @handlers.handler("broken")
    async def broken(ctx: HandlerContext) -> None:
        raise RuntimeError("always")

    @handlers.handler("bad_handler")
    async def bad_handler(ctx: HandlerContext) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("handler is broken too")

    await trigger(conn, "broken", "broken")
    await trigger(
        conn,
        "dlh",
        "bad_handler",
        is_dead_letter_handler=True,
        retry=RetryPolicy(base_delay=0, max_delay=0, max_attempts=5),
    )
    await put(conn, "users/1")
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    [dead] = await table(conn, "dead_letters")
    assert dead["resolution"] == "handler_failed"
    assert "handler is broken too" in dead["resolution_note"]
    assert runs == [1]
    assert stats.dead_lettered == 1  # the handler's failure made no dead letter of its own
    assert await table(conn, "outbox") == []


async def test_sync_invoke_returns_the_reply(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("quote")
    async def quote(ctx: HandlerContext) -> dict[str, Any]:
        value = ctx.event["value"]
        assert isinstance(value, dict)
        return {"price": value["qty"] * 3, "as": ctx.principal.id}

    @handlers.handler("fails")
    async def fails(ctx: HandlerContext) -> None:
        raise RuntimeError("sync failure")

    tid = await trigger(conn, "quote", "quote", retry=RetryPolicy(max_attempts=5))
    bad = await trigger(conn, "fails", "fails", retry=RetryPolicy(max_attempts=5))
    d = Dispatcher(dsn, handlers, config=CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        result = await d.invoke(tid, {"qty": 7}, time_limit=10)
        failed = await d.invoke(bad, {}, time_limit=10)
        d.stop()
    assert (result.status, result.result, result.error) == (
        200,
        {"price": 21, "as": "user:1"},
        None,
    )
    assert failed.status == 500
    assert failed.error is not None
    assert "sync failure" in failed.error.message
    assert d.stats.retried == 0
    assert await table(conn, "outbox") == []
    assert await table(conn, "dead_letters") == []


async def test_sync_caller_that_gave_up_leaves_an_abandoned_row(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    release = anyio.Event()
    started = anyio.Event()

    @handlers.handler("slow")
    async def slow(ctx: HandlerContext) -> str:
        started.set()
        await release.wait()
        return "late"

    tid = await trigger(conn, "slow", "slow")
    d = Dispatcher(dsn, handlers, config=CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with pytest.raises(InvokeTimeout):
            await d.invoke(tid, {"x": 1}, time_limit=0.5)
        with anyio.fail_after(10):
            await started.wait()
        release.set()
        with anyio.fail_after(10):
            while d.stats.abandoned == 0:
                await d.progressed()
        d.stop()
    [row] = await table(conn, "abandoned_executions")
    assert (row["status"], row["outcome"], json.loads(row["result"])) == (200, "success", "late")
    assert row["trigger_id"] == tid
    assert await table(conn, "outbox") == []


async def test_a_dead_callers_reply_is_recorded_with_its_rows_settlement(
    dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synchronous row whose calling process died: its reply is recorded as abandoned in
    the transaction that deletes the row, never in a later one a crash could lose."""
    tid = await trigger(conn, "slow", "slow")
    q = queries()
    await conn.fetchrow(
        q.insert_invocation,
        uuid.uuid4(), json.dumps({"x": 1}), 0, "gone-inbox:1", "gone-inbox", -1.0, tid,
        uuid.uuid4(), 0.0, None,
    )  # fmt: skip
    # Its lease ran out with its process.
    await conn.execute("UPDATE dispatcher.outbox SET due_at = clock_timestamp() - interval '1s'")

    async def after_commit(*_: object) -> None:
        raise AssertionError("a reply nobody waits for was left to a second transaction")

    monkeypatch.setattr(Applier, "_deliver", after_commit)
    stats = await Dispatcher(dsn, HandlerRegistry(), config=CONFIG).run_until_idle()
    assert stats.abandoned == 1
    [row] = await table(conn, "abandoned_executions")
    assert (row["reply_to"], row["trigger_id"], row["outcome"]) == ("gone-inbox:1", tid, "failure")
    assert await table(conn, "outbox") == []


async def test_self_triggering_handler_stops_at_depth_limit(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    depths: list[int] = []

    @handlers.handler("loop")
    async def loop(ctx: HandlerContext) -> None:
        depths.append(ctx.depth)
        await ctx.kv.put("users", "users/loop", {"depth": ctx.depth})

    await trigger(conn, "loop", "loop")
    await put(conn, "users/loop")
    config = DispatcherConfig(poll_interval=0.05, max_trigger_depth=4)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    assert depths == [0, 1, 2, 3, 4]
    assert stats.depth_exceeded == 1
    assert await table(conn, "dead_letters") == []
    assert await table(conn, "outbox") == []
    entry = await KvStore().get(conn, "acme", "users", "users/loop")
    assert entry is not None
    assert entry.value == {"depth": 4}


async def test_revoked_principal_dead_letters_without_retries(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    ran_as: list[str] = []

    @handlers.handler("act")
    async def act(ctx: HandlerContext) -> None:
        ran_as.append(ctx.principal.id)

    await trigger(conn, "good", "act", registered_by="user:ok", retry=RetryPolicy(max_attempts=9))
    await trigger(conn, "bad", "act", registered_by="user:gone", retry=RetryPolicy(max_attempts=9))
    directory = PrincipalDirectory(["user:ok", "user:gone"])
    directory.revoke("user:gone")
    await put(conn, "users/1")
    await Dispatcher(dsn, handlers, config=CONFIG, principals=directory).run_until_idle()
    assert ran_as == ["user:ok"]
    [dead] = await table(conn, "dead_letters")
    assert (dead["reason"], dead["attempts"], dead["registered_by"]) == (
        "permission_denied",
        1,
        "user:gone",
    )


async def test_rate_limited_reschedules_without_consuming_attempts(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    attempts: list[int] = []

    @handlers.handler("limited")
    async def limited(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) < 4:
            raise RateLimited(0.01)

    await trigger(conn, "limited", "limited", retry=RetryPolicy(max_attempts=1))
    await put(conn, "users/1")
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    assert attempts == [1, 1, 1, 1]
    assert (stats.rescheduled, stats.succeeded, stats.dead_lettered) == (3, 1, 0)


async def test_short_backoff_is_claimed_when_due_not_at_the_next_poll(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    retried = anyio.Event()
    attempts: list[int] = []

    @handlers.handler("once")
    async def once(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("transient")
        retried.set()

    retry = RetryPolicy(kind="constant", base_delay=0.2, max_delay=0.2, jitter=0, max_attempts=3)
    await trigger(conn, "once", "once", retry=retry)
    await put(conn, "users/1")
    # A poll interval far longer than the wait below, and no wake-up hints: only the
    # dispatcher's own knowledge of when it rescheduled the row can bring it back in time.
    config = DispatcherConfig(poll_interval=60, listen=False, breaker_threshold=0)
    d = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        d.wake()
        with anyio.fail_after(15):
            await retried.wait()
        d.stop()
    assert attempts == [1, 2]
    assert d.stats.succeeded == 1


async def test_timeouts_stop_async_and_blocking_handlers(
    dsn: str, conn: asyncpg.Connection
) -> None:
    import threading

    handlers = HandlerRegistry(max_threads=4)
    stop_threads = threading.Event()
    cancelled: list[bool] = []

    @handlers.handler("hang")
    async def hang(ctx: HandlerContext) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(True)

    @handlers.handler("block", blocking=True)
    def block(ctx: HandlerContext) -> None:
        stop_threads.wait(30)

    policy = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=2)
    await trigger(conn, "hang", "hang", retry=policy, execution_timeout=0.2)
    await trigger(conn, "block", "block", retry=policy, execution_timeout=0.2)
    try:
        await put(conn, "users/1")
        await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    finally:
        stop_threads.set()
    dead = await table(conn, "dead_letters")
    assert sorted((d["trigger_name"], d["reason"], d["attempts"]) for d in dead) == [
        ("block", "timeout", 2),
        ("hang", "timeout", 2),
    ]
    assert cancelled == [True, True]
    assert handlers.threads_abandoned == 2


@pytest.mark.parametrize(
    "exc",
    [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), type("Custom", (BaseException,), {})()],
    ids=["SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException"],
)
async def test_base_exceptions_dead_letter_and_the_dispatcher_keeps_running(
    dsn: str, conn: asyncpg.Connection, exc: BaseException
) -> None:
    handlers = HandlerRegistry()
    ok: list[str] = []

    @handlers.handler("evil")
    async def evil(ctx: HandlerContext) -> None:
        raise exc

    @handlers.handler("fine")
    async def fine(ctx: HandlerContext) -> None:
        ok.append(str(ctx.event["key"]))

    await trigger(conn, "evil", "evil", key_pattern="users/evil")
    await trigger(conn, "fine", "fine", key_pattern="users/fine*")
    await put(conn, "users/evil", "users/fine1")
    d = Dispatcher(dsn, handlers, config=CONFIG)
    await d.run_until_idle(include_scheduled=True)
    [dead] = await table(conn, "dead_letters")
    assert dead["reason"] == "permanent"
    assert type(exc).__name__ in json.loads(dead["errors"])[0]["message"]
    # Still alive afterwards: a second run drains new work.
    await put(conn, "users/fine2")
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle()
    assert ok == ["users/fine1", "users/fine2"]


async def test_hostile_error_text_is_sanitised_and_bounded(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("noisy")
    async def noisy(ctx: HandlerContext) -> None:
        raise RuntimeError("nul\x00here " + "\ud800" + "x" * 1_000_000)

    await trigger(conn, "noisy", "noisy", retry=RetryPolicy(max_attempts=1))
    await put(conn, "users/1")
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle()
    [dead] = await table(conn, "dead_letters")
    [error] = json.loads(dead["errors"])
    assert "\x00" not in error["message"]
    assert "nulhere" in error["message"]
    assert len(error["message"]) <= 8192
    assert "omitted" in error["message"]


async def test_two_dispatchers_drain_without_double_execution(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    runs = Counter[str]()

    @handlers.handler("count")
    async def count(ctx: HandlerContext) -> None:
        runs[ctx.idempotency_key] += 1
        await anyio.lowlevel.checkpoint()

    await trigger(conn, "count", "count")
    for start in range(0, 2000, 500):
        await put(conn, *[f"users/{i}" for i in range(start, start + 500)])
    config = DispatcherConfig(poll_interval=0.05, batch_size=50, concurrency=50)
    a = Dispatcher(dsn, handlers, config=config)
    b = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: a.run_until_idle(time_limit=90))
        tg.start_soon(lambda: b.run_until_idle(time_limit=90))
    assert len(runs) == 2000
    assert max(runs.values()) == 1
    assert a.stats.succeeded + b.stats.succeeded == 2000
    assert a.stats.succeeded > 0
    assert b.stats.succeeded > 0
    assert await table(conn, "outbox") == []


async def test_backdated_lease_is_rerun_and_the_stale_completion_changes_nothing(
    dsn: str, conn: asyncpg.Connection
) -> None:
    first_started = anyio.Event()
    release_first = anyio.Event()
    executions: list[str] = []

    slow = HandlerRegistry()

    @slow.handler("work")
    async def work_slow(ctx: HandlerContext) -> None:
        executions.append("a")
        first_started.set()
        await release_first.wait()

    fast = HandlerRegistry()

    @fast.handler("work")
    async def work_fast(ctx: HandlerContext) -> None:
        executions.append("b")

    await trigger(conn, "work", "work")
    await put(conn, "users/1")
    # One permit: while its handler hangs, A cannot re-claim the row itself.
    a = Dispatcher(dsn, slow, config=DispatcherConfig(poll_interval=0.05, concurrency=1))
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        with anyio.fail_after(10):
            await first_started.wait()
        # Simulate a lease that expired while A still works (a partition, a GC pause).
        await conn.execute(
            "UPDATE dispatcher.outbox SET due_at = clock_timestamp() - interval '1s'"
        )
        b = Dispatcher(dsn, fast, config=CONFIG)
        await b.run_until_idle()
        assert b.stats.succeeded == 1
        release_first.set()
        with anyio.fail_after(10):
            while a.stats.stale == 0:
                await a.progressed()
        a.stop()
    assert executions == ["a", "b"]
    assert a.stats.succeeded == 0
    assert await table(conn, "outbox") == []


async def test_stop_with_rows_in_flight_leaves_nothing_leased(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    started = 0
    all_started = anyio.Event()

    @handlers.handler("stuck")
    async def stuck(ctx: HandlerContext) -> None:
        nonlocal started
        started += 1
        if started == 20:
            all_started.set()
        await anyio.sleep_forever()

    await trigger(conn, "stuck", "stuck", execution_timeout=60)
    await put(conn, *[f"users/{i}" for i in range(20)])
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05, grace_period=0.2))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            await all_started.wait()
            assert d.status().in_flight == 20
            d.stop()
    assert d.status().phase == "stopped"
    rows = await table(conn, "outbox")
    assert len(rows) == 20
    assert all(r["lease_token"] is None for r in rows)
    assert all(r["attempts"] == 0 and r["orphans"] == 0 for r in rows)
    assert d.stats.released == 20


async def test_stop_lets_in_flight_work_finish_within_grace(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    gate = anyio.Event()
    started = anyio.Event()

    @handlers.handler("short")
    async def short(ctx: HandlerContext) -> None:
        started.set()
        await gate.wait()

    await trigger(conn, "short", "short")
    await put(conn, "users/1")
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05, grace_period=30))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            await started.wait()
            d.stop()
            gate.set()
    assert d.stats.succeeded == 1
    assert await table(conn, "outbox") == []


async def test_claim_plan_uses_the_index(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        INSERT INTO dispatcher.outbox (event_id, trigger_id, scope, trigger_name, target,
            registered_by, payload, retry_kind, retry_base_delay, retry_factor,
            retry_max_delay, retry_jitter, max_attempts, timeout, due_at)
        SELECT gen_random_uuid(), 1, 'acme', 't', 'x', 'u', '{}', 'constant', 1, 1, 1, 0, 3,
            30, clock_timestamp() + (i % 100 - 50) * interval '1 minute'
        FROM generate_series(1, 50000) AS i
        """
    )
    await conn.execute("ANALYZE dispatcher.outbox")
    from dispatcher.sql import queries

    # With and without triggers this process holds back ($5, its local breaker view).
    for held in ([], [1, 2, 3]):
        plan = await conn.fetch("EXPLAIN " + queries().claim, 100, uuid.uuid4(), "inbox", 5.0, held)
        text = "\n".join(r[0] for r in plan)
        assert "outbox_due_idx" in text, text
        assert "Seq Scan on outbox" not in text, text


async def _one_permit_dispatcher(dsn: str, conn: asyncpg.Connection) -> tuple[Dispatcher, int]:
    """A dispatcher with a gate of one permit, and a sync trigger whose handler returns 1."""
    handlers = HandlerRegistry()

    @handlers.handler("q")
    async def q(ctx: HandlerContext) -> int:
        return 1

    tid = await trigger(conn, "q", "q")
    return Dispatcher(
        dsn, handlers, config=DispatcherConfig(concurrency=1, poll_interval=0.05)
    ), tid


async def test_invoke_answers_503_when_the_gate_is_full(dsn: str, conn: asyncpg.Connection) -> None:
    d, tid = await _one_permit_dispatcher(dsn, conn)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        assert d.gate.try_acquire()
        busy = await d.invoke(tid, None, time_limit=5)
        d.gate.release()
        ok = await d.invoke(tid, None, time_limit=5)
        d.stop()
    assert busy.status == 503
    assert busy.error is not None
    assert busy.error.kind == "gate_saturated"
    assert (ok.status, ok.result) == (200, 1)
    assert await table(conn, "outbox") == []


async def test_invoke_answering_503_still_lets_other_tasks_run(
    dsn: str, conn: asyncpg.Connection
) -> None:
    # A caller that retries on 503 in a loop must not starve the event loop (and with it
    # the dispatcher's own executions and settlements): every invoke is a checkpoint.
    d, tid = await _one_permit_dispatcher(dsn, conn)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    statuses = Counter[int]()
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        assert d.gate.try_acquire()
        async with anyio.create_task_group() as inner:
            inner.start_soon(ticker)
            await anyio.lowlevel.checkpoint()
            before = ticks
            for _ in range(50):
                statuses[(await d.invoke(tid, None, time_limit=5)).status] += 1
            during = ticks - before
            inner.cancel_scope.cancel()
        d.gate.release()
        d.stop()
    assert statuses == {503: 50}
    assert during >= 25, during


async def test_fan_out_recursion_stops_at_the_per_root_budget(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    runs: list[int] = []

    @handlers.handler("split")
    async def split(ctx: HandlerContext) -> None:
        runs.append(ctx.depth)
        key = str(ctx.event["key"])
        # Each execution writes two keys its own trigger matches: 2^depth rows per level.
        await ctx.kv.put("users", f"{key}/a", 1)
        await ctx.kv.put("users", f"{key}/b", 1)

    await trigger(conn, "split", "split")
    await put(conn, "users/root")
    config = DispatcherConfig(
        poll_interval=0.05, max_trigger_depth=8, max_executions_per_root=20, breaker_threshold=0
    )
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    # Without the budget: 2^9 - 1 = 511 executions. With it: the root plus 20 descendants.
    assert len(runs) == 21
    assert stats.budget_exceeded > 0
    assert stats.depth_exceeded == 0
    assert await table(conn, "dead_letters") == []
    assert await table(conn, "outbox") == []
    # The KV writes themselves went through; only their trigger rows were held back.
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.kv") > 21


async def test_a_row_whose_hint_was_folded_is_claimed_by_the_follow_up_polls(
    dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatcher.runtime import poller

    # Lingering long enough that the test's own pace cannot outrun it; the poll tick far
    # longer than the wait below: only the polls that follow a hint can find row 2.
    monkeypatch.setattr(poller, "NOTIFY_LINGER", 30.0)
    handlers = HandlerRegistry()
    started: dict[str, anyio.Event] = {"users/1": anyio.Event(), "users/2": anyio.Event()}

    @handlers.handler("seen")
    async def seen(ctx: HandlerContext) -> None:
        started[str(ctx.event["key"])].set()

    await trigger(conn, "seen", "seen")
    emit = (
        "SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', $1, 'put',"
        " '{}'::jsonb, 0, NULL, 100, $2)"
    )
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=60, breaker_threshold=0))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(15):
            # Its LISTEN is in place (durable state on the server), so the hint is heard.
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'dispatcher:listen' AND query LIKE 'LISTEN%'"
            ):
                with anyio.move_on_after(0.2):  # its LISTEN set up, it claims: progress
                    await d.progressed()
            await conn.execute(emit, "users/1", True)  # with the wake-up hint
            await started["users/1"].wait()
            # Committed after the hint, with none of its own (as a producer folds it).
            await conn.execute(emit, "users/2", False)
            await started["users/2"].wait()
        d.stop()
