"""How a command calls the library: in its own event loop, on one connection, with expected
failures turned into one ``Error: …`` line and exit status 1 (no traceback)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import asyncpg
import click

from dispatcher.cli.options import EventLoop, require_dsn
from dispatcher.core.errors import DispatcherError
from dispatcher.db import Connection

T = TypeVar("T")


class SchemaNotMigrated(DispatcherError):
    """The schema lacks dispatcher's tables."""


def run_async(fn: Callable[[], Coroutine[Any, Any, T]], *, loop: EventLoop = "asyncio") -> T:
    """Run a coroutine in an event loop of kind ``loop``; turn expected failures into one
    clear line and exit status 1."""
    try:
        return anyio.run(fn, backend_options={"use_uvloop": loop == "uvloop"})
    except DispatcherError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"cannot reach Postgres: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise click.ClickException(f"Postgres error: {exc}") from None
        raise


def with_connection(dsn: str | None, action: Callable[[Connection], Awaitable[T]]) -> T:
    """Run ``action`` on one connection, as :func:`run_async` runs a coroutine."""
    target = require_dsn(dsn)

    async def go() -> T:
        try:
            conn = await asyncpg.connect(target)
        except (ValueError, OverflowError) as exc:
            # A malformed URL (bad port, bad IPv6 literal). The DSN itself is not echoed:
            # it may carry a password.
            raise DispatcherError(f"invalid --dsn: {exc}") from None
        try:
            return await action(conn)
        except asyncpg.UndefinedTableError as exc:
            raise SchemaNotMigrated(
                f"{exc}: are dispatcher's tables in this schema? "
                "Run `dispatcher migrate` (with the same --schema) first"
            ) from None
        finally:
            await conn.close()

    return run_async(go)
