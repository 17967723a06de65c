"""Handlers for the fault-injection scenarios, loaded by the dispatcher under test with
``dispatcher run --handlers tests.chaos.handlers:registry``.

Every handler writes the execution ledger (:mod:`tests.chaos.ledger`) in its own transaction.
What a ``work`` handler does is read from the event's value, so one registry serves every
scenario::

    {"ms": [5, 50], "fail_rate": 0.02, "always_fail": false, "fail_first": 0, "kv": 0,
     "gate": false}

(``kv``: how many writes the handler makes through ``ctx.kv``, into the ``chaos-kv``
namespace, which no trigger watches; ``gate``: refuse with a ``PermanentError`` while the
event's key is listed in the ledger's refused keys, which a test can change mid-run.)

Randomness is seeded by the idempotency key and the attempt, so a run can be replayed.

Environment (set by the harness): ``CHAOS_LEDGER_DSN`` (required), ``CHAOS_LOG_FILE``
(every ``dispatcher`` log record as a JSON line, extras included), ``CHAOS_MAX_THREADS``
(the blocking-handler thread cap), ``CHAOS_SECRET`` (what ``snoop`` looks for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import threading
import types
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.from_thread

from dispatcher import (
    HandlerContext,
    HandlerRegistry,
    PermanentError,
    RateLimited,
    StoreUnavailable,
)
from dispatcher.core.models import JsonValue
from tests.chaos.ledger import Ledger, LedgerUnavailable, Start

AsyncHandler = Callable[[HandlerContext], Awaitable[object]]

# Log records carry these attributes whatever the caller passed; everything else is "extra".
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLines(logging.Handler):
    """Every record as one JSON line with its extras, so tests can read event names and
    search for leaked secrets in exactly what a log shipper would receive."""

    def __init__(self, path: str) -> None:
        super().__init__(level=logging.DEBUG)
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._lock_file = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        line = {
            "created": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "exc": self.format(record) if record.exc_info else None,
            "extra": extra,
        }
        with self._lock_file:
            self._file.write(json.dumps(line, default=repr, ensure_ascii=False) + "\n")


def install_log_capture(path: str) -> None:
    logger = logging.getLogger("dispatcher")
    logger.addHandler(JsonLines(path))
    logger.setLevel(logging.INFO)


def _value(ctx: HandlerContext) -> Mapping[str, JsonValue]:
    value = ctx.event.get("value")
    return value if isinstance(value, Mapping) else {}


def _start_of(ctx: HandlerContext) -> Start:
    event_id, _, trigger_id = ctx.idempotency_key.partition(":")
    scope = ctx.event.get("scope")
    key = ctx.event.get("key")
    seq = ctx.event.get("seq")
    return Start(
        event_id=uuid.UUID(event_id),
        trigger_id=int(trigger_id),
        trigger_name=ctx.trigger_name,
        scope=ctx.scope,
        event_scope=scope if isinstance(scope, str) else None,
        key=key if isinstance(key, str) else None,
        attempt=ctx.attempt,
        depth=ctx.depth,
        principal=ctx.principal.id,
        seq=seq if isinstance(seq, int) else None,
    )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    return "failed"


def _error_note(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__}


def ledgered(ledger: Ledger, fn: AsyncHandler) -> AsyncHandler:
    """Wrap ``fn`` so that its start and end are recorded. A ledger that cannot be written
    turns into a rate-limited reschedule: nothing ran, and no attempt is used up."""

    async def run(ctx: HandlerContext) -> object:
        try:
            ledger_id = await ledger.start(_start_of(ctx))
        except LedgerUnavailable as exc:
            raise RateLimited(0.2, str(exc)) from None
        try:
            result = await fn(ctx)
        except BaseException as exc:
            # A timeout cancels the handler: record that it ended, shielded from the very
            # cancellation that ended it, and briefly (the database may be down). Any other
            # end waits out an outage as a success does: the checker needs it on record to
            # tell a reschedule that used no attempt from a re-run.
            outcome = _outcome(exc)
            patience = 2.0 if outcome == "cancelled" else 30.0
            with anyio.CancelScope(shield=True):
                await ledger.end(ledger_id, outcome, _error_note(exc), patience=patience)
            raise
        note = result if isinstance(result, dict) and "ledger_note" in result else None
        await ledger.end(ledger_id, "success", note)
        return result

    run.__name__ = getattr(fn, "__name__", "handler")
    return run


def build_registry(
    ledger: Ledger | None = None, *, max_threads: int | None = None
) -> HandlerRegistry:
    """A registry of every chaos target writing to ``ledger`` (default: from the environment)."""
    led = ledger or Ledger()
    threads = max_threads or int(os.environ.get("CHAOS_MAX_THREADS", "16"))
    registry = HandlerRegistry(max_threads=threads)

    def add(target: str, fn: AsyncHandler) -> None:
        registry.register(target, ledgered(led, fn))

    async def work(ctx: HandlerContext) -> object:
        spec = _value(ctx)
        rng = random.Random(f"{ctx.idempotency_key}:{ctx.attempt}")
        bounds = spec.get("ms")
        if isinstance(bounds, list) and len(bounds) == 2:
            lo, hi = (float(b) if isinstance(b, int | float) else 0.0 for b in bounds)
            await anyio.sleep(rng.uniform(lo, hi) / 1000)
        if spec.get("always_fail"):
            raise RuntimeError("always fails")
        if spec.get("gate") and await led.refused(str(ctx.event.get("key"))):
            raise PermanentError(f"key {ctx.event.get('key')} is refused")
        first = spec.get("fail_first", 0)
        if isinstance(first, int) and ctx.attempt <= first:
            raise RuntimeError(f"fails on attempt {ctx.attempt}")
        rate = spec.get("fail_rate", 0.0)
        if isinstance(rate, int | float) and rng.random() < rate:
            raise RuntimeError("transient failure")
        writes = spec.get("kv", 0)
        for i in range(writes if isinstance(writes, int) else 0):
            # Through the dispatcher's own database: a fault here raises StoreUnavailable.
            await ctx.kv.put("chaos-kv", f"{ctx.event['key']}/{i}", {"attempt": ctx.attempt})
        return {"ok": True}

    async def hang(ctx: HandlerContext) -> object:
        await anyio.sleep_forever()
        return None

    async def stubborn(ctx: HandlerContext) -> object:
        """Runs ``ms`` milliseconds whatever happens: swallows every cancellation (a
        shutdown's, a time limit's), as a badly written handler does."""
        ms = _value(ctx).get("ms", 0)
        loop = asyncio.get_running_loop()
        until = loop.time() + (float(ms) if isinstance(ms, int | float) else 0.0) / 1000
        while (left := until - loop.time()) > 0:
            with contextlib.suppress(asyncio.CancelledError):  # the misbehaviour
                await asyncio.sleep(left)
        return {"ok": True}

    def block(ctx: HandlerContext) -> object:
        ledger_id = anyio.from_thread.run(led.start, _start_of(ctx))
        seconds = _value(ctx).get("seconds", 3600)
        threading.Event().wait(float(seconds) if isinstance(seconds, int | float) else 3600)
        anyio.from_thread.run(led.end, ledger_id, "success")
        return None

    registry.register("block", block, blocking=True)

    async def self_loop(ctx: HandlerContext) -> object:
        await ctx.kv.put(str(ctx.event["namespace"]), str(ctx.event["key"]), ctx.depth)
        return None

    async def ping(ctx: HandlerContext) -> object:
        await ctx.kv.put("pong", str(ctx.event["key"]), ctx.depth)
        return None

    async def pong(ctx: HandlerContext) -> object:
        await ctx.kv.put("ping", str(ctx.event["key"]), ctx.depth)
        return None

    async def fanout(ctx: HandlerContext) -> object:
        key = str(ctx.event["key"])
        namespace = str(ctx.event["namespace"])
        await ctx.kv.put(namespace, key + "0", ctx.depth)
        await ctx.kv.put(namespace, key + "1", ctx.depth)
        return None

    async def poison(ctx: HandlerContext) -> object:
        return _poison(str(_value(ctx).get("poison")))

    async def secret(ctx: HandlerContext) -> object:
        canary = str(_value(ctx).get("password"))
        mode = _value(ctx).get("mode", "fail")
        delay = _value(ctx).get("ms", 0)
        if isinstance(delay, int | float) and delay > 0:
            await anyio.sleep(delay / 1000)
        if mode == "reply":
            return {"password": canary, "nested": [{"api_key": canary}], "ok": True}
        raise RuntimeError(
            f"login failed password={canary} api_key: {canary} "
            f"Authorization: Bearer {canary} creds={{'password': '{canary}'}} "
            f"(upstream said: token {canary} rejected)"
        )

    async def dead_letter_handler(ctx: HandlerContext) -> object:
        return None

    async def snoop(ctx: HandlerContext) -> object:
        needle = os.environ.get("CHAOS_SECRET", "")
        found = find_reachable(ctx, needle) if needle else []
        return {"ledger_note": True, "found": found[:10], "searched_for": len(needle)}

    async def probe(ctx: HandlerContext) -> object:
        return {
            "ledger_note": True,
            "threads_running": registry.threads_running,
            "threads_abandoned": registry.threads_abandoned,
            "max_threads": registry.max_threads,
        }

    add("work", work)
    add("hang", hang)
    add("stubborn", stubborn)
    add("loop", self_loop)
    add("ping", ping)
    add("pong", pong)
    add("fanout", fanout)
    add("poison", poison)
    add("secret", secret)
    add("dlh", dead_letter_handler)
    add("snoop", snoop)
    add("probe", probe)

    def poison_blocking(ctx: HandlerContext) -> object:
        ledger_id = anyio.from_thread.run(led.start, _start_of(ctx))
        anyio.from_thread.run(led.end, ledger_id, "failed", {"error": "SystemExit"})
        raise SystemExit(4)

    registry.register("poison_blocking", poison_blocking, blocking=True)
    return registry


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


def _deep(levels: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(levels):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


def _poison(kind: str) -> object:
    """Return or raise something hostile; ``kind`` names it."""
    match kind:
        case "nul":
            raise RuntimeError("nul\x00byte in the message\x00")
        case "surrogate":
            raise RuntimeError("lone \ud800 surrogate \udfff here")
        case "huge":
            raise RuntimeError("x" * 10_000_000)
        case "huge_int":
            raise ValueError(10**10_000)
        case "bad_str":
            raise _BadStr()
        case "system_exit":
            raise SystemExit(3)
        case "keyboard_interrupt":
            raise KeyboardInterrupt
        case "cancelled_error":
            raise asyncio.CancelledError("raised by the handler itself")
        case "recursion":
            return _recurse(0)
        case "bad_result":
            return {"nan": math.nan, "inf": -math.inf, "big": 10**5000, "obj": object(), "set": {1}}
        case "deep_result":
            return _deep(50_000)
        case "permanent":
            raise PermanentError("nul\x00 and \ud800 in a permanent error")
        case "rate_huge":
            # Past what a timestamp can hold: cut to max_retry_after, the row kept.
            raise RateLimited(1e13)
        case "fail":
            raise RuntimeError("fails on every attempt")
        case _:
            return {"ok": True}


def _recurse(n: int) -> int:
    return _recurse(n + 1) + 1


_SKIP_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
)


def find_reachable(root: object, needle: str, *, max_nodes: int = 200_000) -> list[str]:
    """Paths from ``root`` to strings containing ``needle``, following attributes (private
    and name-mangled ones included, dunders excluded), slots and container items."""
    hits: list[str] = []
    seen: set[int] = set()
    queue: deque[tuple[object, str, int]] = deque([(root, "ctx", 0)])
    while queue and len(seen) < max_nodes:
        obj, path, depth = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes):
            text = obj if isinstance(obj, str) else obj.decode("utf-8", "replace")
            if needle in text:
                hits.append(path)
            continue
        if obj is None or isinstance(obj, (int, float, *_SKIP_TYPES)):
            continue
        if depth >= 12:
            continue
        children: list[tuple[object, str]] = []
        if isinstance(obj, Mapping):
            children += [(v, f"{path}[{k!r}]") for k, v in list(obj.items())[:1000]]
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            children += [(v, f"{path}[{i}]") for i, v in enumerate(list(obj)[:1000])]
        try:
            names = [n for n in dir(obj) if not (n.startswith("__") and n.endswith("__"))]
        except Exception:
            names = []
        for name in names:
            try:
                value = getattr(obj, name)
            except Exception:
                continue
            children.append((value, f"{path}.{name}"))
        queue.extend((child, p, depth + 1) for child, p in children)
    return hits


if os.environ.get("CHAOS_LOG_FILE"):
    install_log_capture(os.environ["CHAOS_LOG_FILE"])

registry = build_registry()
