"""Old values: a mutation carries the value its key held before, and everyone downstream
sees it (the payload, handlers, dead letters, the KV store's events, SQL callers)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import asyncpg
import pytest
from schema_history import add_trigger_row, downgrade, functions

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    InvalidInput,
    KvStore,
    LimitExceeded,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit,
    emit_many,
)
from dispatcher.emit import Emitter
from dispatcher.migrate import migrate

pytestmark = pytest.mark.anyio

ONCE = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=1)


async def register(conn: asyncpg.Connection, name: str, target: str, pattern: str) -> int:
    t = await TriggerRegistry().register(
        conn,
        scope="acme",
        name=name,
        namespace="users",
        key_pattern=pattern,
        target=target,
        registered_by="user:1",
        retry=ONCE,
    )
    return t.id


async def payloads(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT payload FROM dispatcher.outbox ORDER BY id")
    return [json.loads(r["payload"]) for r in rows]


async def test_the_kv_store_reports_the_value_it_replaced(conn: asyncpg.Connection) -> None:
    await register(conn, "watch", "watch", "users/*")
    kv = KvStore()
    async with conn.transaction():
        await kv.put(conn, "acme", "users", "users/1", {"plan": "free"})
    async with conn.transaction():
        await kv.put(conn, "acme", "users", "users/1", {"plan": "pro"})
    async with conn.transaction():
        await kv.delete(conn, "acme", "users", "users/1")
    async with conn.transaction():
        missing = await kv.delete(conn, "acme", "users", "users/1")
    assert missing.enqueued == []
    seen = [(p["op"], p["value"], p["old"]) for p in await payloads(conn)]
    assert seen == [
        ("put", {"plan": "free"}, None),
        ("put", {"plan": "pro"}, {"plan": "free"}),
        ("delete", None, {"plan": "pro"}),
    ]


async def test_a_put_whose_old_value_makes_the_event_too_large_writes_nothing(
    conn: asyncpg.Connection,
) -> None:
    await register(conn, "watch", "watch", "users/*")
    kv = KvStore(Emitter(max_payload_bytes=1024))
    async with conn.transaction():
        await kv.put(conn, "acme", "users", "users/1", "x" * 600)
    async with conn.transaction():
        with pytest.raises(LimitExceeded):
            await kv.put(conn, "acme", "users", "users/1", "y" * 600)
        # The failed write was undone (its savepoint), the transaction goes on.
        assert (await kv.get(conn, "acme", "users", "users/1")).value == "x" * 600  # type: ignore[union-attr]
    assert len(await payloads(conn)) == 1


async def test_handlers_and_dead_letters_see_old_values_redacted_like_values(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    seen: list[tuple[Any, Any]] = []

    @handlers.handler("watch")
    async def watch(ctx: HandlerContext) -> None:
        seen.append((ctx.event["value"], ctx.event["old"]))
        # A KV write from a handler carries the value it replaced too.
        await ctx.kv.put("users", "copies/1", {"copy": ctx.event["value"]})

    @handlers.handler("fail")
    async def fail(ctx: HandlerContext) -> None:
        raise RuntimeError("no")

    @handlers.handler("copy")
    async def copy(ctx: HandlerContext) -> None:
        seen.append(("copy", ctx.event["old"]))

    await register(conn, "watch", "watch", "users/*")
    await register(conn, "fail", "fail", "secret/*")
    await register(conn, "copy", "copy", "copies/*")
    kv = KvStore()
    async with conn.transaction():
        await kv.put(conn, "acme", "users", "copies/1", {"copy": "before"})
    await emit(
        conn,
        Mutation("acme", "users", "users/1", Op.PUT, {"n": 2}, old={"n": 1}),
        autocommit=True,
    )
    await emit(
        conn,
        Mutation(
            "acme",
            "users",
            "secret/1",
            Op.PUT,
            {"password": "new-CANARY"},
            old={"password": "old-CANARY", "user": "ann"},
        ),
        autocommit=True,
    )
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0, redact_keys=("password",))
    with anyio.fail_after(30):
        await Dispatcher(dsn, handlers, config=config).run_until_idle()
    assert ({"n": 2}, {"n": 1}) in seen
    assert ("copy", None) in seen  # the seeded put's event: a new key
    assert ("copy", {"copy": "before"}) in seen  # the handler's write replaced the seed
    [dead] = await conn.fetch("SELECT payload FROM dispatcher.dead_letters")
    payload = json.loads(dead["payload"])
    assert payload["old"] == {"password": "[REDACTED]", "user": "ann"}
    assert "CANARY" not in dead["payload"]


async def test_sql_callers_pass_old_by_name_and_it_is_checked(conn: asyncpg.Connection) -> None:
    await register(conn, "watch", "watch", "users/*")
    await conn.execute(
        """SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/1', 'put',
            '{"n": 2}', old => '{"n": 1}')"""
    )
    # Ten arguments, as before the old value existed: old is null.
    await conn.execute(
        """SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/2', 'put',
            '2', 0, NULL, 100, false)"""
    )
    await conn.execute(
        """SELECT * FROM dispatcher.emit_many(ARRAY[gen_random_uuid(), gen_random_uuid()],
            ARRAY['acme', 'acme'], ARRAY['users', 'users'], ARRAY['users/3', 'users/4'],
            ARRAY['put', 'delete'], ARRAY['3', NULL]::jsonb[], ARRAY[0, 0],
            old => ARRAY[NULL, '4']::jsonb[])"""
    )
    assert [(p["key"], p["old"]) for p in await payloads(conn)] == [
        ("users/1", {"n": 1}),
        ("users/2", None),
        ("users/3", None),
        ("users/4", 4),
    ]
    deep = "[" * 300 + "]" * 300
    with pytest.raises(asyncpg.InvalidParameterValueError, match="old is nested more than 256"):
        await conn.execute(
            f"""SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/5',
                'put', '1', old => '{deep}')"""
        )
    with pytest.raises(asyncpg.InvalidParameterValueError, match="root and old too"):
        await conn.execute(
            """SELECT * FROM dispatcher.emit_many(ARRAY[gen_random_uuid()], ARRAY['acme'],
                ARRAY['users'], ARRAY['users/6'], ARRAY['put'], ARRAY['1']::jsonb[],
                ARRAY[0], old => ARRAY['1', '2']::jsonb[])"""
        )
    assert len(await payloads(conn)) == 4


async def test_old_values_are_checked_like_values_before_anything_is_sent(
    conn: asyncpg.Connection,
) -> None:
    await register(conn, "watch", "watch", "users/*")
    with pytest.raises(InvalidInput, match="invalid old="):
        await emit(conn, Mutation("acme", "users", "users/1", Op.PUT, 1, old={1j}), autocommit=True)
    with pytest.raises(InvalidInput, match=r"old.*NUL"):
        await emit(
            conn, Mutation("acme", "users", "users/1", Op.PUT, 1, old="a\0"), autocommit=True
        )
    nested: Any = []
    for _ in range(300):
        nested = [nested]
    with pytest.raises(InvalidInput, match=r"invalid old=.*nested more than 256"):
        await emit(
            conn, Mutation("acme", "users", "users/1", Op.PUT, 1, old=nested), autocommit=True
        )
    small = Emitter(max_payload_bytes=1024)
    with pytest.raises(LimitExceeded):
        await small.emit(
            conn,
            Mutation("acme", "users", "users/1", Op.PUT, "v" * 500, old="o" * 500),
            autocommit=True,
        )
    async with conn.transaction():
        with pytest.raises(LimitExceeded):
            await emit_many(
                conn,
                [
                    Mutation("acme", "users", "users/2", Op.PUT, 1),
                    Mutation("acme", "users", "users/3", Op.PUT, 1, old="o" * 300_000),
                ],
            )
    assert await payloads(conn) == []


# --- the migration ---


async def test_migration_round_trip_keeps_every_grant(empty_dsn: str) -> None:
    """0011 up (the emit functions replaced, their grants made again), down (0010's
    functions back exactly) and up again."""
    role = f"old_producer_{uuid.uuid4().hex[:8]}"
    await migrate(empty_dsn, revision="0010")
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION dispatcher.emit TO {role}")
        at_0010 = await functions(conn)
        await migrate(empty_dsn, revision="0011")
        upgraded = await functions(conn)
        signatures = [f[0] for f in upgraded]
        assert "dispatcher.capture_row()" in signatures
        by_name = {f[0].split("(")[0]: f for f in upgraded}
        assert by_name["dispatcher.emit"][0].endswith(",jsonb)")
        assert by_name["dispatcher.emit_many"][0].endswith(",jsonb[])")
        # The same grants as before: the role on emit, nobody (not PUBLIC) on the rest.
        assert by_name["dispatcher.emit"][2] == at_0010[0][2]
        assert role in by_name["dispatcher.emit"][2]
        assert by_name["dispatcher.emit_many"][2] == at_0010[1][2]
        assert "=X/" not in by_name["dispatcher.capture_row"][2].replace("postgres=X/", "")
        await add_trigger_row(conn, scope="acme", name="watch", namespace="users", prefix="users/")
        # As SQL: the library's emit passes the newest revision's arguments.
        await conn.execute(
            "SELECT dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/1', 'put', '2', "
            "old => '1')"
        )

        await downgrade(empty_dsn, "0010")
        assert await functions(conn) == at_0010
        # The row enqueued with its old value is untouched.
        assert [p["old"] for p in await payloads(conn)] == [1]
        await migrate(empty_dsn, revision="0011")
        assert await functions(conn) == upgraded
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
