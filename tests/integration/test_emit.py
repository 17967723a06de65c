from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dispatcher
from dispatcher.core.errors import InvalidInput, LimitExceeded, TransactionRequired
from dispatcher.core.models import Mutation, Op, RetryPolicy
from dispatcher.emit import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_FANOUT,
    MAX_NESTING,
    MAX_PAYLOAD_BYTES,
    Emitter,
    emit,
    emit_many,
    encode_event,
)
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
    await emit(conn, put("users/1"), autocommit=True)
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
    await emit(conn, put("users/1"), autocommit=True)
    assert [r["trigger_id"] for r in await outbox(conn)] == [puts]


async def test_scopes_never_cross(conn: asyncpg.Connection) -> None:
    a = await add(conn, "same", "users/*", scope="tenant-a")
    b = await add(conn, "same", "users/*", scope="tenant-b")
    await emit(conn, put("users/1", scope="tenant-a"), autocommit=True)
    await emit(conn, put("users/1", scope="tenant-b"), autocommit=True)
    await emit(conn, put("users/1", scope="tenant-c"), autocommit=True)
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
        await small.emit_many(
            conn, [put("users/1", "ok"), put("users/2", "x" * 2000)], autocommit=True
        )
    assert info.value.setting == "max_payload_bytes"
    assert await outbox(conn) == []


async def test_fanout_limit_fires_before_any_write(conn: asyncpg.Connection) -> None:
    for i in range(4):
        await add(conn, f"t{i}", "users/*")
    capped = Emitter(max_fanout=3)
    with pytest.raises(LimitExceeded) as info:
        await capped.emit_many(conn, [put("nomatch"), put("users/1")], autocommit=True)
    assert info.value.setting == "max_fanout"
    assert "users/1" in str(info.value)
    assert await outbox(conn) == []
    assert len(await Emitter(max_fanout=4).emit(conn, put("users/1"), autocommit=True)) == 4


@pytest.mark.parametrize(
    "value",
    [float("nan"), {"x": float("inf")}, "nul\x00here", ["\ud800"], object()],
)
async def test_unstorable_values_are_rejected_with_a_clear_error(
    conn: asyncpg.Connection, value: Any
) -> None:
    await add(conn, "a", "users/*")
    with pytest.raises(InvalidInput) as info:
        await emit(conn, put("users/1", value), autocommit=True)
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
    assert len(await emit(conn, put("users/1", event_id=event), autocommit=True)) == 1
    assert await emit(conn, put("users/1", event_id=event), autocommit=True) == []
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
    w = await kv.put(conn, "acme", "users", "users/1", {"n": 1}, autocommit=True)
    assert w.version == 1
    assert len(w.enqueued) == 1
    assert (await kv.put(conn, "acme", "users", "users/1", {"n": 2}, autocommit=True)).version == 2
    entry = await kv.get(conn, "acme", "users", "users/1")
    assert entry is not None
    assert entry.value == {"n": 2}
    with pytest.raises(InvalidInput):
        await kv.put(conn, "acme", "users", "users/2", float("nan"), autocommit=True)
    assert await kv.get(conn, "acme", "users", "users/2") is None
    d = await kv.delete(conn, "acme", "users", "users/1", autocommit=True)
    assert len(d.enqueued) == 1
    assert (await kv.delete(conn, "acme", "users", "users/1", autocommit=True)).enqueued == []
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


# --- a connection outside a transaction: refused, unless the call opts out ---


async def _write(conn: asyncpg.Connection, form: str, key: str, **kw: Any) -> int:
    """Write ``key`` through one of the emitting calls; how many outbox rows it enqueued."""
    match form:
        case "emit":
            return len(await emit(conn, put(key), **kw))
        case "emit_many":
            return len(await emit_many(conn, [put(key)], **kw))
        case "Emitter.emit":
            return len(await Emitter(max_fanout=5).emit(conn, put(key), **kw))
        case "KvStore.put":
            return len((await KvStore().put(conn, "acme", "users", key, 2, **kw)).enqueued)
        case "KvStore.delete":
            return len((await KvStore().delete(conn, "acme", "users", key, **kw)).enqueued)
    raise AssertionError(form)


@pytest.mark.parametrize(
    "form", ["emit", "emit_many", "Emitter.emit", "KvStore.put", "KvStore.delete"]
)
async def test_a_connection_outside_a_transaction_is_refused_unless_opted_out(
    conn: asyncpg.Connection, form: str
) -> None:
    await add(conn, "a", "users/*")
    kv = KvStore()
    async with conn.transaction():
        for key in ("users/bare", "users/tx", "users/auto"):
            await kv.put(conn, "acme", "users", key, 1)
        await conn.execute("DELETE FROM dispatcher.outbox")

    # Outside a transaction the write would commit on its own and outlive the host's
    # rollback: refused before anything is sent.
    with pytest.raises(TransactionRequired) as refused:
        await _write(conn, form, "users/bare")
    assert isinstance(refused.value, InvalidInput)
    assert refused.value.operation == form.removeprefix("Emitter.")
    message = str(refused.value)
    assert "must run inside your transaction" in message
    assert "async with conn.transaction():" in message
    assert "autocommit=True" in message
    assert not conn.is_in_transaction()
    assert await outbox(conn) == []
    bare = await kv.get(conn, "acme", "users", "users/bare")
    assert bare is not None
    assert (bare.value, bare.version) == (1, 1)

    # Inside the caller's transaction: written, and committed with it.
    async with conn.transaction():
        assert await _write(conn, form, "users/tx") == 1
    # Opted out: the write commits on its own.
    assert await _write(conn, form, "users/auto", autocommit=True) == 1
    assert not conn.is_in_transaction()
    assert len(await outbox(conn)) == 2


async def test_a_pooled_connection_outside_a_transaction_is_refused(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await add(conn, "a", "users/*")
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool, pool.acquire() as c:
        with pytest.raises(dispatcher.TransactionRequired, match="emit_many must run inside"):
            await emit_many(c, [])  # refused even with nothing to write: on every path
        with pytest.raises(TransactionRequired, match="emit must run inside"):
            await emit(c, put("users/1"))
        async with c.transaction():
            assert len(await emit(c, put("users/1"))) == 1
    assert len(await outbox(conn)) == 1


# --- the emit functions: one definition of fan-out, for Python and raw SQL callers ---

ROW_COLUMNS = (
    "event_id, trigger_id, scope, trigger_name, target, registered_by, payload, depth, "
    "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, max_attempts, "
    "max_event_age, timeout, park_on, attempts, due_at <= clock_timestamp() AS due"
)
RAW_EMIT = "SELECT * FROM dispatcher.emit($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)"
RAW_EMIT_MANY = (
    "SELECT * FROM dispatcher.emit_many($1, $2, $3, $4, $5, $6::jsonb[], $7, $8, $9, $10)"
)


def _raw_args(m: Mutation, max_fanout: int = 100) -> tuple[object, ...]:
    return (
        m.event_id,
        m.scope,
        m.namespace,
        m.key,
        m.op.value,
        json.dumps(m.value),
        m.depth,
        m.root_id,
        max_fanout,
        False,
    )


def _raw_many_args(ms: list[Mutation], max_fanout: int = 100) -> tuple[object, ...]:
    cols = list(zip(*(_raw_args(m) for m in ms), strict=True))
    return (*(list(c) for c in cols[:8]), max_fanout, False)


async def _rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch(f"SELECT {ROW_COLUMNS} FROM dispatcher.outbox ORDER BY 1, 2")
    return [tuple(json.loads(v) if k == "payload" else v for k, v in r.items()) for r in rows]


async def test_the_sql_functions_and_the_python_emit_write_the_same_rows(
    conn: asyncpg.Connection,
) -> None:
    policy = RetryPolicy(base_delay=2, max_delay=20, max_attempts=4, jitter=0.3)
    await add(conn, "all", "users/*", retry=policy, execution_timeout=7)
    await add(conn, "exact", "users/7")
    await add(conn, "glob", "users/?")
    await add(conn, "del", "users/*", ops=["delete"])
    await add(conn, "off", "users/*", enabled=False)
    await add(conn, "dlh", "users/*", is_dead_letter_handler=True)
    await add(conn, "elsewhere", "users/*", scope="other")
    root = uuid.uuid4()
    muts = [
        Mutation(
            "acme",
            "users",
            f"users/{i}",
            Op.PUT if i % 3 else Op.DELETE,
            {"i": i, "s": "é\u2028", "f": 0.5, "deep": [[{"x": None}]]} if i % 3 else None,
            depth=i % 2,
            root_id=root if i % 4 == 0 else None,
        )
        for i in range(12)
    ] + [put("nomatch/1"), put("users/1", scope="nobody")]

    for m in muts:
        await emit(conn, m, autocommit=True)
    python_one = await _rows(conn)
    await conn.execute("DELETE FROM dispatcher.outbox")
    await emit_many(conn, muts, autocommit=True)
    python_bulk = await _rows(conn)
    await conn.execute("DELETE FROM dispatcher.outbox")
    for m in muts:
        await conn.fetchrow(RAW_EMIT, *_raw_args(m))
    sql_one = await _rows(conn)
    await conn.execute("DELETE FROM dispatcher.outbox")
    await conn.fetchrow(RAW_EMIT_MANY, *_raw_many_args(muts))
    sql_bulk = await _rows(conn)

    assert len(python_one) > len(muts)
    assert python_one == python_bulk == sql_one == sql_bulk
    # The payload the functions build is the one encode_event writes (what invoke() and
    # the runtime read).
    payloads = {(r[0], r[1]): r[6] for r in sql_one}
    for m in muts:
        for (event_id, _), payload in payloads.items():
            if event_id == m.event_id:
                assert payload == json.loads(encode_event(m, max_bytes=1 << 20))


async def test_the_sql_functions_and_the_python_emit_cap_fanout_alike(
    conn: asyncpg.Connection,
) -> None:
    for i in range(3):
        await add(conn, f"t{i}", "users/*")
    over = put("users/1")
    under = put("users/2")

    with pytest.raises(LimitExceeded) as single:
        await Emitter(max_fanout=2).emit(conn, over, autocommit=True)
    raw = await conn.fetchrow(RAW_EMIT, *_raw_args(over, max_fanout=2))
    assert raw is not None
    assert (raw["matched"], raw["outbox_ids"], raw["trigger_ids"]) == (single.value.actual, [], [])

    with pytest.raises(LimitExceeded) as bulk:
        await Emitter(max_fanout=2).emit_many(conn, [under, over], autocommit=True)
    raw_many = await conn.fetchrow(RAW_EMIT_MANY, *_raw_many_args([under, over], max_fanout=2))
    assert raw_many is not None
    assert raw_many["over_ordinal"] == 1  # the first mutation past the cap: all or nothing
    assert raw_many["over_matched"] == bulk.value.actual == 3
    assert raw_many["outbox_ids"] == []
    assert await outbox(conn) == []

    exact = await conn.fetchrow(RAW_EMIT, *_raw_args(over, max_fanout=3))
    assert exact is not None
    assert exact["matched"] == 3
    assert len(exact["outbox_ids"]) == 3
    # The same event again: ON CONFLICT DO NOTHING, in both forms.
    assert (await conn.fetchrow(RAW_EMIT, *_raw_args(over)))["outbox_ids"] == []  # type: ignore[index]
    again = await conn.fetchrow(RAW_EMIT_MANY, *_raw_many_args([over]))
    assert again is not None
    assert (again["matched"], again["outbox_ids"]) == (3, [])
    assert await Emitter(max_fanout=3).emit(conn, over, autocommit=True) == []
    assert len(await outbox(conn)) == 3


GOOD = {
    "event_id": "gen_random_uuid()",
    "scope": "'acme'",
    "namespace": "'users'",
    "key": "'users/1'",
    "op": "'put'",
    "value": "'1'::jsonb",
    "depth": "0",
    "max_fanout": "100",
}


def _nested_json(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("argument", "sql", "says"),
    [
        ("op", "'upsert'", "op must be 'put' or 'delete', not 'upsert'"),
        ("op", "NULL", "op must be 'put' or 'delete', not null"),
        ("depth", "-1", "depth must be a non-negative integer, not -1"),
        ("max_fanout", "0", "max_fanout must be 1 to 10000, not 0"),
        ("max_fanout", "1000000", "max_fanout must be 1 to 10000, not 1000000"),
        ("event_id", "NULL", "event_id must not be null"),
        ("scope", "''", "scope must be 1 to 200 characters"),
        ("key", "repeat('k', 1025)", "key must be 1 to 1024 characters"),
        ("key", "E'users/\\n1'", "key must be 1 to 1024 characters, without control"),
        ("value", "to_jsonb(repeat('x', 16 * 1024 * 1024))", "value is 16777218 bytes of JSON"),
        (
            "value",
            f"'{_nested_json(MAX_NESTING + 1)}'::jsonb",
            "value is nested more than 256 levels",
        ),
    ],
)
async def test_raw_sql_callers_get_clear_errors(
    conn: asyncpg.Connection, argument: str, sql: str, says: str
) -> None:
    await add(conn, "a", "users/*")
    args = {**GOOD, argument: sql}
    single = ", ".join(f"{k} => {v}" for k, v in args.items())
    bulk = ", ".join(
        f"{k} => {v}" if k == "max_fanout" else f"{k} => ARRAY[{GOOD[k]}, {v}]"
        for k, v in args.items()
    )
    with pytest.raises(asyncpg.InvalidParameterValueError) as raised:
        await conn.fetchrow(f"SELECT * FROM dispatcher.emit({single})")
    assert f"dispatcher.emit: {says}" in str(raised.value)
    with pytest.raises(asyncpg.InvalidParameterValueError) as raised_many:
        await conn.fetchrow(f"SELECT * FROM dispatcher.emit_many({bulk})")
    where = "" if argument == "max_fanout" else "mutation 2 of 2, "
    assert f"dispatcher.emit_many: {where}{says}" in str(raised_many.value)
    assert await outbox(conn) == []


async def test_raw_sql_bulk_arrays_must_be_of_one_length(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match="arrays of one length"):
        await conn.fetchrow(
            "SELECT * FROM dispatcher.emit_many(ARRAY[gen_random_uuid()], ARRAY['acme'], "
            "ARRAY['users'], ARRAY['users/1', 'users/2'], ARRAY['put'], ARRAY['1'::jsonb], "
            "ARRAY[0])"
        )
    empty = await conn.fetchrow(
        "SELECT * FROM dispatcher.emit_many('{}', '{}', '{}', '{}', '{}', '{}', '{}')"
    )
    assert empty is not None
    assert (empty["matched"], empty["outbox_ids"], empty["over_ordinal"]) == (0, [], None)


async def test_nesting_bound_is_the_same_in_python_and_sql(conn: asyncpg.Connection) -> None:
    await add(conn, "a", "users/*")
    at_bound: Any = []
    for _ in range(MAX_NESTING - 1):
        at_bound = [at_bound]
    assert len(await emit(conn, put("users/1", at_bound), autocommit=True)) == 1
    assert (await conn.fetchrow(RAW_EMIT, *_raw_args(put("users/2", at_bound))))["matched"] == 1  # type: ignore[index]
    with pytest.raises(InvalidInput, match=f"nested more than {MAX_NESTING} levels deep"):
        await emit(conn, put("users/3", [at_bound]), autocommit=True)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="nested more than"):
        await conn.fetchrow(RAW_EMIT, *_raw_args(put("users/4", [at_bound])))


# --- refusing by size and by nesting before serialising ---


class CountingStr(str):
    """A string that counts how often its length is asked for (json.dumps never does)."""

    measured = 0

    def __len__(self) -> int:
        CountingStr.measured += 1
        return super().__len__()


def _never_serialise(monkeypatch: pytest.MonkeyPatch, value: object) -> None:
    real = json.dumps

    def dumps(obj: Any, **kw: Any) -> str:
        if obj is value or (isinstance(obj, dict) and obj.get("value") is value):
            raise AssertionError("the value was serialised")
        return real(obj, **kw)

    monkeypatch.setattr(json, "dumps", dumps)


@pytest.mark.parametrize("container", ["list", "dict"])
def test_oversize_values_are_refused_without_serialising(
    monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    CountingStr.measured = 0
    deeper = [[CountingStr("y" * 10)] * 1000 for _ in range(10)]
    items = [CountingStr("x" * 100_000), deeper]
    value: Any = items if container == "list" else {"a": {"b": items}}
    _never_serialise(monkeypatch, value)
    with pytest.raises(LimitExceeded) as raised:
        encode_event(put("users/1", value), max_bytes=64 * 1024)
    assert raised.value.setting == "max_payload_bytes"
    # The walk stopped at the first string, which alone is over the limit: none of the
    # 10,000 strings nested deeper was looked at.
    assert CountingStr.measured == 1


def test_huge_strings_and_lists_are_refused_at_a_glance(monkeypatch: pytest.MonkeyPatch) -> None:
    big_text = "x" * 20_000_000
    many = [0] * 10_000_000
    for value in (big_text, many, {"k": big_text}):
        _never_serialise(monkeypatch, value)
        with pytest.raises(LimitExceeded, match="at least"):
            encode_event(put("users/1", value), max_bytes=DEFAULT_MAX_PAYLOAD_BYTES)


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 980, 100_000])
def test_deep_nesting_is_refused_with_a_clear_error(levels: int) -> None:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value] if levels % 2 else {"k": value}
    with pytest.raises(InvalidInput) as raised:
        encode_event(put("users/1", value), max_bytes=DEFAULT_MAX_PAYLOAD_BYTES)
    assert raised.value.field == "value"
    assert f"is nested more than {MAX_NESTING} levels deep; at most {MAX_NESTING}" in str(
        raised.value
    )


def test_a_value_containing_itself_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(InvalidInput, match="contains itself"):
        encode_event(put("users/1", loop), max_bytes=DEFAULT_MAX_PAYLOAD_BYTES)


# Storable text: no lone surrogate, no NUL.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(
            TEXT | st.integers() | st.booleans() | st.none() | st.floats(1, 2),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@given(value=JSON, old=JSON)
@settings(database=None, deadline=None, max_examples=300)
def test_the_size_walk_never_refuses_a_payload_within_the_limit(value: Any, old: Any) -> None:
    m = put("clé/1", value, depth=3, old=old)
    text = encode_event(m, max_bytes=1 << 30)
    # The same text as serialising the whole event at once, and accepted at exactly its size.
    whole = {
        "event_id": str(m.event_id),
        "scope": m.scope,
        "namespace": m.namespace,
        "key": m.key,
        "op": m.op.value,
        "value": value,
        "depth": m.depth,
        "root": str(m.root),
        "old": old,
    }
    assert text == json.dumps(whole, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8"))
    assert encode_event(m, max_bytes=size) == text
    with pytest.raises(LimitExceeded):
        encode_event(m, max_bytes=size - 1)


def test_emitter_limits_are_bounded() -> None:
    for bad in (
        {"max_fanout": 0},
        {"max_fanout": MAX_FANOUT + 1},
        {"max_payload_bytes": MAX_PAYLOAD_BYTES + 1},
        {"max_fanout": True},
    ):
        with pytest.raises(InvalidInput):
            Emitter(**bad)
    assert (
        Emitter(max_fanout=MAX_FANOUT, max_payload_bytes=MAX_PAYLOAD_BYTES).max_fanout == MAX_FANOUT
    )
