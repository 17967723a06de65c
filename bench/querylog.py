"""Count (or inspect) every statement a dispatcher sends, without touching its code: its
pool and its LISTEN connection are made through ``asyncpg.create_pool`` and
``asyncpg.connect``, which this wraps to attach asyncpg query loggers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

QueryLogger = Callable[[Any], None]


def install(logger: QueryLogger) -> Callable[[], None]:
    """Attach ``logger`` to every connection made from now on; returns an uninstaller."""
    original_pool = asyncpg.create_pool
    original_connect = asyncpg.connect

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(logger)

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        kwargs["init"] = init
        return original_pool(*args, **kwargs)

    async def connect(*args: Any, **kwargs: Any) -> Any:
        conn = await original_connect(*args, **kwargs)
        conn.add_query_logger(logger)
        return conn

    asyncpg.create_pool = create_pool
    asyncpg.connect = connect

    def uninstall() -> None:
        asyncpg.create_pool = original_pool
        asyncpg.connect = original_connect

    return uninstall
