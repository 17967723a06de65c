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

    def __init__(self, operation: str, conn: object) -> None:
        super().__init__(
            "conn",
            conn,
            f"{operation} needs a connection inside a transaction, or its writes commit on "
            "their own and outlive a rollback of your work: call it inside "
            "`async with conn.transaction():` (with SQLAlchemy's asyncpg driver, the "
            "transaction begins only at its first statement: make this call after one), or pass "
            "autocommit=True if committing on its own is intended",
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
