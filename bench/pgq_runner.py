"""pgqueuer's side of the comparison. Runs inside bench/.venv-pgqueuer (never imports the
dispatcher or the rest of the bench) and speaks the same READY/GO/STOP/DONE protocol as
``bench.worker``.

Configuration: pgqueuer's best one-process setup — the asyncpg driver on one connection,
``batch_size=100``, its recommended autovacuum settings (``pgq autovac``), durable tables.

    python bench/pgq_runner.py install --dsn … --out x.json
    python bench/pgq_runner.py drain --dsn … --out x.json --jobs 20000
    python bench/pgq_runner.py consume --dsn … --out x.json
    python bench/pgq_runner.py produce --dsn … --out x.json --rate 500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
from pgqueuer import PgQueuer, Queries  # type: ignore[import-not-found, unused-ignore]
from pgqueuer.types import QueueExecutionMode  # type: ignore[import-not-found, unused-ignore]

BATCH_SIZE = 100
ENTRYPOINT = "noop"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


def _write_json(path: str, data: object) -> None:
    Path(path).write_text(json.dumps(data))


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _payload(i: int, prefix: str) -> bytes:
    # The same event the dispatcher's emit stores, so both move the same bytes.
    event = {
        "event_id": f"00000000-0000-4000-8000-{i:012d}",
        "scope": "bench",
        "namespace": "items",
        "key": f"{prefix}/{i}",
        "op": "put",
        "value": {"n": i, "tag": "bench"},
        "depth": 0,
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def install(args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(args.dsn)
    try:
        queries = Queries.from_asyncpg_connection(conn)
        await queries.install()
        await queries.optimize_autovacuum()
    finally:
        await conn.close()
    _write_json(args.out, {"installed": True})


async def drain(args: argparse.Namespace) -> None:
    await install(args)
    conn = await asyncpg.connect(args.dsn)
    queries = Queries.from_asyncpg_connection(conn)
    n = args.jobs
    for start in range(0, n, 5_000):
        count = min(n, start + 5_000) - start
        await queries.enqueue(
            [ENTRYPOINT] * count,
            [_payload(i, "k") for i in range(start, start + count)],
            [0] * count,
        )
    await conn.execute("VACUUM ANALYZE pgqueuer")
    await conn.close()

    executed = 0
    last = 0

    conn = await asyncpg.connect(args.dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)

    async def noop(job: Any) -> None:
        nonlocal executed, last
        executed += 1
        last = time.monotonic_ns()

    pgq.entrypoint(ENTRYPOINT)(noop)

    _say("READY")
    if await _read_line() != "GO":
        return
    cpu = _cpu_seconds()
    started = time.monotonic_ns()
    await pgq.run(batch_size=BATCH_SIZE, mode=QueueExecutionMode.drain)
    finished = time.monotonic_ns()
    # Before any connection closes: the parent reads its CPU meters now.
    _say('P {"drained": true}')
    await asyncio.sleep(0.2)
    cpu = _cpu_seconds() - cpu
    remaining = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    await conn.close()
    result = {
        "started": started,
        "finished": finished,
        "last_handler": last,
        "executed": executed,
        "remaining": remaining,
        "cpu_seconds": cpu,
    }
    _write_json(args.out, result)
    _say("DONE")


async def consume(args: argparse.Namespace) -> None:
    starts: list[tuple[str, int]] = []
    conn = await asyncpg.connect(args.dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)

    async def noop(job: Any) -> None:
        starts.append((json.loads(job.payload)["key"], time.monotonic_ns()))

    pgq.entrypoint(ENTRYPOINT)(noop)

    _say("READY")
    if await _read_line() != "GO":
        return
    runner = asyncio.create_task(pgq.run(batch_size=BATCH_SIZE))
    while await _read_line() not in ("STOP", ""):
        pass
    pgq.shutdown.set()
    await asyncio.wait_for(runner, 30)
    await conn.close()
    _write_json(args.out, {"starts": starts})
    _say("DONE")


async def produce(args: argparse.Namespace) -> None:
    """One job per transaction at ``rate``/s on a schedule (open loop), four connections."""
    conns = [await asyncpg.connect(args.dsn) for _ in range(4)]
    free: asyncio.Queue[Any] = asyncio.Queue()
    for c in conns:
        free.put_nowait(Queries.from_asyncpg_connection(c))
    committed: dict[str, int] = {}
    late = 0
    tasks: set[asyncio.Task[None]] = set()

    async def send(i: int, prefix: str) -> None:
        queries = await free.get()
        try:
            await queries.enqueue(ENTRYPOINT, _payload(i, prefix))
        finally:
            free.put_nowait(queries)
        committed[f"{prefix}/{i}"] = time.monotonic_ns()

    async def paced(seconds: float, prefix: str) -> None:
        nonlocal late
        start = time.monotonic()
        for i in range(int(seconds * args.rate)):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1
            task = asyncio.create_task(send(i, prefix))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))

    _say("READY")
    if await _read_line() != "GO":
        return
    if args.warmup > 0:
        await paced(args.warmup, "warm")
        committed.clear()
    await paced(args.seconds, "lat")
    for c in conns:
        await c.close()
    _write_json(args.out, {"committed": committed, "late": late})
    _say("DONE")


def main() -> None:
    parser = argparse.ArgumentParser(prog="pgq_runner")
    parser.add_argument("mode", choices=("install", "drain", "consume", "produce"))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    modes = {"install": install, "drain": drain, "consume": consume, "produce": produce}
    asyncio.run(modes[args.mode](args))


if __name__ == "__main__":
    main()
