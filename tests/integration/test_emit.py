from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from dispatcher.core.errors import InvalidInput, LimitExceeded
from dispatcher.core.models import Mutation, Op, RetryPolicy
from dispatcher.emit import Emitter, emit, emit_many
from dispatcher.kv import KvStore
from dispatcher.triggers import TriggerRegistry

pytestmark = pytest.mark.anyio

REGISTRY = TriggerRegistry()


async def add(conn: asyncpg.Connection, name: str, pattern: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "users",
        "key_pattern": pattern,
        "target": "noop",
        "registered_by": "user:1",
    }
    params.update(kw)
    return (await REGISTRY.register(conn, **params)).id


class Boom(Exception):
    pass


def put(key: str, value: Any = 1, scope: str = "acme", **kw: Any) -> Mutation:
    return Mutation(scope, "users", key, Op.PUT, value, **kw)


async def outbox(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM dispatcher.outbox ORDER BY id")


async def test_rollback_leaves_no_rows_and_commit_one_per_trigger(
    conn: asyncpg.Connection,
) -> None:
    policy = RetryPolicy(base_delay=3, max_delay=30, max_attempts=7, jitter=0.2)
    t1 = await add(conn, "a", "users/*", retry=policy, execution_timeout=9)
    t2 = await add(conn, "b", "users/42")
    await add(conn, "c", "users/43")

    async def emit_then_fail() -> None:
        async with conn.transaction():
            assert len(await emit(conn, put("users/42"))) == 2
            raise Boom

    with pytest.raises(Boom):
        await emit_then_fail()
    assert await outbox(conn) == []

    async with conn.transaction():
        enqueued = await emit(conn, put("users/42", {"plan": "pro"}))
    rows = await outbox(conn)
    assert {r["trigger_id"] for r in rows} == {t1, t2}
    assert [e.outbox_id for e in enqueued] == [r["id"] for r in rows]
    snap = next(r for r in rows if r["trigger_id"] == t1)
    assert (snap["retry_base_delay"], snap["retry_max_delay"], snap["max_attempts"]) == (3, 30, 7)
    assert (snap["retry_jitter"], snap["timeout"], snap["retry_kind"]) == (0.2, 9, "exponential")
    payload = json.loads(snap["payload"])
    assert payload["value"] == {"plan": "pro"}
    assert payload["key"] == "users/42"
    assert snap["attempts"] == 0
    assert snap["depth"] == 0


async def test_snapshot_is_not_changed_by_editing_the_trigger(conn: asyncpg.Connection) -> None:
    tid = await add(conn, "a", "users/*", retry=RetryPolicy(max_attempts=3))
    await emit(conn, put("users/1"))
    await conn.execute("UPDATE dispatcher.triggers SET max_attempts = 9 WHERE id = $1", tid)
    await REGISTRY.delete(conn, tid)
    rows = await outbox(conn)
    assert [r["max_attempts"] for r in rows] == [3]


async def test_disabled_triggers_other_ops_and_handlers_do_not_match(
    conn: asyncpg.Connection,
) -> None:
    await add(conn, "disabled", "users/*", enabled=False)
    await add(conn, "deletes", "users/*", ops=["delete"])
    await add(conn, "handler", "users/*", is_dead_letter_handler=True)
    puts = await add(conn, "puts", "users/*", ops=["put"])
    await emit(conn, put("users/1"))
    assert [r["trigger_id"] for r in await outbox(conn)] == [puts]


async def test_scopes_never_cross(conn: asyncpg.Connection) -> None:
    a = await add(conn, "same", "users/*", scope="tenant-a")
    b = await add(conn, "same", "users/*", scope="tenant-b")
    await emit(conn, put("users/1", scope="tenant-a"))
    await emit(conn, put("users/1", scope="tenant-b"))
    await emit(conn, put("users/1", scope="tenant-c"))
    rows = await outbox(conn)
    assert sorted((r["scope"], r["trigger_id"]) for r in rows) == [
        ("tenant-a", a),
        ("tenant-b", b),
    ]


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("a%b", ["a%b"], ["axb", "a%bc", "ab"]),
        ("a_b", ["a_b"], ["axb", "a__b"]),
        ("a\\b", ["a\\b"], ["ab", "a\\\\b", "a/b"]),
        ("50%_off*", ["50%_off", "50%_off/x"], ["50x_off", "5%_off", "50%xoff"]),
        ("u?/*.json", ["u1/a.json", "u%/x/y.json", "u_/.json"], ["u12/a.json", "u1/a.jsonx"]),
        ("*", ["", "anything/at/all"], []),
        ("x*y", ["xy", "x/y", "x%_y"], ["x", "xyz", "yx"]),
        ("%*", ["%", "%%", "%abc"], ["abc", "_"]),
    ],
)
async def test_pattern_language_and_literal_specials(
    conn: asyncpg.Connection, pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    tid = await add(conn, "p", pattern)
    for key in matching + not_matching:
        if not key:
            continue
        async with conn.transaction():
            rows = await emit(conn, put(key))
        assert (len(rows) == 1) == (key in matching), (pattern, key)
        if rows:
            assert rows[0].trigger_id == tid


async def test_payload_limit_fires_before_any_write(conn: asyncpg.Connection) -> None:
    await add(conn, "a", "users/*")
    small = Emitter(max_payload_bytes=1024)
    with pytest.raises(LimitExceeded) as info:
        await small.emit_many(conn, [put("users/1", "ok"), put("users/2", "x" * 2000)])
    assert info.value.setting == "max_payload_bytes"
    assert await outbox(conn) == []


async def test_fanout_limit_fires_before_any_write(conn: asyncpg.Connection) -> None:
    for i in range(4):
        await add(conn, f"t{i}", "users/*")
    capped = Emitter(max_fanout=3)
    with pytest.raises(LimitExceeded) as info:
        await capped.emit_many(conn, [put("nomatch"), put("users/1")])
    assert info.value.setting == "max_fanout"
    assert "users/1" in str(info.value)
    assert await outbox(conn) == []
    assert len(await Emitter(max_fanout=4).emit(conn, put("users/1"))) == 4


@pytest.mark.parametrize(
    "value",
    [float("nan"), {"x": float("inf")}, "nul\x00here", ["\ud800"], object()],
)
async def test_unstorable_values_are_rejected_with_a_clear_error(
    conn: asyncpg.Connection, value: Any
) -> None:
    await add(conn, "a", "users/*")
    with pytest.raises(InvalidInput) as info:
        await emit(conn, put("users/1", value))
    assert info.value.field == "value"
    assert await outbox(conn) == []


async def test_emit_many_writes_the_same_rows_as_repeated_emit(dsn: str) -> None:
    c = await asyncpg.connect(dsn)
    try:
        await add(c, "all", "users/*")
        await add(c, "exact", "users/7")
        await add(c, "glob", "users/?")
        await add(c, "del", "users/*", ops=["delete"])
        ids = [uuid.uuid4() for _ in range(12)]
        muts = [
            Mutation("acme", "users", f"users/{i}", Op.PUT if i % 3 else Op.DELETE, i, event_id=e)
            for i, e in zip(range(12), ids, strict=True)
        ]
        cols = "event_id, trigger_id, payload, depth, max_attempts, retry_kind"
        async with c.transaction():
            for m in muts:
                await emit(c, m)
            one_by_one = await c.fetch(f"SELECT {cols} FROM dispatcher.outbox ORDER BY 1, 2")
            await c.execute("DELETE FROM dispatcher.outbox")
            bulk = await emit_many(c, muts)
            together = await c.fetch(f"SELECT {cols} FROM dispatcher.outbox ORDER BY 1, 2")
        assert len(one_by_one) > len(muts)
        assert [tuple(r) for r in one_by_one] == [tuple(r) for r in together]
        assert len(bulk) == len(together)
    finally:
        await c.close()


async def test_same_event_id_is_idempotent(conn: asyncpg.Connection) -> None:
    await add(conn, "a", "users/*")
    event = uuid.uuid4()
    assert len(await emit(conn, put("users/1", event_id=event))) == 1
    assert await emit(conn, put("users/1", event_id=event)) == []
    assert len(await outbox(conn)) == 1


async def test_emit_sends_a_wake_hint_on_commit(dsn: str, conn: asyncpg.Connection) -> None:
    import anyio

    await add(conn, "a", "users/*")
    listener = await asyncpg.connect(dsn)
    got = anyio.Event()
    received: list[str] = []

    def on_notify(*args: object) -> None:
        received.append(str(args[2]))
        got.set()

    try:
        await listener.add_listener("dispatcher_wake", on_notify)
        async with conn.transaction():
            await emit(conn, put("users/1"))
            await emit(conn, put("users/2"))
        with anyio.fail_after(5):
            await got.wait()
        # Two emits in one transaction fold into one notification: give any second one the
        # chance to arrive by round-tripping the listener connection.
        await listener.fetchval("SELECT 1")
        assert received == ["dispatcher_wake"]
    finally:
        await listener.close()


async def test_kv_store_writes_and_emits_in_one_transaction(conn: asyncpg.Connection) -> None:
    await add(conn, "a", "users/*")
    kv = KvStore()
    w = await kv.put(conn, "acme", "users", "users/1", {"n": 1})
    assert w.version == 1
    assert len(w.enqueued) == 1
    assert (await kv.put(conn, "acme", "users", "users/1", {"n": 2})).version == 2
    entry = await kv.get(conn, "acme", "users", "users/1")
    assert entry is not None
    assert entry.value == {"n": 2}
    with pytest.raises(InvalidInput):
        await kv.put(conn, "acme", "users", "users/2", float("nan"))
    assert await kv.get(conn, "acme", "users", "users/2") is None
    d = await kv.delete(conn, "acme", "users", "users/1")
    assert len(d.enqueued) == 1
    assert (await kv.delete(conn, "acme", "users", "users/1")).enqueued == []
    ops = [json.loads(r["payload"])["op"] for r in await outbox(conn)]
    assert ops == ["put", "put", "delete"]

    async def put_then_fail() -> None:
        async with conn.transaction():
            await kv.put(conn, "acme", "users", "users/9", 9)
            raise Boom

    with pytest.raises(Boom):
        await put_then_fail()
    assert await kv.get(conn, "acme", "users", "users/9") is None
    assert len(await outbox(conn)) == 3
