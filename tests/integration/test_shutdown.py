"""Shutdown is bounded whatever handlers do: an execution that will not stop (its handler
swallows cancellation, or is a thread that never returns) is abandoned after
``abandon_after``; its lease is left to expire, since it may still be running, and nothing
it returns later is written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit_many,
)

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
GRACE = 0.5
ABANDON = 1.0
# Room for the final writes, closing the pool and a loaded test machine: a bound, not a
# measurement of speed.
SLACK = 5.0
LEASE_HOLD = 120  # the trigger's time limit: the lease outlives every test here


async def _setup(conn: asyncpg.Connection, target: str) -> None:
    await TriggerRegistry().register(
        conn,
        scope="acme",
        name=target,
        namespace="users",
        key_pattern="users/*",
        target=target,
        registered_by="user:1",
        retry=RetryPolicy(max_attempts=3),
        execution_timeout=LEASE_HOLD,
    )
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {"n": 1})], autocommit=True)


async def _lease(conn: asyncpg.Connection) -> tuple[uuid.UUID | None, int, bool]:
    """(lease token, attempts, whether the lease is still in force) of the only row."""
    row = await conn.fetchrow(
        """SELECT lease_token, attempts, due_at > clock_timestamp() AS held
           FROM dispatcher.outbox"""
    )
    assert row is not None, "the row is gone: an outcome was written"
    return row["lease_token"], row["attempts"], row["held"]


def _config(**changes: Any) -> DispatcherConfig:
    values: dict[str, Any] = {
        "poll_interval": 0.05,
        "grace_period": GRACE,
        "abandon_after": ABANDON,
        "breaker_threshold": 0,
    }
    values.update(changes)
    return DispatcherConfig(**values)


def _abandoned_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if getattr(r, "event", None) == "dispatcher.execution_abandoned"
    ]


class _Run:
    """``Dispatcher.run`` in a task group, with a way to abort it and an event for when it
    has returned."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.scope = anyio.CancelScope()
        self.returned = anyio.Event()

    async def __call__(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with self.scope:
            try:
                await self.d.run(task_status=task_status)
            finally:
                self.returned.set()

    async def returns_within(self, seconds: float, unstick: Callable[[], None]) -> None:
        try:
            with anyio.fail_after(seconds):
                await self.returned.wait()
        finally:
            if not self.returned.is_set():
                unstick()  # let an unbounded stop end, so that the failure is reported


def _stubborn(registry: HandlerRegistry) -> tuple[anyio.Event, asyncio.Event, list[int]]:
    """Register a handler that swallows cancellation until ``let_go`` is set; return
    (started, let_go, cancellations swallowed)."""
    started = anyio.Event()
    let_go = asyncio.Event()
    swallowed: list[int] = []

    @registry.handler("stubborn")
    async def stubborn(ctx: HandlerContext) -> dict[str, bool]:
        started.set()
        while not let_go.is_set():
            try:
                await let_go.wait()
            except asyncio.CancelledError:  # the misbehaviour under test
                swallowed.append(1)
        return {"finished": True}

    return started, let_go, swallowed


async def test_stop_abandons_a_handler_that_swallows_cancellation(
    dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = HandlerRegistry()
    started, let_go, swallowed = _stubborn(handlers)
    await _setup(conn, "stubborn")
    d = Dispatcher(dsn, handlers, config=_config())
    run = _Run(d)
    async with anyio.create_task_group() as tg:
        await tg.start(run)
        with anyio.fail_after(30):
            await started.wait()
        token, _, _ = await _lease(conn)
        d.stop()
        await run.returns_within(GRACE + ABANDON + SLACK, let_go.set)
    assert swallowed
    # Left running, its lease in force and not given back.
    assert await _lease(conn) == (token, 0, True)
    assert d.status().in_flight == 1
    assert (d.stats.executions_abandoned, d.stats.released) == (1, 0)
    [logged] = _abandoned_logs(caplog)
    assert (logged.trigger, logged.scope) == ("stubborn", "acme")  # type: ignore[attr-defined]

    # It ends after all: its outcome is not written, not even by a later run of the same
    # dispatcher (which settles whatever was submitted meanwhile).
    let_go.set()
    with anyio.fail_after(10):
        while d.status().in_flight:
            await d.progressed()
    await d.run_until_idle(time_limit=30)
    assert await _lease(conn) == (token, 0, True)
    assert d.stats.succeeded == 0


async def test_an_aborted_run_skips_the_grace_period_not_the_bound(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """Cancelling run() (what a second signal does) gives cooperative executions their
    leases back at once and abandons the others within ``abandon_after``."""
    handlers = HandlerRegistry()
    started, let_go, _ = _stubborn(handlers)
    await _setup(conn, "stubborn")
    d = Dispatcher(dsn, handlers, config=_config(grace_period=600))
    run = _Run(d)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            with anyio.fail_after(30):
                await started.wait()
            token, _, _ = await _lease(conn)
            run.scope.cancel()
            await run.returns_within(ABANDON + SLACK, let_go.set)
        assert await _lease(conn) == (token, 0, True)
        assert d.stats.executions_abandoned == 1
    finally:
        let_go.set()


async def test_a_blocking_handler_that_never_returns_is_abandoned_with_its_lease(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """Its thread cannot be stopped: shutdown does not wait for it, and does not give its
    lease back either (the thread may still be doing the work)."""
    handlers = HandlerRegistry()
    started = threading.Event()
    release = threading.Event()

    @handlers.handler("sleeper", blocking=True)
    def sleeper(ctx: HandlerContext) -> None:
        started.set()
        release.wait(3600)

    await _setup(conn, "sleeper")
    d = Dispatcher(dsn, handlers, config=_config())
    run = _Run(d)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            with anyio.fail_after(30):
                assert await anyio.to_thread.run_sync(started.wait, 30)
            token, _, _ = await _lease(conn)
            d.stop()
            await run.returns_within(GRACE + ABANDON + SLACK, release.set)
        assert await _lease(conn) == (token, 0, True)
        assert d.stats.executions_abandoned == 1
        assert handlers.threads_abandoned == 1
        assert d.stats.released == 0
    finally:
        release.set()


# The CLI's abandon_after is the default: a stop takes at most grace + this, plus the slack.
CLI_ABANDON = DispatcherConfig().abandon_after

STUBBORN_MODULE = """
import asyncio
import sys

from dispatcher import HandlerRegistry

handlers = HandlerRegistry()


@handlers.handler("stubborn")
async def stubborn(ctx):
    print("stubborn handler started", file=sys.stderr, flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
"""


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice"])
async def test_cli_run_exits_after_sigterm_with_a_handler_that_swallows_cancellation(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, signals: int
) -> None:
    """One signal: stop within the grace period plus ``abandon_after``. Two: the second,
    sent during a long grace period, aborts within ``abandon_after``."""
    (tmp_path / "stubborn_handlers.py").write_text(STUBBORN_MODULE, encoding="utf-8")
    await _setup(conn, "stubborn")
    grace = GRACE if signals == 1 else 600.0
    command = [
        sys.executable, "-m", "dispatcher.cli", "--log-level", "INFO", "run",
        "--dsn", dsn, "--handlers", "stubborn_handlers:handlers",
        "--grace-period", str(grace), "--poll-interval", "0.05",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DISPATCH"))}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    err = b""

    async def read_until(text: bytes) -> None:
        nonlocal err
        assert process.stderr is not None
        with contextlib.suppress(anyio.EndOfStream):
            while text not in err:
                err += await process.stderr.receive()

    process = await anyio.open_process(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    try:
        with anyio.fail_after(60):
            await read_until(b"stubborn handler started")
        token, _, _ = await _lease(conn)
        process.send_signal(signal.SIGTERM)
        bound = grace + CLI_ABANDON + SLACK
        if signals == 2:
            with anyio.fail_after(30):
                await read_until(b"stopping gracefully")
            process.send_signal(signal.SIGTERM)
            bound = CLI_ABANDON + SLACK
        with anyio.fail_after(bound):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_until, b"\0")  # all of it, to the end of the stream
                code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()
    assert code == 0, err.decode(errors="replace")
    assert b"abandoned" in err, err.decode(errors="replace")
    assert await _lease(conn) == (token, 0, True)


async def test_an_execution_cancelled_before_its_first_step_gives_back_its_permit_and_lease(
    dsn: str,
) -> None:
    from dispatcher.core.models import RetryPolicy as Policy
    from dispatcher.core.outcomes import ClaimedRow, Release

    ran: list[str] = []
    handlers = HandlerRegistry()

    @handlers.handler("never")
    async def never(ctx: HandlerContext) -> None:
        ran.append(ctx.idempotency_key)

    d = Dispatcher(dsn, handlers, config=DispatcherConfig(concurrency=4))
    executions, settler = d._executions, d._settler
    row = ClaimedRow(
        id=1,
        lease_token=uuid.uuid4(),
        event_id=uuid.uuid4(),
        trigger_id=1,
        scope="acme",
        trigger_name="t",
        target="never",
        registered_by="user:1",
        payload={"key": "users/1"},
        attempts=0,
        orphans=0,
        depth=0,
        reply_to=None,
        dead_letter_id=None,
        policy=Policy(),
        timeout=5.0,
        age=0.0,
    )
    assert d.gate.try_acquire()
    executions.start(row)
    # No await between: the task exists but has not run a line.
    await executions.cancel_all()
    assert ran == []
    assert d.gate.free == 4
    assert executions.in_flight == 0
    assert [(s.row.id, s.decision) for s in settler.pending] == [(1, Release())]
