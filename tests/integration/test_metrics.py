"""Prometheus metrics from real dispatcher runs against real Postgres: the named series, their
values after a success, a retry and a dead letter, the backlog sample, the HTTP endpoint, and
``dispatcher run --metrics-port``."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import anyio
import anyio.to_thread
import asyncpg
import pytest
from cli_run import REPO, process_env, run_process
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    HandlerContext,
    Mutation,
    Op,
    PermanentError,
    Stats,
    TriggerRegistry,
    emit,
)
from dispatcher.core.errors import DispatcherError
from dispatcher.metrics import (
    EXPORTED_STATS,
    OUTCOMES,
    PrometheusRecorder,
    instrument,
    start_metrics_server,
)
from dispatcher.testing import RecordingHandlers, instant_retries

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} missing from {sorted({n for n, _ in samples})}"
    return samples[key]


async def fetch(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body.decode()

    return await anyio.to_thread.run_sync(get)


async def add_trigger(conn: asyncpg.Connection, name: str, target: str, pattern: str) -> int:
    trigger = await TriggerRegistry().register(
        conn,
        scope="acme",
        name=name,
        namespace="users",
        key_pattern=pattern,
        target=target,
        registered_by="user:1",
        retry=instant_retries(2),
    )
    return trigger.id


async def put(conn: asyncpg.Connection, key: str) -> None:
    await emit(conn, Mutation("acme", "users", key, Op.PUT, {"k": key}), autocommit=True)


def test_every_stats_counter_is_exported() -> None:
    assert {f.name for f in dataclasses.fields(Stats)} == EXPORTED_STATS


def test_import_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "dispatcher.metrics")
    with pytest.raises(ImportError, match=r"pip install 'dispatcher\[metrics\]'"):
        importlib.import_module("dispatcher.metrics")


def test_labels_stay_in_their_closed_sets() -> None:
    registry = CollectorRegistry()
    d = Dispatcher("postgresql://never-connected", RecordingHandlers())
    recorder = instrument(d, registry)
    recorder.execution(0.01, "users/42")
    recorder.execution(0.01, "timeout")
    d.stats.dead_letters_by_reason["acme:secret-key"] += 1
    d.stats.dead_letters_by_reason["expired"] += 2
    text = generate_latest(registry).decode()
    assert "users/42" not in text
    assert "secret-key" not in text
    samples = parse(text)
    assert value(samples, "dispatcher_executions_total", outcome="other") == 1
    assert value(samples, "dispatcher_executions_total", outcome="timeout") == 1
    assert value(samples, "dispatcher_dead_letters_total", reason="other") == 1
    assert value(samples, "dispatcher_dead_letters_total", reason="expired") == 2
    assert value(samples, "dispatcher_dead_letters_total", reason="timeout") == 0
    assert value(samples, "dispatcher_phase", phase="stopped") == 1
    outcomes = {
        dict(labels)["outcome"]
        for name, labels in samples
        if name == "dispatcher_execution_duration_seconds_count"
    }
    assert outcomes == {*OUTCOMES, "other"}


@pytest.mark.anyio
async def test_a_run_with_a_success_a_retry_and_a_dead_letter(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.succeed("ok")
    handlers.fail("flaky", "first try fails", times=1)
    handlers.fail("broken", PermanentError("never works"))
    for name in ("ok", "flaky", "broken"):
        await add_trigger(conn, name, name, "users/*")
    await put(conn, "users/1")

    registry = CollectorRegistry()
    config = DispatcherConfig(poll_interval=0.05, concurrency=10)
    d = Dispatcher(dsn, handlers, config=config)
    recorder = instrument(d, registry)
    assert d.recorder is recorder
    stats = await d.run_until_idle(time_limit=30, include_scheduled=True)
    assert (stats.succeeded, stats.retried, stats.dead_lettered) == (2, 1, 1)

    s = scrape(registry)
    assert value(s, "dispatcher_executions_total", outcome="success") == 2
    assert value(s, "dispatcher_executions_total", outcome="handler_error") == 1
    assert value(s, "dispatcher_executions_total", outcome="permanent") == 1
    assert value(s, "dispatcher_executions_total", outcome="timeout") == 0
    assert value(s, "dispatcher_execution_duration_seconds_count", outcome="success") == 2
    assert value(s, "dispatcher_execution_duration_seconds_sum", outcome="success") > 0
    assert value(s, "dispatcher_executions_started_total") == 4
    assert value(s, "dispatcher_completed_total") == 2
    assert value(s, "dispatcher_retries_total") == 1
    assert value(s, "dispatcher_dead_letters_total", reason="permanent") == 1
    assert value(s, "dispatcher_dead_letters_total", reason="handler_error") == 0
    assert value(s, "dispatcher_rescheduled_total") == 0
    assert value(s, "dispatcher_depth_exceeded_total") == 0
    assert value(s, "dispatcher_stale_results_total") == 0
    assert value(s, "dispatcher_db_errors_total") == 0
    assert value(s, "dispatcher_dead_letter_handler_results_total", resolution="handled") == 0
    claims = value(s, "dispatcher_claims_total")
    assert claims == stats.claims >= 2
    assert value(s, "dispatcher_claim_duration_seconds_count") == claims
    assert value(s, "dispatcher_claimed_rows_total") == 4
    assert value(s, "dispatcher_claim_batch_size_sum") == 4
    assert value(s, "dispatcher_claim_batch_size_count") == claims
    assert value(s, "dispatcher_gate_capacity") == 10
    assert value(s, "dispatcher_gate_free") == 10
    assert value(s, "dispatcher_in_flight") == 0
    # The same gauges under the names with their unit (the old ones are deprecated).
    assert value(s, "dispatcher_gate_capacity_permits") == 10
    assert value(s, "dispatcher_gate_free_permits") == 10
    assert value(s, "dispatcher_in_flight_executions") == 0
    # Off unless asked for: no per-trigger series.
    assert not [n for n, _ in s if n.startswith("dispatcher_trigger_")]
    assert value(s, "dispatcher_consecutive_db_failures") == 0
    assert value(s, "dispatcher_phase", phase="stopped") == 1
    assert value(s, "dispatcher_phase", phase="idle") == 0
    assert value(s, "dispatcher_last_claim_timestamp_seconds") > 0
    # The backlog is sampled as the dispatcher starts, before it claims anything.
    assert value(s, "dispatcher_backlog_sample_timestamp_seconds") > 0
    assert 0 <= value(s, "dispatcher_backlog_due_rows") <= 3


@pytest.mark.anyio
async def test_per_trigger_series_name_the_failing_trigger_up_to_the_cap(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    handlers.fail("charge", "card service down")
    handlers.succeed("mail")
    await add_trigger(conn, "charge", "charge", "users/1")
    await add_trigger(conn, "mail", "mail", "users/2")
    registry = CollectorRegistry()
    # One name gets a label: the first seen. Every later one is "other".
    recorder = PrometheusRecorder(registry, per_trigger=1)
    config = DispatcherConfig(poll_interval=0.05)
    await put(conn, "users/1")
    first = Dispatcher(dsn, handlers, config=config)
    instrument(first, recorder=recorder)
    await first.run_until_idle(time_limit=30, include_scheduled=True)
    await put(conn, "users/2")
    second = Dispatcher(dsn, handlers, config=config)
    instrument(second, recorder=recorder)
    await second.run_until_idle(time_limit=30, include_scheduled=True)

    text = generate_latest(registry).decode()
    assert 'trigger="mail"' not in text
    s = parse(text)
    executions = "dispatcher_trigger_executions_total"
    assert value(s, executions, trigger="charge", outcome="handler_error") == 2
    assert value(s, executions, trigger="charge", outcome="success") == 0
    assert value(s, "dispatcher_trigger_dead_letters_total", trigger="charge") == 1
    assert value(s, executions, trigger="other", outcome="success") == 1
    assert value(s, "dispatcher_trigger_dead_letters_total", trigger="other") == 0
    assert {dict(labels).get("trigger") for name, labels in s if name == executions} == {
        "charge",
        "other",
    }
    # Summed over triggers, the same as the unlabelled families.
    assert value(s, "dispatcher_dead_letters_total", reason="handler_error") == 1
    assert value(s, "dispatcher_executions_total", outcome="handler_error") == 2


def test_build_info_names_the_version_and_python() -> None:
    registry = CollectorRegistry()
    PrometheusRecorder(registry)
    [info] = [
        labels
        for (name, labels), v in scrape(registry).items()
        if name == "dispatcher_build_info" and v == 1
    ]
    assert dict(info) == {
        "version": importlib.metadata.version("dispatcher"),
        "python": platform.python_version(),
    }


def test_recorder_refuses_a_bad_cap_or_window() -> None:
    with pytest.raises(ValueError, match="per_trigger"):
        PrometheusRecorder(CollectorRegistry(), per_trigger=-1)
    with pytest.raises(DispatcherError, match="ready_window"):
        PrometheusRecorder(CollectorRegistry(), ready_window=0)


class SamplingRecorder(PrometheusRecorder):
    """Tells the test when the dispatcher's backlog sampler reported."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.samples: list[tuple[int, float]] = []
        self.sampled = anyio.Event()

    def backlog(self, due: int, oldest_due_seconds: float) -> None:
        super().backlog(due, oldest_due_seconds)
        self.samples.append((due, oldest_due_seconds))
        self.sampled.set()
        self.sampled = anyio.Event()


@pytest.mark.anyio
async def test_backlog_gauges_show_rows_waiting_behind_a_full_gate(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    started = anyio.Event()
    release = anyio.Event()

    @handlers.handler("hold")
    async def hold(ctx: HandlerContext) -> None:
        started.set()
        await release.wait()

    await add_trigger(conn, "hold", "hold", "users/*")
    for i in range(3):
        await put(conn, f"users/{i}")
    registry = CollectorRegistry()
    recorder = SamplingRecorder(registry)
    # One permit: one row runs, two stay due until it finishes.
    config = DispatcherConfig(poll_interval=0.05, concurrency=1, backlog_interval=0.02)
    d = Dispatcher(dsn, handlers, config=config, recorder=recorder)
    recorder.watch(d)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            await started.wait()
            while not recorder.samples or recorder.samples[-1][0] != 2:
                await recorder.sampled.wait()
            s = scrape(registry)
            release.set()
            d.stop()
    assert value(s, "dispatcher_backlog_due_rows") == 2
    assert value(s, "dispatcher_backlog_oldest_due_seconds") > 0
    assert value(s, "dispatcher_in_flight") == 1
    assert value(s, "dispatcher_gate_free") == 0
    assert value(s, "dispatcher_phase", phase="executing") == 1


@pytest.mark.anyio
async def test_http_endpoint_serves_the_series_during_a_run(
    dsn: str, conn: asyncpg.Connection
) -> None:
    handlers = RecordingHandlers()
    started = anyio.Event()
    release = anyio.Event()

    @handlers.handler("hold")
    async def hold(ctx: HandlerContext) -> str:
        started.set()
        await release.wait()
        return "done"

    await add_trigger(conn, "hold", "hold", "users/*")
    await put(conn, "users/1")
    registry = CollectorRegistry()
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05, concurrency=1))
    instrument(d, registry)
    server = start_metrics_server(0, registry=registry)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(d.run)
                await started.wait()
                during = parse(await fetch(server.url))
                release.set()
                while d.stats.succeeded == 0:
                    await d.progressed()
                after = parse(await fetch(server.url))
                d.stop()
    finally:
        server.close()
    assert value(during, "dispatcher_in_flight") == 1
    assert value(during, "dispatcher_phase", phase="executing") == 1
    assert value(during, "dispatcher_executions_started_total") == 1
    assert value(during, "dispatcher_executions_total", outcome="success") == 0
    assert value(during, "dispatcher_claimed_rows_total") == 1
    assert value(after, "dispatcher_executions_total", outcome="success") == 1
    assert value(after, "dispatcher_completed_total") == 1
    assert value(after, "dispatcher_in_flight") == 0
    # Closed: the port no longer answers.
    with pytest.raises(urllib.error.URLError):
        await fetch(server.url)


async def ready_body(url: str) -> str:
    """Poll ``/readyz`` until it answers 200 (a probe polls too); its body."""
    with anyio.fail_after(20):
        while True:
            try:
                return await fetch(url)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code != 503:
                    raise
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_cli_run_serves_metrics_and_stops_on_sigterm(dsn: str) -> None:
    command = run_process(dsn, "--concurrency", "7", "--metrics-port", "0")
    with anyio.fail_after(60):
        async with await anyio.open_process(
            command, cwd=REPO, env=process_env(), stdout=subprocess.DEVNULL
        ) as process:
            assert process.stderr is not None
            err = b""
            # The endpoint comes up first; the dispatcher logs once it is connected.
            while b"dispatcher started" not in err:
                err += await process.stderr.receive()
            url = err.split(b"metrics: ", 1)[1].split(b"\n", 1)[0].decode().strip()
            assert url.startswith("http://127.0.0.1:")
            base = url.removesuffix("/metrics")
            assert await fetch(f"{base}/healthz") == "ok\n"
            ready = await ready_body(f"{base}/readyz")
            s = parse(await fetch(url))
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
    assert code == 0, err
    assert ready.startswith("ready: "), ready
    assert value(s, "dispatcher_ready") == 1
    assert value(s, "dispatcher_gate_capacity") == 7
    assert sum(v for (name, _), v in s.items() if name == "dispatcher_phase") == 1
    assert value(s, "dispatcher_phase", phase="stopped") == 0
    assert value(s, "dispatcher_db_errors_total") == 0
    with pytest.raises(urllib.error.URLError):
        await fetch(url)


@pytest.mark.anyio
async def test_cli_run_with_a_taken_metrics_port_fails_in_one_line(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                run_process(dsn, "--metrics-port", port),
                cwd=REPO,
                env=process_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: cannot serve metrics on 127.0.0.1:{port}")
