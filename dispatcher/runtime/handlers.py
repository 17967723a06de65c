"""Handlers: what a trigger's target runs, the context it receives, and the default executor.

>>> handlers = HandlerRegistry()
>>> @handlers.handler("send_welcome")
... async def send_welcome(ctx: HandlerContext) -> JsonValue:
...     await ctx.kv.put("mail", f"sent/{ctx.event['key']}", {"to": ctx.principal.id})
...     return {"ok": True}
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeAlias, TypeVar

import anyio
import anyio.to_thread

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue, check_name
from dispatcher.core.outcomes import ExecutionResult, Failure, FailureKind, Success
from dispatcher.core.sanitize import sanitize_json
from dispatcher.core.validate import is_int
from dispatcher.kv import KvEntry, KvWrite
from dispatcher.runtime.deadlines import run_async
from dispatcher.runtime.failures import (
    PermanentError,
    PermissionDenied,
    RateLimited,
    StoreUnavailable,
    classify,
)
from dispatcher.runtime.principals import Principal

# The exceptions a handler raises on purpose are defined with their classification and
# importable from here too.
__all__ = [
    "Executor",
    "HandlerContext",
    "HandlerRegistry",
    "KvHandle",
    "KvSession",
    "PermanentError",
    "PermissionDenied",
    "RateLimited",
    "StillRunning",
    "StoreUnavailable",
]


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

    def async_handler(self, target: str) -> Callable[[HandlerContext], object] | None:
        """The async function registered for ``target``; None for a blocking one or none."""
        entry = self._handlers.get(target)
        return None if entry is None or entry.blocking else entry.fn

    async def execute(self, target: str, ctx: HandlerContext, time_limit: float) -> ExecutionResult:
        entry = self._handlers.get(target)
        if entry is None:
            return Failure(FailureKind.TARGET_NOT_FOUND, f"no handler registered for {target!r}")
        if entry.blocking:
            return await self._run_blocking(entry.fn, ctx, time_limit)
        return await run_async(entry.fn, ctx, time_limit)

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
            return classify(exc)
