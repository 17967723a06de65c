"""The dispatcher process on uvloop against the standard library's asyncio loop (issue 17).

**Drain.** B4: ``drain_rows`` seeded rows, one dispatcher process (``bench.worker consume
--loop …``), a no-op handler, ``DispatcherConfig()`` defaults. Reported per loop: rows/s and
the dispatcher's CPU time per row.

**Latency.** B7 with LISTEN at 500 events/s: the producer (always asyncio) commits one
mutation per transaction; the consumer runs the dispatcher on the loop under test. Reported
per loop: p50 and p99 of commit → handler start.

Within a repetition each measurement runs once per loop, one right after the other, and the
order alternates between repetitions (asyncio first, then uvloop first, …), so drift on a
shared machine falls on both loops alike. The ratios (uvloop / asyncio) are taken within a
repetition; their medians are the result. Each child reports the class of the loop it ran,
and a drain on the wrong loop stops the scenario.
"""

from __future__ import annotations

import importlib.util

import asyncpg

from bench.core import Context, ScenarioResult, repeat
from bench.drain import DrainRun, drain
from bench.fixtures import register_triggers, seed_outbox
from bench.latency import dispatcher_latency

LOOPS = ("asyncio", "uvloop")
# The loop class each --loop value must run (bench.worker reports module.qualname).
LOOP_CLASSES = {"asyncio": "asyncio.", "uvloop": "uvloop."}
LATENCY_RATE = 500.0


async def run(ctx: Context) -> ScenarioResult:
    if importlib.util.find_spec("uvloop") is None:
        raise RuntimeError("the loops scenario needs uvloop: pip install 'dispatcher[uvloop]'")
    result = ScenarioResult("loops", "Event loops: uvloop vs asyncio (B4 drain, B7 LISTEN 500/s)")
    sz = ctx.sizes
    rows = sz.drain_rows
    result.notes.append(
        f"drain: B4 ({rows} seeded rows, 1 process, no-op handler, defaults); latency: B7 "
        f"LISTEN at {LATENCY_RATE:g}/s ({sz.latency_warmup_seconds:g}s warm-up, "
        f"{sz.latency_seconds:g}s measured; the producer always on asyncio); the loops "
        "alternate which goes first; ratios are uvloop / asyncio within a repetition"
    )
    async with ctx.database("loopslat") as latency_dsn:

        async def once(i: int) -> str:
            order = LOOPS if i % 2 == 0 else LOOPS[::-1]
            drains = {loop: await _drain(ctx, rows, loop) for loop in order}
            latencies = {
                loop: await dispatcher_latency(
                    ctx, latency_dsn, rate=LATENCY_RATE, listen=True, worker_args=("--loop", loop)
                )
                for loop in order
            }
            for loop in LOOPS:
                run, lat = drains[loop], latencies[loop]
                result.add(f"{loop}_drain", "rows/s", run.rate)
                result.add(
                    f"{loop}_drain_duplicates", "executions", run.duplicates, higher_is_better=False
                )
                result.add(
                    f"{loop}_cpu_us_per_row",
                    "µs",
                    run.dispatcher_cpu_seconds / rows * 1e6,
                    higher_is_better=False,
                )
                for k in ("p50", "p99"):
                    result.add(f"{loop}_latency_{k}", "ms", lat[k], higher_is_better=False)
                if lat["missing"]:
                    result.notes.append(f"{loop} latency: {int(lat['missing'])} events not seen")
            ratios: dict[str, float] = {}
            for name in ("drain", "cpu_us_per_row", "latency_p50", "latency_p99"):
                uv = result.metrics[f"uvloop_{name}"].values[-1]
                base = result.metrics[f"asyncio_{name}"].values[-1]
                # At smoke sizes a drain can take less CPU than one clock tick: no ratio.
                ratios[name] = uv / base if base else float("nan")
                if base:
                    result.add(f"ratio_{name}", "x", ratios[name], higher_is_better=name == "drain")
            return (
                f"{order[0]} first; uvloop/asyncio: drain {ratios['drain']:.2f}x "
                f"({drains['uvloop'].rate:,.0f} vs {drains['asyncio'].rate:,.0f} rows/s), "
                f"CPU/row {ratios['cpu_us_per_row']:.2f}x, "
                f"p50 {ratios['latency_p50']:.2f}x, p99 {ratios['latency_p99']:.2f}x"
            )

        await repeat(ctx, result, once)
    return result


async def _drain(ctx: Context, rows: int, loop: str) -> DrainRun:
    async with ctx.database(f"loops_{loop}") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1)
            await seed_outbox(conn, rows)
        finally:
            await conn.close()
        run = await drain(ctx, dsn, rows=rows, worker_args=("--loop", loop), label=loop)
    wrong = [name for name in run.loops if not name.startswith(LOOP_CLASSES[loop])]
    if wrong:
        raise RuntimeError(f"--loop {loop} ran the dispatcher on {wrong}")
    return run
