"""Which adapter a host connection gets: its class, looked up among the modules already
loaded (a host holding a psycopg connection has imported psycopg), so no driver is imported
to recognise one, and an adapter's module is loaded only with the first connection it
adapts. A connection of no known kind, or of the wrong calling convention, is refused with
:class:`InvalidInput` naming what is accepted."""

from __future__ import annotations

import importlib
import sys
from functools import cache
from typing import Any, NamedTuple

from dispatcher.core.errors import InvalidInput
from dispatcher.hosts.protocols import AsyncRunner, SyncRunner


def async_runner(conn: object) -> AsyncRunner:
    """The runner for ``conn``, or :class:`InvalidInput` naming what is accepted."""
    kind = _kind_of(conn)
    if kind is None or not kind.asynchronous:
        raise _unsupported(conn, kind)
    runner: AsyncRunner = _adapt(kind, conn)
    return runner


def sync_runner(conn: object) -> SyncRunner:
    """The runner for ``conn``, or :class:`InvalidInput` naming what is accepted."""
    kind = _kind_of(conn)
    if kind is None or kind.asynchronous:
        raise _unsupported(conn, kind)
    runner: SyncRunner = _adapt(kind, conn)
    return runner


class _Kind(NamedTuple):
    module: str  # where the connection's class lives, and its name
    name: str
    asynchronous: bool
    adapter: str  # the adapter class, as "module:Class" under dispatcher.hosts
    scoped: bool = False  # a registry: calling it gives the current session


_KINDS = (
    _Kind("asyncpg", "Connection", True, "asyncpg_host:AsyncpgRunner"),
    _Kind("asyncpg.pool", "PoolConnectionProxy", True, "asyncpg_host:AsyncpgRunner"),
    _Kind("psycopg", "AsyncConnection", True, "psycopg_host:PsycopgAsyncRunner"),
    _Kind("psycopg", "Connection", False, "psycopg_host:PsycopgRunner"),
    _Kind(
        "sqlalchemy.ext.asyncio", "AsyncConnection", True, "sqlalchemy_host:SqlAlchemyAsyncRunner"
    ),
    _Kind(
        "sqlalchemy.ext.asyncio",
        "AsyncSession",
        True,
        "sqlalchemy_host:SqlAlchemyAsyncSessionRunner",
    ),
    _Kind(
        "sqlalchemy.ext.asyncio",
        "async_scoped_session",
        True,
        "sqlalchemy_host:SqlAlchemyAsyncSessionRunner",
        scoped=True,
    ),
    _Kind("sqlalchemy.engine", "Connection", False, "sqlalchemy_host:SqlAlchemyRunner"),
    _Kind("sqlalchemy.orm", "Session", False, "sqlalchemy_host:SqlAlchemySessionRunner"),
    _Kind(
        "sqlalchemy.orm",
        "scoped_session",
        False,
        "sqlalchemy_host:SqlAlchemySessionRunner",
        scoped=True,
    ),
    _Kind("django.db.backends.base.base", "BaseDatabaseWrapper", False, "django_host:DjangoRunner"),
    # django.db.connection: forwards every attribute to the default alias's connection.
    _Kind("django.utils.connection", "ConnectionProxy", False, "django_host:DjangoRunner"),
)
# The kind of each connection class met so far: one dict lookup per emit after the first.
_KIND_OF_TYPE: dict[type, _Kind] = {}


def _kind_of(conn: object) -> _Kind | None:
    kind = _KIND_OF_TYPE.get(type(conn))
    if kind is not None:
        return kind
    for candidate in _KINDS:
        cls = getattr(sys.modules.get(candidate.module), candidate.name, None)
        if isinstance(cls, type) and isinstance(conn, cls):
            _KIND_OF_TYPE[type(conn)] = candidate
            return candidate
    return None


@cache
def _adapter_class(adapter: str) -> Any:
    """The adapter class named ``"module:Class"``, its module loaded with the first
    connection of its kind (none of them imports its driver at import either)."""
    module, name = adapter.split(":")
    return getattr(importlib.import_module(f"dispatcher.hosts.{module}"), name)


def _adapt(kind: _Kind, conn: Any) -> Any:
    return _adapter_class(kind.adapter)(conn() if kind.scoped else conn)


def _unsupported(conn: object, kind: _Kind | None) -> InvalidInput:
    if kind is not None and kind.asynchronous:
        reason = f"is an async connection ({kind.name}): await dispatcher.emit or emit_many"
    elif kind is not None:
        reason = f"is a sync connection ({kind.name}): call dispatcher.emit_sync or emit_many_sync"
    else:
        reason = (
            "is not a connection dispatcher can emit on: `await dispatcher.emit` takes an "
            "asyncpg connection, a psycopg AsyncConnection, or a SQLAlchemy AsyncConnection or "
            "AsyncSession; `dispatcher.emit_sync` takes a psycopg Connection, a SQLAlchemy "
            "Connection or Session, or a Django connection (see dispatcher.contrib.django). "
            "An engine or a pool is not a transaction: pass the connection or session your "
            "work runs on"
        )
    return InvalidInput("conn", conn, reason)
