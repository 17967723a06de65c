"""Seed parked rows and breaker states as the runtime writes them.

Shared by test_admin.py and test_cli_flow.py. The shapes are those of ``dispatcher.sql``'s
park and breaker statements (a parked row: due_at = 'infinity', parked_at and parked_reason
set, no lease, attempts kept, the failure appended to its errors), so each test controls the
flow-control state exactly without running a dispatcher.
"""

from __future__ import annotations

import asyncpg


async def park(
    conn: asyncpg.Connection,
    outbox_id: int,
    *,
    reason: str = "target_not_found",
    attempts: int = 1,
    schema: str = "dispatcher",
) -> None:
    await conn.execute(
        f"""UPDATE "{schema}".outbox
        SET due_at = 'infinity', parked_at = clock_timestamp(), parked_reason = $2,
            lease_token = NULL, attempts = $3,
            errors = errors || jsonb_build_array(jsonb_build_object(
                'attempt', $3::int, 'kind', $2::text,
                'message', 'no handler registered for ' || target,
                'at', clock_timestamp()))
        WHERE id = $1""",
        outbox_id,
        reason,
        attempts,
    )


async def set_breaker(
    conn: asyncpg.Connection,
    trigger_id: int,
    *,
    state: str,
    failures: int,
    open_for: float | None = None,
    probe_id: int | None = None,
    opened_count: int = 0,
    schema: str = "dispatcher",
) -> None:
    """Upsert a trigger's breaker; ``open_for`` seconds from now sets open_until."""
    await conn.execute(
        f"""INSERT INTO "{schema}".breakers AS b (trigger_id, state, failures, open_until,
            opened_at, probe_id, opened_count, updated_at)
        VALUES ($1, $2, $3,
            clock_timestamp() + make_interval(secs => $4::float8),
            CASE WHEN $4::float8 IS NOT NULL THEN clock_timestamp() END,
            $5, $6, clock_timestamp())
        ON CONFLICT (trigger_id) DO UPDATE
            SET state = excluded.state, failures = excluded.failures,
                open_until = excluded.open_until, opened_at = excluded.opened_at,
                probe_id = excluded.probe_id, opened_count = excluded.opened_count,
                updated_at = excluded.updated_at""",
        trigger_id,
        state,
        failures,
        open_for,
        probe_id,
        opened_count,
    )
