"""Scenario 11 — least privilege: ``docs/least_privilege.sql``.

The runtime role administers triggers and pauses and runs ``dispatcher run`` through
successes, dead letters and their handler, circuit breakers, handler KV writes (per-root
budgets) and an abandoned sync call;
the application role emits and writes KV; the producer role only emits; the read-only role
reads the views. None of them can change the schema, and none can write outside dispatcher's
tables. Producers enqueue only through the emit functions: they can neither write an outbox
row of their own (choosing its target and principal) nor read one.
"""

from __future__ import annotations

import json
import signal
import uuid
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    InvokeTimeout,
    KvStore,
    Mutation,
    Op,
    RetryPolicy,
    emit,
    emit_many,
)
from dispatcher.core.models import JsonValue
from tests.chaos.handlers import build_registry
from tests.chaos.harness import ROOT, Harness, expected_pairs, record, wait_until
from tests.chaos.ledger import TABLE, Ledger

pytestmark = pytest.mark.anyio

SCRIPT = ROOT / "docs" / "least_privilege.sql"


def as_role(dsn: str, role: str) -> str:
    """The same URL with another user (the embedded server trusts local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


RUNTIME_FORBIDDEN = [
    "CREATE TABLE dispatcher.evil (n int)",
    "ALTER TABLE dispatcher.outbox ADD COLUMN evil int",
    "CREATE INDEX evil ON dispatcher.outbox (id)",
    "DROP TABLE dispatcher.kv",
    "TRUNCATE dispatcher.outbox",
    "CREATE FUNCTION dispatcher.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA evil",
    "CREATE TABLE public.evil (n int)",
    "INSERT INTO public.app_data VALUES (1)",
    "UPDATE public.chaos_ledger SET outcome = 'forged'",
    "DELETE FROM dispatcher.dispatcher_alembic_version",
]
# A row written by hand would run any target as any principal: only the emit functions may
# write the outbox.
FORGED_ROW = """
    INSERT INTO dispatcher.outbox (event_id, trigger_id, scope, trigger_name, target,
        registered_by, payload, retry_kind, retry_base_delay, retry_factor, retry_max_delay,
        retry_jitter, max_attempts, timeout)
    VALUES (gen_random_uuid(), 1, 'acme', 'work', 'anything', 'user:admin', '{}',
        'constant', 1, 1, 1, 0, 1, 1)"""
PRODUCER_FORBIDDEN = [
    FORGED_ROW,
    "INSERT INTO dispatcher.outbox (event_id, trigger_id) VALUES (gen_random_uuid(), 1)",
    "UPDATE dispatcher.outbox SET attempts = 0",
    "DELETE FROM dispatcher.outbox",
    "SELECT payload FROM dispatcher.outbox",
    "SELECT id FROM dispatcher.outbox",
    "SELECT * FROM dispatcher.triggers",
    "UPDATE dispatcher.triggers SET target = 'anything'",
    "SELECT * FROM dispatcher.dead_letters",
    "INSERT INTO public.app_data VALUES (1)",
    "CREATE TABLE dispatcher.evil (n int)",
    "CREATE FUNCTION dispatcher.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
]
APP_FORBIDDEN = PRODUCER_FORBIDDEN
# The producer role has no table privilege at all, the reference KV table included.
PRODUCER_ONLY_FORBIDDEN = [
    "SELECT * FROM dispatcher.kv",
    "INSERT INTO dispatcher.kv (scope, namespace, key, value) VALUES ('a', 'b', 'c', '1')",
]
READONLY_FORBIDDEN = [
    "INSERT INTO dispatcher.kv (scope, namespace, key, value) VALUES ('a', 'b', 'c', '1')",
    "DELETE FROM dispatcher.dead_letters",
    "CREATE TABLE dispatcher.evil (n int)",
    # EXECUTE on the emit functions is not PUBLIC's: only the emitting roles are granted it.
    "SELECT dispatcher.emit(gen_random_uuid(), 'acme', 'orders', 'o/ro', 'put', '1')",
]


async def _denied(conn: asyncpg.Connection, statements: list[str]) -> list[str]:
    """The statements that were NOT refused for lack of privilege."""
    allowed = []
    for sql in statements:
        try:
            await conn.execute(sql)
        except asyncpg.InsufficientPrivilegeError:
            continue
        allowed.append(sql)
    return allowed


async def test_the_runtime_role_works_and_cannot_change_the_schema(
    chaos: Harness, conn: asyncpg.Connection, dsn: str
) -> None:
    await conn.execute("CREATE TABLE public.app_data (n int)")
    try:
        await conn.execute(await anyio.Path(SCRIPT).read_text())
    except asyncpg.InsufficientPrivilegeError as exc:
        pytest.skip(f"the test database's user cannot create roles: {exc}")
    runtime_dsn = as_role(dsn, "dispatcher_runtime")
    runtime = await asyncpg.connect(runtime_dsn)
    app = await asyncpg.connect(as_role(dsn, "dispatcher_app"))
    readonly = await asyncpg.connect(as_role(dsn, "dispatcher_readonly"))
    try:
        # Trigger administration runs as the runtime role (like `dispatcher triggers`).
        work = await chaos.trigger("work", "work", namespace="orders", conn=runtime)
        failing = await chaos.trigger(
            "failing", "work", namespace="failing", retry=RetryPolicy(max_attempts=1), conn=runtime
        )
        await chaos.trigger(
            "on-dead", "dlh", namespace="failing", is_dead_letter_handler=True, conn=runtime
        )
        loop = await chaos.trigger("loop", "loop", namespace="loop", conn=runtime)
        sync = await chaos.trigger("sync", "work", namespace="sync", conn=runtime)
        # Flow control too (`dispatcher pause` / `resume`).
        flow = FlowControl()
        await flow.pause(runtime, scope="elsewhere", note="least-privilege test")
        assert await flow.resume(runtime, scope="elsewhere")

        # The application emits, in its own transaction, and writes KV.
        mutations = [
            *(Mutation("acme", "orders", f"o/{i}", Op.PUT, {"ms": [1, 5]}) for i in range(50)),
            *(
                Mutation("acme", "failing", f"f/{i}", Op.PUT, {"always_fail": True})
                for i in range(3)
            ),
            Mutation("acme", "loop", "loop/1", Op.PUT, {}),
        ]
        async with app.transaction():
            await emit_many(app, mutations)
        kv = await KvStore().put(app, "acme", "orders", "o/kv", {"v": 1}, autocommit=True)
        assert len(kv.enqueued) == 1

        # The worker runs as the runtime role: successes, dead letters (three failures open
        # the breaker), the dead-letter handler, handler KV writes (kv, root budgets).
        proc = chaos.spawn("chaos-least-privilege", dsn=runtime_dsn)
        await chaos.wait_ready(proc)
        # A sync call answered after its caller gave up: an abandoned_executions row.
        ledger = Ledger(dsn)
        d = Dispatcher(
            runtime_dsn,
            build_registry(ledger),
            config=DispatcherConfig(application_name="chaos-least-privilege-sync"),
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(d.run)
                with pytest.raises(InvokeTimeout):
                    await d.invoke(sync.id, {"ms": [300, 300]}, time_limit=0.05)

                async def abandoned() -> bool:
                    n: int = await chaos.fetchval(
                        "SELECT count(*) FROM dispatcher.abandoned_executions"
                    )
                    return n == 1

                await wait_until(abandoned, within=10, what="the abandoned sync call")
                d.stop()
        finally:
            await ledger.close()
        await chaos.wait_drained(within=60, watch=[proc])
        chaos.signal(proc, signal.SIGTERM)
        assert await chaos.wait_exit(proc, within=15) == 0
        assert "permission denied" not in proc.stderr()

        report = await chaos.check(expected_pairs([work, failing, loop], mutations))
        report.assert_ok(max_duplicates=0)
        dead = await chaos.fetch("SELECT resolution FROM dispatcher.dead_letters")
        assert [r["resolution"] for r in dead] == ["handled"] * 3
        breakers = await chaos.fetchval("SELECT count(*) FROM dispatcher.breakers")
        budgets = await chaos.fetchval("SELECT count(*) FROM dispatcher.root_budgets")
        assert breakers >= 1
        assert budgets >= 1
        # The loop ran once at each depth 0..8 and stopped at the limit. (Counted by depth: a
        # retry of one of them, when a loaded machine cuts a KV write, is not a tenth run.)
        depths = await chaos.fetchval(
            f"SELECT array_agg(DISTINCT depth ORDER BY depth) FROM {TABLE} "
            "WHERE trigger_id = $1 AND outcome = 'success'",
            loop.id,
        )
        assert depths == list(range(9))

        # Reading what operators read.
        await readonly.fetch("SELECT * FROM dispatcher.dead_letter_summary")
        await readonly.fetch("SELECT * FROM dispatcher.outbox_lag")

        allowed = {
            "dispatcher_runtime": await _denied(runtime, RUNTIME_FORBIDDEN),
            "dispatcher_app": await _denied(app, APP_FORBIDDEN),
            "dispatcher_readonly": await _denied(readonly, READONLY_FORBIDDEN),
        }
        record(
            "11-least-privilege",
            refused=len(RUNTIME_FORBIDDEN) + len(APP_FORBIDDEN) + len(READONLY_FORBIDDEN),
            allowed={k: v for k, v in allowed.items() if v},
            **report.summary(),
        )
        assert allowed == {k: [] for k in allowed}
    finally:
        for c in (runtime, app, readonly):
            await c.close()
    # Idempotent: a second run (as after the next migration) changes nothing and succeeds.
    await conn.execute(await anyio.Path(SCRIPT).read_text())


async def _run_script(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute(await anyio.Path(SCRIPT).read_text())
    except asyncpg.InsufficientPrivilegeError as exc:
        pytest.skip(f"the test database's user cannot create roles: {exc}")


RAW_EMIT = "SELECT * FROM dispatcher.emit($1, 'acme', 'orders', $2, 'put', $3)"
RAW_EMIT_MANY = """
    SELECT * FROM dispatcher.emit_many($1, ARRAY['acme', 'acme'], ARRAY['orders', 'orders'],
        $2, ARRAY['put', 'delete'], ARRAY['{"n": 1}', NULL]::jsonb[], ARRAY[0, 0])"""


def _order(key: str, value: JsonValue, event_id: uuid.UUID) -> Mutation:
    return Mutation("acme", "orders", key, Op.PUT, value, event_id=event_id)


@pytest.mark.parametrize("role", ["dispatcher_app", "dispatcher_producer"])
async def test_producers_emit_only_through_the_emit_functions(
    chaos: Harness, conn: asyncpg.Connection, dsn: str, role: str
) -> None:
    await conn.execute("CREATE TABLE public.app_data (n int)")
    await _run_script(conn)
    work = await chaos.trigger("work", "work", namespace="orders", registered_by="user:7")
    producer = await asyncpg.connect(as_role(dsn, role))
    try:
        # Rolled back, through the Python API and raw SQL alike: no row.
        rolled_back = [uuid.uuid4() for _ in range(3)]
        tx = producer.transaction()
        await tx.start()
        assert len(await emit(producer, _order("o/1", 1, rolled_back[0]))) == 1
        assert len(await emit_many(producer, [_order("o/2", 2, rolled_back[1])])) == 1
        raw = await producer.fetchrow(RAW_EMIT, rolled_back[2], "o/3", '{"n": 3}')
        assert raw is not None
        assert raw["matched"] == 1
        assert len(raw["outbox_ids"]) == 1
        await tx.rollback()
        leftover = await conn.fetchval(
            "SELECT count(*) FROM dispatcher.outbox WHERE event_id = ANY($1)", rolled_back
        )
        assert leftover == 0

        # Committed: one row each, whose target and principal are the trigger's.
        committed = [uuid.uuid4() for _ in range(5)]
        async with producer.transaction():
            await emit(producer, _order("o/4", {"n": 4}, committed[0]))
            composite = await producer.fetchval(
                "SELECT dispatcher.emit($1, 'acme', 'orders', 'o/5', 'put', '5')", committed[1]
            )
            assert composite[0] == 1  # (matched, outbox_ids, trigger_ids)
            await producer.fetchrow(RAW_EMIT, committed[2], "o/6", '{"n": 6}')
            bulk = await producer.fetchrow(RAW_EMIT_MANY, committed[3:5], ["o/7", "o/7"])
            assert bulk is not None
            assert bulk["over_ordinal"] is None
            assert list(bulk["event_ids"]) == committed[3:5]
        rows = await conn.fetch(
            "SELECT event_id, trigger_id, target, registered_by, payload FROM dispatcher.outbox"
            " WHERE event_id = ANY($1) ORDER BY id",
            committed,
        )
        assert [r["event_id"] for r in rows] == committed
        assert {(r["trigger_id"], r["target"], r["registered_by"]) for r in rows} == {
            (work.id, "work", "user:7")
        }
        payloads = [json.loads(r["payload"]) for r in rows]
        assert [(p["key"], p["op"], p["value"]) for p in payloads] == [
            ("o/4", "put", {"n": 4}),
            ("o/5", "put", 5),
            ("o/6", "put", {"n": 6}),
            ("o/7", "put", {"n": 1}),
            ("o/7", "delete", None),
        ]

        if role == "dispatcher_app":
            # KvStore writes the kv table and emits through the same function.
            write = await KvStore().put(
                producer, "acme", "orders", "o/kv", {"v": 1}, autocommit=True
            )
            assert [e.trigger_id for e in write.enqueued] == [work.id]
            committed.append(write.event_id)

        # Nothing else: no row of its own, no reading the outbox or the triggers.
        forbidden = PRODUCER_FORBIDDEN + (
            PRODUCER_ONLY_FORBIDDEN if role == "dispatcher_producer" else []
        )
        assert await _denied(producer, forbidden) == []
        assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == len(committed)
    finally:
        await producer.close()
