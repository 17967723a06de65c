"""Emitting from each host, side by side in one run: one mutation per transaction on one
connection, one matching trigger (as B1), through every way a host can emit, against the
raw single insert; a captured table's UPDATE against the same UPDATE on an uncaptured twin;
and bulk ``emit_many`` against the SQL function called with arrays.

Each repetition runs every variant for ``emit_seconds`` in turn, round-robin, starting one
variant later each repetition, so that whatever the machine does at a moment hits all of
them alike. Before each window (untimed) the outbox is truncated, the host tables are
vacuumed and a CHECKPOINT is taken; after it the outbox must hold exactly the rows the
window wrote. Ratios are taken within a repetition (the variants of one round shared its
noise), and their medians reported.

The ``tx_`` variants run the single-statement loops inside one transaction that is rolled
back: without commits (and their WAL flushes, the noisiest part of a commit-bound loop),
each reports what one statement costs, client and server, in µs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

import dispatcher
from bench.core import Context, ScenarioResult, repeat
from bench.fixtures import NAMESPACE, SCOPE, mutation, register_triggers
from bench.raw import insert_loop
from bench.scenarios import _emit_loop
from dispatcher.capture import Captures

# The host tables of the UPDATE pair: identical but for the capture trigger.
CAPTURED = "public.accounts_captured"
PLAIN = "public.accounts_plain"
HOST_ROWS = 1_000
WARMUP_SECONDS = 1.0
CAPTURE_SCOPE = "capture"
CAPTURE_PREFIX = "accounts/"
# A scope whose one trigger has a condition every bench mutation meets (so both variants
# write one row): the condition's cost is its evaluation, not fewer inserts.
CONDITION_SCOPE = "conditional"
CONDITION = "new.n >= 0 and new.tag == 'bench' and changed(n)"

# The single-mutation function as any client may call it (the psql recipe's form: the
# first six arguments, the rest defaulted, so every call sends a wake-up hint).
SQL_EMIT = """
    SELECT * FROM dispatcher.emit(gen_random_uuid(), $1::text, $2::text, $3::text, 'put',
        $4::jsonb)"""
# The bulk function with arrays (root, max_fanout, notify and old defaulted).
SQL_EMIT_MANY = """
    SELECT * FROM dispatcher.emit_many($1::uuid[], $2::text[], $3::text[], $4::text[],
        $5::text[], $6::jsonb[], $7::int[])"""

Loop = Callable[[float, int], Awaitable[int]]


@dataclass(frozen=True)
class Variant:
    metric: str
    unit: str
    label: str
    loop: Loop
    # Outbox rows one counted unit writes (0: none).
    rows_per_unit: int
    # Run inside one transaction, rolled back at the end of the window: no commit, so no
    # WAL flush, whose time swings with whatever else the server does. Reported as the
    # cost of one statement (µs), client and server.
    rolled_back: bool = False


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("hosts", "Emitting from each host, 1 mutation/tx, 1 trigger, 1 conn")
    sz = ctx.sizes
    secs = sz.emit_seconds
    per_call = sz.bulk_mutations_per_call
    result.notes.append(
        f"each variant {secs:g}s per repetition, round-robin (the start moves one variant on "
        "per repetition); rates = units / wall time of the window; 1 matching trigger; "
        "before each window (untimed): TRUNCATE outbox, VACUUM host tables, CHECKPOINT"
    )
    result.notes.append(
        "raw_insert: bench.raw's one-row INSERT into the outbox, autocommit (asyncpg); "
        "emit_asyncpg: `await emit(conn, m, autocommit=True)` (as B1); "
        "emit_sync_psycopg: `with conn.transaction(): emit_sync(conn, m)` (psycopg 3, sync, "
        "in a thread); emit_sqlalchemy_async: `async with session.begin(): await emit(session, "
        "m)` (one AsyncSession, asyncpg driver, pool of 1); sql_function: `SELECT * FROM "
        "dispatcher.emit(gen_random_uuid(), scope, namespace, key, 'put', value)` over asyncpg, "
        "autocommit (defaults: a wake-up hint every call)"
    )
    result.notes.append(
        f"update_captured / update_plain: `UPDATE <t> SET n = $2 WHERE id = $1` (autocommit, "
        f"ids cycling over {HOST_ROWS} rows of (id int PK, plan text, n bigint)); the captured "
        "table has Captures().add(…, keys=['id']) and 1 trigger matching its keys"
    )
    result.notes.append(
        f"bulk_emit_many: `emit_many` of {per_call} Mutations per call, autocommit; "
        f"bulk_sql_function: the same {per_call} mutations as arrays (uuid4s, keys, JSON "
        "texts built in Python) to `SELECT * FROM dispatcher.emit_many(...)`, autocommit; "
        "both count mutations (1 outbox row each)"
    )
    async with ctx.database("hosts") as dsn, contextlib.AsyncExitStack() as stack:
        conn = await asyncpg.connect(dsn)
        stack.push_async_callback(conn.close)
        (trigger,) = await register_triggers(conn, 1)
        await _host_tables(conn)
        variants = await _variants(stack, conn, dsn, trigger, per_call)
        # Warm-up, discarded: connections, prepared statements, generic plans, caches.
        for k, v in enumerate(variants):
            await _measure(conn, v, min(secs, WARMUP_SECONDS), k * 1_000_000)

        async def once(run: int) -> str:
            start = run % len(variants)
            parts = []
            for k, v in enumerate(variants[start:] + variants[:start]):
                offset = (run + 1) * 100_000_000 + k * 1_000_000
                rate = await _measure(conn, v, secs, offset)
                if v.rolled_back:
                    result.add(v.metric, v.unit, 1e6 / rate)
                    parts.append(f"{v.label} {1e6 / rate:,.0f} µs")
                else:
                    result.add(v.metric, v.unit, rate)
                    parts.append(f"{v.label} {rate:,.0f}/s")
            return ", ".join(parts)

        await repeat(ctx, result, once)
    _ratios(result)
    return result


async def _host_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(f"""
        CREATE TABLE {CAPTURED} (id integer PRIMARY KEY, plan text NOT NULL, n bigint NOT NULL);
        CREATE TABLE {PLAIN} (LIKE {CAPTURED} INCLUDING ALL);
        INSERT INTO {CAPTURED} SELECT g, 'free', 0 FROM generate_series(1, {HOST_ROWS}) g;
        INSERT INTO {PLAIN} SELECT g, 'free', 0 FROM generate_series(1, {HOST_ROWS}) g""")
    await conn.execute(f"VACUUM ANALYZE {CAPTURED}, {PLAIN}")
    await Captures().add(
        conn,
        CAPTURED,
        namespace=NAMESPACE,
        scope=CAPTURE_SCOPE,
        keys=["id"],
        key_prefix=CAPTURE_PREFIX,
    )
    await register_triggers(conn, 1, scope=CAPTURE_SCOPE, pattern=f"{CAPTURE_PREFIX}*", name="c")
    await dispatcher.TriggerRegistry().register(
        conn,
        scope=CONDITION_SCOPE,
        name="when",
        namespace=NAMESPACE,
        key_pattern="k/*",
        target="bench.noop",
        registered_by="user:bench",
        when=CONDITION,
    )


async def _variants(
    stack: contextlib.AsyncExitStack,
    conn: asyncpg.Connection,
    dsn: str,
    trigger: int,
    per_call: int,
) -> list[Variant]:
    # Imported here: the other scenarios must not need the psycopg extra.
    import psycopg
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def raw_insert(seconds: float, offset: int) -> int:
        return await insert_loop(conn, trigger, seconds, offset)

    async def emit_asyncpg(seconds: float, offset: int) -> int:
        return await _emit_loop(conn, seconds, offset)

    async def emit_conditional(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            m = mutation(offset + n, scope=CONDITION_SCOPE)
            rows = await dispatcher.emit(conn, m, autocommit=True)
            assert len(rows) == 1
            n += 1
        return n

    pconn = await asyncio.to_thread(psycopg.connect, dsn)
    stack.push_async_callback(asyncio.to_thread, pconn.close)

    def psycopg_loop(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with pconn.transaction():
                rows = dispatcher.emit_sync(pconn, mutation(offset + n))
            assert len(rows) == 1
            n += 1
        return n

    async def emit_sync_psycopg(seconds: float, offset: int) -> int:
        # In a thread, so that the event loop (the noise sampler) keeps running.
        return await asyncio.to_thread(psycopg_loop, seconds, offset)

    engine = create_async_engine(
        make_url(dsn).set(drivername="postgresql+asyncpg"), pool_size=1, max_overflow=0
    )
    stack.push_async_callback(engine.dispose)
    session = AsyncSession(engine)
    stack.push_async_callback(session.close)

    async def emit_sqlalchemy_async(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            async with session.begin():
                rows = await dispatcher.emit(session, mutation(offset + n))
            assert len(rows) == 1
            n += 1
        return n

    async def sql_function(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            i = offset + n
            row = await conn.fetchrow(
                SQL_EMIT, SCOPE, NAMESPACE, f"k/{i}", json.dumps({"n": i, "tag": "bench"})
            )
            assert row is not None
            assert len(row["outbox_ids"]) == 1
            n += 1
        return n

    def updates(table: str) -> Loop:
        sql = f"UPDATE {table} SET n = $2 WHERE id = $1"

        async def loop(seconds: float, offset: int) -> int:
            n = 0
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                i = offset + n
                status = await conn.execute(sql, i % HOST_ROWS + 1, i)
                assert status == "UPDATE 1", status
                n += 1
            return n

        return loop

    async def bulk_emit_many(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            batch = [mutation(offset + n + j) for j in range(per_call)]
            rows = await dispatcher.emit_many(conn, batch, autocommit=True)
            assert len(rows) == per_call
            n += per_call
        return n

    async def bulk_sql_function(seconds: float, offset: int) -> int:
        n = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            ids = range(offset + n, offset + n + per_call)
            row = await conn.fetchrow(
                SQL_EMIT_MANY,
                [uuid.uuid4() for _ in ids],
                [SCOPE] * per_call,
                [NAMESPACE] * per_call,
                [f"k/{i}" for i in ids],
                ["put"] * per_call,
                [json.dumps({"n": i, "tag": "bench"}) for i in ids],
                [0] * per_call,
            )
            assert row is not None
            assert len(row["outbox_ids"]) == per_call
            n += per_call
        return n

    def rolled_back(loop: Loop) -> Loop:
        async def wrapped(seconds: float, offset: int) -> int:
            tx = conn.transaction()
            await tx.start()
            try:
                return await loop(seconds, offset)
            finally:
                await tx.rollback()

        return wrapped

    in_tx = [
        ("raw_insert", raw_insert),
        ("emit_asyncpg", emit_asyncpg),
        ("emit_conditional", emit_conditional),
        ("sql_function", sql_function),
        ("update_captured", updates(CAPTURED)),
        ("update_plain", updates(PLAIN)),
    ]
    return [
        *(
            Variant(f"tx_{name}", "µs/statement", f"{name} (in tx)", rolled_back(loop), 0, True)
            for name, loop in in_tx
        ),
        Variant("raw_insert", "rows/s", "raw insert", raw_insert, 1),
        Variant("emit_asyncpg", "mutations/s", "asyncpg emit", emit_asyncpg, 1),
        Variant("emit_sync_psycopg", "mutations/s", "psycopg emit_sync", emit_sync_psycopg, 1),
        Variant(
            "emit_sqlalchemy_async",
            "mutations/s",
            "SQLAlchemy async emit",
            emit_sqlalchemy_async,
            1,
        ),
        Variant("sql_function", "mutations/s", "SQL emit()", sql_function, 1),
        Variant("update_captured", "updates/s", "captured UPDATE", updates(CAPTURED), 1),
        Variant("update_plain", "updates/s", "plain UPDATE", updates(PLAIN), 0),
        Variant("bulk_emit_many", "mutations/s", "emit_many", bulk_emit_many, 1),
        Variant("bulk_sql_function", "mutations/s", "SQL emit_many()", bulk_sql_function, 1),
    ]


async def _measure(
    conn: asyncpg.Connection, variant: Variant, seconds: float, offset: int
) -> float:
    """One window of ``variant`` after the untimed resets; its rate."""
    await conn.execute("TRUNCATE dispatcher.outbox")
    await conn.execute(f"VACUUM {CAPTURED}, {PLAIN}")
    await conn.execute("CHECKPOINT")
    started = time.perf_counter()
    n = await variant.loop(seconds, offset)
    elapsed = time.perf_counter() - started
    written = await conn.fetchval("SELECT count(*) FROM dispatcher.outbox")
    assert written == n * variant.rows_per_unit, (variant.metric, n, written)
    return n / elapsed


# (ratio metric, numerator, denominator)
RATIOS = [
    ("emit_asyncpg_vs_raw", "emit_asyncpg", "raw_insert"),
    ("emit_sync_psycopg_vs_raw", "emit_sync_psycopg", "raw_insert"),
    ("emit_sqlalchemy_async_vs_raw", "emit_sqlalchemy_async", "raw_insert"),
    ("sql_function_vs_raw", "sql_function", "raw_insert"),
    ("captured_vs_plain_update", "update_captured", "update_plain"),
    ("bulk_function_vs_emit_many", "bulk_sql_function", "bulk_emit_many"),
    # Costs per statement: the reference over the variant (higher is faster, as above).
    ("tx_emit_asyncpg_vs_raw", "tx_raw_insert", "tx_emit_asyncpg"),
    # A conditional trigger's emit against an unconditional one (aim: at most 1.2x the cost).
    ("tx_conditional_cost", "tx_emit_conditional", "tx_emit_asyncpg"),
    ("tx_sql_function_vs_raw", "tx_raw_insert", "tx_sql_function"),
    ("tx_captured_vs_plain_update", "tx_update_plain", "tx_update_captured"),
]


def _ratios(result: ScenarioResult) -> None:
    """Per repetition (same round, same noise), then reported by their median."""
    for name, num, den in RATIOS:
        a, b = result.metrics[num].values, result.metrics[den].values
        for x, y in zip(a, b, strict=True):
            result.add(name, "x", x / y if y else float("nan"))
