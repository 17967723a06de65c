"""Health by progress, against a real dispatcher, real Postgres and real HTTP requests:
``/readyz`` turns unready when claims stop while rows are due (a claim blocked on a lock, a
drained dispatcher) and ready again when they resume; ``/healthz`` answers while the process
lives; ``dispatcher status`` gives the tables' verdict."""

from __future__ import annotations

import urllib.error
import urllib.request

import anyio
import anyio.to_thread
import asyncpg
import pytest
from cli_run import ok, ok_json
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import Dispatcher, DispatcherConfig, Mutation, Op, TriggerRegistry, emit
from dispatcher.flow import FlowControl
from dispatcher.metrics import MetricsServer, PrometheusRecorder, instrument, start_metrics_server
from dispatcher.testing import RecordingHandlers, instant_retries

WINDOW = 0.5


def ready_gauge(text: str) -> float:
    [sample] = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dispatcher_ready"
    ]
    return sample.value


async def probe(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    return await anyio.to_thread.run_sync(get)


async def until_status(url: str, code: int, time_limit: float = 20.0) -> str:
    """Poll ``url`` until it answers ``code``; its body. (A probe polls: so does this.)"""
    with anyio.fail_after(time_limit):
        while True:
            status, body = await probe(url)
            if status == code:
                return body
            await anyio.sleep(0.05)


async def add_trigger(conn: asyncpg.Connection, target: str = "ok") -> int:
    trigger = await TriggerRegistry().register(
        conn,
        scope="acme",
        name=target,
        namespace="users",
        key_pattern="users/*",
        target=target,
        registered_by="user:1",
        retry=instant_retries(2),
    )
    return trigger.id


async def put(conn: asyncpg.Connection, key: str) -> None:
    await emit(conn, Mutation("acme", "users", key, Op.PUT, {"k": key}), autocommit=True)


def observed(dsn: str, handlers: RecordingHandlers) -> tuple[Dispatcher, MetricsServer]:
    config = DispatcherConfig(poll_interval=0.05, backlog_interval=0.1)
    d = Dispatcher(dsn, handlers, config=config)
    recorder = PrometheusRecorder(CollectorRegistry(), ready_window=WINDOW)
    instrument(d, recorder=recorder)
    return d, start_metrics_server(0, registry=recorder.registry)


async def claim_waits_on_a_lock(conn: asyncpg.Connection) -> None:
    """Until the dispatcher's claim statement waits for a lock (pg_stat_activity)."""
    with anyio.fail_after(20):
        while True:
            waiting = await conn.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = 'dispatcher'
                       AND wait_event_type = 'Lock'"""
            )
            if waiting:
                return
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_readyz_turns_unready_while_claims_block_and_ready_when_they_resume(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.succeed("ok")
    await add_trigger(conn)
    d, server = observed(dsn, handlers)
    readyz = f"{server.base_url}/readyz"
    locker = await asyncpg.connect(dsn)
    try:
        assert (await probe(readyz))[0] == 503  # not running yet: no claim
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(d.run)
                assert (await until_status(readyz, 200)).startswith("ready: claimed ")
                assert await probe(f"{server.base_url}/healthz") == (200, "ok\n")
                # Rows that are due while the claim statement cannot run: the claim waits
                # for a lock another session holds (as it would behind a stuck migration).
                d.drain()
                await put(conn, "users/1")
                await put(conn, "users/2")
                tx = locker.transaction()
                await tx.start()
                await locker.execute("LOCK TABLE dispatcher.outbox IN EXCLUSIVE MODE")
                d.resume()
                await claim_waits_on_a_lock(conn)
                body = await until_status(readyz, 503)
                assert "2 row(s) due" in body, body
                assert "last successful claim" in body, body
                assert ready_gauge((await probe(server.url))[1]) == 0
                assert handlers.calls == []
                await tx.rollback()  # the claim goes through
                await handlers.wait_for_calls(2, time_limit=20)
                await until_status(readyz, 200)
                assert ready_gauge((await probe(server.url))[1]) == 1
                d.stop()
        assert (await probe(readyz))[0] == 503  # stopped
    finally:
        await locker.close()
        server.close()


@pytest.mark.anyio
async def test_a_drained_dispatcher_with_due_rows_is_unready_until_resumed(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.succeed("ok")
    await add_trigger(conn)
    d, server = observed(dsn, handlers)
    readyz = f"{server.base_url}/readyz"
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(d.run)
                await until_status(readyz, 200)
                d.drain()
                await put(conn, "users/1")
                body = await until_status(readyz, 503)
                assert "1 row(s) due" in body, body
                assert "phase draining" in body, body
                d.resume()
                await handlers.wait_for_calls(1, time_limit=20)
                await until_status(readyz, 200)
                status, text = await probe(f"{server.base_url}/nope")
                assert status == 404, text
                d.stop()
    finally:
        server.close()


@pytest.mark.anyio
async def test_status_gives_the_tables_verdict(dsn: str, conn: asyncpg.Connection) -> None:
    trigger_id = await add_trigger(conn)
    empty = await ok_json("status", "--dsn", dsn)
    assert empty["progress"] == {"ready": True, "reason": "no claimable row is due"}
    await put(conn, "users/1")  # no dispatcher runs: nobody claims it
    stalled = await ok_json("status", "--dsn", dsn, "--ready-window", "0.001")
    assert stalled["progress"]["ready"] is False
    assert "1 claimable row(s) due" in stalled["progress"]["reason"]
    assert "no dispatcher claimed them" in stalled["progress"]["reason"]
    text = (await ok("status", "--dsn", dsn, "--ready-window", "0.001")).stdout
    assert "progress: NOT READY (1 claimable row(s) due" in text, text
    within = await ok_json("status", "--dsn", dsn, "--ready-window", "3600")
    assert within["progress"]["ready"] is True
    # A paused trigger's rows wait for an operator, not for a dispatcher.
    await FlowControl().pause(conn, trigger_id=trigger_id)
    paused = await ok_json("status", "--dsn", dsn, "--ready-window", "0.001")
    assert paused["progress"] == {"ready": True, "reason": "no claimable row is due"}
