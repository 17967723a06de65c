"""Per-key ordered delivery and latest-state coalescing (issue 14, parts 1 and 2), against
real Postgres: the key's version follows the commit order of its mutations, the claim runs
one row of a key at a time in that order (across retries), a dead head blocks or skips its
key, replay/discard/unblock lift a block, and a latest-delivery trigger coalesces pending
rows, also under a running one."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from cli_run import assert_error, ok, ok_json, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schema_history import downgrade, functions

from dispatcher import (
    Admin,
    DeadLetterFilter,
    Delivery,
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    InvalidInput,
    Mutation,
    OnDeadLetter,
    Op,
    Ordering,
    PermanentError,
    RetryPolicy,
    TriggerRegistry,
    emit,
    emit_many,
)
from dispatcher.console import ConsoleSettings, create_app
from dispatcher.metrics import PrometheusRecorder
from dispatcher.migrate import migrate
from dispatcher.sql import queries

pytestmark = pytest.mark.anyio

REGISTRY = TriggerRegistry()
CONFIG = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)
FAST = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=3)


async def trigger(conn: asyncpg.Connection, name: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "orders",
        "key_pattern": "orders/*",
        "target": name,
        "registered_by": "user:1",
        "retry": FAST,
    }
    params.update(kw)
    return (await REGISTRY.register(conn, **params)).id


def put(key: str, value: Any) -> Mutation:
    return Mutation("acme", "orders", key, Op.PUT, value)


async def rows(conn: asyncpg.Connection, name: str) -> list[tuple[str, int, Any]]:
    found = await conn.fetch(
        "SELECT order_key, key_seq, payload FROM dispatcher.outbox WHERE trigger_name = $1 "
        "ORDER BY order_key, key_seq",
        name,
    )
    out = []
    for r in found:
        payload = json.loads(r["payload"])
        assert payload.get("seq") == r["key_seq"]
        out.append((r["order_key"], r["key_seq"], payload["value"]))
    return out


class Recorder:
    """Handlers that record (key, seq, value) per call, with failures on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, Any]] = []
        self.fail_once: set[tuple[str, int]] = set()
        self.fail_always: set[tuple[str, int]] = set()
        self.handlers = HandlerRegistry()

        for target in ("ordered", "latest", "skipper"):
            self.handlers.handler(target)(self._record(target))

    def _record(self, target: str) -> Any:
        async def record(ctx: HandlerContext) -> None:
            key, seq = str(ctx.event["key"]), int(str(ctx.event["seq"]))
            self.calls.append((target, key, seq, ctx.event["value"]))
            if (key, seq) in self.fail_always:
                raise PermanentError(f"{key} v{seq} refused")
            if (key, seq) in self.fail_once:
                self.fail_once.discard((key, seq))
                raise RuntimeError(f"{key} v{seq} failed once")

        return record

    def seqs(self, target: str) -> dict[str, list[int]]:
        by_key: dict[str, list[int]] = defaultdict(list)
        for t, key, seq, _ in self.calls:
            if t == target:
                by_key[key].append(seq)
        return dict(by_key)


# --- registration ---


async def test_registration_stores_and_checks_the_order_settings(conn: asyncpg.Connection) -> None:
    ordered = await REGISTRY.get(conn, await trigger(conn, "ordered", ordering="key"))
    assert (ordered.ordering, ordered.on_dead_letter, ordered.delivery) == (
        Ordering.KEY,
        OnDeadLetter.BLOCK,
        Delivery.ALL,
    )
    latest = await REGISTRY.get(conn, await trigger(conn, "latest", delivery="latest"))
    assert (latest.ordering, latest.delivery) == (Ordering.KEY, Delivery.LATEST)
    skip = await REGISTRY.get(
        conn, await trigger(conn, "skipper", ordering="key", on_dead_letter="skip")
    )
    assert skip.on_dead_letter is OnDeadLetter.SKIP
    plain = await REGISTRY.get(conn, await trigger(conn, "plain"))
    assert (plain.ordering, plain.on_dead_letter) == (Ordering.NONE, None)

    refusals = [
        ({"ordering": "sorted"}, "ordering"),
        ({"delivery": "newest"}, "delivery"),
        ({"on_dead_letter": "block"}, "on_dead_letter"),
        ({"ordering": "none", "delivery": "latest"}, "ordering"),
        ({"ordering": "key", "on_dead_letter": "retry"}, "on_dead_letter"),
        ({"ordering": "key", "is_dead_letter_handler": True}, "ordering"),
    ]
    for kw, field in refusals:
        with pytest.raises(InvalidInput) as caught:
            await trigger(conn, "refused", **kw)
        assert caught.value.field == field, kw
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.triggers") == 4
    # The table refuses what the API would (rows written by other clients).
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "UPDATE dispatcher.triggers SET delivery = 'latest' WHERE name = 'plain'"
        )


# --- versions ---


async def test_each_key_counts_its_own_versions_in_call_order(conn: asyncpg.Connection) -> None:
    await trigger(conn, "ordered", ordering="key")
    await trigger(conn, "plain")
    for i in range(3):
        await emit(conn, put("orders/1", {"i": i}), autocommit=True)
    await emit_many(conn, [put(f"orders/{1 + j % 2}", {"j": j}) for j in range(5)], autocommit=True)
    assert await rows(conn, "ordered") == [
        ("orders/1", 1, {"i": 0}),
        ("orders/1", 2, {"i": 1}),
        ("orders/1", 3, {"i": 2}),
        ("orders/1", 4, {"j": 0}),
        ("orders/1", 5, {"j": 2}),
        ("orders/1", 6, {"j": 4}),
        ("orders/2", 1, {"j": 1}),
        ("orders/2", 2, {"j": 3}),
    ]
    # An unordered trigger's rows carry no key, version or seq.
    plain = await conn.fetch(
        "SELECT order_key, key_seq, blocks_key, payload ? 'seq' AS seq "
        "FROM dispatcher.outbox WHERE trigger_name = 'plain'"
    )
    assert len(plain) == 8
    assert all(tuple(r) == (None, None, None, False) for r in plain)


async def test_a_mutation_of_an_unordered_key_takes_no_version(conn: asyncpg.Connection) -> None:
    await trigger(conn, "plain")
    await emit(conn, put("orders/1", {}), autocommit=True)
    await emit_many(conn, [put("orders/2", {})], autocommit=True)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.key_versions") == 0


async def test_a_key_too_long_for_the_order_indexes_is_refused_clearly(
    conn: asyncpg.Connection,
) -> None:
    """A key of 1,024 four-byte characters (4,096 bytes; 4,106 with "acme" and "orders") is
    a valid key, and an unordered trigger takes it; an ordered one needs it in btree
    indexes, which cap entries at 2,704 bytes: the emit is refused with what is wrong, not
    Postgres's index error, and nothing is written."""
    await trigger(conn, "plain", key_pattern="*")
    wide = "\U0001f600" * 1024
    await emit(conn, put(wide, {}), autocommit=True)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 1
    await trigger(conn, "ordered", ordering="key", key_pattern="*")
    for call in (emit, emit_many):
        arg: Any = put(wide, {}) if call is emit else [put("orders/1", {}), put(wide, {})]
        with pytest.raises(asyncpg.InvalidParameterValueError) as caught:
            await call(conn, arg, autocommit=True)
        message = str(caught.value)
        assert "must be at most 2600 bytes (UTF-8); this one is 4106" in message, message
        if call is emit_many:
            assert "mutation 2 of 2" in message
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 1
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.key_versions") == 0


async def backend_waits_on_a_lock(conn: asyncpg.Connection, pid: int) -> None:
    with anyio.fail_after(10):
        while not await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            await anyio.wait_all_tasks_blocked()


async def test_versions_follow_commit_order(dsn: str, conn: asyncpg.Connection) -> None:
    """B emits the key while A's emit of it is uncommitted: B waits for A's commit, and takes
    the next version. A second round where the first writer rolls back: its version is not
    used, the waiting writer takes it."""
    await trigger(conn, "ordered", ordering="key")
    a = await asyncpg.connect(dsn)
    b = await asyncpg.connect(dsn)
    try:
        for round_, a_commits in ((1, True), (2, False)):
            tx_a = a.transaction()
            await tx_a.start()
            await emit(a, put("orders/1", {"by": "a", "round": round_}))
            done = anyio.Event()

            async def write_b(r: int = round_, finished: anyio.Event = done) -> None:
                async with b.transaction():
                    await emit(b, put("orders/1", {"by": "b", "round": r}))
                finished.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(write_b)
                await backend_waits_on_a_lock(conn, b.get_server_pid())
                assert not done.is_set()
                await (tx_a.commit() if a_commits else tx_a.rollback())
                with anyio.fail_after(10):
                    await done.wait()
    finally:
        await a.close()
        await b.close()
    assert [(seq, v) for _, seq, v in await rows(conn, "ordered")] == [
        (1, {"by": "a", "round": 1}),
        (2, {"by": "b", "round": 1}),
        (3, {"by": "b", "round": 2}),
    ]


# --- the claim ---


async def test_a_key_runs_one_row_at_a_time_in_version_order_across_retries(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await trigger(conn, "ordered", ordering="key")
    mutations = [put(f"orders/{k}", {"n": n}) for n in range(5) for k in range(4)]
    await emit_many(conn, mutations, autocommit=True)
    recorder = Recorder()
    # Key 0's first and third events fail once each: their retries hold the key.
    recorder.fail_once = {("orders/0", 1), ("orders/0", 3), ("orders/2", 2)}
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(
        include_scheduled=True, time_limit=60
    )
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    seqs = recorder.seqs("ordered")
    assert seqs["orders/0"] == [1, 1, 2, 3, 3, 4, 5]
    assert seqs["orders/1"] == [1, 2, 3, 4, 5]
    assert seqs["orders/2"] == [1, 2, 2, 3, 4, 5]
    assert seqs["orders/3"] == [1, 2, 3, 4, 5]


async def test_the_claim_takes_only_each_keys_head(conn: asyncpg.Connection) -> None:
    """Straight from the claim statement: of three due rows of one key, one is leased; the
    next only once the head is gone. Rows are given ids against their version order (the
    third version first), which the claim ignores."""
    tid = await trigger(conn, "ordered", ordering="key")
    await emit_many(conn, [put("orders/1", {"n": n}) for n in range(3)], autocommit=True)
    await emit(conn, put("orders/2", {"n": 0}), autocommit=True)
    # Versions 2 and 3 wait out of the claim's range until the head leaves.
    waiting = await conn.fetch(
        "SELECT key_seq FROM dispatcher.outbox WHERE due_at = 'infinity' ORDER BY key_seq"
    )
    assert [r["key_seq"] for r in waiting] == [2, 3]
    # Make every row due (as a racing emit could) and reverse the ids of orders/1's rows:
    # the claim's head test alone must keep the order, and ids are not it.
    await conn.execute(
        "UPDATE dispatcher.outbox SET id = id + 1000 * (4 - key_seq), "
        "due_at = clock_timestamp() - interval '1 s' WHERE order_key = 'orders/1'"
    )
    q = queries("dispatcher")

    async def claim() -> list[tuple[str, int]]:
        got = await conn.fetch(q.claim, 10, uuid.uuid4(), "test", 30.0, [])
        return sorted((json.loads(r["payload"])["key"], r["id"]) for r in got)

    first = await claim()
    assert [k for k, _ in first] == ["orders/1", "orders/2"]
    head_id = next(i for k, i in first if k == "orders/1")
    assert await conn.fetchval("SELECT key_seq FROM dispatcher.outbox WHERE id = $1", head_id) == 1
    await conn.execute(
        "UPDATE dispatcher.outbox SET due_at = clock_timestamp() - interval '1 s', "
        "lease_token = NULL WHERE id = $1",
        head_id,
    )
    assert [k for k, _ in await claim()] == ["orders/1"]  # the head again, not version 2
    await conn.execute("DELETE FROM dispatcher.outbox WHERE id = $1", head_id)
    [(key, second)] = await claim()
    assert key == "orders/1"
    assert await conn.fetchval("SELECT key_seq FROM dispatcher.outbox WHERE id = $1", second) == 2
    owner = await conn.fetchval("SELECT trigger_id FROM dispatcher.outbox WHERE id = $1", second)
    assert owner == tid


async def test_a_stranded_waiting_row_is_promoted_by_the_sweep(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """A key whose first row waits with nothing before it (here put back to wait by hand,
    as another client could leave it): the dispatcher's sweep makes it due, and the key
    drains in order. Deleting the head by hand promotes the next row at once."""
    await trigger(conn, "ordered", ordering="key")
    await emit_many(conn, [put("orders/1", {"n": n}) for n in range(3)], autocommit=True)
    await conn.execute("DELETE FROM dispatcher.outbox WHERE key_seq = 1")
    due = await conn.fetch(
        "SELECT key_seq FROM dispatcher.outbox WHERE due_at <> 'infinity' ORDER BY key_seq"
    )
    assert [r["key_seq"] for r in due] == [2]  # promoted by the delete's trigger
    await conn.execute("UPDATE dispatcher.outbox SET due_at = 'infinity' WHERE key_seq = 2")
    recorder = Recorder()
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(
        include_scheduled=True, time_limit=30
    )
    assert recorder.seqs("ordered") == {"orders/1": [2, 3]}


async def waits(conn: asyncpg.Connection, seq: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT due_at = 'infinity' FROM dispatcher.outbox WHERE key_seq = $1", seq
        )
    )


@pytest.mark.parametrize("head_gone", ["before the commit", "while it commits"])
async def test_a_row_written_while_its_head_leaves_is_not_left_waiting(
    dsn: str, conn: asyncpg.Connection, head_gone: str
) -> None:
    """The emitter of version 2 sees the head (version 1) and writes its row to wait; the
    head is deleted (as its settlement would) by another transaction that cannot see that
    row yet. Whether that deletion commits before the emitter's commit or is still open
    then, version 2 is due once both committed."""
    await trigger(conn, "ordered", ordering="key")
    await emit(conn, put("orders/1", {"n": 1}), autocommit=True)
    emitter = await asyncpg.connect(dsn)
    settler = await asyncpg.connect(dsn)
    try:
        tx = emitter.transaction()
        await tx.start()
        await emit(emitter, put("orders/1", {"n": 2}))
        settling = settler.transaction()
        await settling.start()
        await settler.execute("DELETE FROM dispatcher.outbox WHERE key_seq = 1")
        if head_gone == "before the commit":
            await settling.commit()
            await tx.commit()
        else:
            await tx.commit()  # its check skips the head the open deletion holds
            await settling.commit()
    finally:
        await emitter.close()
        await settler.close()
    assert not await waits(conn, 2)


# --- dead heads: block and skip ---


async def dead_head(dsn: str, conn: asyncpg.Connection, **kw: Any) -> Recorder:
    await trigger(conn, "ordered", ordering="key", **kw)
    await emit_many(
        conn,
        [put(f"orders/{k}", {"n": n}) for n in range(3) for k in (1, 2)],
        autocommit=True,
    )
    recorder = Recorder()
    recorder.fail_always = {("orders/1", 1)}
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(time_limit=60)
    return recorder


async def test_a_dead_head_blocks_its_key_and_no_other(dsn: str, conn: asyncpg.Connection) -> None:
    recorder = await dead_head(dsn, conn)
    assert recorder.seqs("ordered") == {"orders/1": [1], "orders/2": [1, 2, 3]}
    [letter] = await Admin().list_dead_letters(conn, DeadLetterFilter())
    [blocked] = await FlowControl().blocked_keys(conn)
    assert (blocked.key, blocked.seq, blocked.dead_letter_id, blocked.waiting) == (
        "orders/1",
        1,
        letter.id,
        2,
    )
    assert blocked.trigger_name == "ordered"
    detail = await conn.fetchrow(
        "SELECT order_key, key_seq FROM dispatcher.dead_letters WHERE id = $1", letter.id
    )
    assert tuple(detail) == ("orders/1", 1)
    # Idle although rows are due: a blocked key waits for an operator, like a parked row.
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 2
    status = await Admin().status(conn)
    assert status.blocked_keys == 1


class BlockedKeysRecorder(PrometheusRecorder):
    """Tells the test each time the backlog sampler reported the blocked keys."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.counts: list[int] = []
        self.sampled = anyio.Event()

    def blocked_keys(self, count: int) -> None:
        super().blocked_keys(count)
        self.counts.append(count)
        self.sampled.set()
        self.sampled = anyio.Event()


async def test_the_blocked_keys_gauge_counts_them(dsn: str, conn: asyncpg.Connection) -> None:
    await dead_head(dsn, conn)
    registry = CollectorRegistry()
    recorder = BlockedKeysRecorder(registry)
    config = DispatcherConfig(poll_interval=0.05, backlog_interval=0.02)
    d = Dispatcher(dsn, Recorder().handlers, config=config, recorder=recorder)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            while not recorder.counts or recorder.counts[-1] != 1:
                await recorder.sampled.wait()
            await FlowControl().unblock(conn, ("acme", "ordered"), "orders/1")
            while recorder.counts[-1] != 0:
                await recorder.sampled.wait()
            d.stop()
    assert registry.get_sample_value("dispatcher_blocked_keys") == 0
    assert 1 in recorder.counts


async def test_replaying_the_dead_head_runs_it_first(dsn: str, conn: asyncpg.Connection) -> None:
    recorder = await dead_head(dsn, conn)
    recorder.fail_always.clear()
    report = await Admin().replay(conn, DeadLetterFilter(scope="acme"))
    assert len(report.replayed) == 1
    assert await FlowControl().blocked_keys(conn) == []
    # The replayed row has a new, higher id than the key's waiting rows, and runs first.
    ids = await conn.fetch(
        "SELECT id, key_seq FROM dispatcher.outbox WHERE order_key = 'orders/1' ORDER BY id"
    )
    assert [r["key_seq"] for r in ids] == [2, 3, 1]
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(time_limit=60)
    assert recorder.seqs("ordered")["orders/1"] == [1, 1, 2, 3]
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


async def test_discarding_the_dead_head_lets_the_key_go_on(
    dsn: str, conn: asyncpg.Connection
) -> None:
    recorder = await dead_head(dsn, conn)
    assert await Admin().discard(conn, DeadLetterFilter(scope="acme")) == 1
    assert await FlowControl().blocked_keys(conn) == []
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(time_limit=60)
    assert recorder.seqs("ordered")["orders/1"] == [1, 2, 3]


async def test_unblocking_skips_the_head_and_keeps_its_dead_letter(
    dsn: str, conn: asyncpg.Connection
) -> None:
    recorder = await dead_head(dsn, conn)
    flow = FlowControl()
    assert await flow.unblock(conn, ("acme", "ordered"), "orders/2") == 0
    assert await flow.unblock(conn, ("acme", "ordered"), "orders/1") == 1
    await Dispatcher(dsn, recorder.handlers, config=CONFIG).run_until_idle(time_limit=60)
    assert recorder.seqs("ordered")["orders/1"] == [1, 2, 3]
    [letter] = await Admin().list_dead_letters(conn, DeadLetterFilter())
    assert letter.resolution.value == "open"


async def test_skip_lets_the_key_go_on_at_once(dsn: str, conn: asyncpg.Connection) -> None:
    recorder = await dead_head(dsn, conn, on_dead_letter="skip")
    assert recorder.seqs("ordered") == {"orders/1": [1, 2, 3], "orders/2": [1, 2, 3]}
    assert await FlowControl().blocked_keys(conn) == []
    assert len(await Admin().list_dead_letters(conn, DeadLetterFilter())) == 1


# --- latest-state coalescing ---


async def test_pending_rows_of_a_key_coalesce_into_the_latest(conn: asyncpg.Connection) -> None:
    await trigger(conn, "latest", delivery="latest")
    await trigger(conn, "ordered", ordering="key")
    first = await emit(conn, put("orders/1", {"n": 0}), autocommit=True)
    due = await conn.fetchval("SELECT due_at FROM dispatcher.outbox WHERE trigger_name = 'latest'")
    for n in range(1, 5):
        await emit(conn, put("orders/1", {"n": n}), autocommit=True)
    last = put("orders/1", {"n": 5})
    await emit_many(
        conn, [put("orders/2", {"n": 0}), put("orders/1", {"n": 9}), last], autocommit=True
    )
    # Each key counts its own versions; of a key mutated twice in one call, the last wins.
    assert await rows(conn, "latest") == [("orders/1", 7, {"n": 5}), ("orders/2", 1, {"n": 0})]
    row = await conn.fetchrow(
        "SELECT id, event_id, due_at FROM dispatcher.outbox "
        "WHERE trigger_name = 'latest' AND order_key = 'orders/1'"
    )
    latest_id = next(e.outbox_id for e in first if e.trigger_id != 2)
    assert row["id"] == latest_id  # the same row, replaced in place
    assert row["event_id"] == last.event_id
    assert row["due_at"] == due  # keeps the earlier due time
    # The ordered trigger beside it keeps every version.
    assert len(await rows(conn, "ordered")) == 8


async def test_concurrent_writers_of_a_key_leave_one_pending_row(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """Eight connections emit one key at once: the latest-state trigger ends with one row,
    at the key's last version (each writer's coalescing step reads the outbox after the
    previous writer of the key committed, never from an older snapshot)."""
    await trigger(conn, "latest", delivery="latest")
    writers = [await asyncpg.connect(dsn) for _ in range(8)]

    async def write(w: asyncpg.Connection, i: int) -> None:
        for n in range(25):
            async with w.transaction():
                await emit(w, put("orders/1", {"w": i, "n": n}))

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, w in enumerate(writers):
                    tg.start_soon(write, w, i)
    finally:
        for w in writers:
            await w.close()
    [(key, seq, value)] = await rows(conn, "latest")
    assert (key, seq) == ("orders/1", 200)
    assert value["n"] == 24  # some writer's last mutation, the last to commit


async def test_a_running_row_is_never_replaced(dsn: str, conn: asyncpg.Connection) -> None:
    """While the key's row runs, newer mutations make one pending row, which ends with the
    final state; two handler calls in all, the last carrying the final value."""
    await trigger(conn, "latest", delivery="latest")
    started, release, second = anyio.Event(), anyio.Event(), anyio.Event()
    seen: list[Any] = []
    handlers = HandlerRegistry()

    @handlers.handler("latest")
    async def latest(ctx: HandlerContext) -> None:
        seen.append(ctx.event["value"])
        if len(seen) == 1:
            started.set()
            await release.wait()
        else:
            second.set()

    await emit(conn, put("orders/1", {"n": 0}), autocommit=True)
    d = Dispatcher(dsn, handlers, config=CONFIG)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            await started.wait()
            for n in range(1, 20):
                await emit(conn, put("orders/1", {"n": n}), autocommit=True)
            states = await conn.fetch(
                "SELECT lease_token IS NOT NULL AS leased, payload -> 'value' AS value "
                "FROM dispatcher.outbox ORDER BY key_seq"
            )
            assert [(r["leased"], json.loads(r["value"])) for r in states] == [
                (True, {"n": 0}),
                (False, {"n": 19}),
            ]
            release.set()
            await second.wait()
            d.stop()  # graceful: settles the second call before returning
    assert seen == [{"n": 0}, {"n": 19}]
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0


# --- the claim's plan, and the migration ---


async def test_claim_plan_probes_each_keys_head_by_index(conn: asyncpg.Connection) -> None:
    """50,000 due rows, half of them ordered (5,000 keys with 5 versions each): the claim
    stays an index range scan on due_at, and the head test one probe of the order index."""
    await conn.execute(
        """
        INSERT INTO dispatcher.outbox (event_id, trigger_id, scope, trigger_name, target,
            registered_by, payload, retry_kind, retry_base_delay, retry_factor,
            retry_max_delay, retry_jitter, max_attempts, timeout, due_at, order_key, key_seq,
            blocks_key)
        SELECT gen_random_uuid(), 1 + i % 2, 'acme', 't', 'x', 'u', '{}', 'constant', 1, 1, 1,
            0, 3, 30, clock_timestamp() + (i % 100 - 50) * interval '1 minute',
            CASE WHEN i % 2 = 0 THEN 'orders/' || (i / 2) % 5000 END,
            CASE WHEN i % 2 = 0 THEN i / 10000 + 1 END, CASE WHEN i % 2 = 0 THEN true END
        FROM generate_series(1, 50000) AS i
        """
    )
    await conn.execute(
        "INSERT INTO dispatcher.blocked_keys (trigger_id, order_key, scope, trigger_name, "
        "dead_letter_id) SELECT 1, 'orders/' || i, 'acme', 't', i FROM generate_series(1, 50) i"
    )
    await conn.execute("ANALYZE dispatcher.outbox")
    await conn.execute("ANALYZE dispatcher.blocked_keys")
    plan = await conn.fetch("EXPLAIN " + queries().claim, 100, uuid.uuid4(), "inbox", 5.0, [])
    text = "\n".join(r[0] for r in plan)
    assert "outbox_due_idx" in text, text
    assert "outbox_key_order_idx" in text, text
    assert "Seq Scan on outbox" not in text, text


async def test_migration_round_trip(empty_dsn: str) -> None:
    """0014 up, down (0013's functions back exactly, the tables and columns gone) and up."""
    await migrate(empty_dsn, revision="0013")
    conn = await asyncpg.connect(empty_dsn)
    try:
        at_0013 = await functions(conn)
        await migrate(empty_dsn)
        upgraded = await functions(conn)
        assert upgraded != at_0013
        await trigger(conn, "ordered", ordering="key")
        await emit(conn, put("orders/1", {}), autocommit=True)
        await downgrade(empty_dsn, "0013")
        assert await functions(conn) == at_0013
        gone = await conn.fetchval(
            """SELECT count(*) FROM information_schema.columns
               WHERE table_schema = 'dispatcher'
                 AND column_name IN ('ordering', 'on_dead_letter', 'delivery', 'order_key',
                     'key_seq', 'blocks_key')"""
        )
        assert gone == 0
        assert await conn.fetchval("SELECT to_regclass('dispatcher.key_versions')") is None
        # The row enqueued at 0014 is still there, as an unordered one.
        assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 1
        await migrate(empty_dsn)
        assert await functions(conn) == upgraded
    finally:
        await conn.close()


# --- the command line ---


async def test_cli_registers_ordered_triggers_and_lists_and_unblocks_keys(
    dsn: str, conn: asyncpg.Connection
) -> None:
    common = ("--dsn", dsn, "--scope", "acme", "--namespace", "orders", "--pattern",
              "orders/*", "--registered-by", "user:1")  # fmt: skip
    await ok("triggers", "add", *common, "--name", "latest", "--target", "latest",
             "--delivery", "latest")  # fmt: skip
    await ok("triggers", "add", *common, "--name", "skipper", "--target", "skipper",
             "--ordering", "key", "--on-dead-letter", "skip")  # fmt: skip
    refused = await run("triggers", "add", *common, "--name", "bad", "--target", "x",
                        "--on-dead-letter", "skip")  # fmt: skip
    assert_error(refused, contains="on_dead_letter")
    listed = {t["name"]: t for t in await ok_json("triggers", "list", "--dsn", dsn)}
    assert (listed["latest"]["ordering"], listed["latest"]["on_dead_letter"]) == ("key", "block")
    assert listed["latest"]["delivery"] == "latest"
    assert listed["skipper"]["on_dead_letter"] == "skip"
    text = (await ok("triggers", "list", "--dsn", dsn)).stdout
    assert "key, block, latest" in text
    assert "key, skip" in text

    # A blocked key, listed, then unblocked from the command line.
    await conn.execute("DELETE FROM dispatcher.triggers")
    await dead_head(dsn, conn)
    [blocked] = await ok_json("keys", "blocked", "--dsn", dsn, "--trigger", "acme/ordered")
    assert (blocked["key"], blocked["waiting"], blocked["reason"]) == ("orders/1", 2, "permanent")
    assert "blocked keys: 1" in (await ok("status", "--dsn", dsn)).stdout
    missing = await run("keys", "unblock", "--dsn", dsn, "--trigger", "acme/ordered",
                        "--key", "orders/2")  # fmt: skip
    assert_error(missing, contains="not blocked")
    both = await run("keys", "unblock", "--dsn", dsn, "--trigger", "acme/ordered")
    assert_error(both, code=2, contains="--key or --all")
    done = await ok("keys", "unblock", "--dsn", dsn, "--trigger", "acme/ordered", "--all")
    assert done.stdout.strip() == "unblocked 1 key(s)"
    assert await ok_json("keys", "blocked", "--dsn", dsn) == []


# --- property: whatever the mix of calls, versions and coalescing stay exact ---

CALLS = st.lists(
    st.tuples(
        st.sampled_from(["emit", "emit_many", "sql"]),
        st.lists(st.tuples(st.integers(0, 3), st.integers(-5, 5)), min_size=1, max_size=6),
        st.booleans(),  # commit or roll back
    ),
    min_size=1,
    max_size=10,
)


async def emit_by(how: str, conn: asyncpg.Connection, batch: list[Mutation]) -> None:
    if how == "emit":
        for m in batch:
            await emit(conn, m)
    elif how == "emit_many":
        await emit_many(conn, batch)
    else:  # the SQL function, as any client would call it
        await conn.execute(
            """WITH a AS (
                   SELECT array_agg(gen_random_uuid()) AS e, array_agg('acme'::text) AS s,
                       array_agg('orders'::text) AS n, array_agg(k) AS k,
                       array_agg('put'::text) AS o, array_agg(v) AS v, array_agg(0) AS d
                   FROM unnest($1::text[], $2::jsonb[]) AS u(k, v))
               SELECT m.matched
               FROM a, dispatcher.emit_many(a.e, a.s, a.n, a.k, a.o, a.v, a.d) AS m""",
            [m.key for m in batch],
            [json.dumps(m.value) for m in batch],
        )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=CALLS)
async def test_versions_and_latest_rows_match_the_committed_mutations(
    conn: asyncpg.Connection, calls: list[tuple[str, list[tuple[int, int]], bool]]
) -> None:
    """Drawn sequences of emit, emit_many and the SQL function, each committed or rolled
    back: per key, the ordered trigger holds versions 1..n of exactly the committed
    mutations in commit order, and the latest-state trigger one row with the last of them."""
    await conn.execute("TRUNCATE dispatcher.outbox, dispatcher.key_versions")
    if not await conn.fetchval("SELECT count(*) FROM dispatcher.triggers"):
        await trigger(conn, "ordered", ordering="key")
        await trigger(conn, "latest", delivery="latest")
        await trigger(conn, "plain")
    committed: dict[str, list[int]] = defaultdict(list)
    for how, muts, commit in calls:
        batch = [put(f"orders/{k}", {"v": v}) for k, v in muts]
        tx = conn.transaction()
        await tx.start()
        try:
            await emit_by(how, conn, batch)
        except BaseException:
            await tx.rollback()
            raise
        if commit:
            await tx.commit()
            for m in batch:
                assert isinstance(m.value, dict)
                committed[m.key].append(int(m.value["v"]))
        else:
            await tx.rollback()
    ordered = await rows(conn, "ordered")
    got: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for key, seq, value in ordered:
        got[key].append((seq, value["v"]))
    assert {k: [v for _, v in vs] for k, vs in got.items()} == dict(committed)
    assert all([s for s, _ in vs] == list(range(1, len(vs) + 1)) for vs in got.values())
    latest = {key: (seq, value["v"]) for key, seq, value in await rows(conn, "latest")}
    assert latest == {k: (len(vs), vs[-1]) for k, vs in committed.items()}
    assert len(await rows(conn, "latest")) == len(committed)
    plain = await conn.fetchval(
        "SELECT count(*) FROM dispatcher.outbox WHERE trigger_name = 'plain'"
    )
    assert plain == sum(len(vs) for vs in committed.values())


async def test_the_console_shows_blocked_keys_and_unblocks_one(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await dead_head(dsn, conn)
    app = create_app(ConsoleSettings(dsn))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as c:
            page = await c.get("/")
            assert page.status_code == 200
            section = page.text[page.text.index('id="blocked-keys"') :]
            assert "orders/1" in section
            assert "acme/ordered" in section
            token = c.cookies.get("dispatcher_csrf")
            assert token
            form = {"trigger_id": str(await trigger_id(conn)), "key": "orders/1"}
            refused = await c.post("/flow/unblock", data=form)
            assert refused.status_code == 403  # no CSRF token
            assert len(await FlowControl().blocked_keys(conn)) == 1
            done = await c.post("/flow/unblock", data={**form, "csrf": token})
            assert done.status_code == 303
    finally:
        await app.state.console.aclose()
    assert await FlowControl().blocked_keys(conn) == []
    [audit] = await conn.fetch("SELECT action, target, count FROM dispatcher.audit_log")
    assert tuple(audit) == ("flow.unblock", f"trigger {form['trigger_id']} key orders/1", 1)


async def trigger_id(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT id FROM dispatcher.triggers WHERE name = 'ordered'"))
