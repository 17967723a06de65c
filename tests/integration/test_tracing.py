"""OpenTelemetry tracing (issue 16, part 1), with the SDK's in-memory exporter: one trace
from the emitting span through every attempt, the dead letter and its handler; a replay and
a synchronous call in their callers' traces; nothing stored or recorded with tracing off."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from schema_history import downgrade, functions

from dispatcher import (
    Admin,
    DeadLetterFilter,
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    RetryPolicy,
    TriggerRegistry,
    emit,
    emit_many,
    tracing,
)
from dispatcher.migrate import migrate

pytestmark = pytest.mark.anyio

CONFIG = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)
TWO_ATTEMPTS = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=2)


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter, provider
    finally:
        tracing.disable()


async def trigger(conn: asyncpg.Connection, name: str, **kw: Any) -> int:
    params: dict[str, Any] = {
        "scope": "acme",
        "name": name,
        "namespace": "orders",
        "key_pattern": "orders/*",
        "target": name,
        "registered_by": "user:1",
        "retry": TWO_ATTEMPTS,
    }
    params.update(kw)
    return (await TriggerRegistry().register(conn, **params)).id


def handlers(provider: TracerProvider) -> HandlerRegistry:
    registry = HandlerRegistry()
    inner = provider.get_tracer("handler")

    @registry.handler("broken")
    async def broken(ctx: HandlerContext) -> None:
        with inner.start_as_current_span("call crm"):
            raise ConnectionError("crm.example.com refused the connection")

    @registry.handler("archive")
    async def archive(ctx: HandlerContext) -> None:
        with inner.start_as_current_span("write archive"):
            return

    @registry.handler("quote")
    async def quote(ctx: HandlerContext) -> dict[str, int]:
        return {"price": 3}

    return registry


def header(ctx: SpanContext) -> str:
    """The W3C traceparent of a span context, as the specification writes it."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted(
        (s for s in finished if s.name == name),
        key=lambda s: s.start_time or 0,
    )


async def test_one_trace_from_the_emit_through_retries_the_dead_letter_and_its_handler(
    dsn: str, conn: asyncpg.Connection, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    await trigger(conn, "broken")
    await trigger(conn, "archive", is_dead_letter_handler=True)
    app = provider.get_tracer("app")
    with app.start_as_current_span("checkout") as root:
        async with conn.transaction():
            await emit(conn, Mutation("acme", "orders", "orders/1", Op.PUT, {"total": 7}))
    stored = await conn.fetchval("SELECT traceparent FROM dispatcher.outbox")
    trace_id = root.get_span_context().trace_id
    assert stored == header(root.get_span_context())

    await Dispatcher(dsn, handlers(provider), config=CONFIG).run_until_idle(include_scheduled=True)
    finished = exporter.get_finished_spans()
    assert {s.context.trace_id for s in finished} == {trace_id}
    attempts = by_name(finished, "execute broken")
    assert [a.attributes["dispatcher.attempt"] for a in attempts if a.attributes] == [1, 2]
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == root.get_span_context().span_id
        assert attempt.kind is SpanKind.CONSUMER
        assert attempt.status.status_code is StatusCode.ERROR
        assert "crm.example.com refused" in (attempt.status.description or "")
        assert attempt.attributes is not None
        assert attempt.attributes["dispatcher.scope"] == "acme"
        assert attempt.attributes["dispatcher.outcome"] == "handler_error"
    assert [a.attributes["dispatcher.decision"] for a in attempts if a.attributes] == [
        "retry",
        "dead_letter",
    ]
    assert [e.name for e in attempts[1].events] == ["dispatcher.dead_lettered"]
    # The handler's own span nests under its execution's.
    calls = by_name(finished, "call crm")
    assert len(calls) == 2
    assert {c.parent.span_id for c in calls if c.parent} == {a.context.span_id for a in attempts}
    # The dead letter keeps the context, and its handler runs in the same trace.
    letter = await conn.fetchval("SELECT traceparent FROM dispatcher.dead_letters")
    assert letter == stored
    [handler] = by_name(finished, "execute archive")
    assert handler.parent is not None
    assert handler.parent.span_id == root.get_span_context().span_id
    assert handler.attributes is not None
    assert handler.attributes["dispatcher.outcome"] == "success"
    [write] = by_name(finished, "write archive")
    assert write.parent is not None
    assert write.parent.span_id == handler.context.span_id


async def test_a_replay_goes_on_in_the_same_trace(
    dsn: str, conn: asyncpg.Connection, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    await trigger(conn, "broken")
    with provider.get_tracer("app").start_as_current_span("checkout") as root:
        await emit(conn, Mutation("acme", "orders", "orders/1", Op.PUT, {}), autocommit=True)
    await Dispatcher(dsn, handlers(provider), config=CONFIG).run_until_idle(include_scheduled=True)
    exporter.clear()
    report = await Admin().replay(conn, DeadLetterFilter(scope="acme"))
    assert len(report.replayed) == 1
    await Dispatcher(dsn, handlers(provider), config=CONFIG).run_until_idle(include_scheduled=True)
    replayed = by_name(exporter.get_finished_spans(), "execute broken")
    assert [s.attributes["dispatcher.attempt"] for s in replayed if s.attributes] == [1, 2]
    assert {s.context.trace_id for s in replayed} == {root.get_span_context().trace_id}


async def test_a_synchronous_call_is_a_span_its_execution_continues(
    dsn: str, conn: asyncpg.Connection, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    tid = await trigger(conn, "quote")
    d = Dispatcher(dsn, handlers(provider), config=CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        with provider.get_tracer("app").start_as_current_span("request") as request:
            result = await d.invoke(tid, {"items": 2}, time_limit=10)
        d.stop()
    assert (result.status, result.result) == (200, {"price": 3})
    finished = exporter.get_finished_spans()
    [invoke] = by_name(finished, "invoke")
    [execute] = by_name(finished, "execute quote")
    assert invoke.parent is not None
    assert invoke.parent.span_id == request.get_span_context().span_id
    assert execute.parent is not None
    assert execute.parent.span_id == invoke.context.span_id
    assert execute.context.trace_id == request.get_span_context().trace_id


async def test_bulk_and_sql_emits_keep_the_context(
    conn: asyncpg.Connection, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    _, provider = spans
    await trigger(conn, "archive")
    with provider.get_tracer("app").start_as_current_span("import") as root:
        await emit_many(
            conn,
            [Mutation("acme", "orders", f"orders/{i}", Op.PUT, {}) for i in range(3)],
            autocommit=True,
        )
    ctx = root.get_span_context()
    expected = header(ctx)
    assert await conn.fetch("SELECT DISTINCT traceparent FROM dispatcher.outbox") == [(expected,)]
    # Any client can pass one to the function by name.
    await conn.execute(
        "SELECT dispatcher.emit(gen_random_uuid(), 'acme', 'orders', 'orders/9', 'put', "
        "'{}', traceparent => '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01')"
    )
    assert await conn.fetchval(
        "SELECT traceparent FROM dispatcher.outbox WHERE payload ->> 'key' = 'orders/9'"
    ) == ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


async def test_a_malformed_context_starts_a_new_trace(
    dsn: str, conn: asyncpg.Connection, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    await trigger(conn, "archive")
    await emit(conn, Mutation("acme", "orders", "orders/1", Op.PUT, {}), autocommit=True)
    await conn.execute("UPDATE dispatcher.outbox SET traceparent = 'not-a-traceparent'")
    stats = await Dispatcher(dsn, handlers(provider), config=CONFIG).run_until_idle()
    assert stats.succeeded == 1
    [span] = by_name(exporter.get_finished_spans(), "execute archive")
    assert span.parent is None


async def test_nothing_is_stored_or_recorded_with_tracing_off(
    dsn: str, conn: asyncpg.Connection
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert not tracing.enabled()
    await trigger(conn, "archive")
    with provider.get_tracer("app").start_as_current_span("checkout"):
        await emit(conn, Mutation("acme", "orders", "orders/1", Op.PUT, {}), autocommit=True)
    assert await conn.fetchval("SELECT traceparent FROM dispatcher.outbox") is None
    stats = await Dispatcher(dsn, handlers(provider), config=CONFIG).run_until_idle()
    assert stats.succeeded == 1
    # Only the application's own spans (the handler's included); none of ours.
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["checkout", "write archive"]


def test_without_the_extra_tracing_stays_off_and_enable_names_it() -> None:
    """A subprocess where OpenTelemetry cannot be imported: the library imports and emits
    nothing traced; enable() says which extra to install."""
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed
import dispatcher
from dispatcher import tracing
assert tracing.current_traceparent() is None
try:
    tracing.enable()
except dispatcher.DispatcherError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'dispatcher[otel]'" in done.stdout


async def test_migration_round_trip_keeps_grants_and_comments(empty_dsn: str) -> None:
    """0015 up (the emit functions gain traceparent; grants and comments kept), down
    (0014's functions back exactly) and up again."""
    role = f"traced_producer_{uuid.uuid4().hex[:8]}"
    await migrate(empty_dsn, revision="0014")
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        await conn.execute(f"GRANT EXECUTE ON FUNCTION dispatcher.emit_many TO {role}")
        at_0014 = {f[0].split("(")[0]: f for f in await functions(conn)}
        await migrate(empty_dsn, revision="0015")
        upgraded = await functions(conn)
        by_name = {f[0].split("(")[0]: f for f in upgraded}
        for name in ("dispatcher.emit", "dispatcher.emit_many"):
            assert by_name[name][0].endswith(",text)"), by_name[name][0]
            assert by_name[name][2] == at_0014[name][2]  # the same grants
            assert by_name[name][3].startswith(at_0014[name][3])  # the comment, and more
            assert "traceparent" in by_name[name][3]
        assert role in by_name["dispatcher.emit_many"][2]
        await downgrade(empty_dsn, "0014")
        assert {f[0].split("(")[0]: f for f in await functions(conn)} == at_0014
        await migrate(empty_dsn, revision="0015")
        assert await functions(conn) == upgraded
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()
