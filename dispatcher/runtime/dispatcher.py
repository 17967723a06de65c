"""The dispatcher: one poller per process claiming due rows, executing them through the
shared gate, and settling their outcomes.

>>> handlers = HandlerRegistry()
>>> d = Dispatcher(dsn, handlers)
>>> async with anyio.create_task_group() as tg:
...     await tg.start(d.run)
...     ...
...     d.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeAlias

import anyio
import anyio.lowlevel
import asyncpg
from anyio.abc import TaskStatus
from asyncpg.pool import PoolConnectionProxy

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import MAX_DELAY_SECONDS, JsonValue, Mutation, Op, RetryPolicy
from dispatcher.core.outcomes import (
    ClaimedRow,
    DeadLetter,
    DeadLetterReason,
    ErrorRecord,
    ExecutionResult,
    Failure,
    FailureKind,
    Limits,
    Outcome,
    Reschedule,
    Retry,
    Success,
)
from dispatcher.core.policy import RandomSource
from dispatcher.core.redact import DEFAULT_REDACT_KEYS, Redactor
from dispatcher.core.routing import admit, route
from dispatcher.core.sanitize import describe_exception
from dispatcher.db import Connection
from dispatcher.emit import Emitter, Enqueued, encode_event
from dispatcher.kv import EmitGuard, KvEntry, KvStore, KvWrite
from dispatcher.runtime.gate import ExecutionGate
from dispatcher.runtime.handlers import (
    Executor,
    HandlerContext,
    KvHandle,
    StillRunning,
    StoreUnavailable,
    close_session,
    open_session,
)
from dispatcher.runtime.inbox import InProcessInbox, InvokeResult
from dispatcher.runtime.principals import PrincipalResolver, RegisteredByResolver
from dispatcher.runtime.settle import (
    Applier,
    BreakerSettings,
    Decision,
    Release,
    Settlement,
)
from dispatcher.runtime.stats import NullRecorder, Phase, Recorder, Stats, StatusSnapshot
from dispatcher.schema import DEFAULT_SCHEMA
from dispatcher.sql import queries
from dispatcher.triggers import TriggerRegistry, policy_from_record

log = logging.getLogger("dispatcher")

# After a wake-up hint, poll every LINGER_POLL seconds for NOTIFY_LINGER seconds.
NOTIFY_LINGER = 0.05
LINGER_POLL = 0.005

PoolConnection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Failures of the database or the connection to it: never a handler failure, never an
# attempt consumed; the loop backs off and reconnects.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # What asyncpg raises when the server ends a connection mid-statement and the next
    # statement finds the protocol still busy ("cannot switch to state …").
    asyncpg.InternalClientError,
)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise InvalidInput(name, value, "must be a positive number")
    # Durations reach SQL interval arithmetic: past this, a timestamp overflows.
    if value > MAX_DELAY_SECONDS:
        raise InvalidInput(name, value, f"must be at most {MAX_DELAY_SECONDS:.0f} seconds")


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    """Tuning for one dispatcher process. Durations are in seconds."""

    schema: str = DEFAULT_SCHEMA
    poll_interval: float = 0.1
    # Twice the batch in permits: the next claim is already on the wire while the rows of
    # the last one execute (measured: 11.2k rows/s at 100/100, 15.3k at 200/400, no-op
    # handler, docs/benchmarks.md).
    batch_size: int = 200
    concurrency: int = 400
    lease_margin: float = 5.0
    max_trigger_depth: int = 8
    grace_period: float = 10.0
    # Past the grace period (at once on an abort), how long cancelled executions get to
    # stop. One that is still running then (its handler swallowed the cancellation, or is
    # a thread) is abandoned: its lease is left to expire, since it may still be running,
    # and its result is never written. Bounds a stop by grace_period + abandon_after.
    abandon_after: float = 2.0
    listen: bool = True
    max_error_history: int = 20
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    gate_retry_delay: float = 0.05
    max_rate_limited_age: float = 86_400.0
    application_name: str = "dispatcher"
    pool_size: int = 4
    # How often the backlog (due rows, oldest due age) is sampled for metrics; 0 disables.
    backlog_interval: float = 5.0
    # Consecutive counted failures (handler error, timeout, target not found, permission
    # denied) of one trigger that open its circuit breaker; 0 disables breakers.
    breaker_threshold: int = 3
    breaker_cooldown: float = 60.0
    # Parked rows of a trigger released by each success of that trigger.
    unpark_batch: int = 100
    # Name fragments: the value of a key containing one never reaches dead_letters,
    # abandoned_executions or error histories (compared in lower case, '-' and '_' left out:
    # "password" covers "db_password", "api_key" covers "X-Api-Key"); the same goes for
    # key=value pairs in error text, and URL passwords are masked whenever this is not empty.
    # () turns redaction off. A replayed dead letter runs with its redacted payload: keep
    # credentials out of events.
    redact_keys: tuple[str, ...] = tuple(sorted(DEFAULT_REDACT_KEYS))
    # Rows that handler writes descending from one user mutation may enqueue, all depths
    # together: stops fan-out recursion that stays under the depth limit. None: no limit.
    max_executions_per_root: int | None = 10_000
    # How long a root's count is kept (it only matters while its tree still runs).
    root_budget_ttl: float = 86_400.0
    # How long rows stopped by the depth limit stay in depth_cutoffs.
    depth_cutoff_retention: float = 7 * 86_400.0
    # Outcomes waiting to be written beyond which the poller stops claiming (settlements
    # that stall, on locks or a slow disk, must not let memory and leases grow without
    # bound). Executions already running may still add theirs.
    max_pending_settlements: int = 2_000

    def __post_init__(self) -> None:
        for name in (
            "poll_interval",
            "lease_margin",
            "reconnect_min",
            "reconnect_max",
            "abandon_after",
        ):
            _positive(name, getattr(self, name))
        for name in ("grace_period", "gate_retry_delay", "backlog_interval"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("max_rate_limited_age", self.max_rate_limited_age)
        _positive("breaker_cooldown", self.breaker_cooldown)
        _positive("root_budget_ttl", self.root_budget_ttl)
        _positive("depth_cutoff_retention", self.depth_cutoff_retention)
        budget = self.max_executions_per_root
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise InvalidInput("max_executions_per_root", budget, "must be a positive int or None")
        if not isinstance(self.breaker_threshold, int) or self.breaker_threshold < 0:
            raise InvalidInput("breaker_threshold", self.breaker_threshold, "must be >= 0")
        for name in (
            "batch_size",
            "concurrency",
            "max_error_history",
            "pool_size",
            "unpark_batch",
            "max_pending_settlements",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(name, value, "must be a positive integer")
        Redactor(frozenset(self.redact_keys))  # refuses a fragment too short to be one
        if self.pool_size < 2:
            raise InvalidInput("pool_size", self.pool_size, "must be at least 2")
        if not isinstance(self.max_trigger_depth, int) or self.max_trigger_depth < 0:
            raise InvalidInput("max_trigger_depth", self.max_trigger_depth, "must be >= 0")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_trigger_depth=self.max_trigger_depth,
            gate_retry_delay=self.gate_retry_delay,
            max_rate_limited_age=self.max_rate_limited_age,
        )


class InvokeTimeout(TimeoutError):
    """A synchronous call gave up waiting; the execution, if it happens, is recorded in
    ``abandoned_executions``."""


class NotRunning(RuntimeError):
    """The operation needs a running dispatcher (``run`` or ``run_until_idle``)."""


_POLICIES: dict[tuple[object, ...], RetryPolicy] = {}


def _policy(r: asyncpg.Record) -> RetryPolicy:
    # Rows of one trigger share one snapshot: validate it once, not once per row.
    key = (
        r["retry_kind"],
        r["retry_base_delay"],
        r["retry_factor"],
        r["retry_max_delay"],
        r["retry_jitter"],
        r["max_attempts"],
        r["max_event_age"],
        tuple(r["park_on"]),
    )
    policy = _POLICIES.get(key)
    if policy is None:
        if len(_POLICIES) > 10_000:
            _POLICIES.clear()
        policy = _POLICIES[key] = policy_from_record(r)
    return policy


def _row_from_record(r: asyncpg.Record) -> ClaimedRow:
    """The claimed row as routing sees it. Raises on a row that cannot be decoded (see
    :func:`_undecodable_row`)."""
    return ClaimedRow(
        id=r["id"],
        lease_token=r["lease_token"],
        event_id=r["event_id"],
        trigger_id=r["trigger_id"],
        scope=r["scope"],
        trigger_name=r["trigger_name"],
        target=r["target"],
        registered_by=r["registered_by"],
        payload=json.loads(r["payload"]),
        attempts=r["attempts"],
        orphans=r["orphans"],
        depth=r["depth"],
        reply_to=r["reply_to"],
        dead_letter_id=r["dead_letter_id"],
        policy=_policy(r),
        timeout=r["timeout"],
        age=r["age"],
    )


UNDECODABLE_PAYLOAD = "payload withheld: it could not be decoded"


def _undecodable_row(r: asyncpg.Record) -> ClaimedRow:
    """What can be read of a claimed row that :func:`_row_from_record` refused: enough to
    settle it. A payload the decoder cannot follow is replaced by a note (it could not be
    redacted either); a policy out of range by the default one, which is never used to
    run it."""
    try:
        payload: JsonValue = json.loads(r["payload"])
    except Exception:  # RecursionError for nesting past the decoder's depth, among others
        payload = {"undecodable": UNDECODABLE_PAYLOAD}
    return ClaimedRow(
        id=r["id"],
        lease_token=r["lease_token"],
        event_id=r["event_id"],
        trigger_id=r["trigger_id"],
        scope=r["scope"],
        trigger_name=r["trigger_name"],
        target=r["target"],
        registered_by=r["registered_by"],
        payload=payload,
        attempts=r["attempts"],
        orphans=r["orphans"],
        depth=r["depth"],
        reply_to=r["reply_to"],
        dead_letter_id=r["dead_letter_id"],
        policy=RetryPolicy(),
        timeout=1.0,
        age=r["age"],
    )


# SQLSTATE classes of errors a handler's own values cause (data exception, integrity
# constraint violation, program limit exceeded: a value the kv table cannot store, a key
# too long for its index). Those stay the handler's errors; every other database error
# under ctx.kv is the dispatcher's database failing.
_HANDLER_DATA_CLASSES = frozenset({"22", "23", "54"})


@contextlib.contextmanager
def _store_faults() -> Iterator[None]:
    """Raise a database fault under a handler's KV call as :class:`StoreUnavailable`, so
    that it is classified as the dispatcher's (no attempt used, no breaker fed), not the
    handler's."""
    try:
        yield
    except DB_ERRORS as exc:
        state = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
        if isinstance(state, str) and state[:2] in _HANDLER_DATA_CLASSES:
            raise
        raise StoreUnavailable(
            f"the dispatcher's database failed: {describe_exception(exc, limit=500)}"
        ) from exc


class _PoolKv:
    """Handler KV writes through the dispatcher's pool; never exposed to handlers."""

    __slots__ = ("_guard", "_kv", "_pool")

    def __init__(self, pool: asyncpg.Pool, kv: KvStore, guard: EmitGuard | None) -> None:
        self._pool = pool
        self._kv = kv
        self._guard = guard

    async def put(
        self,
        scope: str,
        namespace: str,
        key: str,
        value: JsonValue,
        depth: int,
        event: uuid.UUID,
        root: uuid.UUID,
    ) -> KvWrite:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.put(
                    conn,
                    scope,
                    namespace,
                    key,
                    value,
                    depth=depth,
                    event_id=event,
                    root_id=root,
                    guard=self._guard,
                )

    async def delete(
        self, scope: str, namespace: str, key: str, depth: int, event: uuid.UUID, root: uuid.UUID
    ) -> KvWrite:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.delete(
                    conn,
                    scope,
                    namespace,
                    key,
                    depth=depth,
                    event_id=event,
                    root_id=root,
                    guard=self._guard,
                )

    async def get(self, scope: str, namespace: str, key: str) -> KvEntry | None:
        with _store_faults():
            async with self._pool.acquire() as conn:
                return await self._kv.get(conn, scope, namespace, key)


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
        self.config = config or DispatcherConfig()
        self.recorder: Recorder = recorder or NullRecorder()
        self._dsn = dsn
        self._executor = executor
        self._principals = principals or RegisteredByResolver()
        self._emitter = emitter or Emitter(schema=self.config.schema)
        self._rng: RandomSource = rng or random.Random()
        self._sql = queries(self.config.schema)
        self._limits = self.config.limits
        self._redactor = Redactor(frozenset(self.config.redact_keys))
        self.gate = ExecutionGate(self.config.concurrency)
        self.inbox = InProcessInbox()
        self.stats = Stats()
        self._applier = Applier(
            self._sql,
            self.inbox,
            self.stats,
            max_error_history=self.config.max_error_history,
            breaker=BreakerSettings(self.config.breaker_threshold, self.config.breaker_cooldown),
            unpark_batch=self.config.unpark_batch,
            redactor=self._redactor,
        )
        self._pool: asyncpg.Pool | None = None
        self._claim_conn: PoolConnection | None = None
        self._settle_conn: PoolConnection | None = None
        # Executions are plain asyncio tasks (asyncpg ties the dispatcher to asyncio anyway):
        # spawning one per row through a task group costs more than a no-op handler.
        self._tasks: dict[asyncio.Task[None], ClaimedRow] = {}
        # Executions a stop gave up on, still running: their outcomes are never written.
        self._abandoned: dict[asyncio.Task[None], ClaimedRow] = {}
        self._accepting = False
        self._kv_session: int | None = None
        self._phase = Phase.STOPPED
        self._running = False
        self._stopping = False
        self._draining = False
        self._wake = anyio.Event()
        self._progress = asyncio.Event()
        self._progress_waiting = 0
        self._pending: list[Settlement] = []
        self._settle_wake = asyncio.Event()
        self._settling = False
        self._claiming = False
        self._last_notify = -1e9
        self._in_flight = 0
        self._last_error: str | None = None
        self._consecutive_failures = 0
        self._backoff_until: datetime | None = None
        self._last_claim_at: datetime | None = None
        # Fires when the soonest row this process rescheduled within a poll interval is due.
        self._retry_timer: asyncio.TimerHandle | None = None

    # ----- public surface -----

    def status(self) -> StatusSnapshot:
        """A point-in-time view for health checks and ``dispatcher status``."""
        return StatusSnapshot(
            phase=self._phase,
            in_flight=self._in_flight,
            last_error=self._last_error,
            consecutive_failures=self._consecutive_failures,
            backoff_until=self._backoff_until,
            last_claim_at=self._last_claim_at,
            gate_capacity=self.gate.capacity,
            gate_free=self.gate.free,
            stats=self.stats.as_dict(),
        )

    async def progressed(self) -> None:
        """Return at the next change in execution or settlement (progress displays, tests)."""
        await self._wait_progress()

    def drain(self) -> None:
        """Stop claiming (in-flight work finishes) but keep running: for an upgrade or a
        maintenance window. :meth:`resume` picks up again without a restart."""
        self._draining = True
        log.warning("dispatcher draining", extra={"event": "dispatcher.draining"})

    def resume(self) -> None:
        """Leave drain mode and claim again at once."""
        if self._draining:
            self._draining = False
            log.warning("dispatcher resumed", extra={"event": "dispatcher.resumed"})
        self._wake.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def wake(self) -> None:
        """Claim now instead of at the next poll tick."""
        self._wake.set()

    def stop(self) -> None:
        """Begin a graceful stop: claim nothing more, let in-flight work finish within the
        grace period, cancel what did not finish and give its lease back, then return from
        ``run``. An execution that ignores its cancellation for ``abandon_after`` more
        seconds is abandoned: left running, its lease left to expire, its outcome dropped."""
        self._stopping = True
        self._wake.set()
        self._progress_waiting += 1
        self._notify_progress()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop`. Reports started once connected (for ``tg.start``)."""
        if self._running:
            raise RuntimeError("this dispatcher is already running")
        self._running = True
        self._stopping = False
        self._phase = Phase.STARTING
        try:
            await self._open_pool()
            if self._pool is None:  # stopped before the database ever answered
                task_status.started()
                return
            async with anyio.create_task_group() as services:
                services.start_soon(self._settle_loop)
                if self.config.listen:
                    services.start_soon(self._listen_loop)
                if self.config.backlog_interval > 0 and not isinstance(self.recorder, NullRecorder):
                    # Only for a recorder that uses it: an idle dispatcher should cost one
                    # claim per poll interval and nothing else.
                    services.start_soon(self._sample_backlog)
                services.start_soon(self._housekeeping)
                task_status.started()
                log.info(
                    "dispatcher started",
                    extra={"event": "dispatcher.started", "schema": self.config.schema},
                )
                await self._poll_loop()
                # Final writes: outcomes of everything that ran, and lease releases.
                with anyio.CancelScope(shield=True):
                    await self._drain_settlements()
                services.cancel_scope.cancel()
        finally:
            # Also reached when run() itself is cancelled (an abort): whatever still runs is
            # cancelled and gives its lease back (or, if it will not stop, is abandoned),
            # within bounds so that neither a handler nor a dead database can hold the
            # process forever.
            with anyio.CancelScope(shield=True):
                await self._cancel_executions()
                if self._pool is not None:
                    if self._pending:
                        # An abort may have cut a statement short: settle on fresh
                        # connections.
                        await self._drop_connections()
                    with anyio.move_on_after(max(self.config.grace_period, 5.0)):
                        await self._drain_settlements()
                    await self._drop_connections()
                    if self._abandoned:
                        # They may hold connections (a ctx.kv call) that a graceful close
                        # would wait for: end them. The handlers see StoreUnavailable.
                        self._pool.terminate()
                    else:
                        # Cut short, asyncpg's close terminates what is left.
                        with anyio.move_on_after(self.config.abandon_after):
                            await self._pool.close()
                self._pool = None
                if self._kv_session is not None:
                    close_session(self._kv_session)
                self._kv_session = None
            if self._retry_timer is not None:
                self._retry_timer.cancel()
                self._retry_timer = None
            self._phase = Phase.STOPPED
            self._running = False
            log.info("dispatcher stopped", extra={"event": "dispatcher.stopped"})

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
        _positive("time_limit", time_limit)
        if self._pool is None or not self._accepting or self._stopping:
            raise NotRunning("invoke() needs a running dispatcher")
        if not self.gate.try_acquire():
            self.stats.gate_saturated += 1
            # Answer at a checkpoint all the same: a caller retrying on 503 in a loop would
            # otherwise never yield, and starve the executions that would free the gate.
            await anyio.lowlevel.checkpoint()
            return InvokeResult(
                503, None, Failure(FailureKind.GATE_SATURATED, "execution gate is full")
            )
        request_id = self.inbox.open()
        started = False
        try:
            async with self._pool.acquire() as conn:
                t = await self._registry().get(conn, trigger)
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
                )
            assert record is not None
            # Run it here and now with the permit we hold; the execution belongs to the
            # dispatcher, so a caller that stops waiting does not cancel it.
            self._start_execution(_row_from_record(record))
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

    def _registry(self) -> TriggerRegistry:
        return TriggerRegistry(schema=self.config.schema)

    async def _open_pool(self) -> None:
        delay = self.config.reconnect_min
        while not self._stopping:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=2,
                    # pool_size for handler writes, sync calls and sampling, plus the
                    # poller's and the settler's own connections.
                    max_size=self.config.pool_size + 2,
                    server_settings=self._session_settings(self.config.application_name),
                )
                guard = None if self.config.max_executions_per_root is None else self._root_budget
                self._kv_session = open_session(_PoolKv(self._pool, KvStore(self._emitter), guard))
                self._db_ok()
                return
            except DB_ERRORS as exc:
                delay = await self._db_failed(exc, delay)

    async def _root_budget(
        self, conn: Connection, mutation: Mutation, enqueued: Sequence[Enqueued]
    ) -> bool:
        """Inside the handler write's savepoint: keep its rows while the root's tree is
        within budget; past it, roll the rows back (the KV write itself stays)."""
        budget = self.config.max_executions_per_root
        if budget is None or not enqueued:
            return True
        total = await conn.fetchval(self._sql.root_budget_add, mutation.root, len(enqueued))
        if total <= budget:
            return True
        self.stats.budget_exceeded += len(enqueued)
        log.warning(
            "per-root execution budget exhausted; rows not enqueued",
            extra={
                "event": "dispatcher.budget_exceeded",
                "scope": mutation.scope,
                "rows": len(enqueued),
                "budget": budget,
            },
        )
        return False

    @staticmethod
    def _session_settings(application_name: str) -> dict[str, str]:
        # JIT compiling a claim costs far more than running it (hundreds of ms against a
        # millisecond), and the planner's cost estimates for tiny control tables can cross
        # jit_above_cost: keep it off for the dispatcher's own sessions.
        #
        # synchronous_commit=off for the dispatcher's own writes (claims, settlements,
        # handler KV writes): a server crash can lose only the last ~200 ms of them, always
        # a suffix in commit order, and losing any of them only makes a row run again,
        # which at-least-once delivery allows. Producers' emits keep the server's setting:
        # they commit in the host's transaction, on the host's connection.
        return {
            "application_name": application_name,
            "jit": "off",
            "synchronous_commit": "off",
        }

    def _db_ok(self) -> None:
        if self._consecutive_failures:
            log.warning(
                "database reachable again",
                extra={
                    "event": "dispatcher.db_recovered",
                    "failures": self._consecutive_failures,
                },
            )
        self._consecutive_failures = 0
        self._backoff_until = None

    async def _db_failed(self, exc: BaseException, delay: float) -> float:
        self.stats.db_errors += 1
        self._last_error = describe_exception(exc, limit=500)
        if self._consecutive_failures == 0:
            log.error(
                "database unavailable; backing off: %s",
                self._last_error,
                extra={"event": "dispatcher.db_unavailable", "error": self._last_error},
            )
        self._consecutive_failures += 1
        self._phase = Phase.BACKOFF
        self._backoff_until = datetime.now(UTC) + timedelta(seconds=delay)
        await self._sleep_or_stop(delay)
        return min(delay * 2, self.config.reconnect_max)

    async def _sleep_or_stop(self, seconds: float) -> None:
        if self._stopping:
            return
        with anyio.move_on_after(seconds):
            while not self._stopping:
                self._wake = anyio.Event()
                await self._wake.wait()

    # The poller and the settler each keep one connection from the pool for as long as it
    # works: acquiring per statement would add the pool's reset query to every round trip.
    async def _claim_connection(self) -> PoolConnection:
        if self._claim_conn is not None and _closed(self._claim_conn):
            await self._drop_connection("_claim_conn")
        if self._claim_conn is None:
            assert self._pool is not None
            self._claim_conn = await self._pool.acquire()
        return self._claim_conn

    async def _settle_connection(self) -> PoolConnection:
        if self._settle_conn is not None and _closed(self._settle_conn):
            await self._drop_connection("_settle_conn")
        if self._settle_conn is None:
            assert self._pool is not None
            self._settle_conn = await self._pool.acquire()
        return self._settle_conn

    async def _drop_connection(self, name: str) -> None:
        conn: PoolConnection | None = getattr(self, name)
        setattr(self, name, None)
        if conn is None or self._pool is None:
            return
        # After a database error the protocol may be wedged mid-statement: close it hard
        # rather than let the pool try to reset it.
        with contextlib.suppress(Exception):
            conn.terminate()
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=5)

    async def _drop_connections(self) -> None:
        # One outage breaks both kept connections: replace both, so the second loop does
        # not report the same outage again when it next uses its dead one.
        await self._drop_connection("_claim_conn")
        await self._drop_connection("_settle_conn")

    def _on_notify(self, *_: object) -> None:
        self._last_notify = time.monotonic()
        self._wake.set()

    def _is_stopping(self) -> bool:
        # A method, not the attribute: the flag flips while this task awaits.
        return self._stopping

    def _notify_progress(self) -> None:
        # Called per row: only pay for an event when someone waits.
        if self._progress_waiting:
            self._progress_waiting = 0
            self._progress.set()
            self._progress = asyncio.Event()

    async def _poll_loop(self) -> None:
        assert self._pool is not None
        cfg = self.config
        delay = cfg.reconnect_min
        # Claim again once this many permits are free (or nothing runs): one claim of half a
        # batch instead of many claims of a row or two as executions trickle out.
        refill = max(1, min(cfg.batch_size, cfg.concurrency) // 2)
        self._accepting = True
        while not self._stopping:
            if len(self._pending) >= cfg.max_pending_settlements:
                # Settlements are behind (a lock, a slow disk, an outage of the settler's
                # connection): claiming more would only add leases and memory.
                self._phase = Phase.SETTLING
                with anyio.move_on_after(cfg.poll_interval):
                    await self._wait_progress()
                continue
            if self._draining:
                self._phase = Phase.DRAINING
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            if self.gate.free < refill and self._in_flight:
                self._phase = Phase.EXECUTING
                # Bounded: stop() and drain() must not wait for executions to end by
                # themselves, and permits held by slow or hung executions must not stop the
                # free ones from being used for longer than a poll interval.
                with anyio.move_on_after(cfg.poll_interval):
                    await self.gate.wait_free(refill)
                if self._is_stopping() or self._draining or self.gate.free == 0:
                    continue
            want = min(cfg.batch_size, self.gate.free)
            if want == 0:  # permits held by synchronous calls alone
                await self.gate.wait_free(1)
                continue
            self._wake = anyio.Event()
            self._phase = Phase.CLAIMING
            self._claiming = True
            started = time.perf_counter()
            try:
                conn = await self._claim_connection()
                records = await conn.fetch(
                    self._sql.claim,
                    want,
                    uuid.uuid4(),
                    self.inbox.inbox_id,
                    cfg.lease_margin,
                )
            except DB_ERRORS as exc:
                self._claiming = False
                self._notify_progress()
                await self._drop_connections()
                delay = await self._db_failed(exc, delay)
                continue
            delay = cfg.reconnect_min
            self._db_ok()
            self._last_claim_at = datetime.now(UTC)
            self.stats.claims += 1
            self.stats.claimed_rows += len(records)
            self.recorder.claim(time.perf_counter() - started, len(records))
            for record in records:
                try:
                    row = _row_from_record(record)
                except Exception as exc:
                    # A poison row (written by another client, or nested past what the
                    # decoder follows) must not end the loop nor keep its batch leased.
                    self._submit_undecodable(record, exc)
                    continue
                if self._is_stopping():
                    self._submit(row, Release())
                    continue
                if not self.gate.try_acquire():
                    self.stats.gate_saturated += 1
                    outcome = route(
                        row,
                        Failure(FailureKind.GATE_SATURATED, "execution gate is full"),
                        self._limits,
                        self._rng,
                    )
                    self._submit(row, outcome)
                    continue
                self._start_execution(row)
            self._claiming = False
            self._notify_progress()
            if len(records) == want and not self._is_stopping():
                continue  # a full batch: more is probably due, claim again at once
            self._phase = Phase.EXECUTING if self._in_flight else Phase.IDLE
            # Ticks start every poll interval, whatever the claim took: a row that became
            # due waits at most one interval (plus a claim), not an interval plus the claim
            # and the dispatch of its batch.
            wait = max(0.0, cfg.poll_interval - (time.perf_counter() - started))
            if time.monotonic() - self._last_notify < NOTIFY_LINGER:
                # Producers send at most one hint per notify_interval: while hints keep
                # coming, poll again soon for rows whose hint was folded into an earlier one.
                wait = min(wait, LINGER_POLL)
            with anyio.move_on_after(wait):
                await self._wake.wait()
        self._phase = Phase.STOPPING
        with anyio.move_on_after(cfg.grace_period):
            while self._in_flight:
                await self._wait_progress()
        # Past the grace period: cancel what still runs; each gives its lease back.
        await self._cancel_executions()

    def _submit_undecodable(self, record: asyncpg.Record, exc: Exception) -> None:
        try:
            row = _undecodable_row(record)
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
        self.stats.undecodable += 1
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
        outcome: Outcome
        if row.reply_to is not None or row.dead_letter_id is not None:
            # A caller waits, or a dead letter does: answer them as a permanent failure.
            outcome = route(row, Failure(FailureKind.PERMANENT, message), self._limits, self._rng)
        else:
            error = ErrorRecord(row.attempts + 1, FailureKind.PERMANENT, message)
            outcome = DeadLetter(DeadLetterReason.UNDECODABLE, row.attempts, error)
        self._submit(row, outcome)

    async def _cancel_executions(self) -> None:
        """Cancel what still runs and wait, at most ``abandon_after`` seconds, for each to
        give its lease back; abandon the ones that do not stop."""
        self._accepting = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        # Shielded: an abort must still collect the leases given back. Bounded: a handler
        # can catch CancelledError and carry on, and a stop must not wait for it. (Not
        # gather: cut short, it would cancel the tasks again.)
        with anyio.CancelScope(shield=True):
            _, running = await asyncio.wait(tasks, timeout=self.config.abandon_after)
        for task in running:
            self._abandon(task, self._tasks.pop(task))

    def _abandon(self, task: asyncio.Task[None] | None, row: ClaimedRow) -> None:
        """Give up on an execution that may still be running: its lease is left to expire
        (giving it back would let another claim run it alongside) and whatever it returns
        later is not written. ``task`` is None when its task has ended but its work has not
        (a blocking handler's thread)."""
        if task is not None:
            self._abandoned[task] = row
        self.stats.executions_abandoned += 1
        log.warning(
            "execution would not stop; abandoned, its lease left to expire",
            extra={
                "event": "dispatcher.execution_abandoned",
                "trigger": row.trigger_name,
                "scope": row.scope,
                "outbox_id": row.id,
            },
        )

    def _start_execution(self, row: ClaimedRow) -> None:
        """Run ``row`` under the permit the caller already holds."""
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._execute(row))
        self._tasks[task] = row
        task.add_done_callback(self._execution_ended)

    def _execution_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._abandoned.pop(task, None)

    async def _wait_progress(self) -> None:
        self._progress_waiting += 1
        await self._progress.wait()

    async def _execute(self, row: ClaimedRow) -> None:
        try:
            decision: Decision = await self._decide(row)
        except StillRunning:
            # Cancelled, but the executor could not stop the work itself.
            self._abandon(None, row)
            raise
        except asyncio.CancelledError:
            self._submit(row, Release())
            raise
        finally:
            self.gate.release()
            self._in_flight -= 1
            self._notify_progress()
        self._submit(row, decision)

    async def _decide(self, row: ClaimedRow) -> Decision:
        early = admit(row, self._limits)
        if early is not None:
            return early
        self.stats.executed += 1
        started = time.perf_counter()
        result = await self._run_target(row)
        self.recorder.execution(
            time.perf_counter() - started,
            "success" if isinstance(result, Success) else result.kind.value,
        )
        if isinstance(result, Failure) and self._redactor.enabled:
            # Error text is kept in the outbox, dead letters and replies to gone callers.
            # Redact the whole text (the executor keeps up to 64 KiB of it): route() cuts it
            # to 8 KiB only afterwards, so no secret is cut in half before it is seen.
            secrets = self._redactor.secrets_in(row.payload)
            result = replace(result, message=self._redactor.redact_text(result.message, secrets))
        return route(row, result, self._limits, self._rng)

    async def _run_target(self, row: ClaimedRow) -> ExecutionResult:
        try:
            principal = await self._principals.resolve(row.registered_by)
        except Exception as exc:  # a broken resolver fails this attempt, not the dispatcher
            return Failure(FailureKind.HANDLER_ERROR, f"principal resolver failed: {exc!r}")
        if principal is None:
            return Failure(
                FailureKind.PERMISSION_DENIED,
                f"principal {row.registered_by!r} is unknown or revoked",
            )
        assert self._kv_session is not None
        payload = row.payload if isinstance(row.payload, dict) else {"value": row.payload}
        key = row.idempotency_key
        root = _root_of(payload, row.event_id)
        ctx = HandlerContext(
            event=payload,
            principal=principal,
            attempt=row.attempts + 1,
            idempotency_key=key,
            scope=row.scope,
            trigger_name=row.trigger_name,
            trigger_id=row.trigger_id,
            depth=row.depth,
            kv=KvHandle(self._kv_session, row.scope, row.depth, key, root),
        )
        return await self._executor.execute(row.target, ctx, row.timeout)

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
        self._pending.append(Settlement(row, decision))
        if not self._settle_wake.is_set():
            self._settle_wake.set()

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            await self._settle_pending()

    async def _settle_pending(self) -> None:
        """Apply everything queued, retrying through database errors (outcomes are kept
        until written; a lease lost meanwhile makes them stale, which the fence detects)."""
        assert self._pool is not None
        delay = self.config.reconnect_min
        while self._pending:
            batch, self._pending = self._pending, []
            self._settling = True
            try:
                conn = await self._settle_connection()
                await self._applier.apply(conn, batch)
                self._wake_when_due(batch)
                delay = self.config.reconnect_min
            except asyncio.CancelledError:
                # Aborted mid-batch: keep the outcomes for the final drain (a batch that had
                # committed is fenced, so applying it again changes nothing).
                self._pending = batch + self._pending
                raise
            except DB_ERRORS as exc:
                self._pending = batch + self._pending
                self._settling = False
                await self._drop_connections()
                if self._stopping and self._consecutive_failures > 50:
                    log.error(
                        "giving up on final writes; leases will expire",
                        extra={"event": "dispatcher.settle_abandoned", "rows": len(batch)},
                    )
                    self._pending = []
                    return
                delay = await self._db_failed(exc, delay)
                continue
            finally:
                self._settling = False
            self._notify_progress()

    def _wake_when_due(self, batch: Sequence[Settlement]) -> None:
        """Claim again when the soonest row just rescheduled is due, if that is sooner than
        the next poll: a short backoff (or a gate-saturated row) is not stretched to a poll
        interval, and no hint is sent for rows we put back ourselves."""
        soonest = min(
            (s.decision.delay for s in batch if isinstance(s.decision, Retry | Reschedule)),
            default=None,
        )
        if soonest is None or soonest >= self.config.poll_interval or self._stopping:
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
        self._wake.set()

    async def _drain_settlements(self) -> None:
        while self._pending or self._settling:
            if self._settling:
                await self._wait_progress()
            else:
                await self._settle_pending()

    async def _listen_loop(self) -> None:
        delay = self.config.reconnect_min
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    server_settings=self._session_settings(
                        f"{self.config.application_name}:listen"
                    ),
                )
                lost = anyio.Event()
                conn.add_termination_listener(partial(_set_event, lost))
                await conn.add_listener(self._sql.channel, self._on_notify)
                delay = self.config.reconnect_min
                self._wake.set()  # catch up on anything sent while we were not listening
                await lost.wait()
            except DB_ERRORS:
                await self._sleep_or_stop(delay)
                delay = min(delay * 2, self.config.reconnect_max)
            finally:
                if conn is not None:
                    conn.terminate()

    async def _sample_backlog(self) -> None:
        assert self._pool is not None
        while True:
            try:
                row = await self._pool.fetchrow(self._sql.backlog_sample, 100_000)
            except DB_ERRORS:
                pass  # the poll loop reports database trouble; a missed sample is harmless
            else:
                assert row is not None
                self.recorder.backlog(int(row["due"]), float(row["oldest_due_seconds"]))
            await anyio.sleep(self.config.backlog_interval)

    async def _housekeeping(self) -> None:
        """Expire what the library keeps for a while: per-root budgets, depth cutoffs."""
        assert self._pool is not None
        cfg = self.config
        budgets = cfg.max_executions_per_root is not None
        every = min(cfg.depth_cutoff_retention, 600.0)
        if budgets:
            every = min(every, cfg.root_budget_ttl)
        while True:
            with contextlib.suppress(*DB_ERRORS):
                if budgets:
                    await self._pool.execute(self._sql.root_budget_expire, cfg.root_budget_ttl)
                await self._pool.execute(self._sql.depth_cutoffs_expire, cfg.depth_cutoff_retention)
            await anyio.sleep(every)

    def _busy(self) -> bool:
        return bool(self._in_flight or self._pending or self._settling or self._claiming)

    async def _wait_idle(self, include_scheduled: bool) -> None:
        assert self._pool is not None
        while True:
            while self._busy():
                await self._wait_progress()
            claims = self.stats.claims
            try:
                row = await self._pool.fetchrow(self._sql.due_count)
            except DB_ERRORS:
                await self._sleep_or_stop(self.config.poll_interval)
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
                await self._wait_progress()


def _root_of(payload: Mapping[str, JsonValue], event_id: uuid.UUID) -> uuid.UUID | str:
    root = payload.get("root")
    # Left as text: the handle parses it on the first write, and most executions write nothing.
    return root if isinstance(root, str) else event_id


def _closed(conn: PoolConnection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # a proxy the pool already took back
        return True


def _set_event(event: anyio.Event, *_: object) -> None:
    event.set()
