"""Revision 0016 rewrote the first statement of ``emit_many`` for speed: it must write what
0015's wrote, return what it returned and refuse what it refused.

Hypothesis draws batches of mutations (repeated keys and event ids, puts and deletes, old
values, other scopes), which triggers are enabled (exact, prefix and glob patterns, a
condition, selected fields, ordered, latest-state, delete-only), a fan-out cap, a backlog
cap and a trace context, and a batch emitted first so that ordered and latest-state rows
find rows before them. Both functions run on the same state in one transaction (the second
after a rollback to a savepoint), and the outbox, the key versions, the caps and the
results are compared (outbox ids by their order, as the sequence is not rolled back).
"""

from __future__ import annotations

import importlib.util
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_history import downgrade, functions

from dispatcher import FlowControl, Mutation, Op, TriggerRegistry
from dispatcher.emit import Emitter
from dispatcher.migrate import migrate

pytestmark = pytest.mark.anyio

REGISTRY = TriggerRegistry()
TRIGGERS: dict[str, dict[str, Any]] = {
    "all": {"key_pattern": "orders/*"},
    "exact": {"key_pattern": "orders/1"},
    "glob": {"key_pattern": "orders/?"},
    "cond": {"key_pattern": "orders/*", "when": "new.n >= 2"},
    "fields": {"key_pattern": "orders/*", "fields": ["n"]},
    "ordered": {"key_pattern": "orders/*", "ordering": "key"},
    "latest": {"key_pattern": "orders/*", "ordering": "key", "delivery": "latest"},
    "deletes": {"key_pattern": "orders/*", "ops": ["delete"]},
    "other": {"key_pattern": "orders/*", "scope": "other"},
}
EVENT_IDS = [uuid.UUID(int=i + 1) for i in range(3)]

MUTATIONS = st.builds(
    dict,
    scope=st.sampled_from(["acme", "acme", "other"]),
    key=st.sampled_from(["orders/1", "orders/2", "orders/10", "misc/1"]),
    op=st.sampled_from([Op.PUT, Op.PUT, Op.DELETE]),
    value=st.none() | st.builds(dict, n=st.integers(0, 3)),
    old=st.none() | st.builds(dict, n=st.integers(0, 3)),
    event=st.none() | st.sampled_from(range(len(EVENT_IDS))),
)


@dataclass
class Case:
    before: list[dict[str, Any]]
    batch: list[dict[str, Any]]
    enabled: list[str]
    max_fanout: int
    cap: int | None
    traceparent: str | None


CASES = st.builds(
    Case,
    before=st.lists(MUTATIONS, max_size=4),
    batch=st.lists(MUTATIONS, min_size=1, max_size=10),
    enabled=st.lists(st.sampled_from(sorted(TRIGGERS)), unique=True),
    max_fanout=st.integers(1, 8),
    cap=st.none() | st.integers(1, 30),
    traceparent=st.none() | st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
)


def _revision_0016() -> Any:
    path = Path(__file__).parents[2] / "migrations" / "versions" / "0016_bulk_emit_speed.py"
    spec = importlib.util.spec_from_file_location("dispatcher_migration_0016_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def prepared(conn: asyncpg.Connection) -> asyncpg.Connection:
    """The triggers, and 0015's emit_many beside the current one as ``emit_many_0015``."""
    for name, extra in TRIGGERS.items():
        params: dict[str, Any] = {
            "scope": "acme",
            "name": name,
            "namespace": "orders",
            "target": name,
            "registered_by": "user:1",
        }
        params.update(extra)
        await REGISTRY.register(conn, **params)
    old = _revision_0016()._emit_many_0015("dispatcher")
    renamed = old.replace('"dispatcher".emit_many(', '"dispatcher".emit_many_0015(', 1)
    assert renamed != old
    await conn.execute(renamed)
    return conn


def _mutations(specs: list[dict[str, Any]]) -> list[Mutation]:
    return [
        Mutation(
            s["scope"],
            "orders",
            s["key"],
            s["op"],
            s["value"],
            old=s["old"],
            **({} if s["event"] is None else {"event_id": EVENT_IDS[s["event"]]}),
        )
        for s in specs
    ]


async def _call(
    conn: asyncpg.Connection, function: str, args: tuple[object, ...]
) -> tuple[Any, ...]:
    try:
        row = await conn.fetchrow(
            f"SELECT * FROM dispatcher.{function}($1::uuid[], $2::text[], $3::text[], "
            "$4::text[], $5::text[], $6::jsonb[], $7::int[], $8::uuid[], $9::int, $10::bool, "
            "$11::jsonb[], $12::text)",
            *args,
        )
    except asyncpg.PostgresError as exc:
        return ("error", exc.sqlstate, str(exc), exc.detail)
    assert row is not None
    return ("ok", *row.values())


def _shared_events(args: tuple[Any, ...]) -> dict[uuid.UUID, list[tuple[str, str]]]:
    """The event ids the call gives to mutations of more than one key, with those keys
    (scope, key)."""
    keys: dict[uuid.UUID, set[tuple[str, str]]] = {}
    for event_id, scope, key in zip(args[0], args[1], args[3], strict=True):
        keys.setdefault(event_id, set()).add((scope, key))
    return {e: sorted(k) for e, k in keys.items() if len(k) > 1}


def _latest(row: tuple[Any, ...], shared: dict[uuid.UUID, list[tuple[str, str]]]) -> str:
    """A latest-state row, for comparison. When the call gave its event id to mutations of
    several keys, which of them gets the trigger's row (the others' rows conflict on
    ``(event_id, trigger_id)`` and are dropped) is unspecified: 0015's latest-state insert
    has no ORDER BY, and two runs of 0015 itself on one state differ. Such a row is compared
    by its event, its trigger and its key being one of those mutations' (a row of another
    key, such as one left by an earlier call, is compared whole)."""
    event_id, trigger_id, scope, key = row[0], row[1], row[4], row[12]
    if (scope, key) not in shared.get(event_id, ()):
        return repr(row)
    return repr((event_id, trigger_id, "one of", shared[event_id]))


async def _state(
    conn: asyncpg.Connection,
    result: tuple[Any, ...],
    shared: dict[uuid.UUID, list[tuple[str, str]]],
) -> tuple[Any, ...]:
    """What a call left and returned. Rows are compared in id order, except the rows the
    latest-state statement (0015's, unchanged) inserts: it allocates their ids in the order
    of its join, which may differ between two plans of one function; those are compared as
    a set, and so are their places among the returned ids (and, for an event id the call
    gives to several keys, see ``_latest``)."""
    rows = await conn.fetch(
        """SELECT o.id, o.event_id, o.trigger_id, o.payload, o.depth, o.scope, o.trigger_name,
               o.target, o.registered_by, o.retry_kind, o.max_attempts, o.timeout, o.park_on,
               o.order_key, o.key_seq, o.blocks_key, o.due_at = 'infinity' AS waiting,
               o.attempts, o.traceparent, t.delivery = 'latest' AS latest
           FROM dispatcher.outbox o JOIN dispatcher.triggers t ON t.id = o.trigger_id
           ORDER BY o.id"""
    )
    content = {r["id"]: tuple(r.values())[1:-1] for r in rows}
    latest = {r["id"] for r in rows if r["latest"]}
    if result[0] == "ok":
        # outbox_ids, event_ids and trigger_ids (the fifth to seventh values): the rows.
        ids, event_ids, trigger_ids = result[4], result[5], result[6]
        assert [content[i][:2] for i in ids] == list(zip(event_ids, trigger_ids, strict=True))
        result = (
            *result[:4],
            [content[i] for i in ids if i not in latest],
            sorted(_latest(content[i], shared) for i in ids if i in latest),
        )
    versions = await conn.fetch(
        "SELECT scope, namespace, key, version FROM dispatcher.key_versions ORDER BY 1, 2, 3"
    )
    caps = await conn.fetch(
        "SELECT scope, max_pending, pending FROM dispatcher.backlog_caps ORDER BY scope"
    )
    return (
        result,
        [content[r["id"]] for r in rows if not r["latest"]],
        sorted(_latest(content[r["id"]], shared) for r in rows if r["latest"]),
        [tuple(r.values()) for r in versions],
        [tuple(r.values()) for r in caps],
    )


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=CASES)
async def test_emit_many_writes_what_0015_wrote(prepared: asyncpg.Connection, case: Case) -> None:
    conn = prepared
    emitter = Emitter(max_fanout=case.max_fanout, notify_interval=0)
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute(
            "UPDATE dispatcher.triggers SET enabled = (name = ANY ($1::text[]))", case.enabled
        )
        if case.cap is not None:
            await FlowControl().set_backlog_cap(conn, "acme", case.cap, recount_interval=1e-6)
        if case.before:
            before = emitter._many(_mutations(case.before))
            assert before is not None
            await conn.execute("SAVEPOINT before")
            if (await _call(conn, "emit_many", before[1]))[0] == "error":
                await conn.execute("ROLLBACK TO SAVEPOINT before")
        call = emitter._many(_mutations(case.batch))
        assert call is not None
        args = (*call[1][:-1], case.traceparent)
        shared = _shared_events(args)
        await conn.execute("SAVEPOINT compare")
        states = []
        for function in ("emit_many", "emit_many_0015"):
            result = await _call(conn, function, args)
            if result[0] == "error":  # the transaction is aborted: back to before the call
                await conn.execute("ROLLBACK TO SAVEPOINT compare")
            states.append(await _state(conn, result, shared))
            await conn.execute("ROLLBACK TO SAVEPOINT compare")
        assert states[0] == states[1]
    finally:
        await tr.rollback()


async def test_migration_round_trip_keeps_grants_and_comments(empty_dsn: str) -> None:
    """0016 up (emit_many's body replaced; signature, grants and comment kept), down (0015's
    function back exactly) and up again."""
    role = f"bulk_producer_{uuid.uuid4().hex[:8]}"
    await migrate(empty_dsn, revision="0015")
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION dispatcher.emit_many TO {role}")
        at_0015 = {f[0]: f for f in await functions(conn)}
        await migrate(empty_dsn, revision="0016")
        upgraded = {f[0]: f for f in await functions(conn)}
        assert upgraded.keys() == at_0015.keys()
        for signature, before in at_0015.items():
            after = upgraded[signature]
            if signature.startswith("dispatcher.emit_many("):
                assert after[1] != before[1]  # the new body
                assert after[2:] == before[2:]  # the same grants and comment
                assert role in after[2]
            else:
                assert after == before
        await downgrade(empty_dsn, "0015")
        assert {f[0]: f for f in await functions(conn)} == at_0015
        await migrate(empty_dsn, revision="0016")
        assert {f[0]: f for f in await functions(conn)} == upgraded
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
