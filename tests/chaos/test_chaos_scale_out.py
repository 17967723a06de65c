"""Scenario 5 — scale-out: 2 and 4 dispatcher processes draining one outbox.

Shows: zero double execution (no pair runs twice, no two claims of one row overlap); roughly
fair shares between the processes; no deadlock; every claim returned at most the batch size
(the ledger groups executions by the lease token of the claim that returned them).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from dispatcher import Mutation, Op, RetryPolicy
from tests.chaos.harness import Harness, expected_pairs, record

pytestmark = pytest.mark.anyio

BATCH = 50


@dataclass(frozen=True)
class Size:
    rows: int
    processes: int


def _sizes() -> pytest.MarkDecorator:
    long = [pytest.mark.chaos, pytest.mark.timeout(3600)]
    return pytest.mark.parametrize(
        "size",
        [
            pytest.param(Size(1000, 2), id="short-2"),
            pytest.param(Size(1000, 4), id="short-4"),
            pytest.param(Size(20_000, 2), id="long-2", marks=long),
            pytest.param(Size(20_000, 4), id="long-4", marks=long),
        ],
    )


@_sizes()
async def test_processes_share_the_outbox_without_double_execution(
    chaos: Harness, size: Size
) -> None:
    t = await chaos.trigger("work", "work", retry=RetryPolicy(max_attempts=3))
    mutations = [
        Mutation("acme", "ns", f"k/{i}", Op.PUT, {"ms": [1, 10]}) for i in range(size.rows)
    ]
    expected = expected_pairs([t], mutations)
    deadlocks_before = await chaos.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    procs = [chaos.spawn(f"chaos-scale-{n}", batch_size=BATCH) for n in range(size.processes)]
    for proc in procs:
        await chaos.wait_ready(proc)
    begin = time.monotonic()
    await chaos.emit(mutations, batch=1000)
    await chaos.wait_drained(within=600, watch=procs)
    seconds = time.monotonic() - begin
    for proc in procs:
        chaos.signal(proc, signal.SIGTERM)
    for proc in procs:
        assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    ledger = await chaos.ledger()
    shares = Counter(e["pid"] for e in ledger)
    per_claim = Counter(e["lease_token"] for e in ledger)
    deadlocks = (
        await chaos.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        - deadlocks_before
    )
    fair = len(ledger) / size.processes
    record(
        f"5-scale-out-{size.processes}",
        size="long" if size.rows > 1000 else "short",
        rows=size.rows,
        processes=size.processes,
        shares=sorted(shares.values()),
        largest_claim=max(per_claim.values()),
        batch_size=BATCH,
        deadlocks=deadlocks,
        rows_per_s=round(size.rows / seconds, 1),
        **report.summary(),
    )
    assert set(shares) == {p.pid for p in procs}
    assert min(shares.values()) >= 0.5 * fair, shares
    assert max(per_claim.values()) <= BATCH
    assert deadlocks == 0
    assert not any("deadlock" in p.stderr() for p in procs)
