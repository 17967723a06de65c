"""Playing the demo: the database it runs on, the run itself (writes, synchronous calls, a
dispatcher until every row is done) and what it reads back."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

import anyio
import asyncpg
from rich.console import Console

from dispatcher.admin import MAX_LIST_LIMIT, Admin, DeadLetterFilter, StatusReport
from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerNotFound
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.core.validate import is_int
from dispatcher.demo.board import _THIS_RUN, _Board, _intro, _shown
from dispatcher.demo.scenario import (
    BILLING_ACCOUNTS,
    MAX_DEPTH,
    MAX_ORDERS,
    SCOPE,
    SLOW_QUOTE_LIMIT,
    SLOW_QUOTE_TAKES,
    DemoError,
    DemoResult,
    _clean_up,
    _install_triggers,
    build_handlers,
)
from dispatcher.emit import Emitter
from dispatcher.flow import FlowControl
from dispatcher.kv import KvStore
from dispatcher.migrate import migrate
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.postgres import EmbeddedServerMissing, ProvidedPostgres, embedded_postgres
from dispatcher.records import AbandonedExecution, DeadLetterSummary
from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig, InvokeTimeout
from dispatcher.triggers import TriggerRegistry


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
    await _reset_breakers(conn, FlowControl(schema=schema), ids)
    kv = KvStore(Emitter(schema=schema))
    await _write_keys(conn, kv, console, orders)
    d = _dispatcher(pg.dsn, schema)
    board = _Board(d.stats)
    with _shown(board, console):
        await _drive(conn, d, admin, ids, started, console, time_limit=60 + orders / 100)
        letters, handled, abandoned = await _read_back(conn, admin, board, started)
    _check_no_strangers(letters)
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


async def _reset_breakers(
    conn: asyncpg.Connection, flow: FlowControl, ids: Mapping[str, int]
) -> None:
    for trigger_id in ids.values():
        # A breaker an earlier worker left open would hold this run's rows for its cool-down
        # (the demo runs without breakers: one that opens again means a worker is running).
        await flow.reset_breaker(conn, trigger_id)


async def _write_keys(conn: asyncpg.Connection, kv: KvStore, console: Console, orders: int) -> None:
    """The scenario's KV mutations, in one transaction: the orders, the billing accounts and
    the loop's first key."""
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


def _dispatcher(dsn: str, schema: str) -> Dispatcher:
    rng = random.Random(7)
    return Dispatcher(
        dsn,
        build_handlers(rng),
        config=DispatcherConfig(
            schema=schema, poll_interval=0.05, max_trigger_depth=MAX_DEPTH, breaker_threshold=0
        ),
        rng=rng,
    )


async def _drive(
    conn: asyncpg.Connection,
    d: Dispatcher,
    admin: Admin,
    ids: Mapping[str, int],
    started: datetime,
    console: Console,
    *,
    time_limit: float,
) -> None:
    """Run ``d`` while making the synchronous calls, until every row is done."""
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        try:
            abandoning = await _quotes(d, ids["quote"], console)
            console.print("Waiting until every row is done…")
            await _until_done(conn, d, admin, ids, started, abandoning, time_limit=time_limit)
        finally:
            d.stop()


async def _read_back(
    conn: asyncpg.Connection, admin: Admin, board: _Board, started: datetime
) -> tuple[list[DeadLetterSummary], int, list[AbandonedExecution]]:
    """The demo scope's dead letters (and how many were handled) and abandoned executions
    written during this run, also shown on ``board``."""
    letters = await admin.list_dead_letters(
        conn, DeadLetterFilter(scope=SCOPE, since=started), limit=MAX_LIST_LIMIT
    )
    abandoned = await admin.list_abandoned(conn, since=started, scope=SCOPE)
    handled = sum(1 for x in letters if x.resolution is Resolution.HANDLED)
    board.read_back["dead_letters rows"] = (len(letters), _THIS_RUN)
    board.read_back["… handled"] = (handled, "of them resolved 'handled'")
    board.read_back["abandoned_executions"] = (len(abandoned), _THIS_RUN)
    return letters, handled, abandoned


def _check_no_strangers(letters: Sequence[DeadLetterSummary]) -> None:
    strangers = [x for x in letters if x.reason is DeadLetterReason.TARGET_NOT_FOUND]
    if strangers:
        raise DemoError(
            f"another dispatcher without the demo's handlers ran {len(strangers)} of its rows "
            f"(dead-lettered: target not found): stop it, or run the demo against another "
            "database or --schema"
        )


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
