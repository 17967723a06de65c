"""Helpers of the browser tests that the tests import (conftest.py is not importable by
name from every directory): the database from Playwright's thread, a served console."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import asyncpg

T = TypeVar("T")


def in_loop(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """``anyio.run(fn, *args)`` on a worker thread, for callers on Playwright's thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn, *args).result(timeout=60)


def run(fn: Callable[[asyncpg.Connection], Awaitable[T]], dsn: str) -> T:
    """Run ``fn`` on a connection to ``dsn``, from a synchronous test."""

    async def go() -> T:
        conn = await asyncpg.connect(dsn)
        try:
            return await fn(conn)
        finally:
            await conn.close()

    return in_loop(go)


@dataclass
class Served:
    url: str
    app: Any
