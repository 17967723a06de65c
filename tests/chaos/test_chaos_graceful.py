"""Scenario 2 — graceful stop under load: SIGTERM with work in flight.

Shows: exit status 0 within the grace period, in-flight work finishes, zero duplicates, no
row left leased; past the grace period the unfinished executions are cancelled and their
leases given back; a second signal aborts at once and still leaves nothing leased; handlers
that swallow cancellation cannot hold a stop past the grace period plus ``abandon_after``:
they are abandoned with their leases, which are left to expire (never given back while the
execution may still run).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import pytest

from dispatcher import DispatcherConfig, Mutation, Op, RetryPolicy
from tests.chaos.harness import (
    Harness,
    Pair,
    Proc,
    TriggerSpec,
    expected_pairs,
    record,
    sizes,
    wait_until,
)

pytestmark = pytest.mark.anyio

# A process needs this long beyond its grace period to close its pool and exit.
EXIT_SLACK = 3.0
# How long cancelled executions get to stop before they are abandoned (the CLI's default).
ABANDON_AFTER = DispatcherConfig().abandon_after


@dataclass(frozen=True)
class Size:
    events: int
    concurrency: int
    in_flight: int  # executions running when the signal is sent
    # How long the executions cut off by the signal run: well past the grace period, even
    # counting the time it takes to get `in_flight` of them started.
    long_ms: tuple[int, int]


SHORT = Size(events=200, concurrency=40, in_flight=30, long_ms=(2000, 2500))
LONG = Size(events=3000, concurrency=100, in_flight=80, long_ms=(5000, 5500))


async def _setup(chaos: Harness, n: int, ms: tuple[int, int]) -> tuple[TriggerSpec, set[Pair]]:
    t = await chaos.trigger("slow", "work", retry=RetryPolicy(max_attempts=3), execution_timeout=10)
    mutations = [Mutation("acme", "ns", f"k/{i}", Op.PUT, {"ms": list(ms)}) for i in range(n)]
    await chaos.emit(mutations)
    return t, expected_pairs([t], mutations)


async def _running(chaos: Harness, proc: Proc, n: int) -> None:
    async def enough() -> bool:
        return await chaos.ledger_count("outcome IS NULL AND pid = $1", proc.pid) >= n

    await wait_until(enough, within=30, what=f"{n} executions in flight")


async def _finish(chaos: Harness, expected: set[Pair]) -> None:
    """Drain what is left with a fresh dispatcher, then stop it gracefully."""
    proc = chaos.spawn("chaos-graceful-after", concurrency=100)
    await chaos.wait_drained(within=120, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0


@sizes(SHORT, LONG)
async def test_sigterm_finishes_in_flight_work_and_leaves_nothing_leased(
    chaos: Harness, size: Size
) -> None:
    grace = 10.0
    _, expected = await _setup(chaos, size.events, (100, 400))
    proc = chaos.spawn("chaos-graceful", concurrency=size.concurrency, grace=grace)
    await chaos.wait_ready(proc)
    await _running(chaos, proc, size.in_flight)
    in_flight = await chaos.ledger_count("outcome IS NULL AND pid = $1", proc.pid)
    sent = time.monotonic()
    chaos.signal(proc, signal.SIGTERM)
    code = await chaos.wait_exit(proc, within=grace + EXIT_SLACK)
    exit_seconds = time.monotonic() - sent
    assert code == 0, proc.stderr()[-3000:]
    assert await chaos.outbox_count("lease_token IS NOT NULL") == 0
    # Everything it started, it finished (nothing was cut off within the grace period).
    assert (
        await chaos.ledger_count("outcome IS DISTINCT FROM 'success' AND pid = $1", proc.pid) == 0
    )
    assert proc.events("dispatcher.stopped"), "no dispatcher.stopped log record"

    await _finish(chaos, expected)
    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    record(
        "2-graceful",
        size="long" if size is LONG else "short",
        in_flight_at_signal=in_flight,
        exit_seconds=round(exit_seconds, 2),
        grace_s=grace,
        leased_after_exit=0,
        **report.summary(),
    )


@sizes(SHORT, LONG)
async def test_past_the_grace_period_executions_are_cancelled_and_released(
    chaos: Harness, size: Size
) -> None:
    grace = 1.0
    _, expected = await _setup(chaos, size.in_flight, size.long_ms)
    proc = chaos.spawn("chaos-grace-over", concurrency=size.concurrency, grace=grace)
    await chaos.wait_ready(proc)
    await _running(chaos, proc, size.in_flight)
    sent = time.monotonic()
    chaos.signal(proc, signal.SIGTERM)
    code = await chaos.wait_exit(proc, within=grace + EXIT_SLACK)
    exit_seconds = time.monotonic() - sent
    assert code == 0, proc.stderr()[-3000:]
    assert await chaos.outbox_count("lease_token IS NOT NULL") == 0
    cancelled = await chaos.ledger_count("outcome = 'cancelled' AND pid = $1", proc.pid)
    assert cancelled == size.in_flight

    await _finish(chaos, expected)
    report = await chaos.check(expected)
    # The cancelled executions run again (their leases were given back): those are the
    # only duplicates.
    report.assert_ok(max_duplicates=cancelled)
    record(
        "2-grace-exceeded",
        size="long" if size is LONG else "short",
        cancelled=cancelled,
        exit_seconds=round(exit_seconds, 2),
        grace_s=grace,
        **report.summary(),
    )


@sizes(SHORT, LONG)
async def test_second_signal_aborts_and_still_leaves_nothing_leased(
    chaos: Harness, size: Size
) -> None:
    grace = 30.0
    _, expected = await _setup(chaos, size.in_flight, size.long_ms)
    proc = chaos.spawn("chaos-abort", concurrency=size.concurrency, grace=grace)
    await chaos.wait_ready(proc)
    await _running(chaos, proc, size.in_flight)
    sent = time.monotonic()
    chaos.signal(proc, signal.SIGTERM)

    async def stopping() -> bool:
        return "stopping gracefully" in proc.stderr()

    await wait_until(stopping, within=10, what="the first signal to be handled")
    chaos.signal(proc, signal.SIGTERM)
    code = await chaos.wait_exit(proc, within=EXIT_SLACK)
    exit_seconds = time.monotonic() - sent
    leased = await chaos.outbox_count("lease_token IS NOT NULL AND due_at > clock_timestamp()")
    record(
        "2-abort",
        size="long" if size is LONG else "short",
        exit_code=code,
        exit_seconds=round(exit_seconds, 2),
        leased_after_exit=leased,
    )
    assert leased == 0, f"{leased} rows still leased after the abort"
    await _finish(chaos, expected)
    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=size.in_flight)


@sizes(SHORT, LONG)
async def test_handlers_that_swallow_cancellation_cannot_hold_the_stop(
    chaos: Harness, size: Size
) -> None:
    grace = 1.0
    n = size.in_flight
    t = await chaos.trigger(
        "stubborn", "stubborn", retry=RetryPolicy(max_attempts=3), execution_timeout=10
    )
    # Each runs 6 s whatever it is told: past the grace period and abandon_after together.
    mutations = [Mutation("acme", "ns", f"k/{i}", Op.PUT, {"ms": 6000}) for i in range(n)]
    await chaos.emit(mutations)
    expected = expected_pairs([t], mutations)
    proc = chaos.spawn("chaos-stubborn", concurrency=size.concurrency, grace=grace)
    await chaos.wait_ready(proc)
    await _running(chaos, proc, n)
    sent = time.monotonic()
    chaos.signal(proc, signal.SIGTERM)
    code = await chaos.wait_exit(proc, within=grace + ABANDON_AFTER + EXIT_SLACK)
    exit_seconds = time.monotonic() - sent
    assert code == 0, proc.stderr()[-3000:]
    # Abandoned, not given back: another claim must not run them while they may still run.
    leased = await chaos.outbox_count("lease_token IS NOT NULL AND due_at > clock_timestamp()")
    abandoned = len(proc.events("dispatcher.execution_abandoned"))
    record(
        "2-stubborn",
        size="long" if size is LONG else "short",
        abandoned=abandoned,
        exit_seconds=round(exit_seconds, 2),
        grace_s=grace,
        abandon_after_s=ABANDON_AFTER,
        leased_after_exit=leased,
    )
    assert leased == n
    assert abandoned == n
    # Expire the leases now rather than wait them out; the checker allows exactly these
    # re-runs (of executions whose lease was backdated).
    assert await chaos.backdate_leases() == n
    await _finish(chaos, expected)
    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=n)
