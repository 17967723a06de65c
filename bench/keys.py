"""Per-key semantics, side by side in one run: an ordered trigger's drain against an
unordered one's over the same rows, and a latest-state trigger on one hot key.

**Ordered drain.** ``drain_rows`` rows over ``ordered_keys`` keys (row i mutates key
i % keys, so each key has several versions), drained by one dispatcher process with a no-op
handler, once with an unordered trigger and once with ``ordering="key"``; the two alternate
which goes first from one repetition to the next, and the ratio is taken within a
repetition.

**Hot key.** Four connections mutate one key as fast as they can for ``hot_key_seconds``
(each mutation its own transaction, through ``emit``), while a dispatcher in the same
process delivers it to a ``delivery="latest"`` trigger with a no-op handler. Reported: the
mutations committed, the handler calls, their ratio, and whether the last delivery carried
the last committed value (checked every repetition).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import asyncpg

import dispatcher
from bench.core import Context, ScenarioResult, repeat
from bench.drain import drain
from bench.fixtures import NAMESPACE, PRINCIPAL, SCOPE, register_triggers, seed_outbox

HOT_WRITERS = 4
HOT_KEY = "hot/1"


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("keys", "Per-key order and latest-state coalescing")
    sz = ctx.sizes
    rows, keys = sz.drain_rows, min(sz.ordered_keys, sz.drain_rows)
    result.notes.append(
        f"ordered drain: {rows} rows over {keys} keys, 1 process, no-op handler, "
        "unordered and ordering='key' alternately first"
    )
    result.notes.append(
        f"hot key: {HOT_WRITERS} connections emitting one key for {sz.hot_key_seconds:g}s, "
        "a delivery='latest' trigger, no-op handler, DispatcherConfig() defaults"
    )

    async def once(i: int) -> str:
        rates: dict[str, float] = {}
        for ordering in ("none", "key") if i % 2 == 0 else ("key", "none"):
            rates[ordering] = await _drain(ctx, rows, keys, ordering)
        result.add("unordered_drain", "rows/s", rates["none"])
        result.add("ordered_drain", "rows/s", rates["key"])
        ratio = rates["key"] / rates["none"]
        result.add("ordered_ratio", "x", ratio)
        mutations, calls, final_ok = await _hot_key(ctx, sz.hot_key_seconds)
        result.add("hot_mutations", "mutations", mutations)
        result.add("hot_calls", "handler calls", calls, higher_is_better=False)
        result.add("hot_coalescing", "mutations per call", mutations / max(calls, 1))
        result.add("hot_final_state", "1 = last value delivered", 1.0 if final_ok else 0.0)
        if not final_ok:
            raise RuntimeError("the hot key's last delivery did not carry its last value")
        return (
            f"ordered {rates['key']:,.0f} rows/s vs unordered {rates['none']:,.0f} "
            f"({ratio:.2f}x); hot key {mutations:,} mutations -> {calls} calls "
            f"({mutations / max(calls, 1):,.0f}x)"
        )

    await repeat(ctx, result, once)
    return result


async def _drain(ctx: Context, rows: int, keys: int, ordering: str) -> float:
    label = f"keys_{ordering}"
    async with ctx.database(label) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await register_triggers(conn, 1, ordering=ordering)
            await seed_outbox(conn, rows, keys=keys)
        finally:
            await conn.close()
        run = await drain(ctx, dsn, rows=rows, processes=1, label=label)
    if run.duplicates:
        raise RuntimeError(f"{run.duplicates} duplicate executions in the {ordering} drain")
    return run.rate


async def _hot_key(ctx: Context, seconds: float) -> tuple[int, int, bool]:
    async with ctx.database("keys_hot") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await dispatcher.TriggerRegistry().register(
                conn,
                scope=SCOPE,
                name="latest",
                namespace=NAMESPACE,
                key_pattern="hot/*",
                target="latest",
                registered_by=PRINCIPAL,
                delivery="latest",
            )
        finally:
            await conn.close()
        delivered: list[Any] = []
        handlers = dispatcher.HandlerRegistry()

        @handlers.handler("latest")
        async def latest(hctx: dispatcher.HandlerContext) -> None:
            delivered.append(hctx.event["value"])

        writers = [await asyncpg.connect(dsn) for _ in range(HOT_WRITERS)]
        final = {"n": -1, "final": True}
        try:
            d = dispatcher.Dispatcher(dsn, handlers)
            async with anyio.create_task_group() as tg:
                await tg.start(d.run)
                deadline = time.perf_counter() + seconds
                counts = await asyncio.gather(
                    *(_hammer(w, i, deadline) for i, w in enumerate(writers))
                )
                # One last mutation once every writer is done: the key's final value.
                await dispatcher.emit(writers[0], _hot(final), autocommit=True)
                version = await writers[0].fetchval(
                    "SELECT version FROM dispatcher.key_versions WHERE key = $1", HOT_KEY
                )
                # Everything committed is delivered before the dispatcher stops.
                with anyio.fail_after(60):
                    while await writers[0].fetchval("SELECT count(*) FROM dispatcher.outbox"):
                        await d.progressed()
                d.stop()
        finally:
            for w in writers:
                await w.close()
    mutations = sum(counts) + 1
    if version != mutations:
        raise RuntimeError(f"{mutations} mutations committed but the key is at version {version}")
    final_ok = bool(delivered) and delivered[-1] == final
    return mutations, len(delivered), final_ok


def _hot(value: dict[str, Any]) -> dispatcher.Mutation:
    return dispatcher.Mutation(SCOPE, NAMESPACE, HOT_KEY, dispatcher.Op.PUT, value)


async def _hammer(conn: asyncpg.Connection, writer: int, deadline: float) -> int:
    n = 0
    while time.perf_counter() < deadline:
        await dispatcher.emit(conn, _hot({"n": writer + HOT_WRITERS * n}), autocommit=True)
        n += 1
    return n
