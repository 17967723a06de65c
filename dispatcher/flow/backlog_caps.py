"""Backlog caps: a scope's cap on its pending outbox rows, its bounds, and the parsing of
what an operator types for it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from dispatcher.core.errors import InvalidInput
from dispatcher.core.validate import is_int, is_number
from dispatcher.names import MAX_RECOUNT_INTERVAL

# The largest backlog cap (the column is a bigint).
MAX_BACKLOG_CAP = 2**63 - 1
DEFAULT_RECOUNT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class BacklogCap:
    """A scope's cap on its pending outbox rows.

    ``pending`` is the scope's rows as counted at ``counted_at`` (None: not counted yet);
    an emit counts again once that is older than ``recount_interval`` seconds, and so do
    the dispatchers after they settle rows. An emit is refused while ``pending`` plus its
    rows would pass ``max_pending``.
    """

    scope: str
    max_pending: int
    pending: int
    counted_at: datetime | None
    recount_interval: float
    updated_at: datetime


def check_backlog_cap(max_pending: object, recount_interval: object) -> tuple[int, float]:
    """``max_pending`` and ``recount_interval`` as a cap takes them, or
    :class:`~dispatcher.InvalidInput` naming the one out of bounds."""
    if not is_int(max_pending) or not 1 <= max_pending <= MAX_BACKLOG_CAP:
        raise InvalidInput(
            "max_pending", max_pending, f"must be an integer from 1 to {MAX_BACKLOG_CAP}"
        )
    # The comparison is false for NaN, so NaN is refused too.
    if not is_number(recount_interval) or not 0 < recount_interval <= MAX_RECOUNT_INTERVAL:
        raise InvalidInput(
            "recount_interval",
            recount_interval,
            f"must be a number of seconds above 0 and at most {MAX_RECOUNT_INTERVAL:.0f}",
        )
    return max_pending, float(recount_interval)


def parse_max_pending(text: str) -> int:
    """A backlog cap as an operator types it: a positive integer (``_`` separators allowed).

    >>> parse_max_pending("50_000")
    50000
    """
    stripped = text.strip()
    # Length first: int() of thousands of digits raises.
    if len(stripped) > 40 or not re.fullmatch(r"[0-9][0-9_]*", stripped):
        raise InvalidInput(
            "max_pending", text, f"expected an integer from 1 to {MAX_BACKLOG_CAP}, e.g. 50000"
        )
    return check_backlog_cap(int(stripped), DEFAULT_RECOUNT_INTERVAL)[0]


def parse_recount_interval(text: str) -> float:
    """A recount interval as an operator types it: seconds, a number above 0.

    >>> parse_recount_interval("0.5")
    0.5
    """
    try:
        seconds = float(text)
    except ValueError:
        raise InvalidInput(
            "recount_interval", text, "expected a number of seconds, e.g. 1 or 0.5"
        ) from None
    return check_backlog_cap(1, seconds)[1]
