"""A full backlog's refusal, whatever the driver: the emit functions raise SQLSTATE 54Q01
with the numbers as JSON in the DETAIL, and ``with refusals:`` around a statement turns that
error, however a driver or SQLAlchemy or Django wraps it, into :class:`BacklogFull`."""

from __future__ import annotations

import json
from types import TracebackType

from dispatcher.core.errors import BACKLOG_FULL_SQLSTATE, BacklogFull

# How far down a wrapped error's chain to look for the driver's: SQLAlchemy's DBAPIError
# holds the driver's (``orig``; its asyncpg adapter's in turn was raised from asyncpg's),
# Django's wrapper was raised from it.
_CHAIN_DEPTH = 6


def backlog_refusal(exc: BaseException) -> BacklogFull | None:
    """The :class:`BacklogFull` that ``exc`` stands for, or None: the emit functions raise
    SQLSTATE 54Q01 with ``{"scope", "cap", "backlog", "adding"}`` as JSON in the DETAIL,
    which asyncpg exposes as ``detail``, psycopg and psycopg2 as ``diag.message_detail``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _CHAIN_DEPTH:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if state == BACKLOG_FULL_SQLSTATE:
            full = _backlog_full(_detail(current))
            if full is not None:
                return full
        todo += [
            e
            for e in (getattr(current, "orig", None), current.__cause__, current.__context__)
            if isinstance(e, BaseException)
        ]
    return None


def _detail(exc: BaseException) -> object:
    detail = getattr(exc, "detail", None)
    if detail is None:
        detail = getattr(getattr(exc, "diag", None), "message_detail", None)
    return detail


def _backlog_full(detail: object) -> BacklogFull | None:
    if not isinstance(detail, str):
        return None
    try:
        values = json.loads(detail)
    except ValueError:
        return None
    if not isinstance(values, dict):
        return None
    scope, cap, backlog, adding = (values.get(k) for k in ("scope", "cap", "backlog", "adding"))
    # type() rather than isinstance: JSON's true and false are bools, which are ints.
    if type(scope) is str and type(cap) is int and type(backlog) is int and type(adding) is int:
        return BacklogFull(scope, cap, backlog, adding)
    return None


class _Refusals:
    """``with refusals:`` around an emit statement: its refusal for a full backlog leaves
    as :class:`BacklogFull` (raised from the driver's error), whatever the driver."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception):
            full = backlog_refusal(exc)
            if full is not None:
                raise full from exc


refusals = _Refusals()
