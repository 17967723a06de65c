"""Operator actions on dead letters, abandoned executions and the outbox backlog.

The ``dispatcher`` CLI is a thin layer over this package; everything it does can be done from
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

:class:`Admin` is the public surface; each of its jobs has a module: the filter and the
values an operator types (:mod:`~dispatcher.admin.filters`), reading
(:mod:`~dispatcher.admin.reading`), replay, discard and purge
(:mod:`~dispatcher.admin.actions`), the status snapshot (:mod:`~dispatcher.admin.status`).
Rows become values in :mod:`dispatcher.records`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dispatcher.admin import actions, audit, overview, pages, reading
from dispatcher.admin.actions import ReplayedLetter, ReplayPolicy, ReplayReport, SkippedLetter
from dispatcher.admin.audit import AuditEntry, AuditRecord
from dispatcher.admin.filters import (
    MAX_DURATION,
    MAX_IDS,
    MAX_LIST_LIMIT,
    DeadLetterFilter,
    DeadLetterNotFound,
    check_filter,
    parse_duration,
    parse_moment,
)
from dispatcher.admin.overview import HourCount, LiveCounts, TriggerLag
from dispatcher.admin.pages import BulkPreview, DeadLetterPage, PageCursor, TriggerLetters
from dispatcher.admin.status import (
    TOP_BACKLOG,
    OutboxCounts,
    StatusReport,
    TriggerBacklog,
    read_status,
)
from dispatcher.core.health import DEFAULT_READY_WINDOW
from dispatcher.db import Connection
from dispatcher.names import DEFAULT_SCHEMA, check_schema_name
from dispatcher.records import (
    AbandonedExecution,
    DeadLetterDetail,
    DeadLetterSummary,
    ErrorEntry,
    HandlerOutcome,
)

__all__ = [
    "MAX_DURATION",
    "MAX_IDS",
    "MAX_LIST_LIMIT",
    "TOP_BACKLOG",
    "AbandonedExecution",
    "Admin",
    "AuditEntry",
    "AuditRecord",
    "BulkPreview",
    "DeadLetterDetail",
    "DeadLetterFilter",
    "DeadLetterNotFound",
    "DeadLetterPage",
    "DeadLetterSummary",
    "ErrorEntry",
    "HandlerOutcome",
    "HourCount",
    "LiveCounts",
    "OutboxCounts",
    "PageCursor",
    "ReplayPolicy",
    "ReplayReport",
    "ReplayedLetter",
    "SkippedLetter",
    "StatusReport",
    "TriggerBacklog",
    "TriggerLag",
    "TriggerLetters",
    "parse_duration",
    "parse_moment",
]


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
        return await reading.list_dead_letters(conn, self.schema, check_filter(filter), limit)

    async def dead_letter_page(
        self,
        conn: Connection,
        filter: DeadLetterFilter | None = None,
        *,
        after: PageCursor | None = None,
        limit: int = 50,
    ) -> DeadLetterPage:
        """One page of the dead letters matching ``filter``, newest (``dead_lettered_at``,
        then id) first, from the end of the previous page (``after``: its ``next_cursor``).

        >>> page = await Admin().dead_letter_page(conn, DeadLetterFilter(text="smtp"))
        >>> more = await Admin().dead_letter_page(conn, after=page.next_cursor)
        """
        return await pages.read_page(conn, self.schema, check_filter(filter), after, limit)

    async def preview_bulk(self, conn: Connection, filter: DeadLetterFilter) -> BulkPreview:
        """How many open (or handler_failed) dead letters ``filter`` selects, by trigger: what
        a bulk :meth:`replay` or :meth:`discard` would act on now. Changes and locks nothing.

        >>> (await Admin().preview_bulk(conn, DeadLetterFilter(reason="timeout"))).letters
        12
        """
        return await pages.preview_bulk(conn, self.schema, check_filter(filter))

    async def record_action(self, conn: Connection, entry: AuditEntry) -> AuditRecord:
        """Write ``entry`` to the audit log; call it in the transaction of the action.

        >>> await Admin().record_action(conn, AuditEntry("alice", "flow.pause", scope="acme"))
        AuditRecord(id=1, ...)
        """
        return await audit.record_action(conn, self.schema, entry)

    async def audit_log(
        self,
        conn: Connection,
        *,
        before: int | None = None,
        scopes: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """The newest audit rows (before id ``before``); of ``scopes`` only, when given."""
        return await audit.list_actions(
            conn, self.schema, before=before, scopes=scopes, limit=limit
        )

    async def backlog_by_trigger(
        self, conn: Connection, scopes: Sequence[str] | None = None, limit: int = 50
    ) -> list[TriggerLag]:
        """Outbox rows by state and the oldest due row's wait, per trigger, busiest first."""
        return await overview.backlog_by_trigger(conn, self.schema, scopes, limit)

    async def dead_letters_per_hour(
        self,
        conn: Connection,
        now: datetime,
        scopes: Sequence[str] | None = None,
        hours: int = 24,
    ) -> list[HourCount]:
        """Dead letters opened in each of the last ``hours`` hours (UTC) up to ``now``."""
        return await overview.dead_letters_per_hour(conn, self.schema, scopes, hours, now)

    async def live_counts(
        self, conn: Connection, scopes: Sequence[str] | None = None
    ) -> LiveCounts:
        """Due and parked rows, dead letters needing action, abandoned executions."""
        return await overview.live_counts(conn, self.schema, scopes)

    async def show_dead_letter(self, conn: Connection, id: int) -> DeadLetterDetail:
        """Everything about one dead letter; :class:`DeadLetterNotFound` for an unknown id.

        >>> (await Admin().show_dead_letter(conn, 12)).errors[-1].message
        'TimeoutError: no reply in 30s'
        """
        return await reading.show_dead_letter(conn, self.schema, id)

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
        return await actions.replay(
            conn, self.schema, check_filter(filter), policy=policy, dry_run=dry_run, limit=limit
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
        return await actions.discard(
            conn, self.schema, check_filter(filter), dry_run=dry_run, limit=limit
        )

    async def purge(self, conn: Connection, *, older_than: timedelta, dry_run: bool = False) -> int:
        """Delete dead letters resolved for good (handled, replayed or discarded) more than
        ``older_than`` ago; the count. Open and handler_failed letters are never deleted.

        >>> await Admin().purge(conn, older_than=timedelta(days=30))
        120
        """
        return await actions.purge(conn, self.schema, older_than=older_than, dry_run=dry_run)

    async def status(
        self, conn: Connection, *, ready_window: float = DEFAULT_READY_WINDOW
    ) -> StatusReport:
        """Backlog, lag, parked rows, dead letters, abandoned executions, pauses and
        breakers, from one snapshot; and ``progress``, not ready when a claimable row has
        waited longer than ``ready_window`` seconds (no dispatcher claimed it).

        >>> report = await Admin().status(conn)
        >>> report.outbox.oldest_due_seconds
        0.42
        >>> [p.target for p in report.pauses]
        ['scope acme']
        """
        return await read_status(conn, self.schema, ready_window=ready_window)

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
        return await reading.list_abandoned(conn, self.schema, limit, since, scope)
