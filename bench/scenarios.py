"""The dispatcher's scenarios, B1-B11, and the process-scaling run, through the public API.

Every scenario works in its own ``bench_*`` database (a clone of a migrated template) and
repeats its measurement ``ctx.runs`` times back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from statistics import median

import asyncpg

import dispatcher
from bench.child import Child, children
from bench.core import Context, ScenarioResult, percentile, repeat, rss_bytes
from bench.drain import drain
from bench.fixtures import (
    B5_RETRY,
    NAMESPACE,
    mutation,
    register_crowd,
    register_triggers,
    seed_generate_series,
    seed_outbox,
)
from bench.latency import dispatcher_latency
from dispatcher.runtime.connections import session_settings
from dispatcher.sql import queries

CLAIM_BATCH = dispatcher.DispatcherConfig().batch_size


async def b1(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b1", "B1 emit, 1 mutation/tx, 1 trigger, 1 connection")
    secs = ctx.sizes.emit_seconds
    result.notes.append(f"`await emit(conn, m)` in autocommit (its own transaction), {secs:g}s")
    async with ctx.database("b1") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)

            async def once(_: int) -> str:
                await conn.execute("TRUNCATE dispatcher.outbox")
                n = await _emit_loop(conn, secs, 0)
                result.add("emit_rate", "mutations/s", n / secs)
                return f"{n / secs:,.0f} emits/s"

            await repeat(ctx, result, once)
        finally:
            await conn.close()
    return result


async def _emit_loop(conn: asyncpg.Connection, seconds: float, offset: int) -> int:
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        rows = await dispatcher.emit(conn, mutation(offset + n), autocommit=True)
        assert len(rows) == 1
        n += 1
    return n


async def b2(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b2", "B2 emit, 1 mutation/tx, 1 trigger, 10 connections")
    secs = ctx.sizes.emit_seconds
    result.notes.append(f"10 connections each looping `await emit(conn, m)`, {secs:g}s")
    async with ctx.database("b2") as dsn:
        conns = [await asyncpg.connect(dsn) for _ in range(10)]
        try:
            await register_triggers(conns[0], 1)

            async def once(_: int) -> str:
                await conns[0].execute("TRUNCATE dispatcher.outbox")
                counts = await asyncio.gather(
                    *(_emit_loop(c, secs, i * 10_000_000) for i, c in enumerate(conns))
                )
                rate = sum(counts) / secs
                result.add("emit_rate", "mutations/s", rate)
                return f"{rate:,.0f} emits/s"

            await repeat(ctx, result, once)
        finally:
            for c in conns:
                await c.close()
    return result


async def b3(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b3", "B3 bulk emit (emit_many), outbox rows/s")
    sz = ctx.sizes
    per_call = sz.bulk_mutations_per_call
    fan = sz.bulk_fanout
    result.notes.append(
        f"`emit_many` of {per_call} mutations per call (autocommit) into a scope where each "
        f"matches {fan} triggers ({per_call * fan} rows per call), and of {per_call * fan} "
        f"mutations matching 1 trigger each; {sz.bulk_rows} rows per run"
    )
    async with ctx.database("b3") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, fan, scope="fan")
            await register_triggers(conn, 1, scope="solo")

            async def bulk(scope: str, mutations: int, fanout: int) -> float:
                await conn.execute("TRUNCATE dispatcher.outbox")
                written = 0
                i = 0
                started = time.perf_counter()
                while written < sz.bulk_rows:
                    batch = [mutation(i + j, scope=scope) for j in range(mutations)]
                    rows = await dispatcher.emit_many(conn, batch, autocommit=True)
                    assert len(rows) == mutations * fanout
                    written += len(rows)
                    i += mutations
                return written / (time.perf_counter() - started)

            async def once(_: int) -> str:
                fanned = await bulk("fan", per_call, fan)
                result.add(f"rows_fanout{fan}", "rows/s", fanned)
                solo = await bulk("solo", per_call * fan, 1)
                result.add("rows_fanout1", "rows/s", solo)
                return f"fan-out {fan}: {fanned:,.0f} rows/s; fan-out 1: {solo:,.0f} rows/s"

            await repeat(ctx, result, once)
        finally:
            await conn.close()
    return result


async def _seeded_drain(
    ctx: Context,
    result: ScenarioResult,
    *,
    rows: int,
    processes: int,
    behaviour: str = "noop",
    label: str,
    metric: str = "drain",
    config: tuple[str, ...] = (),
) -> str:
    async with ctx.database(label) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            retry = B5_RETRY if behaviour == "b5" else None
            await register_triggers(conn, 1, retry=retry)
            await seed_outbox(conn, rows)
        finally:
            await conn.close()
        profile = None
        if ctx.profile_dir is not None:
            ctx.profile_dir.mkdir(parents=True, exist_ok=True)
            profile = str(ctx.profile_dir / f"{result.name}-{metric}-{uuid.uuid4().hex[:6]}.txt")
        run = await drain(
            ctx,
            dsn,
            rows=rows,
            processes=processes,
            worker_args=("--behaviour", behaviour, *_config_args(config)),
            label=label,
            profile=profile,
        )
    result.add(metric, "rows/s", run.rate)
    # Retries re-execute on purpose; anything beyond them is a duplicate.
    duplicates = run.duplicates - run.total("retried")
    result.add(f"{metric}_duplicates", "executions", duplicates, higher_is_better=False)
    result.add(f"{metric}_dispatcher_cores", "cores", run.cpu.get("dispatcher_cores", 0.0))
    result.add(f"{metric}_postgres_cores", "cores", run.cpu.get("postgres_cores", 0.0))
    result.add(
        f"{metric}_dispatcher_cpu_us_per_row",
        "µs",
        run.dispatcher_cpu_seconds / rows * 1e6,
        higher_is_better=False,
    )
    result.add(
        f"{metric}_postgres_cpu_us_per_row",
        "µs",
        run.cpu.get("postgres_cores", 0.0) * run.cpu.get("wall_s", 0.0) / rows * 1e6,
        higher_is_better=False,
    )
    if behaviour == "b5":
        result.add("retried", "rows", run.total("retried"))
        result.add("dead_lettered", "rows", run.total("dead_lettered"))
    return (
        f"{run.rate:,.0f} rows/s, {duplicates} duplicate executions, "
        f"dispatcher {run.cpu.get('dispatcher_cores', 0):.2f} cores, "
        f"postgres {run.cpu.get('postgres_cores', 0):.2f} cores"
    )


def _config_args(config: tuple[str, ...]) -> list[str]:
    return [arg for pair in config for arg in ("--config", pair)]


def _has_breaker() -> bool:
    return hasattr(dispatcher.DispatcherConfig(), "breaker_threshold")


async def tracing(ctx: Context) -> ScenarioResult:
    """B4 with and without tracing, alternately first: the cost of a span per execution."""
    result = ScenarioResult("tracing", "B4 drain with and without OpenTelemetry tracing")
    rows = ctx.sizes.drain_rows
    result.notes.append(
        f"{rows} rows emitted inside a span (each carries a traceparent), one process; "
        "traced: the SDK's TracerProvider, BatchSpanProcessor, an exporter that drops spans"
    )

    async def once(i: int) -> str:
        rates: dict[bool, float] = {}
        for traced in (False, True) if i % 2 == 0 else (True, False):
            rates[traced] = await _traced_drain(ctx, rows, traced)
        result.add("untraced", "rows/s", rates[False])
        result.add("traced", "rows/s", rates[True])
        result.add("traced_ratio", "x", rates[True] / rates[False])
        return (
            f"traced {rates[True]:,.0f} rows/s vs untraced {rates[False]:,.0f} "
            f"({rates[True] / rates[False]:.2f}x)"
        )

    await repeat(ctx, result, once)
    return result


async def _traced_drain(ctx: Context, rows: int, traced: bool) -> float:
    from opentelemetry.sdk.trace import TracerProvider

    label = "traced" if traced else "untraced"
    async with ctx.database(label) as dsn:
        conn = await asyncpg.connect(dsn)
        provider = TracerProvider()
        dispatcher.tracing.enable(provider)
        try:
            await register_triggers(conn, 1)
            with provider.get_tracer("bench").start_as_current_span("seed"):
                await seed_outbox(conn, rows)
            carried = await conn.fetchval(
                "SELECT count(traceparent) FROM dispatcher.outbox WHERE traceparent LIKE '00-%'"
            )
            if carried != rows:
                raise RuntimeError(f"{carried} of {rows} seeded rows carry a traceparent")
        finally:
            dispatcher.tracing.disable()
            await conn.close()
        args = ("--tracing",) if traced else ()
        run = await drain(ctx, dsn, rows=rows, processes=1, worker_args=args, label=label)
    return run.rate


async def b4(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b4", "B4 drain, no-op async handler, 1 process")
    rows = ctx.sizes.drain_rows
    result.notes.append(
        f"{rows} due rows seeded by emit_many + VACUUM ANALYZE; one dispatcher process, "
        "DispatcherConfig() defaults (batch 100, concurrency 100, LISTEN on)"
    )

    async def once(_: int) -> str:
        return await _seeded_drain(ctx, result, rows=rows, processes=1, label="b4")

    await repeat(ctx, result, once)
    return result


async def b5(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b5", "B5 drain with 10% failing (backoff), 1% dead-lettered")
    rows = ctx.sizes.drain_rows
    breaker = _has_breaker()
    config = ("breaker_threshold=0",) if breaker else ()
    result.notes.append(
        f"as B4; the handler raises on the first attempt for every tenth key (10%, retried "
        f"with exponential backoff from {B5_RETRY.base_delay:g}s) and raises PermanentError "
        "for 1% (dead-lettered at once); the clock stops when every row succeeded or was "
        "dead-lettered"
        + ("; circuit breaker disabled (breaker_threshold=0), see b5 probe" if breaker else "")
    )

    async def once(_: int) -> str:
        return await _seeded_drain(
            ctx, result, rows=rows, processes=1, behaviour="b5", label="b5", config=config
        )

    await repeat(ctx, result, once)
    if breaker:
        # The same workload with the default breaker, once and time-boxed: a stall shows as
        # rows left unsettled when the box closes.
        limit = ctx.sizes.breaker_probe_seconds
        async with ctx.database("b5probe") as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                await register_triggers(conn, 1, retry=B5_RETRY)
                await seed_outbox(conn, rows)
            finally:
                await conn.close()
            run = await drain(
                ctx,
                dsn,
                rows=rows,
                worker_args=("--behaviour", "b5"),
                label="b5probe",
                time_limit=limit,
            )
        result.extra["default_breaker_probe"] = {
            "time_limit_s": limit,
            "rows": rows,
            "settled": run.settled,
            "completed": run.completed,
            "seconds": round(run.seconds, 2),
            "breakers_opened": run.total("breakers_opened"),
            "retried": run.total("retried"),
        }
        ctx.progress(f"b5 default-breaker probe: {result.extra['default_breaker_probe']}")
    return result


async def b6(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b6", "B6 drain with 2 dispatcher processes")
    rows = ctx.sizes.drain_rows
    result.notes.append("as B4 with two processes; duplicates = executions - distinct keys")

    async def once(_: int) -> str:
        return await _seeded_drain(ctx, result, rows=rows, processes=2, label="b6")

    await repeat(ctx, result, once)
    return result


async def scaling(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("scaling", "Drain throughput with 1, 2 and 4 dispatcher processes")
    rows = ctx.sizes.scaling_rows
    result.notes.append(f"{rows} due rows per run, no-op handler, default config per process")
    for procs in ctx.sizes.scaling_processes:

        async def once(_: int, procs: int = procs) -> str:
            line = await _seeded_drain(
                ctx, result, rows=rows, processes=procs, label=f"sc{procs}", metric=f"p{procs}"
            )
            return f"{procs} process(es): {line}"

        await repeat(ctx, result, once)
    return result


async def b7(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b7", "B7 commit -> handler start latency")
    sz = ctx.sizes
    result.notes.append(
        f"producer process: one emit per transaction on a fixed schedule "
        f"({sz.latency_warmup_seconds:g}s warm-up, then {sz.latency_seconds:g}s measured), "
        "4 connections; consumer process: one dispatcher; latency = handler start - "
        "producer's COMMIT returned (same monotonic clock)"
    )
    async with ctx.database("b7") as dsn:
        for listen in (True, False):
            for rate in sz.latency_rates:
                mode = "listen" if listen else "poll"
                tag = f"{mode}_{int(rate)}"

                async def once(
                    _: int,
                    rate: float = rate,
                    listen: bool = listen,
                    mode: str = mode,
                    tag: str = tag,
                ) -> str:
                    lat = await dispatcher_latency(ctx, dsn, rate=rate, listen=listen)
                    for k in ("p50", "p95", "p99", "max"):
                        result.add(f"{tag}_{k}", "ms", lat[k], higher_is_better=False)
                    if lat["missing"]:
                        result.notes.append(f"{tag}: {int(lat['missing'])} events not seen")
                    return (
                        f"{mode} {rate:g}/s: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms, "
                        f"p99 {lat['p99']:.2f} ms ({int(lat['count'])} events, "
                        f"{int(lat['late_sends'])} sent late)"
                    )

                await repeat(ctx, result, once)
    return result


async def b8(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b8", "B8 claim latency vs due backlog")
    sz = ctx.sizes
    result.notes.append(
        f"the dispatcher's own claim statement (`dispatcher.sql.queries().claim`, batch "
        f"{CLAIM_BATCH}, the dispatcher's session settings) timed client-side, "
        f"{sz.claims_per_run} claims per run; after each "
        "(untimed) the claimed rows are deleted and as many new due rows inserted, so the "
        "backlog stays constant; rows seeded by INSERT … SELECT generate_series, then "
        "VACUUM ANALYZE and CHECKPOINT"
    )
    result.extra["due_rows"] = {"small": sz.claim_small, "large": sz.claim_large}
    await _claims(ctx, result, sz.claim_small, "small")
    await _claims(ctx, result, sz.claim_large, "large")
    return result


async def _claims(ctx: Context, result: ScenarioResult, due: int, tag: str) -> None:
    claim = queries().claim
    async with ctx.database("b8") as dsn:
        # The session settings the dispatcher's own claim connection uses (JIT off,
        # asynchronous commit): the claim is timed as the dispatcher runs it.
        conn = await asyncpg.connect(dsn, server_settings=session_settings("bench-b8"))
        try:
            (trigger,) = await register_triggers(conn, 1)
            started = time.perf_counter()
            ctx.progress(f"b8: seeding {due:,} due rows")
            await conn.execute(seed_generate_series(spread=True), due, trigger)
            await conn.execute("VACUUM ANALYZE dispatcher.outbox")
            # Write the seeding's WAL out now, so that a checkpoint it would trigger does
            # not run during the timed claims.
            await conn.execute("CHECKPOINT")
            ctx.progress(f"b8: seeded in {time.perf_counter() - started:.1f}s")
            # EXPLAIN ANALYZE runs the UPDATE: keep the plan, roll the claim back.
            tr = conn.transaction()
            await tr.start()
            try:
                plan = await conn.fetch(
                    f"EXPLAIN (ANALYZE, BUFFERS) {claim}",
                    CLAIM_BATCH,
                    uuid.uuid4(),
                    "bench",
                    5.0,
                    [],
                )
            finally:
                await tr.rollback()
            result.extra[f"plan_{tag}"] = [r[0] for r in plan]
            refill = seed_generate_series(spread=False)

            async def once(_: int) -> str:
                times = []
                for _j in range(ctx.sizes.claims_per_run):
                    t0 = time.perf_counter()
                    rows = await conn.fetch(claim, CLAIM_BATCH, uuid.uuid4(), "bench", 5.0, [])
                    times.append((time.perf_counter() - t0) * 1000)
                    assert len(rows) == CLAIM_BATCH
                    await conn.execute(
                        "DELETE FROM dispatcher.outbox WHERE id = ANY($1::bigint[])",
                        [r["id"] for r in rows],
                    )
                    await conn.execute(refill, len(rows), trigger)
                p50, p99 = percentile(times, 50), percentile(times, 99)
                result.add(f"claim_{tag}_p50", "ms", p50, higher_is_better=False)
                result.add(f"claim_{tag}_p99", "ms", p99, higher_is_better=False)
                return f"{due:,} due: claim p50 {p50:.2f} ms, p99 {p99:.2f} ms"

            await repeat(ctx, result, once)
        finally:
            await conn.close()


async def b9(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b9", "B9 emit cost with 10,000 vs 10 triggers in the scope")
    sz = ctx.sizes
    many = sz.many_triggers
    result.notes.append(
        f"scopes with 10 and with {many} triggers (a third exact keys, a third prefixes, a "
        "third globs, each with its own literal prefix); exactly one matches the emitted key. "
        f"{sz.emits_per_run} emits per run, each timed, inside one transaction rolled back at "
        "the end (so commit fsync does not hide the matching cost)"
    )
    async with ctx.database("b9") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            started = time.perf_counter()
            await register_crowd(conn, "few", 10)
            await register_crowd(conn, "many", many)
            await conn.execute("ANALYZE dispatcher.triggers")
            ctx.progress(
                f"b9: registered {many + 10} triggers in {time.perf_counter() - started:.1f}s"
            )

            async def timed(scope: str) -> list[float]:
                times = []
                tr = conn.transaction()
                await tr.start()
                try:
                    for j in range(sz.emits_per_run):
                        m = dispatcher.Mutation(
                            scope, NAMESPACE, f"hit/{j}", dispatcher.Op.PUT, {"n": j}
                        )
                        t0 = time.perf_counter()
                        rows = await dispatcher.emit(conn, m)
                        times.append((time.perf_counter() - t0) * 1e6)
                        assert len(rows) == 1
                finally:
                    await tr.rollback()
                return times

            async def once(_: int) -> str:
                few = await timed("few")
                crowd = await timed("many")
                result.add("emit_10_mean", "µs", sum(few) / len(few), higher_is_better=False)
                result.add("emit_10_p99", "µs", percentile(few, 99), higher_is_better=False)
                result.add("emit_many_mean", "µs", sum(crowd) / len(crowd), higher_is_better=False)
                result.add("emit_many_p99", "µs", percentile(crowd, 99), higher_is_better=False)
                return (
                    f"10 triggers {sum(few) / len(few):.0f} µs/emit, {many} triggers "
                    f"{sum(crowd) / len(crowd):.0f} µs/emit"
                )

            await repeat(ctx, result, once)
        finally:
            await conn.close()
    return result


async def b10(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("b10", "B10 idle cost: queries per second of an idle dispatcher")
    secs = ctx.sizes.idle_seconds
    result.notes.append(
        f"one dispatcher (defaults, LISTEN on) over an empty outbox, {secs:g}s window after "
        f"{ctx.sizes.idle_warmup_seconds:g}s warm-up. Counted two ways: client-side, every "
        "statement its connections send (asyncpg query loggers, pool reset queries "
        "included); server-side, the database's "
        "pg_stat_database xact_commit + xact_rollback delta (pg_stat_statements is not loaded "
        "on this server; stats reach that view up to ~1s late)"
    )
    async with ctx.database("b10") as dsn:
        admin = await asyncpg.connect(ctx.admin_dsn)
        conn = await asyncpg.connect(dsn)
        name = await conn.fetchval("SELECT current_database()")
        await register_triggers(conn, 1)
        await conn.close()
        xact_sql = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
        try:

            async def once(_: int) -> str:
                async with children() as started:
                    child = await Child.worker(
                        "b10", "consume", "--dsn", dsn, "--count-queries", "--record", "none"
                    )
                    started.append(child)
                    await child.ready()
                    child.go()
                    await asyncio.sleep(ctx.sizes.idle_warmup_seconds)
                    await admin.execute("SELECT pg_stat_clear_snapshot()")
                    x0 = int(await admin.fetchval(xact_sql, name))
                    q0 = int(child.progress.get("queries", 0))
                    t0 = time.monotonic()
                    await asyncio.sleep(secs)
                    q1 = int(child.progress.get("queries", 0))
                    await asyncio.sleep(1.2)  # let the backends flush their statistics
                    await admin.execute("SELECT pg_stat_clear_snapshot()")
                    x1 = int(await admin.fetchval(xact_sql, name))
                    dt = time.monotonic() - t0 - 1.2
                    await child.finish()
                client, server = (q1 - q0) / dt, (x1 - x0) / dt
                result.add("client_queries_per_s", "queries/s", client, higher_is_better=False)
                result.add("server_xacts_per_s", "xacts/s", server, higher_is_better=False)
                return f"{client:.1f} statements/s sent, {server:.1f} transactions/s on the server"

            await repeat(ctx, result, once)
        finally:
            await admin.close()
    return result


async def b11(ctx: Context, *, runs: int = 1) -> ScenarioResult:
    result = ScenarioResult("b11", "B11 dispatcher RSS over a steady run")
    sz = ctx.sizes
    secs, rate = sz.steady_seconds, sz.steady_rate
    sample_every = 5.0 if secs >= 60 else max(0.2, secs / 15)
    result.notes.append(
        f"one dispatcher process consuming a producer process emitting {rate:g}/s for "
        f"{secs:g}s; RSS sampled every {sample_every:g}s; baseline = median of the samples "
        "in the 10-20% stretch of the run (after warm-up); 'flat' compares every later sample "
        f"with it; {runs} run(s) (each is {secs / 60:.1f} minutes)"
    )
    async with ctx.database("b11") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
        finally:
            await conn.close()

        async def once(_: int) -> str:
            samples: list[tuple[float, float]] = []
            async with children() as started:
                consumer = await Child.worker(
                    "b11-consumer", "consume", "--dsn", dsn, "--record", "none"
                )
                producer = await Child.worker(
                    "b11-producer",
                    "produce",
                    "--dsn",
                    dsn,
                    "--rate",
                    str(rate),
                    "--seconds",
                    str(secs),
                    "--prefix",
                    "k",
                    "--no-record",
                )
                started += [consumer, producer]
                await consumer.ready()
                await producer.ready()
                consumer.go()
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                producer.go()
                next_note = t0 + 30
                while not producer.done.is_set():
                    samples.append((time.monotonic() - t0, rss_bytes(consumer.pid) / 2**20))
                    if time.monotonic() >= next_note:
                        next_note += 30
                        ctx.progress(
                            f"b11: {time.monotonic() - t0:.0f}/{secs:g}s, RSS "
                            f"{samples[-1][1]:.1f} MiB, settled {consumer.progress.get('done', 0)}"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(producer.done.wait(), sample_every)
                await producer.finish(stop=False)
                await asyncio.sleep(0.5)
                settled = int(consumer.progress.get("done", 0))
                await consumer.finish()
            base = [m for t, m in samples if 0.1 * secs <= t <= 0.2 * secs] or [samples[0][1]]
            baseline = median(base)
            later = [m for t, m in samples if t > 0.2 * secs] or [samples[-1][1]]
            deviation = max(abs(m / baseline - 1) for m in later) * 100
            growth = (later[-1] / baseline - 1) * 100
            result.add("rss_baseline", "MiB", baseline, higher_is_better=False)
            result.add("rss_end", "MiB", later[-1], higher_is_better=False)
            result.add("rss_max_deviation", "%", deviation, higher_is_better=False)
            result.add("rss_growth", "%", growth, higher_is_better=False)
            result.add("settled", "rows", settled)
            result.extra.setdefault("series", []).append(
                [[round(t, 1), round(m, 2)] for t, m in samples]
            )
            return (
                f"RSS {baseline:.1f} -> {later[-1]:.1f} MiB ({growth:+.1f}%), max deviation "
                f"{deviation:.1f}%, {settled} rows settled"
            )

        for i in range(runs):
            line = await once(i)
            ctx.progress(f"b11 run {i + 1}/{runs}: {line}")
    return result
