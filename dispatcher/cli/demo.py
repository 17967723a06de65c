"""``dispatcher demo``."""

from __future__ import annotations

import logging
import shlex
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import click
from click.core import ParameterSource

from dispatcher.cli.call import run_async
from dispatcher.cli.options import dsn_option, schema_option

if TYPE_CHECKING:
    from dispatcher.demo import DemoResult

# As dispatcher.demo.MAX_ORDERS, which is not imported here: the demo module brings the
# runtime and rich, and only the command itself needs them.
MAX_ORDERS = 10_000


@click.command()
@dsn_option("Postgres URL (default: $DATABASE_URL; without it an embedded server is started).")
@schema_option
@click.option(
    "--orders",
    default=200,
    show_default=True,
    type=click.IntRange(1, MAX_ORDERS),
    help="How many order mutations the flaky trigger gets.",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the demo's triggers and rows (and an embedded server running) to inspect "
    "with the other commands; prints how.",
)
def demo(dsn: str | None, schema: str, orders: int, keep: bool) -> None:
    """Show the whole flow: retries, dead letters and their handler, a depth cutoff, sync
    replies. Needs no setup: starts an embedded Postgres when no DSN is given."""
    # The demo brings the runtime, rich's live display and (without a DSN) pgserver.
    from rich.console import Console

    from dispatcher.demo import run_demo

    # The live table tells the story; per-row warnings would scroll it away.
    # Restored afterwards: the command may run inside a host process (a test, a notebook).
    logger = logging.getLogger("dispatcher")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        result = run_async(
            lambda: run_demo(dsn, Console(), orders=orders, schema=schema, keep=keep)
        )
    finally:
        logger.setLevel(level)
    click.echo(_epilogue(result, click.get_current_context()))


def _epilogue(result: DemoResult, ctx: click.Context) -> str:
    if not result.kept:
        if result.data_dir is not None:
            return (
                "Done; the embedded server was stopped and deleted (--keep leaves it running, "
                "to inspect with the other commands)."
            )
        return (
            "Done; the demo's triggers and keys were removed (--keep leaves them, to inspect "
            "with the other commands)."
        )
    # What the CLI reads from the environment anyway is left out; a DSN's password is not
    # echoed.
    options: list[str] = []
    shown = result.dsn
    if ctx.get_parameter_source("dsn") is not ParameterSource.ENVIRONMENT:
        shown = _without_password(result.dsn)
        options += ["--dsn", shown]
    if ctx.get_parameter_source("schema") is ParameterSource.COMMANDLINE:
        options += ["--schema", result.schema]
    lines = ["Kept: the demo's triggers, keys and dead letters stay. Inspect them with:"]
    if shown != result.dsn:
        lines[0] += " (put the DSN's password in place of PASSWORD)"
    for command in (
        ["status"],
        ["dead-letters", "list", "--scope", "demo"],
        ["triggers", "list", "--scope", "demo"],
    ):
        lines.append("  " + shlex.join(["dispatcher", *command, *options]))
    if result.data_dir is not None:
        from dispatcher.postgres import stop_embedded_command

        lines.append(f"The embedded server keeps running (its files: {result.data_dir}).")
        lines.append("Stop it and delete its files with:")
        lines.append("  " + shlex.join(stop_embedded_command(result.data_dir)))
    return "\n".join(lines)


def _without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    if not parts.password:
        return dsn
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:PASSWORD@{host}"))
