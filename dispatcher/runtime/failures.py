"""What a handler's exception means: the exceptions a handler raises on purpose, and the
classification of any exception into a :class:`~dispatcher.core.outcomes.Failure`.

The exception classes are public (``dispatcher.PermanentError`` and the others).
"""

from __future__ import annotations

import traceback

from dispatcher.core.outcomes import Failure, FailureKind
from dispatcher.core.sanitize import describe_exception, sanitize_text

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


def classify(exc: BaseException) -> Failure:
    message = error_text(exc)
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


def error_text(exc: BaseException) -> str:
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
