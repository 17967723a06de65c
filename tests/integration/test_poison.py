"""Rows and outcomes that cannot be read or written stop nothing: a poison row is
dead-lettered as ``undecodable``, an outcome Postgres refuses is isolated and its row
dead-lettered as ``unstorable``, delays no timestamp can hold are clamped, policy columns
out of range cannot be written at all, and stalled settlements stop the claiming."""

from __future__ import annotations

import json
from typing import Any

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    InvalidInput,
    Mutation,
    Op,
    RateLimited,
    RetryPolicy,
    TriggerRegistry,
    emit_many,
)
from dispatcher.core.models import MAX_DELAY_SECONDS
from dispatcher.migrate import migrate
from dispatcher.runtime.stats import Phase

pytestmark = pytest.mark.anyio

CONFIG = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)


async def trigger(conn: asyncpg.Connection, name: str, target: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "users",
        "key_pattern": "users/*",
        "target": target,
        "registered_by": "user:1",
        "retry": RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=3),
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


async def put(conn: asyncpg.Connection, *keys: str) -> None:
    await emit_many(
        conn, [Mutation("acme", "users", k, Op.PUT, {"k": k}) for k in keys], autocommit=True
    )


def nested_json(levels: int) -> str:
    return "[" * levels + '"bottom"' + "]" * levels


def ok_handlers(seen: list[str]) -> HandlerRegistry:
    handlers = HandlerRegistry()

    @handlers.handler("ok")
    async def ok(ctx: HandlerContext) -> None:
        seen.append(str(ctx.event["key"]))

    return handlers


async def test_a_payload_too_deep_to_decode_is_dead_lettered_and_the_loop_goes_on(
    dsn: str, conn: asyncpg.Connection
) -> None:
    # What older versions accepted at emit, or another client writes: valid jsonb that
    # json.loads cannot follow (RecursionError). It used to end run() on every start.
    await trigger(conn, "t", "ok")
    await put(conn, *(f"users/{i}" for i in range(20)))
    poison_id = await conn.fetchval(
        "UPDATE dispatcher.outbox SET payload = $1::jsonb "
        "WHERE id = (SELECT min(id) FROM dispatcher.outbox) RETURNING id",
        nested_json(5000),
    )
    seen: list[str] = []
    d = Dispatcher(dsn, ok_handlers(seen), config=CONFIG)
    stats = await d.run_until_idle(time_limit=30)
    assert stats.undecodable == 1
    assert len(seen) == 19, "every other row of the batch ran"
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    dead = await conn.fetchrow("SELECT * FROM dispatcher.dead_letters")
    assert dead["outbox_id"] == poison_id
    assert dead["reason"] == "undecodable"
    errors = json.loads(dead["errors"])
    assert errors[-1]["kind"] == "permanent"
    assert "RecursionError" in errors[-1]["message"]
    assert json.loads(dead["payload"]) == {
        "undecodable": "payload withheld: it could not be decoded"
    }


BAD_POLICY_COLUMNS = [
    ("retry_kind", "'bogus'"),
    ("timeout", "1e300"),
    ("timeout", "'NaN'"),
    ("retry_base_delay", "1e13"),
    ("retry_max_delay", "'Infinity'"),
    ("retry_factor", "'NaN'"),
    ("retry_jitter", "2"),
    ("max_attempts", "0"),
    ("max_event_age", "-1"),
    ("park_on", "ARRAY['handler_error']"),
    ("attempts", "-1"),
]


@pytest.mark.parametrize(("column", "value"), BAD_POLICY_COLUMNS)
async def test_policy_columns_out_of_range_cannot_be_written(
    conn: asyncpg.Connection, column: str, value: str
) -> None:
    await trigger(conn, "t", "ok")
    await put(conn, "users/1")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(f"UPDATE dispatcher.outbox SET {column} = {value}")
    if column != "attempts":
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(f"UPDATE dispatcher.triggers SET {column} = {value}")


async def test_migration_moves_rows_with_bad_policy_columns_to_dead_letters(
    empty_dsn: str,
) -> None:
    await migrate(empty_dsn, revision="0005")
    conn = await asyncpg.connect(empty_dsn)
    try:
        # Written as another client would, against the revision before the checks.
        policy = "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, "
        policy += "max_attempts, timeout"
        await conn.execute(
            f"""INSERT INTO dispatcher.triggers (scope, name, namespace, key_pattern,
                    pattern_kind, match_prefix, ops, target, registered_by, {policy})
                VALUES ('acme', 't', 'users', 'users/*', 'prefix', 'users/', '{{put}}', 'ok',
                    'user:1', 'exponential', 1, 2, 300, 0.1, 5, 30)"""
        )
        await conn.execute(
            f"""INSERT INTO dispatcher.outbox (event_id, trigger_id, scope, trigger_name,
                    target, registered_by, payload, {policy})
                SELECT gen_random_uuid(), t.id, t.scope, t.name, t.target, t.registered_by,
                    jsonb_build_object('key', k), {policy}
                FROM dispatcher.triggers t, unnest(ARRAY['users/1', 'users/2', 'users/3']) k"""
        )
        await conn.execute(
            "UPDATE dispatcher.outbox SET retry_kind = 'bogus' WHERE payload->>'key' = 'users/1'"
        )
        await conn.execute(
            "UPDATE dispatcher.outbox SET timeout = 1e300 WHERE payload->>'key' = 'users/2'"
        )
        await conn.execute("UPDATE dispatcher.triggers SET retry_base_delay = 'NaN'")
        await migrate(empty_dsn)
        dead = await conn.fetch(
            "SELECT payload->>'key' AS key, reason FROM dispatcher.dead_letters ORDER BY 1"
        )
        assert [(r["key"], r["reason"]) for r in dead] == [
            ("users/1", "undecodable"),
            ("users/2", "undecodable"),
        ]
        left = await conn.fetch("SELECT payload->>'key' AS key FROM dispatcher.outbox")
        assert [r["key"] for r in left] == ["users/3"]
        t = await conn.fetchrow("SELECT enabled, retry_base_delay FROM dispatcher.triggers")
        assert (t["enabled"], t["retry_base_delay"]) == (False, 1.0)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "field",
    ["max_rate_limited_age", "breaker_cooldown", "lease_margin", "root_budget_ttl", "grace_period"],
)
def test_config_durations_no_timestamp_can_hold_are_refused(field: str) -> None:
    # max_rate_limited_age=1e14 let RateLimited(1e13) through to a due time that overflows;
    # breaker_cooldown=1e13 failed every settlement that opened a breaker.
    with pytest.raises(InvalidInput, match=field):
        DispatcherConfig(**{field: 1e13})  # type: ignore[arg-type]


async def test_a_huge_retry_after_does_not_stall_settlement(
    dsn: str, conn: asyncpg.Connection
) -> None:
    # RateLimited(1e13) once overflowed the due timestamp: the whole settlement batch failed
    # for ever, logged as "database unavailable", while its rows ran again and again.
    handlers = HandlerRegistry()
    seen: list[str] = []

    @handlers.handler("limited")
    async def limited(ctx: HandlerContext) -> None:
        seen.append(str(ctx.event["key"]))
        if ctx.event["key"] == "users/poison":
            raise RateLimited(1e13)

    await trigger(conn, "t", "limited")
    await put(conn, "users/poison", *(f"users/{i}" for i in range(100)))
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(time_limit=30)
    assert len(seen) == 101, "each row ran once"
    assert stats.succeeded == 100
    assert stats.db_errors == 0
    # Clamped to max_retry_after (the row is kept, no attempt used), not dead-lettered.
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0
    row = await conn.fetchrow("SELECT payload->>'key' AS key, attempts FROM dispatcher.outbox")
    assert (row["key"], row["attempts"]) == ("users/poison", 0)


async def test_a_huge_backoff_is_clamped_to_a_storable_delay(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    calls: list[str] = []

    @handlers.handler("fails")
    async def fails(ctx: HandlerContext) -> None:
        calls.append(str(ctx.event["key"]))
        if ctx.event["key"] == "users/poison":
            raise RuntimeError("try much later")

    await trigger(conn, "huge", "fails", retry=RetryPolicy(base_delay=1e13, max_delay=1e13))
    await put(conn, "users/poison", *(f"users/{i}" for i in range(100)))
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(time_limit=30)
    assert (stats.succeeded, stats.retried, stats.db_errors) == (100, 1, 0)
    row = await conn.fetchrow(
        "SELECT attempts, extract(epoch FROM due_at - clock_timestamp()) AS wait "
        "FROM dispatcher.outbox"
    )
    assert row["attempts"] == 1
    # Jitter spreads it below the cap, never above.
    assert 0.8 * MAX_DELAY_SECONDS < row["wait"] <= MAX_DELAY_SECONDS


async def test_an_outcome_postgres_refuses_is_isolated_and_dead_lettered(
    dsn: str, conn: asyncpg.Connection
) -> None:
    # A constraint added by someone else makes one row's retry unstorable (a data error):
    # the batch is split, that row alone is dead-lettered with the error, the rest settles.
    await conn.execute(
        "ALTER TABLE dispatcher.outbox ADD CONSTRAINT no_retries_for_poison "
        "CHECK (payload->>'key' <> 'users/poison' OR attempts = 0)"
    )
    handlers = HandlerRegistry()

    @handlers.handler("h")
    async def h(ctx: HandlerContext) -> None:
        if ctx.event["key"] == "users/poison":
            raise RuntimeError("fails once, and its retry cannot be stored")

    await trigger(conn, "t", "h")
    await put(conn, "users/poison", *(f"users/{i}" for i in range(100)))
    stats = await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(time_limit=30)
    assert (stats.succeeded, stats.unstorable, stats.db_errors) == (100, 1, 0)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    dead = await conn.fetchrow("SELECT * FROM dispatcher.dead_letters")
    assert dead["reason"] == "unstorable"
    assert json.loads(dead["payload"])["key"] == "users/poison"
    message = json.loads(dead["errors"])[-1]["message"]
    assert "Retry" in message
    assert "no_retries_for_poison" in message


async def test_stalled_settlements_stop_the_claiming(dsn: str, conn: asyncpg.Connection) -> None:
    # Deletes (settlements) wait on a lock the test holds; claims (updates) do not.
    await conn.execute(
        """
        CREATE FUNCTION public.hold_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN OLD; END $$;
        CREATE TRIGGER hold_deletes BEFORE DELETE ON dispatcher.outbox
            FOR EACH ROW EXECUTE FUNCTION public.hold_deletes();
        """
    )
    await trigger(conn, "t", "ok")
    await put(conn, *(f"users/{i}" for i in range(500)))
    seen: list[str] = []
    config = DispatcherConfig(
        poll_interval=0.05, batch_size=10, concurrency=10, max_pending_settlements=20
    )
    d = Dispatcher(dsn, ok_handlers(seen), config=config)
    await conn.execute("SELECT pg_advisory_lock(4242)")
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(20):
            while d.status().phase is not Phase.SETTLING and d.stats.claimed_rows < 200:
                # Once it waits, nothing progresses: look again after a short bounded wait.
                with anyio.move_on_after(0.1):
                    await d.progressed()
        # Bounded: the pending outcomes, plus a batch claimed before they piled up, plus
        # what was running then.
        assert d.status().phase is Phase.SETTLING
        assert d.stats.claimed_rows <= 20 + 10 + 10
        await conn.execute("SELECT pg_advisory_unlock(4242)")
        with anyio.fail_after(30):
            while len(seen) < 500 or await conn.fetchval("SELECT count(*) FROM dispatcher.outbox"):
                with anyio.move_on_after(0.5):
                    await d.progressed()
        d.stop()
    assert sorted(seen) == sorted(f"users/{i}" for i in range(500))
