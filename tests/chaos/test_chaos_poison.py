"""Scenario 7 — poison input.

Payloads that cannot be stored (NUL, lone surrogates, 10 MB strings, NaN/Infinity, nesting
deeper than JSON can be written, integers too large to print) are rejected at emit with a
clear error, inside the caller's transaction, which stays usable. Payloads that can be
stored but are odd (huge integers, deep nesting, unusual Unicode, big strings) run normally.
Handlers that raise hostile errors (NUL, surrogates, 10 MB messages, a broken ``__str__``,
SystemExit, KeyboardInterrupt, their own CancelledError, RecursionError) or return
unserialisable results never take the dispatcher down: poison rows dead-letter with
sanitised, bounded text and the other rows keep flowing, in the same process.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from dispatcher import DispatcherError, InvalidInput, LimitExceeded, Mutation, Op, RetryPolicy
from dispatcher.emit import emit
from tests.chaos.harness import Harness, expected_pairs, record, sizes, wait_until

pytestmark = pytest.mark.anyio

ERROR_TEXT_LIMIT = 8192


def _nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


REJECTED: list[tuple[str, object, type[DispatcherError], str]] = [
    ("10 MB string", "x" * 10_000_000, LimitExceeded, "max_payload_bytes"),
    ("NUL", {"a": "nul\x00here"}, InvalidInput, "NUL"),
    ("lone surrogate", {"a": "\ud800"}, InvalidInput, "surrogate"),
    ("NaN", {"a": math.nan}, InvalidInput, "JSON"),
    ("Infinity", [math.inf], InvalidInput, "JSON"),
    ("nesting 100,000 deep", _nested(100_000), InvalidInput, "nested more than 256 levels"),
    # json.dumps writes it, but every dispatcher's json.loads would fail on the claimed row.
    ("nesting 980 deep", _nested(980), InvalidInput, "nested more than 256 levels"),
    # The error's own preview of the value must not fail (repr of such an int raises).
    ("integer of 5,000 digits", 10**5000, InvalidInput, "JSON"),
    ("bytes", {"a": b"\x00\x01"}, InvalidInput, "JSON"),
    ("set", {1, 2}, InvalidInput, "JSON"),
]


@pytest.mark.parametrize(
    ("what", "value", "error", "says"),
    REJECTED,
    ids=[r[0] for r in REJECTED],
)
async def test_unstorable_payloads_are_rejected_at_emit(
    chaos: Harness,
    conn: asyncpg.Connection,
    what: str,
    value: object,
    error: type[DispatcherError],
    says: str,
) -> None:
    await chaos.trigger("work", "work", conn=conn)
    async with conn.transaction():
        await conn.execute("CREATE TABLE app_data (n int)")
        await conn.execute("INSERT INTO app_data VALUES (1)")
        with pytest.raises(error) as raised:
            await emit(conn, Mutation("acme", "ns", "k/poison", Op.PUT, value))  # type: ignore[arg-type]
        # The caller's transaction is still usable: nothing was sent to Postgres.
        await emit(conn, Mutation("acme", "ns", "k/fine", Op.PUT, {"ok": True}))
    message = str(raised.value)
    assert says in message, message
    assert len(message) < 400, "the error quotes a short preview, not the payload"
    assert await conn.fetchval("SELECT count(*) FROM app_data") == 1
    keys = await conn.fetch("SELECT payload ->> 'key' AS k FROM dispatcher.outbox")
    assert [r["k"] for r in keys] == ["k/fine"]


ODD_BUT_FINE: list[object] = [
    {"big": 2**70, "neg": -(2**63), "small": 5e-324, "large": 1.7976931348623157e308},
    _nested(200),
    {"unicode": "\uffff \u202e rtl \U0001f4a5 e\u0301 \ufeff"},
    {"%_\\'\"": "keys with LIKE and quote characters"},
    {"text": "y" * 200_000},
    {"list": list(range(10_000))},
    None,
    "a bare string",
]

POISON_ASYNC = [
    "nul",
    "surrogate",
    "huge",
    "huge_int",
    "bad_str",
    "system_exit",
    "keyboard_interrupt",
    "cancelled_error",
    "recursion",
    "permanent",
]
# Results the handler returns that are not JSON: sanitised, the row succeeds.
POISON_RESULTS = ["bad_result", "deep_result"]


@dataclass(frozen=True)
class Size:
    copies: int  # rows per poison kind
    healthy: int


SHORT = Size(copies=1, healthy=300)
LONG = Size(copies=20, healthy=5000)


@sizes(SHORT, LONG)
async def test_poison_rows_dead_letter_and_the_dispatcher_keeps_running(
    chaos: Harness, size: Size
) -> None:
    policy = RetryPolicy(base_delay=0.05, max_delay=0.1, max_attempts=2)
    poison = await chaos.trigger("poison", "poison", namespace="poison", retry=policy)
    blocking = await chaos.trigger(
        "poison-blocking", "poison_blocking", namespace="poison-blocking", retry=policy
    )
    healthy = await chaos.trigger("healthy", "work", namespace="orders", retry=policy)
    rows = [
        *(
            Mutation("acme", "poison", f"p/{kind}/{i}", Op.PUT, {"poison": kind})
            for kind in POISON_ASYNC + POISON_RESULTS
            for i in range(size.copies)
        ),
        *(Mutation("acme", "poison-blocking", f"b/{i}", Op.PUT, {}) for i in range(size.copies)),
        *(
            Mutation("acme", "orders", f"odd/{n}/{i}", Op.PUT, value)  # type: ignore[arg-type]
            for n, value in enumerate(ODD_BUT_FINE)
            for i in range(size.copies)
        ),
    ]
    healthy_rows = [
        Mutation("acme", "orders", f"h/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(size.healthy)
    ]
    # Poison and healthy rows interleaved, so they share claims and settlement batches.
    mixed: list[Mutation] = []
    step = max(1, len(healthy_rows) // max(1, len(rows)))
    for i, m in enumerate(rows):
        mixed += [m, *healthy_rows[i * step : (i + 1) * step]]
    mixed += healthy_rows[len(rows) * step :]
    # Breakers off: poison failures would hold the healthy rows of the same trigger.
    proc = chaos.spawn("chaos-poison", breaker_threshold=0)
    await chaos.wait_ready(proc)
    await chaos.emit(mixed, batch=200)
    await chaos.wait_drained(within=120, watch=[proc])

    # Still the same process, still working.
    after = [Mutation("acme", "orders", f"after/{i}", Op.PUT, {}) for i in range(50)]
    await chaos.emit(after)
    await chaos.wait_drained(within=60, watch=[proc])
    proc.assert_alive()
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0
    assert "Traceback" not in proc.stderr(), proc.stderr()[-4000:]

    expected = expected_pairs([poison, blocking, healthy], [*mixed, *after])
    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    assert {e["pid"] for e in await chaos.ledger()} == {proc.pid}

    dead = await chaos.fetch("SELECT * FROM dispatcher.dead_letters ORDER BY id")
    by_kind: dict[str, set[tuple[str, int]]] = {}
    longest = 0
    for d in dead:
        value = json.loads(d["payload"])["value"]
        kind = value.get("poison", "blocking") if isinstance(value, dict) else repr(value)[:80]
        by_kind.setdefault(kind, set()).add((d["reason"], d["attempts"]))
        for e in json.loads(d["errors"]):
            message = e["message"]
            assert "\x00" not in message
            assert len(message) <= ERROR_TEXT_LIMIT
            message.encode("utf-8")  # no lone surrogate survived
            longest = max(longest, len(message))
    assert by_kind == {
        "nul": {("handler_error", 2)},
        "surrogate": {("handler_error", 2)},
        "huge": {("handler_error", 2)},
        "huge_int": {("handler_error", 2)},
        "bad_str": {("handler_error", 2)},
        "recursion": {("handler_error", 2)},
        # BaseExceptions from a handler are bugs in it, not requests to stop: permanent.
        "system_exit": {("permanent", 1)},
        "keyboard_interrupt": {("permanent", 1)},
        "cancelled_error": {("permanent", 1)},
        "permanent": {("permanent", 1)},
        "blocking": {("permanent", 1)},
    }, by_kind
    assert all(len(v) == 1 for v in by_kind.values())
    ran = await chaos.ledger_count("outcome = 'success' AND trigger_id = $1", healthy.id)
    record(
        "7-poison",
        size="long" if size is LONG else "short",
        poison_rows=len(rows),
        healthy_rows=len(healthy_rows) + len(after),
        healthy_succeeded=ran,
        dead_letters=len(dead),
        longest_error_text=longest,
        dispatcher_pid_unchanged=True,
    )


# Valid jsonb that json.loads cannot follow: what older versions accepted at emit, or what
# another client writes. It used to end run() on every start, leaving its batch leased.
TOO_DEEP_TO_DECODE = "[" * 5000 + "1" + "]" * 5000


@sizes(SHORT, LONG)
async def test_poison_in_the_outbox_itself_stops_no_dispatcher(chaos: Harness, size: Size) -> None:
    """Rows corrupted by another client, outcomes Postgres refuses, delays no timestamp can
    hold: each row at fault is dead-lettered (or kept scheduled) with its cause, the rest
    flows, in the same process."""
    fast = RetryPolicy(base_delay=0.05, max_delay=0.1, max_attempts=2)
    healthy = await chaos.trigger("healthy", "work", namespace="orders", retry=fast)
    poison = await chaos.trigger("poison", "poison", namespace="poison", retry=fast)
    # Its own trigger: a rate limit holds the whole trigger until the (clamped) Retry-After.
    await chaos.trigger("rate", "poison", namespace="rate", retry=fast)
    # Accepted, clamped to ten years: the row waits, the settlement does not fail.
    await chaos.trigger(
        "far", "poison", namespace="far", retry=RetryPolicy(base_delay=1e13, max_delay=1e13)
    )
    pool = await chaos.pool()
    async with pool.acquire() as conn:
        # Policy columns out of range cannot be written at all.
        for column, value in (("retry_kind", "'bogus'"), ("timeout", "1e300")):
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(
                    f"UPDATE dispatcher.triggers SET {column} = {value} WHERE id = $1", healthy.id
                )
        # A constraint someone else added: the retry of the u/* rows is a data error.
        await conn.execute(
            "ALTER TABLE dispatcher.outbox ADD CONSTRAINT chaos_no_retry "
            "CHECK (payload->>'key' NOT LIKE 'u/%' OR attempts = 0)"
        )
    n = size.copies
    rows = [
        *(Mutation("acme", "rate", f"rate/{i}", Op.PUT, {"poison": "rate_huge"}) for i in range(n)),
        *(Mutation("acme", "poison", f"u/{i}", Op.PUT, {"poison": "fail"}) for i in range(n)),
        *(Mutation("acme", "orders", f"deep/{i}", Op.PUT, {}) for i in range(n)),
    ]
    far_rows = [Mutation("acme", "far", f"far/{i}", Op.PUT, {"poison": "fail"}) for i in range(n)]
    healthy_rows = [
        Mutation("acme", "orders", f"h/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(size.healthy)
    ]
    mixed: list[Mutation] = []
    step = max(1, len(healthy_rows) // len(rows))
    for i, m in enumerate([*rows, *far_rows]):
        mixed += [m, *healthy_rows[i * step : (i + 1) * step]]
    mixed += healthy_rows[len(rows + far_rows) * step :]
    # Written before any dispatcher runs, so the corruption is in place for the first claim.
    await chaos.emit(mixed, batch=200)
    corrupted = await chaos.fetchval(
        """WITH u AS (UPDATE dispatcher.outbox SET payload = $1::jsonb
                      WHERE payload->>'key' LIKE 'deep/%' RETURNING 1)
           SELECT count(*) FROM u""",
        TOO_DEEP_TO_DECODE,
    )
    assert corrupted == n

    proc = chaos.spawn("chaos-poison-rows", breaker_threshold=0)
    await chaos.wait_ready(proc)

    async def only_far_left() -> bool:
        # The far rows, and the rate-limited ones waiting out their clamped Retry-After.
        proc.assert_alive()
        return await chaos.outbox_count() == 2 * n

    await wait_until(only_far_left, within=120, what="everything but the far rows to settle")
    after = [Mutation("acme", "orders", f"after/{i}", Op.PUT, {}) for i in range(50)]
    await chaos.emit(after)
    await wait_until(only_far_left, within=60, what="rows emitted afterwards to settle")
    proc.assert_alive()
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0
    assert "Traceback" not in proc.stderr(), proc.stderr()[-4000:]

    waits = await chaos.fetch(
        """SELECT payload->>'key' AS key, attempts, lease_token,
               extract(epoch FROM due_at - clock_timestamp()) / 86400 / 365 AS years
           FROM dispatcher.outbox"""
    )
    far = [r for r in waits if r["key"].startswith("far/")]
    limited = [r for r in waits if r["key"].startswith("rate/")]
    assert {r["key"] for r in far} == {m.key for m in far_rows}
    assert all(r["attempts"] == 1 and r["lease_token"] is None for r in far)
    assert all(7 < r["years"] <= 10 for r in far), [r["years"] for r in far]
    # RateLimited(1e13) is cut to max_retry_after (5 minutes): kept, no attempt used.
    assert len(limited) == n
    assert all(r["attempts"] == 0 and r["lease_token"] is None for r in limited)
    assert all(0 < r["years"] * 365 * 86400 <= 300 for r in limited)
    # An operator discards them; the checker then expects only the others.
    await chaos.fetch("DELETE FROM dispatcher.outbox RETURNING id")

    dead = await chaos.fetch("SELECT payload, reason, errors FROM dispatcher.dead_letters")
    reasons: dict[str, set[str]] = {}
    for d in dead:
        payload = json.loads(d["payload"])
        key = str(payload.get("key", "deep/?")).split("/")[0]
        reasons.setdefault(key, set()).add(d["reason"])
    assert reasons == {"u": {"unstorable"}, "deep": {"undecodable"}}, reasons
    assert len(dead) == 2 * n
    report = await chaos.check(expected_pairs([healthy, poison], [*mixed, *after]))
    report.assert_ok(max_duplicates=0)
    record(
        "7-poison-rows",
        size="long" if size is LONG else "short",
        corrupted_rows=n,
        unstorable_rows=n,
        huge_rate_limits=n,
        far_rows_kept=len(far),
        rate_limited_rows_kept=len(limited),
        healthy_rows=len(healthy_rows) + len(after),
        dead_letters=len(dead),
        dispatcher_pid_unchanged=True,
    )
