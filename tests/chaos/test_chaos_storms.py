"""Scenario 8 — loops and storms.

Self-loops, mutual A→B→A recursion and binary fan-out stop at the depth limit; fan-out
recursion that stays under the depth limit is stopped by the per-root execution budget; a
mutation matching more triggers than the fan-out cap is rejected inside the caller's
transaction; a storm of always-failing rows retries spread out by jitter while healthy
traffic keeps flowing; circuit breakers open for failing targets, not for healthy ones with
a few transient errors.
"""

from __future__ import annotations

import signal
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import anyio
import asyncpg
import pytest

from dispatcher import KvStore, LimitExceeded, Mutation, Op, RetryPolicy
from dispatcher.emit import emit
from tests.chaos.harness import Harness, expected_pairs, record, sizes, wait_until

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Depth:
    limit: int
    seeds: int  # independent roots of each kind


@sizes(Depth(limit=4, seeds=1), Depth(limit=8, seeds=10))
async def test_loops_and_fan_out_stop_at_the_depth_limit(chaos: Harness, size: Depth) -> None:
    d = size.limit
    loop = await chaos.trigger("loop", "loop", namespace="loop")
    ping = await chaos.trigger("ping", "ping", namespace="ping")
    pong = await chaos.trigger("pong", "pong", namespace="pong")
    fan = await chaos.trigger("fan", "fanout", namespace="fan")
    proc = chaos.spawn("chaos-depth", max_depth=d)
    await chaos.wait_ready(proc)
    seeds = [
        Mutation("acme", ns, f"{ns}/{i}/", Op.PUT, {})
        for ns in ("loop", "ping", "fan")
        for i in range(size.seeds)
    ]
    await chaos.emit(seeds)
    await chaos.wait_drained(within=300, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected_pairs([loop, ping, pong, fan], seeds), max_depth=d)
    report.assert_ok(max_duplicates=0)
    runs = Counter(e["trigger_name"] for e in await chaos.ledger())
    depths = Counter(e["depth"] for e in await chaos.ledger() if e["trigger_name"] == "fan")
    skipped = sum(1 for _ in proc.events("dispatcher.depth_exceeded"))
    # A chain runs at depths 0..d; binary fan-out doubles at each depth.
    assert runs["loop"] == size.seeds * (d + 1)
    assert runs["ping"] + runs["pong"] == size.seeds * (d + 1)
    assert runs["fan"] == size.seeds * (2 ** (d + 1) - 1)
    assert depths == {k: size.seeds * 2**k for k in range(d + 1)}
    assert report.dead_letters == 0
    record(
        "8-depth",
        size="long" if size.seeds > 1 else "short",
        depth_limit=d,
        executions=dict(runs),
        depth_exceeded_logs=skipped,
    )


@dataclass(frozen=True)
class Budget:
    budget: int
    roots: int


@sizes(Budget(budget=50, roots=2), Budget(budget=500, roots=10))
async def test_fan_out_under_the_depth_limit_is_stopped_by_the_root_budget(
    chaos: Harness, size: Budget
) -> None:
    fan = await chaos.trigger("fan", "fanout", namespace="fan")
    # Depth alone would allow 2**21 - 1 executions per root.
    proc = chaos.spawn("chaos-budget", max_depth=20, max_executions_per_root=size.budget)
    await chaos.wait_ready(proc)
    roots = [Mutation("acme", "fan", f"r{i}/", Op.PUT, {}) for i in range(size.roots)]
    await chaos.emit(roots)
    await chaos.wait_drained(within=300, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected_pairs([fan], roots), max_depth=20)
    report.assert_ok(max_duplicates=0)
    per_root = Counter(str(e["key"]).split("/")[0] for e in await chaos.ledger())
    exceeded = proc.events("dispatcher.budget_exceeded")
    record(
        "8-root-budget",
        size="long" if size.roots > 2 else "short",
        budget=size.budget,
        executions_per_root=sorted(per_root.values()),
        budget_exceeded_logs=len(exceeded),
    )
    # The root's own row plus at most `budget` rows its tree enqueued.
    assert set(per_root) == {f"r{i}" for i in range(size.roots)}
    assert all(size.budget // 2 <= n <= size.budget + 1 for n in per_root.values()), per_root
    assert exceeded


async def test_a_mutation_over_the_fan_out_cap_is_rejected_in_the_callers_transaction(
    chaos: Harness, conn: asyncpg.Connection
) -> None:
    for i in range(101):  # the default cap is 100
        await chaos.trigger(f"t{i}", "work", namespace="wide", conn=conn)
    await conn.execute("CREATE TABLE app_data (n int)")

    async def write_then_emit() -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO app_data VALUES (1)")
            await emit(conn, Mutation("acme", "wide", "k/1", Op.PUT, {}))

    async def kv_put() -> None:
        async with conn.transaction():
            await KvStore().put(conn, "acme", "wide", "k/2", {"v": 1})

    with pytest.raises(LimitExceeded, match="max_fanout") as raised:
        await write_then_emit()
    assert "101" in str(raised.value)
    with pytest.raises(LimitExceeded):
        await kv_put()
    assert await conn.fetchval("SELECT count(*) FROM app_data") == 0
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    assert await KvStore().get(conn, "acme", "wide", "k/2") is None


@dataclass(frozen=True)
class Storm:
    failing: int
    base: float  # the retry policy's base delay
    healthy_rate: float  # healthy mutations per second while the storm lasts
    seconds: float  # how long the healthy producer runs in each phase


SHORT_STORM = Storm(failing=500, base=1.5, healthy_rate=100, seconds=2.5)
LONG_STORM = Storm(failing=5000, base=10.0, healthy_rate=100, seconds=20)


def _per_second_peak(times: list[datetime]) -> int:
    start = min(times)
    return max(Counter(int((t - start).total_seconds()) for t in times).values())


@sizes(SHORT_STORM, LONG_STORM)
async def test_a_retry_storm_is_spread_by_jitter(chaos: Harness, size: Storm) -> None:
    """Rows that failed together do not come back together: each retry waits
    base * (1 ± jitter), so the retries arrive spread out instead of as a second wave as
    sharp as the first. (Breakers off, so that every row retries.)"""
    jitter = 0.5
    failing = await chaos.trigger(
        "failing",
        "work",
        namespace="storm",
        retry=RetryPolicy(
            base_delay=size.base, max_delay=10 * size.base, jitter=jitter, max_attempts=2
        ),
    )
    proc = chaos.spawn("chaos-jitter", breaker_threshold=0)
    await chaos.wait_ready(proc)
    storm = [
        Mutation("acme", "storm", f"s/{i}", Op.PUT, {"always_fail": True})
        for i in range(size.failing)
    ]
    await chaos.emit(storm, batch=1000)
    await chaos.wait_drained(within=600, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected_pairs([failing], storm))
    report.assert_ok(max_duplicates=0)
    assert report.dead_letters == size.failing
    runs = await chaos.fetch(
        """SELECT b.started_at AS retried, a.started_at AS first,
               extract(epoch FROM b.started_at - a.ended_at) AS gap
           FROM public.chaos_ledger a JOIN public.chaos_ledger b
             ON a.event_id = b.event_id AND a.trigger_id = b.trigger_id
                AND a.attempt = 1 AND b.attempt = 2"""
    )
    gaps = [float(r["gap"]) for r in runs]
    spread = statistics.pstdev(gaps) / statistics.mean(gaps)
    first_peak = _per_second_peak([r["first"] for r in runs])
    retry_peak = _per_second_peak([r["retried"] for r in runs])
    record(
        "8-jitter",
        size="long" if size is LONG_STORM else "short",
        failing_rows=size.failing,
        base_delay_s=size.base,
        jitter=jitter,
        retry_gap_s=[round(min(gaps), 2), round(statistics.median(gaps), 2), round(max(gaps), 2)],
        retry_gap_cv=round(spread, 3),
        first_attempts_peak_per_s=first_peak,
        retries_peak_per_s=retry_peak,
    )
    assert len(gaps) == size.failing
    # No retry before its earliest allowed time; the spread is the jitter's (uniform ±50%
    # has a coefficient of variation of 0.29; no jitter would leave only claim latency).
    assert min(gaps) >= size.base * (1 - jitter) - 0.05, min(gaps)
    assert spread >= 0.2, spread
    # The retries' busiest second is well below the first attempts' busiest second.
    assert retry_peak <= 0.7 * first_peak, (first_peak, retry_peak)


@sizes(SHORT_STORM, LONG_STORM)
async def test_healthy_traffic_keeps_flowing_through_a_retry_storm(
    chaos: Harness, size: Storm
) -> None:
    """A storm of always-failing rows next to a steady healthy load, with the default
    configuration: the failing trigger's breaker holds the storm, the healthy trigger keeps
    its throughput."""
    failing = await chaos.trigger(
        "failing",
        "work",
        namespace="storm",
        retry=RetryPolicy(base_delay=1.0, max_delay=10, jitter=0.5, max_attempts=3),
    )
    healthy = await chaos.trigger("healthy", "work", namespace="orders")
    proc = chaos.spawn("chaos-storm")  # default breakers
    await chaos.wait_ready(proc)
    n = int(size.healthy_rate * size.seconds)
    sent: list[Mutation] = []

    async def phase(tag: str, storm: list[Mutation]) -> float:
        """Healthy completions per second while the producer runs (plus one second)."""
        rows = [Mutation("acme", "orders", f"{tag}/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(n)]
        sent.extend(rows)
        begin = await chaos.now()
        async with anyio.create_task_group() as tg:
            if storm:
                tg.start_soon(chaos.emit, storm)
            await chaos.produce(rows, rate=size.healthy_rate)
        await anyio.sleep(1.0)  # the measurement window's tail, not a wait for a condition
        done = await chaos.ledger_count(
            "key LIKE $1 || '/%' AND outcome = 'success' AND ended_at >= $2", tag, begin
        )
        return done / (await chaos.now() - begin).total_seconds()

    baseline = await phase("baseline", [])
    storm = [
        Mutation("acme", "storm", f"s/{i}", Op.PUT, {"always_fail": True})
        for i in range(size.failing)
    ]
    during = await phase("during", storm)
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    held = await chaos.outbox_count("trigger_id = $1", failing.id)
    failed_runs = await chaos.ledger_count("trigger_id = $1", failing.id)
    breaker = await chaos.fetch("SELECT state, opened_count FROM dispatcher.breakers")
    kept = during / baseline
    record(
        "8-storm",
        size="long" if size is LONG_STORM else "short",
        failing_rows=size.failing,
        failing_executions=failed_runs,
        held_by_breaker=held,
        healthy_rate_baseline=round(baseline, 1),
        healthy_rate_during_storm=round(during, 1),
        throughput_kept=round(kept, 3),
    )
    # Nothing of the storm is lost: held in the outbox or dead-lettered. An operator would
    # now fix the target or discard the rows; the test discards them.
    dead = await chaos.fetchval(
        "SELECT count(*) FROM dispatcher.dead_letters WHERE trigger_id = $1", failing.id
    )
    assert held + dead == size.failing
    assert [r["state"] for r in breaker] == ["open"]
    await chaos.fetch("DELETE FROM dispatcher.outbox WHERE trigger_id = $1", failing.id)
    report = await chaos.check(expected_pairs([healthy], sent))
    report.assert_ok(max_duplicates=0)
    assert kept >= 0.9, (baseline, during)


async def test_transient_failures_under_load_do_not_open_a_healthy_triggers_breaker(
    chaos: Harness,
) -> None:
    """Breakers count consecutive failures: 2% transient errors spread through settlement
    batches of ~100 rows must not add up to "three in a row"."""
    t = await chaos.trigger(
        "mostly-fine",
        "work",
        retry=RetryPolicy(base_delay=0.1, max_delay=0.2, max_attempts=5),
    )
    proc = chaos.spawn("chaos-breaker-load")  # default breakers: threshold 3, cool-down 60 s
    await chaos.wait_ready(proc)
    rows = [
        Mutation("acme", "ns", f"k/{i}", Op.PUT, {"ms": [1, 5], "fail_rate": 0.02})
        for i in range(2000)
    ]
    await chaos.emit(rows, batch=1000)

    async def opened_breakers() -> int:
        n: int = await chaos.fetchval(
            "SELECT coalesce(sum(opened_count), 0) FROM dispatcher.breakers"
        )
        return n

    async def drained_or_opened() -> bool:
        proc.assert_alive()
        return await opened_breakers() > 0 or await chaos.outbox_count() == 0

    await wait_until(drained_or_opened, within=60, what="the rows to drain", interval=0.1)
    opened = await opened_breakers()
    failed = await chaos.ledger_count("outcome = 'failed'")
    record("8-breaker-transient", rows=len(rows), failures=failed, breaker_opened=opened)
    assert opened == 0
    report = await chaos.check(expected_pairs([t], rows))
    report.assert_ok(max_duplicates=0)


async def test_a_breaker_closed_by_a_success_releases_the_rows_it_held(chaos: Harness) -> None:
    """An opening breaker moves the trigger's waiting rows to its reopen time; a success
    that closes it must bring them back, not leave them waiting out the cool-down."""
    t = await chaos.trigger("target", "work", retry=RetryPolicy(max_attempts=1))
    proc = chaos.spawn("chaos-breaker-held", concurrency=2)
    await chaos.wait_ready(proc)
    slow = Mutation("acme", "ns", "slow", Op.PUT, {"ms": [1500, 1500]})
    waiting = [Mutation("acme", "ns", f"wait/{i}", Op.PUT, {"ms": [100, 100]}) for i in range(20)]
    await chaos.emit([slow])

    async def slow_running() -> bool:
        return (
            await chaos.fetchval(
                "SELECT count(*) FROM dispatcher.outbox WHERE lease_token IS NOT NULL"
            )
            == 1
        )

    await wait_until(slow_running, within=10, what="the slow row to be claimed")
    # Meanwhile another process's failures open the breaker (this process, which sees only
    # the slow row, stays willing): as SettleSql.breaker_failures and hold_behind_breaker
    # leave it, open, with the rows that arrive moved to its reopen time.
    await chaos.fetch(
        """INSERT INTO dispatcher.breakers AS b (trigger_id, state, failures, open_until,
               opened_at, opened_count)
           VALUES ($1, 'open', 0, clock_timestamp() + interval '60 seconds', now(), 1)
           ON CONFLICT (trigger_id) DO UPDATE SET state = 'open', failures = 0,
               open_until = excluded.open_until, opened_at = now(), opened_count = 1
           RETURNING b.trigger_id""",
        t.id,
    )
    await chaos.emit(waiting)
    moved = await chaos.fetch(
        """UPDATE dispatcher.outbox o SET due_at = b.open_until FROM dispatcher.breakers b
           WHERE b.trigger_id = o.trigger_id AND o.lease_token IS NULL RETURNING o.id"""
    )
    assert len(moved) == 20

    async def slow_done() -> bool:
        return await chaos.ledger_count("key = 'slow' AND outcome = 'success'") == 1

    await wait_until(slow_done, within=30, what="the slow row to succeed")

    async def slow_settled() -> bool:
        # The handler's ledger entry is written before its success is settled (and the
        # breaker closed) in a batch of its own: wait for the row to leave the outbox.
        return await chaos.outbox_count("payload ->> 'key' = 'slow'") == 0

    await wait_until(slow_settled, within=10, what="the slow row's success to be settled")
    state = await chaos.fetch("SELECT state, opened_count FROM dispatcher.breakers")
    assert [(r["state"], r["opened_count"]) for r in state] == [("closed", 1)]

    async def released() -> bool:
        return await chaos.ledger_count("key LIKE 'wait/%' AND outcome = 'success'") == 20

    await wait_until(released, within=5, what="the held rows to run once the breaker closed")
    report = await chaos.check(expected_pairs([t], [slow, *waiting]))
    report.assert_ok(max_duplicates=0)
