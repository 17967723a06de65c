"""The raw ceiling: plain asyncpg doing only the SQL a dispatcher cannot avoid, on the
dispatcher's own outbox table (same columns, same indexes).

- drain: claim 500 due rows with a lease (``FOR UPDATE SKIP LOCKED``) and return their
  payloads, then delete them by id array; one connection, until nothing is due;
- inserts: one row per statement (autocommit) on 1 and on 10 connections, and bulk
  (one ``INSERT … SELECT FROM unnest`` of as many rows as a B3 call writes).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import asyncpg

from bench.core import Context, CpuMeter, ScenarioResult, cpu_summary, postmaster_pid, repeat
from bench.fixtures import payload_text as payload
from bench.fixtures import raw_insert_many, raw_insert_one, register_triggers, seed_outbox

RAW_BATCH = 500

CLAIM = """
    WITH due AS MATERIALIZED (
        SELECT id FROM dispatcher.outbox
        WHERE due_at <= clock_timestamp()
        ORDER BY due_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE dispatcher.outbox o
    SET lease_token = $2, due_at = clock_timestamp() + interval '30 seconds'
    FROM due
    WHERE o.id = due.id
    RETURNING o.id, o.payload"""
DELETE = "DELETE FROM dispatcher.outbox WHERE id = ANY($1::bigint[])"


async def raw_drain(conn: asyncpg.Connection) -> int:
    """Claim and delete until nothing is due; returns the rows drained."""
    total = 0
    while True:
        rows = await conn.fetch(CLAIM, RAW_BATCH, uuid.uuid4())
        if not rows:
            return total
        await conn.execute(DELETE, [r["id"] for r in rows])
        total += len(rows)


async def insert_loop(conn: asyncpg.Connection, trigger: int, seconds: float, offset: int) -> int:
    sql = raw_insert_one()
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await conn.execute(sql, uuid.uuid4(), payload(offset + n), trigger)
        n += 1
    return n


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("raw", "Raw asyncpg ceiling (claim 500 + delete; inserts)")
    sz = ctx.sizes
    rows_per_stmt = sz.bulk_mutations_per_call * sz.bulk_fanout
    result.notes.append(
        f"drain: claim {RAW_BATCH} with lease + delete by id array, 1 connection, "
        f"{sz.drain_rows} rows seeded by emit_many then VACUUM ANALYZE; inserts: autocommit, "
        f"{sz.emit_seconds:g}s windows; bulk: {rows_per_stmt} rows per INSERT … unnest"
    )
    async with ctx.database("raw") as dsn:
        conn = await asyncpg.connect(dsn)
        conns = [await asyncpg.connect(dsn) for _ in range(10)]
        meter = CpuMeter(await postmaster_pid(dsn))
        try:
            (trigger,) = await register_triggers(conn, 1)

            async def once(_: int) -> str:
                await conn.execute("TRUNCATE dispatcher.outbox")
                await seed_outbox(conn, sz.drain_rows)
                meter.start([os.getpid()])
                started = time.perf_counter()
                drained = await raw_drain(conn)
                elapsed = time.perf_counter() - started
                cpu = cpu_summary(meter.stop())
                result.extra.setdefault("drain_cpu", []).append(cpu)
                assert drained == sz.drain_rows, (drained, sz.drain_rows)
                result.add("drain", "rows/s", drained / elapsed)
                result.add(
                    "drain_client_cpu_us_per_row",
                    "µs",
                    cpu["dispatcher_cores"] * cpu["wall_s"] / drained * 1e6,
                    higher_is_better=False,
                )
                result.add(
                    "drain_postgres_cpu_us_per_row",
                    "µs",
                    cpu["postgres_cores"] * cpu["wall_s"] / drained * 1e6,
                    higher_is_better=False,
                )

                await conn.execute("TRUNCATE dispatcher.outbox")
                n = await insert_loop(conn, trigger, sz.emit_seconds, 0)
                result.add("insert_1conn", "rows/s", n / sz.emit_seconds)

                await conn.execute("TRUNCATE dispatcher.outbox")
                counts = await asyncio.gather(
                    *(
                        insert_loop(c, trigger, sz.emit_seconds, i * 10_000_000)
                        for i, c in enumerate(conns)
                    )
                )
                result.add("insert_10conn", "rows/s", sum(counts) / sz.emit_seconds)

                await conn.execute("TRUNCATE dispatcher.outbox")
                bulk = raw_insert_many()
                written = 0
                started = time.perf_counter()
                while written < sz.bulk_rows:
                    ids = range(written, written + rows_per_stmt)
                    await conn.execute(
                        bulk,
                        [uuid.uuid4() for _ in ids],
                        [payload(i) for i in ids],
                        [trigger] * rows_per_stmt,
                    )
                    written += rows_per_stmt
                bulk_rate = written / (time.perf_counter() - started)
                result.add("insert_bulk", "rows/s", bulk_rate)
                return (
                    f"drain {drained / elapsed:,.0f}/s, insert 1 conn {n / sz.emit_seconds:,.0f}/s,"
                    f" 10 conns {sum(counts) / sz.emit_seconds:,.0f}/s, bulk {bulk_rate:,.0f}/s"
                )

            await repeat(ctx, result, once)
        finally:
            for c in [conn, *conns]:
                await c.close()
    return result
