"""The per-key order checkers of ``test_chaos_ordering.py``, on hand-made ledgers (no
database): each rule fails when it should."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from dispatcher import Mutation, Op
from tests.chaos.test_chaos_ordering import Tx, commit_order_violations, order_violations

T0 = datetime(2026, 12, 1, tzinfo=UTC)
KILLED = 9


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def call(
    i: int,
    seq: int | None,
    start: float,
    end: float | None,
    outcome: str | None = "success",
    *,
    pid: int = 1,
    attempt: int = 1,
) -> dict[str, Any]:
    return {
        "id": i,
        "event_id": uuid.UUID(int=seq or 0),
        "trigger_id": 1,
        "key": "orders/k",
        "seq": seq,
        "started_at": at(start),
        "ended_at": None if end is None else at(end),
        "outcome": outcome,
        "pid": pid,
        "attempt": attempt,
        "lease_expires_at": at(start + 6000),
        "previous_error": None,
    }


def test_retries_in_order_pass() -> None:
    calls = [call(1, 1, 0, 5, "failed"), call(2, 1, 10, 15, attempt=2), call(3, 2, 20, 25)]
    assert order_violations(calls, 1, set()) == ([], 1)


def test_a_version_before_the_previous_one_completed_fails() -> None:
    found, _ = order_violations([call(1, 1, 0, 5, "failed"), call(2, 2, 10, 15)], 1, set())
    assert any("before v1 completed" in f for f in found)
    found, _ = order_violations([call(1, 1, 0, 30), call(2, 2, 10, 35)], 1, set())
    assert any("overlapped" in f for f in found)
    found, _ = order_violations([call(1, 2, 0, 5), call(2, 1, 10, 15)], 1, set())
    assert any("started after v2" in f for f in found)


def test_a_killed_call_holds_its_key_until_its_lease_is_over() -> None:
    killed = call(1, 1, 0, None, None, pid=KILLED)
    after = [killed, call(2, 1, 7000, 7005), call(3, 2, 7010, 7015)]
    assert order_violations(after, 1, {KILLED}) == ([], 1)
    within = [killed, call(2, 1, 100, 105), call(3, 2, 110, 115)]
    assert order_violations(within, 1, {KILLED})[0]
    # Only a killed process leaves a call unfinished.
    assert order_violations(after, 1, set())[0]


def test_a_call_without_a_version_fails() -> None:
    assert order_violations([call(1, None, 0, 5)], 1, set())[0]


def test_versions_against_commit_order_fail() -> None:
    a, b = (Mutation("acme", "orders", "orders/k", Op.PUT, {}) for _ in range(2))
    txs = [Tx(0, (a,), at(0), at(10)), Tx(1, (b,), at(20), at(30))]
    assert commit_order_violations(txs, {a.event_id: 1, b.event_id: 2}) == ([], 1)
    assert commit_order_violations(txs, {a.event_id: 2, b.event_id: 1})[0]
    # Overlapping transactions: either order is a commit order.
    overlapping = [Tx(0, (a,), at(0), at(30)), Tx(1, (b,), at(10), at(40))]
    assert commit_order_violations(overlapping, {a.event_id: 2, b.event_id: 1}) == ([], 0)
    # In one transaction, the list order.
    one = [Tx(0, (a, b), at(0), at(10))]
    assert commit_order_violations(one, {a.event_id: 2, b.event_id: 1})[0]
