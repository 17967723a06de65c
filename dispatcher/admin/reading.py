"""Reading dead letters and abandoned executions: the operator's lists and the full record of
one dead letter.

>>> await list_dead_letters(conn, "dispatcher", DeadLetterFilter(scope="acme"), limit=20)
[DeadLetterSummary(id=12, scope='acme', ...)]
"""

from __future__ import annotations

from datetime import datetime, timedelta

from dispatcher.admin.filters import (
    MAX_LIST_LIMIT,
    DeadLetterFilter,
    DeadLetterNotFound,
    check_id,
    check_limit,
    check_moment,
    check_trigger_known,
    filter_params,
)
from dispatcher.core.models import check_name
from dispatcher.db import Connection
from dispatcher.records import (
    AbandonedExecution,
    DeadLetterDetail,
    DeadLetterSummary,
    abandoned_execution,
    dead_letter_detail,
    dead_letter_summary,
)
from dispatcher.sql.admin import admin_queries


async def list_dead_letters(
    conn: Connection, schema: str, f: DeadLetterFilter, limit: int
) -> list[DeadLetterSummary]:
    """See :meth:`dispatcher.admin.Admin.list_dead_letters`."""
    check_limit("limit", limit, MAX_LIST_LIMIT)
    rows = await conn.fetch(admin_queries(schema).list_dead_letters, *filter_params(f), limit)
    if not rows:
        await check_trigger_known(conn, schema, f)
    return [dead_letter_summary(r) for r in rows]


async def show_dead_letter(conn: Connection, schema: str, id: int) -> DeadLetterDetail:
    """See :meth:`dispatcher.admin.Admin.show_dead_letter`."""
    check_id("id", id)
    r = await conn.fetchrow(admin_queries(schema).get_dead_letter, id)
    if r is None:
        raise DeadLetterNotFound(id)
    return dead_letter_detail(r)


async def list_abandoned(
    conn: Connection,
    schema: str,
    limit: int,
    since: datetime | timedelta | None,
    scope: str | None,
) -> list[AbandonedExecution]:
    """See :meth:`dispatcher.admin.Admin.list_abandoned`."""
    check_limit("limit", limit, MAX_LIST_LIMIT)
    if since is not None:
        check_moment("since", since)
    if scope is not None:
        check_name("scope", scope)
    rows = await conn.fetch(
        admin_queries(schema).list_abandoned,
        scope,
        since if isinstance(since, datetime) else None,
        since if isinstance(since, timedelta) else None,
        limit,
    )
    return [abandoned_execution(r) for r in rows]
