"""Commit → handler-start latency with producer and consumer in separate processes (B7).

The producer (``bench.worker produce``) emits one mutation per transaction on a fixed
schedule and records when each COMMIT returned; the consumer (a dispatcher in
``bench.worker consume --record latency``) records when each handler started. Both use
``time.monotonic_ns()``, one clock for all processes on Linux. A handler can start a few
microseconds before its producer sees the COMMIT acknowledged; such negative values are
kept as measured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import asyncpg

from bench.child import Child, children
from bench.core import Context, percentile
from bench.fixtures import register_triggers


def latency_summary(
    committed: Mapping[str, int], starts: Sequence[Sequence[object]]
) -> dict[str, float]:
    """Percentiles (ms) of handler start minus commit, over events seen by both sides."""
    first: dict[str, int] = {}
    for key, t in starts:
        k = str(key)
        if k not in first:
            first[k] = int(str(t))
    lat = [(first[k] - t) / 1e6 for k, t in committed.items() if k in first]
    return {
        "count": float(len(lat)),
        "missing": float(len(committed) - len(lat)),
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": max(lat) if lat else float("nan"),
        "mean": sum(lat) / len(lat) if lat else float("nan"),
    }


async def dispatcher_latency(
    ctx: Context, dsn: str, *, rate: float, listen: bool, worker_args: Sequence[str] = ()
) -> dict[str, float]:
    """One B7 measurement on a migrated database ``dsn`` (triggers registered here once);
    ``worker_args`` are more options of the consumer (``bench.worker consume``)."""
    sz = ctx.sizes
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE dispatcher.outbox")
        if not await conn.fetchval("SELECT count(*) FROM dispatcher.triggers"):
            await register_triggers(conn, 1, pattern="lat/*", name="lat")
            await register_triggers(conn, 1, pattern="warm/*", name="warm")
    finally:
        await conn.close()
    consumer_args = ["consume", "--dsn", dsn, "--record", "latency"]
    if not listen:
        consumer_args.append("--no-listen")
    consumer_args += worker_args
    async with children() as started:
        consumer = await Child.worker("b7-consumer", *consumer_args)
        producer = await Child.worker(
            "b7-producer",
            "produce",
            "--dsn",
            dsn,
            "--rate",
            str(rate),
            "--seconds",
            str(sz.latency_seconds),
            "--warmup",
            str(sz.latency_warmup_seconds),
        )
        started += [consumer, producer]
        await consumer.ready()
        await producer.ready()
        consumer.go()
        await asyncio.sleep(0.3)  # let the consumer connect and LISTEN before the first event
        producer.go()
        produced = await producer.finish(stop=False, within=sz.latency_seconds * 3 + 60)
        await asyncio.sleep(0.5)  # longer than a poll interval: the last event is picked up
        consumed = await consumer.finish()
    summary = latency_summary(produced["committed"], consumed["starts"])
    summary["late_sends"] = float(produced["late"])
    return summary
