"""Executions: one task per admitted row, under a gate permit its caller took; each ends
in a decision handed to the settler. At a stop, what will not end is abandoned."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import cast

import anyio

from dispatcher import tracing
from dispatcher.core.breakers import LocalBreakers
from dispatcher.core.models import JsonValue
from dispatcher.core.outcomes import (
    ClaimedRow,
    DeadLetter,
    ExecutionResult,
    Failure,
    FailureKind,
    Limits,
    Release,
    Success,
)
from dispatcher.core.policy import RandomSource
from dispatcher.core.redact import Redactor
from dispatcher.core.routing import retry_after_clamped, route
from dispatcher.core.sanitize import describe_exception
from dispatcher.runtime.deadlines import run_async
from dispatcher.runtime.gate import ExecutionGate
from dispatcher.runtime.handlers import (
    Executor,
    HandlerContext,
    HandlerRegistry,
    KvHandle,
    StillRunning,
)
from dispatcher.runtime.kv_session import root_of
from dispatcher.runtime.principals import Principal, PrincipalResolver, RegisteredByResolver
from dispatcher.runtime.settle import Decision
from dispatcher.runtime.settler import Settler
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import Recorder, Stats

log = logging.getLogger("dispatcher")

_NO_ATTRIBUTES: Mapping[str, JsonValue] = MappingProxyType({})


def _span_attributes(row: ClaimedRow) -> dict[str, str | int]:
    return {
        "dispatcher.trigger": row.trigger_name,
        "dispatcher.trigger_id": row.trigger_id,
        "dispatcher.scope": row.scope,
        "dispatcher.attempt": row.attempts + 1,
        "dispatcher.depth": row.depth,
        "dispatcher.event_id": str(row.event_id),
        "dispatcher.outbox_id": row.id,
    }


def _decision_name(decision: Decision) -> str:
    """``Complete`` -> ``complete``, ``DeadLetter`` -> ``dead_letter``: the span attribute."""
    name = type(decision).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class Executions:
    def __init__(
        self,
        *,
        executor: Executor,
        principals: PrincipalResolver,
        gate: ExecutionGate,
        settler: Settler,
        signals: Signals,
        stats: Stats,
        recorder: Recorder,
        limits: Limits,
        rng: RandomSource,
        redactor: Redactor,
        abandon_after: float,
        local: LocalBreakers,
    ) -> None:
        self._executor = executor
        self._registry = executor if type(executor) is HandlerRegistry else None
        # The default resolver answers every id with a principal of that id: asked without
        # a coroutine per execution.
        self._principal_is_registrant = type(principals) is RegisteredByResolver
        self._registrants: dict[str, Principal] = {}
        self._local = local
        self._principals = principals
        self._gate = gate
        self._settler = settler
        self._signals = signals
        self._stats = stats
        self.recorder = recorder
        self._limits = limits
        self._rng = rng
        self._redactor = redactor
        self._abandon_after = abandon_after
        # Executions are plain asyncio tasks (asyncpg ties the dispatcher to asyncio anyway):
        # spawning one per row through a task group costs more than a no-op handler.
        self._tasks: dict[asyncio.Task[None], ClaimedRow] = {}
        # Executions a stop gave up on, still running: their outcomes are never written.
        self._abandoned: dict[asyncio.Task[None], ClaimedRow] = {}
        self.in_flight = 0
        # The id handlers' KV handles write through (set while the dispatcher runs).
        self.kv_session: int | None = None

    @property
    def abandoned(self) -> bool:
        return bool(self._abandoned)

    def start(self, row: ClaimedRow) -> None:
        """Run ``row`` under the permit the caller already holds."""
        self.in_flight += 1
        self._local.started(row.trigger_id)
        # No done callback (one more loop callback per row): the execution removes itself
        # from _tasks as its last step, and cancel_all() collects the tasks that never ran.
        self._tasks[asyncio.get_running_loop().create_task(self._execute(row))] = row

    async def cancel_all(self) -> None:
        """Cancel what still runs and wait, at most ``abandon_after`` seconds, for each to
        give its lease back; abandon the ones that do not stop."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        # Shielded: an abort must still collect the leases given back. Bounded: a handler
        # can catch CancelledError and carry on, and a stop must not wait for it. (Not
        # gather: cut short, it would cancel the tasks again.)
        with anyio.CancelScope(shield=True):
            done, running = await asyncio.wait(tasks, timeout=self._abandon_after)
        for task in done:
            row = self._tasks.pop(task, None)
            if row is not None:
                # Cancelled before its first step: not a line of it ran, so its permit and
                # lease are given back here.
                self._finished(row)
                self._settler.submit(row, Release())
        for task in running:
            self._abandon(task, self._tasks.pop(task))

    def _finished(self, row: ClaimedRow) -> None:
        self._gate.release()
        self.in_flight -= 1
        self._local.ended(row.trigger_id)
        self._signals.notify_progress()

    def _abandon(self, task: asyncio.Task[None] | None, row: ClaimedRow) -> None:
        """Give up on an execution that may still be running: its lease is left to expire
        (giving it back would let another claim run it alongside) and whatever it returns
        later is not written. ``task`` is None when its task has ended but its work has not
        (a blocking handler's thread)."""
        if task is not None:
            self._abandoned[task] = row
        self._stats.executions_abandoned += 1
        log.warning(
            "execution would not stop; abandoned, its lease left to expire",
            extra={
                "event": "dispatcher.execution_abandoned",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
            },
        )

    async def _execute(self, row: ClaimedRow) -> None:
        task = cast("asyncio.Task[None]", asyncio.current_task())
        try:
            try:
                if tracing.enabled():
                    decision = await self._decide_traced(row)
                else:
                    decision = await self._decide(row, None)
            except StillRunning:
                # Cancelled, but the executor could not stop the work itself.
                self._abandon(None, row)
                raise
            except asyncio.CancelledError:
                self._submit(row, Release())
                raise
            finally:
                self._finished(row)
            self._submit(row, decision)
            # Told at once, before the settlement commits: this process stops claiming and
            # starting a failing (or rate-limited) trigger's rows now, not a batch later.
            self._local.observe(row, decision, seq=self._settler.submitted, now=time.monotonic())
        finally:
            # Last: _submit() must still see an abandoned execution as abandoned.
            self._tasks.pop(task, None)
            if self._abandoned:
                self._abandoned.pop(task, None)

    def _submit(self, row: ClaimedRow, decision: Decision) -> None:
        if self._abandoned and asyncio.current_task() in self._abandoned:
            # An abandoned execution ended after all: the stop that gave up on it may be
            # long over, so its outcome is dropped and its lease expires as announced.
            log.info(
                "abandoned execution ended; its outcome is not written",
                extra={
                    "event": "dispatcher.abandoned_outcome_dropped",
                    "trigger": row.trigger_name,
                    "scope": row.scope,
                    "outbox_id": row.id,
                },
            )
            return
        self._settler.submit(row, decision)

    async def _decide_traced(self, row: ClaimedRow) -> Decision:
        attributes = _span_attributes(row)
        with tracing.execution_span(row.traceparent, row.trigger_name, attributes) as span:
            return await self._decide(row, span)

    async def _decide(self, row: ClaimedRow, span: tracing.ExecutionSpan | None) -> Decision:
        # Admission (depth, orphans, age) was decided by the poller before the permit.
        self._stats.executed += 1
        started = time.perf_counter()
        try:
            result = await self._run_target(row)
        except Exception as exc:
            # The executor's contract is to return a failure, never to raise: one that
            # raises (a bug, a custom executor) fails this attempt, not the dispatcher.
            result = self._executor_failed(row, exc)
        if isinstance(result, Failure) and retry_after_clamped(row, result, self._limits):
            self._clamped(row, result)
        outcome = "success" if isinstance(result, Success) else result.kind.value
        self.recorder.execution(time.perf_counter() - started, outcome)
        if isinstance(result, Failure) and self._redactor.enabled:
            # Error text is kept in the outbox, dead letters and replies to gone callers.
            # Redact the whole text (the executor keeps up to 64 KiB of it): route() cuts it
            # to 8 KiB only afterwards, so no secret is cut in half before it is seen.
            secrets = self._redactor.secrets_in(row.payload)
            result = replace(result, message=self._redactor.redact_text(result.message, secrets))
        decision = route(row, result, self._limits, self._rng)
        dead = isinstance(decision, DeadLetter)
        self.recorder.trigger_execution(row.trigger_name, outcome, dead)
        if span is not None:
            error = result.message if isinstance(result, Failure) else None
            span.outcome(outcome, _decision_name(decision), error)
        return decision

    def _executor_failed(self, row: ClaimedRow, exc: Exception) -> Failure:
        self._stats.internal_errors += 1
        log.exception(
            "the executor raised instead of returning a result; the attempt failed",
            extra={
                "event": "dispatcher.executor_error",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
            },
        )
        return Failure(
            FailureKind.HANDLER_ERROR, f"executor failed: {describe_exception(exc, limit=2000)}"
        )

    def _clamped(self, row: ClaimedRow, result: ExecutionResult) -> None:
        assert isinstance(result, Failure)
        self._stats.retry_after_clamped += 1
        log.warning(
            "Retry-After longer than max_retry_after; cut to it",
            extra={
                "event": "dispatcher.retry_after_clamped",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
                "retry_after": result.retry_after,
                "max_retry_after": self._limits.max_retry_after,
            },
        )

    async def _run_target(self, row: ClaimedRow) -> ExecutionResult:
        if self._principal_is_registrant:
            principal: Principal | None = self._registrant(row.registered_by)
        else:
            try:
                principal = await self._principals.resolve(row.registered_by)
            except Exception as exc:  # a broken resolver fails this attempt, not the dispatcher
                return Failure(FailureKind.HANDLER_ERROR, f"principal resolver failed: {exc!r}")
        if principal is None:
            return Failure(
                FailureKind.PERMISSION_DENIED,
                f"principal {row.registered_by!r} is unknown or revoked",
            )
        assert self.kv_session is not None
        payload = row.payload if isinstance(row.payload, dict) else {"value": row.payload}
        key = row.idempotency_key
        ctx = HandlerContext(
            payload,
            principal,
            row.attempts + 1,
            key,
            row.scope,
            row.trigger_name,
            row.trigger_id,
            row.depth,
            KvHandle(self.kv_session, row.scope, row.depth, key, root_of(payload, row.event_id)),
        )
        if self._registry is not None:
            # The default executor's async handlers, without its coroutine around them.
            handler = self._registry.async_handler(row.target)
            if handler is not None:
                return await run_async(handler, ctx, row.timeout)
        return await self._executor.execute(row.target, ctx, row.timeout)

    def _registrant(self, principal_id: str) -> Principal:
        """The default resolver's answer (the principal is its id), one object per id: the
        attributes it carries are read-only and empty, so sharing one is safe."""
        principal = self._registrants.get(principal_id)
        if principal is None:
            if len(self._registrants) >= 10_000:
                self._registrants.clear()
            principal = self._registrants[principal_id] = Principal(principal_id, _NO_ATTRIBUTES)
        return principal
