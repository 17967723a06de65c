"""Property: whatever enters the outbox, the loop goes on and every row ends accounted for.

Hypothesis draws values (hostile ones included: NUL, lone surrogates, NaN, huge integers,
nesting up to past what the decoder follows), retry policies (delays no timestamp can hold,
NaN, zero), handler behaviours per attempt (success with unserialisable results, errors
with hostile messages, permanent failures, rate limits with absurd retry-afters, KV writes
of bad values) and rows corrupted by another client, then runs them through emit, claim,
route and settle on real Postgres. After the dispatcher is idle and stopped, each row that
was enqueued is settled (completed or dead-lettered) or pending (scheduled, not leased),
and run_until_idle itself never raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    DispatcherError,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    PermanentError,
    RateLimited,
    RetryPolicy,
    TriggerRegistry,
    emit,
)

pytestmark = pytest.mark.anyio

WEIRD_FLOATS = st.sampled_from([0.0, 1e-9, 0.01, 1e13, 1e300, math.inf, -1.0, math.nan])
TEXT = st.text(alphabet=st.characters(codec=None), max_size=30) | st.sampled_from(
    ["\x00", "\ud800", "x" * 10_000, "password=hunter2"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**70, -(2**80)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=15,
)


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"n": value}
    return value


POLICIES = st.builds(
    dict,
    kind=st.sampled_from(["exponential", "linear", "constant", "bogus"]),
    base_delay=WEIRD_FLOATS,
    max_delay=WEIRD_FLOATS,
    factor=st.sampled_from([1.0, 2.0, 1e300, math.nan]),
    jitter=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    max_attempts=st.integers(0, 3),
)
BEHAVIOURS = st.sampled_from(["ok", "weird_result", "error", "permanent", "rate", "kv"])


@dataclass
class Row:
    value: Any
    old: Any
    policy: dict[str, Any]
    script: list[str]
    retry_after: float
    corrupt: bool


ROWS = st.builds(
    Row,
    value=VALUES | st.integers(90, 1500).map(nested),
    old=st.none() | VALUES | st.integers(90, 1500).map(nested),
    policy=POLICIES,
    script=st.lists(BEHAVIOURS, min_size=1, max_size=3),
    retry_after=WEIRD_FLOATS,
    corrupt=st.booleans(),
)


def build_handlers(rows: dict[str, Row]) -> HandlerRegistry:
    handlers = HandlerRegistry()

    @handlers.handler("scripted")
    async def scripted(ctx: HandlerContext) -> object:
        row = rows[str(ctx.event["key"])]
        step = row.script[min(ctx.attempt, len(row.script)) - 1]
        match step:
            case "ok":
                return {"ok": row.value}
            case "weird_result":
                return {"set": {1, 2}, "nan": math.nan, "big": 10**5000, "self": ctx}
            case "error":
                raise RuntimeError(f"\x00 failed \ud800 {row.value!r}"[:20_000])
            case "permanent":
                raise PermanentError("never")
            case "rate":
                raise RateLimited(row.retry_after)
            case "kv":
                await ctx.kv.put("side", f"side/{ctx.event['key']}", row.value)
                return None
            case _:
                raise AssertionError(step)

    return handlers


async def _reset(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """TRUNCATE dispatcher.outbox, dispatcher.dead_letters, dispatcher.triggers,
               dispatcher.kv, dispatcher.breakers, dispatcher.depth_cutoffs,
               dispatcher.abandoned_executions, dispatcher.root_budgets"""
    )


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(ROWS, min_size=1, max_size=8))
async def test_nothing_entering_the_outbox_stops_the_loop_or_goes_missing(
    dsn: str, conn: asyncpg.Connection, rows: list[Row]
) -> None:
    await _reset(conn)
    by_key: dict[str, Row] = {}
    enqueued = 0
    for i, row in enumerate(rows):
        key = f"users/{i}"
        try:
            policy = RetryPolicy(**row.policy)
        except DispatcherError:
            continue  # refused at registration, with a clear error: nothing stored
        await TriggerRegistry().register(
            conn,
            scope="acme",
            name=f"t{i}",
            namespace="users",
            key_pattern=key,
            target="scripted",
            registered_by="user:1",
            retry=policy,
        )
        try:
            written = await emit(
                conn,
                Mutation("acme", "users", key, Op.PUT, row.value, old=row.old),
                autocommit=True,
            )
        except DispatcherError:
            continue  # refused at emit: nothing stored
        assert len(written) == 1
        enqueued += 1
        by_key[key] = row
        if row.corrupt:
            # Another client writes what emit refuses: nesting past the decoder's depth.
            await conn.execute(
                "UPDATE dispatcher.outbox SET payload = $1::jsonb WHERE id = $2",
                "[" * 3000 + "1" + "]" * 3000,
                written[0].outbox_id,
            )

    # Rate limits use no attempt: only the event's age ends a target that keeps asking.
    config = DispatcherConfig(
        poll_interval=0.02, grace_period=2, listen=False, max_rate_limited_age=3
    )
    d = Dispatcher(dsn, build_handlers(by_key), config=config)
    stats = await d.run_until_idle(time_limit=60)

    left = await conn.fetch(
        "SELECT lease_token, due_at > clock_timestamp() AS later FROM dispatcher.outbox"
    )
    assert all(r["lease_token"] is None and r["later"] for r in left), left
    dead = await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters")
    assert stats.db_errors == 0
    assert stats.succeeded + dead + len(left) == enqueued, (stats, dead, len(left), enqueued)
