"""The actions that change dead letters: replay, discard and purge.

Each runs in one transaction, locks what it changes, and changes only dead letters still
open (or whose handler failed), so running it twice, or from two terminals at once, acts on
each dead letter once.

>>> report = await replay(conn, "dispatcher", DeadLetterFilter(scope="acme"))
>>> [r.dead_letter_id for r in report.replayed]
[12, 13]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Literal, TypeAlias

import asyncpg

from dispatcher.admin.filters import (
    BIGINT_MAX,
    DeadLetterFilter,
    DeadLetterNotFound,
    check_actionable,
    check_duration,
    check_limit,
    check_trigger_known,
    filter_params,
)
from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import RetryPolicy
from dispatcher.core.outcomes import Resolution
from dispatcher.db import Connection
from dispatcher.records import policy_from_record, policy_from_snapshot
from dispatcher.sql.admin import FINAL, AdminSql, admin_queries

ReplayPolicy: TypeAlias = Literal["original", "current"]


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
    """What :meth:`dispatcher.admin.Admin.replay` did (or, when ``dry_run``, would do)."""

    dry_run: bool
    policy: ReplayPolicy
    replayed: tuple[ReplayedLetter, ...]
    skipped: tuple[SkippedLetter, ...]


@dataclass(slots=True)
class _Plan:
    replay: list[ReplayedLetter] = field(default_factory=list)
    skipped: list[SkippedLetter] = field(default_factory=list)


async def replay(
    conn: Connection,
    schema: str,
    f: DeadLetterFilter,
    *,
    policy: ReplayPolicy,
    dry_run: bool,
    limit: int | None,
) -> ReplayReport:
    """See :meth:`dispatcher.admin.Admin.replay`."""
    if policy not in ("original", "current"):
        raise InvalidInput("policy", policy, "must be 'original' or 'current'")
    _check_action(f, "replay", limit)
    async with conn.transaction():
        # A dry run takes the same locks (released when it returns) so that it reports
        # exactly what a real run would do at this moment.
        rows, skipped = await _lock(conn, schema, f, limit)
        plan = _plan_replay(rows, policy)
        plan.skipped.extend(skipped)
        if not dry_run and plan.replay:
            plan.replay = [replace(p, event_id=uuid.uuid4()) for p in plan.replay]
            await _enqueue(conn, admin_queries(schema), plan.replay)
    return ReplayReport(
        dry_run=dry_run,
        policy=policy,
        replayed=tuple(plan.replay),
        skipped=tuple(sorted(plan.skipped, key=lambda s: s.dead_letter_id)),
    )


async def _enqueue(conn: Connection, q: AdminSql, letters: Sequence[ReplayedLetter]) -> None:
    done = await conn.fetchrow(
        q.replay,
        [p.dead_letter_id for p in letters],
        [p.event_id for p in letters],
        [p.policy.kind.value for p in letters],
        [p.policy.base_delay for p in letters],
        [p.policy.factor for p in letters],
        [p.policy.max_delay for p in letters],
        [p.policy.jitter for p in letters],
        [p.policy.max_attempts for p in letters],
        [p.policy.max_event_age for p in letters],
        [p.timeout for p in letters],
        [json.dumps(sorted(p.policy.park_on)) for p in letters],
    )
    assert done is not None  # an aggregate query always returns one row
    # The rows are locked and were checked actionable, so every one is marked and enqueued;
    # anything else is a bug, and the rollback keeps both tables as they were.
    if not done["marked"] == done["enqueued"] == len(letters):
        raise RuntimeError(
            f"replay marked {done['marked']} and enqueued {done['enqueued']} of "
            f"{len(letters)} locked dead letters; rolled back"
        )


async def discard(
    conn: Connection, schema: str, f: DeadLetterFilter, *, dry_run: bool, limit: int | None
) -> int:
    """See :meth:`dispatcher.admin.Admin.discard`."""
    _check_action(f, "discard", limit)
    async with conn.transaction():
        rows, _ = await _lock(conn, schema, f, limit)
        ids = [r["id"] for r in rows]
        if dry_run or not ids:
            return len(ids)
        changed = await conn.fetch(admin_queries(schema).discard, ids)
    return len(changed)


async def purge(conn: Connection, schema: str, *, older_than: timedelta, dry_run: bool) -> int:
    """See :meth:`dispatcher.admin.Admin.purge`."""
    if not isinstance(older_than, timedelta):
        raise InvalidInput("older_than", older_than, "must be a timedelta")
    check_duration("older_than", older_than)
    q = admin_queries(schema)
    count = await conn.fetchval(q.count_purgeable if dry_run else q.purge, older_than)
    return int(count)


def _check_action(f: DeadLetterFilter, action: str, limit: int | None) -> None:
    check_actionable(f, action)
    if limit is not None:
        check_limit("limit", limit, BIGINT_MAX)


async def _lock(
    conn: Connection, schema: str, f: DeadLetterFilter, limit: int | None
) -> tuple[list[asyncpg.Record], list[SkippedLetter]]:
    """Lock the actionable dead letters ``f`` selects (oldest first, at most ``limit``), and
    say why each id named in ``f.ids`` was not locked. Raises for an id that does not exist
    and for a trigger nobody knows."""
    q = admin_queries(schema)
    rows = await conn.fetch(q.lock_actionable, *filter_params(f), limit)
    if not rows:
        await check_trigger_known(conn, schema, f)
    skipped = [] if f.ids is None else await _explain_ids(conn, q, f, rows, limit)
    return rows, skipped


async def _explain_ids(
    conn: Connection,
    q: AdminSql,
    f: DeadLetterFilter,
    locked: Sequence[asyncpg.Record],
    limit: int | None,
) -> list[SkippedLetter]:
    """Why each explicitly named id was not locked; raise for ids that do not exist."""
    rows = await conn.fetch(q.explain_ids, *filter_params(f))
    missing = [r["id"] for r in rows if not r["found"]]
    if missing:
        raise DeadLetterNotFound(missing)
    taken = {r["id"] for r in locked}
    full = limit is not None and len(locked) >= limit
    return [SkippedLetter(r["id"], _skip_reason(r, full)) for r in rows if r["id"] not in taken]


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
                retry, timeout = policy_from_record(r), float(r["timeout"])
            else:
                retry, timeout = policy_from_snapshot(r["policy"])
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
