"""A child process of the bench: a dispatcher (``consume``) or a paced producer (``produce``).

Protocol on stdin/stdout, one line each: the child prints ``READY`` once set up and waits
for ``GO``; a consumer then prints ``P {json}`` progress lines (every 50 ms) until it reads
``STOP``; both write their results as JSON to ``--out`` and print ``DONE`` before exiting.
Times are ``time.monotonic_ns()``, which on Linux is one clock for every process.

    python -m bench.worker consume --dsn … --out result.json [--behaviour b5] [--no-listen]
        [--loop uvloop]
    python -m bench.worker produce --dsn … --out result.json --rate 500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

import dispatcher
from bench import querylog
from bench.fixtures import mutation

PROGRESS_EVERY = 0.05
DEFAULTS = dispatcher.DispatcherConfig()
# How often the consumer looks at the dispatcher's counters to timestamp the last change.
WATCH_EVERY = 0.005


class QueryCounter:
    """Counts every statement the dispatcher's connections send."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _record: object) -> None:
        self.count += 1


_stdin: asyncio.StreamReader | None = None


async def _read_line() -> str:
    """The next line from the parent ("" at end of input), without a reader thread (which
    would show up in profiles of the dispatcher)."""
    global _stdin
    if _stdin is None:
        _stdin = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(_stdin)
        await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, sys.stdin)
    return (await _stdin.readline()).decode().strip()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _write_json(path: str, data: object) -> None:
    Path(path).write_text(json.dumps(data))


async def consume(args: argparse.Namespace) -> None:
    counter = QueryCounter()
    if args.count_queries:
        querylog.install(counter)
    keys: list[str] = []
    starts: list[tuple[str, int]] = []
    record_latency = args.record == "latency"
    record_keys = args.record == "keys"

    async def noop(ctx: dispatcher.HandlerContext) -> None:
        if record_latency:
            starts.append((str(ctx.event["key"]), time.monotonic_ns()))
        elif record_keys:
            keys.append(ctx.idempotency_key)

    async def b5(ctx: dispatcher.HandlerContext) -> None:
        # 1% dead-letter at once; 10% (spread: every tenth key) fail their first attempt
        # and succeed on the retry.
        if record_keys:
            keys.append(ctx.idempotency_key)
        n = int(str(ctx.event["key"]).rsplit("/", 1)[1])
        if n % 100 == 0:
            raise dispatcher.PermanentError("bench: permanent failure")
        if n % 10 == 5 and ctx.attempt == 1:
            raise RuntimeError("bench: transient failure")

    if args.tracing:
        _enable_tracing()
    handlers = dispatcher.HandlerRegistry()
    handlers.register("noop", b5 if args.behaviour == "b5" else noop)
    settings = {"listen": not args.no_listen, **_overrides(args.config)}
    config = dispatcher.DispatcherConfig(**settings)
    d = dispatcher.Dispatcher(args.dsn, handlers, config=config)
    # As `dispatcher run` does once it is set up (docs/configuration.md).
    gc.freeze()
    _say("READY")
    if await _read_line() != "GO":
        return
    profiler = _start_profiler(args.profile)
    last_change = time.monotonic_ns()
    stop = anyio.Event()

    async def watch() -> None:
        nonlocal last_change
        seen = -1
        next_report = 0.0
        while True:
            s = d.stats
            done = s.succeeded + s.dead_lettered
            now = time.monotonic()
            if done != seen:
                seen = done
                last_change = time.monotonic_ns()
            if now >= next_report:
                next_report = now + PROGRESS_EVERY
                progress = {
                    "done": done,
                    "ok": s.succeeded,
                    "dead": s.dead_lettered,
                    "retried": s.retried,
                    "executed": s.executed,
                    "claims": s.claims,
                    "last": last_change,
                    "queries": counter.count,
                }
                _say("P " + json.dumps(progress))
            await anyio.sleep(WATCH_EVERY)

    async def wait_stop() -> None:
        while await _read_line() not in ("STOP", ""):
            pass
        stop.set()

    stopped = anyio.Event()

    async def run_dispatcher(*, task_status: TaskStatus[None]) -> None:
        try:
            await d.run(task_status=task_status)
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run_dispatcher)
        tg.start_soon(watch)
        tg.start_soon(wait_stop)
        await stop.wait()
        _stop_profiler(profiler, args.profile)
        d.stop()
        await stopped.wait()
        tg.cancel_scope.cancel()
    result = {
        "stats": d.stats.as_dict(),
        "keys": keys,
        "starts": starts,
        "last": last_change,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "queries": counter.count,
        "loop": _loop_name(),
    }
    _write_json(args.out, result)
    _say("DONE")


async def produce(args: argparse.Namespace) -> None:
    """Emit one mutation per transaction at ``rate``/s on a schedule (open loop: a slow
    commit does not delay the next send), recording when each commit returned."""
    conns = [await asyncpg.connect(args.dsn) for _ in range(args.connections)]
    free: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    committed: dict[str, int] = {}
    late = 0

    async def send(i: int, key_prefix: str) -> None:
        conn = await free.get()
        try:
            async with conn.transaction():
                await dispatcher.emit(conn, mutation(i, prefix=key_prefix))
            if args.record:
                committed[f"{key_prefix}/{i}"] = time.monotonic_ns()
        finally:
            free.put_nowait(conn)

    async def paced(seconds: float, key_prefix: str) -> None:
        nonlocal late
        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(int(seconds * args.rate)):
                delay = start + i / args.rate - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                elif delay < -0.005:
                    late += 1
                tg.start_soon(send, i, key_prefix)

    _say("READY")
    if await _read_line() != "GO":
        return
    if args.warmup > 0:
        await paced(args.warmup, "warm")
        committed.clear()
    started = time.monotonic_ns()
    await paced(args.seconds, args.prefix)
    finished = time.monotonic_ns()
    for c in conns:
        await c.close()
    produced = {"committed": committed, "late": late, "started": started, "finished": finished}
    _write_json(args.out, produced)
    _say("DONE")


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings as DispatcherConfig keyword arguments, typed like the field's
    default."""
    result: dict[str, Any] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        default = getattr(DEFAULTS, name)  # AttributeError names an unknown field
        if isinstance(default, bool):
            result[name] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int | float | str):
            result[name] = type(default)(text)
        else:
            raise ValueError(f"cannot set {name} from the command line")
    return result


def _loop_name() -> str:
    kind = type(asyncio.get_running_loop())
    return f"{kind.__module__}.{kind.__qualname__}"


def _run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """``main`` in a new event loop: the standard library's, or uvloop's."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def _start_profiler(path: str | None) -> Any:
    if not path:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    return profiler


def _stop_profiler(profiler: Any, path: str | None) -> None:
    if profiler is None or not path:
        return
    profiler.stop()
    Path(path).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    Path(path).with_suffix(".html").write_text(profiler.output_html())


def _enable_tracing() -> None:
    """As an application would: the SDK's provider with a batch processor, here exporting
    to nowhere, so that the cost measured is the dispatcher's spans, not a collector's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    dispatcher.tracing.enable(provider)


def main(argv: list[str] | None = None) -> None:
    # Like a deployment: the dispatcher's log records are formatted and written somewhere
    # (here /dev/null, so the bench's output stays readable).
    logging.basicConfig(level=logging.INFO, filename=os.devnull)
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--dsn", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--behaviour", choices=("noop", "b5"), default="noop")
    c.add_argument("--record", choices=("none", "keys", "latency"), default="keys")
    c.add_argument("--no-listen", action="store_true")
    c.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a DispatcherConfig field (repeatable), e.g. batch_size=500",
    )
    c.add_argument("--count-queries", action="store_true")
    c.add_argument(
        "--tracing",
        action="store_true",
        help="trace every execution: the OpenTelemetry SDK, batched to an exporter that "
        "drops the spans",
    )
    c.add_argument("--profile", default=None, help="write a pyinstrument profile here")
    c.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the dispatcher's event loop (as dispatcher run --loop)",
    )
    p = sub.add_parser("produce")
    p.add_argument("--dsn", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--prefix", default="lat")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args(argv)
    if args.mode == "consume":
        _run(consume(args), args.loop)
    else:
        asyncio.run(produce(args))


if __name__ == "__main__":
    main()
