"""Options shared by several commands, each declared once, and their callbacks.

A callback turns what the operator typed into the value the library takes, and a value the
library refuses into a usage error (exit status 2) that names the option.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

import click

from dispatcher.admin import parse_duration, parse_moment
from dispatcher.core.errors import InvalidInput
from dispatcher.names import DEFAULT_SCHEMA

F = TypeVar("F", bound=Callable[..., None])
T = TypeVar("T")


def dsn_option(help: str = "Postgres URL (default: $DATABASE_URL).") -> Callable[[F], F]:
    """``--dsn``, taken from ``$DATABASE_URL`` when not given (see :func:`require_dsn`)."""
    return click.option("--dsn", envvar="DATABASE_URL", help=help)


schema_option = click.option(
    "--schema",
    default=DEFAULT_SCHEMA,
    show_default=True,
    envvar="DISPATCHER_SCHEMA",
    help="Postgres schema holding dispatcher's tables.",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")

dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Report what would change; change nothing."
)


EventLoop = Literal["asyncio", "uvloop"]
UVLOOP_HINT = "uvloop is not installed: pip install 'dispatcher[uvloop]'"


def _event_loop(ctx: click.Context, param: click.Parameter, value: EventLoop) -> EventLoop:
    """The loop asked for, if this interpreter can run it: a missing uvloop is a usage
    error with the install hint, before anything starts."""
    if value == "uvloop":
        try:
            import uvloop  # noqa: F401  (anyio imports it again to make the loop)
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "uvloop"
            # Installed but broken (a wheel for another platform): say why.
            hint = UVLOOP_HINT if missing else f"uvloop cannot be imported: {exc}"
            raise click.BadParameter(hint, ctx, param) from None
    return value


loop_option = click.option(
    "--loop",
    type=click.Choice(get_args(EventLoop)),
    default="asyncio",
    show_default=True,
    envvar="DISPATCHER_LOOP",
    callback=_event_loop,
    help="Event loop: the standard library's asyncio, or uvloop (the uvloop extra).",
)


def connection_options(f: F) -> F:
    """``--dsn`` and ``--schema``: where dispatcher's tables are."""
    return dsn_option()(schema_option(f))


def require_dsn(dsn: str | None) -> str:
    value = dsn or os.environ.get("DATABASE_URL")
    if not value:
        raise click.UsageError("give --dsn or set DATABASE_URL")
    return value


def parsing(
    parse: Callable[[str], T],
) -> Callable[[click.Context, click.Parameter, str | None], T | None]:
    """An option callback that reads the value with ``parse`` (a library parser): what the
    library refuses becomes a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except InvalidInput as exc:
            raise click.BadParameter(f"{value!r}: {exc.reason}", ctx, param) from None

    return callback


# ``7d``, ``12h``, ``30m``, ``45s`` or a sum such as ``1h30m``.
duration = parsing(parse_duration)
# A duration (that long ago) or an ISO datetime (naive means UTC).
moment = parsing(parse_moment)
