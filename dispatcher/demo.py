"""``dispatcher demo``: the whole flow on a real Postgres in a few seconds.

Registers four triggers (a flaky one that recovers, an always-failing one with a dead-letter
handler, a self-triggering loop and a synchronous target), writes KV mutations, runs the
dispatcher with a live display, and prints what happened.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dispatcher.core.models import RetryPolicy
from dispatcher.kv import KvStore
from dispatcher.migrate import migrate
from dispatcher.postgres import ProvidedPostgres, embedded_postgres
from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig, InvokeTimeout
from dispatcher.runtime.handlers import HandlerContext, HandlerRegistry
from dispatcher.runtime.stats import Stats
from dispatcher.triggers import TriggerRegistry

SCOPE = "demo"
QUICK = RetryPolicy(base_delay=0.05, factor=2.0, max_delay=0.5, jitter=0.2, max_attempts=4)


@dataclass
class DemoResult:
    stats: Stats
    dead_letters: int
    handled: int
    sync_replies: int
    abandoned: int
    source: str


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[ProvidedPostgres]:
    if dsn:
        yield ProvidedPostgres(dsn, "env")
    else:
        with embedded_postgres() as provided:
            yield provided


def build_handlers(rng: random.Random) -> HandlerRegistry:
    handlers = HandlerRegistry()
    failures: dict[str, int] = {}

    @handlers.handler("demo.flaky")
    async def flaky(ctx: HandlerContext) -> str:
        # Fails the first one or two tries of each event, then recovers.
        budget = failures.setdefault(ctx.idempotency_key, rng.randint(1, 2))
        if ctx.attempt <= budget:
            raise ConnectionError(f"upstream hiccup on attempt {ctx.attempt}")
        return "ok"

    @handlers.handler("demo.broken")
    async def broken(ctx: HandlerContext) -> None:
        raise RuntimeError("the billing service rejects this account")

    @handlers.handler("demo.on_dead_letter")
    async def on_dead_letter(ctx: HandlerContext) -> None:
        await ctx.kv.put("alerts", f"alerts/{ctx.event['dead_letter_id']}", ctx.event["reason"])

    @handlers.handler("demo.loop")
    async def loop(ctx: HandlerContext) -> None:
        # Writes the key that triggers it: only the depth limit stops this.
        await ctx.kv.put("counters", "counters/loop", {"depth": ctx.depth})

    @handlers.handler("demo.quote")
    async def quote(ctx: HandlerContext) -> dict[str, object]:
        value = ctx.event.get("value")
        qty = value.get("qty", 1) if isinstance(value, dict) else 1
        if value == "slow":
            await anyio.sleep(0.5)
        return {"price": 9.5 * float(qty) if isinstance(qty, int | float) else 0.0}

    return handlers


async def _setup(conn: asyncpg.Connection) -> dict[str, int]:
    reg = TriggerRegistry()
    await conn.execute(
        "DELETE FROM dispatcher.triggers WHERE scope = $1", SCOPE
    )  # re-runnable on a shared database
    ids = {}
    for name, namespace, pattern, target, handles_dead_letters in [
        ("flaky", "orders", "orders/*", "demo.flaky", False),
        ("broken", "billing", "billing/*", "demo.broken", False),
        ("dead-letters", "billing", "billing/*", "demo.on_dead_letter", True),
        ("loop", "counters", "counters/loop", "demo.loop", False),
        ("quote", "quotes", "quotes/*", "demo.quote", False),
    ]:
        t = await reg.register(
            conn,
            scope=SCOPE,
            name=name,
            namespace=namespace,
            key_pattern=pattern,
            target=target,
            registered_by="user:demo",
            retry=QUICK,
            is_dead_letter_handler=handles_dead_letters,
        )
        ids[name] = t.id
    return ids


def _table(
    stats: Stats, extra: dict[str, int] | None = None, title: str = "dispatcher demo"
) -> Table:
    t = Table(title=title)
    t.add_column("what")
    t.add_column("count", justify="right")
    rows = {
        "executed": stats.executed,
        "succeeded": stats.succeeded,
        "retried": stats.retried,
        "dead-lettered": stats.dead_lettered,
        "handled by dead-letter handler": stats.handled,
        "depth cutoffs": stats.depth_exceeded,
        "sync replies": stats.replies,
        "abandoned sync replies": stats.abandoned,
    }
    rows.update(extra or {})
    for k, v in rows.items():
        t.add_row(k, str(v))
    return t


async def run_demo(dsn: str | None, console: Console, *, orders: int = 200) -> DemoResult:
    with _database(dsn) as pg:
        console.print(f"Postgres: {pg.source} server")
        await migrate(pg.dsn)
        conn = await asyncpg.connect(pg.dsn)
        try:
            ids = await _setup(conn)
            kv = KvStore()
            async with conn.transaction():
                for i in range(orders):
                    await kv.put(conn, SCOPE, "orders", f"orders/{i}", {"n": i})
                for i in range(3):
                    await kv.put(conn, SCOPE, "billing", f"billing/acct-{i}", {"plan": "pro"})
                await kv.put(conn, SCOPE, "counters", "counters/loop", {"depth": 0})
            rng = random.Random(7)
            d = Dispatcher(
                pg.dsn,
                build_handlers(rng),
                config=DispatcherConfig(
                    poll_interval=0.05, max_trigger_depth=5, breaker_threshold=0
                ),
                rng=rng,
            )
            with Live(_table(d.stats), console=console, refresh_per_second=8) as live:
                async with anyio.create_task_group() as tg:
                    await tg.start(d.run)
                    for qty in (1, 2, 3):
                        reply = await d.invoke(ids["quote"], {"qty": qty}, time_limit=5)
                        console.print(f"sync quote qty={qty}: {reply.status} {reply.result}")
                    with contextlib.suppress(InvokeTimeout):
                        await d.invoke(ids["quote"], "slow", time_limit=0.1)
                        console.print("the slow quote answered in time")
                    await _until_idle(conn, d, live)
                    d.stop()
            dead = await conn.fetchval(
                "SELECT count(*) FROM dispatcher.dead_letters WHERE scope = $1", SCOPE
            )
            handled = await conn.fetchval(
                "SELECT count(*) FROM dispatcher.dead_letters WHERE scope = $1 "
                "AND resolution = 'handled'",
                SCOPE,
            )
            abandoned = await conn.fetchval(
                "SELECT count(*) FROM dispatcher.abandoned_executions WHERE scope = $1", SCOPE
            )
        finally:
            await conn.close()
        result = DemoResult(d.stats, dead, handled, d.stats.replies, abandoned, pg.source)
        console.print()
        console.print(
            _table(
                d.stats,
                {
                    "dead_letters rows": dead,
                    "… of which handled": handled,
                    "abandoned_executions rows": abandoned,
                },
                title="summary",
            )
        )
        return result


async def _until_idle(conn: asyncpg.Connection, d: Dispatcher, live: Live) -> None:
    with anyio.fail_after(60):
        while True:
            live.update(_table(d.stats))
            left = await conn.fetchval("SELECT count(*) FROM dispatcher.outbox")
            status = d.status()
            if left == 0 and status.in_flight == 0 and d.stats.abandoned >= 1:
                return
            with anyio.move_on_after(0.1):
                await d.progressed()
