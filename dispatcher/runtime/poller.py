"""The poller: claims due rows in batches no larger than the gate's free permits, decides
before taking a permit which rows run at all, and hands the others' outcomes straight to
the settler. Triggers this process holds back (its local breaker view) are left out of the
claim; an error of its own in a cycle is logged and backed off from, never fatal."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime

import anyio
import asyncpg

from dispatcher.core.breakers import LocalBreakers
from dispatcher.core.outcomes import (
    ClaimedRow,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    Failure,
    FailureKind,
    Limits,
    Outcome,
    Release,
)
from dispatcher.core.policy import RandomSource
from dispatcher.core.redact import Redactor
from dispatcher.core.routing import admit, route
from dispatcher.core.sanitize import describe_exception
from dispatcher.emit import DEFAULT_NOTIFY_INTERVAL
from dispatcher.records import claimed_row, undecodable_claimed_row
from dispatcher.runtime.config import DispatcherConfig
from dispatcher.runtime.connections import DB_ERRORS, Connections, jittered
from dispatcher.runtime.executor import Executions
from dispatcher.runtime.gate import ExecutionGate
from dispatcher.runtime.settler import Settler
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import Phase, Recorder, Stats
from dispatcher.sql import Sql

log = logging.getLogger("dispatcher")

# After a wake-up hint, poll every LINGER_POLL seconds for NOTIFY_LINGER seconds. A producer
# sends at most one hint per notify interval (dispatcher.emit), so the rows whose hint it
# folded into an earlier one committed within that interval after it: polls half an
# interval apart for two intervals after each hint find them within half an interval (the
# hint's own delivery and a late commit are what the second interval is for). Only that
# long: a latest-state key's next row, made due when its delivery settles, is left to the
# next poll tick (docs/embedding.md), not taken by a linger poll after its own emit's hint
# (other keys' hints may still keep the poller lingering). A producer with a longer
# notify_interval than the default has its folded rows taken by the next tick.
NOTIFY_LINGER = 2 * DEFAULT_NOTIFY_INTERVAL
LINGER_POLL = DEFAULT_NOTIFY_INTERVAL / 2

# At most this often (seconds), a claim also sweeps (ClaimSql.claim_and_sweep): an open
# breaker whose cool-down is over lets its probe through, and an ordered key's next row left
# waiting by an emit and a settlement that raced is made due, at most SWEEP_KEYS keys.
SWEEP_EVERY = 1.0
SWEEP_KEYS = 1000


def next_claim_in(*, elapsed: float, since_hint: float, poll_interval: float) -> float:
    """Seconds from now to the next claim, after a cycle whose claim began ``elapsed``
    seconds ago, ``since_hint`` seconds after the latest wake-up hint.

    Ticks start every poll interval, whatever the claim took: a row that became due waits at
    most one interval (plus a claim), not an interval plus the claim and the dispatch of its
    batch. Within NOTIFY_LINGER of a hint, claims start LINGER_POLL apart instead, for rows
    whose hint a producer folded into an earlier one."""
    wait = max(0.0, poll_interval - elapsed)
    if since_hint < NOTIFY_LINGER:
        wait = min(wait, max(0.0, LINGER_POLL - elapsed))
    return wait


class Poller:
    def __init__(
        self,
        *,
        sql: Sql,
        config: DispatcherConfig,
        connections: Connections,
        executions: Executions,
        settler: Settler,
        gate: ExecutionGate,
        signals: Signals,
        stats: Stats,
        recorder: Recorder,
        rng: RandomSource,
        redactor: Redactor,
        inbox_id: str,
        local: LocalBreakers,
    ) -> None:
        self._sql = sql
        self._config = config
        self._limits: Limits = config.limits
        self._connections = connections
        self._executions = executions
        self._settler = settler
        self._gate = gate
        self._signals = signals
        self._stats = stats
        self.recorder = recorder
        self._rng = rng
        self._redactor = redactor
        self._inbox_id = inbox_id
        self._local = local
        self.claiming = False
        self.last_claim_at: datetime | None = None
        self.last_claim_monotonic: float | None = None
        self._last_notify = -1e9
        self._last_sweep = -1e9
        # The claim loop's reconnect backoff, reset by each successful claim.
        self._delay = config.reconnect_min
        # The rows of the latest claim, and how many of them were handed on (started or
        # queued for settling): after an error mid-cycle the rest are given back.
        self._claimed: list[asyncpg.Record] = []
        self._handed = 0
        # Set while the loop backs off from an error of its own (Phase.DEGRADED).
        self.last_error: str | None = None
        self._error_delay = config.reconnect_min

    def hinted(self) -> None:
        """A wake-up hint arrived (NOTIFY): claim now, and poll again soon after."""
        self._last_notify = time.monotonic()
        self._signals.wake_poller()

    async def loop(self) -> None:
        """Claim until a stop begins, then give executions the grace period."""
        cfg = self._config
        signals = self._signals
        while not signals.stopping:
            try:
                await self._cycle()
            except Exception as exc:
                # A bug of ours (or of a component given to us, a recorder say) must not end
                # the loop silently: log it, give back what it left claimed, back off.
                await self._survive(exc)
        signals.phase = Phase.STOPPING
        with anyio.move_on_after(cfg.grace_period):
            while self._executions.in_flight:
                await signals.wait_progress()
        # Past the grace period: cancel what still runs; each gives its lease back.
        await self._executions.cancel_all()

    async def _cycle(self) -> None:
        """One claim and its dispatch, then the wait for the next tick (none after a full
        batch: more is probably due)."""
        cfg = self._config
        signals = self._signals
        if await self._held_back():
            return
        want = min(cfg.batch_size, self._gate.free)
        if want == 0:  # permits held by synchronous calls alone
            await self._gate.wait_free(1)
            return
        signals.rearm_wake()
        started = time.perf_counter()
        records = await self._claim(want)
        if records is None:
            return
        self._dispatch(records)
        if self.last_error is not None:  # a whole cycle went through: no longer degraded
            self.last_error = None
            self._error_delay = cfg.reconnect_min
        if len(records) == want and not signals.is_stopping():
            return  # a full batch: more is probably due, claim again at once
        signals.phase = Phase.EXECUTING if self._executions.in_flight else Phase.IDLE
        wait = next_claim_in(
            elapsed=time.perf_counter() - started,
            since_hint=time.monotonic() - self._last_notify,
            poll_interval=cfg.poll_interval,
        )
        with anyio.move_on_after(wait):
            await signals.wake.wait()

    async def _survive(self, exc: Exception) -> None:
        """After an error of the loop's own: give back the rows it left claimed, report
        it (traceback in the log, DEGRADED with the error in the status), back off with
        jitter, and go on."""
        self.claiming = False
        self._give_back()
        self._stats.internal_errors += 1
        self.last_error = describe_exception(exc, limit=500)
        delay = jittered(self._error_delay, self._rng, self._config.reconnect_max)
        log.exception(
            "poll cycle failed; backing off %.2fs",
            delay,
            extra={"event": "dispatcher.poll_error", "error": self.last_error},
        )
        self._signals.phase = Phase.DEGRADED
        self._signals.notify_progress()
        self._error_delay = min(self._error_delay * 2, self._config.reconnect_max)
        await self._signals.sleep_or_stop(delay)

    def _give_back(self) -> None:
        """Release the claimed rows not handed on yet (their leases would otherwise have to
        expire, and count against their attempts)."""
        rest, self._claimed = self._claimed[self._handed :], []
        for record in rest:
            try:
                row = claimed_row(record)
            except Exception:
                try:
                    row = undecodable_claimed_row(record)
                except Exception:
                    continue  # not even its columns: the lease expires (see _undecodable)
            self._settler.submit(row, Release())

    async def _held_back(self) -> bool:
        """Wait (bounded) while claiming now would be wrong; True if the loop should look
        again before claiming."""
        cfg = self._config
        signals = self._signals
        if len(self._settler.pending) >= cfg.max_pending_settlements:
            # Settlements are behind (a lock, a slow disk, an outage of the settler's
            # connection): claiming more would only add leases and memory.
            signals.phase = Phase.SETTLING
            with anyio.move_on_after(cfg.poll_interval):
                await signals.wait_progress()
            return True
        if signals.draining:
            signals.phase = Phase.DRAINING
            await signals.rearm_wake().wait()
            return True
        # Claim again once this many permits are free (or nothing runs): one claim of half
        # a batch instead of many claims of a row or two as executions trickle out.
        refill = max(1, min(cfg.batch_size, cfg.concurrency) // 2)
        if self._gate.free < refill and self._executions.in_flight:
            signals.phase = Phase.EXECUTING
            # Bounded: stop() and drain() must not wait for executions to end by
            # themselves, and permits held by slow or hung executions must not stop the
            # free ones from being used for longer than a poll interval.
            with anyio.move_on_after(cfg.poll_interval):
                await self._gate.wait_free(refill)
            return signals.is_stopping() or signals.is_draining() or self._gate.free == 0
        return False

    async def _claim(self, want: int) -> list[asyncpg.Record] | None:
        """One claim statement; None after a database error (already backed off)."""
        self._signals.phase = Phase.CLAIMING
        self.claiming = True
        started = time.perf_counter()
        held = self._local.held(now=time.monotonic(), applied=self._settler.applied)
        try:
            conn = await self._connections.for_claims()
            args: tuple[object, ...] = (
                want,
                uuid.uuid4(),
                self._inbox_id,
                self._config.lease_margin,
                held,
            )
            if time.monotonic() - self._last_sweep >= SWEEP_EVERY:
                records: list[asyncpg.Record] = await conn.fetch(
                    self._sql.claim_and_sweep, *args, SWEEP_KEYS
                )
                self._last_sweep = time.monotonic()
            else:
                records = await conn.fetch(self._sql.claim, *args)
        except DB_ERRORS as exc:
            self.claiming = False
            self._signals.notify_progress()
            await self._connections.drop_kept()
            self._delay = await self._connections.failed(exc, self._delay)
            return None
        self._claimed, self._handed = records, 0
        self._delay = self._config.reconnect_min
        self._connections.ok()
        self.last_claim_at = datetime.now(UTC)
        self.last_claim_monotonic = time.monotonic()
        self._stats.claims += 1
        self._stats.claimed_rows += len(records)
        self.recorder.claim(time.perf_counter() - started, len(records))
        return records

    def _dispatch(self, records: list[asyncpg.Record]) -> None:
        """Each claimed row: settled at once (not admitted, held, stopping, no permit) or
        run."""
        now = time.monotonic()
        # A claim already under way when stop() or drain() was called: its rows go back
        # unrun, without an attempt, so nothing starts after either. (Read once: nothing
        # below awaits, so neither can begin while the batch is handed on.)
        back = self._signals.is_stopping() or self._signals.is_draining()
        for record in records:
            self._dispatch_one(record, now, back)
            self._handed += 1
        self._claimed = []
        self.claiming = False
        self._signals.notify_progress()

    def _dispatch_one(self, record: asyncpg.Record, now: float, back: bool) -> None:
        try:
            row = claimed_row(record)
        except Exception as exc:
            # A poison row (written by another client, or nested past what the
            # decoder follows) must not end the loop nor keep its batch leased.
            self._undecodable(record, exc)
            return
        if back:
            self._settler.submit(row, Release())
            return
        # Decided before a permit is taken: a row that will not run never holds one.
        early = admit(row, self._limits)
        if early is not None:
            self._settler.submit(row, early)
            return
        # Its trigger is held here (claimed before this process saw it fail or get rate
        # limited, or its cautious window is full): back unrun, no attempt used.
        wait = self._local.wait(row.trigger_id, now=now, applied=self._settler.applied)
        if wait is not None:
            self._stats.held += 1
            self._settler.submit(row, Release(wait))
            return
        if not self._gate.try_acquire():
            self._stats.gate_saturated += 1
            full = Failure(FailureKind.GATE_SATURATED, "execution gate is full")
            self._settler.submit(row, route(row, full, self._limits, self._rng))
            return
        self._executions.start(row)

    def _undecodable(self, record: asyncpg.Record, exc: Exception) -> None:
        try:
            row = undecodable_claimed_row(record)
        except Exception:
            # Not even the columns every row has could be read: leave the lease to expire
            # (the claim that follows counts it as an orphan) rather than stop the loop.
            log.exception(
                "claimed row unreadable; its lease will expire",
                extra={"event": "dispatcher.unreadable", "outbox_id": record.get("id")},
            )
            return
        message = f"the stored row could not be decoded: {describe_exception(exc, limit=2000)}"
        if self._redactor.enabled:
            message = self._redactor.redact_text(message, self._redactor.secrets_in(row.payload))
        self._stats.undecodable += 1
        log.error(
            "claimed row could not be decoded; dead-lettered",
            extra={
                "event": "dispatcher.undecodable",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
                "error": message,
            },
        )
        self._settler.submit(row, self._undecodable_outcome(row, message))

    def _undecodable_outcome(self, row: ClaimedRow, message: str) -> Outcome:
        if row.reply_to is not None or row.dead_letter_id is not None:
            # A caller waits, or a dead letter does: answer them as a permanent failure.
            return route(row, Failure(FailureKind.PERMANENT, message), self._limits, self._rng)
        error = ErrorRecord(row.attempts + 1, FailureKind.PERMANENT, message)
        return DeadLetter(DeadLetterReason.UNDECODABLE, row.attempts, error)
