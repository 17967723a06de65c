"""What the loops of one dispatcher tell each other: stop, drain, wake up, progress made,
and which phase the process is in."""

from __future__ import annotations

import asyncio

import anyio

from dispatcher.runtime.stats import Phase


class Signals:
    """Shared by the poller, the executions, the settler and the services of one
    dispatcher. Flags are read as methods where a loop awaits between reads: they flip
    while it waits."""

    def __init__(self) -> None:
        self.phase = Phase.STOPPED
        self.stopping = False
        self.draining = False
        self.wake = anyio.Event()
        self._progress = asyncio.Event()
        self._progress_waiting = 0

    def is_stopping(self) -> bool:
        return self.stopping

    def is_draining(self) -> bool:
        return self.draining

    def wake_poller(self) -> None:
        self.wake.set()

    def rearm_wake(self) -> anyio.Event:
        """A fresh wake-up event for the poller to wait on."""
        self.wake = anyio.Event()
        return self.wake

    def notify_progress(self, *, force: bool = False) -> None:
        # Called per row: only pay for an event when someone waits.
        if force:
            self._progress_waiting += 1
        if self._progress_waiting:
            self._progress_waiting = 0
            self._progress.set()
            self._progress = asyncio.Event()

    async def wait_progress(self) -> None:
        self._progress_waiting += 1
        await self._progress.wait()

    async def sleep_or_stop(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a stop begins meanwhile."""
        if self.stopping:
            return
        with anyio.move_on_after(seconds):
            while not self.stopping:
                await self.rearm_wake().wait()
