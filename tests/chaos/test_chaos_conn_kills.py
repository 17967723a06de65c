"""Scenario 4 — connection kills and lost leases.

``pg_terminate_backend`` on every connection of the dispatcher (pool and listener, found by
``application_name``) every few seconds under load, one of them while a statement of the
dispatcher is in progress; and leases backdated under slow executions.

Shows: the process survives; zero loss; every duplicate is explained by a lease that was
backdated or had expired; the completions of claims whose leases were taken over are fenced
(dropped and counted as stale), never applied over the new claim. Handlers write through
``ctx.kv`` (the dispatcher's own connections): a kill under such a write is the database's
fault, never the handler's: it uses no attempt, makes no dead letter, opens no breaker.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Size:
    events: int
    rate: float
    every: float  # seconds between kills
    slow: int  # slow rows whose leases are backdated mid-execution


SHORT = Size(events=450, rate=150, every=0.25, slow=10)
LONG = Size(events=6000, rate=150, every=2.0, slow=50)


@sizes(SHORT, LONG)
async def test_late_completions_of_lost_leases_are_fenced(chaos: Harness, size: Size) -> None:
    """Leases backdated while the handlers run: the dispatcher claims the rows again and
    the first runs finish on a lost lease. Half of them fail: a stale failure applied over
    the new claim would use up an attempt (the next run would be attempt 3, not 2)."""
    slow = await chaos.trigger(
        "slow",
        "work",
        namespace="slow",
        retry=RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=5),
        execution_timeout=10,
    )
    mutations = [
        Mutation("acme", "slow", f"s/{i}", Op.PUT, {"ms": [800, 1000], "fail_first": i % 2})
        for i in range(size.slow)
    ]
    expected = expected_pairs([slow], mutations)
    # Breakers off: the deliberate failures below would otherwise open one.
    proc = chaos.spawn("chaos-fence", breaker_threshold=0)
    await chaos.wait_ready(proc)
    await chaos.emit(mutations)

    async def running() -> bool:
        return await chaos.ledger_count("outcome IS NULL") >= size.slow

    await wait_until(running, within=30, what="the slow rows to run")
    backdated = await chaos.backdate_leases()
    await chaos.wait_drained(within=60, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=backdated)
    stale = sum(int(r["extra"].get("count", 0)) for r in proc.events("dispatcher.stale"))
    top = await chaos.fetchval("SELECT max(attempt) FROM public.chaos_ledger")
    record(
        "4-fenced",
        size="long" if size is LONG else "short",
        backdated_leases=backdated,
        stale_results_fenced=stale,
        **report.summary(),
    )
    assert backdated == size.slow
    assert stale == backdated
    assert report.duplicates == backdated
    # fail_first=1 rows: attempt 1 (lost lease, failed), attempt 1 again (failed, counted),
    # attempt 2 (succeeds). Nothing the stale runs returned was applied.
    assert top == 2
    assert report.dead_letters == 0


@sizes(SHORT, LONG)
async def test_connection_kills_lose_nothing(chaos: Harness, size: Size) -> None:
    """The first kill is forced into the middle of a settlement transaction, behind a proxy
    that passes the connection's end on after the server's error: the case in which asyncpg
    raises InternalClientError on the next statement (it once ended the process)."""
    work = await chaos.trigger(
        "work",
        "work",
        namespace="orders",
        retry=RetryPolicy(base_delay=0.1, max_delay=0.5, max_attempts=5),
        # The KV writes queue for the pool's few connections while the kills keep replacing
        # them (0.6 s at the median, 1.6 s at worst, at ten kill rounds a second): a time
        # limit reached there would be a timeout, which is not what this scenario is about.
        execution_timeout=10,
    )
    # A third of the load first, then the rest with two KV writes each, through the pool
    # whose connections the kills end. Not before the first kill: KV writes block on the
    # outbox lock it is landed under (an emit inserts into the outbox) and would take every
    # connection of the pool, leaving none for the settlement that the lock waits for.
    mutations = [
        Mutation(
            "acme",
            "orders",
            f"o/{i}",
            Op.PUT,
            {"ms": [5, 20]} if i < size.events // 3 else {"ms": [5, 20], "kv": 2},
        )
        for i in range(size.events)
    ]
    first, rest = mutations[: size.events // 3], mutations[size.events // 3 :]
    slow = [Mutation("acme", "orders", f"slow/{i}", Op.PUT, {"ms": [300, 400]}) for i in range(5)]
    expected = expected_pairs([work], [*mutations, *slow])
    kills = 0
    terminated = 0
    # The dispatcher connects through a proxy that passes on the end of a terminated
    # connection a little after the server's error message, as a network may.
    proc = chaos.spawn("chaos-kills", dsn=await chaos.slow_close_proxy())
    await chaos.wait_ready(proc)
    async with anyio.create_task_group() as tg:
        done = anyio.Event()
        first_kill = anyio.Event()

        async def producer() -> None:
            await chaos.produce(first, rate=size.rate)
            await first_kill.wait()
            await chaos.produce(rest, rate=size.rate)
            done.set()

        tg.start_soon(producer)
        # The first kill lands in the middle of a settlement transaction (of these slower
        # rows, finishing while the outbox is locked), the others wherever they fall.
        await chaos.emit(slow)

        async def slow_running() -> bool:
            return await chaos.ledger_count("key LIKE 'slow/%' AND outcome IS NULL") > 0

        await wait_until(slow_running, within=30, what="the slow rows to run")
        async with chaos.mid_settlement(proc.app):
            terminated += await chaos.terminate_backends(proc.app)
        kills += 1
        first_kill.set()

        async def all_started() -> bool:
            n: int = await chaos.fetchval(
                "SELECT count(DISTINCT key) FROM public.chaos_ledger WHERE key LIKE 'o/%'"
            )
            return n == len(mutations)

        # Kills until every row has started at least once, not only until the last is
        # emitted: rows a killed dispatcher had not got to would otherwise run, with their
        # KV writes, after the faults.
        while proc.alive() and not (done.is_set() and await all_started()):
            with anyio.move_on_after(size.every):
                await anyio.sleep_forever()  # the kill interval: the fault's rhythm
            terminated += await chaos.terminate_backends(proc.app)
            kills += 1
        tg.cancel_scope.cancel()
    proc.assert_alive()
    await chaos.wait_drained(within=120, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=None)
    stale = sum(int(r["extra"].get("count", 0)) for r in proc.events("dispatcher.stale"))
    kv_faults = await chaos.ledger_count("note ->> 'error' = 'StoreUnavailable'")
    failed = await chaos.ledger_count("outcome = 'failed'")
    breakers = await chaos.fetchval(
        "SELECT count(*) FROM dispatcher.breakers WHERE opened_count > 0"
    )
    opened = len(proc.events("dispatcher.breaker_opened"))
    record(
        "4-conn-kills",
        size="long" if size is LONG else "short",
        kill_rounds=kills,
        backends_terminated=terminated,
        stale_results_fenced=stale,
        kv_writes_cut=kv_faults,
        handler_failures=failed,
        breakers_opened=opened,
        **report.summary(),
    )
    assert report.dead_letters == 0
    # Every kill under a handler's KV write was charged to the database: rescheduled without
    # an attempt, never a handler failure, never counted by a breaker.
    assert failed == 0
    assert (breakers, opened) == (0, 0)
