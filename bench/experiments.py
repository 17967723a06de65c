"""Probes behind the analysis in docs/benchmarks.md: where the time goes when a target is
missed. Measurement only; nothing here changes the dispatcher.

    python -m bench.experiments profile-drain [--rows 20000] [--processes 1]
    python -m bench.experiments notify
    python -m bench.experiments idle-queries
    python -m bench.experiments emit-plan
    python -m bench.experiments emit-cost
    python -m bench.experiments bulk-split [--mutations 10000]
    python -m bench.experiments drain-config --variant '' --variant 'batch_size=500;concurrency=500'
    python -m bench.experiments claim-commit
    python -m bench.experiments wal-per-row
    python -m bench.experiments notify-waits
    python -m bench.experiments bulk-jit
    python -m bench.experiments bulk-revisions [--runs 3]
    python -m bench.experiments gc-pauses [--rows 20000] [--runs 3]
    python -m bench.experiments drain-waits [--rows 40000]
    python -m bench.experiments latency-parts [--seconds 10]

``profile-drain`` attaches py-spy (``pip install py-spy``) to a B4 dispatcher process for
the whole drain and prints where its CPU went; the raw stacks land in bench/profiles/.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

import dispatcher
from bench import querylog
from bench.child import Child, children
from bench.core import (
    BENCH_DIR,
    DEFAULT_DSN,
    STAT_FIELDS,
    Context,
    CpuMeter,
    Sizes,
    cpu_summary,
    machine_ticks,
)
from bench.core import postmaster_pid as find_postmaster
from bench.drain import _wait_settled, drain
from bench.fixtures import (
    B5_RETRY,
    mutation,
    payload_text,
    raw_insert_one,
    register_crowd,
    register_triggers,
    seed_generate_series,
    seed_outbox,
)
from dispatcher.sql import queries

PROFILES = BENCH_DIR / "profiles"

# Where a stack's CPU is charged: the first matching frame from the top (innermost).
AREAS = [
    ("asyncpg (protocol, codecs)", re.compile(r"asyncpg")),
    ("json", re.compile(r"\bjson\b|json/")),
    ("logging", re.compile(r"logging/")),
    ("anyio", re.compile(r"anyio/")),
    ("asyncio event loop", re.compile(r"asyncio/")),
    ("dispatcher.core (routing, models)", re.compile(r"dispatcher/core/")),
    ("dispatcher.runtime (loop, settle, handlers)", re.compile(r"dispatcher/runtime/")),
    ("bench worker", re.compile(r"bench/")),
]


def _summarise(raw: Path, top: int = 25) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(count_text)
        total += n
        frames = stack.split(";")
        self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for name, pattern in AREAS:
            if any(pattern.search(f) for f in reversed(frames[-3:])):
                areas[name] += n
                break
        else:
            areas["other (python internals, uuid, ...)"] += n
    out = [f"{total} samples with the process on CPU"]
    out.append("-- by area (innermost 3 frames):")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in areas.most_common()]
    out.append(f"-- top {top} self:")
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in self_time.most_common(top)]
    out.append(f"-- top {top} inclusive (dispatcher and asyncpg frames):")
    interesting = [
        (f, n) for f, n in inclusive.most_common() if "dispatcher/" in f or "asyncpg" in f
    ]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in interesting[:top]]
    return "\n".join(out)


async def profile_drain(
    ctx: Context, rows: int, processes: int, config: list[str], *, gil: bool, behaviour: str
) -> None:
    PROFILES.mkdir(exist_ok=True)
    async with ctx.database("prof") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1, retry=B5_RETRY if behaviour == "b5" else None)
            await seed_outbox(conn, rows)
        finally:
            await conn.close()
        meter = CpuMeter(await find_postmaster(dsn))
        args = ["--behaviour", behaviour, *(a for c in config for a in ("--config", c))]
        async with children() as started:
            for i in range(processes):
                started.append(await Child.worker(f"prof{i}", "consume", "--dsn", dsn, *args))
            await asyncio.gather(*(c.ready() for c in started))
            stamp = time.strftime("%Y%m%d-%H%M%S")
            raw = PROFILES / f"drain-{behaviour}-{rows}-{processes}p-{stamp}.txt"
            command = ["py-spy", "record", "-p", str(started[0].pid), "-f", "raw", "-o", str(raw)]
            command += ["-r", "250", "-F", *(["--gil"] if gil else [])]
            spy = subprocess.Popen(  # noqa: ASYNC220 - a sampler left running in the background
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)  # py-spy attaches
            meter.start([c.pid for c in started])
            t0 = time.monotonic()
            for c in started:
                c.go()
            await _wait_settled(dsn, started, rows, None)
            elapsed = time.monotonic() - t0
            cpu = cpu_summary(meter.stop())
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            for c in started:
                await c.finish()
    print(f"drained {rows} rows in {elapsed:.2f}s ({rows / elapsed:,.0f}/s, sampled), cpu {cpu}")
    print(_summarise(raw))
    print(f"raw stacks: {raw}")


async def notify(ctx: Context) -> None:
    """Commit throughput of one-row transactions: a plain INSERT, the same INSERT with one
    pg_notify in its statement (what a wake-up hint costs), and ``dispatcher.emit``; on 1
    and on 10 connections. Rounds are interleaved so drift hits every variant alike."""
    secs = ctx.sizes.emit_seconds
    channel = f"{dispatcher.DEFAULT_SCHEMA}_wake"
    notify_insert = f"""
        WITH ins AS ({raw_insert_one()} RETURNING 1)
        SELECT count(*) FROM (SELECT pg_notify('{channel}', '') FROM ins LIMIT 1) AS w"""

    async def raw_insert(conn: asyncpg.Connection, i: int) -> None:
        await conn.execute(raw_insert_one(), uuid.uuid4(), payload_text(i), trigger)

    async def raw_notify(conn: asyncpg.Connection, i: int) -> None:
        await conn.fetchval(notify_insert, uuid.uuid4(), payload_text(i), trigger)

    async def emit_shipped(conn: asyncpg.Connection, i: int) -> None:
        await dispatcher.emit(conn, mutation(i), autocommit=True)

    variants = (
        ("INSERT", raw_insert),
        ("INSERT + pg_notify, one statement", raw_notify),
        ("dispatcher.emit", emit_shipped),
    )
    rates: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    async with ctx.database("notify") as dsn:
        conns = [await asyncpg.connect(dsn) for _ in range(10)]
        try:
            (trigger,) = await register_triggers(conns[0], 1)
            for _ in range(ctx.runs):
                for label, fn in variants:
                    for width in (1, 10):
                        await conns[0].execute("TRUNCATE dispatcher.outbox")
                        counts = await asyncio.gather(
                            *(
                                _loop(c, fn, secs, k * 10_000_000)
                                for k, c in enumerate(conns[:width])
                            )
                        )
                        rates[label, width].append(sum(counts) / secs)
        finally:
            for c in conns:
                await c.close()
    for (label, width), values in rates.items():
        print(
            f"{label:<34} {width:>2} conn(s): median {statistics.median(values):>7,.0f}/s"
            f"  runs {[round(r) for r in values]}"
        )


async def notify_waits(ctx: Context) -> None:
    """What 10 connections emitting one row per transaction wait on, sampled from
    pg_stat_activity every 5 ms: with a plain INSERT they share WAL flushes (group commit);
    with a NOTIFY in the transaction they queue on the database-wide notify lock, which a
    committing transaction holds across its WAL flush."""
    secs = ctx.sizes.emit_seconds
    channel = f"{dispatcher.DEFAULT_SCHEMA}_wake"
    notify_insert = f"""
        WITH ins AS ({raw_insert_one()} RETURNING 1)
        SELECT count(*) FROM (SELECT pg_notify('{channel}', '') FROM ins LIMIT 1) AS w"""

    async def raw_insert(conn: asyncpg.Connection, i: int) -> None:
        await conn.execute(raw_insert_one(), uuid.uuid4(), payload_text(i), trigger)

    async def raw_notify(conn: asyncpg.Connection, i: int) -> None:
        await conn.fetchval(notify_insert, uuid.uuid4(), payload_text(i), trigger)

    async def emit_shipped(conn: asyncpg.Connection, i: int) -> None:
        await dispatcher.emit(conn, mutation(i), autocommit=True)

    async with ctx.database("waits") as dsn:
        name = dsn.rsplit("/", 1)[1].split("?")[0]
        conns = [await asyncpg.connect(dsn) for _ in range(10)]
        admin = await asyncpg.connect(ctx.admin_dsn)
        try:
            (trigger,) = await register_triggers(conns[0], 1)
            for label, fn in (
                ("INSERT", raw_insert),
                ("INSERT + pg_notify", raw_notify),
                ("dispatcher.emit", emit_shipped),
            ):
                await conns[0].execute("TRUNCATE dispatcher.outbox")
                states: collections.Counter[str] = collections.Counter()
                stop = asyncio.Event()

                async def sample(stop: asyncio.Event, states: collections.Counter[str]) -> None:
                    while not stop.is_set():
                        for r in await admin.fetch(
                            "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()",
                            name,
                        ):
                            if r["state"] == "idle":
                                states["client side (idle in between)"] += 1
                            else:
                                what = f"{r['wait_event_type']}:{r['wait_event']}"
                                states["running on CPU" if what == "None:None" else what] += 1
                        await asyncio.sleep(0.005)

                sampler = asyncio.create_task(sample(stop, states))
                counts = await asyncio.gather(
                    *(_loop(c, fn, secs, k * 10_000_000) for k, c in enumerate(conns))
                )
                stop.set()
                await sampler
                total = sum(states.values())
                print(f"{label}: {sum(counts) / secs:,.0f} transactions/s on 10 connections")
                for state, n in states.most_common(6):
                    print(f"    {100 * n / total:5.1f}%  {state}")
        finally:
            await admin.close()
            for c in conns:
                await c.close()


Send = Callable[[asyncpg.Connection, int], Awaitable[None]]


async def _loop(conn: asyncpg.Connection, send: Send, seconds: float, offset: int) -> int:
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await send(conn, offset + n)
        n += 1
    return n


async def idle_queries(ctx: Context, seconds: float) -> None:
    """Which statements an idle dispatcher sends, counted by asyncpg query loggers."""
    seen: collections.Counter[str] = collections.Counter()

    def log(record: object) -> None:
        query = str(getattr(record, "query", ""))
        seen[" ".join(query.split())[:90]] += 1

    async with ctx.database("idle") as dsn:
        uninstall = querylog.install(log)
        try:
            d = dispatcher.Dispatcher(dsn, dispatcher.HandlerRegistry())
            task = asyncio.create_task(d.run())
            await asyncio.sleep(2.0)
            seen.clear()
            await asyncio.sleep(seconds)
            counts = dict(seen)
            admin = await asyncpg.connect(ctx.admin_dsn)
            try:
                held = await admin.fetch(
                    "SELECT application_name, count(*) AS n FROM pg_stat_activity "
                    "WHERE datname = $1 GROUP BY 1 ORDER BY 1",
                    dsn.rsplit("/", 1)[1].split("?")[0],
                )
            finally:
                await admin.close()
            d.stop()
            await task
        finally:
            uninstall()
    print("connections held by one dispatcher:", {r["application_name"]: r["n"] for r in held})
    total = sum(counts.values())
    print(f"{total} statements in {seconds:g}s = {total / seconds:.1f}/s")
    for query, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {n / seconds:6.1f}/s  {query}")


async def emit_plan(ctx: Context, triggers: int) -> None:
    """EXPLAIN ANALYZE of one emit in a scope of 10 and of ``triggers`` triggers."""
    sql = queries().emit
    async with ctx.database("plan") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_crowd(conn, "few", 10)
            await register_crowd(conn, "many", triggers)
            await conn.execute("ANALYZE dispatcher.triggers")
            for scope in ("few", "many"):
                m = dispatcher.Mutation(scope, "items", "hit/1", dispatcher.Op.PUT, {"n": 1})
                tr = conn.transaction()
                await tr.start()
                try:
                    # The statement calls a function: EXPLAIN shows a Function Scan; the
                    # function's own plan is in the server log with auto_explain.
                    plan = await conn.fetch(
                        f"EXPLAIN (ANALYZE, BUFFERS, TIMING) {sql}", *_emit_args([m])
                    )
                finally:
                    await tr.rollback()
                print(f"-- scope {scope!r}")
                print("\n".join(r[0] for r in plan))
        finally:
            await conn.close()


def _emit_args(mutations: list[dispatcher.Mutation]) -> tuple[object, ...]:
    """The arguments ``emit_many`` passes to the ``emit_many`` SQL function (``queries().emit``),
    as it builds them."""
    call = dispatcher.Emitter()._many(mutations)
    assert call is not None
    return call[1]


async def emit_cost(ctx: Context, n: int) -> None:
    """Per-call cost of one emit inside an open transaction (no commit, so no fsync): a
    plain INSERT next to ``dispatcher.emit`` under each plan-cache mode, and the plans
    Postgres chose for the dispatcher's statements."""
    async with ctx.database("emitcost") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            (trigger,) = await register_triggers(conn, 1)

            async def raw(i: int) -> None:
                await conn.execute(raw_insert_one(), uuid.uuid4(), payload_text(i), trigger)

            async def api(i: int) -> None:
                await dispatcher.emit(conn, mutation(i))

            async def timed(label: str, fn: Send1, mode: str = "auto") -> None:
                await conn.execute(f"SET plan_cache_mode = {mode}")
                values = []
                tr = conn.transaction()
                await tr.start()
                try:
                    for i in range(n):
                        t0 = time.perf_counter()
                        await fn(i)
                        values.append((time.perf_counter() - t0) * 1e6)
                finally:
                    await tr.rollback()
                print(
                    f"{label:<44} median {statistics.median(values):6.0f} µs, "
                    f"mean {statistics.fmean(values):6.0f} µs"
                )

            for _ in range(ctx.runs):
                await timed("plain INSERT of one outbox row", raw)
                await timed("dispatcher.emit, plan_cache_mode=auto", api)
                await timed("dispatcher.emit, force_generic_plan", api, "force_generic_plan")
                await timed("dispatcher.emit, force_custom_plan", api, "force_custom_plan")
            await conn.execute("RESET plan_cache_mode")
            rows = await conn.fetch(
                "SELECT generic_plans, custom_plans, left(regexp_replace(statement, '\\s+', ' ',"
                " 'g'), 60) AS statement FROM pg_prepared_statements "
                "WHERE statement LIKE '%outbox%'"
            )
            for r in rows:
                print(
                    f"plans: generic {r['generic_plans']}, custom {r['custom_plans']}: "
                    f"{r['statement']}"
                )
        finally:
            await conn.close()


Send1 = Callable[[int], Awaitable[None]]


async def bulk_split(ctx: Context, mutations: int) -> None:
    """Where a bulk emit of ``mutations`` mutations (1 trigger each) spends its time:
    building the Mutation objects, emit_many as a whole, and the statement alone."""
    sql = queries().emit
    async with ctx.database("bulk") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
            for _ in range(ctx.runs):
                await conn.execute("TRUNCATE dispatcher.outbox")
                t0 = time.perf_counter()
                batch = [mutation(i) for i in range(mutations)]
                t1 = time.perf_counter()
                await dispatcher.emit_many(conn, batch, autocommit=True)
                t2 = time.perf_counter()
                await conn.execute("TRUNCATE dispatcher.outbox")
                args = _emit_args([mutation(i) for i in range(mutations)])
                t3 = time.perf_counter()
                await conn.fetchrow(sql, *args)
                t4 = time.perf_counter()
                print(
                    f"{mutations} mutations: build Mutations {1000 * (t1 - t0):6.1f} ms, "
                    f"emit_many {1000 * (t2 - t1):6.1f} ms ({mutations / (t2 - t1):,.0f} rows/s), "
                    f"statement alone {1000 * (t4 - t3):6.1f} ms"
                )
            await conn.execute("TRUNCATE dispatcher.outbox")
            args = _emit_args([mutation(i) for i in range(mutations)])
            tr = conn.transaction()
            await tr.start()
            try:
                plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
            finally:
                await tr.rollback()
            print("\n".join(r[0] for r in plan if "Buffers" not in r[0]))
        finally:
            await conn.close()


async def bulk_jit(ctx: Context, mutations: int, calls: int) -> None:
    """``emit_many`` of ``mutations`` mutations, ``calls`` times with jit on and off in turn
    on one connection, and which plans its prepared statement used."""
    async with ctx.database("jit") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
            times: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(calls):
                for mode in ("on", "off"):
                    await conn.execute(f"SET jit = {mode}")
                    await conn.execute("TRUNCATE dispatcher.outbox")
                    batch = [mutation(i) for i in range(mutations)]
                    t0 = time.perf_counter()
                    await dispatcher.emit_many(conn, batch, autocommit=True)
                    times[mode].append((time.perf_counter() - t0) * 1000)
            for mode, values in times.items():
                print(f"jit={mode}: emit_many of {mutations} (ms): {[round(v) for v in values]}")
            rows = await conn.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%unnest%'"
            )
            print("plans:", [dict(r) for r in rows])
        finally:
            await conn.close()


def _emit_many_0015() -> str:
    """0015's emit_many, as migration 0016's downgrade writes it, named ``emit_many_0015``."""
    path = Path(__file__).parents[1] / "migrations" / "versions" / "0016_bulk_emit_speed.py"
    spec = importlib.util.spec_from_file_location("dispatcher_migration_0016_bench", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = str(module._emit_many_0015("dispatcher"))
    return old.replace('"dispatcher".emit_many(', '"dispatcher".emit_many_0015(', 1)


@contextlib.asynccontextmanager
async def _rolled_back(conn: asyncpg.Connection) -> AsyncIterator[None]:
    tr = conn.transaction()
    await tr.start()
    try:
        yield
    finally:
        await tr.rollback()


async def bulk_revisions(ctx: Context, runs: int) -> None:
    """B3's call (1,000 mutations, fan-out 10, autocommit) through the current emit_many
    and 0015's, interleaved on one connection, each call timed with its commit; then the
    client's share (building the arguments, and sending them to a statement that does
    nothing with them)."""
    sql = queries().emit
    old_sql = sql.replace(".emit_many(", ".emit_many_0015(")
    noop = (
        "SELECT cardinality($1::uuid[]) + cardinality($2::text[]) + cardinality($3::text[])"
        " + cardinality($4::text[]) + cardinality($5::text[]) + cardinality($6::jsonb[])"
        " + cardinality($7::int[]) + coalesce(cardinality($8::uuid[]), 0) + $9::int"
        " + coalesce(cardinality($11::jsonb[]), 0), $10::bool, $12::text"
    )
    emitter = dispatcher.Emitter()
    async with ctx.database("bulkrev") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 10, scope="fan")
            await conn.execute(_emit_many_0015())
            times: dict[str, list[float]] = collections.defaultdict(list)
            n = 0
            for rep in range(runs * 10):
                order = [("0016", sql), ("0015", old_sql)]
                for name, statement in order if rep % 2 else order[::-1]:
                    await conn.execute("TRUNCATE dispatcher.outbox")
                    t0 = time.perf_counter()
                    call = emitter._many([mutation(n + j, scope="fan") for j in range(1000)])
                    assert call is not None
                    t1 = time.perf_counter()
                    row = await conn.fetchrow(statement, *call[1])
                    t2 = time.perf_counter()
                    assert row is not None
                    assert len(row["outbox_ids"]) == 10_000
                    await conn.fetchrow(noop, *call[1])
                    t3 = time.perf_counter()
                    n += 1000
                    # The statement alone: in a transaction rolled back (no commit).
                    call = emitter._many([mutation(n + j, scope="fan") for j in range(1000)])
                    assert call is not None
                    async with _rolled_back(conn):
                        await conn.execute("TRUNCATE dispatcher.outbox")
                        t4 = time.perf_counter()
                        await conn.fetchrow(statement, *call[1])
                        t5 = time.perf_counter()
                    n += 1000
                    if rep >= 2:  # the first calls plan custom, then generic
                        times[f"{name} call"].append(t2 - t0)
                        times[f"{name} statement, no commit"].append(t5 - t4)
                        times["mutations+arguments"].append(t1 - t0)
                        times["arguments sent"].append(t3 - t2)
            ratios = [a / b for a, b in zip(times["0016 call"], times["0015 call"], strict=True)]
            for name, values in times.items():
                print(f"{name:<22} median {1000 * statistics.median(values):6.1f} ms")
            call_rate = 10_000 / statistics.median(times["0016 call"])
            ratio = statistics.median(ratios)
            print(f"0016 call / 0015 call: median of {len(ratios)} pairs {ratio:.2f}")
            alone = [
                a / b
                for a, b in zip(
                    times["0016 statement, no commit"],
                    times["0015 statement, no commit"],
                    strict=True,
                )
            ]
            ratio = statistics.median(alone)
            print(f"0016 / 0015 statement, no commit: median of {len(alone)} pairs {ratio:.2f}")
            print(f"0016: {call_rate:,.0f} rows/s per call (median)")
        finally:
            await conn.close()


async def drain_config(ctx: Context, rows: int, configs: list[str]) -> None:
    """B4 with other DispatcherConfig settings, rounds interleaved (``;``-separated
    FIELD=VALUE lists; an empty one is the default)."""
    results: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(ctx.runs):
        for config in configs:
            pairs = tuple(c for c in config.split(";") if c)
            async with ctx.database("cfg") as dsn:
                conn = await asyncpg.connect(dsn)
                try:
                    await register_triggers(conn, 1)
                    await seed_outbox(conn, rows)
                finally:
                    await conn.close()
                args = tuple(a for p in pairs for a in ("--config", p))
                run = await drain(ctx, dsn, rows=rows, worker_args=args, label="cfg")
            results[config or "defaults"].append(run.rate)
            print(f"{config or 'defaults':<40} {run.rate:8,.0f} rows/s  cpu {run.cpu}")
    for config, rates in results.items():
        print(f"{config:<40} median {statistics.median(rates):8,.0f} rows/s")


async def claim_commit(ctx: Context, claims: int) -> None:
    """The dispatcher's claim of one due row (what B7 waits for between commit and handler
    start), timed with synchronous_commit on (the default) and off for that transaction:
    the difference is the WAL flush the lease's commit waits for."""
    claim = queries().claim
    async with ctx.database("claimcommit") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            (trigger,) = await register_triggers(conn, 1)
            refill = seed_generate_series(spread=False)
            results: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(ctx.runs):
                for mode in ("on", "off"):
                    await conn.execute(f"SET synchronous_commit = {mode}")
                    for _j in range(claims):
                        await conn.execute(refill, 1, trigger)
                        t0 = time.perf_counter()
                        rows = await conn.fetch(claim, 1, uuid.uuid4(), "bench", 5.0, [])
                        results[mode].append((time.perf_counter() - t0) * 1000)
                        await conn.execute(
                            "DELETE FROM dispatcher.outbox WHERE id = $1", rows[0]["id"]
                        )
            for mode, values in results.items():
                print(
                    f"claim of 1 due row, synchronous_commit={mode}: "
                    f"p50 {statistics.median(values):.2f} ms, p99 {_p(values, 99):.2f} ms"
                )
        finally:
            await conn.close()


async def wal_per_row(ctx: Context, rows: int) -> None:
    """WAL written per outbox row by each step of its life, from EXPLAIN (ANALYZE, WAL) of
    the dispatcher's own bulk emit and claim statements and a DELETE by id (what a success
    settles to). Full-page images depend on checkpoint timing and are shown apart."""
    async with ctx.database("wal") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
            await conn.execute("CHECKPOINT")
            steps: list[tuple[str, str, tuple[object, ...]]] = [
                (
                    "emit (bulk statement)",
                    queries().emit,
                    _emit_args([mutation(i) for i in range(rows)]),
                ),
                ("claim (lease update)", queries().claim, (rows, uuid.uuid4(), "bench", 5.0, [])),
                (
                    "settle (delete by id)",
                    "DELETE FROM dispatcher.outbox"
                    " WHERE id = ANY(ARRAY(SELECT id FROM dispatcher.outbox))",
                    (),
                ),
            ]
            for label, sql, args in steps:
                plan = await conn.fetch(f"EXPLAIN (ANALYZE, WAL, FORMAT JSON) {sql}", *args)
                doc = json.loads(plan[0][0])[0]["Plan"]
                print(
                    f"{label:<24} {doc.get('WAL Bytes', 0) / rows:7.0f} WAL bytes/row, "
                    f"{doc.get('WAL Records', 0) / rows:5.1f} records/row, "
                    f"{doc.get('WAL FPI', 0)} full-page images"
                )
        finally:
            await conn.close()


def _machine_split(before: dict[str, int], after: dict[str, int], wall: float) -> str:
    """Cores of the machine by kind between two ``machine_ticks()`` readings (idle and
    iowait left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    parts = [
        f"{k} {(after[k] - before[k]) / tick / wall:.2f}"
        for k in STAT_FIELDS
        if k not in ("idle", "iowait") and k in before and k in after
    ]
    return ", ".join(parts)


async def drain_waits(ctx: Context, rows: int) -> None:
    """What 1, 2 and 4 dispatcher processes draining ``rows`` due rows spend their time on:
    throughput, the cores the dispatchers and Postgres use (against the machine's), the CPU
    per drained row of each, and what the dispatchers' backends were doing, sampled from
    pg_stat_activity every 5 ms (running, idle waiting for the client, or a wait event: a
    lock, WAL, the notify queue)."""
    async with ctx.database("waits") as dsn:
        name = urlsplit(dsn).path.lstrip("/")
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
        finally:
            await conn.close()
        admin = await asyncpg.connect(ctx.admin_dsn)
        try:
            for processes in (1, 2, 4):
                conn = await asyncpg.connect(dsn)
                try:
                    await seed_outbox(conn, rows)
                finally:
                    await conn.close()
                meter = CpuMeter(await find_postmaster(dsn))
                states: Counter[str] = collections.Counter()
                async with children() as started:
                    for i in range(processes):
                        started.append(await Child.worker(f"waits{i}", "consume", "--dsn", dsn))
                    await asyncio.gather(*(c.ready() for c in started))
                    meter.start([c.pid for c in started])
                    ticks = machine_ticks()
                    for c in started:
                        c.go()
                    done = asyncio.Event()

                    async def sample(done: asyncio.Event, states: Counter[str]) -> None:
                        while not done.is_set():
                            for r in await admin.fetch(
                                "SELECT state, wait_event_type, wait_event, query "
                                "FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid() "
                                "AND application_name LIKE 'dispatcher%'",
                                name,
                            ):
                                if r["state"] == "idle":
                                    states["idle (waiting for the client)"] += 1
                                    continue
                                what = f"{r['wait_event_type']}:{r['wait_event']}"
                                kind = "claim" if "SKIP LOCKED" in (r["query"] or "") else "other"
                                where = "on CPU" if what == "None:None" else what
                                states[f"{kind}: {where}"] += 1
                            await asyncio.sleep(0.005)

                    sampler = asyncio.create_task(sample(done, states))
                    await _wait_settled(dsn, started, rows, None)
                    done.set()
                    await sampler
                    cpu = meter.stop()
                    split = _machine_split(ticks, machine_ticks(), cpu["wall"])
                    for c in started:
                        await c.finish()
                wall = cpu["wall"]
                total = sum(states.values()) or 1
                print(
                    f"{processes} process(es): {rows / wall:,.0f} rows/s; dispatchers "
                    f"{cpu['processes'] / wall:.2f} cores ({cpu['processes'] / rows * 1e6:.1f} "
                    f"µs/row), Postgres {cpu['postgres'] / wall:.2f} cores "
                    f"({cpu['postgres'] / rows * 1e6:.1f} µs/row), machine busy "
                    f"{cpu['machine_busy'] / wall:.2f} of {cpu['cores']:.0f} cores"
                )
                print(f"    machine, cores by kind: {split}")
                for state, n in states.most_common(8):
                    print(f"    {100 * n / total:5.1f}%  {state}")
        finally:
            await admin.close()


async def latency_parts(ctx: Context, seconds: float) -> None:
    """B7 (LISTEN, 500 emits/s) with the dispatcher in this process, instrumented: for every
    event, the time from its commit to the start of the claim that returned it, the claim
    itself, and from the claim's return to its handler's start; for all events and for the
    slowest 5 %, and whether that claim followed a wake-up hint or a linger poll."""
    from dispatcher.runtime.poller import Poller

    hints: list[int] = []
    claims: list[tuple[int, int, list[str]]] = []
    starts: dict[str, int] = {}
    original_claim = Poller._claim
    original_hinted = Poller.hinted

    def hinted(self: Poller) -> None:
        hints.append(time.monotonic_ns())
        original_hinted(self)

    async def claim(self: Poller, want: int) -> list[asyncpg.Record] | None:
        t0 = time.monotonic_ns()
        records = await original_claim(self, want)
        t1 = time.monotonic_ns()
        if records:
            claims.append((t0, t1, [json.loads(r["payload"])["key"] for r in records]))
        return records

    handlers = dispatcher.HandlerRegistry()

    async def noop(hctx: dispatcher.HandlerContext) -> None:
        starts.setdefault(str(hctx.event["key"]), time.monotonic_ns())

    handlers.register("noop", noop)
    async with ctx.database("parts") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1, pattern="lat/*", name="lat")
            await register_triggers(conn, 1, pattern="warm/*", name="warm")
        finally:
            await conn.close()
        Poller._claim = claim  # type: ignore[method-assign]
        Poller.hinted = hinted  # type: ignore[method-assign]
        gc.freeze()
        d = dispatcher.Dispatcher(dsn, handlers)
        try:
            async with children() as started, asyncio.TaskGroup() as tg:
                tg.create_task(d.run())
                producer = await Child.worker(
                    "parts-producer",
                    "produce",
                    "--dsn",
                    dsn,
                    "--rate",
                    "500",
                    "--seconds",
                    str(seconds),
                    "--warmup",
                    "1",
                )
                started.append(producer)
                await producer.ready()
                await asyncio.sleep(0.3)
                producer.go()
                produced = await producer.finish(stop=False, within=seconds * 3 + 60)
                await asyncio.sleep(0.5)
                d.stop()
        finally:
            Poller._claim = original_claim  # type: ignore[method-assign]
            Poller.hinted = original_hinted  # type: ignore[method-assign]
            gc.unfreeze()
    claim_of: dict[str, tuple[int, int, int]] = {}
    for index, (t0, t1, keys) in enumerate(claims):
        for key in keys:
            claim_of.setdefault(key, (t0, t1, index))
    parts: list[tuple[float, float, float, float, bool]] = []
    for key, committed in produced["committed"].items():
        if key not in claim_of or key not in starts:
            continue
        t0, t1, index = claim_of[key]
        previous_end = claims[index - 1][1] if index else 0
        woken = any(previous_end <= h <= t0 for h in hints[-20000:])
        parts.append(
            (
                (starts[key] - committed) / 1e6,
                (t0 - committed) / 1e6,
                (t1 - t0) / 1e6,
                (starts[key] - t1) / 1e6,
                woken,
            )
        )
    parts.sort()
    slow = parts[int(len(parts) * 0.95) :]
    for label, group in (("all events", parts), ("slowest 5 %", slow)):
        if not group:
            continue
        med = [statistics.median(p[i] for p in group) for i in range(4)]
        share = sum(p[4] for p in group) / len(group)
        print(
            f"{label} ({len(group)}): latency p50 {med[0]:.2f} ms; commit -> claim start "
            f"{med[1]:.2f} ms, claim {med[2]:.2f} ms, claim -> handler {med[3]:.2f} ms "
            f"(medians); claims after a hint {100 * share:.0f} %"
        )
    print(
        f"p50 {_p([p[0] for p in parts], 50):.2f} ms, p95 {_p([p[0] for p in parts], 95):.2f} ms, "
        f"p99 {_p([p[0] for p in parts], 99):.2f} ms; {len(claims)} claims returned rows, "
        f"{len(hints)} hints"
    )


async def gc_pauses(ctx: Context, rows: int, runs: int) -> None:
    """The cyclic garbage collector's pauses during a drain, in this process, without and
    with ``gc.freeze()`` (what ``dispatcher run`` does once set up), interleaved: per
    generation, how many collections ran, the longest and their sum; and the process's CPU
    per drained row."""
    handlers = dispatcher.HandlerRegistry()

    async def noop(ctx: dispatcher.HandlerContext) -> None:
        return None

    handlers.register("noop", noop)
    began = [0.0]
    pauses: dict[int, list[float]] = {}

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.setdefault(info["generation"], []).append(time.perf_counter() - began[0])

    async with ctx.database("gc") as dsn:
        for run in range(runs):
            for frozen in (False, True):
                conn = await asyncpg.connect(dsn)
                try:
                    if run == 0 and not frozen:
                        await register_triggers(conn, 1)
                    await seed_outbox(conn, rows)
                finally:
                    await conn.close()
                gc.collect()
                if frozen:
                    gc.freeze()
                pauses.clear()
                gc.callbacks.append(timed)
                cpu = time.process_time()
                try:
                    await dispatcher.Dispatcher(dsn, handlers).run_until_idle()
                finally:
                    cpu = time.process_time() - cpu
                    gc.callbacks.remove(timed)
                    gc.unfreeze()
                each = ", ".join(
                    f"gen{g} {len(p)} times, max {max(p) * 1000:.1f} ms sum {sum(p) * 1000:.0f} ms"
                    for g, p in sorted(pauses.items())
                )
                label = "gc.freeze()" if frozen else "as loaded  "
                print(f"run {run + 1} {label}: {cpu / rows * 1e6:5.1f} µs CPU/row; {each}")


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments")
    parser.add_argument(
        "probe",
        choices=(
            "profile-drain",
            "notify",
            "idle-queries",
            "emit-plan",
            "emit-cost",
            "bulk-split",
            "drain-config",
            "claim-commit",
            "wal-per-row",
            "notify-waits",
            "bulk-jit",
            "bulk-revisions",
            "gc-pauses",
            "drain-waits",
            "latency-parts",
        ),
    )
    parser.add_argument("--dsn", default=os.environ.get("BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--triggers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mutations", type=int, default=10_000)
    parser.add_argument(
        "--variant", action="append", default=[], help="drain-config: 'batch_size=500;...'"
    )
    parser.add_argument("--behaviour", choices=("noop", "b5"), default="noop")
    parser.add_argument("--gil", action="store_true", help="profile: only samples holding the GIL")
    args = parser.parse_args()
    ctx = Context(admin_dsn=args.dsn, sizes=Sizes(), runs=args.runs)

    async def run() -> None:
        try:
            if args.probe == "profile-drain":
                await profile_drain(
                    ctx,
                    args.rows,
                    args.processes,
                    args.config,
                    gil=args.gil,
                    behaviour=args.behaviour,
                )
            elif args.probe == "notify":
                await notify(ctx)
            elif args.probe == "idle-queries":
                await idle_queries(ctx, args.seconds)
            elif args.probe == "emit-cost":
                await emit_cost(ctx, 1000)
            elif args.probe == "bulk-split":
                await bulk_split(ctx, args.mutations)
            elif args.probe == "bulk-jit":
                await bulk_jit(ctx, args.mutations, 8)
            elif args.probe == "bulk-revisions":
                await bulk_revisions(ctx, args.runs)
            elif args.probe == "latency-parts":
                await latency_parts(ctx, args.seconds)
            elif args.probe == "drain-waits":
                await drain_waits(ctx, args.rows)
            elif args.probe == "gc-pauses":
                await gc_pauses(ctx, args.rows, args.runs)
            elif args.probe == "notify-waits":
                await notify_waits(ctx)
            elif args.probe == "wal-per-row":
                await wal_per_row(ctx, 1000)
            elif args.probe == "claim-commit":
                await claim_commit(ctx, 300)
            elif args.probe == "drain-config":
                await drain_config(ctx, args.rows, args.variant or [""])
            else:
                await emit_plan(ctx, args.triggers)
        finally:
            await ctx.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
