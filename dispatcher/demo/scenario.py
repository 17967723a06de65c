"""The demo's scenario: its constants, the five triggers and their handlers, registering
them (reusing an earlier run's) and cleaning up after a run."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg

from dispatcher.core.errors import DispatcherError, TriggerExists, TriggerNotFound
from dispatcher.core.models import Op, RetryPolicy, Trigger
from dispatcher.kv import KvStore
from dispatcher.runtime.handlers import HandlerContext, HandlerRegistry
from dispatcher.runtime.stats import Stats
from dispatcher.triggers import DEFAULT_TIMEOUT, TriggerRegistry

SCOPE = "demo"
MAX_ORDERS = 10_000
QUICK = RetryPolicy(base_delay=0.05, factor=2.0, max_delay=0.5, jitter=0.2, max_attempts=4)
MAX_DEPTH = 5
BILLING_ACCOUNTS = 3
SLOW_QUOTE_LIMIT = 0.1
SLOW_QUOTE_TAKES = 0.5
# Every key the demo writes lives in one of these namespaces (its clean-up lists them).
NAMESPACES = ("orders", "billing", "counters", "alerts")


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    namespace: str
    pattern: str
    target: str
    handles_dead_letters: bool
    story: str


TRIGGERS = (
    _Spec(
        "flaky", "orders", "orders/*", "demo.flaky", False,
        "fails once or twice per order, then succeeds",
    ),
    _Spec(
        "broken", "billing", "billing/*", "demo.broken", False,
        f"always fails: {QUICK.max_attempts} attempts, then dead_letters",
    ),
    _Spec(
        "dead-letters", "billing", "billing/*", "demo.on_dead_letter", True,
        "dead-letter handler: writes an alert per letter",
    ),
    _Spec(
        "loop", "counters", "counters/loop", "demo.loop", False,
        f"re-triggers itself until the depth limit ({MAX_DEPTH})",
    ),
    _Spec(
        "quote", "quotes", "quotes/*", "demo.quote", False,
        "answers synchronous calls with a price",
    ),
)  # fmt: skip


class DemoError(DispatcherError):
    """The demo cannot run, or something outside it kept it from finishing; the message
    says what to do."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo did. ``stats`` counts this process's work; ``dead_letters``,
    ``handled`` and ``abandoned`` are the demo scope's rows written during this run, read
    from the database. ``kept`` says whether the database (and, for an embedded server,
    the server itself, its files in ``data_dir``) was left for inspection."""

    stats: Stats
    dead_letters: int
    handled: int
    sync_replies: int
    abandoned: int
    source: str
    dsn: str
    schema: str
    kept: bool
    data_dir: Path | None


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
            await anyio.sleep(SLOW_QUOTE_TAKES)
        return {"price": 9.5 * float(qty) if isinstance(qty, int | float) else 0.0}

    return handlers


async def _install_triggers(conn: asyncpg.Connection, registry: TriggerRegistry) -> dict[str, int]:
    """Register the demo's triggers, reusing the ones an earlier run left as they are (so
    that a second demo on the same schema does not pull them from under the first)."""
    present = await registry.list(conn)
    strangers = sorted({t.scope for t in present} - {SCOPE})
    if strangers:
        # The demo's dispatcher claims every row of the schema: it would run theirs too.
        raise DemoError(
            f"the schema {registry.schema!r} holds triggers of other scopes "
            f"({', '.join(strangers[:3])}{', …' if len(strangers) > 3 else ''}), whose rows "
            "the demo's dispatcher would run with its own handlers: run the demo against a "
            "database of its own, or give --schema (for example --schema dispatcher_demo)"
        )
    mine = {t.name: t for t in present}
    wanted = {t.name for t in TRIGGERS}
    for t in mine.values():
        if t.name not in wanted:
            await _remove(conn, registry, t.id)
    ids: dict[str, int] = {}
    for spec in TRIGGERS:
        found = mine.get(spec.name)
        if found is not None and _same(found, spec):
            ids[spec.name] = found.id
            continue
        if found is not None:
            await _remove(conn, registry, found.id)
        try:
            trigger = await registry.register(
                conn,
                scope=SCOPE,
                name=spec.name,
                namespace=spec.namespace,
                key_pattern=spec.pattern,
                target=spec.target,
                registered_by="user:demo",
                retry=QUICK,
                is_dead_letter_handler=spec.handles_dead_letters,
            )
        except TriggerExists:  # another demo registered it a moment ago
            trigger = await registry.get_by_name(conn, SCOPE, spec.name)
        ids[spec.name] = trigger.id
    return ids


def _same(t: Trigger, spec: _Spec) -> bool:
    return (
        t.namespace == spec.namespace
        and t.key_pattern == spec.pattern
        and t.target == spec.target
        and t.is_dead_letter_handler == spec.handles_dead_letters
        and t.retry == QUICK
        and t.ops == frozenset(Op)
        and t.timeout == DEFAULT_TIMEOUT
        and t.enabled
    )


async def _remove(conn: asyncpg.Connection, registry: TriggerRegistry, trigger_id: int) -> None:
    with contextlib.suppress(TriggerNotFound):  # removed by another demo meanwhile
        await registry.delete(conn, trigger_id)


async def _clean_up(conn: asyncpg.Connection, registry: TriggerRegistry, kv: KvStore) -> None:
    """Remove the demo's triggers, then its keys (with no trigger left, deleting a key
    enqueues nothing). Dead letters and abandoned executions stay: they are resolved, and
    ``dispatcher dead-letters purge`` removes old ones."""
    for t in await registry.list(conn, scope=SCOPE):
        await _remove(conn, registry, t.id)
    for namespace in NAMESPACES:
        while entries := await kv.list(conn, SCOPE, namespace, limit=1000):
            async with conn.transaction():
                for entry in entries:
                    await kv.delete(conn, SCOPE, namespace, entry.key)
