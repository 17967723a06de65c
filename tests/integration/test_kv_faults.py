"""Database faults under a handler's ``ctx.kv``: the dispatcher's database failing is not the
handler failing. No attempt is used, no dead letter is written, no breaker counts it, and the
row runs again once the database answers. A value the kv table refuses stays the handler's
error."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    FailureKind,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    PermanentError,
    RetryPolicy,
    StoreUnavailable,
    TriggerRegistry,
    emit_many,
)
from dispatcher.runtime.failures import classify

APP = "kv-faults"
# One attempt and a breaker that opens on the first counted failure: a fault charged to the
# handler would show as a dead letter and an open breaker at once.
ONE_SHOT = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=1)
CONFIG = DispatcherConfig(poll_interval=0.05, breaker_threshold=1, application_name=APP)

Fault = Literal["lock_timeout", "terminated"]
# 1,024 characters (the longest key) from the supplementary planes: 4 KiB that do not compress.
_CHARS = random.Random(7)
LONG_KEY = "".join(chr(0x10000 + _CHARS.randrange(0xFFFF)) for _ in range(1024))


async def _trigger(conn: asyncpg.Connection) -> int:
    t = await TriggerRegistry().register(
        conn,
        scope="acme",
        name="writer",
        namespace="users",
        key_pattern="users/*",
        target="writer",
        registered_by="user:1",
        retry=ONE_SHOT,
        execution_timeout=30,
    )
    return t.id


async def _until(check: Callable[[], Awaitable[bool]], d: Dispatcher) -> None:
    """Wait for durable state, re-checking at each step of the dispatcher's progress."""
    while not await check():
        with anyio.move_on_after(0.2):  # progress is a hint; the check is the truth
            await d.progressed()


async def _waiting_on_kv(conn: asyncpg.Connection) -> list[int]:
    """Backends of the dispatcher blocked on the kv table's lock."""
    rows = await conn.fetch(
        """SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
           WHERE NOT l.granted AND l.relation = 'dispatcher.kv'::regclass
             AND a.application_name = $1""",
        APP,
    )
    return [r["pid"] for r in rows]


@asynccontextmanager
async def _kv_locked(dsn: str) -> AsyncIterator[None]:
    """Hold the kv table against writes for the body of the block."""
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE dispatcher.kv IN EXCLUSIVE MODE")
            yield
    finally:
        await holder.close()


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["lock_timeout", "terminated"])
async def test_a_database_fault_under_ctx_kv_uses_no_attempt_and_feeds_no_breaker(
    dsn: str, conn: asyncpg.Connection, fault: Fault
) -> None:
    if fault == "lock_timeout":
        # The dispatcher's sessions (opened below) give up on a lock after 100 ms: a fault of
        # the database session, deterministic, without killing anything.
        name = await conn.fetchval("SELECT quote_ident(current_database())")
        await conn.execute(f"ALTER DATABASE {name} SET lock_timeout = '100ms'")
    handlers = HandlerRegistry()
    seen: list[BaseException] = []
    attempts: list[int] = []
    failed = anyio.Event()

    @handlers.handler("writer")
    async def writer(ctx: HandlerContext) -> None:
        attempts.append(ctx.attempt)
        try:
            await ctx.kv.put("mail", f"sent/{ctx.event['key']}", {"attempt": ctx.attempt})
        except Exception as exc:
            seen.append(exc)
            failed.set()
            # Wrapped, as handlers do: the classification looks down the chain.
            raise RuntimeError("could not record the mail") from exc

    trigger_id = await _trigger(conn)
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {"n": 1})], autocommit=True)
    d = Dispatcher(dsn, handlers, config=CONFIG)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            async with _kv_locked(dsn):
                await tg.start(d.run)
                if fault == "terminated":

                    async def blocked() -> bool:
                        return bool(await _waiting_on_kv(conn))

                    await _until(blocked, d)
                    # Every backend of the dispatcher, as an operator's kill or a failover
                    # would: the one blocked in the handler's write among them.
                    await conn.execute(
                        """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                           WHERE application_name LIKE $1 || '%' AND pid <> pg_backend_pid()""",
                        APP,
                    )
                await failed.wait()

                async def settled() -> bool:
                    # The failure's outcome is written: a reschedule (its error kept on the
                    # row), or, were the fault charged to the handler, a dead letter.
                    done: bool = await conn.fetchval(
                        """SELECT EXISTS (SELECT FROM dispatcher.outbox WHERE errors <> '[]')
                               OR EXISTS (SELECT FROM dispatcher.dead_letters)"""
                    )
                    return done

                await _until(settled, d)
                dead = await conn.fetch("SELECT reason, attempts FROM dispatcher.dead_letters")
                assert [tuple(r) for r in dead] == []
                row = await conn.fetchrow("SELECT attempts, errors FROM dispatcher.outbox")
                assert row is not None
                assert row["attempts"] == 0
                assert '"kind": "unavailable"' in row["errors"], row["errors"]
                assert await _breaker_failures(conn, trigger_id) == 0

            async def drained() -> bool:
                return await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0

            await _until(drained, d)
            d.stop()
    assert isinstance(seen[0], StoreUnavailable), seen[0]
    assert isinstance(seen[0].__cause__, asyncpg.PostgresError | asyncpg.InterfaceError | OSError)
    assert set(attempts) == {1}
    assert len(attempts) >= 2
    assert (
        await conn.fetchval(
            "SELECT value FROM dispatcher.kv WHERE namespace = 'mail' AND key = 'sent/users/1'"
        )
        == '{"attempt": 1}'
    )
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters") == 0
    assert await _breaker_failures(conn, trigger_id) == 0
    assert (d.stats.dead_lettered, d.stats.breakers_opened, d.stats.retried) == (0, 0, 0)
    assert d.stats.rescheduled >= 1
    assert d.stats.succeeded == 1


@pytest.mark.anyio
async def test_a_value_the_kv_table_refuses_stays_the_handlers_error(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()
    raised: list[BaseException] = []

    @handlers.handler("writer")
    async def writer(ctx: HandlerContext) -> None:
        try:
            # A key within the library's length limit but, at four bytes a character, too
            # large for the kv table's index: a program limit (SQLSTATE class 54) the
            # handler's value hit, not a fault of the database.
            await ctx.kv.put("mail", LONG_KEY, {"n": 1})
        except BaseException as exc:
            raised.append(exc)
            raise

    trigger_id = await _trigger(conn)
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {"n": 1})], autocommit=True)
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0, application_name=APP)
    stats = await Dispatcher(dsn, handlers, config=config).run_until_idle(time_limit=30)
    assert not isinstance(raised[0], StoreUnavailable)
    assert isinstance(raised[0], asyncpg.PostgresError)
    assert raised[0].sqlstate.startswith("54"), raised[0]
    [dead] = await conn.fetch("SELECT reason, attempts FROM dispatcher.dead_letters")
    assert (dead["reason"], dead["attempts"]) == ("handler_error", 1)
    assert stats.dead_lettered == 1
    assert await _breaker_failures(conn, trigger_id) == 0  # breakers off here


def _wrapped(inner: BaseException, how: Literal["cause", "context", "none"]) -> BaseException:
    """``inner`` wrapped in a RuntimeError the way a handler would do it."""
    try:
        try:
            raise inner
        except BaseException:
            if how == "cause":
                raise RuntimeError("wrapped") from inner
            if how == "none":
                raise RuntimeError("wrapped") from None
            raise RuntimeError("wrapped")  # noqa: B904 -- the implicit context is the point
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def _cycle() -> BaseException:
    a, b = RuntimeError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    return a


def _deep(n: int) -> BaseException:
    exc: BaseException = StoreUnavailable("db down")
    for _ in range(n):
        outer = RuntimeError("layer")
        outer.__cause__ = exc
        exc = outer
    return exc


UA = FailureKind.UNAVAILABLE


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(StoreUnavailable("db down"), UA, id="itself"),
        pytest.param(_wrapped(StoreUnavailable("x"), "cause"), UA, id="raise from"),
        pytest.param(_wrapped(StoreUnavailable("x"), "context"), UA, id="raised while handling"),
        pytest.param(_deep(3), UA, id="three layers down"),
        pytest.param(
            _wrapped(StoreUnavailable("x"), "none"),
            FailureKind.HANDLER_ERROR,
            id="disowned with from None",
        ),
        pytest.param(
            _wrapped(ValueError("x"), "cause"), FailureKind.HANDLER_ERROR, id="another cause"
        ),
        pytest.param(_cycle(), FailureKind.HANDLER_ERROR, id="a circular chain ends"),
        pytest.param(_deep(100), FailureKind.HANDLER_ERROR, id="the walk is bounded"),
    ],
)
def test_classification_finds_the_store_fault_down_the_chain(
    exc: BaseException, kind: FailureKind
) -> None:
    assert classify(exc).kind is kind


def test_an_explicit_classification_wins_over_the_store_fault() -> None:
    with pytest.raises(PermanentError) as raised:
        raise PermanentError("bad input") from StoreUnavailable("db down")
    assert classify(raised.value).kind is FailureKind.PERMANENT


async def _breaker_failures(conn: asyncpg.Connection, trigger_id: int) -> int:
    n = await conn.fetchval(
        """SELECT coalesce(sum(failures + opened_count), 0) FROM dispatcher.breakers
           WHERE trigger_id = $1""",
        trigger_id,
    )
    return int(n)
