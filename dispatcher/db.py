"""Connection types accepted by the library and small helpers around asyncpg."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # a type only: importing the library must not load the driver
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

# A plain asyncpg connection or one acquired from an asyncpg pool. Hosts on SQLAlchemy's
# AsyncConnection pass ``(await conn.get_raw_connection()).driver_connection``.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
