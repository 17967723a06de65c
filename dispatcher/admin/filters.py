"""What an operator selects: the dead-letter filter, durations and moments, and the checks on
every value an admin call takes.

>>> DeadLetterFilter(scope="acme", since=parse_duration("1d12h")).since
datetime.timedelta(days=1, seconds=43200)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from dispatcher.core.errors import DispatcherError, InvalidInput, TriggerNotFound
from dispatcher.core.models import check_name
from dispatcher.core.outcomes import DeadLetterReason, Resolution
from dispatcher.core.validate import is_int
from dispatcher.db import Connection
from dispatcher.flow import TriggerRef
from dispatcher.sql.admin import ACTIONABLE, FILTER_PARAMS, admin_queries

MAX_LIST_LIMIT = 10_000
MAX_IDS = 10_000
# The longest text a filter searches the errors and payloads for.
MAX_TEXT = 200
# Filters reach back at most this far; beyond it Postgres' timestamp arithmetic overflows.
MAX_DURATION = timedelta(days=36_600)

BIGINT_MAX = 2**63 - 1
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[wdhms])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_ACTIONABLE = frozenset(Resolution(r) for r in ACTIONABLE)

E = TypeVar("E", bound=StrEnum)


class DeadLetterNotFound(DispatcherError, LookupError):
    """No dead letter with this id (it never existed, or was purged).

    >>> raise DeadLetterNotFound(42)
    Traceback (most recent call last):
    dispatcher.admin.filters.DeadLetterNotFound: no dead letter with id 42
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
    return check_duration("duration", value)


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


def _member(name: str, value: str, enum: type[E]) -> E:
    try:
        return enum(value)
    except ValueError:
        raise InvalidInput(name, value, f"must be one of {[m.value for m in enum]}") from None


def check_duration(name: str, value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise InvalidInput(name, value, "must not be negative")
    if value > MAX_DURATION:
        raise InvalidInput(name, value, f"must be at most {MAX_DURATION.days} days")
    return value


def check_moment(name: str, value: object) -> datetime | timedelta:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(name, value, "must be timezone-aware (e.g. tzinfo=UTC)")
        return value
    if isinstance(value, timedelta):
        return check_duration(name, value)
    raise InvalidInput(name, value, "must be a datetime (a moment) or a timedelta (that long ago)")


def check_id(name: str, value: object) -> int:
    if not is_int(value) or not 1 <= value <= BIGINT_MAX:
        raise InvalidInput(name, value, "must be a positive integer id")
    return value


def check_limit(name: str, value: object, maximum: int) -> int:
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
    ``text`` keeps letters whose error history or payload contains it (case-insensitive, as
    stored: redacted values are not searched); ``scopes`` keeps letters of those scopes only
    (what an operator limited to some scopes may see).
    ``trigger`` is a trigger's name (in any scope unless ``scope`` is set); to name one
    trigger as an operator does, by id or scope and name, use :meth:`for_trigger`. A filter
    naming a trigger that is neither registered nor named by any dead letter makes the
    actions raise :class:`~dispatcher.core.errors.TriggerNotFound`.

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
    text: str | None = None
    scopes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.scope is not None:
            check_name("scope", self.scope)
        if self.trigger is not None:
            check_name("trigger", self.trigger)
        if self.trigger_id is not None:
            check_id("trigger_id", self.trigger_id)
        if self.reason is not None:
            object.__setattr__(self, "reason", _member("reason", self.reason, DeadLetterReason))
        if self.resolution is not None:
            resolution = _member("resolution", self.resolution, Resolution)
            object.__setattr__(self, "resolution", resolution)
        if self.since is not None:
            check_moment("since", self.since)
        if self.older_than is not None:
            check_moment("older_than", self.older_than)
        if self.ids is not None:
            raw: object = self.ids
            if isinstance(raw, str | bytes) or not isinstance(raw, Iterable):
                raise InvalidInput("ids", raw, "must be a collection of dead-letter ids")
            ids = tuple(sorted({check_id("ids", i) for i in raw}))
            if not ids:
                raise InvalidInput("ids", raw, "must name at least one id (omit it for any id)")
            if len(ids) > MAX_IDS:
                raise InvalidInput("ids", f"<{len(ids)} ids>", f"must name at most {MAX_IDS}")
            object.__setattr__(self, "ids", ids)
        if self.text is not None:
            if not isinstance(self.text, str) or not self.text.strip():
                raise InvalidInput("text", self.text, "must be a non-empty string")
            if len(self.text) > MAX_TEXT or "\x00" in self.text:
                raise InvalidInput("text", self.text, f"must be at most {MAX_TEXT} characters")
        if self.scopes is not None:
            raw_scopes: object = self.scopes
            if isinstance(raw_scopes, str | bytes) or not isinstance(raw_scopes, Iterable):
                raise InvalidInput("scopes", raw_scopes, "must be a collection of scope names")
            scopes = tuple(sorted({check_name("scopes", s) for s in raw_scopes}))
            if not scopes:
                raise InvalidInput("scopes", raw_scopes, "must name at least one scope")
            object.__setattr__(self, "scopes", scopes)

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every dead letter."""
        return self == DeadLetterFilter()

    def for_trigger(self, trigger: TriggerRef) -> DeadLetterFilter:
        """This filter narrowed to one trigger, named as flow control names it: by id, or by
        (scope, name) (see :func:`dispatcher.flow.parse_trigger_ref`). A scope or trigger id
        already set that names another trigger is refused: the filter would select nothing.

        >>> DeadLetterFilter(reason="timeout").for_trigger(("acme", "sync-crm"))
        DeadLetterFilter(scope='acme', trigger='sync-crm', ..., reason=<...TIMEOUT...>, ...)
        """
        if is_int(trigger):
            if self.trigger_id is not None and self.trigger_id != trigger:
                raise InvalidInput(
                    "trigger", trigger, f"the filter already names trigger id {self.trigger_id}"
                )
            return replace(self, trigger_id=trigger)
        if not isinstance(trigger, tuple) or len(trigger) != 2:
            raise InvalidInput("trigger", trigger, "must be a trigger id or (scope, name)")
        scope, name = trigger
        if self.scope is not None and self.scope != scope:
            raise InvalidInput(
                "trigger", f"{scope}/{name}", f"the filter already names scope {self.scope!r}"
            )
        if self.trigger is not None and self.trigger != name:
            raise InvalidInput(
                "trigger", f"{scope}/{name}", f"the filter already names trigger {self.trigger!r}"
            )
        return replace(self, scope=scope, trigger=name)


def filter_params(f: DeadLetterFilter) -> list[object]:
    """The filter as the statements of :mod:`dispatcher.sql.admin` take it, in the order of
    ``FILTER_PARAMS``."""
    values: dict[str, object] = {
        "scope": f.scope,
        "trigger_name": f.trigger,
        "trigger_id": f.trigger_id,
        "reason": None if f.reason is None else f.reason.value,
        "resolution": None if f.resolution is None else f.resolution.value,
        "since_at": f.since if isinstance(f.since, datetime) else None,
        "since_ago": f.since if isinstance(f.since, timedelta) else None,
        "older_at": f.older_than if isinstance(f.older_than, datetime) else None,
        "older_ago": f.older_than if isinstance(f.older_than, timedelta) else None,
        "ids": None if f.ids is None else list(f.ids),
        "text": None if f.text is None else f"%{like_escape(f.text)}%",
        "scopes": None if f.scopes is None else list(f.scopes),
    }
    return [values[name] for name in FILTER_PARAMS]


def like_escape(text: str) -> str:
    """``text`` as a literal inside an ILIKE pattern (backslash is the escape character).

    >>> like_escape("50%_off")
    '50\\\\%\\\\_off'
    """
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def check_trigger_known(conn: Connection, schema: str, f: DeadLetterFilter) -> None:
    """Raise :class:`~dispatcher.core.errors.TriggerNotFound` when ``f`` names a trigger (by
    id or name, with its scope if one is set) that is neither registered nor named by any dead
    letter: a typo would otherwise select nothing, silently, as ``pause`` refuses an unknown
    trigger. Call it when a selection came back empty; a row found proves the trigger known.
    """
    if f.trigger_id is None and f.trigger is None:
        return
    known = await conn.fetchval(
        admin_queries(schema).trigger_known, f.trigger_id, f.trigger, f.scope
    )
    if not known:
        raise TriggerNotFound(_trigger_text(f))


def _trigger_text(f: DeadLetterFilter) -> str | int:
    if f.trigger is None:
        assert f.trigger_id is not None
        return f.trigger_id if f.scope is None else f"{f.trigger_id} in scope {f.scope}"
    named = f.trigger if f.scope is None else f"{f.scope}/{f.trigger}"
    return named if f.trigger_id is None else f"{named} with id {f.trigger_id}"


def check_filter(filter: DeadLetterFilter | None) -> DeadLetterFilter:
    if filter is None:
        return DeadLetterFilter()
    if not isinstance(filter, DeadLetterFilter):
        raise InvalidInput("filter", filter, "must be a DeadLetterFilter")
    return filter


def check_actionable(f: DeadLetterFilter, action: str) -> None:
    if f.resolution is not None and f.resolution not in _ACTIONABLE:
        raise InvalidInput(
            "resolution",
            f.resolution.value,
            f"only {' or '.join(ACTIONABLE)} dead letters can be {action}ed",
        )
