"""What an emit takes and what runs it: the host connection types (:data:`AsyncHost`,
:data:`SyncHost`, :class:`DjangoConnection`), the result row, and the runner protocols every
adapter implements.

The driver types are named for type checkers only: importing this module loads no driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from dispatcher.core.errors import TransactionRequired

if TYPE_CHECKING:  # types only: importing the library must not load a driver
    import psycopg
    from sqlalchemy.engine import Connection as SaConnection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session

    from dispatcher.db import Connection


class DjangoConnection(Protocol):
    """What is used of a Django database connection (``django.db.connections[alias]``);
    Django ships no type information, so this is the typed boundary."""

    vendor: str
    alias: str
    in_atomic_block: bool

    def get_autocommit(self) -> bool: ...
    def cursor(self) -> Any: ...


# What ``await dispatcher.emit(conn, ...)`` takes.
AsyncHost: TypeAlias = (
    "Connection | psycopg.AsyncConnection[Any] | AsyncConnection | AsyncSession"
    " | async_scoped_session[Any]"
)
# What ``dispatcher.emit_sync(conn, ...)`` takes.
SyncHost: TypeAlias = (
    "psycopg.Connection[Any] | SaConnection | Session | scoped_session[Any] | DjangoConnection"
)

Args: TypeAlias = Sequence[object]


class Row(Protocol):
    """The emit function's result row, read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


class AsyncRunner(Protocol):
    """Runs emit statements on an async host connection."""

    async def require_transaction(self, operation: str) -> None:
        """Raise :class:`TransactionRequired` when the connection is outside a transaction."""

    async def fetch(self, statement: str, args: Args) -> Row:
        """Run ``statement`` (asyncpg's ``$n`` parameters) with ``args``; its one row."""


class SyncRunner(Protocol):
    """Runs emit statements on a sync host connection."""

    def require_transaction(self, operation: str) -> None:
        """Raise :class:`TransactionRequired` when the connection is outside a transaction."""

    def fetch(self, statement: str, args: Args) -> Row:
        """Run ``statement`` (asyncpg's ``$n`` parameters) with ``args``; its one row."""


def refusal(operation: str, conn: object, how: str) -> TransactionRequired:
    """:class:`TransactionRequired` for ``conn``, saying ``how`` to open its transaction."""
    return TransactionRequired(operation, conn, how)
