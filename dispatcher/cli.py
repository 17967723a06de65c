"""The ``dispatcher`` command line."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import click

from dispatcher.core.errors import DispatcherError
from dispatcher.schema import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from dispatcher.runtime.dispatcher import Dispatcher

T = TypeVar("T")


def _run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; turn expected failures into one clear line and exit status 1."""
    try:
        return anyio.run(fn)
    except DispatcherError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach Postgres: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise click.ClickException(f"Postgres error: {exc}") from None
        raise


def _dsn(dsn: str | None) -> str:
    value = dsn or os.environ.get("DATABASE_URL")
    if not value:
        raise click.UsageError("give --dsn or set DATABASE_URL")
    return value


dsn_option = click.option(
    "--dsn", envvar="DATABASE_URL", help="Postgres URL (default: $DATABASE_URL)."
)
schema_option = click.option(
    "--schema",
    default=DEFAULT_SCHEMA,
    show_default=True,
    envvar="DISPATCHER_SCHEMA",
    help="Postgres schema holding dispatcher's tables.",
)


@click.group()
@click.version_option(package_name="dispatcher")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    envvar="DISPATCHER_LOG_LEVEL",
)
def main(log_level: str) -> None:
    """Turn key/value mutations into reliable trigger executions through Postgres."""
    # The library never configures logging; its command line, an application, does.
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@dsn_option
@schema_option
def migrate(dsn: str | None, schema: str) -> None:
    """Create or upgrade dispatcher's tables (safe to run from several processes at once)."""
    from dispatcher.migrate import migrate as run_migrate

    target = _dsn(dsn)
    revision = _run(lambda: run_migrate(target, schema=schema))
    click.echo(f"schema {schema!r} at revision {revision}")


def _load_object(spec: str) -> object:
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
    return obj


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


@main.command()
@dsn_option
@schema_option
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
    "--redact-key",
    "redact_keys",
    multiple=True,
    metavar="NAME",
    callback=_redact_keys,
    help="Also redact values of keys whose name contains NAME (case-insensitive, '-' and '_' "
    "ignored), in addition to the default fragments; repeatable.",
)
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
    redact_keys: tuple[str, ...],
) -> None:
    """Run a dispatcher until SIGINT or SIGTERM (a second signal aborts at once; leases of
    unfinished rows are given back either way)."""
    from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig
    from dispatcher.runtime.handlers import Executor

    target = _dsn(dsn)
    executor = _load_object(handlers_spec)
    if not callable(getattr(executor, "execute", None)):
        raise click.BadParameter(
            f"{handlers_spec} is not a HandlerRegistry or Executor", param_hint="--handlers"
        )
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
    recorder = None
    if metrics_port is not None:
        try:
            from dispatcher.metrics import PrometheusRecorder, start_metrics_server
        except ImportError as exc:
            raise click.ClickException(str(exc)) from None
        recorder = PrometheusRecorder()
    dispatcher = Dispatcher(target, cast("Executor", executor), config=config, recorder=recorder)
    metrics_server = None
    if recorder is not None and metrics_port is not None:
        recorder.watch(dispatcher)
        try:
            metrics_server = start_metrics_server(metrics_port, host=metrics_host)
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}"
            ) from None
        click.echo(f"metrics: {metrics_server.url}", err=True)

    async def serve() -> None:
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

    try:
        _run(serve)
    finally:
        if metrics_server is not None:
            metrics_server.close()
    _exit_past_abandoned_threads(executor)


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


async def _stop_on_signals(dispatcher: Dispatcher, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                click.echo(f"{signal.Signals(signum).name}: stopping gracefully", err=True)
                dispatcher.stop()
            else:
                click.echo("second signal: aborting", err=True)
                scope.cancel()
                return


@main.command()
@click.option(
    "--dsn",
    envvar="DATABASE_URL",
    help="Postgres URL (default: $DATABASE_URL; without it an embedded server is started).",
)
@click.option("--orders", default=200, show_default=True, help="How many order mutations.")
def demo(dsn: str | None, orders: int) -> None:
    """Show the whole flow: retries, dead letters and their handler, a depth cutoff, sync
    replies. Needs no setup: starts an embedded Postgres when no DSN is given."""
    from rich.console import Console

    from dispatcher.demo import run_demo

    # The live table tells the story; per-row warnings would scroll it away.
    logging.getLogger("dispatcher").setLevel(logging.ERROR)
    _run(lambda: run_demo(dsn, Console(), orders=orders))


from dispatcher.cli_admin import register as _register_admin  # noqa: E402

_register_admin(main)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
