"""dispatcher.testing against real Postgres: drain, dead_letters, RecordingHandlers."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    InvalidInput,
    Mutation,
    Op,
    PermanentError,
    Principal,
    PrincipalDirectory,
    RateLimited,
    RetryPolicy,
    Success,
    TriggerRegistry,
    emit,
    migrate,
)
from dispatcher.testing import (
    DrainTimeout,
    RecordingHandlers,
    dead_letters,
    drain,
    instant_retries,
)

pytestmark = pytest.mark.anyio


async def add_trigger(
    conn: asyncpg.Connection,
    name: str,
    *,
    scope: str = "acme",
    retry: RetryPolicy | None = None,
) -> int:
    trigger = await TriggerRegistry().register(
        conn,
        scope=scope,
        name=name,
        namespace="users",
        key_pattern="users/*",
        target=name,
        registered_by="user:7",
        retry=retry or instant_retries(2),
    )
    return trigger.id


async def put(conn: asyncpg.Connection, key: str, scope: str = "acme") -> None:
    await emit(conn, Mutation(scope, "users", key, Op.PUT, {"key": key}), autocommit=True)


async def outbox_rows(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dispatcher.outbox"))


async def test_drain_runs_retries_to_the_end_and_dead_letters_are_collected(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.succeed("ok", {"done": True})
    handlers.fail("flaky", ConnectionError("upstream hiccup"), times=1)
    handlers.fail("broken", "always broken")
    ids = {name: await add_trigger(conn, name) for name in ("ok", "flaky", "broken")}
    await add_trigger(conn, "elsewhere", scope="other")
    await put(conn, "users/1")

    stats = await drain(dsn, handlers, time_limit=30, poll_interval=0.05)

    assert (stats.succeeded, stats.retried, stats.dead_lettered) == (2, 2, 1)
    assert await outbox_rows(conn) == 0
    assert [(c.target, c.attempt, c.outcome) for c in handlers.calls_to("flaky")] == [
        ("flaky", 1, "handler_error"),
        ("flaky", 2, "success"),
    ]
    assert [c.attempt for c in handlers.calls_to("broken")] == [1, 2]
    [ok] = handlers.calls_to("ok")
    assert ok.ok
    assert ok.error is None
    assert ok.event["key"] == "users/1"
    assert (ok.scope, ok.trigger_name, ok.trigger_id, ok.depth, ok.principal) == (
        "acme",
        "ok",
        ids["ok"],
        0,
        Principal("user:7"),
    )
    assert ok.principal_id == "user:7"
    assert ok.idempotency_key.endswith(f":{ids['ok']}")
    first = handlers.calls_to("flaky")[0]
    assert first.error is not None
    assert "ConnectionError: upstream hiccup" in first.error
    assert len({c.idempotency_key for c in handlers.calls_to("flaky")}) == 1

    [dead] = await dead_letters(conn)
    assert (dead.trigger_name, dead.reason, dead.attempts, dead.resolution) == (
        "broken",
        "handler_error",
        2,
        "open",
    )
    assert [e.attempt for e in dead.errors] == [1, 2]
    assert all("RuntimeError: always broken" in e.message for e in dead.errors)
    assert isinstance(dead.payload, dict)
    assert dead.payload["key"] == "users/1"
    assert [d.id for d in await dead_letters(conn, "acme", trigger="broken")] == [dead.id]
    assert await dead_letters(conn, "other") == []
    assert await dead_letters(conn, "acme", trigger="ok") == []


async def test_a_call_holds_the_principal_object_the_handler_got(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    got: list[Principal] = []

    @handlers.handler("audited")
    async def audited(ctx: HandlerContext) -> None:
        got.append(ctx.principal)

    directory = PrincipalDirectory()
    directory.add(Principal("user:7", {"team": "billing", "roles": ["admin"]}))
    await add_trigger(conn, "audited")
    await put(conn, "users/1")

    await drain(dsn, handlers, time_limit=30, principals=directory, poll_interval=0.05)

    [call] = handlers.calls
    [principal] = got
    assert call.principal is principal
    assert call.principal == Principal("user:7", {"team": "billing", "roles": ["admin"]})
    assert call.principal.attributes["team"] == "billing"
    assert call.principal_id == "user:7"


async def test_dead_letters_come_oldest_first(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = RecordingHandlers()
    handlers.fail("broken", PermanentError("no"))
    await add_trigger(conn, "broken")
    for i in range(3):
        await put(conn, f"users/{i}")
        await drain(dsn, handlers, time_limit=30, poll_interval=0.05)
    letters = await dead_letters(conn)
    assert [d.payload["key"] for d in letters if isinstance(d.payload, dict)] == [
        "users/0",
        "users/1",
        "users/2",
    ]
    assert [d.id for d in letters] == sorted(d.id for d in letters)
    assert {d.reason for d in letters} == {"permanent"}


async def test_fail_times_then_succeeds_and_unknown_targets_are_recorded(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.fail("twice", RuntimeError("not yet"), times=2, result="finally")
    await add_trigger(conn, "twice", retry=instant_retries(3))
    await add_trigger(conn, "missing")
    await put(conn, "users/1")

    stats = await drain(dsn, handlers, time_limit=30, poll_interval=0.05)

    assert [c.outcome for c in handlers.calls_to("twice")] == [
        "handler_error",
        "handler_error",
        "success",
    ]
    assert handlers.calls_to("twice")[-1].result == Success("finally")
    [missing] = handlers.calls_to("missing")
    assert missing.outcome == "target_not_found"
    assert stats.dead_lettered == 1


async def test_drain_can_stop_at_nothing_due_and_leave_retries_scheduled(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.fail("slow_retry", "later")
    await add_trigger(
        conn, "slow_retry", retry=RetryPolicy(base_delay=3600, max_delay=3600, max_attempts=3)
    )
    await put(conn, "users/1")

    stats = await drain(dsn, handlers, time_limit=30, include_scheduled=False, poll_interval=0.05)

    assert stats.retried == 1
    assert len(handlers.calls) == 1
    assert await outbox_rows(conn) == 1
    assert await dead_letters(conn) == []


async def test_drain_gives_up_after_its_time_limit(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = RecordingHandlers()
    handlers.fail("limited", RateLimited(3600))
    await add_trigger(conn, "limited")
    await put(conn, "users/1")

    with pytest.raises(DrainTimeout, match=r"did not drain within 1s") as caught:
        await drain(dsn, handlers, time_limit=1, poll_interval=0.05)

    assert isinstance(caught.value, TimeoutError)
    assert caught.value.stats.rescheduled == 1
    assert [c.outcome for c in handlers.calls] == ["rate_limited"]
    assert await outbox_rows(conn) == 1


async def test_drain_rejects_a_config_field_that_does_not_exist() -> None:
    with pytest.raises(InvalidInput, match="poll_intervall"):
        await drain("postgresql://never-connected", RecordingHandlers(), poll_intervall=0.05)


async def test_wait_for_calls_follows_a_dispatcher_running_in_the_background(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.succeed("ok")
    await add_trigger(conn, "ok")
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        await put(conn, "users/1")
        await put(conn, "users/2")
        calls = await handlers.wait_for_calls(2, target="ok", time_limit=20)
        [second] = await handlers.wait_for_calls(
            where=lambda c: c.event["key"] == "users/2", time_limit=20
        )
        with pytest.raises(TimeoutError):
            await handlers.wait_for_calls(3, time_limit=0.2)
        d.stop()
    assert sorted(str(c.event["key"]) for c in calls) == ["users/1", "users/2"]
    assert second.ok


async def test_module_docstring_example(dsn: str) -> None:
    # The example of dispatcher.testing's docstring and docs/testing.md, as written there.
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await TriggerRegistry().register(
            conn,
            scope="acme",
            name="welcome",
            namespace="users",
            key_pattern="users/*",
            target="send_welcome",
            registered_by="user:1",
            retry=instant_retries(3),
        )
        handlers = RecordingHandlers()
        handlers.fail("send_welcome", ConnectionError("smtp down"), times=1)
        async with conn.transaction():
            await emit(conn, Mutation("acme", "users", "users/42", Op.PUT, {"email": "a@b.c"}))

        stats = await drain(dsn, handlers, time_limit=10)

        assert [c.attempt for c in handlers.calls] == [1, 2]
        assert handlers.calls[-1].ok
        assert stats.retried == 1
        assert await dead_letters(conn) == []
    finally:
        await conn.close()
