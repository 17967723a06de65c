"""Operator actions on dead letters, abandoned executions and the outbox backlog.

The ``dispatcher`` CLI is a thin layer over this module; everything it does can be done from
Python with an asyncpg connection:

>>> admin = Admin()
>>> letters = await admin.list_dead_letters(conn, DeadLetterFilter(scope="acme"))
>>> report = await admin.replay(conn, DeadLetterFilter(ids=(letters[0].id,)))
>>> report.replayed[0].event_id
UUID('...')

Every action that changes rows runs in one transaction, locks what it changes, and changes
only dead letters still open (or whose handler failed), so running it twice, or from two
terminals at once, acts on each dead letter once. Triggers are administered through
:class:`dispatcher.triggers.TriggerRegistry`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeAlias, cast

import asyncpg

from dispatcher.core.errors import DispatcherError, InvalidInput
from dispatcher.core.models import BackoffKind, JsonValue, RetryPolicy, check_name
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.core.validate import is_int, is_number
from dispatcher.db import Connection
from dispatcher.flow import Breaker, Pause
from dispatcher.names import DEFAULT_SCHEMA, check_schema_name
from dispatcher.sql.admin import ACTIONABLE, FILTER_PARAMS, FINAL, admin_queries
from dispatcher.triggers import policy_from_record

ReplayPolicy: TypeAlias = Literal["original", "current"]

MAX_LIST_LIMIT = 10_000
MAX_IDS = 10_000
# Filters reach back at most this far; beyond it Postgres' timestamp arithmetic overflows.
MAX_DURATION = timedelta(days=36_600)
TOP_BACKLOG = 10

_BIGINT_MAX = 2**63 - 1
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[wdhms])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_ACTIONABLE = frozenset(Resolution(r) for r in ACTIONABLE)


class DeadLetterNotFound(DispatcherError, LookupError):
    """No dead letter with this id (it never existed, or was purged).

    >>> raise DeadLetterNotFound(42)
    Traceback (most recent call last):
    dispatcher.admin.DeadLetterNotFound: no dead letter with id 42
    """

    def __init__(self, ids: int | Sequence[int]) -> None:
        self.ids: tuple[int, ...] = (ids,) if isinstance(ids, int) else tuple(ids)
        label = "id" if len(self.ids) == 1 else "ids"
        super().__init__(f"no dead letter with {label} {', '.join(map(str, self.ids))}")


def parse_duration(text: str) -> timedelta:
    """Parse ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a sum such as ``1h30m``.

    >>> parse_duration("1d12h")
    datetime.timedelta(days=1, seconds=43200)
    """
    if not isinstance(text, str) or not _DURATION.fullmatch(text.strip()):
        raise InvalidInput(
            "duration",
            text,
            "expected a number and a unit (w, d, h, m, s), e.g. 7d, 12h, 30m, 45s or 1h30m",
        )
    seconds = sum(
        float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text.strip())
    )
    try:
        value = timedelta(seconds=seconds)
    except OverflowError:
        raise InvalidInput("duration", text, f"must be at most {MAX_DURATION.days}d") from None
    return _check_duration("duration", value)


def parse_moment(text: str) -> timedelta | datetime:
    """Parse a duration (that long ago, as :func:`parse_duration` reads it) or an ISO
    datetime (a naive one is taken as UTC).

    >>> parse_moment("2026-11-22T10:00:00")
    datetime.datetime(2026, 11, 22, 10, 0, tzinfo=datetime.timezone.utc)
    """
    try:
        return parse_duration(text)
    except InvalidInput:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            "moment",
            text,
            "expected a duration (7d, 12h, 30m, 45s) or an ISO datetime (2026-11-22T10:00:00Z)",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _check_duration(name: str, value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise InvalidInput(name, value, "must not be negative")
    if value > MAX_DURATION:
        raise InvalidInput(name, value, f"must be at most {MAX_DURATION.days} days")
    return value


def _check_moment(name: str, value: object) -> datetime | timedelta:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(name, value, "must be timezone-aware (e.g. tzinfo=UTC)")
        return value
    if isinstance(value, timedelta):
        return _check_duration(name, value)
    raise InvalidInput(name, value, "must be a datetime (a moment) or a timedelta (that long ago)")


def _check_id(name: str, value: object) -> int:
    if not is_int(value) or not 1 <= value <= _BIGINT_MAX:
        raise InvalidInput(name, value, "must be a positive integer id")
    return value


def _check_limit(name: str, value: object, maximum: int) -> int:
    if not is_int(value) or not 1 <= value <= maximum:
        raise InvalidInput(name, value, f"must be an integer from 1 to {maximum}")
    return value


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an action applies to; every field set narrows the selection.

    ``since`` keeps letters dead-lettered at or after a moment (a ``datetime``) or within the
    last ``timedelta``; ``older_than`` keeps letters dead-lettered before a moment or more
    than a ``timedelta`` ago. Durations are measured on the database clock. ``ids`` names
    dead letters explicitly (an empty collection is refused rather than read as "all").

    >>> DeadLetterFilter(scope="acme", reason="timeout", older_than=timedelta(days=7))
    DeadLetterFilter(scope='acme', ..., reason=<DeadLetterReason.TIMEOUT: 'timeout'>, ...)
    """

    scope: str | None = None
    trigger: str | None = None
    trigger_id: int | None = None
    reason: DeadLetterReason | None = None
    resolution: Resolution | None = None
    since: datetime | timedelta | None = None
    older_than: datetime | timedelta | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.scope is not None:
            check_name("scope", self.scope)
        if self.trigger is not None:
            check_name("trigger", self.trigger)
        if self.trigger_id is not None:
            _check_id("trigger_id", self.trigger_id)
        if self.reason is not None:
            try:
                object.__setattr__(self, "reason", DeadLetterReason(self.reason))
            except ValueError:
                raise InvalidInput(
                    "reason", self.reason, f"must be one of {[r.value for r in DeadLetterReason]}"
                ) from None
        if self.resolution is not None:
            try:
                object.__setattr__(self, "resolution", Resolution(self.resolution))
            except ValueError:
                raise InvalidInput(
                    "resolution", self.resolution, f"must be one of {[r.value for r in Resolution]}"
                ) from None
        if self.since is not None:
            _check_moment("since", self.since)
        if self.older_than is not None:
            _check_moment("older_than", self.older_than)
        if self.ids is not None:
            raw: object = self.ids
            if isinstance(raw, str | bytes) or not isinstance(raw, Iterable):
                raise InvalidInput("ids", raw, "must be a collection of dead-letter ids")
            ids = tuple(sorted({_check_id("ids", i) for i in raw}))
            if not ids:
                raise InvalidInput("ids", raw, "must name at least one id (omit it for any id)")
            if len(ids) > MAX_IDS:
                raise InvalidInput("ids", f"<{len(ids)} ids>", f"must name at most {MAX_IDS}")
            object.__setattr__(self, "ids", ids)

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every dead letter."""
        return self == DeadLetterFilter()

    def _params(self) -> list[object]:
        # In the order of sql.admin.FILTER_PARAMS.
        values: dict[str, object] = {
            "scope": self.scope,
            "trigger_name": self.trigger,
            "trigger_id": self.trigger_id,
            "reason": None if self.reason is None else self.reason.value,
            "resolution": None if self.resolution is None else self.resolution.value,
            "since_at": self.since if isinstance(self.since, datetime) else None,
            "since_ago": self.since if isinstance(self.since, timedelta) else None,
            "older_at": self.older_than if isinstance(self.older_than, datetime) else None,
            "older_ago": self.older_than if isinstance(self.older_than, timedelta) else None,
            "ids": None if self.ids is None else list(self.ids),
        }
        return [values[name] for name in FILTER_PARAMS]


@dataclass(frozen=True, slots=True)
class DeadLetterSummary:
    """One row of :meth:`Admin.list_dead_letters`."""

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
class DeadLetterDetail:
    """Everything kept about one dead letter (:meth:`Admin.show_dead_letter`).

    ``policy`` is the retry policy snapshot taken when the event was enqueued, as stored
    (keys ``kind``, ``base_delay``, ``factor``, ``max_delay``, ``jitter``, ``max_attempts``,
    ``max_event_age``, ``park_on``, ``timeout``; snapshots older than parking lack
    ``park_on``). For a replayed letter, ``replay_pending`` says whether
    the new event still waits in the outbox and ``replay_dead_letter_id`` names the dead
    letter it became if it failed again.
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


@dataclass(frozen=True, slots=True)
class ReplayedLetter:
    """A dead letter a replay re-enqueued (or, in a dry run, would re-enqueue).

    ``event_id`` is the new outbox event (``None`` in a dry run); ``policy`` and ``timeout``
    are what the new row runs with.
    """

    dead_letter_id: int
    trigger_id: int
    scope: str
    trigger_name: str
    event_id: uuid.UUID | None
    policy: RetryPolicy
    timeout: float


@dataclass(frozen=True, slots=True)
class SkippedLetter:
    """A dead letter a replay left alone, and why."""

    dead_letter_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What :meth:`Admin.replay` did (or, when ``dry_run``, would do)."""

    dry_run: bool
    policy: ReplayPolicy
    replayed: tuple[ReplayedLetter, ...]
    skipped: tuple[SkippedLetter, ...]


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    """Outbox rows by state, and how long the oldest due row has waited (seconds).

    The states partition the outbox: ``parked`` rows (waiting for an operator or a sibling's
    success, see :class:`dispatcher.flow.FlowControl`) are in no other count.
    """

    due_now: int
    scheduled: int
    leased: int
    parked: int
    oldest_due_seconds: float | None

    @property
    def total(self) -> int:
        return self.due_now + self.scheduled + self.leased + self.parked


@dataclass(frozen=True, slots=True)
class TriggerBacklog:
    """Outbox rows waiting for one trigger (``total`` includes the ``parked`` ones)."""

    trigger_id: int
    scope: str
    trigger_name: str
    total: int
    due_now: int
    parked: int


@dataclass(frozen=True, slots=True)
class StatusReport:
    """The state of the tables at one instant of the database clock (``at``).

    ``dead_letters_by_resolution`` has every resolution (zero when none);
    ``unresolved_by_reason`` counts the letters still needing action (open or
    handler_failed) by why they died, zeros left out. ``pauses`` are the active pauses,
    oldest first (a pause with neither scope nor trigger holds everything); ``breakers``
    are the circuit breakers open, half-open or counting failures, most recently changed
    first (as :meth:`dispatcher.flow.FlowControl.pauses` and ``breakers`` list them).
    """

    at: datetime
    outbox: OutboxCounts
    dead_letters_by_resolution: Mapping[Resolution, int]
    unresolved_by_reason: Mapping[DeadLetterReason, int]
    top_backlog: tuple[TriggerBacklog, ...]
    abandoned_executions: int
    pauses: tuple[Pause, ...]
    breakers: tuple[Breaker, ...]


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


@dataclass(slots=True)
class _Plan:
    replay: list[ReplayedLetter] = field(default_factory=list)
    skipped: list[SkippedLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Admin:
    """Dead-letter, status and abandoned-execution administration for one schema.

    >>> admin = Admin(schema="dispatcher")
    >>> (await admin.status(conn)).outbox.due_now
    0
    """

    schema: str = DEFAULT_SCHEMA

    def __post_init__(self) -> None:
        check_schema_name(self.schema)

    async def list_dead_letters(
        self, conn: Connection, filter: DeadLetterFilter | None = None, limit: int = 100
    ) -> list[DeadLetterSummary]:
        """The newest dead letters matching ``filter``, at most ``limit`` of them.

        >>> await Admin().list_dead_letters(conn, DeadLetterFilter(reason="timeout"), limit=20)
        [DeadLetterSummary(id=12, scope='acme', ...)]
        """
        f = _check_filter(filter)
        _check_limit("limit", limit, MAX_LIST_LIMIT)
        rows = await conn.fetch(admin_queries(self.schema).list_dead_letters, *f._params(), limit)
        return [
            DeadLetterSummary(
                id=r["id"],
                scope=r["scope"],
                trigger_id=r["trigger_id"],
                trigger_name=r["trigger_name"],
                reason=DeadLetterReason(r["reason"]),
                resolution=Resolution(r["resolution"]),
                attempts=r["attempts"],
                dead_lettered_at=r["dead_lettered_at"],
                resolved_at=r["resolved_at"],
                replayed_as=r["replayed_as"],
                last_error=r["last_error"],
            )
            for r in rows
        ]

    async def show_dead_letter(self, conn: Connection, id: int) -> DeadLetterDetail:
        """Everything about one dead letter; :class:`DeadLetterNotFound` for an unknown id.

        >>> (await Admin().show_dead_letter(conn, 12)).errors[-1].message
        'TimeoutError: no reply in 30s'
        """
        _check_id("id", id)
        r = await conn.fetchrow(admin_queries(self.schema).get_dead_letter, id)
        if r is None:
            raise DeadLetterNotFound(id)
        policy = _json(r["policy"])
        errors = _json(r["errors"])
        return DeadLetterDetail(
            id=r["id"],
            outbox_id=r["outbox_id"],
            event_id=r["event_id"],
            trigger_id=r["trigger_id"],
            scope=r["scope"],
            trigger_name=r["trigger_name"],
            target=r["target"],
            registered_by=r["registered_by"],
            payload=_json(r["payload"]),
            policy=policy if isinstance(policy, Mapping) else {},
            depth=r["depth"],
            attempts=r["attempts"],
            reason=DeadLetterReason(r["reason"]),
            errors=tuple(_error_entry(e) for e in errors) if isinstance(errors, list) else (),
            resolution=Resolution(r["resolution"]),
            resolution_note=r["resolution_note"],
            replayed_as=r["replayed_as"],
            event_created_at=r["event_created_at"],
            dead_lettered_at=r["dead_lettered_at"],
            resolved_at=r["resolved_at"],
            replay_pending=r["replay_pending"],
            replay_dead_letter_id=r["replay_dead_letter_id"],
        )

    async def replay(
        self,
        conn: Connection,
        filter: DeadLetterFilter,
        *,
        policy: ReplayPolicy = "original",
        dry_run: bool = False,
        limit: int | None = None,
    ) -> ReplayReport:
        """Re-enqueue the matching open (or handler_failed) dead letters, each once.

        Each becomes a new outbox row (new event id, the original payload and depth, due
        now, a fresh attempt budget) and is marked ``replayed`` with ``replayed_as`` naming
        the new event, all in one transaction. ``policy="original"`` reuses the dead
        letter's policy snapshot; ``"current"`` takes the trigger's policy as it is now (a
        letter whose trigger was deleted is skipped). Letters already replayed, handled or
        discarded are never replayed again; ids named in ``filter.ids`` that are left alone
        are reported in ``skipped`` with the reason, and an id that does not exist raises
        :class:`DeadLetterNotFound`. ``limit`` caps how many are replayed (oldest first).
        ``dry_run`` returns the same report and changes nothing.

        >>> report = await Admin().replay(conn, DeadLetterFilter(trigger="welcome"))
        >>> len(report.replayed)
        3
        """
        f = _check_filter(filter)
        if policy not in ("original", "current"):
            raise InvalidInput("policy", policy, "must be 'original' or 'current'")
        _check_actionable(f, "replay")
        if limit is not None:
            _check_limit("limit", limit, _BIGINT_MAX)
        q = admin_queries(self.schema)
        async with conn.transaction():
            # A dry run takes the same locks (released when it returns) so that it reports
            # exactly what a real run would do at this moment.
            rows = await conn.fetch(q.lock_actionable, *f._params(), limit)
            plan = _plan_replay(rows, policy)
            if f.ids is not None:
                plan.skipped.extend(await self._explain_ids(conn, f, rows, limit))
            if not dry_run and plan.replay:
                plan = _Plan([_with_event_id(p) for p in plan.replay], plan.skipped)
                done = await conn.fetchrow(
                    q.replay,
                    [p.dead_letter_id for p in plan.replay],
                    [p.event_id for p in plan.replay],
                    [p.policy.kind.value for p in plan.replay],
                    [p.policy.base_delay for p in plan.replay],
                    [p.policy.factor for p in plan.replay],
                    [p.policy.max_delay for p in plan.replay],
                    [p.policy.jitter for p in plan.replay],
                    [p.policy.max_attempts for p in plan.replay],
                    [p.policy.max_event_age for p in plan.replay],
                    [p.timeout for p in plan.replay],
                    [json.dumps(sorted(p.policy.park_on)) for p in plan.replay],
                )
                assert done is not None  # an aggregate query always returns one row
                # The rows are locked and were checked actionable, so every one is marked
                # and enqueued; anything else is a bug, and the rollback keeps both tables
                # as they were.
                if not done["marked"] == done["enqueued"] == len(plan.replay):
                    raise RuntimeError(
                        f"replay marked {done['marked']} and enqueued {done['enqueued']} of "
                        f"{len(plan.replay)} locked dead letters; rolled back"
                    )
        return ReplayReport(
            dry_run=dry_run,
            policy=policy,
            replayed=tuple(plan.replay),
            skipped=tuple(sorted(plan.skipped, key=lambda s: s.dead_letter_id)),
        )

    async def discard(
        self,
        conn: Connection,
        filter: DeadLetterFilter,
        *,
        dry_run: bool = False,
        limit: int | None = None,
    ) -> int:
        """Mark the matching open (or handler_failed) dead letters ``discarded``; the count.

        An id in ``filter.ids`` that does not exist raises :class:`DeadLetterNotFound`.
        ``dry_run`` counts and changes nothing.

        >>> await Admin().discard(conn, DeadLetterFilter(scope="acme", reason="permanent"))
        4
        """
        f = _check_filter(filter)
        _check_actionable(f, "discard")
        if limit is not None:
            _check_limit("limit", limit, _BIGINT_MAX)
        q = admin_queries(self.schema)
        async with conn.transaction():
            rows = await conn.fetch(q.lock_actionable, *f._params(), limit)
            if f.ids is not None:
                await self._explain_ids(conn, f, rows, limit)
            ids = [r["id"] for r in rows]
            if dry_run or not ids:
                return len(ids)
            changed = await conn.fetch(q.discard, ids)
        return len(changed)

    async def purge(self, conn: Connection, *, older_than: timedelta, dry_run: bool = False) -> int:
        """Delete dead letters resolved for good (handled, replayed or discarded) more than
        ``older_than`` ago; the count. Open and handler_failed letters are never deleted.

        >>> await Admin().purge(conn, older_than=timedelta(days=30))
        120
        """
        if not isinstance(older_than, timedelta):
            raise InvalidInput("older_than", older_than, "must be a timedelta")
        _check_duration("older_than", older_than)
        q = admin_queries(self.schema)
        count = await conn.fetchval(q.count_purgeable if dry_run else q.purge, older_than)
        return int(count)

    async def status(self, conn: Connection) -> StatusReport:
        """Backlog, lag, parked rows, dead letters, abandoned executions, pauses and
        breakers, from one snapshot.

        >>> report = await Admin().status(conn)
        >>> report.outbox.oldest_due_seconds
        0.42
        >>> [p.target for p in report.pauses]
        ['scope acme']
        """
        r = await conn.fetchrow(admin_queries(self.schema).status, TOP_BACKLOG)
        assert r is not None  # FROM c, ob: always exactly one row
        by_resolution = dict.fromkeys(Resolution, 0)
        for name, n in zip(r["resolutions"], r["resolution_counts"], strict=True):
            by_resolution[Resolution(name)] = n
        return StatusReport(
            at=r["now"],
            outbox=OutboxCounts(
                due_now=r["due_now"],
                scheduled=r["scheduled"],
                leased=r["leased"],
                parked=r["parked"],
                oldest_due_seconds=r["oldest_due_seconds"],
            ),
            dead_letters_by_resolution=by_resolution,
            unresolved_by_reason={
                DeadLetterReason(name): n
                for name, n in zip(r["reasons"], r["reason_counts"], strict=True)
            },
            top_backlog=tuple(
                TriggerBacklog(
                    trigger_id=t, scope=s, trigger_name=n, total=total, due_now=due, parked=pk
                )
                for t, s, n, total, due, pk in zip(
                    r["top_trigger_ids"],
                    r["top_scopes"],
                    r["top_names"],
                    r["top_totals"],
                    r["top_due"],
                    r["top_parked"],
                    strict=True,
                )
            ),
            abandoned_executions=r["abandoned"],
            pauses=tuple(Pause(*p) for p in r["pauses"]),
            breakers=tuple(Breaker(*b) for b in r["breakers"]),
        )

    async def list_abandoned(
        self,
        conn: Connection,
        limit: int = 100,
        since: datetime | timedelta | None = None,
        *,
        scope: str | None = None,
    ) -> list[AbandonedExecution]:
        """The newest abandoned synchronous executions, optionally since a moment (or within
        the last ``timedelta``) and of one scope.

        >>> await Admin().list_abandoned(conn, 20, since=timedelta(hours=1))
        [AbandonedExecution(id=3, reply_to='inbox:…', ...)]
        """
        _check_limit("limit", limit, MAX_LIST_LIMIT)
        if since is not None:
            _check_moment("since", since)
        if scope is not None:
            check_name("scope", scope)
        rows = await conn.fetch(
            admin_queries(self.schema).list_abandoned,
            scope,
            since if isinstance(since, datetime) else None,
            since if isinstance(since, timedelta) else None,
            limit,
        )
        return [
            AbandonedExecution(
                id=r["id"],
                reply_to=r["reply_to"],
                event_id=r["event_id"],
                trigger_id=r["trigger_id"],
                scope=r["scope"],
                target=r["target"],
                status=r["status"],
                outcome="success" if r["outcome"] == "success" else "failure",
                result=None if r["result"] is None else _json(r["result"]),
                error=r["error"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    async def _explain_ids(
        self,
        conn: Connection,
        f: DeadLetterFilter,
        locked: Sequence[asyncpg.Record],
        limit: int | None,
    ) -> list[SkippedLetter]:
        """Why each explicitly named id was not locked; raise for ids that do not exist."""
        rows = await conn.fetch(admin_queries(self.schema).explain_ids, *f._params())
        missing = [r["id"] for r in rows if not r["found"]]
        if missing:
            raise DeadLetterNotFound(missing)
        taken = {r["id"] for r in locked}
        full = limit is not None and len(locked) >= limit
        return [SkippedLetter(r["id"], _skip_reason(r, full)) for r in rows if r["id"] not in taken]


def _check_filter(filter: DeadLetterFilter | None) -> DeadLetterFilter:
    if filter is None:
        return DeadLetterFilter()
    if not isinstance(filter, DeadLetterFilter):
        raise InvalidInput("filter", filter, "must be a DeadLetterFilter")
    return filter


def _check_actionable(f: DeadLetterFilter, action: str) -> None:
    if f.resolution is not None and f.resolution not in _ACTIONABLE:
        raise InvalidInput(
            "resolution",
            f.resolution.value,
            f"only {' or '.join(ACTIONABLE)} dead letters can be {action}ed",
        )


def _skip_reason(r: asyncpg.Record, limit_reached: bool) -> str:
    if not r["matches"]:
        return "does not match the other filters"
    resolution = r["resolution"]
    if resolution == Resolution.REPLAYED:
        return f"already replayed as {r['replayed_as']}"
    if resolution in FINAL:
        return f"already {resolution}"
    if limit_reached:
        return "beyond the limit"
    return "locked by a concurrent replay or discard; try again"


def _plan_replay(rows: Sequence[asyncpg.Record], policy: ReplayPolicy) -> _Plan:
    """Decide, row by row, the policy each replay runs with, or why it cannot run."""
    plan = _Plan()
    for r in rows:
        try:
            if policy == "current":
                if not r["trigger_exists"]:
                    plan.skipped.append(
                        SkippedLetter(
                            r["id"],
                            f"trigger {r['trigger_id']} ({r['trigger_name']!r}) no longer "
                            "exists; replay with the original policy instead",
                        )
                    )
                    continue
                retry, timeout = _current_policy(r)
            else:
                retry, timeout = _snapshot_policy(r["policy"])
        except (InvalidInput, KeyError, TypeError, ValueError) as exc:
            plan.skipped.append(SkippedLetter(r["id"], f"unusable {policy} policy: {exc}"))
            continue
        plan.replay.append(
            ReplayedLetter(
                dead_letter_id=r["id"],
                trigger_id=r["trigger_id"],
                scope=r["scope"],
                trigger_name=r["trigger_name"],
                event_id=None,
                policy=retry,
                timeout=timeout,
            )
        )
    return plan


def _current_policy(r: asyncpg.Record) -> tuple[RetryPolicy, float]:
    return policy_from_record(r), float(r["timeout"])


def _snapshot_policy(text: str) -> tuple[RetryPolicy, float]:
    # The snapshot was written by the runtime; validating it again keeps a hand-edited or
    # older-format row from being enqueued with a policy the dispatcher cannot run.
    snap = json.loads(text)
    if not isinstance(snap, dict):
        raise TypeError("the snapshot is not a JSON object")
    timeout = snap["timeout"]
    if not is_number(timeout) or timeout <= 0:
        raise InvalidInput("policy.timeout", timeout, "must be a positive number")
    retry = RetryPolicy(
        kind=BackoffKind(snap["kind"]),
        base_delay=snap["base_delay"],
        factor=snap["factor"],
        max_delay=snap["max_delay"],
        jitter=snap["jitter"],
        max_attempts=snap["max_attempts"],
        max_event_age=snap.get("max_event_age"),
        park_on=frozenset(snap.get("park_on") or ()),
    )
    return retry, float(timeout)


def _with_event_id(letter: ReplayedLetter) -> ReplayedLetter:
    return ReplayedLetter(
        dead_letter_id=letter.dead_letter_id,
        trigger_id=letter.trigger_id,
        scope=letter.scope,
        trigger_name=letter.trigger_name,
        event_id=uuid.uuid4(),
        policy=letter.policy,
        timeout=letter.timeout,
    )


def _json(text: str) -> JsonValue:
    return cast(JsonValue, json.loads(text))


def _error_entry(entry: JsonValue) -> ErrorEntry:
    if not isinstance(entry, Mapping):
        return ErrorEntry(attempt=None, kind=None, message=_text(entry), at=None)
    attempt = entry.get("attempt")
    kind = entry.get("kind")
    message = entry.get("message")
    return ErrorEntry(
        attempt=attempt if is_int(attempt) else None,
        kind=kind if isinstance(kind, str) else None,
        message=message if isinstance(message, str) else _text(entry),
        at=_moment(entry.get("at")),
    )


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
