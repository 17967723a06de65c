"""The statements that apply a batch of outcomes, in the order they run, and the encoders
of their column values.

Each takes the rows' ids and lease tokens (every write is fenced by both), one array per
per-row column (built by the outcome's ``case`` in :mod:`dispatcher.runtime.settle`), then
its statement-wide settings, and reports which rows it changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dispatcher.core.outcomes import ClaimedRow, ErrorRecord, Failure, Reply, Success
from dispatcher.core.redact import Redactor
from dispatcher.core.sanitize import sanitize_json
from dispatcher.sql import Sql

if TYPE_CHECKING:
    import asyncpg


@dataclass(frozen=True, slots=True)
class Settings:
    """Statement-wide parameters, from the dispatcher's configuration."""

    max_error_history: int
    unpark_batch: int


class Written(NamedTuple):
    """What one statement changed: the ids it applied, and what a success set off."""

    ids: frozenset[int]
    unparked: int = 0
    breakers_closed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class Write:
    """One fenced statement applying every outcome of a batch routed to it."""

    name: str
    statement: Callable[[Sql], str]
    # What each row passes after its id and lease token, in the statement's order.
    columns: tuple[str, ...]
    settings: Callable[[Settings], tuple[object, ...]]
    read: Callable[[Sequence[asyncpg.Record]], Written]
    # Someone is told about these outcomes (a caller, a dead-letter handler, an operator):
    # the batch commits synchronously.
    durable: bool = False


def _none(_: Settings) -> tuple[object, ...]:
    return ()


def _each(rows: Sequence[asyncpg.Record]) -> Written:
    """A statement returning one ``id`` per row it changed."""
    return Written(frozenset(r["id"] for r in rows))


def _array(column: str) -> Callable[[Sequence[asyncpg.Record]], Written]:
    """A statement returning one row whose ``column`` lists the ids it changed."""

    def read(rows: Sequence[asyncpg.Record]) -> Written:
        return Written(frozenset(rows[0][column]))

    return read


def _completed(rows: Sequence[asyncpg.Record]) -> Written:
    (row,) = rows
    return Written(
        frozenset(row["deleted"]),
        unparked=int(row["unparked"]),
        breakers_closed=tuple(row["breakers_closed"]),
    )


def error_json(error: ErrorRecord | None) -> str | None:
    """An error history entry; the statement adds when it was written."""
    if error is None:
        return None
    return json.dumps(
        {"attempt": error.attempt, "kind": error.kind.value, "message": error.message},
        ensure_ascii=False,
    )


def redacted_payload(row: ClaimedRow, redactor: Redactor) -> str | None:
    if not redactor.enabled:
        return None  # the statement keeps the stored payload
    return json.dumps(redactor.redact_json(row.payload), ensure_ascii=False)


def result_json(reply: Reply, redactor: Redactor) -> str | None:
    if isinstance(reply.result, Success):
        # Redact first: sanitize_json cuts long strings, and a secret cut in half is no
        # longer found whole (the result is already clean JSON, so nothing else changes).
        value = sanitize_json(redactor.redact_json(reply.result.result))
        return json.dumps(value, ensure_ascii=False)
    return None


def failure_text(reply: Reply, redactor: Redactor) -> str | None:
    if isinstance(reply.result, Failure):
        return redactor.redact_text(f"{reply.result.kind.value}: {reply.result.message}")
    return None


# Async successes: also close the trigger's breaker and un-park a few of its parked rows.
COMPLETE = Write(
    "complete", lambda q: q.complete_fenced, (), lambda s: (s.unpark_batch,), _completed
)
SKIP_DEPTH = Write("skip_depth", lambda q: q.skip_depth_fenced, ("max_depth",), _none, _each)
# Retries, reschedules and releases (park null), and parks (delay and attempts null). It
# runs after COMPLETE: a success un-parks rows parked before its batch, never one it parks.
RESCHEDULE = Write(
    "reschedule",
    lambda q: q.reschedule_fenced,
    ("delay", "attempts", "park", "error"),
    lambda s: (s.max_error_history,),
    _each,
)
DEAD_LETTER = Write(
    "dead_letter",
    lambda q: q.dead_letter_fenced,
    ("reason", "attempts", "error", "payload"),
    _none,
    _array("moved"),
    durable=True,
)
RESOLVE = Write(
    "resolve",
    lambda q: q.resolve_dead_letter_fenced,
    ("dead_letter_id", "resolution", "note"),
    _none,
    _array("deleted"),
    durable=True,
)
REPLY = Write("reply", lambda q: q.delete_fenced, (), _none, _each, durable=True)

# The order statements run in within a batch's transaction.
WRITES: tuple[Write, ...] = (COMPLETE, SKIP_DEPTH, RESCHEDULE, DEAD_LETTER, RESOLVE, REPLY)
DURABLE = frozenset(write for write in WRITES if write.durable)
