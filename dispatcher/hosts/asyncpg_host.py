"""The adapter for an asyncpg connection (or a pool's): the statement as written, no
rewriting, and the transaction status asyncpg tracks locally."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.core.errors import TransactionRequired
from dispatcher.hosts.protocols import Args, Row

if TYPE_CHECKING:
    from dispatcher.db import Connection


class AsyncpgRunner:
    """Runs emit statements on an asyncpg connection."""

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
