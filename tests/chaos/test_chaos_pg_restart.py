"""Scenario 3 — Postgres restart mid-run, twice (one long outage), under a steady load.

Shows: the dispatcher process stays up; it resumes executing within 5 s of Postgres
accepting connections; zero loss; the outage consumes no attempt (``max_attempts=1``: a
consumed attempt would be a dead letter) and causes no dead letter, also for handlers whose
``ctx.kv`` write it cut (no handler failure, no breaker counting it); a lost connection is
logged once (unavailable, then recovered).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import datetime

import anyio
import pytest

from dispatcher import Mutation, Op, RetryPolicy
from tests.chaos.harness import (
    Harness,
    expected_pairs,
    record,
    sizes,
    wait_until,
)

pytestmark = pytest.mark.anyio

RESUME_WITHIN = 5.0


@dataclass(frozen=True)
class Size:
    events: int
    rate: float
    outages: tuple[float, ...]  # seconds the server stays down, in order


SHORT = Size(events=750, rate=150, outages=(1.0, 2.0))
LONG = Size(events=6000, rate=150, outages=(2.0, 10.0))


@sizes(SHORT, LONG)
async def test_postgres_restart_is_not_a_handler_failure(chaos: Harness, size: Size) -> None:
    if not chaos.can_restart_postgres():
        pytest.skip(
            "needs a Postgres server the tests can stop and start (embedded or testcontainers);"
            f" this run uses {chaos.postgres.source!r} (DISPATCHER_TEST_DSN), which is never"
            " restarted"
        )
    # One attempt only: an outage that consumed an attempt would dead-letter the row. The
    # timeout outlasts the outage, so handlers waiting to write their ledger are not cut.
    t = await chaos.trigger("work", "work", retry=RetryPolicy(max_attempts=1), execution_timeout=30)
    # Each handler writes through ctx.kv, on the dispatcher's own connections.
    mutations = [
        Mutation("acme", "ns", f"k/{i}", Op.PUT, {"ms": [5, 20], "kv": 1})
        for i in range(size.events)
    ]
    expected = expected_pairs([t], mutations)
    proc = chaos.spawn("chaos-pg")
    await chaos.wait_ready(proc)

    resumed: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: chaos.produce(mutations, rate=size.rate))
        for n, outage in enumerate(size.outages, start=1):
            share = n / (len(size.outages) + 1)

            async def progressed(share: float = share) -> bool:
                return await chaos.ledger_count("outcome = 'success'") >= share * size.events

            await wait_until(progressed, within=120, what=f"{share:.0%} of the events")
            async with chaos.postgres_down():
                await anyio.sleep(outage)  # the outage itself: the fault's duration
            up = await chaos.now()
            if not proc.alive():
                tg.cancel_scope.cancel()  # reported below, outside the task group
                break

            async def executing(up: datetime = up) -> datetime | None:
                first: datetime | None = await chaos.fetchval(
                    "SELECT min(started_at) FROM public.chaos_ledger WHERE started_at >= $1", up
                )
                return first

            first = await wait_until(executing, within=30, what="executions to resume")
            assert first is not None
            resumed.append((first - up).total_seconds())
    proc.assert_alive()
    await chaos.wait_drained(within=120, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    assert report.dead_letters == 0
    assert await chaos.ledger_count("attempt <> 1") == 0
    unavailable = proc.events("dispatcher.db_unavailable")
    recovered = proc.events("dispatcher.db_recovered")
    kv_faults = await chaos.ledger_count("note ->> 'error' = 'StoreUnavailable'")
    failed = await chaos.ledger_count("outcome = 'failed'")
    breakers = await chaos.fetchval(
        "SELECT count(*) FROM dispatcher.breakers WHERE opened_count > 0"
    )
    record(
        "3-pg-restart",
        size="long" if size is LONG else "short",
        outages_s=list(size.outages),
        resumed_after_s=[round(r, 2) for r in resumed],
        unavailable_logs=len(unavailable),
        recovered_logs=len(recovered),
        kv_writes_cut=kv_faults,
        handler_failures=failed,
        **report.summary(),
    )
    assert max(resumed) <= RESUME_WITHIN, resumed
    assert failed == 0
    assert breakers == 0
    assert not proc.events("dispatcher.breaker_opened")


async def test_a_lost_connection_is_logged_once(chaos: Harness) -> None:
    """The poller and the settler each keep a connection: losing both is at most one outage,
    logged once, not once per connection."""
    t = await chaos.trigger("work", "work")
    proc = chaos.spawn("chaos-log-once")
    await chaos.wait_ready(proc)
    # Some work first, so that both the poller and the settler hold a connection.
    before = [Mutation("acme", "ns", f"a/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(50)]
    await chaos.emit(before)
    await chaos.wait_drained(within=30, watch=[proc])
    # Idle: the connections are lost between statements (so not the crash in
    # test_chaos_conn_kills.py), then work arrives again.
    assert await chaos.terminate_backends(proc.app) >= 3
    rows = [Mutation("acme", "ns", f"b/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(50)]
    await chaos.emit(rows)
    await chaos.wait_drained(within=30, watch=[proc])
    rows = before + rows
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0
    report = await chaos.check(expected_pairs([t], rows))
    report.assert_ok(max_duplicates=0)
    logged = [
        (r["extra"]["event"], r["extra"].get("error"))
        for r in proc.logs()
        if r["extra"].get("event") in ("dispatcher.db_unavailable", "dispatcher.db_recovered")
    ]
    record("3-outage-logs", logged=[event for event, _ in logged])
    # Connections found closed between statements are replaced without a failed statement,
    # so the loss may log nothing at all; what it must never do is log the one outage once
    # per kept connection.
    events = [event for event, _ in logged]
    assert events in ([], ["dispatcher.db_unavailable", "dispatcher.db_recovered"]), logged
