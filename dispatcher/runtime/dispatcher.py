"""The dispatcher: one poller per process claiming due rows, executing them through the
shared gate, and settling their outcomes.

The work is done by one object per loop — :class:`~dispatcher.runtime.poller.Poller`
(claim and admit), :class:`~dispatcher.runtime.executor.Executions` (run one row, decide),
:class:`~dispatcher.runtime.settler.Settler` (write outcomes, fenced) — and data walks one
way between them. This class wires them together and keeps the public surface.

>>> handlers = HandlerRegistry()
>>> d = Dispatcher(dsn, handlers)
>>> async with anyio.create_task_group() as tg:
...     await tg.start(d.run)
...     ...
...     d.stop()
"""

from __future__ import annotations

import logging
import random
import uuid

import anyio
import anyio.lowlevel
import asyncpg
from anyio.abc import TaskStatus

from dispatcher import tracing
from dispatcher.core.breakers import LocalBreakers
from dispatcher.core.models import JsonValue, Mutation, Op
from dispatcher.core.outcomes import Failure, FailureKind
from dispatcher.core.policy import RandomSource
from dispatcher.core.redact import Redactor
from dispatcher.emit import Emitter, encode_event
from dispatcher.kv import KvStore
from dispatcher.records import claimed_row
from dispatcher.runtime.config import DispatcherConfig, positive
from dispatcher.runtime.connections import DB_ERRORS, Connections
from dispatcher.runtime.executor import Executions
from dispatcher.runtime.gate import ExecutionGate
from dispatcher.runtime.handlers import Executor, close_session, open_session
from dispatcher.runtime.inbox import InProcessInbox, InvokeResult
from dispatcher.runtime.kv_session import PoolKv, guard_for
from dispatcher.runtime.poller import Poller
from dispatcher.runtime.principals import PrincipalResolver, RegisteredByResolver
from dispatcher.runtime.services import (
    count_capped_backlogs,
    housekeeping,
    listen,
    sample_backlog,
)
from dispatcher.runtime.settle import Applier, BreakerSettings
from dispatcher.runtime.settler import Settler
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import NullRecorder, Phase, Recorder, Stats, StatusSnapshot
from dispatcher.sql import queries
from dispatcher.triggers import TriggerRegistry

__all__ = ["DB_ERRORS", "Dispatcher", "DispatcherConfig", "InvokeTimeout", "NotRunning"]

log = logging.getLogger("dispatcher")


class InvokeTimeout(TimeoutError):
    """A synchronous call gave up waiting; the execution, if it happens, is recorded in
    ``abandoned_executions``."""


class NotRunning(RuntimeError):
    """The operation needs a running dispatcher (``run`` or ``run_until_idle``)."""


class Dispatcher:
    """Claims due outbox rows and runs them through ``executor``.

    One per process is enough: it claims in batches no larger than the gate's free
    permits, runs each row as its own task, and settles outcomes in batched, fenced writes.
    """

    def __init__(
        self,
        dsn: str,
        executor: Executor,
        *,
        config: DispatcherConfig | None = None,
        principals: PrincipalResolver | None = None,
        emitter: Emitter | None = None,
        rng: RandomSource | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = cfg = config or DispatcherConfig()
        self._recorder: Recorder = recorder or NullRecorder()
        self._emitter = emitter or Emitter(schema=cfg.schema)
        self._sql = queries(cfg.schema)
        self._rng = rng = rng or random.Random()
        redactor = Redactor(frozenset(cfg.redact_keys))
        self.gate = ExecutionGate(cfg.concurrency)
        self.inbox = InProcessInbox()
        self.stats = Stats()
        self._signals = Signals()
        self._connections = Connections(dsn, cfg, self._signals, self.stats, rng)
        # What this process knows of its triggers ahead of the shared breakers: rows of a
        # trigger it holds back are released, due again after a poll interval (by then the
        # shared breaker has normally seen the failures that tripped it here).
        local = LocalBreakers(cfg.breaker_threshold, cfg.concurrency, cfg.poll_interval)
        applier = Applier(
            self._sql,
            self.inbox,
            self.stats,
            max_error_history=cfg.max_error_history,
            breaker=BreakerSettings(cfg.breaker_threshold, cfg.breaker_cooldown),
            unpark_batch=cfg.unpark_batch,
            redactor=redactor,
        )
        self._settler = Settler(applier, self._connections, cfg, self._signals)
        self._executions = Executions(
            executor=executor,
            principals=principals or RegisteredByResolver(),
            gate=self.gate,
            settler=self._settler,
            signals=self._signals,
            stats=self.stats,
            recorder=self._recorder,
            limits=cfg.limits,
            rng=rng,
            redactor=redactor,
            abandon_after=cfg.abandon_after,
            local=local,
        )
        self._poller = Poller(
            sql=self._sql,
            config=cfg,
            connections=self._connections,
            executions=self._executions,
            settler=self._settler,
            gate=self.gate,
            signals=self._signals,
            stats=self.stats,
            recorder=self._recorder,
            rng=rng,
            redactor=redactor,
            inbox_id=self.inbox.inbox_id,
            local=local,
        )
        self._accepting = False
        self._running = False

    # ----- public surface -----

    @property
    def recorder(self) -> Recorder:
        """Where timings go (``dispatcher.metrics.instrument`` installs one)."""
        return self._recorder

    @recorder.setter
    def recorder(self, recorder: Recorder) -> None:
        self._recorder = self._executions.recorder = self._poller.recorder = recorder

    def status(self) -> StatusSnapshot:
        """A point-in-time view for health checks and ``dispatcher status``."""
        c = self._connections
        return StatusSnapshot(
            phase=self._signals.phase,
            in_flight=self._executions.in_flight,
            # While the poll loop backs off from an error of its own, that error.
            last_error=self._poller.last_error or c.last_error,
            consecutive_failures=c.consecutive_failures,
            backoff_until=c.backoff_until,
            last_claim_at=self._poller.last_claim_at,
            gate_capacity=self.gate.capacity,
            gate_free=self.gate.free,
            stats=self.stats.as_dict(),
            last_claim_monotonic=self._poller.last_claim_monotonic,
        )

    async def progressed(self) -> None:
        """Return at the next change in execution or settlement (progress displays, tests)."""
        await self._signals.wait_progress()

    def drain(self) -> None:
        """Stop claiming (in-flight work finishes) but keep running: for an upgrade or a
        maintenance window. :meth:`resume` picks up again without a restart."""
        self._signals.draining = True
        log.warning("dispatcher draining", extra={"event": "dispatcher.draining"})

    def resume(self) -> None:
        """Leave drain mode and claim again at once."""
        if self._signals.draining:
            self._signals.draining = False
            log.warning("dispatcher resumed", extra={"event": "dispatcher.resumed"})
        self._signals.wake_poller()

    @property
    def draining(self) -> bool:
        return self._signals.draining

    def wake(self) -> None:
        """Claim now instead of at the next poll tick."""
        self._signals.wake_poller()

    def stop(self) -> None:
        """Begin a graceful stop: claim nothing more, let in-flight work finish within the
        grace period, cancel what did not finish and give its lease back, then return from
        ``run``. An execution that ignores its cancellation for ``abandon_after`` more
        seconds is abandoned: left running, its lease left to expire, its outcome dropped."""
        self._signals.stopping = True
        self._signals.wake_poller()
        self._signals.notify_progress(force=True)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop`. Reports started once connected (for ``tg.start``)."""
        if self._running:
            raise RuntimeError("this dispatcher is already running")
        self._running = True
        self._signals.stopping = False
        self._signals.phase = Phase.STARTING
        try:
            pool = await self._connections.open_pool()
            if pool is None:  # stopped before the database ever answered
                task_status.started()
                return
            guard = guard_for(self._sql, self.stats, self.config.max_executions_per_root)
            kv = PoolKv(pool, KvStore(self._emitter), guard)
            self._executions.kv_session = open_session(kv)
            async with anyio.create_task_group() as services:
                self._start_services(services)
                task_status.started()
                log.info(
                    "dispatcher started",
                    extra={"event": "dispatcher.started", "schema": self.config.schema},
                )
                self._accepting = True
                await self._poller.loop()
                self._accepting = False
                # Final writes: outcomes of everything that ran, and lease releases.
                with anyio.CancelScope(shield=True):
                    await self._settler.drain()
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shut_down()
            self._signals.phase = Phase.STOPPED
            self._running = False
            log.info("dispatcher stopped", extra={"event": "dispatcher.stopped"})

    def _start_services(self, services: anyio.abc.TaskGroup) -> None:
        cfg = self.config
        c = self._connections
        assert c.pool is not None
        services.start_soon(self._settler.loop)
        if cfg.listen:
            services.start_soon(
                listen, c.dsn, self._sql, cfg, self._signals, self._poller.hinted, self._rng
            )
        if cfg.backlog_interval > 0 and not isinstance(self.recorder, NullRecorder):
            # Only for a recorder that uses it: an idle dispatcher should cost one claim per
            # poll interval and nothing else.
            services.start_soon(sample_backlog, c.pool, self._sql, cfg, self.recorder)
        services.start_soon(housekeeping, c.pool, self._sql, cfg)
        services.start_soon(count_capped_backlogs, c.pool, self._sql, self.stats)

    async def _shut_down(self) -> None:
        """Also reached when run() itself is cancelled (an abort): whatever still runs is
        cancelled and gives its lease back (or, if it will not stop, is abandoned), within
        bounds so that neither a handler nor a dead database can hold the process forever."""
        self._accepting = False
        await self._executions.cancel_all()
        if self._connections.pool is not None:
            if self._settler.pending:
                # An abort may have cut a statement short: settle on fresh connections.
                await self._connections.drop_kept()
            with anyio.move_on_after(max(self.config.grace_period, 5.0)):
                await self._settler.drain()
            # Abandoned executions may hold connections (a ctx.kv call) that a graceful
            # close would wait for: end them. The handlers see StoreUnavailable.
            await self._connections.close(terminate=self._executions.abandoned)
        if self._executions.kv_session is not None:
            close_session(self._executions.kv_session)
        self._executions.kv_session = None
        self._settler.close()

    async def run_until_idle(
        self, *, time_limit: float = 60.0, include_scheduled: bool = False
    ) -> Stats:
        """Run until no row is due (or, with ``include_scheduled``, until the outbox is
        empty), then stop gracefully. For tests and scripts."""
        with anyio.fail_after(time_limit):
            async with anyio.create_task_group() as tg:
                await tg.start(self.run)
                try:
                    await self._wait_idle(include_scheduled)
                finally:
                    self.stop()
        return self.stats

    async def invoke(
        self, trigger: int, payload: JsonValue = None, *, time_limit: float = 30.0
    ) -> InvokeResult:
        """Run a trigger's target synchronously and return its reply.

        The call writes a reply-to row and waits; a full execution gate answers 503 at once.
        A caller that times out gets :class:`InvokeTimeout`; if the execution happens
        anyway its result is kept in ``abandoned_executions``.

        >>> result = await dispatcher.invoke(trigger.id, {"amount": 10}, time_limit=5)
        >>> result.status, result.result
        (200, {'approved': True})
        """
        positive("time_limit", time_limit)
        pool = self._connections.pool
        if pool is None or not self._accepting or self._signals.stopping:
            raise NotRunning("invoke() needs a running dispatcher")
        if not self.gate.try_acquire():
            self.stats.gate_saturated += 1
            # Answer at a checkpoint all the same: a caller retrying on 503 in a loop would
            # otherwise never yield, and starve the executions that would free the gate.
            await anyio.lowlevel.checkpoint()
            return InvokeResult(
                503, None, Failure(FailureKind.GATE_SATURATED, "execution gate is full")
            )
        with tracing.invoke_span(trigger):
            return await self._invoke(pool, trigger, payload, time_limit)

    async def _invoke(
        self, pool: asyncpg.Pool, trigger: int, payload: JsonValue, time_limit: float
    ) -> InvokeResult:
        request_id = self.inbox.open()
        started = False
        try:
            async with pool.acquire() as conn:
                t = await TriggerRegistry(schema=self.config.schema).get(conn, trigger)
                event_id = uuid.uuid4()
                body = encode_event(
                    Mutation(t.scope, t.namespace, "invoke", Op.PUT, payload, event_id=event_id),
                    max_bytes=self._emitter.max_payload_bytes,
                )
                record = await conn.fetchrow(
                    self._sql.insert_invocation,
                    event_id,
                    body,
                    0,
                    request_id,
                    self.inbox.inbox_id,
                    float(time_limit),
                    t.id,
                    uuid.uuid4(),
                    self.config.lease_margin,
                    tracing.current_traceparent(),
                )
            assert record is not None
            # Run it here and now with the permit we hold; the execution belongs to the
            # dispatcher, so a caller that stops waiting does not cancel it.
            self._executions.start(claimed_row(record))
            started = True
            with anyio.fail_after(time_limit):
                reply = await self.inbox.wait(request_id)
            return InvokeResult.from_reply(reply)
        except TimeoutError:
            raise InvokeTimeout(f"no reply within {time_limit:g}s") from None
        finally:
            self.inbox.close(request_id)
            if not started:
                self.gate.release()

    # ----- internals -----

    def _busy(self) -> bool:
        return bool(self._executions.in_flight or self._settler.busy or self._poller.claiming)

    async def _wait_idle(self, include_scheduled: bool) -> None:
        pool = self._connections.pool
        assert pool is not None
        signals = self._signals
        while True:
            while self._busy():
                await signals.wait_progress()
            claims = self.stats.claims
            try:
                row = await pool.fetchrow(self._sql.due_count)
            except DB_ERRORS:
                await signals.sleep_or_stop(self.config.poll_interval)
                continue
            assert row is not None
            # A claim that ran while we counted would hide its rows (leased, so not due).
            quiet = not self._busy() and self.stats.claims == claims
            if quiet and row["due"] == 0 and (not include_scheduled or row["total"] == 0):
                return
            # Something is due (or scheduled and we wait for it): let the poller take it.
            wait = self.config.poll_interval
            if row["due"] == 0 and row["next_due_in"] is not None and row["next_due_in"] > 0:
                wait = min(float(row["next_due_in"]), 1.0)
            with anyio.move_on_after(wait):
                await signals.wait_progress()
