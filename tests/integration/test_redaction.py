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
    Failure,
    FailureKind,
    HandlerContext,
    HandlerRegistry,
    InvokeTimeout,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit,
)
from dispatcher.core.outcomes import ExecutionResult
from dispatcher.core.sanitize import sanitize_text

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


FAST_RETRY = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=2)


async def register(
    conn: asyncpg.Connection,
    name: str,
    target: str,
    retry: RetryPolicy = FAST_RETRY,
) -> int:
    t = await TriggerRegistry().register(
        conn,
        scope="acme",
        name=name,
        namespace="users",
        key_pattern=f"{name}/*",
        target=target,
        registered_by="user:1",
        retry=retry,
    )
    return t.id


async def dump(conn: asyncpg.Connection, outbox: str = "*") -> str:
    rows: list[Any] = []
    for table, columns in (
        ("dead_letters", "*"),
        ("abandoned_executions", "*"),
        ("outbox", outbox),
    ):
        rows += [dict(r) for r in await conn.fetch(f"SELECT {columns} FROM dispatcher.{table}")]
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
    await emit(conn, Mutation("acme", "users", "leaky/1", Op.PUT, PAYLOAD), autocommit=True)
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
    await emit(
        conn,
        Mutation("acme", "users", "leaky/1", Op.PUT, {"password": "kept-too"}),
        autocommit=True,
    )
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0, redact_keys=())
    await Dispatcher(dsn, handlers, config=config).run_until_idle(include_scheduled=True)
    text = await dump(conn)
    assert "plain-text-kept" in text
    assert "kept-too" in text


# Under keys that hold a fragment of a default name (db_password, x-api-key, …), at any depth.
IN_PAYLOAD = ["CANARY-dbpw-5", "CANARY-token-6", "CANARY-xapikey-7", "CANARY-clientsecret-8"]
# In error text only, never in the payload: caught by the text patterns or not at all.
IN_TEXT = [f"CANARY-text-{i}" for i in range(1, 9)]
# Long enough that a cut through it leaves a recognisable piece on either side.
CUT = "CANARY-cut-" + "0123456789abcdef" * 2
FRAGMENT_PAYLOAD: dict[str, Any] = {
    "user": "ann",
    "db_password": IN_PAYLOAD[0],
    "auth": {"token": IN_PAYLOAD[1]},
    "headers": [{"x-api-key": IN_PAYLOAD[2]}],
    "apps": [{"oauth": {"client_secret": [IN_PAYLOAD[3]]}}],
    "dsn": f"postgresql://app:{IN_TEXT[0]}@db/app",
    "password": CUT,
}


def pieces(secret: str, size: int = 8) -> list[str]:
    """Every run of ``size`` characters of ``secret``: what a cut through it could leave."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


def at(position: int, secret: str, total: int) -> str:
    """Text of ``total`` characters with ``secret`` starting at ``position``."""
    return "x" * position + secret + "y" * (total - position - len(secret))


async def test_fragments_urls_and_cut_secrets_never_reach_operator_tables(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = HandlerRegistry()

    @handlers.handler("careless")
    async def careless(ctx: HandlerContext) -> None:
        raise RuntimeError(
            f"login failed for {ctx.event['value']}: "
            f"postgresql://app:{IN_TEXT[1]}@db/app, https://bot:{IN_TEXT[2]}@api.example/v1, "
            f"redis://:{IN_TEXT[3]}@cache:6379/0; X-Api-Key: {IN_TEXT[4]} "
            f'db_password={IN_TEXT[5]} {{"client_secret": "{IN_TEXT[6]}"}} '
            f"GITHUB_TOKEN='{IN_TEXT[7]}'"
        )

    @handlers.handler("long")
    async def long(ctx: HandlerContext) -> None:
        # "RuntimeError: " comes first. One copy of the password straddles where an 8 KiB
        # executor bound cut (the middle of its first 4 KiB), one where the dispatcher cuts
        # to 8 KiB: both must be redacted before either cut happens.
        first = at(2000, CUT, 4050)
        raise RuntimeError(first + at(10, CUT, 12_000))

    @handlers.handler("slow_fail")
    async def slow_fail(ctx: HandlerContext) -> None:
        await anyio.sleep(0.3)
        await careless(ctx)

    @handlers.handler("slow_echo")
    async def slow_echo(ctx: HandlerContext) -> Any:
        await anyio.sleep(0.3)
        return {"echo": ctx.event["value"], "dsn": f"redis://:{IN_TEXT[3]}@cache/0"}

    await register(conn, "careless", "careless")
    await register(conn, "long", "long", RetryPolicy(max_attempts=1))
    # Retried in an hour: its error stays in the outbox.
    await register(conn, "held", "careless", RetryPolicy(base_delay=3600, max_delay=3600))
    fail = await register(conn, "fail", "slow_fail")
    echo = await register(conn, "echo", "slow_echo")
    for name in ("careless", "long", "held"):
        await emit(
            conn, Mutation("acme", "users", f"{name}/1", Op.PUT, FRAGMENT_PAYLOAD), autocommit=True
        )
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05, breaker_threshold=0))
    assert d.config.redact_keys == DispatcherConfig().redact_keys  # the defaults
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        for trigger in (fail, echo):
            with pytest.raises(InvokeTimeout):
                await d.invoke(trigger, FRAGMENT_PAYLOAD, time_limit=0.05)
        with anyio.fail_after(20):
            while d.stats.dead_lettered < 2 or d.stats.abandoned < 2 or d.stats.retried < 2:
                await d.progressed()
        d.stop()
    # The outbox still holds the held row's event, as it must: only its errors count.
    text = await dump(conn, outbox="errors")
    for canary in [*IN_PAYLOAD, *IN_TEXT, *pieces(CUT)]:
        assert canary not in text, text[max(text.find(canary) - 300, 0) :][:400]
    # Redacted, not dropped: what an operator needs is still there.
    [held] = await conn.fetch("SELECT errors FROM dispatcher.outbox")
    message = json.loads(held["errors"])[-1]["message"]
    assert "postgresql://app:[REDACTED]@db/app" in message
    assert "https://bot:[REDACTED]@api.example/v1" in message
    assert "X-Api-Key: [REDACTED]" in message
    dead = {
        r["trigger_name"]: r
        for r in await conn.fetch(
            "SELECT trigger_name, payload, errors FROM dispatcher.dead_letters"
        )
    }
    payload = json.loads(dead["careless"]["payload"])["value"]
    assert payload["user"] == "ann"
    assert payload["headers"] == [{"x-api-key": "[REDACTED]"}]
    assert payload["dsn"] == "postgresql://app:[REDACTED]@db/app"
    [long_error] = json.loads(dead["long"]["errors"])
    assert long_error["message"].startswith("RuntimeError: " + "x" * 2000 + "[REDACTED]")
    assert "characters omitted" in long_error["message"]  # cut to 8 KiB, after redaction


def straddling(secret: str, limit: int, total: int = 1000) -> str:
    """Text of ``total`` characters that ``sanitize_text(text, limit)`` cuts through two
    copies of ``secret``: one loses its end to the cut, the other its start."""
    cut = sanitize_text("q" * total, limit)
    head, tail = cut.index("…"), len(cut) - cut.rindex("…") - 1
    first, second = head - len(secret) // 2, total - tail - len(secret) // 2
    middle = second - first - len(secret)
    return "x" * first + secret + "m" * middle + secret + "y" * (total - second - len(secret))


class CuttingExecutor:
    """A user-written executor that cuts its error text itself, as a careless one would."""

    async def execute(self, target: str, ctx: HandlerContext, time_limit: float) -> ExecutionResult:
        return Failure(FailureKind.PERMANENT, sanitize_text(straddling(CUT, 240), 240))


async def test_secrets_cut_before_the_dispatcher_sees_them_are_masked(
    dsn: str, conn: asyncpg.Connection
) -> None:
    cut = sanitize_text(straddling(CUT, 240), 240)
    # The cut went through both copies.
    assert CUT not in cut
    assert CUT[:16] in cut
    assert CUT[-16:] in cut
    await register(conn, "cut", "anything")
    await emit(conn, Mutation("acme", "users", "cut/1", Op.PUT, {"password": CUT}), autocommit=True)
    config = DispatcherConfig(poll_interval=0.05, breaker_threshold=0)
    await Dispatcher(dsn, CuttingExecutor(), config=config).run_until_idle()
    [dead] = await conn.fetch("SELECT errors FROM dispatcher.dead_letters")
    [error] = json.loads(dead["errors"])
    x, marker, y = error["message"].partition("[REDACTED]…[")
    assert x == "x" * len(x)  # the start of the first copy, masked
    assert "characters omitted]…[REDACTED]yyy" in marker + y  # the end of the second
    for piece in pieces(CUT, 4):
        assert piece not in error["message"]
