"""The adapters for SQLAlchemy connections and sessions, sync and async, any driver: the
statement runs through SQLAlchemy itself (``text()`` with ``:pn`` parameters), so it joins
the transaction SQLAlchemy manages.

SQLAlchemy begins a transaction at the first statement (autobegin) or at begin(). A
connection or session that has not begun one is refused rather than begun by the emit,
which would open the host's transaction behind its back: the host's own
``with session.begin():`` after it would fail (a transaction is already begun).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.hosts.params import named, sqlalchemy_text
from dispatcher.hosts.protocols import Args, Row, refusal

if TYPE_CHECKING:  # types only: importing the library must not load SQLAlchemy
    from sqlalchemy.engine import Connection as SaConnection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

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
        raise refusal(
            operation,
            conn,
            "its isolation level is AUTOCOMMIT, where every statement commits on its own; "
            "emit on a connection of an engine without isolation_level='AUTOCOMMIT'",
        )


class SqlAlchemyRunner:
    """Runs emit statements on a SQLAlchemy ``Connection``."""

    __slots__ = ("conn",)

    def __init__(self, conn: SaConnection) -> None:
        self.conn = conn

    def require_transaction(self, operation: str) -> None:
        if not self.conn.in_transaction():
            how = _CONNECTION_HOW.format(what="Connection", block="with")
            raise refusal(operation, self.conn, how)
        _refuse_sqlalchemy_autocommit(operation, self.conn)

    def fetch(self, statement: str, args: Args) -> Row:
        return self.conn.execute(sqlalchemy_text(statement), named(args)).mappings().one()


class SqlAlchemySessionRunner:
    """Runs emit statements on a SQLAlchemy ``Session``."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session

    def require_transaction(self, operation: str) -> None:
        if not self.session.in_transaction():
            how = _SESSION_HOW.format(what="Session", block="with")
            raise refusal(operation, self.session, how)
        _refuse_sqlalchemy_autocommit(operation, self.session.connection())

    def fetch(self, statement: str, args: Args) -> Row:
        result = self.session.execute(sqlalchemy_text(statement), named(args))
        return result.mappings().one()


class SqlAlchemyAsyncRunner:
    """Runs emit statements on a SQLAlchemy ``AsyncConnection``."""

    __slots__ = ("conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def require_transaction(self, operation: str) -> None:
        if not self.conn.in_transaction():
            how = _CONNECTION_HOW.format(what="AsyncConnection", block="async with")
            raise refusal(operation, self.conn, how)
        # Started, or in_transaction() would have raised.
        assert self.conn.sync_connection is not None
        _refuse_sqlalchemy_autocommit(operation, self.conn.sync_connection)

    async def fetch(self, statement: str, args: Args) -> Row:
        result = await self.conn.execute(sqlalchemy_text(statement), named(args))
        return result.mappings().one()


class SqlAlchemyAsyncSessionRunner:
    """Runs emit statements on a SQLAlchemy ``AsyncSession``."""

    __slots__ = ("session",)

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def require_transaction(self, operation: str) -> None:
        if not self.session.in_transaction():
            how = _SESSION_HOW.format(what="AsyncSession", block="async with")
            raise refusal(operation, self.session, how)
        conn = await self.session.connection()
        assert conn.sync_connection is not None  # a session's connection is started
        _refuse_sqlalchemy_autocommit(operation, conn.sync_connection)

    async def fetch(self, statement: str, args: Args) -> Row:
        result = await self.session.execute(sqlalchemy_text(statement), named(args))
        return result.mappings().one()
