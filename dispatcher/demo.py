"""``dispatcher demo``: the whole flow on a real Postgres in a few seconds.

Registers five triggers in the scope ``demo`` (a flaky one that recovers, an always-failing
one, a dead-letter handler for it, a self-triggering loop and a synchronous quote), writes KV
mutations, makes synchronous calls, runs a dispatcher with a live table until every row is
done, and reads the outcome back through :class:`~dispatcher.admin.Admin`. Everything goes
through the library's public functions, in the schema given.

>>> result = await run_demo(dsn, Console(), orders=20)
>>> (result.dead_letters, result.handled, result.abandoned)
(3, 3, 1)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import asyncpg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from dispatcher.admin import MAX_LIST_LIMIT, Admin, DeadLetterFilter, StatusReport
from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerExists, TriggerNotFound
from dispatcher.core.models import Op, RetryPolicy, Trigger
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.core.validate import is_int
from dispatcher.emit import Emitter
from dispatcher.flow import FlowControl
from dispatcher.kv import KvStore
from dispatcher.migrate import migrate
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.postgres import EmbeddedServerMissing, ProvidedPostgres, embedded_postgres
from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig, InvokeTimeout
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


async def run_demo(
    dsn: str | None,
    console: Console,
    *,
    orders: int = 200,
    schema: str = DEFAULT_SCHEMA,
    keep: bool = False,
) -> DemoResult:
    """Play the scenario against ``dsn`` (an embedded server when None), print it on
    ``console``, and return what happened.

    Without ``keep`` the demo removes its triggers and keys at the end (its dead letters and
    abandoned executions stay, resolved); with ``keep`` it leaves them, and an embedded
    server keeps running. Raises :class:`DemoError` (one line saying what to do) when it
    cannot run or another process keeps it from finishing.
    """
    if not is_int(orders) or not 1 <= orders <= MAX_ORDERS:
        raise InvalidInput("orders", orders, f"must be an integer from 1 to {MAX_ORDERS}")
    with _database(dsn, keep) as pg:
        console.print(_intro(pg, schema))
        await migrate(pg.dsn, schema=schema)
        conn = await asyncpg.connect(pg.dsn)
        try:
            with _single_error():
                result = await _play(conn, pg, console, orders=orders, schema=schema, keep=keep)
        finally:
            await conn.close()
    return result


@contextlib.contextmanager
def _database(dsn: str | None, keep: bool) -> Iterator[ProvidedPostgres]:
    if dsn:
        yield ProvidedPostgres(dsn, "env")
        return
    try:
        with embedded_postgres(keep=keep) as provided:
            yield provided
    except EmbeddedServerMissing:
        raise DemoError(
            "the demo needs Postgres: give --dsn (or set DATABASE_URL), or install the "
            "embedded server with `pip install 'dispatcher[embedded]'`"
        ) from None


@contextlib.contextmanager
def _single_error() -> Iterator[None]:
    """Raise a task group's lone error as itself, so that the CLI reports it in one line."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors: BaseException = group
        while isinstance(errors, BaseExceptionGroup) and len(errors.exceptions) == 1:
            errors = errors.exceptions[0]
        if isinstance(errors, DispatcherError):
            raise errors from None
        raise


async def _play(
    conn: asyncpg.Connection,
    pg: ProvidedPostgres,
    console: Console,
    *,
    orders: int,
    schema: str,
    keep: bool,
) -> DemoResult:
    admin = Admin(schema=schema)
    registry = TriggerRegistry(schema=schema)
    started = (await admin.status(conn)).at
    ids = await _install_triggers(conn, registry)
    flow = FlowControl(schema=schema)
    for trigger_id in ids.values():
        # A breaker an earlier worker left open would hold this run's rows for its cool-down
        # (the demo runs without breakers: one that opens again means a worker is running).
        await flow.reset_breaker(conn, trigger_id)
    kv = KvStore(Emitter(schema=schema))
    console.print(
        f"One transaction writes {orders} orders, {BILLING_ACCOUNTS} billing accounts and the "
        "loop's first key."
    )
    async with conn.transaction():
        for i in range(orders):
            await kv.put(conn, SCOPE, "orders", f"orders/{i}", {"n": i})
        for i in range(BILLING_ACCOUNTS):
            await kv.put(conn, SCOPE, "billing", f"billing/acct-{i}", {"plan": "pro"})
        await kv.put(conn, SCOPE, "counters", "counters/loop", {"depth": 0})
    rng = random.Random(7)
    d = Dispatcher(
        pg.dsn,
        build_handlers(rng),
        config=DispatcherConfig(
            schema=schema, poll_interval=0.05, max_trigger_depth=MAX_DEPTH, breaker_threshold=0
        ),
        rng=rng,
    )
    board = _Board(d.stats)
    with _shown(board, console):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            try:
                abandoning = await _quotes(d, ids["quote"], console)
                console.print("Waiting until every row is done…")
                await _until_done(
                    conn, d, admin, ids, started, abandoning, time_limit=60 + orders / 100
                )
            finally:
                d.stop()
        letters = await admin.list_dead_letters(
            conn, DeadLetterFilter(scope=SCOPE, since=started), limit=MAX_LIST_LIMIT
        )
        abandoned = await admin.list_abandoned(conn, since=started, scope=SCOPE)
        handled = sum(1 for x in letters if x.resolution is Resolution.HANDLED)
        board.read_back["dead_letters rows"] = (len(letters), _THIS_RUN)
        board.read_back["… handled"] = (handled, "of them resolved 'handled'")
        board.read_back["abandoned_executions"] = (len(abandoned), _THIS_RUN)
    strangers = [x for x in letters if x.reason is DeadLetterReason.TARGET_NOT_FOUND]
    if strangers:
        raise DemoError(
            f"another dispatcher without the demo's handlers ran {len(strangers)} of its rows "
            f"(dead-lettered: target not found): stop it, or run the demo against another "
            "database or --schema"
        )
    if not keep:
        await _clean_up(conn, registry, kv)
    return DemoResult(
        d.stats,
        len(letters),
        handled,
        d.stats.replies,
        len(abandoned),
        pg.source,
        pg.dsn,
        schema,
        keep,
        pg.data_dir,
    )


def _intro(pg: ProvidedPostgres, schema: str) -> Group:
    where = "the Postgres given by --dsn" if pg.source == "env" else "an embedded Postgres"
    triggers = Table.grid(padding=(0, 2))
    for t in TRIGGERS:
        triggers.add_row(f"  {t.name}", t.pattern, t.story)
    return Group(
        f"dispatcher demo on {where}, schema {schema!r}.",
        f"Five triggers in the scope {SCOPE!r}, each showing one part of the flow:",
        triggers,
    )


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


async def _quotes(d: Dispatcher, quote: int, console: Console) -> bool:
    """Make the synchronous calls; return whether the slow one timed out (it does, unless
    the machine is far slower than the handler's sleep)."""
    console.print("Synchronous calls to the quote trigger (200: the handler answered the caller):")
    try:
        for qty in (1, 2, 3):
            reply = await d.invoke(quote, {"qty": qty}, time_limit=5)
            console.print(f"  quote qty={qty}: {reply.status} {reply.result}")
        try:
            await d.invoke(quote, "slow", time_limit=SLOW_QUOTE_LIMIT)
            console.print("  slow quote: answered in time after all")
            return False
        except InvokeTimeout:
            console.print(
                f"  slow quote: no reply within {SLOW_QUOTE_LIMIT:g} s, on purpose (the handler "
                f"takes {SLOW_QUOTE_TAKES:g} s);\n  its answer is kept in abandoned_executions"
            )
            return True
    except TriggerNotFound:
        raise DemoError(
            f"the demo's trigger {SCOPE}/quote was removed while the demo ran: is another "
            "`dispatcher demo` running against this schema? Let it finish, or use another "
            "database or --schema"
        ) from None


async def _until_done(
    conn: asyncpg.Connection,
    d: Dispatcher,
    admin: Admin,
    ids: Mapping[str, int],
    started: datetime,
    abandoning: bool,
    *,
    time_limit: float,
) -> None:
    """Wait until no row is left (parked rows aside: the demo's policy never parks) and,
    when ``abandoning``, the slow quote's answer is stored; fail at once when something
    outside the demo holds its rows."""
    left = 0
    try:
        with anyio.fail_after(time_limit):
            while True:
                report = await admin.status(conn)
                _check_not_held(report, ids)
                left = report.outbox.total - report.outbox.parked
                if (
                    left == 0
                    and d.status().in_flight == 0
                    and (
                        not abandoning
                        or await admin.list_abandoned(conn, 1, since=started, scope=SCOPE)
                    )
                ):
                    return
                with anyio.move_on_after(0.1):
                    await d.progressed()
    except TimeoutError:
        raise DemoError(
            f"{left} rows were still waiting after {time_limit:g} s: is another dispatcher "
            "running against this schema (`dispatcher status` shows pauses and breakers)? "
            "Stop it, or run the demo against another database or --schema"
        ) from None


def _check_not_held(report: StatusReport, ids: Mapping[str, int]) -> None:
    mine = set(ids.values())
    for b in report.breakers:
        if b.trigger_id in mine and b.state != "closed":
            # The demo runs without breakers: another dispatcher opened this one.
            raise DemoError(
                f"another dispatcher is running against this schema: it opened the circuit "
                f"breaker of {SCOPE}/{b.trigger_name}, which holds the demo's rows: stop it, "
                "or run the demo against another database or --schema"
            )
    for p in report.pauses:
        if (p.scope is None and p.trigger_id is None) or p.scope == SCOPE or p.trigger_id in mine:
            raise DemoError(
                f"a pause of {p.target} holds the demo's rows: lift it with `dispatcher "
                "resume`, or run the demo against another database or --schema"
            )


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


_THIS_RUN = "written during this run, in the database"
_MEANINGS = {
    "executed": "handler calls, retries included",
    "succeeded": "calls that returned",
    "retried": "failures rescheduled with backoff",
    "dead-lettered": "rows out of attempts (billing accounts)",
    "dead letters handled": "resolved by the dead-letter handler",
    "depth cutoffs": "loop rows stopped by the depth limit",
    "sync replies": "answers a caller waited for",
    "abandoned sync replies": "answers nobody waited for (slow quote)",
}


@dataclass
class _Board:
    """The one table the demo shows: this process's counts as they change, then the rows
    read back from the database."""

    stats: Stats
    read_back: dict[str, tuple[int, str]] = field(default_factory=dict)
    caption: str | None = "running…"

    def render(self) -> Table:
        t = Table(title="dispatcher demo", caption=self.caption)
        t.add_column("what")
        t.add_column("count", justify="right")
        t.add_column("meaning")
        counts = {
            "executed": self.stats.executed,
            "succeeded": self.stats.succeeded,
            "retried": self.stats.retried,
            "dead-lettered": self.stats.dead_lettered,
            "dead letters handled": self.stats.handled,
            "depth cutoffs": self.stats.depth_exceeded,
            "sync replies": self.stats.replies,
            "abandoned sync replies": self.stats.abandoned,
        }
        for what, n in counts.items():
            t.add_row(what, str(n), _MEANINGS[what])
        for what, (n, meaning) in self.read_back.items():
            t.add_row(what, str(n), meaning)
        return t


@contextlib.contextmanager
def _shown(board: _Board, console: Console) -> Iterator[None]:
    """Show ``board`` live; leave its last state on the screen, once."""
    try:
        with Live(get_renderable=board.render, console=console):
            try:
                yield
            except BaseException:
                board.caption = "stopped early"
                raise
            board.caption = None
    finally:
        if not console.is_terminal:
            console.line()  # rich ends a live display with a new line only on a terminal
