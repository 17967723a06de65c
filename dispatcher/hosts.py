"""The host connections an emit runs on: one thin adapter per kind of connection.

Every adapter runs the same statement (``dispatcher/sql/emit.py``: a call of the emit
functions of migration 0007) with the same arguments, which :class:`dispatcher.emit.Emitter`
has validated and encoded. An adapter does three things only: tell whether its connection is
inside a transaction (and say how to open one when it is not), write the statement's ``$n``
parameters in its driver's style, and return the one result row. Whatever the driver, a
refusal of the emit functions for a full backlog (SQLSTATE 54Q01) leaves as
:class:`~dispatcher.BacklogFull` (:data:`refusals`).

- async (``await dispatcher.emit``): asyncpg ``Connection`` (or a pool's), psycopg 3
  ``AsyncConnection``, SQLAlchemy ``AsyncConnection`` and ``AsyncSession``;
- sync (``dispatcher.emit_sync``): psycopg 3 ``Connection``, SQLAlchemy ``Connection`` and
  ``Session`` (a ``scoped_session`` too, as Flask-SQLAlchemy's ``db.session``), and a Django
  connection (``dispatcher.contrib.django`` picks it by alias).

SQLAlchemy's connections and sessions run the statement through SQLAlchemy itself, so it
joins the transaction SQLAlchemy manages, whatever the driver underneath.

No driver is imported here: a connection is recognised by its class, looked up among the
modules already loaded (a host holding a psycopg connection has imported psycopg), so
``import dispatcher`` loads none of them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from functools import cache
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

from dispatcher.core.errors import (
    BACKLOG_FULL_SQLSTATE,
    BacklogFull,
    InvalidInput,
    TransactionRequired,
)

if TYPE_CHECKING:  # types only: importing the library must not load a driver
    import psycopg
    from sqlalchemy.engine import Connection as SaConnection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session
    from sqlalchemy.sql.elements import TextClause

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


def async_runner(conn: object) -> AsyncRunner:
    """The runner for ``conn``, or :class:`InvalidInput` naming what is accepted."""
    kind = _kind_of(conn)
    if kind is None or not kind.asynchronous:
        raise _unsupported(conn, kind)
    runner: AsyncRunner = kind.adapter(conn)
    return runner


def sync_runner(conn: object) -> SyncRunner:
    """The runner for ``conn``, or :class:`InvalidInput` naming what is accepted."""
    kind = _kind_of(conn)
    if kind is None or kind.asynchronous:
        raise _unsupported(conn, kind)
    runner: SyncRunner = kind.adapter(conn)
    return runner


# How far down a wrapped error's chain to look for the driver's: SQLAlchemy's DBAPIError
# holds the driver's (``orig``; its asyncpg adapter's in turn was raised from asyncpg's),
# Django's wrapper was raised from it.
_CHAIN_DEPTH = 6


def backlog_refusal(exc: BaseException) -> BacklogFull | None:
    """The :class:`BacklogFull` that ``exc`` stands for, or None: the emit functions raise
    SQLSTATE 54Q01 with ``{"scope", "cap", "backlog", "adding"}`` as JSON in the DETAIL,
    which asyncpg exposes as ``detail``, psycopg and psycopg2 as ``diag.message_detail``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _CHAIN_DEPTH:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if state == BACKLOG_FULL_SQLSTATE:
            full = _backlog_full(_detail(current))
            if full is not None:
                return full
        todo += [
            e
            for e in (getattr(current, "orig", None), current.__cause__, current.__context__)
            if isinstance(e, BaseException)
        ]
    return None


def _detail(exc: BaseException) -> object:
    detail = getattr(exc, "detail", None)
    if detail is None:
        detail = getattr(getattr(exc, "diag", None), "message_detail", None)
    return detail


def _backlog_full(detail: object) -> BacklogFull | None:
    if not isinstance(detail, str):
        return None
    try:
        values = json.loads(detail)
    except ValueError:
        return None
    if not isinstance(values, dict):
        return None
    scope, cap, backlog, adding = (values.get(k) for k in ("scope", "cap", "backlog", "adding"))
    # type() rather than isinstance: JSON's true and false are bools, which are ints.
    if type(scope) is str and type(cap) is int and type(backlog) is int and type(adding) is int:
        return BacklogFull(scope, cap, backlog, adding)
    return None


class _Refusals:
    """``with refusals:`` around an emit statement: its refusal for a full backlog leaves
    as :class:`BacklogFull` (raised from the driver's error), whatever the driver."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            full = backlog_refusal(exc)
            if full is not None:
                raise full from exc


refusals = _Refusals()


def _refusal(operation: str, conn: object, how: str) -> TransactionRequired:
    """:class:`TransactionRequired` for ``conn``, saying ``how`` to open its transaction."""
    return TransactionRequired(operation, conn, how)


# Every parameter of the emit statements carries its type (``$6::jsonb[]``).
_PARAMETER = re.compile(r"\$(\d+)::(\w+(?:\[\])?)")


def _rewrite(statement: str, replacement: str) -> str:
    rewritten = _PARAMETER.sub(replacement, statement)
    if "$" in rewritten:
        raise ValueError(f"a parameter without a type cast in: {statement}")
    return rewritten


@cache
def _pyformat(statement: str) -> str:
    """``statement`` for psycopg's and Django's cursors: ``$1::uuid`` is ``%(p1)s::uuid``."""
    return _rewrite(statement.replace("%", "%%"), r"%(p\1)s::\2")


@cache
def _sqlalchemy_text(statement: str) -> TextClause:
    """``statement`` for SQLAlchemy: ``$1::uuid`` is ``CAST(:p1 AS uuid)``, because
    SQLAlchemy reads ``:p1::uuid`` as a parameter named ``p``."""
    from sqlalchemy import text

    return text(_rewrite(statement, r"CAST(:p\1 AS \2)"))


def _named(args: Args) -> dict[str, object]:
    return {f"p{i}": arg for i, arg in enumerate(args, 1)}


class _Asyncpg:
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def require_transaction(self, operation: str) -> None:
        # No round trip: see dispatcher.emit.require_transaction.
        if not self.conn.is_in_transaction():
            raise TransactionRequired(operation, self.conn)

    async def fetch(self, statement: str, args: Args) -> Row:
        row = await self.conn.fetchrow(statement, *args)
        assert row is not None  # the emit functions return one row
        return row


_PSYCOPG_HOW = (
    "call it inside `{block} conn.transaction():`, or after a statement on a connection not "
    "in autocommit mode, which begins one"
)


def _psycopg_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    # libpq's view of the session, no round trip. IDLE is outside a transaction, whether
    # the connection is in autocommit mode or has not run a statement yet: in the second
    # case the emit would begin a transaction the host never meant to open.
    from psycopg.pq import TransactionStatus

    return conn.info.transaction_status == TransactionStatus.IDLE


class _Psycopg:
    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def require_transaction(self, operation: str) -> None:
        if _psycopg_idle(self.conn):
            raise _refusal(operation, self.conn, _PSYCOPG_HOW.format(block="with"))

    def fetch(self, statement: str, args: Args) -> Row:
        from psycopg.rows import dict_row

        with self.conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(_pyformat(statement), _named(args))
            row = cursor.fetchone()
        assert row is not None
        return row


class _PsycopgAsync:
    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def require_transaction(self, operation: str) -> None:
        if _psycopg_idle(self.conn):
            raise _refusal(operation, self.conn, _PSYCOPG_HOW.format(block="async with"))

    async def fetch(self, statement: str, args: Args) -> Row:
        from psycopg.rows import dict_row

        async with self.conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(_pyformat(statement), _named(args))
            row = await cursor.fetchone()
        assert row is not None
        return row


# SQLAlchemy begins a transaction at the first statement (autobegin) or at begin(). A
# connection or session that has not begun one is refused rather than begun by the emit,
# which would open the host's transaction behind its back: the host's own
# ``with session.begin():`` after it would fail (a transaction is already begun).
_CONNECTION_HOW = (
    "this {what} has not begun a transaction; call it inside `{block} engine.begin() as "
    "conn:` (or `conn.begin()`), or after a statement, which begins one"
)
_SESSION_HOW = (
    "this {what} has not begun a transaction; call it inside `{block} session.begin():`, or "
    "after `session.add()` or a statement, which begin one"
)


def _refuse_sqlalchemy_autocommit(operation: str, conn: SaConnection) -> None:
    """Refuse a connection whose driver commits every statement on its own
    (``isolation_level="AUTOCOMMIT"``), where ``in_transaction()`` is true all the same."""
    if getattr(conn.connection.dbapi_connection, "autocommit", False):
        raise _refusal(
            operation,
            conn,
            "its isolation level is AUTOCOMMIT, where every statement commits on its own; "
            "emit on a connection of an engine without isolation_level='AUTOCOMMIT'",
        )


class _SqlAlchemy:
    __slots__ = ("conn",)

    def __init__(self, conn: SaConnection) -> None:
        self.conn = conn

    def require_transaction(self, operation: str) -> None:
        if not self.conn.in_transaction():
            how = _CONNECTION_HOW.format(what="Connection", block="with")
            raise _refusal(operation, self.conn, how)
        _refuse_sqlalchemy_autocommit(operation, self.conn)

    def fetch(self, statement: str, args: Args) -> Row:
        return self.conn.execute(_sqlalchemy_text(statement), _named(args)).mappings().one()


class _SqlAlchemySession:
    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    def require_transaction(self, operation: str) -> None:
        if not self.session.in_transaction():
            how = _SESSION_HOW.format(what="Session", block="with")
            raise _refusal(operation, self.session, how)
        _refuse_sqlalchemy_autocommit(operation, self.session.connection())

    def fetch(self, statement: str, args: Args) -> Row:
        result = self.session.execute(_sqlalchemy_text(statement), _named(args))
        return result.mappings().one()


class _SqlAlchemyAsync:
    __slots__ = ("conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def require_transaction(self, operation: str) -> None:
        if not self.conn.in_transaction():
            how = _CONNECTION_HOW.format(what="AsyncConnection", block="async with")
            raise _refusal(operation, self.conn, how)
        # Started, or in_transaction() would have raised.
        assert self.conn.sync_connection is not None
        _refuse_sqlalchemy_autocommit(operation, self.conn.sync_connection)

    async def fetch(self, statement: str, args: Args) -> Row:
        result = await self.conn.execute(_sqlalchemy_text(statement), _named(args))
        return result.mappings().one()


class _SqlAlchemyAsyncSession:
    __slots__ = ("session",)

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def require_transaction(self, operation: str) -> None:
        if not self.session.in_transaction():
            how = _SESSION_HOW.format(what="AsyncSession", block="async with")
            raise _refusal(operation, self.session, how)
        conn = await self.session.connection()
        assert conn.sync_connection is not None  # a session's connection is started
        _refuse_sqlalchemy_autocommit(operation, conn.sync_connection)

    async def fetch(self, statement: str, args: Args) -> Row:
        result = await self.session.execute(_sqlalchemy_text(statement), _named(args))
        return result.mappings().one()


class _Django:
    __slots__ = ("conn",)

    def __init__(self, conn: DjangoConnection) -> None:
        # A ConnectionProxy (django.db.connection) may stand for a cache, which has no vendor.
        vendor = getattr(conn, "vendor", None)
        if vendor != "postgresql":
            reason = (
                f"is a Django connection to {vendor}; dispatcher needs PostgreSQL"
                if vendor
                else "is not a Django database connection"
            )
            raise InvalidInput("conn", conn, reason)
        self.conn = conn

    def require_transaction(self, operation: str) -> None:
        # Inside atomic, or with autocommit turned off by the host (set_autocommit(False)),
        # whose own commit() then takes the rows along.
        if not self.conn.in_atomic_block and self.conn.get_autocommit():
            how = f"call it inside `with transaction.atomic(using={self.conn.alias!r}):`"
            raise _refusal(operation, self.conn, how)

    def fetch(self, statement: str, args: Args) -> Row:
        with self.conn.cursor() as cursor:
            cursor.execute(_pyformat(statement), _named(args))
            names = [column[0] for column in cursor.description]
            row: dict[str, Any] = dict(zip(names, cursor.fetchone(), strict=True))
        return row


class _Kind(NamedTuple):
    module: str
    name: str
    asynchronous: bool
    adapter: Callable[[Any], Any]


def _scoped(adapter: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # A scoped session is a registry: calling it gives the current session.
    return lambda registry: adapter(registry())


_KINDS = (
    _Kind("asyncpg", "Connection", True, _Asyncpg),
    _Kind("asyncpg.pool", "PoolConnectionProxy", True, _Asyncpg),
    _Kind("psycopg", "AsyncConnection", True, _PsycopgAsync),
    _Kind("psycopg", "Connection", False, _Psycopg),
    _Kind("sqlalchemy.ext.asyncio", "AsyncConnection", True, _SqlAlchemyAsync),
    _Kind("sqlalchemy.ext.asyncio", "AsyncSession", True, _SqlAlchemyAsyncSession),
    _Kind(
        "sqlalchemy.ext.asyncio",
        "async_scoped_session",
        True,
        _scoped(_SqlAlchemyAsyncSession),
    ),
    _Kind("sqlalchemy.engine", "Connection", False, _SqlAlchemy),
    _Kind("sqlalchemy.orm", "Session", False, _SqlAlchemySession),
    _Kind("sqlalchemy.orm", "scoped_session", False, _scoped(_SqlAlchemySession)),
    _Kind("django.db.backends.base.base", "BaseDatabaseWrapper", False, _Django),
    # django.db.connection: forwards every attribute to the default alias's connection.
    _Kind("django.utils.connection", "ConnectionProxy", False, _Django),
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
