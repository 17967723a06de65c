"""Drain a seeded outbox with N dispatcher processes and time it (B4, B5, B6, scaling).

Each process is a ``bench.worker consume`` child. The clock starts when GO is sent and stops
at the last change of any child's settled count (succeeded + dead-lettered), once the
children together report every row settled and the outbox is empty.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bench.child import Child, children
from bench.core import Context, CpuMeter, cpu_summary, postmaster_pid

STALL_SECONDS = 60.0


@dataclass
class DrainRun:
    rows: int
    seconds: float
    settled: int
    completed: bool
    executions: int
    duplicates: int
    stats: list[dict[str, int]]
    cpu: dict[str, float] = field(default_factory=dict)
    dispatcher_cpu_seconds: float = 0.0
    # Each child's event loop class, as it reported it (``--loop``).
    loops: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    def total(self, key: str) -> int:
        return sum(s.get(key, 0) for s in self.stats)


async def drain(
    ctx: Context,
    dsn: str,
    *,
    rows: int,
    processes: int = 1,
    worker_args: tuple[str, ...] = (),
    label: str = "drain",
    profile: str | None = None,
    time_limit: float | None = None,
) -> DrainRun:
    """Drain ``rows`` seeded rows; with ``time_limit``, give up after that many seconds and
    report how many settled (``completed`` False)."""
    meter = CpuMeter(await postmaster_pid(dsn))
    async with children() as started:
        for i in range(processes):
            args = ["consume", "--dsn", dsn, *worker_args]
            if profile and i == 0:
                args += ["--profile", profile]
            started.append(await Child.worker(f"{label}{i}", *args))
        await asyncio.gather(*(c.ready() for c in started))
        meter.start([c.pid for c in started])
        t_go = min(c.go() for c in started)
        completed = await _wait_settled(dsn, started, rows, time_limit)
        cpu = meter.stop()
        settled = sum(int(c.progress.get("done", 0)) for c in started)
        results: list[dict[str, Any]] = [await c.finish() for c in started]
    last = max(int(r["last"]) for r in results)
    keys: Counter[str] = Counter()
    for r in results:
        keys.update(r["keys"])
    executions = sum(keys.values())
    return DrainRun(
        rows=rows,
        seconds=(last - t_go) / 1e9 if completed else (time.monotonic_ns() - t_go) / 1e9,
        settled=settled,
        completed=completed,
        executions=executions,
        duplicates=executions - len(keys),
        stats=[r["stats"] for r in results],
        cpu=cpu_summary(cpu),
        dispatcher_cpu_seconds=cpu.get("processes", float("nan")),
        loops=[str(r.get("loop", "")) for r in results],
    )


async def _outbox_state(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS rows,
                count(*) FILTER (WHERE due_at <= clock_timestamp()) AS due,
                count(lease_token) AS leased,
                extract(epoch FROM min(due_at) - clock_timestamp()) AS next_due_in
            FROM dispatcher.outbox"""
        )
    finally:
        await conn.close()
    return dict(row) if row is not None else {}


async def _wait_settled(
    dsn: str, started: list[Child], rows: int, time_limit: float | None
) -> bool:
    seen = -1
    changed = time.monotonic()
    deadline = None if time_limit is None else changed + time_limit
    while True:
        await asyncio.sleep(0.02)
        if deadline is not None and time.monotonic() > deadline:
            return False
        for c in started:
            if c.done.is_set():
                raise RuntimeError(f"{c.name} exited during the drain")
        done = sum(int(c.progress.get("done", 0)) for c in started)
        if done != seen:
            seen, changed = done, time.monotonic()
        elif time.monotonic() - changed > STALL_SECONDS:
            state = await _outbox_state(dsn)
            progress = [c.progress for c in started]
            raise RuntimeError(
                f"drain stalled at {done}/{rows} settled rows; outbox {state}; workers {progress}"
            )
        if done >= rows:
            conn = await asyncpg.connect(dsn)
            try:
                left = await conn.fetchval("SELECT count(*) FROM dispatcher.outbox")
            finally:
                await conn.close()
            if left == 0:
                return True
