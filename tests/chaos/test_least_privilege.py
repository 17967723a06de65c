"""Scenario 11 — least privilege: ``docs/least_privilege.sql``.

The runtime role administers triggers and pauses and runs ``dispatcher run`` through
successes, dead letters and their handler, circuit breakers, handler KV writes (per-root
budgets) and an abandoned sync call;
the application role emits and writes KV; the read-only role reads the views. None of them
can change the schema, and none can write outside dispatcher's tables.
"""

from __future__ import annotations

import signal
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
    emit_many,
)
from tests.chaos.handlers import build_registry
from tests.chaos.harness import ROOT, Harness, expected_pairs, record, wait_until
from tests.chaos.ledger import Ledger

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
APP_FORBIDDEN = [
    "UPDATE dispatcher.outbox SET attempts = 0",
    "DELETE FROM dispatcher.outbox",
    "SELECT payload FROM dispatcher.outbox",
    "SELECT * FROM dispatcher.dead_letters",
    "INSERT INTO public.app_data VALUES (1)",
    "CREATE TABLE dispatcher.evil (n int)",
]
READONLY_FORBIDDEN = [
    "INSERT INTO dispatcher.kv (scope, namespace, key, value) VALUES ('a', 'b', 'c', '1')",
    "DELETE FROM dispatcher.dead_letters",
    "CREATE TABLE dispatcher.evil (n int)",
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
        kv = await KvStore().put(app, "acme", "orders", "o/kv", {"v": 1})
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
        assert await chaos.ledger_count("trigger_id = $1", loop.id) == 9  # depths 0..8

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
