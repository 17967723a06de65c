"""The audit log: one row per action an operator took through the console, written in the
transaction of the action itself, so a row exists exactly when the action committed.

>>> async with conn.transaction():
...     n = await Admin().discard(conn, DeadLetterFilter(ids=(12,)))
...     await record_action(conn, "dispatcher", AuditEntry("alice", "dead_letters.discard",
...         count=n, target="dead letter 12"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from dispatcher.admin.filters import check_id, check_limit
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue, check_name
from dispatcher.db import Connection
from dispatcher.records import json_value
from dispatcher.sql.admin import admin_queries

MAX_AUDIT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An action to record: who (``actor``), what (``action``), in which ``scope`` (None:
    several or all), on what (``target``), by which ``filter``, how many rows it changed
    (``count``), and any ``detail`` (the replay policy, a note)."""

    actor: str
    action: str
    count: int = 0
    scope: str | None = None
    target: str | None = None
    filter: Mapping[str, JsonValue] | None = None
    detail: Mapping[str, JsonValue] | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A row of the audit log."""

    id: int
    at: datetime
    actor: str
    action: str
    scope: str | None
    target: str | None
    filter: JsonValue
    count: int
    detail: JsonValue


async def record_action(conn: Connection, schema: str, entry: AuditEntry) -> AuditRecord:
    """Insert ``entry``; call it inside the action's transaction."""
    check_name("actor", entry.actor)
    check_name("action", entry.action)
    if entry.scope is not None:
        check_name("scope", entry.scope)
    if not isinstance(entry.count, int) or entry.count < 0:
        raise InvalidInput("count", entry.count, "must be a non-negative integer")
    row = await conn.fetchrow(
        admin_queries(schema).audit,
        entry.actor,
        entry.action,
        entry.scope,
        entry.target,
        None if entry.filter is None else json.dumps(entry.filter, default=str),
        entry.count,
        None if entry.detail is None else json.dumps(entry.detail, default=str),
    )
    assert row is not None  # INSERT ... RETURNING of one row
    return AuditRecord(
        row["id"],
        row["at"],
        entry.actor,
        entry.action,
        entry.scope,
        entry.target,
        None if entry.filter is None else json_value(json.dumps(entry.filter, default=str)),
        entry.count,
        None if entry.detail is None else json_value(json.dumps(entry.detail, default=str)),
    )


async def list_actions(
    conn: Connection,
    schema: str,
    *,
    before: int | None = None,
    scopes: Sequence[str] | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """The newest audit rows (before id ``before``), of ``scopes`` only when given."""
    check_limit("limit", limit, MAX_AUDIT_PAGE)
    if before is not None:
        check_id("before", before)
    rows = await conn.fetch(
        admin_queries(schema).list_audit,
        before,
        None if scopes is None else [check_name("scopes", s) for s in scopes],
        limit,
    )
    return [
        AuditRecord(
            r["id"],
            r["at"],
            r["actor"],
            r["action"],
            r["scope"],
            r["target"],
            None if r["filter"] is None else json_value(r["filter"]),
            r["count"],
            None if r["detail"] is None else json_value(r["detail"]),
        )
        for r in rows
    ]
