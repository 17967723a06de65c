"""Handler time limits: one watchdog task per event loop cancels overdue async executions.

>>> result = await run_async(handler, ctx, time_limit=30.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Callable
from types import CoroutineType
from typing import TYPE_CHECKING

from dispatcher.core.outcomes import ExecutionResult, Failure, FailureKind, Success
from dispatcher.core.sanitize import sanitize_json
from dispatcher.runtime.failures import classify

if TYPE_CHECKING:
    from dispatcher.runtime.handlers import HandlerContext


class Watch:
    __slots__ = ("done", "expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.done = False
        self.expired = False


class Deadlines:
    """Timeouts for many short executions with one timer task per event loop.

    ``asyncio.timeout`` schedules and cancels a timer handle per call, which costs more
    than a no-op handler. Here an execution appends (deadline, watch) to the queue of its
    time limit and a single watchdog cancels the overdue ones. Within one queue deadlines
    only grow (same limit, monotonic clock), so each queue is a FIFO: finished watches at
    its head are dropped as new ones arrive, and a queue holds little more than the
    executions still running (a heap would keep every finished one until its deadline).
    """

    def __init__(self) -> None:
        self._queues: dict[float, deque[tuple[float, Watch]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, time_limit: float) -> Watch:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queues = {}
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        w = Watch(task)
        queue = self._queues.get(time_limit)
        if queue is None:
            queue = self._queues[time_limit] = deque()
        if not queue:
            # A new head the watchdog may not be waiting for. Into a non-empty queue the
            # deadline is no earlier than its head, which the watchdog already waits on.
            self._wake.set()
        while queue and queue[0][1].done:
            queue.popleft()
        queue.append((loop.time() + time_limit, w))
        return w

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            soonest: float | None = None
            for limit, queue in list(self._queues.items()):
                while queue and (queue[0][1].done or queue[0][0] <= now):
                    _, w = queue.popleft()
                    if not w.done:
                        w.expired = True
                        w.task.cancel("dispatcher: handler time limit")
                if queue:
                    head = queue[0][0]
                    soonest = head if soonest is None else min(soonest, head)
                else:
                    del self._queues[limit]
            self._wake.clear()
            if soonest is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(soonest - now):
                    await self._wake.wait()


DEADLINES = Deadlines()


async def run_async(
    fn: Callable[[HandlerContext], object], ctx: HandlerContext, time_limit: float
) -> ExecutionResult:
    w = DEADLINES.watch(time_limit)
    try:
        pending = fn(ctx)
        if type(pending) is not CoroutineType and not inspect.isawaitable(pending):
            raise TypeError(f"async handler returned {type(pending).__name__}, not an awaitable")
        value = await pending
    except asyncio.CancelledError as exc:
        if w.expired:
            # Ours: undo the cancellation request and report the timeout.
            w.task.uncancel()
            return Failure(FailureKind.TIMEOUT, f"handler exceeded {time_limit:g}s")
        if w.task.cancelling():
            raise  # a real cancellation from outside (shutdown): let it through
        return classify(exc)  # the handler raised CancelledError itself
    except BaseException as exc:  # a handler must never take the loop down
        return classify(exc)
    finally:
        w.done = True
    if w.expired:
        # Finished in the same step the deadline fired: the pending cancel is ours.
        w.task.uncancel()
    return Success(sanitize_json(value))
