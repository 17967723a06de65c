"""Connection types accepted by the library and small helpers around asyncpg."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # a type only: importing the library must not load the driver
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

# A plain asyncpg connection or one acquired from an asyncpg pool: what the library's own
# statements run on (triggers, KvStore, admin, the runtime). ``emit`` takes more kinds of
# host connection (psycopg, SQLAlchemy, Django): dispatcher.hosts.AsyncHost and SyncHost.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
