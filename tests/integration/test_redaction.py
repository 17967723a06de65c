"""Secrets never reach dead_letters, abandoned_executions or error histories."""

from __future__ import annotations

import json
from typing import Any

import anyio
import asyncpg
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    InvokeTimeout,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit,
)

pytestmark = pytest.mark.anyio

CANARIES = ["CANARY-pw-1", "CANARY-auth-2", "CANARY-key-3", "CANARY-list-4"]
PAYLOAD = {
    "user": "ann",
    "password": CANARIES[0],
    "headers": {"Authorization": f"Bearer {CANARIES[1]}"},
    "nested": [{"deeper": {"api_key": CANARIES[2]}}, {"api-key": [CANARIES[3]]}],
}
CONFIG = DispatcherConfig(
    poll_interval=0.05,
    breaker_threshold=0,
    redact_keys=("password", "authorization", "api_key"),
)


async def register(conn: asyncpg.Connection, name: str, target: str) -> int:
    t = await TriggerRegistry().register(
        conn,
        scope="acme",
        name=name,
        namespace="users",
        key_pattern=f"{name}/*",
        target=target,
        registered_by="user:1",
        retry=RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=2),
    )
    return t.id


async def dump(conn: asyncpg.Connection) -> str:
    rows: list[Any] = []
    for table in ("dead_letters", "abandoned_executions", "outbox"):
        rows += [dict(r) for r in await conn.fetch(f"SELECT * FROM dispatcher.{table}")]
    return json.dumps(rows, default=str)


async def test_canaries_never_reach_operator_tables(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("leaky")
    async def leaky(ctx: HandlerContext) -> None:
        value = ctx.event["value"]
        assert isinstance(value, dict)
        # Echo the secrets back in every way a careless handler might.
        raise RuntimeError(
            f"login failed for {value}; password={value['password']} "
            f"Authorization: Bearer {CANARIES[1]} raw {CANARIES[2]}"
        )

    @handlers.handler("slow_echo")
    async def slow_echo(ctx: HandlerContext) -> Any:
        await anyio.sleep(0.3)
        return {"echo": ctx.event["value"]}

    await register(conn, "leaky", "leaky")
    echo = await register(conn, "echo", "slow_echo")
    await emit(conn, Mutation("acme", "users", "leaky/1", Op.PUT, PAYLOAD))
    d = Dispatcher(dsn, handlers, config=CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with pytest.raises(InvokeTimeout):
            await d.invoke(echo, PAYLOAD, time_limit=0.05)
        with anyio.fail_after(20):
            while d.stats.dead_lettered < 1 or d.stats.abandoned < 1:
                await d.progressed()
        d.stop()
    text = await dump(conn)
    for canary in CANARIES:
        assert canary not in text
    [dead] = await conn.fetch("SELECT * FROM dispatcher.dead_letters")
    payload = json.loads(dead["payload"])
    assert payload["value"]["user"] == "ann"  # the rest of the payload is kept
    assert payload["value"]["password"] == "[REDACTED]"
    assert "[REDACTED]" in json.loads(dead["errors"])[-1]["message"]
    [abandoned] = await conn.fetch("SELECT * FROM dispatcher.abandoned_executions")
    echoed = json.loads(abandoned["result"])["echo"]
    assert (echoed["user"], echoed["password"]) == ("ann", "[REDACTED]")


async def test_redaction_can_be_turned_off(dsn: str, conn: asyncpg.Connection) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("leaky")
    async def leaky(ctx: HandlerContext) -> None:
        raise RuntimeError("password=plain-text-kept")

    await register(conn, "leaky", "leaky")
    await emit(conn, Mutation("acme", "users", "leaky/1", Op.PUT, {"password": "kept-too"}))
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0, redact_keys=())
    await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    text = await dump(conn)
    assert "plain-text-kept" in text
    assert "kept-too" in text
