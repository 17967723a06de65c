"""The execution gate: a bounded set of permits shared by the poller and synchronous calls."""

from __future__ import annotations

import asyncio

from dispatcher.core.errors import InvalidInput
from dispatcher.core.validate import is_int


class ExecutionGate:
    """Bounded capacity with a non-blocking acquire.

    The poller claims no more rows than :attr:`free` permits; a synchronous call that takes
    a permit between a claim and the start of that row's execution makes the row's acquire
    fail, and the row is rescheduled without consuming an attempt.

    >>> gate = ExecutionGate(2)
    >>> gate.try_acquire(), gate.try_acquire(), gate.try_acquire()
    (True, True, False)
    """

    def __init__(self, capacity: int) -> None:
        if not is_int(capacity) or capacity < 1:
            raise InvalidInput("gate_capacity", capacity, "must be a positive integer")
        self.capacity = capacity
        self._in_use = 0
        self._freed = asyncio.Event()
        self.saturated = 0  # acquires refused, for metrics

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def free(self) -> int:
        return self.capacity - self._in_use

    def try_acquire(self) -> bool:
        if self._in_use >= self.capacity:
            self.saturated += 1
            return False
        self._in_use += 1
        return True

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("ExecutionGate.release() called more often than acquire()")
        self._in_use -= 1
        self._freed.set()

    async def wait_free(self, permits: int = 1) -> None:
        """Return once at least ``permits`` permits are free."""
        while self.capacity - self._in_use < permits:
            self._freed = asyncio.Event()
            await self._freed.wait()
