"""The adapter for a Django database connection (``django.db.connections[alias]`` or
``django.db.connection``): PostgreSQL only, Django's own view of its transaction, and the
statement in the cursor's ``%(pn)s`` style."""

from __future__ import annotations

from typing import Any

from dispatcher.core.errors import InvalidInput
from dispatcher.hosts.params import named, pyformat
from dispatcher.hosts.protocols import Args, DjangoConnection, Row, refusal


class DjangoRunner:
    """Runs emit statements on a Django connection to PostgreSQL."""

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
            raise refusal(operation, self.conn, how)

    def fetch(self, statement: str, args: Args) -> Row:
        with self.conn.cursor() as cursor:
            cursor.execute(pyformat(statement), named(args))
            names = [column[0] for column in cursor.description]
            row: dict[str, Any] = dict(zip(names, cursor.fetchone(), strict=True))
        return row
