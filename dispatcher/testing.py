"""Helpers for testing your own triggers and handlers against a real Postgres.

- :func:`drain` runs a dispatcher until the outbox is empty (scheduled retries included)
  and returns its :class:`~dispatcher.Stats`, failing after a time limit.
- :func:`dead_letters` reads what ended in ``dead_letters``, oldest first.
- :class:`RecordingHandlers` is a :class:`~dispatcher.HandlerRegistry` that records every
  call and its result, with shortcuts for handlers that succeed or fail on cue, and
  :meth:`~RecordingHandlers.wait_for_calls` for tests that run a dispatcher in the
  background.
- :func:`instant_retries` is a retry policy without delays, so a drain does not wait for
  backoff.

A fresh, migrated database per test comes from the pytest plugin
(:mod:`dispatcher.pytest_plugin`: fixtures ``dispatcher_dsn`` and ``dispatcher_conn``).

>>> from dispatcher import Mutation, Op, TriggerRegistry, emit, migrate
>>> from dispatcher.testing import RecordingHandlers, dead_letters, drain, instant_retries
>>>
>>> async def test_welcome_mail_is_retried_then_sent(dsn: str) -> None:
...     await migrate(dsn)
...     conn = await asyncpg.connect(dsn)
...     await TriggerRegistry().register(
...         conn, scope="acme", name="welcome", namespace="users", key_pattern="users/*",
...         target="send_welcome", registered_by="user:1", retry=instant_retries(3))
...     handlers = RecordingHandlers()
...     handlers.fail("send_welcome", ConnectionError("smtp down"), times=1)
...     async with conn.transaction():
...         await emit(conn, Mutation("acme", "users", "users/42", Op.PUT, {"email": "a@b.c"}))
...
...     stats = await drain(dsn, handlers, time_limit=10)
...
...     assert [c.attempt for c in handlers.calls] == [1, 2]
...     assert handlers.calls[-1].ok and stats.retried == 1
...     assert await dead_letters(conn) == []
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from dispatcher.admin import Admin, DeadLetterDetail, DeadLetterFilter, DeadLetterSummary
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import BackoffKind, JsonValue, RetryPolicy
from dispatcher.core.outcomes import ExecutionResult, Failure, Success
from dispatcher.core.policy import RandomSource
from dispatcher.core.validate import is_int
from dispatcher.db import Connection
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.runtime.dispatcher import Dispatcher, DispatcherConfig
from dispatcher.runtime.handlers import Executor, HandlerContext, HandlerRegistry
from dispatcher.runtime.principals import Principal, PrincipalResolver
from dispatcher.runtime.stats import Recorder, Stats

__all__ = [
    "Call",
    "DrainTimeout",
    "RecordingHandlers",
    "dead_letters",
    "drain",
    "instant_retries",
]

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DispatcherConfig))
# list_dead_letters answers at most this many per call.
_PAGE = 10_000


class DrainTimeout(TimeoutError):
    """:func:`drain` ran out of time with rows still in the outbox; ``stats`` says what ran."""

    def __init__(self, time_limit: float, stats: Stats) -> None:
        self.stats = stats
        super().__init__(
            f"the outbox did not drain within {time_limit:g}s (a handler that never "
            f"returns, or retries scheduled further out than the limit?); stats so far: "
            f"{stats.as_dict()}"
        )


def instant_retries(max_attempts: int = 3) -> RetryPolicy:
    """A retry policy with no delay and no jitter: retries are due at once.

    >>> instant_retries(2)
    RetryPolicy(kind=<BackoffKind.CONSTANT: 'constant'>, base_delay=0.0, ..., max_attempts=2, ...)
    """
    return RetryPolicy(
        kind=BackoffKind.CONSTANT,
        base_delay=0.0,
        max_delay=0.0,
        jitter=0.0,
        max_attempts=max_attempts,
    )


async def drain(
    dsn: str,
    handlers: Executor,
    *,
    time_limit: float = 30.0,
    include_scheduled: bool = True,
    principals: PrincipalResolver | None = None,
    rng: RandomSource | None = None,
    recorder: Recorder | None = None,
    **config: Any,
) -> Stats:
    """Run a dispatcher on ``dsn`` until the outbox is empty, then stop it gracefully.

    With ``include_scheduled`` (the default) it also waits for rows scheduled in the future
    (retries with backoff, rate-limited reschedules), so pair it with short policies such as
    :func:`instant_retries`; with ``include_scheduled=False`` it returns once nothing is due.
    ``config`` holds :class:`~dispatcher.DispatcherConfig` fields (``schema``,
    ``max_trigger_depth``, ``concurrency``, …); circuit breakers are off unless you pass
    ``breaker_threshold``. Raises :class:`DrainTimeout` after ``time_limit`` seconds.

    >>> stats = await drain(dsn, handlers, time_limit=10, max_trigger_depth=3)
    >>> stats.dead_lettered
    0
    """
    unknown = sorted(set(config) - _CONFIG_FIELDS)
    if unknown:
        raise InvalidInput(
            "config", unknown[0], f"is not a DispatcherConfig field; use {sorted(_CONFIG_FIELDS)}"
        )
    if "breaker_threshold" in _CONFIG_FIELDS:
        # An open circuit breaker holds a trigger's rows for its whole cool-down, which would
        # turn a test of retries into a wait for the time limit. Pass it to test breakers.
        config.setdefault("breaker_threshold", 0)
    dispatcher = Dispatcher(
        dsn,
        handlers,
        config=DispatcherConfig(**config),
        principals=principals,
        rng=rng,
        recorder=recorder,
    )
    try:
        return await dispatcher.run_until_idle(
            time_limit=time_limit, include_scheduled=include_scheduled
        )
    except TimeoutError:
        raise DrainTimeout(time_limit, dispatcher.stats) from None


async def dead_letters(
    conn: Connection,
    scope: str | None = None,
    *,
    trigger: str | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> list[DeadLetterDetail]:
    """Every dead letter (of ``scope`` and ``trigger``, when given), oldest first, with its
    reason, attempts, error history, payload and resolution.

    >>> [d] = await dead_letters(conn, "acme")
    >>> (d.reason, d.attempts, d.errors[-1].message)
    (<DeadLetterReason.HANDLER_ERROR: 'handler_error'>, 3, 'RuntimeError: boom ...')
    """
    admin = Admin(schema=schema)
    summaries = await admin.list_dead_letters(
        conn, DeadLetterFilter(scope=scope, trigger=trigger), limit=_PAGE
    )
    return [await admin.show_dead_letter(conn, s.id) for s in sorted(summaries, key=_id)]


def _id(summary: DeadLetterSummary) -> int:
    return summary.id


@dataclass(frozen=True, slots=True)
class Call:
    """One execution :class:`RecordingHandlers` saw, and what it returned.

    Its fields copy those of the :class:`~dispatcher.HandlerContext` the handler got (all but
    ``kv``): ``principal`` is the same resolved :class:`~dispatcher.Principal`, attributes
    included, and :attr:`principal_id` is its id.

    >>> [call] = handlers.calls
    >>> (call.principal_id, call.principal)
    ('user:7', Principal(id='user:7', attributes={}))
    """

    target: str
    event: Mapping[str, JsonValue]
    attempt: int
    idempotency_key: str
    scope: str
    trigger_name: str
    trigger_id: int
    depth: int
    principal: Principal
    result: ExecutionResult

    @property
    def principal_id(self) -> str:
        """The id of the principal the handler ran as (by default the trigger's
        ``registered_by``)."""
        return self.principal.id

    @property
    def ok(self) -> bool:
        return isinstance(self.result, Success)

    @property
    def error(self) -> str | None:
        """The failure message (exception type, text and traceback), or None on success."""
        return self.result.message if isinstance(self.result, Failure) else None

    @property
    def outcome(self) -> str:
        """``success`` or the failure kind, e.g. ``handler_error``."""
        return "success" if isinstance(self.result, Success) else self.result.kind.value


class RecordingHandlers(HandlerRegistry):
    """A :class:`~dispatcher.HandlerRegistry` that records every call (in ``calls``) with
    the result the dispatcher got, target-not-found included.

    Register handlers as usual (``@handlers.handler("x")``), or with :meth:`succeed` and
    :meth:`fail` for the common cases.

    >>> handlers = RecordingHandlers()
    >>> handlers.succeed("quote", {"price": 3})
    >>> handlers.fail("charge", PermanentError("card declined"))
    >>> handlers.fail("sync", "upstream down", times=2)   # fails twice, then succeeds
    >>> await drain(dsn, handlers)
    >>> [c.outcome for c in handlers.calls_to("sync")]
    ['handler_error', 'handler_error', 'success']
    """

    def __init__(self, *, max_threads: int = 16) -> None:
        super().__init__(max_threads=max_threads)
        self.calls: list[Call] = []
        self._changed: anyio.Event | None = None

    def calls_to(self, target: str) -> list[Call]:
        """The calls of ``target``, in the order they finished."""
        return [c for c in self.calls if c.target == target]

    def succeed(self, target: str, result: JsonValue = None) -> None:
        """Register a handler for ``target`` that returns ``result``."""

        async def succeed(ctx: HandlerContext) -> JsonValue:
            return result

        self.register(target, succeed)

    def fail(
        self,
        target: str,
        error: BaseException | str = "handler failed (dispatcher.testing)",
        *,
        times: int | None = None,
        result: JsonValue = None,
    ) -> None:
        """Register a handler for ``target`` that raises ``error`` (a string becomes a
        ``RuntimeError``); with ``times``, only while the attempt number is at most
        ``times``, then it returns ``result``.

        Raise :class:`~dispatcher.PermanentError`, :class:`~dispatcher.PermissionDenied` or
        :class:`~dispatcher.RateLimited` to exercise those routes.
        """
        if times is not None and (not is_int(times)):
            raise InvalidInput("times", times, "must be an integer or None")
        exc = RuntimeError(error) if isinstance(error, str) else error
        if not isinstance(exc, BaseException):
            raise InvalidInput("error", error, "must be an exception or a message")

        async def fail(ctx: HandlerContext) -> JsonValue:
            if times is None or ctx.attempt <= times:
                # Re-raising one instance would chain every earlier traceback onto it.
                raise exc.with_traceback(None)
            return result

        self.register(target, fail)

    async def execute(self, target: str, ctx: HandlerContext, time_limit: float) -> ExecutionResult:
        result = await super().execute(target, ctx, time_limit)
        self.calls.append(
            Call(
                target=target,
                event=ctx.event,
                attempt=ctx.attempt,
                idempotency_key=ctx.idempotency_key,
                scope=ctx.scope,
                trigger_name=ctx.trigger_name,
                trigger_id=ctx.trigger_id,
                depth=ctx.depth,
                principal=ctx.principal,
                result=result,
            )
        )
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return result

    async def wait_for_calls(
        self,
        count: int = 1,
        *,
        target: str | None = None,
        where: Callable[[Call], bool] | None = None,
        time_limit: float = 10.0,
    ) -> list[Call]:
        """Wait until at least ``count`` calls (of ``target``, matching ``where``) have
        finished; return them. Raises :class:`TimeoutError` after ``time_limit``.

        >>> async with anyio.create_task_group() as tg:
        ...     await tg.start(d.run)
        ...     [call] = await handlers.wait_for_calls(target="quote")
        ...     d.stop()
        """

        def matching() -> list[Call]:
            return [
                c
                for c in self.calls
                if (target is None or c.target == target) and (where is None or where(c))
            ]

        with anyio.fail_after(time_limit):
            while len(found := matching()) < count:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        return found
