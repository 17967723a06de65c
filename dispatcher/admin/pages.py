"""What the operator console reads about dead letters: one keyset page of the list, and the
dry-run preview of a bulk action (how many, which triggers) that the operator confirms.

>>> page = await read_page(conn, "dispatcher", DeadLetterFilter(resolution="open"), None, 50)
>>> page.next_cursor
PageCursor(dead_lettered_at=datetime.datetime(...), id=9950)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from dispatcher.admin.filters import (
    MAX_LIST_LIMIT,
    DeadLetterFilter,
    check_id,
    check_limit,
    filter_params,
)
from dispatcher.core.errors import InvalidInput
from dispatcher.db import Connection
from dispatcher.records import DeadLetterSummary, dead_letter_summary
from dispatcher.sql.admin import FILTER_PARAMS, admin_queries

# The most letters one page of a text search reads (~10 us each to test).
SEARCH_BUDGET = 10_000


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where a page ends: the last row's ``dead_lettered_at`` and ``id``. The next page holds
    the rows strictly after it, newest first; rows dead-lettered meanwhile never shift it.

    >>> PageCursor.parse(PageCursor(datetime(2026, 12, 1, tzinfo=UTC), 7).text)
    PageCursor(dead_lettered_at=datetime.datetime(2026, 12, 1, 0, 0, tzinfo=...), id=7)
    """

    dead_lettered_at: datetime
    id: int

    @property
    def text(self) -> str:
        return f"{self.dead_lettered_at.isoformat()}_{self.id}"

    @classmethod
    def parse(cls, text: str) -> PageCursor:
        at, sep, id_text = text.rpartition("_")
        try:
            moment = datetime.fromisoformat(at)
            if not sep or moment.tzinfo is None:
                raise ValueError(text)
            return cls(moment, check_id("cursor", int(id_text)))
        except (ValueError, InvalidInput):
            raise InvalidInput("cursor", text, "is not a page cursor of this list") from None


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    """One page of dead letters, newest first; ``next_cursor`` is None on the last page.

    A text search reads at most :data:`SEARCH_BUDGET` letters a page (those matching the
    rest of the filter, newest first): when they hold fewer matches than a page,
    ``scan_limited`` is True and ``next_cursor`` is where the search goes on, older.
    """

    letters: tuple[DeadLetterSummary, ...]
    next_cursor: PageCursor | None
    scan_limited: bool = False


@dataclass(frozen=True, slots=True)
class TriggerLetters:
    """The actionable dead letters (open or handler_failed) of one trigger a filter selects.

    ``trigger_gone``: how many of them name a trigger deleted since (a replay with the
    current policy skips those)."""

    scope: str
    trigger_id: int
    trigger_name: str
    letters: int
    trigger_gone: int
    oldest: datetime
    newest: datetime


@dataclass(frozen=True, slots=True)
class BulkPreview:
    """What a bulk replay or discard by ``filter`` would act on now, by trigger."""

    filter: DeadLetterFilter
    triggers: tuple[TriggerLetters, ...]

    @property
    def letters(self) -> int:
        return sum(t.letters for t in self.triggers)

    @property
    def trigger_gone(self) -> int:
        return sum(t.trigger_gone for t in self.triggers)


async def read_page(
    conn: Connection,
    schema: str,
    f: DeadLetterFilter,
    after: PageCursor | None,
    limit: int,
) -> DeadLetterPage:
    """See :meth:`dispatcher.admin.Admin.dead_letter_page`."""
    check_limit("limit", limit, MAX_LIST_LIMIT)
    if f.text is not None:
        return await _search_page(conn, schema, f, after, limit)
    rows = await conn.fetch(
        admin_queries(schema).dead_letter_page,
        *filter_params(f),
        None if after is None else after.dead_lettered_at,
        None if after is None else after.id,
        limit + 1,
    )
    letters = tuple(dead_letter_summary(r) for r in rows[:limit])
    more = len(rows) > limit
    last = letters[-1] if letters else None
    cursor = PageCursor(last.dead_lettered_at, last.id) if more and last is not None else None
    return DeadLetterPage(letters, cursor)


async def _search_page(
    conn: Connection,
    schema: str,
    f: DeadLetterFilter,
    after: PageCursor | None,
    limit: int,
) -> DeadLetterPage:
    q = admin_queries(schema)
    params = filter_params(replace(f, text=None))
    at = None if after is None else after.dead_lettered_at
    after_id = None if after is None else after.id
    pattern = filter_params(f)[FILTER_PARAMS.index("text")]
    rows = await conn.fetch(
        q.dead_letter_search_page, *params, at, after_id, limit + 1, SEARCH_BUDGET, pattern
    )
    letters = tuple(dead_letter_summary(r) for r in rows[:limit])
    if len(rows) > limit:
        last = letters[-1]
        return DeadLetterPage(letters, PageCursor(last.dead_lettered_at, last.id))
    # Fewer matches than a page: either the rows ran out, or the budget did.
    edge = await conn.fetchrow(q.search_boundary, *params, at, after_id, SEARCH_BUDGET)
    if edge is None:
        return DeadLetterPage(letters, None)
    return DeadLetterPage(
        letters, PageCursor(edge["dead_lettered_at"], edge["id"]), scan_limited=True
    )


async def preview_bulk(conn: Connection, schema: str, f: DeadLetterFilter) -> BulkPreview:
    """See :meth:`dispatcher.admin.Admin.preview_bulk`."""
    rows = await conn.fetch(admin_queries(schema).summarize_actionable, *filter_params(f))
    return BulkPreview(
        f,
        tuple(
            TriggerLetters(
                scope=r["scope"],
                trigger_id=r["trigger_id"],
                trigger_name=r["trigger_name"],
                letters=r["letters"],
                trigger_gone=r["trigger_gone"],
                oldest=r["oldest"],
                newest=r["newest"],
            )
            for r in rows
        ),
    )
