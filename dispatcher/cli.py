"""The ``dispatcher`` command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import click

from dispatcher.core.errors import DispatcherError
from dispatcher.schema import DEFAULT_SCHEMA

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
def main() -> None:
    """Turn key/value mutations into reliable trigger executions through Postgres."""


@main.command()
@dsn_option
@schema_option
def migrate(dsn: str | None, schema: str) -> None:
    """Create or upgrade dispatcher's tables (safe to run from several processes at once)."""
    from dispatcher.migrate import migrate as run_migrate

    target = _dsn(dsn)
    revision = _run(lambda: run_migrate(target, schema=schema))
    click.echo(f"schema {schema!r} at revision {revision}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
