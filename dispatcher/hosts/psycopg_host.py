"""The adapters for psycopg 3 connections, sync and async: libpq's transaction status, and
the statement in psycopg's ``%(pn)s`` style. psycopg is imported only when one is used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatcher.hosts.params import named, pyformat
from dispatcher.hosts.protocols import Args, Row, refusal

if TYPE_CHECKING:  # types only: importing the library must not load a driver
    import psycopg

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


class PsycopgRunner:
    """Runs emit statements on a psycopg 3 ``Connection``."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def require_transaction(self, operation: str) -> None:
        if _psycopg_idle(self.conn):
            raise refusal(operation, self.conn, _PSYCOPG_HOW.format(block="with"))

    def fetch(self, statement: str, args: Args) -> Row:
        from psycopg.rows import dict_row

        with self.conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(pyformat(statement), named(args))
            row = cursor.fetchone()
        assert row is not None
        return row


class PsycopgAsyncRunner:
    """Runs emit statements on a psycopg 3 ``AsyncConnection``."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def require_transaction(self, operation: str) -> None:
        if _psycopg_idle(self.conn):
            raise refusal(operation, self.conn, _PSYCOPG_HOW.format(block="async with"))

    async def fetch(self, statement: str, args: Args) -> Row:
        from psycopg.rows import dict_row

        async with self.conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(pyformat(statement), named(args))
            row = await cursor.fetchone()
        assert row is not None
        return row
