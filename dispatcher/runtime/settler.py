"""The settler: outcomes queue here and are written in batches, fenced, by the applier;
database errors keep them queued, and the poller is woken when a row it put back is due."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from dispatcher.core.outcomes import ClaimedRow, Reschedule, Retry
from dispatcher.runtime.config import DispatcherConfig
from dispatcher.runtime.connections import DB_ERRORS, Connections
from dispatcher.runtime.settle import Applier, Decision, Settlement
from dispatcher.runtime.signals import Signals

log = logging.getLogger("dispatcher")


class Settler:
    def __init__(
        self,
        applier: Applier,
        connections: Connections,
        config: DispatcherConfig,
        signals: Signals,
    ) -> None:
        self._applier = applier
        self._connections = connections
        self._config = config
        self._signals = signals
        self.pending: list[Settlement] = []
        self.settling = False
        # Outcomes queued and outcomes applied (or given up on) since the start: the queue
        # is first in, first out, so `applied >= n` means the n-th outcome is written.
        self.submitted = 0
        self.applied = 0
        self._wake = asyncio.Event()
        # Fires when the soonest row this process rescheduled within a poll interval is due.
        self._retry_timer: asyncio.TimerHandle | None = None

    def submit(self, row: ClaimedRow, decision: Decision) -> None:
        self.pending.append(Settlement(row, decision))
        self.submitted += 1
        if not self._wake.is_set():
            self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.settling)

    async def loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.settle_pending()

    async def settle_pending(self) -> None:
        """Apply everything queued, retrying through database errors (outcomes are kept
        until written; a lease lost meanwhile makes them stale, which the fence detects)."""
        delay = self._config.reconnect_min
        while self.pending:
            batch, self.pending = self.pending, []
            self.settling = True
            try:
                conn = await self._connections.for_settlements()
                await self._applier.apply(conn, batch)
                self.applied += len(batch)
                self._wake_when_due(batch)
                delay = self._config.reconnect_min
            except asyncio.CancelledError:
                # Aborted mid-batch: keep the outcomes for the final drain (a batch that had
                # committed is fenced, so applying it again changes nothing).
                self.pending = batch + self.pending
                raise
            except DB_ERRORS as exc:
                self.pending = batch + self.pending
                self.settling = False
                await self._connections.drop_kept()
                if self._signals.stopping and self._connections.consecutive_failures > 50:
                    log.error(
                        "giving up on final writes; leases will expire",
                        extra={"event": "dispatcher.settle_abandoned", "rows": len(batch)},
                    )
                    self.pending = []
                    self.applied = self.submitted
                    return
                delay = await self._connections.failed(exc, delay)
                continue
            finally:
                self.settling = False
            self._signals.notify_progress()

    async def drain(self) -> None:
        """Return once everything queued is written (or given up on)."""
        while self.pending or self.settling:
            if self.settling:
                await self._signals.wait_progress()
            else:
                await self.settle_pending()

    def close(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def _wake_when_due(self, batch: Sequence[Settlement]) -> None:
        """Claim again when the soonest row just rescheduled is due, if that is sooner than
        the next poll: a short backoff (or a gate-saturated row) is not stretched to a poll
        interval, and no hint is sent for rows we put back ourselves."""
        soonest = min(
            (s.decision.delay for s in batch if isinstance(s.decision, Retry | Reschedule)),
            default=None,
        )
        if soonest is None or soonest >= self._config.poll_interval or self._signals.stopping:
            return
        loop = asyncio.get_running_loop()
        # The rows' due times were set by the database clock at commit, before this point:
        # a timer started now cannot fire before they are due.
        at = loop.time() + soonest
        timer = self._retry_timer
        if timer is not None and not timer.cancelled() and timer.when() <= at:
            return
        if timer is not None:
            timer.cancel()
        self._retry_timer = loop.call_at(at, self._retry_due)

    def _retry_due(self) -> None:
        self._retry_timer = None
        self._signals.wake_poller()
