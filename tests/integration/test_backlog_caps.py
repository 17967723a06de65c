"""Issue 12, item 4: backlog caps. A scope capped at N pending rows refuses an emit that would
take it past N (``BacklogFull``, SQLSTATE 54Q01) inside the caller's transaction, which the
caller rolls back; nothing already queued is dropped, other scopes are not affected, and a
drained scope takes emits again. Every host path, plain SQL, handlers' KV writes, the CLI and
the migration."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import asyncpg
import pytest
from cli_run import assert_error, ok, ok_json, run
from schema_history import add_trigger_row, downgrade, functions
from test_hosts import HOSTS, Host
from test_hosts import django_setup as django_setup  # autouse: Django configured for its hosts

from dispatcher import (
    BacklogFull,
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    InvalidInput,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit,
    emit_many,
    migrate,
)
from dispatcher.core.errors import BACKLOG_FULL_SQLSTATE

pytestmark = pytest.mark.anyio

FLOW = FlowControl()
# Counted again by the next call that enqueues: the count is always exact in these tests.
EVERY_CALL = 1e-6
# Never counted again within a test: the count set_backlog_cap took stays.
NEVER = 86_400.0


async def trigger(conn: asyncpg.Connection, scope: str = "acme", **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": scope,
        "name": "welcome",
        "namespace": "users",
        "key_pattern": "users/*",
        "target": "welcome",
        "registered_by": "user:7",
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


def user(n: int | str, scope: str = "acme") -> Mutation:
    return Mutation(scope, "users", f"users/{n}", Op.PUT, {"n": n})


async def events(conn: asyncpg.Connection, scope: str = "acme") -> set[uuid.UUID]:
    rows = await conn.fetch("SELECT event_id FROM dispatcher.outbox WHERE scope = $1", scope)
    return {r["event_id"] for r in rows}


async def cap_row(conn: asyncpg.Connection, scope: str = "acme") -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM dispatcher.backlog_caps WHERE scope = $1", scope)
    assert row is not None
    return row


async def emit_in_one_transaction(conn: asyncpg.Connection, *ms: Mutation) -> None:
    async with conn.transaction():
        for m in ms:
            await emit(conn, m)


async def outbox_scans(conn: asyncpg.Connection) -> int | None:
    """Sequential scans of the outbox so far, this connection's included (None before
    Postgres 15, which cannot flush a backend's statistics on demand)."""
    if conn.get_server_version().major < 15:
        return None
    await conn.execute("SELECT pg_stat_force_next_flush()")
    return int(
        await conn.fetchval(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'dispatcher.outbox'::regclass"
        )
    )


def assert_full(full: BacklogFull, *, cap: int, backlog: int, adding: int) -> None:
    assert (full.scope, full.cap, full.backlog, full.adding) == ("acme", cap, backlog, adding)
    message = str(full)
    assert "'acme'" in message
    assert f"{backlog} rows pending" in message
    assert f"its cap is {cap}" in message


async def test_an_emit_past_the_cap_is_refused_and_the_queue_kept(
    conn: asyncpg.Connection,
) -> None:
    await trigger(conn)
    await trigger(conn, "globex")
    cap = await FLOW.set_backlog_cap(conn, "acme", 10, recount_interval=EVERY_CALL)
    assert (cap.scope, cap.max_pending, cap.pending) == ("acme", 10, 0)

    queued = [user(i) for i in range(10)]
    for m in queued:
        async with conn.transaction():
            await emit(conn, m)
    assert (await cap_row(conn))["pending"] == 10

    # The 11th, in a transaction that also emitted for another scope: refused, the
    # transaction rolled back whole, the 10 rows queued before untouched.
    with pytest.raises(BacklogFull) as refused:
        await emit_in_one_transaction(conn, user("g", "globex"), user(10))
    assert_full(refused.value, cap=10, backlog=10, adding=1)
    assert await events(conn) == {m.event_id for m in queued}
    assert await events(conn, "globex") == set()

    # Another scope is not capped; a mutation of the full scope that no trigger matches
    # adds nothing, and is not refused.
    nothing = Mutation("acme", "orders", "orders/1", Op.PUT, 1)
    async with conn.transaction():
        await emit(conn, user("g", "globex"))
        assert await emit(conn, nothing) == []
        assert await emit_many(conn, [nothing, user("h", "globex")]) != []
    assert len(await events(conn, "globex")) == 2

    # Lowering the cap below the backlog drops nothing; raising it lets the emit through.
    await FLOW.set_backlog_cap(conn, "acme", 5, recount_interval=EVERY_CALL)
    assert await emit(conn, nothing, autocommit=True) == []
    assert await events(conn) == {m.event_id for m in queued}
    await FLOW.set_backlog_cap(conn, "acme", 11, recount_interval=EVERY_CALL)
    async with conn.transaction():
        await emit(conn, user(10))
    assert len(await events(conn)) == 11


async def test_emit_many_crossing_the_cap_is_refused_whole(conn: asyncpg.Connection) -> None:
    await trigger(conn)
    await trigger(conn, "globex")
    await FLOW.set_backlog_cap(conn, "acme", 10, recount_interval=EVERY_CALL)
    async with conn.transaction():
        await emit_many(conn, [user(i) for i in range(8)])

    # 3 more for acme (and one for globex, in the same call): nothing of the call is written.
    with pytest.raises(BacklogFull) as refused:
        async with conn.transaction():
            await emit_many(conn, [user(8), user("g", "globex"), user(9), user(10)])
    assert_full(refused.value, cap=10, backlog=8, adding=3)
    assert len(await events(conn)) == 8
    assert await events(conn, "globex") == set()

    # Up to the cap exactly, then full.
    async with conn.transaction():
        await emit_many(conn, [user(8), user("g", "globex"), user(9)])
    assert (len(await events(conn)), len(await events(conn, "globex"))) == (10, 1)
    with pytest.raises(BacklogFull):
        async with conn.transaction():
            await emit_many(conn, [user(10)])


async def test_a_refused_emit_counts_nothing_and_never_waits(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await trigger(conn)
    await FLOW.set_backlog_cap(conn, "acme", 2, recount_interval=EVERY_CALL)
    await emit_many(conn, [user(1), user(2)], autocommit=True)
    before = await cap_row(conn)
    assert before["pending"] == 2

    # A refused call's transaction is aborted: a count would go with it, so it takes none
    # (it does not read the outbox), however stale the last one.
    await conn.execute("DELETE FROM dispatcher.outbox")
    scans = await outbox_scans(conn)
    with pytest.raises(BacklogFull):
        async with conn.transaction():
            await emit(conn, user(3))
    assert await outbox_scans(conn) == scans
    assert await cap_row(conn) == before

    # A call that enqueues counts (its own rows included), holding the cap's row until its
    # transaction ends; another producer meanwhile neither waits nor counts.
    await FLOW.set_backlog_cap(conn, "acme", 5, recount_interval=EVERY_CALL)
    other = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await emit(conn, user(4))
            assert (await cap_row(conn))["pending"] == 1
            with anyio.fail_after(10):
                async with other.transaction():
                    await emit(other, user(5))
            assert (await cap_row(other))["pending"] == 0  # not committed yet
        assert (await cap_row(other))["pending"] == 1
    finally:
        await other.close()


async def test_a_repeatable_read_producer_is_not_failed_by_a_count(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await trigger(conn)
    await FLOW.set_backlog_cap(conn, "acme", 100, recount_interval=EVERY_CALL)
    producer = await asyncpg.connect(dsn)
    try:
        async with producer.transaction(isolation="repeatable_read"):
            await producer.fetchval("SELECT 1")  # its snapshot, taken before the count below
            await emit(conn, user(1), autocommit=True)  # counts, and commits the count
            # Counting again needs the cap's row, changed since the snapshot: the
            # serialization failure that raises is caught, the count left to the other.
            await emit(producer, user(2))
        assert len(await events(conn)) == 2
    finally:
        await producer.close()


async def test_a_drained_scope_takes_emits_again(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("welcome")
    async def welcome(ctx: HandlerContext) -> None:
        return None

    await trigger(conn)
    await FLOW.set_backlog_cap(conn, "acme", 3, recount_interval=0.01)
    await emit_many(conn, [user(i) for i in range(3)], autocommit=True)
    await FLOW.set_backlog_cap(conn, "acme", 3, recount_interval=0.01)  # counts 3: full
    with pytest.raises(BacklogFull):
        await emit(conn, user(3), autocommit=True)

    # The dispatchers count a full scope's backlog again after they settle its rows.
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05))
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(30):
            while (await cap_row(conn))["pending"] != 0:
                with anyio.move_on_after(0.2):
                    await d.progressed()
        d.stop()
    await emit(conn, user(3), autocommit=True)

    # Rows deleted by hand: setting the cap again counts them.
    await emit_many(conn, [user(4), user(5)], autocommit=True)
    await FLOW.set_backlog_cap(conn, "acme", 3, recount_interval=NEVER)
    with pytest.raises(BacklogFull):
        await emit(conn, user(6), autocommit=True)
    await conn.execute("DELETE FROM dispatcher.outbox")
    assert (await FLOW.set_backlog_cap(conn, "acme", 3, recount_interval=NEVER)).pending == 0
    await emit(conn, user(6), autocommit=True)


async def test_plain_sql_gets_the_sqlstate(conn: asyncpg.Connection) -> None:
    await trigger(conn)
    single = """SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', $1, 'put',
        '{"plan": "pro"}')"""
    async with conn.transaction():
        assert (await conn.fetchrow(single, "users/1"))["matched"] == 1
    await FLOW.set_backlog_cap(conn, "acme", 1, recount_interval=NEVER)  # full: 1 pending

    bulk = """SELECT * FROM dispatcher.emit_many(ARRAY[gen_random_uuid(), gen_random_uuid()],
        ARRAY['acme', 'acme'], ARRAY['users', 'users'], ARRAY['users/2', 'users/3'],
        ARRAY['put', 'put'], ARRAY['{}', '{}']::jsonb[], ARRAY[0, 0])"""
    for statement, args, adding in ((single, ("users/2",), 1), (bulk, (), 2)):
        with pytest.raises(asyncpg.PostgresError) as refused:
            async with conn.transaction():
                await conn.fetchrow(statement, *args)
        error = refused.value
        assert error.sqlstate == BACKLOG_FULL_SQLSTATE == "54Q01"
        assert "'acme' is full: 1 rows pending, its cap is 1" in error.message
        assert json.loads(error.detail) == {
            "scope": "acme", "cap": 1, "backlog": 1, "adding": adding
        }  # fmt: skip
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 1


def host_mutations() -> list[Mutation]:
    """What each host emits: the first alone (fits under the cap), the rest in one call."""
    return [user(42), user(7), user(43)]


@pytest.mark.parametrize("host", HOSTS, ids=[h.name for h in HOSTS])
async def test_every_host_gets_backlog_full(host: Host, dsn: str, conn: asyncpg.Connection) -> None:
    await trigger(conn)
    await FLOW.set_backlog_cap(conn, "acme", 1, recount_interval=NEVER)
    # The single emit fits (room for 1), the bulk one (2 rows) does not: BacklogFull, and
    # the host's transaction, the single emit's row with it, rolled back.
    with pytest.raises(BacklogFull) as refused:
        await host(dsn, "commit", host_mutations())
    assert_full(refused.value, cap=1, backlog=0, adding=2)
    assert await events(conn) == set()


async def test_a_handler_whose_write_hits_the_cap_is_retried(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    refusals: list[str] = []
    refused = anyio.Event()

    @handlers.handler("sync")
    async def sync(ctx: HandlerContext) -> None:
        try:
            await ctx.kv.put("users", "users/1", {"synced": True})
        except BacklogFull as exc:
            refusals.append(str(exc))
            refused.set()
            raise

    @handlers.handler("welcome")
    async def welcome(ctx: HandlerContext) -> None:
        return None

    retry = RetryPolicy(kind="constant", base_delay=0.1, max_delay=1, jitter=0, max_attempts=50)
    await trigger(conn, name="sync", namespace="orders", key_pattern="orders/*", target="sync",
                  retry=retry)  # fmt: skip
    await trigger(conn)
    await emit(conn, Mutation("acme", "orders", "orders/1", Op.PUT, 1), autocommit=True)
    await FLOW.set_backlog_cap(conn, "acme", 1, recount_interval=NEVER)  # full: 1 pending

    # No breaker: refusals in a row would open it, and hold the retry for its cool-down.
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0)
    d = Dispatcher(dsn, handlers, config=config)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with anyio.fail_after(30):
            await refused.wait()
        # Once the cap is lifted, a retry of the same row writes and emits.
        await FLOW.remove_backlog_cap(conn, "acme")
        with anyio.fail_after(30):
            while await conn.fetchval("SELECT count(*) FROM dispatcher.kv") == 0:
                with anyio.move_on_after(0.2):
                    await d.progressed()
        status = d.status()
        d.stop()
    assert "the backlog of scope 'acme' is full" in refusals[0]
    assert d.stats.retried >= 1
    assert (d.stats.internal_errors, d.stats.dead_lettered) == (0, 0)
    assert status.phase.value not in ("degraded", "stopped")
    assert await conn.fetchval(
        "SELECT count(*) FROM dispatcher.outbox WHERE payload->>'key' = 'users/1'"
    ) in (0, 1)  # enqueued (and perhaps already run)


async def test_cap_values_are_checked(conn: asyncpg.Connection) -> None:
    for bad in (0, -1, 2**63, 1.5, True, "5"):
        with pytest.raises(InvalidInput, match="max_pending"):
            await FLOW.set_backlog_cap(conn, "acme", bad)  # type: ignore[arg-type]
    for interval in (0, -1, float("nan"), float("inf"), 86_401):
        with pytest.raises(InvalidInput, match="recount_interval"):
            await FLOW.set_backlog_cap(conn, "acme", 5, recount_interval=interval)
    with pytest.raises(InvalidInput, match="scope"):
        await FLOW.set_backlog_cap(conn, "", 5)
    assert await FLOW.backlog_caps(conn) == []


async def test_cli_set_list_remove(dsn: str, conn: asyncpg.Connection) -> None:
    await trigger(conn)
    await emit_many(conn, [user(1), user(2)], autocommit=True)

    out = await ok("backlog-caps", "list", "--dsn", dsn)
    assert out.stdout == "no backlog caps\n"
    out = await ok("backlog-caps", "set", "acme", "2", "--dsn", dsn)
    assert out.stdout == (
        "backlog cap of scope acme: 2 pending rows, recounted every 1s; backlog now 2 "
        "(full: emits are refused)\n"
    )
    with pytest.raises(BacklogFull):
        await emit(conn, user(3), autocommit=True)
    await ok("backlog-caps", "set", "globex", "50_000", "--recount-interval", "0.5", "--dsn", dsn)

    listed = await ok_json("backlog-caps", "list", "--dsn", dsn)
    assert [
        (c["scope"], c["max_pending"], c["pending"], c["recount_interval"]) for c in listed
    ] == [
        ("acme", 2, 2, 1.0),
        ("globex", 50_000, 0, 0.5),
    ]
    table = (await ok("backlog-caps", "list", "--dsn", dsn)).stdout
    assert "2 (full)" in table
    assert "2 backlog cap(s)" in table

    out = await ok("backlog-caps", "remove", "acme", "--dsn", dsn)
    assert out.stdout == "backlog cap of scope acme removed\n"
    await emit(conn, user(3), autocommit=True)
    assert_error(
        await run("backlog-caps", "remove", "acme", "--dsn", dsn),
        contains="scope acme has no backlog cap",
    )

    for args in (["acme", "0"], ["acme", "-1"], ["acme", "ten"], ["acme", "1.5"], ["", "5"],
                 ["acme", "5", "--recount-interval", "0"],
                 ["acme", "5", "--recount-interval", "-1"],
                 ["acme", "5", "--recount-interval", "soon"]):  # fmt: skip
        result = await run("backlog-caps", "set", *args, "--dsn", dsn)
        assert_error(result, code=2, contains="Invalid value")
    assert [c.scope for c in await FLOW.backlog_caps(conn)] == ["globex"]


# --- the migration ---


async def emit_at_0010(conn: asyncpg.Connection, n: int) -> None:
    """An emit as a SQL caller makes it at 0009 and 0010 (the library needs 0011)."""
    await conn.execute(
        "SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', $1, 'put', $2)",
        f"users/{n}",
        json.dumps({"n": n}),
    )


async def test_migration_round_trip(empty_dsn: str) -> None:
    """0010 up, down (0007's functions back, exactly, with their grants) and up again."""
    role = f"bc_producer_{uuid.uuid4().hex[:8]}"
    await migrate(empty_dsn, revision="0009")
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        await conn.execute(
            f"GRANT EXECUTE ON FUNCTION dispatcher.emit, dispatcher.emit_many TO {role}"
        )
        at_0009 = await functions(conn)
        await migrate(empty_dsn, revision="0010")
        upgraded = await functions(conn)
        assert [f[0].split("(")[0] for f in upgraded] == ["dispatcher.emit", "dispatcher.emit_many"]
        assert [f[2] for f in upgraded] == [f[2] for f in at_0009]  # grants kept
        assert all(role in f[2] for f in upgraded)
        assert all("backlog_caps" in f[1] and "54Q01" in f[3] for f in upgraded)
        await add_trigger_row(conn, scope="acme", name="t", namespace="users", prefix="users/")
        await emit_at_0010(conn, 1)
        await FLOW.set_backlog_cap(conn, "acme", 1)
        with pytest.raises(asyncpg.PostgresError) as refused:
            await emit_at_0010(conn, 2)
        assert refused.value.sqlstate == BACKLOG_FULL_SQLSTATE

        await downgrade(empty_dsn, "0009")
        assert await functions(conn) == at_0009
        assert await conn.fetchval("SELECT to_regclass('dispatcher.backlog_caps')") is None
        await emit_at_0010(conn, 2)  # no cap any more
        assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 2

        await migrate(empty_dsn, revision="0010")
        assert await functions(conn) == upgraded
        assert await FLOW.backlog_caps(conn) == []
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
