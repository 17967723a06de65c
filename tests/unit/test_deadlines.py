"""The handler time-limit watchdog: overdue executions are stopped, finished ones are not
kept around."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from dispatcher.core.outcomes import Failure, FailureKind, Success
from dispatcher.runtime.deadlines import DEADLINES, run_async

pytestmark = pytest.mark.anyio


async def _noop(_: object) -> str:
    return "ok"


async def _hang(_: object) -> None:
    await anyio.sleep_forever()


def _kept() -> int:
    return sum(len(q) for q in DEADLINES._queues.values())


async def test_finished_executions_do_not_pile_up() -> None:
    for _ in range(5_000):
        assert await run_async(_noop, None, 30.0) == Success("ok")  # type: ignore[arg-type]
    # Only the newest watch of the queue is left (nothing behind it was still running).
    assert _kept() <= 1


async def test_overdue_executions_stop_under_each_limit() -> None:
    async def timed(limit: float) -> Failure | Success:
        return await run_async(_hang, None, limit)  # type: ignore[arg-type]

    with anyio.fail_after(10):
        results = await asyncio.gather(
            timed(0.2),
            timed(0.05),
            *(run_async(_noop, None, 30.0) for _ in range(3)),
            timed(0.1),  # type: ignore[arg-type]
        )
    kinds = [r.kind if isinstance(r, Failure) else "ok" for r in results]
    assert kinds == [
        FailureKind.TIMEOUT,
        FailureKind.TIMEOUT,
        "ok",
        "ok",
        "ok",
        FailureKind.TIMEOUT,
    ]
