"""The one place database rows become Python values.

Every row the library reads back (a trigger, a claimed outbox row, a dead letter, an
abandoned execution) is decoded here, from the columns its statement in :mod:`dispatcher.sql`
selects. jsonb columns are selected as text (``payload::text``), whatever codecs the caller's
connection has set, so decoding JSON is always ours. The operator's read views of dead letters
and abandoned executions are defined here beside their decoders; :mod:`dispatcher.admin`
re-exports them.

>>> trigger_from_record(await conn.fetchrow(queries().get_trigger, 7)).name
'welcome'
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import asyncpg

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import (
    BackoffKind,
    Delivery,
    JsonValue,
    OnDeadLetter,
    Op,
    Ordering,
    RetryPolicy,
    Trigger,
)
from dispatcher.core.outcomes import ClaimedRow, DeadLetterReason, Resolution
from dispatcher.core.validate import is_int, is_number

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    V = TypeVar("V", bound=DataclassInstance)


def json_value(text: str) -> JsonValue:
    """A jsonb column selected as text."""
    return cast(JsonValue, json.loads(text))


def from_columns(cls: type[V], r: asyncpg.Record, **decoded: object) -> V:
    """A ``cls`` whose fields are the row's columns of the same names, except the ``decoded``
    ones, given already turned into values. A column missing from the row raises
    ``KeyError``: every statement selects its value's fields by name."""
    plain: dict[str, Any] = {name: r[name] for name in _field_names(cls) if name not in decoded}
    return cls(**plain, **decoded)


@cache
def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


# --- triggers and retry policies ---


def policy_from_record(row: asyncpg.Record | Mapping[str, Any]) -> RetryPolicy:
    """The retry policy of a row with the policy columns (a trigger, an outbox row)."""
    return RetryPolicy(
        kind=BackoffKind(row["retry_kind"]),
        base_delay=row["retry_base_delay"],
        factor=row["retry_factor"],
        max_delay=row["retry_max_delay"],
        jitter=row["retry_jitter"],
        max_attempts=row["max_attempts"],
        max_event_age=row["max_event_age"],
        park_on=frozenset(row["park_on"]),
    )


# The keys of a dead letter's policy snapshot (written by SettleSql.dead_letter_fenced) and
# the columns they were taken from.
_SNAPSHOT_COLUMNS = {
    "kind": "retry_kind",
    "base_delay": "retry_base_delay",
    "factor": "retry_factor",
    "max_delay": "retry_max_delay",
    "jitter": "retry_jitter",
    "max_attempts": "max_attempts",
}


def policy_from_snapshot(text: str) -> tuple[RetryPolicy, float]:
    """The retry policy and timeout of a dead letter's policy snapshot (jsonb, as text).

    The snapshot was written by the runtime; validating it again keeps a hand-edited or
    older-format row from being enqueued with a policy the dispatcher cannot run. Raises
    :class:`InvalidInput`, ``KeyError``, ``TypeError`` or ``ValueError`` on an unusable one.
    Snapshots older than ``max_event_age`` or parking lack those keys.
    """
    snap = json.loads(text)
    if not isinstance(snap, dict):
        raise TypeError("the snapshot is not a JSON object")
    timeout = snap["timeout"]
    if not is_number(timeout) or timeout <= 0:
        raise InvalidInput("policy.timeout", timeout, "must be a positive number")
    columns = {column: snap[key] for key, column in _SNAPSHOT_COLUMNS.items()}
    columns["max_event_age"] = snap.get("max_event_age")
    columns["park_on"] = snap.get("park_on") or ()
    return policy_from_record(columns), float(timeout)


def trigger_from_record(row: asyncpg.Record) -> Trigger:
    fields = row["fields"]
    return from_columns(
        Trigger,
        row,
        ops=frozenset(Op(o) for o in row["ops"]),
        retry=policy_from_record(row),
        fields=None if fields is None else tuple(fields),
        ordering=Ordering(row["ordering"]),
        on_dead_letter=(
            None if row["on_dead_letter"] is None else OnDeadLetter(row["on_dead_letter"])
        ),
        delivery=Delivery(row["delivery"]),
    )


# --- claimed outbox rows ---

UNDECODABLE_PAYLOAD = "payload withheld: it could not be decoded"

# The columns of a claimed row, in the order the claim statements return them
# (dispatcher.sql.common.CLAIMED; tests/integration/test_claim_columns.py compares the two).
# A claimed row is read by position, once per row, in a fraction of the time reading its 26
# columns by name takes.
POLICY_COLUMNS = (
    "retry_kind",
    "retry_base_delay",
    "retry_factor",
    "retry_max_delay",
    "retry_jitter",
    "max_attempts",
    "max_event_age",
    "timeout",
    "park_on",
)
CLAIMED_COLUMNS = (
    "id",
    "lease_token",
    "event_id",
    "trigger_id",
    "scope",
    "trigger_name",
    "target",
    "registered_by",
    "payload",
    "attempts",
    "orphans",
    "depth",
    "reply_to",
    "reply_owner",
    "dead_letter_id",
    *POLICY_COLUMNS,
    "age",
    "traceparent",
)
_C = {name: i for i, name in enumerate(CLAIMED_COLUMNS)}
_PAYLOAD = _C["payload"]
_RETRY_KIND = _C["retry_kind"]
_MAX_EVENT_AGE = _C["max_event_age"]
_TIMEOUT = _C["timeout"]
_PARK_ON = _C["park_on"]
_AGE = _C["age"]
_TRACEPARENT = _C["traceparent"]
_REPLY_TO = _C["reply_to"]
_DEAD_LETTER_ID = _C["dead_letter_id"]

_POLICIES: dict[tuple[object, ...], RetryPolicy] = {}


def _cached_policy(r: asyncpg.Record) -> RetryPolicy:
    # Rows of one trigger share one snapshot: validate it once, not once per row.
    key: tuple[object, ...] = r[_RETRY_KIND : _MAX_EVENT_AGE + 1]
    park_on = r[_PARK_ON]
    if park_on:
        key += (None, *park_on)
    policy = _POLICIES.get(key)
    if policy is None:
        if len(_POLICIES) > 10_000:
            _POLICIES.clear()
        policy = _POLICIES[key] = policy_from_record(r)
    return policy


def claimed_row(r: asyncpg.Record) -> ClaimedRow:
    """The claimed row as routing sees it, from a record of ``CLAIMED`` columns. Raises on a
    row that cannot be decoded (see :func:`undecodable_claimed_row`)."""
    return _claimed_row(r, json_value(r[_PAYLOAD]), _cached_policy(r), r[_TIMEOUT])


def undecodable_claimed_row(r: asyncpg.Record) -> ClaimedRow:
    """What can be read of a claimed row that :func:`claimed_row` refused: enough to settle
    it. A payload the decoder cannot follow is replaced by a note (it could not be redacted
    either); a policy out of range by the default one, which is never used to run it."""
    try:
        payload: JsonValue = json_value(r[_PAYLOAD])
    except Exception:  # RecursionError for nesting past the decoder's depth, among others
        payload = {"undecodable": UNDECODABLE_PAYLOAD}
    return _claimed_row(r, payload, RetryPolicy(), 1.0)


def _claimed_row(
    r: asyncpg.Record, payload: JsonValue, policy: RetryPolicy, timeout: float
) -> ClaimedRow:
    # The first eight columns are ClaimedRow's first eight fields; reply_owner is the
    # claim's business, not routing's (tests/integration/test_claim_columns.py).
    return ClaimedRow(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        payload,
        r[_PAYLOAD + 1],
        r[_PAYLOAD + 2],
        r[_PAYLOAD + 3],
        r[_REPLY_TO],
        r[_DEAD_LETTER_ID],
        policy,
        timeout,
        r[_AGE],
        r[_TRACEPARENT],
    )


# --- dead letters and abandoned executions, as the operator reads them ---


@dataclass(frozen=True, slots=True)
class DeadLetterSummary:
    """One row of :meth:`dispatcher.admin.Admin.list_dead_letters`."""

    id: int
    scope: str
    trigger_id: int
    trigger_name: str
    reason: DeadLetterReason
    resolution: Resolution
    attempts: int
    dead_lettered_at: datetime
    resolved_at: datetime | None
    replayed_as: uuid.UUID | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One failed attempt from a dead letter's error history."""

    attempt: int | None
    kind: str | None
    message: str
    at: datetime | None


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What one dead-letter handler made of a dead letter: ``outcome`` is ``HANDLED`` or
    ``HANDLER_FAILED`` (with the ``error``). ``trigger_id`` and ``trigger`` name the handler
    trigger."""

    trigger_id: int | None
    trigger: str | None
    outcome: Resolution | None
    error: str | None
    at: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetterDetail:
    """Everything kept about one dead letter (:meth:`dispatcher.admin.Admin.show_dead_letter`).

    ``policy`` is the retry policy snapshot taken when the event was enqueued, as stored
    (keys ``kind``, ``base_delay``, ``factor``, ``max_delay``, ``jitter``, ``max_attempts``,
    ``max_event_age``, ``park_on``, ``timeout``; snapshots older than parking lack
    ``park_on``). For a replayed letter, ``replay_pending`` says whether
    the new event still waits in the outbox and ``replay_dead_letter_id`` names the dead
    letter it became if it failed again. ``handler_outcomes`` lists what each dead-letter
    handler that ran for it made of it, in the order they finished: any failure among them
    leaves the letter ``handler_failed``.
    """

    id: int
    outbox_id: int
    event_id: uuid.UUID
    trigger_id: int
    scope: str
    trigger_name: str
    target: str
    registered_by: str
    payload: JsonValue
    policy: Mapping[str, JsonValue]
    depth: int
    attempts: int
    reason: DeadLetterReason
    errors: tuple[ErrorEntry, ...]
    resolution: Resolution
    resolution_note: str | None
    replayed_as: uuid.UUID | None
    event_created_at: datetime
    dead_lettered_at: datetime
    resolved_at: datetime | None
    replay_pending: bool
    replay_dead_letter_id: int | None
    handler_outcomes: tuple[HandlerOutcome, ...] = ()


@dataclass(frozen=True, slots=True)
class AbandonedExecution:
    """A synchronous call's result that nobody was left to receive."""

    id: int
    reply_to: str
    event_id: uuid.UUID
    trigger_id: int
    scope: str
    target: str
    status: int
    outcome: Literal["success", "failure"]
    result: JsonValue
    error: str | None
    created_at: datetime


def dead_letter_summary(r: asyncpg.Record) -> DeadLetterSummary:
    return from_columns(
        DeadLetterSummary,
        r,
        reason=DeadLetterReason(r["reason"]),
        resolution=Resolution(r["resolution"]),
    )


def dead_letter_detail(r: asyncpg.Record) -> DeadLetterDetail:
    policy = json_value(r["policy"])
    errors = json_value(r["errors"])
    handlers = json_value(r["handler_outcomes"])
    return from_columns(
        DeadLetterDetail,
        r,
        handler_outcomes=(
            tuple(_handler_outcome(h) for h in handlers) if isinstance(handlers, list) else ()
        ),
        payload=json_value(r["payload"]),
        policy=policy if isinstance(policy, Mapping) else {},
        reason=DeadLetterReason(r["reason"]),
        errors=tuple(_error_entry(e) for e in errors) if isinstance(errors, list) else (),
        resolution=Resolution(r["resolution"]),
    )


def abandoned_execution(r: asyncpg.Record) -> AbandonedExecution:
    return from_columns(
        AbandonedExecution,
        r,
        outcome="success" if r["outcome"] == "success" else "failure",
        result=None if r["result"] is None else json_value(r["result"]),
    )


# Entries of the jsonb lists (errors, handler outcomes) are written by the runtime, and read
# leniently all the same, so that a hand-edited row still shows: a value of the wrong type
# reads as missing.


def _error_entry(entry: JsonValue) -> ErrorEntry:
    if not isinstance(entry, Mapping):
        return ErrorEntry(attempt=None, kind=None, message=_text(entry), at=None)
    message = entry.get("message")
    return ErrorEntry(
        attempt=_int(entry.get("attempt")),
        kind=_str(entry.get("kind")),
        message=message if isinstance(message, str) else _text(entry),
        at=_moment(entry.get("at")),
    )


_HANDLER_OUTCOMES = frozenset({Resolution.HANDLED.value, Resolution.HANDLER_FAILED.value})


def _handler_outcome(entry: JsonValue) -> HandlerOutcome:
    if not isinstance(entry, Mapping):
        return HandlerOutcome(None, None, None, error=_text(entry), at=None)
    outcome = _str(entry.get("outcome"))
    return HandlerOutcome(
        trigger_id=_int(entry.get("trigger_id")),
        trigger=_str(entry.get("trigger")),
        outcome=Resolution(outcome) if outcome in _HANDLER_OUTCOMES else None,
        error=_str(entry.get("error")),
        at=_moment(entry.get("at")),
    )


def _int(value: JsonValue) -> int | None:
    return value if is_int(value) else None


def _str(value: JsonValue) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: JsonValue) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _moment(value: JsonValue) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None
