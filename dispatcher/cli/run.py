"""``dispatcher run``: a dispatcher until SIGINT or SIGTERM, optionally serving Prometheus
metrics and the ``/healthz`` and ``/readyz`` probes, logging text or JSON lines that keep
their fields; and how the process leaves past work it had to abandon.

The runtime and the metrics extra are imported when the command runs, not when the CLI loads.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, cast

import anyio
import click

from dispatcher.cli import logs
from dispatcher.cli.call import run_async
from dispatcher.cli.options import EventLoop, connection_options, loop_option, require_dsn
from dispatcher.core.errors import DispatcherError
from dispatcher.core.health import DEFAULT_READY_WINDOW
from dispatcher.log_format import LOG_FORMATS, LogFormat

if TYPE_CHECKING:
    from dispatcher.metrics import MetricsServer, PrometheusRecorder
    from dispatcher.runtime.dispatcher import Dispatcher


def _redact_keys(
    _ctx: click.Context, _param: click.Parameter, extra: tuple[str, ...]
) -> tuple[str, ...]:
    """The default name fragments plus those given to ``--redact-key``; one the redactor
    refuses is a usage error."""
    from dispatcher.core.redact import DEFAULT_REDACT_KEYS, Redactor

    keys = tuple(sorted(DEFAULT_REDACT_KEYS.union(extra)))
    try:
        Redactor(frozenset(keys))
    except DispatcherError as exc:
        raise click.BadParameter(str(exc)) from None
    return keys


@click.command()
@connection_options
@click.option(
    "--handlers",
    "handlers_spec",
    required=True,
    help="module:attribute of a HandlerRegistry (or any Executor), e.g. myapp.jobs:handlers.",
)
@click.option("--concurrency", default=400, show_default=True, help="Execution gate size.")
@click.option("--batch-size", default=200, show_default=True, help="Most rows per claim.")
@click.option("--poll-interval", default=0.1, show_default=True, help="Seconds between polls.")
@click.option("--grace-period", default=10.0, show_default=True, help="Seconds to finish work.")
@click.option("--max-depth", default=8, show_default=True, help="Trigger depth limit.")
@click.option("--no-listen", is_flag=True, help="Poll only; do not LISTEN for wake-ups.")
@click.option(
    "--breaker-threshold",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Consecutive failures that open a trigger's circuit breaker (0: no breakers).",
)
@click.option(
    "--breaker-cooldown", default=60.0, show_default=True, help="Seconds a breaker stays open."
)
@click.option(
    "--max-executions-per-root",
    default=10_000,
    show_default=True,
    type=click.IntRange(0),
    help="Rows handler writes of one root event may enqueue (0: no limit).",
)
@click.option("--application-name", default="dispatcher", show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics on this port (0: any free port); needs the metrics extra.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint binds to (0.0.0.0 to expose it, e.g. in a container).",
)
@click.option(
    "--metrics-per-trigger",
    default=0,
    show_default=True,
    type=click.IntRange(0, 10_000),
    metavar="N",
    help="Label per-trigger execution and dead-letter counters with the first N trigger "
    "names seen (later ones as 'other'); 0: no per-trigger series.",
)
@click.option(
    "--ready-window",
    default=DEFAULT_READY_WINDOW,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="/readyz answers 503 when rows are due and no claim succeeded for this many seconds.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="DISPATCHER_LOG_FORMAT",
    help="text: a line per record with its fields as key=value; json: one JSON object per "
    "line (stderr).",
)
@click.option(
    "--redact-key",
    "redact_keys",
    multiple=True,
    metavar="NAME",
    callback=_redact_keys,
    help="Also redact values of keys whose name contains NAME (case-insensitive, '-' and '_' "
    "ignored), in addition to the default fragments; repeatable.",
)
@loop_option
def run(
    dsn: str | None,
    schema: str,
    handlers_spec: str,
    concurrency: int,
    batch_size: int,
    poll_interval: float,
    grace_period: float,
    max_depth: int,
    no_listen: bool,
    breaker_threshold: int,
    breaker_cooldown: float,
    max_executions_per_root: int,
    application_name: str,
    metrics_port: int | None,
    metrics_host: str,
    metrics_per_trigger: int,
    ready_window: float,
    log_format: LogFormat,
    redact_keys: tuple[str, ...],
    loop: EventLoop,
) -> None:
    """Run a dispatcher until SIGINT or SIGTERM (a second signal aborts at once; leases of
    unfinished rows are given back either way)."""
    from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig
    from dispatcher.runtime.handlers import Executor

    logs.use_format(log_format)
    target = require_dsn(dsn)
    executor = _load_executor(handlers_spec)
    try:
        config = DispatcherConfig(
            schema=schema,
            concurrency=concurrency,
            batch_size=batch_size,
            poll_interval=poll_interval,
            grace_period=grace_period,
            max_trigger_depth=max_depth,
            listen=not no_listen,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            max_executions_per_root=max_executions_per_root or None,
            application_name=application_name,
            redact_keys=redact_keys,
        )
    except DispatcherError as exc:
        raise click.BadParameter(str(exc)) from None
    recorder = (
        None if metrics_port is None else _prometheus_recorder(metrics_per_trigger, ready_window)
    )
    dispatcher = Dispatcher(target, cast("Executor", executor), config=config, recorder=recorder)
    metrics_server = None
    if recorder is not None and metrics_port is not None:
        metrics_server = _serve_metrics(recorder, dispatcher, metrics_host, metrics_port)
    # Everything loaded so far (modules, the handlers' application, SQLAlchemy's metadata)
    # lives as long as the process: moved out of the collector's sight, a full collection
    # walks only what the dispatcher allocates (docs/configuration.md, "Garbage collection").
    gc.freeze()
    try:
        run_async(lambda: _serve(dispatcher), loop=loop)
    finally:
        if metrics_server is not None:
            metrics_server.close()
    _exit_past_abandoned_threads(executor)


def _load_executor(spec: str) -> object:
    """The object ``module:attribute`` names, if it has an ``execute`` method."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"expected module:attribute, got {spec!r}", param_hint="--handlers"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="--handlers"
        ) from None
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(
                f"{module_name!r} has no attribute {attribute!r}", param_hint="--handlers"
            ) from None
    if not callable(getattr(obj, "execute", None)):
        raise click.BadParameter(
            f"{spec} is not a HandlerRegistry or Executor", param_hint="--handlers"
        )
    return obj


def _prometheus_recorder(per_trigger: int, ready_window: float) -> PrometheusRecorder:
    try:
        from dispatcher.metrics import PrometheusRecorder
    except ImportError as exc:  # the metrics extra is not installed; the message says so
        raise click.ClickException(str(exc)) from None
    return PrometheusRecorder(per_trigger=per_trigger, ready_window=ready_window)


def _serve_metrics(
    recorder: PrometheusRecorder, dispatcher: Dispatcher, host: str, port: int
) -> MetricsServer:
    from dispatcher.metrics import start_metrics_server

    recorder.watch(dispatcher)
    try:
        server = start_metrics_server(port, host=host, recorder=recorder)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc}") from None
    logs.say(f"metrics: {server.url}", "cli.metrics", url=server.url)
    return server


async def _serve(dispatcher: Dispatcher) -> None:
    # The loop's class, read from the running loop (what --loop asked for is only a wish).
    kind = type(asyncio.get_running_loop())
    logging.getLogger("dispatcher.cli").info(
        "event loop running",
        extra={"event": "cli.loop", "loop": f"{kind.__module__}.{kind.__qualname__}"},
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, dispatcher, tg.cancel_scope)
        await dispatcher.run()
        tg.cancel_scope.cancel()
    left = dispatcher.status().in_flight
    if left:
        # Executions abandoned by the stop still run as tasks of this event loop, and
        # leaving anyio.run cancels every task and waits for it: one whose handler
        # swallows cancellation would keep the process alive. The dispatcher has
        # written all it will write; their leases expire.
        _exit_now(
            "exiting with abandoned executions still running",
            {"event": "dispatcher.executions_left", "executions": left},
        )


async def _stop_on_signals(dispatcher: Dispatcher, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                name = signal.Signals(signum).name
                logs.say(f"{name}: stopping gracefully", "cli.stopping", signal=name)
                dispatcher.stop()
            else:
                logs.say("second signal: aborting", "cli.aborting")
                scope.cancel()
                return


def _exit_past_abandoned_threads(executor: object) -> None:
    """Threads of blocking handlers that outlived their time limit cannot be stopped, and
    interpreter shutdown would join them (an hour-long sleep keeps the process an hour).
    The dispatcher has written everything by now, so leave without waiting for them."""
    running = getattr(executor, "threads_running", 0)
    if isinstance(running, int) and running > 0:
        _exit_now(
            "exiting with abandoned handler threads still running",
            {"event": "dispatcher.threads_left", "threads": running},
        )


def _exit_now(message: str, extra: dict[str, object]) -> None:
    """Exit with status 0 without waiting for what the dispatcher abandoned."""
    logging.getLogger("dispatcher").warning(message, extra=extra)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
