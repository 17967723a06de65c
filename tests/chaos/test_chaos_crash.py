"""Scenario 1 — crash mid-run: SIGKILL the dispatcher at random moments under a steady load
with transient and permanent failures, restart it each time.

Shows: zero loss; each always-failing row ends as exactly one dead letter; duplicates per
kill at most the rows leased at the kill; orphaned rows re-run within lease + poll + 1 s of
the restart; sync (reply-to) rows and dead-letter-handler rows run at most once.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from datetime import datetime

import anyio
import asyncpg
import pytest

from dispatcher import Mutation, Op, RetryPolicy
from tests.chaos.harness import (
    LEASE_MARGIN,
    Harness,
    Kill,
    Proc,
    expected_pairs,
    record,
    sizes,
    wait_until,
)

pytestmark = pytest.mark.anyio

POLL = 0.1


@dataclass(frozen=True)
class Size:
    events: int
    always_failing: int
    kills: int
    rate: float  # events per second from the producer
    ms: tuple[int, int]
    timeout: float  # each trigger's execution timeout: the lease is timeout + LEASE_MARGIN


SHORT = Size(events=450, always_failing=3, kills=1, rate=150, ms=(1, 5), timeout=1.0)
LONG = Size(events=10_000, always_failing=10, kills=3, rate=150, ms=(5, 50), timeout=2.0)


@sizes(SHORT, LONG)
async def test_sigkill_mid_run_loses_nothing(chaos: Harness, size: Size) -> None:
    rng = random.Random(20261201)
    policy = RetryPolicy(base_delay=0.2, max_delay=1.0, jitter=0.2, max_attempts=4)
    triggers = [
        await chaos.trigger(
            f"t{i}", "work", namespace="orders", retry=policy, execution_timeout=size.timeout
        )
        for i in range(3)
    ]
    await chaos.trigger("on-dead", "dlh", namespace="orders", is_dead_letter_handler=True)
    sync = await chaos.trigger("sync", "work", namespace="sync", execution_timeout=size.timeout)
    mutations = [
        Mutation(
            "acme",
            "orders",
            f"orders/{i}",
            Op.PUT,
            {"ms": list(size.ms), "fail_rate": 0.02, "always_fail": i < size.always_failing},
        )
        for i in range(size.events)
    ]
    rng.shuffle(mutations)
    expected = expected_pairs(triggers, mutations)
    always_failing = {
        (m.event_id, t.id)
        for m in mutations
        if isinstance(m.value, dict) and m.value["always_fail"]
        for t in triggers
    }

    begin = await chaos.now()
    # Breakers off: always-failing rows share triggers with healthy ones on purpose here;
    # this scenario measures crash recovery, not flow control (see test_chaos_storms.py).
    proc = chaos.spawn("chaos-crash-0", poll=POLL, breaker_threshold=0)
    await chaos.wait_ready(proc)
    invoker = chaos.spawn_invoker(sync.id, "chaos-crash-inv")
    await chaos.wait_ready(invoker)

    kills: list[tuple[Kill, datetime]] = []
    # Kill points: a random moment inside each of `kills` equal slices of the first 75% of
    # the run (counted in successes), so that every kill lands while work is in flight.
    thresholds = [
        int(len(expected) * (0.1 + 0.65 * (k + rng.uniform(0.2, 0.8)) / size.kills))
        for k in range(size.kills)
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: chaos.produce(mutations, rate=size.rate, batch=10))
        for n, threshold in enumerate(thresholds, start=1):

            async def reached(threshold: int = threshold) -> bool:
                # Past the threshold, and at a moment when rows are leased: the kill must
                # orphan work, not land in a gap between the producer's batches.
                return await chaos.ledger_count(
                    "outcome = 'success'"
                ) >= threshold and await chaos.outbox_count(
                    "lease_token IS NOT NULL AND due_at > clock_timestamp()"
                ) >= min(5, size.events // 100)

            await wait_until(reached, within=300, what=f"{threshold} successes")
            # The invoker dies with the first kill: its sync rows are orphaned too.
            kill = await chaos.sigkill(proc, *([invoker] if invoker.alive() else []))
            restarted = await chaos.now()
            proc = chaos.spawn(f"chaos-crash-{n}", poll=POLL, breaker_threshold=0)
            kills.append((kill, restarted))
            await chaos.wait_ready(proc)
            # Let this kill's orphans come back before the next kill, so each is measured.
            ids = [r["id"] for r in kill.leased]

            async def recovered(ids: list[int] = ids) -> bool:
                return await chaos.outbox_count("id = ANY ($1)", ids) == 0

            async def stuck(ids: list[int] = ids, proc: Proc = proc) -> object:
                rows = await chaos.fetch(
                    "SELECT *, clock_timestamp() AS now FROM dispatcher.outbox WHERE id = ANY ($1)",
                    ids,
                )
                return [dict(r) for r in rows] + [proc.stderr()[-2000:]]

            await wait_until(
                recovered,
                within=size.timeout + LEASE_MARGIN + 30,
                what="orphans to re-run",
                explain=stuck,
            )
    await chaos.wait_drained(within=300, watch=[proc])
    end = await chaos.now()
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=None)

    dead = await chaos.fetch("SELECT * FROM dispatcher.dead_letters")
    dead_pairs = [(d["event_id"], d["trigger_id"]) for d in dead]
    assert sorted(p for p in dead_pairs if p in always_failing) == sorted(always_failing)
    assert all(d["resolution"] in ("handled", "handler_failed") for d in dead)
    assert {d["reason"] for d in dead} <= {"handler_error", "lease_expired"}

    # Duplicates per kill never exceed the rows that were leased when it happened.
    lease = size.timeout + LEASE_MARGIN
    per_kill = []
    for kill, restarted in kills:
        assert kill.count > 0, "a kill landed when nothing was in flight"
        dups = sum(report.duplicates_by_pid[p] for p in kill.pids)
        leased_tokens = {r["lease_token"] for r in kill.leased}
        unexplained = [
            _describe(prev, e)
            for prev, e in report.reruns
            if prev["pid"] in kill.pids and prev["lease_token"] not in leased_tokens
        ]
        assert dups <= kill.count, (kill.pids, dups, kill.count, unexplained[:10])
        rerun = await _rerun_times(chaos, kill)
        recovery = max(((t - restarted).total_seconds() for t in rerun.values()), default=0.0)
        late = max(
            (
                (rerun[r["id"]] - max(restarted, r["lease_expires_at"])).total_seconds()
                for r in kill.leased
            ),
            default=0.0,
        )
        assert recovery <= lease + POLL + 1, (recovery, lease)
        assert late <= POLL + 1, late
        per_kill.append(
            {
                "leased": kill.count,
                "duplicates": dups,
                "recovery_s": round(recovery, 2),
                "after_lease_expiry_s": round(late, 2),
            }
        )
    abandoned = await chaos.fetchval("SELECT count(*) FROM dispatcher.abandoned_executions")
    seconds = (end - begin).total_seconds()
    record(
        "1-crash",
        size="long" if size is LONG else "short",
        events=size.events,
        pairs=len(expected),
        kills=per_kill,
        lease_s=lease,
        abandoned_sync_rows=abandoned,
        throughput_per_s=round(report.executions / seconds, 1),
        **report.summary(),
    )


def _describe(prev: asyncpg.Record, e: asyncpg.Record) -> str:
    return (
        f"{prev['key']} t{prev['trigger_id']}: attempt {prev['attempt']} {prev['outcome']} "
        f"{prev['started_at']:%H:%M:%S.%f}..{prev['ended_at']} lease {prev['lease_token']} "
        f"-> attempt {e['attempt']} pid {e['pid']} at {e['started_at']:%H:%M:%S.%f} "
        f"after {e['previous_error']}"
    )


async def _rerun_times(chaos: Harness, kill: Kill) -> dict[int, datetime]:
    """When each row orphaned by ``kill`` was next acted on: re-executed, dead-lettered
    (budget used up by orphans), answered as abandoned (sync) or resolved (handler rows)."""
    out: dict[int, datetime] = {}
    for r in kill.leased:
        t = await chaos.fetchval(
            """SELECT min(t) FROM (
                 SELECT min(started_at) AS t FROM public.chaos_ledger
                   WHERE event_id = $1 AND trigger_id = $2 AND started_at > $3
                 UNION ALL SELECT min(dead_lettered_at) FROM dispatcher.dead_letters
                   WHERE event_id = $1 AND trigger_id = $2 AND dead_lettered_at > $3
                 UNION ALL SELECT min(created_at) FROM dispatcher.abandoned_executions
                   WHERE event_id = $1 AND trigger_id = $2 AND created_at > $3
                 UNION ALL SELECT min(resolved_at) FROM dispatcher.dead_letters
                   WHERE id = $4 AND resolved_at > $3) AS x""",
            r["event_id"],
            r["trigger_id"],
            kill.at,
            r["dead_letter_id"],
        )
        assert t is not None, f"orphaned row {dict(r)} was never acted on again"
        out[r["id"]] = t
    return out
