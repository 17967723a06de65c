"""Typed errors raised for bad input and exceeded limits.

Each error names what was wrong, with which value, and why, so that a caller can show it to
an operator as it is.
"""

from __future__ import annotations

from dispatcher.core.validate import is_int


class DispatcherError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInput(DispatcherError, ValueError):
    """A value given to the library is not acceptable.

    ``field`` names the argument or attribute, ``value`` is what was given (shortened when
    long) and ``reason`` says what is expected instead.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field}={_preview(value)}: {reason}")


class TriggerExists(InvalidInput):
    """A trigger with this name already exists in the scope."""

    def __init__(self, scope: str, name: str) -> None:
        super().__init__(
            "name", name, f"a trigger with this name already exists in scope {scope!r}"
        )
        self.scope = scope


class TransactionRequired(InvalidInput):
    """A write meant to join the caller's transaction was given a connection outside one.

    Outside a transaction its statement commits on its own, so the outbox rows would survive
    a rollback of the work they describe. ``operation`` names the call that refused.
    """

    def __init__(
        self,
        operation: str,
        conn: object,
        how: str = "call it inside `async with conn.transaction():`",
    ) -> None:
        super().__init__(
            "conn",
            conn,
            f"{operation} must run inside your transaction, so that its outbox rows commit and "
            f"roll back with your work: {how}; or pass autocommit=True if committing on its "
            "own is intended",
        )
        self.operation = operation


class TriggerNotFound(DispatcherError, LookupError):
    """No trigger with this id (or scope and name)."""

    def __init__(self, ref: object) -> None:
        self.ref = ref
        super().__init__(f"no trigger {_preview(ref)}")


class LimitExceeded(DispatcherError):
    """A configured limit would be exceeded; nothing was written.

    ``limit`` names the setting that bounds it, so the message says what to change.
    """

    def __init__(self, what: str, actual: int, limit: int, setting: str) -> None:
        self.what = what
        self.actual = actual
        self.limit = limit
        self.setting = setting
        super().__init__(
            f"{what}: {actual} exceeds the limit of {limit} (raise {setting} to allow more)"
        )


# The SQLSTATE the emit functions raise when a call would take a scope past its backlog cap
# (migration 0010): class 54, program limit exceeded; Q01 is in the implementation-defined
# range of subclasses.
BACKLOG_FULL_SQLSTATE = "54Q01"


class BacklogFull(DispatcherError):
    """An emit would take a scope's pending rows past the scope's backlog cap; nothing was
    enqueued.

    Raised from inside the caller's transaction, which the database has aborted: roll it
    back (``async with conn.transaction():`` and the other hosts' transaction blocks do, as
    the error leaves them), then retry once the dispatcher has drained the scope, or raise
    the cap (``dispatcher backlog-caps set``). Rows already queued are never dropped.

    ``scope`` names the scope, ``cap`` its cap, ``backlog`` its pending rows as last
    counted, ``adding`` the rows the call would have added. Plain SQL callers get SQLSTATE
    :data:`BACKLOG_FULL_SQLSTATE` with the same four values, as JSON, in the DETAIL.

    >>> try:
    ...     async with conn.transaction():
    ...         await dispatcher.emit(conn, mutation)
    ... except dispatcher.BacklogFull as full:
    ...     retry_later(after=5, reason=str(full))
    """

    def __init__(self, scope: str, cap: int, backlog: int, adding: int) -> None:
        self.scope = scope
        self.cap = cap
        self.backlog = backlog
        self.adding = adding
        super().__init__(
            f"the backlog of scope {scope!r} is full: {backlog} rows pending, its cap is "
            f"{cap}, and this emit would add {adding}; nothing was enqueued. Roll the "
            "transaction back and retry once the dispatcher has drained the scope, or raise "
            "the cap (dispatcher backlog-caps set)"
        )


def _preview(value: object, limit: int = 80) -> str:
    # Never raises: repr of a huge int fails past sys.get_int_max_str_digits(), and a
    # hostile object's __repr__ may raise anything.
    if is_int(value) and value.bit_length() > 256:
        return f"<integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    if len(text) > limit:
        return text[: limit - 3] + "..."
    return text
