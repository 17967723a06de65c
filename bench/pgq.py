"""pgqueuer, latest from PyPI, in its own virtualenv (bench/.venv-pgqueuer), driven through
``bench/pgq_runner.py``: drain of the same number of jobs as B4, and commit→handler latency
at 500/s with its LISTEN/NOTIFY wake-up (the figure the issue quotes for it)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import venv
from pathlib import Path

from bench.child import Child, children
from bench.core import BENCH_DIR, Context, CpuMeter, ScenarioResult, cpu_summary, postmaster_pid
from bench.core import repeat as repeat_runs
from bench.latency import latency_summary

RUNNER = BENCH_DIR / "pgq_runner.py"
LATENCY_RATE = 500.0


def _python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"


def ensure_venv(ctx: Context) -> str:
    """Create (or upgrade) pgqueuer's virtualenv; returns the installed pgqueuer version."""
    python = _python(ctx.pgqueuer_venv)
    if not python.exists():
        ctx.progress(f"pgqueuer: creating {ctx.pgqueuer_venv}")
        venv.EnvBuilder(with_pip=True, clear=True).create(ctx.pgqueuer_venv)
        _pip(python, ctx, required=True)
    elif ctx.pgqueuer_upgrade:
        _pip(python, ctx, required=False)
    out = subprocess.run(
        [str(python), "-c", "import pgqueuer, asyncpg; print(pgqueuer.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _pip(python: Path, ctx: Context, *, required: bool) -> None:
    ctx.progress("pgqueuer: pip install --upgrade pgqueuer asyncpg")
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pgqueuer", "asyncpg"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        if required:
            raise RuntimeError(f"could not install pgqueuer:\n{done.stderr[-2000:]}")
        ctx.progress("pgqueuer: upgrade failed (offline?); using the installed version")


def _runner(ctx: Context, *args: str) -> list[str]:
    return [str(_python(ctx.pgqueuer_venv)), str(RUNNER), *args]


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("pgqueuer", "pgqueuer (asyncpg driver, batch 100, autovac)")
    version = await asyncio.to_thread(ensure_venv, ctx)
    result.extra["version"] = version
    sz = ctx.sizes
    result.notes.append(
        f"pgqueuer {version}: drain of {sz.drain_rows} jobs, one QueueManager on one asyncpg "
        f"connection, batch_size=100, mode=drain, `pgq autovac` settings, durable tables, "
        f"VACUUM ANALYZE after seeding; latency at {LATENCY_RATE:g}/s for "
        f"{sz.latency_seconds:g}s, producer and consumer in separate processes"
    )

    async def once(_: int) -> str:
        async with ctx.database("pgq", migrated=False) as dsn, children() as started:
            meter = CpuMeter(await postmaster_pid(dsn))
            child = await Child.start(
                "pgq-drain", _runner(ctx, "drain", "--dsn", dsn, "--jobs", str(sz.drain_rows))
            )
            started.append(child)
            await child.ready(within=300)
            meter.start([child.pid])
            child.go()
            await child.until("drained")
            cpu = cpu_summary(meter.stop())
            r = await child.finish(stop=False)
        if r["executed"] != sz.drain_rows or r["remaining"] != 0:
            raise RuntimeError(f"pgqueuer drain incomplete: {r}")
        seconds = (r["finished"] - r["started"]) / 1e9
        rate = sz.drain_rows / seconds
        result.add("drain", "rows/s", rate)
        result.add(
            "drain_pgqueuer_cpu_us_per_row",
            "µs",
            r["cpu_seconds"] / sz.drain_rows * 1e6,
            higher_is_better=False,
        )
        result.add(
            "drain_postgres_cpu_us_per_row",
            "µs",
            cpu["postgres_cores"] * cpu["wall_s"] / sz.drain_rows * 1e6,
            higher_is_better=False,
        )
        result.extra.setdefault("drain_cpu", []).append(cpu)
        lat = await _latency(ctx, LATENCY_RATE)
        for k in ("p50", "p95", "p99"):
            result.add(f"latency_{k}", "ms", lat[k], higher_is_better=False)
        return (
            f"drain {rate:,.0f}/s; latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms"
            f" ({int(lat['count'])} events)"
        )

    await repeat_runs(ctx, result, once)
    return result


async def _latency(ctx: Context, rate: float) -> dict[str, float]:
    sz = ctx.sizes
    async with ctx.database("pgqlat", migrated=False) as dsn, children() as started:
        installer = await Child.start("pgq-install", _runner(ctx, "install", "--dsn", dsn))
        started.append(installer)
        await installer.finish(stop=False)
        consumer = await Child.start("pgq-consume", _runner(ctx, "consume", "--dsn", dsn))
        producer = await Child.start(
            "pgq-produce",
            _runner(
                ctx,
                "produce",
                "--dsn",
                dsn,
                "--rate",
                str(rate),
                "--seconds",
                str(sz.latency_seconds),
                "--warmup",
                str(sz.latency_warmup_seconds),
            ),
        )
        started += [consumer, producer]
        await consumer.ready()
        await producer.ready()
        consumer.go()
        await asyncio.sleep(0.3)  # let the consumer reach its LISTEN before the first job
        producer.go()
        produced = await producer.finish(stop=False, within=sz.latency_seconds * 3 + 60)
        await asyncio.sleep(0.5)  # the last handler starts well within this
        consumed = await consumer.finish()
    return latency_summary(produced["committed"], consumed["starts"])
