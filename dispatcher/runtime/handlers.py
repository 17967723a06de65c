"""Handlers: what a trigger's target runs, the context it receives, and the default executor.

>>> handlers = HandlerRegistry()
>>> @handlers.handler("send_welcome")
... async def send_welcome(ctx: HandlerContext) -> JsonValue:
...     await ctx.kv.put("mail", f"sent/{ctx.event['key']}", {"to": ctx.principal.id})
...     return {"ok": True}
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias, TypeVar

import anyio
import anyio.to_thread

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue, check_name
from dispatcher.core.outcomes import ExecutionResult, Failure, FailureKind, Success
from dispatcher.core.sanitize import describe_exception, sanitize_json, sanitize_text
from dispatcher.core.validate import is_int
from dispatcher.kv import KvEntry, KvWrite
from dispatcher.runtime.principals import Principal

# The executor's raw bound on error text, well above what is stored: the dispatcher redacts
# the whole text and only then cuts it to 8 KiB (route()). Cutting to 8 KiB here would cut a
# secret in half before redaction could recognise it.
ERROR_TEXT_LIMIT = 65_536


class PermanentError(Exception):
    """Raise from a handler: this event can never succeed; dead-letter it now."""


class PermissionDenied(Exception):
    """Raise from a handler: the principal may not do this; dead-letter it now."""


class RateLimited(Exception):
    """Raise from a handler: try again after ``retry_after`` seconds, without using an
    attempt (bounded by the policy's max event age)."""

    def __init__(self, retry_after: float, message: str = "rate limited") -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)


class StoreUnavailable(Exception):
    """Raised by ``ctx.kv`` when the dispatcher's own database failed under it (a lost
    connection, a restart, a timeout, a lock it could not get), as opposed to a value the
    KV table refused, which raises as it is.

    Let it propagate (or raise your own error from it): the row is then tried again later
    without using an attempt, and the trigger's circuit breaker does not count it. A write
    may have committed although it raised; its event id is stable across re-executions,
    so the row it would enqueue is not enqueued twice.

    >>> try:
    ...     await ctx.kv.put("mail", "sent/42", {"ok": True})
    ... except StoreUnavailable as exc:
    ...     raise MailError("could not record the mail") from exc  # still no attempt used
    """


class StillRunning(asyncio.CancelledError):
    """What an executor raises in place of the cancellation it was given when it could not
    stop the work (a blocking handler's thread runs on): the dispatcher then leaves the
    row's lease to expire instead of giving it back, so no other claim runs it alongside."""


class KvSession(Protocol):
    """What the KV handle writes through; kept behind the handle so a handler never holds
    the dispatcher's pool or credentials."""

    async def put(
        self,
        scope: str,
        namespace: str,
        key: str,
        value: JsonValue,
        depth: int,
        event: uuid.UUID,
        root: uuid.UUID,
    ) -> KvWrite: ...
    async def delete(
        self, scope: str, namespace: str, key: str, depth: int, event: uuid.UUID, root: uuid.UUID
    ) -> KvWrite: ...
    async def get(self, scope: str, namespace: str, key: str) -> KvEntry | None: ...


# Sessions live here, out of every handler's reach: a KvHandle holds only a number. Walking
# a context's attributes (a debugger dump, a "log everything" helper, a hostile script)
# therefore never arrives at the dispatcher's pool or the credentials in its connect args.
# In-process handlers are still not sandboxed: run untrusted code out of process.
_SESSIONS: dict[int, KvSession] = {}
_SESSION_IDS = itertools.count(1)


def open_session(session: KvSession) -> int:
    key = next(_SESSION_IDS)
    _SESSIONS[key] = session
    return key


def close_session(key: int) -> None:
    _SESSIONS.pop(key, None)


def _session(key: int) -> KvSession:
    try:
        return _SESSIONS[key]
    except KeyError:
        raise RuntimeError("this handler context's dispatcher has stopped") from None


class KvHandle:
    """KV access for a handler: confined to the trigger's scope, writes emit at depth + 1.

    Each write's event id is derived from the execution's idempotency key and the write's
    sequence number, so a re-execution after a lost lease does not enqueue the downstream
    triggers twice. Writes carry the root event's id, which per-root budgets count against.
    A fault of the dispatcher's database under a call raises :class:`StoreUnavailable`.
    """

    __slots__ = ("__depth", "__key", "__root", "__scope", "__seq", "__session")

    def __init__(
        self,
        session: int,
        scope: str,
        depth: int,
        idempotency_key: str,
        root: uuid.UUID | str,
    ) -> None:
        self.__session = session
        self.__scope = scope
        self.__depth = depth
        self.__key = idempotency_key
        self.__root = root
        self.__seq = 0

    def _root(self) -> uuid.UUID:
        # Parsed on the first write only: most executions write nothing.
        root = self.__root
        if isinstance(root, str):
            try:
                root = uuid.UUID(root)
            except ValueError:  # a hand-written row: still one stable id per root text
                root = uuid.uuid5(uuid.NAMESPACE_URL, f"dispatcher-root:{root}")
            self.__root = root
        return root

    def _next_event_id(self) -> uuid.UUID:
        self.__seq += 1
        return uuid.uuid5(uuid.NAMESPACE_URL, f"dispatcher:{self.__key}:{self.__seq}")

    async def put(self, namespace: str, key: str, value: JsonValue) -> KvWrite:
        return await _session(self.__session).put(
            self.__scope,
            namespace,
            key,
            value,
            self.__depth + 1,
            self._next_event_id(),
            self._root(),
        )

    async def delete(self, namespace: str, key: str) -> KvWrite:
        return await _session(self.__session).delete(
            self.__scope, namespace, key, self.__depth + 1, self._next_event_id(), self._root()
        )

    async def get(self, namespace: str, key: str) -> KvEntry | None:
        return await _session(self.__session).get(self.__scope, namespace, key)


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """Everything a handler gets: the event, who it runs as, and which attempt this is.

    ``idempotency_key`` is ``event_id:trigger_id``: the same for every attempt of one
    (event, trigger) pair, so a handler with side effects elsewhere can deduplicate.
    """

    event: Mapping[str, JsonValue]
    principal: Principal
    attempt: int
    idempotency_key: str
    scope: str
    trigger_name: str
    trigger_id: int
    depth: int
    kv: KvHandle


Handler: TypeAlias = Callable[[HandlerContext], Awaitable[object]]
BlockingHandler: TypeAlias = Callable[[HandlerContext], object]
H = TypeVar("H", bound=Callable[[HandlerContext], object])


class Executor(Protocol):
    """Runs a target. Must return within ``time_limit`` seconds and never raise."""

    async def execute(
        self, target: str, ctx: HandlerContext, time_limit: float
    ) -> ExecutionResult: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    fn: Callable[[HandlerContext], object]
    blocking: bool


class HandlerRegistry:
    """The default executor: async (or blocking) Python functions by target name.

    Blocking handlers run in worker threads. A thread cannot be stopped, so one that
    outlives its timeout (or a shutdown's cancellation) is abandoned and counted; at most
    ``max_threads`` run at once (abandoned ones included), and beyond that rows are
    rescheduled without using an attempt.
    """

    def __init__(self, *, max_threads: int = 16) -> None:
        if not is_int(max_threads) or max_threads < 1:
            raise InvalidInput("max_threads", max_threads, "must be a positive integer")
        self._handlers: dict[str, _Entry] = {}
        self.max_threads = max_threads
        self._lock = threading.Lock()
        self._threads_running = 0
        self.threads_abandoned = 0

    @property
    def threads_running(self) -> int:
        return self._threads_running

    def register(
        self, target: str, fn: Callable[[HandlerContext], object], *, blocking: bool = False
    ) -> None:
        """Run ``fn`` for rows whose trigger targets ``target``.

        ``fn`` is an async function, or a plain one with ``blocking=True`` (run in a
        thread). Its return value (JSON-like) is the reply of a synchronous call.
        """
        check_name("target", target)
        if not callable(fn):
            raise InvalidInput("handler", fn, "must be callable")
        is_coroutine = asyncio.iscoroutinefunction(fn)
        if blocking and is_coroutine:
            raise InvalidInput("handler", fn, "an async function cannot be registered as blocking")
        if not blocking and not is_coroutine:
            raise InvalidInput(
                "handler", fn, "must be an async function (or pass blocking=True for a plain one)"
            )
        self._handlers[target] = _Entry(fn, blocking)

    def handler(self, target: str, *, blocking: bool = False) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""

        def decorate(fn: H) -> H:
            self.register(target, fn, blocking=blocking)
            return fn

        return decorate

    def targets(self) -> list[str]:
        return sorted(self._handlers)

    async def execute(self, target: str, ctx: HandlerContext, time_limit: float) -> ExecutionResult:
        entry = self._handlers.get(target)
        if entry is None:
            return Failure(FailureKind.TARGET_NOT_FOUND, f"no handler registered for {target!r}")
        if entry.blocking:
            return await self._run_blocking(entry.fn, ctx, time_limit)
        return await _run_async(entry.fn, ctx, time_limit)

    async def _run_blocking(
        self, fn: Callable[[HandlerContext], object], ctx: HandlerContext, time_limit: float
    ) -> ExecutionResult:
        with self._lock:
            if self._threads_running >= self.max_threads:
                return Failure(
                    FailureKind.GATE_SATURATED,
                    f"all {self.max_threads} handler threads are busy (abandoned ones included)",
                )
            self._threads_running += 1
        done = threading.Event()

        def call() -> object:
            try:
                return fn(ctx)
            finally:
                with self._lock:
                    self._threads_running -= 1
                done.set()

        try:
            with anyio.move_on_after(time_limit) as scope:
                value = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
            if scope.cancelled_caught:
                if not done.is_set():
                    with self._lock:
                        self.threads_abandoned += 1
                return Failure(FailureKind.TIMEOUT, f"blocking handler exceeded {time_limit:g}s")
            return Success(sanitize_json(value))
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside (a shutdown): the await is abandoned at once, the
            # thread is not.
            if not done.is_set():
                with self._lock:
                    self.threads_abandoned += 1
                raise StillRunning("the blocking handler's thread is still running") from None
            raise
        except BaseException as exc:
            return _classify(exc)


class _Watch:
    __slots__ = ("done", "expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.done = False
        self.expired = False


class _Deadlines:
    """Timeouts for many short executions with one timer task per event loop.

    ``asyncio.timeout`` schedules and cancels a timer handle per call, which costs more
    than a no-op handler. Here an execution appends (deadline, watch) to the queue of its
    time limit and a single watchdog cancels the overdue ones. Within one queue deadlines
    only grow (same limit, monotonic clock), so each queue is a FIFO: finished watches at
    its head are dropped as new ones arrive, and a queue holds little more than the
    executions still running (a heap would keep every finished one until its deadline).
    """

    def __init__(self) -> None:
        self._queues: dict[float, deque[tuple[float, _Watch]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, time_limit: float) -> _Watch:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queues = {}
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        w = _Watch(task)
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


_DEADLINES = _Deadlines()


async def _run_async(
    fn: Callable[[HandlerContext], object], ctx: HandlerContext, time_limit: float
) -> ExecutionResult:
    w = _DEADLINES.watch(time_limit)
    try:
        pending = fn(ctx)
        if not inspect.isawaitable(pending):
            raise TypeError(f"async handler returned {type(pending).__name__}, not an awaitable")
        value = await pending
    except asyncio.CancelledError as exc:
        if w.expired:
            # Ours: undo the cancellation request and report the timeout.
            w.task.uncancel()
            return Failure(FailureKind.TIMEOUT, f"handler exceeded {time_limit:g}s")
        if w.task.cancelling():
            raise  # a real cancellation from outside (shutdown): let it through
        return _classify(exc)  # the handler raised CancelledError itself
    except BaseException as exc:  # a handler must never take the loop down
        return _classify(exc)
    finally:
        w.done = True
    if w.expired:
        # Finished in the same step the deadline fired: the pending cancel is ours.
        w.task.uncancel()
    return Success(sanitize_json(value))


def _classify(exc: BaseException) -> Failure:
    message = _error_text(exc)
    if isinstance(exc, RateLimited):
        return Failure(FailureKind.RATE_LIMITED, message, retry_after=exc.retry_after)
    if isinstance(exc, PermanentError):
        return Failure(FailureKind.PERMANENT, message)
    if isinstance(exc, PermissionDenied):
        return Failure(FailureKind.PERMISSION_DENIED, message)
    if _caused_by_store(exc):
        return Failure(FailureKind.UNAVAILABLE, message)
    if isinstance(exc, Exception):
        return Failure(FailureKind.HANDLER_ERROR, message)
    # SystemExit, KeyboardInterrupt and other BaseExceptions from a handler are bugs in the
    # handler, not requests to stop the dispatcher: retrying will not help.
    return Failure(FailureKind.PERMANENT, message)


# How far down a chain of wrapped exceptions the store's error is looked for.
_CAUSE_DEPTH = 16


def _caused_by_store(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling or from, a :class:`StoreUnavailable`
    (handlers often wrap errors in their own). Bounded: chains can be long or circular."""
    seen: set[int] = set()
    current: BaseException | None = exc
    for _ in range(_CAUSE_DEPTH):
        if current is None or id(current) in seen:
            return False
        if isinstance(current, StoreUnavailable):
            return True
        seen.add(id(current))
        # The chain a traceback would show: ``raise ... from None`` disowns the context.
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return False


def _error_text(exc: BaseException) -> str:
    head = describe_exception(exc, limit=ERROR_TEXT_LIMIT // 2)
    try:
        # File, line and function only: looking up source lines (linecache, and an
        # ast.parse per frame on 3.11) was the largest cost of a failing execution.
        summary = traceback.StackSummary.extract(
            traceback.walk_tb(exc.__traceback__), limit=None, lookup_lines=False
        )
        frames = "".join(
            f'  File "{f.filename}", line {f.lineno}, in {f.name}\n' for f in summary[-8:]
        )
    except Exception:  # formatting a hostile traceback must not fail the dispatcher
        frames = ""
    return sanitize_text(f"{head}\n{frames}".rstrip(), ERROR_TEXT_LIMIT)
